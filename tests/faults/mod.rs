//! The fault suite: `train`, `cache`, `fit` and `purge --retrain` killed with SIGKILL at many
//! points (delays spread over a reference run's duration, from a fixed seed), then run again to
//! completion. After every kill nothing partial is visible (no run, store shard, curvature file
//! or purge directory that is half written, no stray temporary file) and every rerun's results
//! are byte-identical to an uninterrupted run's: the weights and data manifest of a run, the
//! store's shards and manifest, the curvature's arrays (its header holds the fit's duration),
//! the purge's weights and manifest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rand::{Rng, SeedableRng};

use crate::common::digits_csv;

/// Kill points per command.
const KILLS: usize = 20;

fn culprit(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_culprit")).args(args).arg("--quiet").output().unwrap()
}

fn ok(args: &[&str]) {
    let o = culprit(args);
    assert!(o.status.success(), "culprit {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// No temporary file or directory of culprit's anywhere under `dir`.
fn assert_no_temporaries(dir: &Path, after: &str) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp-") && !name.contains(".partial"), "{after}: {name} left in {}", d.display());
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
}

/// The curvature file's arrays (the container's payload).
fn curvature_payload(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    culprit::curvature::CURVATURE_FORMAT.parse(path, &bytes).unwrap().payload.to_vec()
}

/// Kills `args` at `KILLS` points spread over an uninterrupted run's duration. After each kill
/// the output, if `visible`, must already be whole (`check`); then `clean` removes what a
/// finished run made (a store is left for `cache` to resume), the command runs again to
/// completion, nothing temporary is left anywhere under `work`, and `check` compares with the
/// uninterrupted run.
fn kill_and_rerun(
    name: &str,
    args: &[&str],
    work: &Path,
    visible: &dyn Fn() -> bool,
    clean: &dyn Fn(),
    check: &dyn Fn(&str),
) {
    let started = Instant::now();
    ok(args);
    let full = started.elapsed();
    check(&format!("{name}: uninterrupted"));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(name.len() as u64);
    for k in 0..KILLS {
        clean();
        let delay = full.mul_f64(rng.random::<f64>() * 1.1);
        let mut child = Command::new(env!("CARGO_BIN_EXE_culprit")).args(args).arg("--quiet").spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        let after = format!("{name}: killed after {} ms of {} (round {k})", delay.as_millis(), full.as_millis());
        if visible() {
            check(&format!("{after}, as left"));
            clean();
        }
        ok(args);
        assert_no_temporaries(work, &after);
        check(&after);
    }
}

#[test]
fn killed_commands_leave_nothing_partial_and_rerun_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let data = work.join("digits.csv");
    std::fs::copy(digits_csv(), &data).unwrap();
    let run = work.join("run");
    let train = ["train", "--data", s(&data), "--limit", "600", "--model", "mlp", "--hidden", "32", "--epochs", "3"];
    let train: Vec<&str> = train.iter().copied().chain(["--out", s(&run)]).collect();
    let reference = work.join("reference");
    std::fs::create_dir(&reference).unwrap();
    // train: a run appears whole or not at all; the rerun (after removing it) is identical.
    let keep = |from: &Path, names: &[&str], to: &str| {
        let dir = reference.join(to);
        std::fs::create_dir_all(&dir).unwrap();
        for n in names {
            std::fs::copy(from.join(n), dir.join(n)).unwrap();
        }
    };
    let same = |from: &Path, names: &[&str], to: &str, after: &str| {
        for n in names {
            let (a, b) = (std::fs::read(from.join(n)).unwrap(), std::fs::read(reference.join(to).join(n)).unwrap());
            assert!(a == b, "{after}: {n} differs from the uninterrupted run's");
        }
    };
    let first = std::cell::Cell::new(true);
    kill_and_rerun(
        "train",
        &train,
        work,
        &|| run.exists(),
        &|| {
            let _ = std::fs::remove_dir_all(&run);
        },
        &|after| {
            if first.replace(false) {
                keep(&run, &["weights.bin", "manifest.json"], "train");
            }
            same(&run, &["weights.bin", "manifest.json"], "train", after);
        },
    );
    // cache: resumes where it stopped; the store is byte-identical.
    let store = run.join("gradients");
    let cache = ["cache", "--run", s(&run), "--project", "none", "--rows-per-shard", "50", "--batch", "25"];
    let shards = || files(&store).iter().map(|p| p.to_string_lossy().into_owned()).collect::<Vec<_>>();
    let first = std::cell::Cell::new(true);
    kill_and_rerun(
        "cache",
        &cache,
        work,
        &|| false,
        &|| {
            // Start every round from an empty store, so the kill lands mid-build; the rerun
            // resumes from whatever shards the killed run completed.
            let _ = std::fs::remove_dir_all(&store);
        },
        &|after| {
            let names = shards();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            if first.replace(false) {
                keep(&store, &names, "store");
            }
            assert_eq!(files(&reference.join("store")).len(), names.len(), "{after}: the store's files");
            same(&store, &names, "store", after);
        },
    );
    // fit: the curvature file is written whole; its arrays are identical.
    let curvature = run.join("curvature/ekfac.bin");
    let fit = ["fit", "--run", s(&run), "--curvature", "ekfac"];
    let expected = std::cell::RefCell::new(None);
    kill_and_rerun(
        "fit",
        &fit,
        work,
        &|| curvature.exists(),
        &|| {
            let _ = std::fs::remove_file(&curvature);
        },
        &|after| {
            let payload = curvature_payload(&curvature);
            let mut e = expected.borrow_mut();
            let reference = e.get_or_insert_with(|| payload.clone());
            assert!(*reference == payload, "{after}: the curvature's arrays differ");
        },
    );
    // purge --retrain: the purged run appears whole or not at all; identical weights.
    let purged = work.join("purged");
    let ids = work.join("ids.txt");
    std::fs::write(&ids, "3 5 8 13 21 34\n").unwrap();
    let purge = ["purge", "--run", s(&run), "--ids", s(&ids), "--out", s(&purged), "--retrain"];
    let first = std::cell::Cell::new(true);
    kill_and_rerun(
        "purge",
        &purge,
        work,
        &|| purged.exists(),
        &|| {
            let _ = std::fs::remove_dir_all(&purged);
        },
        &|after| {
            if first.replace(false) {
                keep(&purged, &["weights.bin", "manifest.json"], "purged");
            }
            same(&purged, &["weights.bin", "manifest.json"], "purged", after);
        },
    );
}

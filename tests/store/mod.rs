//! The gradient store: rows equal the gradients, a killed `culprit cache` resumes to
//! byte-identical shards, and corrupted, truncated or stale stores are refused by name.

use culprit::workspace::kind::Classifier;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use burn::tensor::DType;
use culprit::gradients::projection::ProjectionSpec;
use culprit::gradients::{Measurement, gradient_rows, per_example_gradients};
use culprit::store::GradientStore;
use culprit::workspace::Run;
use culprit::workspace::{store_key, training_data};
use culprit_models::{Backend, Model};

use crate::common::digits_csv;

fn culprit(args: &[&str]) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_culprit")).args(args).arg("--quiet").output().unwrap();
    o
}

fn ok(args: &[&str]) {
    let o = culprit(args);
    assert!(o.status.success(), "culprit {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn err(args: &[&str]) -> String {
    let o = culprit(args);
    assert_eq!(o.status.code(), Some(2), "culprit {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn train(dir: &Path, name: &str, model: &str, limit: &str) -> std::path::PathBuf {
    let run = dir.join(name);
    let digits = digits_csv();
    let mut args = vec!["train", "--data", s(&digits), "--limit", limit, "--model", model, "--out", s(&run)];
    if model != "logreg" {
        args.extend(["--hidden", "48", "--epochs", "2"]);
    }
    ok(&args);
    run
}

fn shard_bytes(store: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(store)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn store_rows_are_the_per_example_gradients_in_every_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = train(dir.path(), "run", "mlp", "150");
    let run = Run::open(&run_dir).unwrap();
    let device = Backend::default().autodiff_device();
    let net = run.network(&device).unwrap();
    let data = training_data::<Classifier>(&run).unwrap();
    let exact = gradient_rows(&per_example_gradients(&net, &data.examples, data.labels(), Measurement::TRAINING_LOSS));
    let p = net.num_params();
    for (dtype, tol) in [("f32", 0.0), ("f16", 1e-3), ("bf16", 8e-3)] {
        let store = dir.path().join(format!("store-{dtype}"));
        ok(&[
            "cache",
            "--run",
            s(&run_dir),
            "--store",
            s(&store),
            "--dtype",
            dtype,
            "--batch",
            "32",
            "--rows-per-shard",
            "40",
            "--project",
            "none",
        ]);
        let g = GradientStore::open(&store, &store_key(&run, ProjectionSpec::None, 0).unwrap()).unwrap();
        assert_eq!((g.rows(), g.row_len(), g.shards.len()), (150, p, 4));
        let mut seen = 0;
        g.for_each_block(17, |first, rows| {
            for (k, row) in rows.chunks(p).enumerate() {
                let want = &exact[(first + k) * p..(first + k + 1) * p];
                let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
                let worst = row.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= tol * norm + 1e-6 * norm, "{dtype} row {}: {worst} vs norm {norm}", first + k);
                seen += 1;
            }
        });
        assert_eq!(seen, 150);
        assert_eq!(g.row(149).len(), p);
    }
    let _ = DType::F32;
}

#[test]
fn a_killed_cache_run_resumes_to_byte_identical_shards() {
    let dir = tempfile::tempdir().unwrap();
    let run = train(dir.path(), "run", "mlp", "1297");
    let reference = dir.path().join("reference");
    let args = |store: &Path| {
        vec![
            "cache".to_string(),
            "--run".into(),
            s(&run).into(),
            "--store".into(),
            s(store).into(),
            "--batch".into(),
            "1".into(),
            "--rows-per-shard".into(),
            "100".into(),
            "--project".into(),
            "jl:64".into(),
        ]
    };
    let r = args(&reference);
    ok(&r.iter().map(String::as_str).collect::<Vec<_>>());

    let resumed = dir.path().join("resumed");
    let a = args(&resumed);
    let mut child = Command::new(env!("CARGO_BIN_EXE_culprit")).args(&a).arg("--quiet").spawn().unwrap();
    let started = Instant::now();
    loop {
        let shards = std::fs::read_dir(&resumed)
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".grad")).count())
            .unwrap_or(0);
        if shards >= 3 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "cache finished before it could be killed; make the run slower");
        assert!(started.elapsed() < Duration::from_secs(120), "no shards appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = shard_bytes(&resumed).iter().filter(|(n, _)| n.ends_with(".grad")).count();
    assert!(partial < 13, "the run was not interrupted ({partial} shards)");
    // A corrupted finished shard must be recomputed too, not trusted.
    let first = resumed.join("shard-00000.grad");
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[200] ^= 1;
    std::fs::write(&first, bytes).unwrap();

    let o = culprit(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains("already complete") && report.contains("is complete"), "{report}");
    assert_eq!(shard_bytes(&resumed), shard_bytes(&reference));
}

#[test]
fn corrupted_truncated_incomplete_and_stale_stores_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = train(dir.path(), "run", "logreg", "200");
    let store = dir.path().join("store");
    let base = ["cache", "--run", s(&run_dir), "--store", s(&store), "--rows-per-shard", "50", "--project", "none"];
    ok(&base);
    let run = Run::open(&run_dir).unwrap();
    let key = store_key(&run, ProjectionSpec::None, 0).unwrap();
    assert!(GradientStore::open(&store, &key).is_ok());

    // Corruption: one flipped bit in the rows.
    let shard = store.join("shard-00002.grad");
    let original = std::fs::read(&shard).unwrap();
    let mut bad = original.clone();
    bad[original.len() / 2] ^= 0x10;
    std::fs::write(&shard, &bad).unwrap();
    let e = GradientStore::open(&store, &key).err().unwrap().to_string();
    assert!(e.contains("shard-00002.grad") && e.contains("corrupted"), "{e}");

    // Truncation.
    std::fs::write(&shard, &original[..original.len() - 100]).unwrap();
    let e = GradientStore::open(&store, &key).err().unwrap().to_string();
    assert!(e.contains("shard-00002.grad") && e.contains("truncated"), "{e}");

    // A missing shard: the store is incomplete and says how to finish it.
    std::fs::remove_file(&shard).unwrap();
    let e = GradientStore::open(&store, &key).err().unwrap().to_string();
    assert!(e.contains("incomplete") && e.contains("shard-00002.grad"), "{e}");
    ok(&base);
    assert_eq!(std::fs::read(&shard).unwrap(), original);

    // Stale: another projection or seed.
    let e = GradientStore::open(&store, &store_key(&run, ProjectionSpec::parse("jl:8").unwrap(), 0).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("stale") && e.contains("projection") && !e.contains("model"), "{e}");
    let e = err(&["cache", "--run", s(&run_dir), "--store", s(&store), "--project", "jl:8"]);
    assert!(e.contains("stale") && e.contains("projection"), "{e}");

    // Stale: a retrained model (other weights).
    let other = train(dir.path(), "other", "logreg", "210");
    let e = err(&["cache", "--run", s(&other), "--store", s(&store), "--rows-per-shard", "50", "--project", "none"]);
    assert!(e.contains("stale") && e.contains("model") && e.contains("data set"), "{e}");

    // Stale: same weights, another data manifest.
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for f in ["config.json", "weights.bin", "train.log"] {
        std::fs::copy(run_dir.join(f), copy.join(f)).unwrap();
    }
    let manifest =
        std::fs::read_to_string(run_dir.join("manifest.json")).unwrap().replace("\"skip\": 0", "\"skip\": 1");
    std::fs::write(copy.join("manifest.json"), manifest).unwrap();
    let e = GradientStore::open(&store, &store_key(&Run::open(&copy).unwrap(), ProjectionSpec::None, 0).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("data set") && !e.contains("model"), "{e}");
    // Nothing was overwritten by the refused runs.
    assert!(GradientStore::open(&store, &key).is_ok());
}

#[test]
fn shards_split_across_machines_make_one_store() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = train(dir.path(), "run", "cnn", "120");
    let whole = dir.path().join("whole");
    let split = dir.path().join("split");
    ok(&["cache", "--run", s(&run_dir), "--store", s(&whole), "--rows-per-shard", "25", "--project", "kron:6x6"]);
    for part in ["0/3", "1/3", "2/3"] {
        let o = culprit(&[
            "cache",
            "--run",
            s(&run_dir),
            "--store",
            s(&split),
            "--rows-per-shard",
            "25",
            "--project",
            "kron:6x6",
            "--shard",
            part,
        ]);
        assert!(o.status.success());
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(out.contains("is complete"), part == "2/3", "{part}: {out}");
    }
    assert_eq!(shard_bytes(&whole), shard_bytes(&split));
}

/// A cache never deletes or overwrites a file it did not create: a folder of someone else's files
/// is refused untouched, and in a real store only a killed culprit's own leftovers are removed.
#[test]
fn a_cache_never_touches_files_it_did_not_create() {
    let dir = tempfile::tempdir().unwrap();
    let run = train(dir.path(), "run", "logreg", "200");
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    let files = [("notes.tmp-1", "mine"), ("shard-00000.grad", "not a shard"), ("data.tmp-x.csv", "1,2")];
    for (name, text) in files {
        std::fs::write(theirs.join(name), text).unwrap();
    }
    let e = err(&["cache", "--run", s(&run), "--store", s(&theirs), "--rows-per-shard", "50", "--project", "none"]);
    assert!(e.contains("theirs") && e.contains("no gradient store"), "{e}");
    for (name, text) in files {
        assert_eq!(std::fs::read_to_string(theirs.join(name)).unwrap(), text, "{name} was touched");
    }
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), files.len());

    let store = dir.path().join("store");
    let args = ["cache", "--run", s(&run), "--store", s(&store), "--rows-per-shard", "50", "--project", "none"];
    ok(&args);
    let shard = store.join("shard-00001.grad");
    let original = std::fs::read(&shard).unwrap();
    std::fs::remove_file(&shard).unwrap();
    // A user's file that looks like a temporary, and what a killed culprit leaves for shard 1.
    std::fs::write(store.join("my.tmp-1"), "keep").unwrap();
    std::fs::write(store.join(".shard-00001.grad.tmp-4242-0badf00d"), "half a shard").unwrap();
    std::fs::write(store.join(".shard-00003.grad.tmp-4242-0badf00d"), "another shard's").unwrap();
    ok(&args);
    assert_eq!(std::fs::read(&shard).unwrap(), original);
    assert_eq!(std::fs::read_to_string(store.join("my.tmp-1")).unwrap(), "keep");
    assert!(!store.join(".shard-00001.grad.tmp-4242-0badf00d").exists(), "the leftover of shard 1 is removed");
    assert!(store.join(".shard-00003.grad.tmp-4242-0badf00d").exists(), "only the shard being written is cleaned");
}

/// Shard jobs on one shared store, started at the same moment, all succeed and build the same
/// store as one job (20 rounds); a writer that finds a shard locked fails at once naming the
/// holder.
#[test]
fn shard_jobs_on_one_shared_store_succeed_together() {
    let dir = tempfile::tempdir().unwrap();
    let run = train(dir.path(), "run", "logreg", "200");
    let base = |store: &Path| {
        ["cache", "--run", s(&run), "--store", s(store), "--rows-per-shard", "10", "--project", "none"]
            .map(str::to_string)
            .to_vec()
    };
    let reference = dir.path().join("reference");
    ok(&base(&reference).iter().map(String::as_str).collect::<Vec<_>>());
    for round in 0..20 {
        let store = dir.path().join(format!("shared-{round}"));
        let jobs: Vec<_> = ["0/2", "1/2"]
            .iter()
            .map(|part| {
                Command::new(env!("CARGO_BIN_EXE_culprit"))
                    .args(base(&store))
                    .args(["--shard", part, "--quiet"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for job in jobs {
            let o = job.wait_with_output().unwrap();
            assert!(o.status.success(), "round {round}: {}", String::from_utf8_lossy(&o.stderr));
        }
        assert_eq!(shard_bytes(&store), shard_bytes(&reference), "round {round}");
    }
    // A shard being written elsewhere: a second writer fails at once and names the holder.
    let busy = dir.path().join("busy");
    ok(&base(&busy).iter().map(String::as_str).collect::<Vec<_>>());
    std::fs::remove_file(busy.join("shard-00004.grad")).unwrap();
    let held = culprit::io::lock::Lock::acquire(&busy.join("shard-00004.grad"), "a test's shard").unwrap();
    let e = err(&base(&busy).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("shard-00004.grad") && e.contains(&format!("process {}", std::process::id())), "{e}");
    drop(held);
    ok(&base(&busy).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(shard_bytes(&busy), shard_bytes(&reference));
}

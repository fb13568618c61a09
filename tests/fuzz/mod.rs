//! Mutation fuzzing of every parser and file reader: IDX, CSV, JSONL, corpora, gzip, the weights,
//! store-shard and curvature containers, run and store manifests, trace reports and flagged-id
//! lists, poisoned-set manifests, tokenizer.json and safetensors / Hugging Face folders.
//!
//! Each target starts from valid files written by culprit itself and parses many mutations of
//! them (bit flips, interesting bytes, deletions, insertions, duplicated ranges, truncations,
//! splices, random bytes; 1–4 per case, ChaCha8 from a fixed seed, so a failure reproduces). The
//! property: a clear error or a correct parse, never a panic, and no single allocation over
//! [`MAX_ALLOCATION`] bytes (watched by the test binary's allocator, see `tests/tests.rs`).
//!
//! Cases per target: `CULPRIT_FUZZ_CASES` (default 300, the CI bound). Longer runs, e.g.
//! `TMPDIR=/dev/shm CULPRIT_FUZZ_CASES=1000000 cargo test --release --test tests fuzz -- --test-threads 3`
//! (10⁶ per target, 19 targets: 1013 s on 2 cores, no panic, no oversized allocation), are
//! reported in the hardening issue's closing notes (3000 per target found two bugs that 300 had
//! not: a store manifest disagreeing with its shards, a trace report with missing lists). Each
//! target prints its count of mutations and how many of them parsed. The seed files are kept
//! small (the curvature containers come from a 4-3-3 MLP), so that mutations land in headers and
//! layouts rather than in a checksummed payload.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::digits_csv;

/// The largest single allocation a parser may make on hostile input.
pub const MAX_ALLOCATION: usize = 1 << 30;

fn cases() -> usize {
    std::env::var("CULPRIT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

/// One random mutation of `seed` (and sometimes a splice with `other`).
fn mutate(rng: &mut ChaCha8Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    const INTERESTING: &[u8] = b"\x00\xff\x7f\x80\n\r,\"{}[]:-.0123456789eE \t\\";
    let mut out = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = out.len();
        let at = if len == 0 { 0 } else { rng.random_range(0..len) };
        match rng.random_range(0..9) {
            0 if len > 0 => out[at] ^= 1 << rng.random_range(0..8),
            1 if len > 0 => out[at] = INTERESTING[rng.random_range(0..INTERESTING.len())],
            2 if len > 0 => {
                let end = (at + rng.random_range(1..64)).min(len);
                out.drain(at..end);
            }
            3 => {
                let n = rng.random_range(1..32);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let end = (at + rng.random_range(1..256)).min(len);
                let copy = out[at..end].to_vec();
                let to = rng.random_range(0..=len);
                out.splice(to..to, copy);
            }
            5 => out.truncate(at),
            6 if !other.is_empty() => {
                let from = rng.random_range(0..other.len());
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            7 if len >= 8 => {
                // A little-endian length or count field set to something huge.
                let v: u64 = [u64::MAX, u32::MAX as u64, 1 << 40, 0][rng.random_range(0..4)];
                let at = at.min(len - 8);
                out[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                if rng.random_range(0..20) == 0 {
                    out = (0..rng.random_range(0..512)).map(|_| rng.random()).collect();
                }
            }
        }
    }
    out
}

/// Runs `parse` on `cases()` mutations of `file`'s original bytes (written back to `file` each
/// time); panics (with the case) on a parser panic or an oversized allocation. Returns the
/// number of inputs parsed without error, to show the mutations are not all trivially refused.
fn fuzz(name: &str, file: &Path, parse: &dyn Fn() -> bool) -> usize {
    let original = std::fs::read(file).unwrap();
    assert!(parse(), "{name}: the unmutated file must parse");
    let mut rng = ChaCha8Rng::seed_from_u64(name.bytes().map(u64::from).sum());
    let mut accepted = 0;
    let started = std::time::Instant::now();
    for case in 0..cases() {
        let bytes = mutate(&mut rng, &original, &original);
        std::fs::write(file, &bytes).unwrap();
        crate::reset_largest_allocation(true);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(parse));
        let largest = crate::reset_largest_allocation(false);
        match outcome {
            Ok(ok) => accepted += usize::from(ok),
            Err(_) => {
                let keep = std::env::temp_dir().join(format!("culprit-fuzz-{name}-{case}"));
                std::fs::write(&keep, &bytes).unwrap();
                panic!("{name}: case {case} panicked; input kept in {}", keep.display());
            }
        }
        assert!(largest <= MAX_ALLOCATION, "{name}: case {case} allocated {largest} bytes at once");
    }
    std::fs::write(file, &original).unwrap();
    println!("{name}: {} mutations, {accepted} parsed, {:.1} s", cases(), started.elapsed().as_secs_f64());
    accepted
}

fn culprit(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_culprit")).args(args).arg("--quiet").output().unwrap();
    assert!(o.status.success(), "culprit {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn data_parsers_give_an_error_or_a_parse_never_a_panic() {
    use culprit::data::{DataSpec, Dataset, SourceKind, Split, load_raw};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // CSV (and gzip of it), from the shipped digits.
    let text = std::fs::read_to_string(digits_csv()).unwrap();
    let csv: String = text.lines().take(40).map(|l| l.to_string() + "\n").collect();
    let csv_path = crate::common::write(d, "t.csv", csv.as_bytes());
    fuzz("csv", &csv_path, &|| load_raw(SourceKind::Csv, &csv_path, Split::Train, 64).is_ok());
    let gz_path = crate::common::write(d, "t.csv.gz", &crate::common::gzip(csv.as_bytes()));
    fuzz("gzip", &gz_path, &|| load_raw(SourceKind::Csv, &gz_path, Split::Train, 64).is_ok());
    // IDX: a poisoned copy of 40 digits is written as CSV, so build a tiny IDX pair by hand.
    let idx = d.join("idx");
    std::fs::create_dir(&idx).unwrap();
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 4, 0, 0, 0, 4];
    images.extend((0..80).map(|i| (i * 3) as u8));
    let mut labels = vec![0, 0, 8, 1, 0, 0, 0, 5];
    labels.extend([0, 1, 2, 3, 4]);
    std::fs::write(idx.join("train-images-idx3-ubyte"), &images).unwrap();
    std::fs::write(idx.join("train-labels-idx1-ubyte"), &labels).unwrap();
    for file in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
        let path = idx.join(file);
        fuzz(file, &path, &|| load_raw(SourceKind::Idx, &idx, Split::Train, 64).is_ok());
    }
    // JSONL text and a language-model corpus with queries.
    let jsonl = crate::common::write(
        d,
        "t.jsonl",
        b"{\"text\": \"cheap pills now\", \"label\": 1}\n{\"text\": \"see you at noon\", \"label\": 0}\n{\"text\": \"\\u00e9t\\u00e9 \\\"quoted\\\"\", \"label\": 0}\n",
    );
    fuzz("jsonl", &jsonl, &|| load_raw(SourceKind::Jsonl, &jsonl, Split::Train, 64).is_ok());
    let corpus = crate::common::write(
        d,
        "c.jsonl",
        b"{\"text\": \"def f(x):\\n    return x\", \"source\": \"a.py:1\"}\n{\"prompt\": \"def g(\", \"completion\": \"y):\"}\n",
    );
    let spec = DataSpec { path: corpus.clone(), split: Split::Train, skip: 0, limit: None };
    let bytes = culprit::data::tokenizer::Tokenizer::Bytes;
    let kind = culprit::data::tokenizer::TokenizerSpec::Bytes;
    fuzz("corpus", &corpus, &|| Dataset::load_corpus(&spec, &bytes, &kind, 32).is_ok());
}

/// A trained run with a store, an exact curvature and a trace report, for the file fuzzers.
fn workspace(d: &Path) -> (PathBuf, PathBuf) {
    let run = d.join("run");
    culprit(&["train", "--data", s(&digits_csv()), "--limit", "120", "--model", "logreg", "--out", s(&run)]);
    culprit(&["cache", "--run", s(&run), "--project", "none"]);
    culprit(&["fit", "--run", s(&run), "--curvature", "exact"]);
    let report = d.join("trace.json");
    culprit(&[
        "trace",
        "--run",
        s(&run),
        "--data",
        s(&digits_csv()),
        "--skip",
        "1700",
        "--index",
        "1700,1701",
        "--curvature",
        "exact",
        "--top",
        "3",
        "--format",
        "json",
        "--out",
        s(&report),
    ]);
    (run, report)
}

/// A 4-3-3 MLP trained on 40 generated rows, with its Gauss–Newton, K-FAC and EK-FAC fitted.
fn small_mlp_run(d: &Path) -> PathBuf {
    let mut csv = String::from("a,b,c,d,label\n");
    for i in 0..40 {
        let features: Vec<String> = (0..4).map(|j| format!("{:.3}", ((i * 7 + j * 5) % 11) as f64 / 5.0)).collect();
        csv += &format!("{},{}\n", features.join(","), i % 3);
    }
    let data = crate::common::write(d, "small.csv", csv.as_bytes());
    let run = d.join("small");
    culprit(&["train", "--data", s(&data), "--model", "mlp", "--hidden", "3", "--epochs", "5", "--out", s(&run)]);
    culprit(&["cache", "--run", s(&run), "--project", "none"]);
    culprit(&["fit", "--run", s(&run), "--curvature", "ggn"]);
    culprit(&["fit", "--run", s(&run), "--curvature", "kfac"]);
    culprit(&["fit", "--run", s(&run), "--curvature", "ekfac"]);
    run
}

#[test]
fn run_files_give_an_error_or_a_parse_never_a_panic() {
    use culprit::curvature::Method;
    use culprit::workspace::Run;
    use culprit::workspace::artifacts::{load_curvature, objective, open_store};
    use culprit::workspace::kind::Classifier;
    use culprit_models::Backend;
    let dir = tempfile::tempdir().unwrap();
    let (run, report) = workspace(dir.path());
    for file in ["weights.bin", "config.json", "manifest.json"] {
        fuzz(file, &run.join(file), &|| Run::open(&run).is_ok());
    }
    // Curvature containers of a small MLP (a few hundred bytes each, so that most mutations hit
    // the header and the factor layout rather than the payload's checksum).
    let small = small_mlp_run(dir.path());
    let small_run = Run::open(&small).unwrap();
    let (obj, _) = objective::<Classifier>(&small_run, Backend::default()).unwrap();
    for method in [Method::Ggn, Method::Kfac, Method::Ekfac] {
        let file = small.join(format!("curvature/{}.bin", method.name()));
        fuzz(&format!("curvature-{}", method.name()), &file, &|| load_curvature(&small_run, &obj, method).is_ok());
    }
    let opened = Run::open(&run).unwrap();
    let store = run.join("gradients");
    let shard = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "grad"))
        .unwrap();
    let read_store = || match open_store(&opened, None) {
        Ok((store, _)) => (0..store.rows()).all(|r| store.row(r).iter().all(|v| v.is_finite())),
        Err(_) => false,
    };
    fuzz("shard", &shard, &read_store);
    fuzz("store-manifest", &store.join("manifest.json"), &read_store);
    fuzz("trace-report", &report, &|| {
        let text = std::fs::read_to_string(&report).unwrap_or_default();
        let parsed: Result<culprit::report::trace::TraceReport, _> = serde_json::from_str(&text);
        let merged = parsed.map(|r| culprit::report::trace::merge(vec![r], 3).is_ok()).unwrap_or(false);
        let ids = culprit::commands::purge::read_ids(&report, Some(4)).is_ok();
        merged || ids
    });
}

#[test]
fn model_and_poison_files_give_an_error_or_a_parse_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A poisoned set's manifest.
    let poisoned = d.join("bd");
    culprit(&[
        "poison",
        "--data",
        s(&digits_csv()),
        "--limit",
        "60",
        "--test-data",
        s(&digits_csv()),
        "--test-skip",
        "1700",
        "--out",
        s(&poisoned),
        "--trigger",
        "patch:0,0,2",
        "--target",
        "1",
        "--rate",
        "0.1",
    ]);
    fuzz("poison.json", &poisoned.join("poison.json"), &|| {
        culprit::data::poisoned::PoisonManifest::read(&poisoned).is_ok()
    });
    // A Hugging Face folder (config.json, model.safetensors) and a tokenizer.json.
    let hf = d.join("hf");
    std::fs::create_dir(&hf).unwrap();
    let config =
        culprit_models::GptConfig { vocab: 256, context: 8, width: 8, layers: 1, heads: 2, inner: 32, epsilon: 1e-5 };
    let theta: Vec<f64> = (0..config.num_params()).map(|i| (i % 7) as f64 * 0.01).collect();
    std::fs::write(hf.join("config.json"), culprit_models::hf::gpt_config_json(&config)).unwrap();
    std::fs::write(hf.join("model.safetensors"), culprit_models::hf::gpt_safetensors(&config, &theta)).unwrap();
    for file in ["config.json", "model.safetensors"] {
        fuzz(file, &hf.join(file), &|| culprit_models::hf::import_gpt(&hf).is_ok());
    }
    let vocab: serde_json::Map<String, serde_json::Value> = (0..256u32)
        .map(|b| (gpt2_byte_char(b).to_string(), b.into()))
        .chain([("ab".to_string(), 256.into())])
        .collect();
    let merges = ["a b"];
    let tokenizer = crate::common::write(
        d,
        "tokenizer.json",
        serde_json::json!({ "model": { "type": "BPE", "vocab": vocab, "merges": merges } }).to_string().as_bytes(),
    );
    fuzz("tokenizer.json", &tokenizer, &|| match culprit::data::tokenizer::Bpe::load(&tokenizer) {
        Ok(bpe) => {
            let t = culprit::data::tokenizer::Tokenizer::Bpe(Box::new(bpe));
            let ids = t.encode("a tab, ab\u{e9}\n");
            t.decode(&ids) == "a tab, ab\u{e9}\n" || !ids.is_empty()
        }
        Err(_) => false,
    });
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`).
fn gpt2_byte_char(b: u32) -> char {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    if printable(b) {
        return char::from_u32(b).unwrap();
    }
    let offset = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + offset).unwrap()
}

#[test]
fn the_allocation_watch_sees_a_large_allocation_on_its_thread_only() {
    crate::reset_largest_allocation(true);
    let big = vec![1u8; 8 << 20];
    let seen = crate::reset_largest_allocation(false);
    assert!(seen >= 8 << 20, "saw {seen}");
    drop(big);
    let unwatched = vec![1u8; 8 << 20];
    assert_eq!(crate::reset_largest_allocation(false), 0, "nothing is recorded while not watching");
    drop(unwatched);
}

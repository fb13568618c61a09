//! Language-model runs in and out of Hugging Face folders, and bad input: each mistake gets one
//! error line that names the file and the problem (a folder that is not GPT-2, a missing tensor,
//! a wrong shape, a tokenizer larger than the embedding, a query without a prompt or completion,
//! a prompt longer than the context). Needs no shared data.

use std::path::Path;
use std::process::Command;

use super::pipeline::{corpus, culprit};

/// Runs culprit expecting failure; returns its standard error.
pub(super) fn culprit_fails(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_culprit")).args(args).arg("--quiet").output().unwrap();
    assert!(!o.status.success(), "culprit {args:?} should fail");
    assert_eq!(o.status.code(), Some(2), "usage and data errors exit 2");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "one error line: {err}");
    err
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config[key] = value;
    std::fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn hugging_face_round_trip_and_bad_folders_and_queries_get_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let corpus = corpus(dir);
    let run = dir.join("run");
    culprit(&[
        "train",
        "--model",
        "gpt",
        "--data",
        &s(&corpus),
        "--context",
        "40",
        "--layers",
        "1",
        "--heads",
        "2",
        "--width",
        "16",
        "--epochs",
        "1",
        "--batch",
        "8",
        "--seed",
        "1",
        "--out",
        &s(&run),
    ]);
    // Out to a Hugging Face folder and back: the same log-probabilities.
    let hf = dir.join("hf");
    culprit(&["export", "--run", &s(&run), "--hf", &s(&hf)]);
    let imported = dir.join("imported");
    culprit(&["import", "--hf", &s(&hf), "--data", &s(&corpus), "--out", &s(&imported)]);
    let scores = |run: &Path| -> Vec<f64> {
        culprit(&["predict", "--run", &s(run), "--data", &s(&corpus)])
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
            .collect()
    };
    let (before, after) = (scores(&run), scores(&imported));
    assert_eq!(before.len(), 30);
    for (b, a) in before.iter().zip(&after) {
        assert!((b - a).abs() <= 1e-5 * b.abs().max(1.0), "log-probability {b} before export, {a} after import");
    }

    let import = |folder: &Path, out: &str| {
        culprit_fails(&["import", "--hf", &s(folder), "--data", &s(&corpus), "--out", &s(&dir.join(out))])
    };
    let bad = dir.join("llama");
    copy_folder(&hf, &bad);
    edit_config(&bad, "model_type", "llama".into());
    let e = import(&bad, "r1");
    assert!(e.contains("config.json") && e.contains("model_type is `llama`"), "{e}");

    let bad = dir.join("long");
    copy_folder(&hf, &bad);
    edit_config(&bad, "n_positions", 64.into());
    let e = import(&bad, "r2");
    assert!(e.contains("model.safetensors") && e.contains("transformer.wpe.weight") && e.contains("[64, 16]"), "{e}");

    let bad = dir.join("missing");
    copy_folder(&hf, &bad);
    let weights = bad.join("model.safetensors");
    let tensors = culprit_models::hf::read_safetensors(&weights).unwrap();
    let kept: Vec<(String, Vec<usize>, Vec<f64>)> = tensors
        .into_iter()
        .filter(|(name, _)| name != "transformer.h.0.mlp.c_fc.weight")
        .map(|(name, (shape, values))| (name, shape, values))
        .collect();
    let borrowed: Vec<(String, Vec<usize>, &[f64])> =
        kept.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice())).collect();
    std::fs::write(&weights, culprit_models::hf::encode_safetensors(&borrowed)).unwrap();
    let e = import(&bad, "r3");
    assert!(e.contains("tensor `transformer.h.0.mlp.c_fc.weight` is missing"), "{e}");

    let bad = dir.join("tokenizer");
    copy_folder(&hf, &bad);
    // A byte-level BPE vocabulary (GPT-2's bytes_to_unicode for the 256 bytes) of 300 tokens.
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    let mut vocab: serde_json::Map<String, serde_json::Value> = (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            (char::from_u32(c).unwrap().to_string(), b.into())
        })
        .collect();
    vocab.extend((256..300).map(|i| (format!("t{i}"), i.into())));
    std::fs::write(
        bad.join("tokenizer.json"),
        serde_json::json!({ "model": { "type": "BPE", "vocab": vocab, "merges": [] } }).to_string(),
    )
    .unwrap();
    let e = import(&bad, "r4");
    assert!(e.contains("tokenizer.json has 300 tokens but the model's embedding has 256"), "{e}");

    let e = culprit_fails(&["import", "--hf", &s(&corpus), "--data", &s(&corpus), "--out", &s(&dir.join("r5"))]);
    assert!(e.contains("config.json"), "{e}");

    // Queries.
    let queries = dir.join("queries.jsonl");
    std::fs::write(&queries, "{\"prompt\": \"def f(\", \"completion\": \"x):\"}\n{\"prompt\": \"def g(\"}\n").unwrap();
    let e = culprit_fails(&["predict", "--run", &s(&run), "--data", &s(&queries)]);
    assert!(e.contains("queries.jsonl") && e.contains("row 2") && e.contains("both `prompt` and `completion`"), "{e}");
    std::fs::write(&queries, format!("{{\"prompt\": \"{}\", \"completion\": \"x\"}}\n", "a".repeat(40))).unwrap();
    let e = culprit_fails(&["predict", "--run", &s(&run), "--data", &s(&queries)]);
    assert!(e.contains("41 tokens, longer than the model's context of 40"), "{e}");
}

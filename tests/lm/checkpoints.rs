//! `train --checkpoints` and `trace --checkpoints` (TracIn-CP over the checkpoints of one run),
//! against references computed here: the checkpoints do not change the final model (bit for bit
//! the weights of a run trained without them), and the ensemble's score of every document is
//! Σ_c w_c s_c(i)/σ_c from brute-force scores of each checkpoint ((1/n) ∇m(query)ᵀ∇ℓ(document) by
//! autodiff, exact gradients, identity curvature), w_c the cosine learning rate at the
//! checkpoint's epoch normalised to sum 1, σ_c the scores' root mean square.

use std::path::Path;

use super::errors::culprit_fails;
use super::pipeline::{brute_force, corpus, culprit};

fn train(corpus: &Path, out: &Path, extra: &[&str]) {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut args: Vec<String> = ["train", "--model", "gpt", "--data", &s(corpus), "--context", "48", "--layers", "1"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let rest = ["--heads", "2", "--width", "16", "--epochs", "4", "--batch", "8", "--lr", "3e-3", "--seed", "5"];
    args.extend(rest.iter().map(|a| a.to_string()));
    args.extend(["--out".to_string(), s(out)]);
    args.extend(extra.iter().map(|a| a.to_string()));
    culprit(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Every score of a `--scores-out` CSV by training index (one query).
fn scores(path: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut rows: Vec<(usize, f64)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    rows.into_iter().map(|r| r.1).collect()
}

#[test]
fn a_trace_over_checkpoints_is_the_learning_rate_weighted_sum_of_each_checkpoints_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let corpus = corpus(dir);
    let (run, plain) = (dir.join("run"), dir.join("plain"));
    train(&corpus, &run, &["--checkpoints", "2"]);
    train(&corpus, &plain, &[]);
    // Epochs round(i·4/3): 1 and 3.
    let epochs = [1usize, 3];
    for e in epochs {
        assert!(run.join(format!("checkpoints/epoch-{e}/weights.bin")).is_file(), "checkpoint of epoch {e}");
    }
    assert_eq!(
        std::fs::read(run.join("weights.bin")).unwrap(),
        std::fs::read(plain.join("weights.bin")).unwrap(),
        "keeping checkpoints leaves the final model as it was"
    );
    let first = run.join("checkpoints/epoch-1");
    assert_ne!(std::fs::read(first.join("weights.bin")).unwrap(), std::fs::read(run.join("weights.bin")).unwrap());

    culprit(&["cache", "--run", &s(&run), "--checkpoints", "--project", "none"]);
    culprit(&["fit", "--run", &s(&run), "--checkpoints", "--curvature", "identity"]);
    let queries = dir.join("queries.jsonl");
    std::fs::write(&queries, "{\"prompt\": \"def check_5(x):\\n    if x > \", \"completion\": \"5:\"}\n").unwrap();
    let (out, csv) = (dir.join("trace.json"), dir.join("scores.csv"));
    let (run_arg, queries_arg, out_arg, csv_arg) = (s(&run), s(&queries), s(&out), s(&csv));
    let trace = |extra: &[&str]| {
        let mut args = vec!["trace", "--run", &run_arg, "--data", &queries_arg, "--index", "0"];
        args.extend(["--measure", "completion", "--curvature", "identity", "--top", "5", "--per-token"]);
        args.extend(["--format", "json", "--out", &out_arg, "--scores-out", &csv_arg]);
        let owned: Vec<String> = args.iter().chain(extra).map(|a| a.to_string()).collect();
        culprit(&owned.iter().map(String::as_str).collect::<Vec<_>>());
    };
    trace(&["--checkpoints"]);
    let got = scores(&csv);

    // The reference: brute-force scores of each checkpoint, at unit spread, weighted by η_c.
    let eta = |e: usize| 3e-3 * 0.5 * (1.0 + (std::f64::consts::PI * e as f64 / 4.0).cos());
    let total: f64 = epochs.iter().map(|&e| eta(e)).sum();
    let mut want = vec![0.0; got.len()];
    for e in epochs {
        let s = brute_force(&run.join(format!("checkpoints/epoch-{e}")), &corpus, &queries);
        let rms = (s.iter().map(|v| v * v).sum::<f64>() / s.len() as f64).sqrt();
        want.iter_mut().zip(&s).for_each(|(w, v)| *w += eta(e) / total * v / rms);
    }
    let largest = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(largest > 0.1, "unit-spread scores: {largest}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        // f32 stores against the f64 reference.
        assert!((g - w).abs() <= 2e-3 * largest, "document {i}: culprit {g}, reference {w}");
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let listed = report["checkpoints"].as_array().unwrap();
    assert_eq!(listed.iter().map(|c| c["epoch"].as_u64().unwrap() as usize).collect::<Vec<_>>(), epochs);
    let weight = listed[0]["weight"].as_f64().unwrap();
    assert!((weight - eta(1) / total).abs() < 1e-12, "weight {weight}");
    for influence in
        report["proponents"][0].as_array().unwrap().iter().chain(report["opponents"][0].as_array().unwrap())
    {
        let score = influence["score"].as_f64().unwrap();
        let parts: f64 = influence["per_token"].as_array().unwrap().iter().map(|t| t["score"].as_f64().unwrap()).sum();
        assert!((parts - score).abs() <= 1e-3 * largest, "parts {parts}, score {score}");
    }

    // What it refuses, in one line each.
    let store = run.join("gradients");
    let error = |args: &[&str]| {
        let mut all = vec!["trace", "--run", &run_arg, "--data", &queries_arg, "--index", "0", "--checkpoints"];
        all.extend(args);
        culprit_fails(&all)
    };
    assert!(error(&["--store", &s(&store)]).contains("--store"));
    assert!(error(&["--per-layer"]).contains("--per-layer"));
    let none = culprit_fails(&["trace", "--run", &s(&first), "--data", &s(&queries), "--index", "0", "--checkpoints"]);
    assert!(none.contains("has no checkpoints") && none.contains("epoch-1"), "{none}");
    let too_many = dir.join("too-many");
    let err = culprit_fails(&[
        "train",
        "--model",
        "gpt",
        "--data",
        &s(&corpus),
        "--epochs",
        "2",
        "--checkpoints",
        "2",
        "--out",
        &s(&too_many),
    ]);
    assert!(err.contains("--checkpoints 2 needs more than 2 epochs"), "{err}");
    assert!(!too_many.exists(), "nothing written");
}

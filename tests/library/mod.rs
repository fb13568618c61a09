//! The library as a Rust user meets it: a model defined outside the crate (the program in
//! `examples/custom_model.rs`, compiled into this test) ranks the training examples behind one of
//! its predictions exactly as the command line does for culprit's own model of the same function.

use std::path::Path;
use std::process::Command;

#[allow(dead_code)]
#[path = "../../examples/custom_model.rs"]
mod custom_model;

fn culprit(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_culprit")).args(args).arg("--quiet").output().unwrap();
    assert!(o.status.success(), "culprit {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_model_defined_outside_the_crate_ranks_as_the_cli_does() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let ranking = custom_model::rank(root, &dir.path().join("store"), 1300, 10);
    // The CLI, with culprit's own logistic regression (weight [features, classes]) on the same rows.
    let run = dir.path().join("run");
    let (run_s, digits) = (run.to_str().unwrap(), root.join("data/digits.csv"));
    let digits = digits.to_str().unwrap();
    culprit(&["train", "--data", digits, "--limit", "1297", "--model", "logreg", "--out", run_s]);
    culprit(&["cache", "--run", run_s]);
    culprit(&["fit", "--run", run_s, "--curvature", "ggn"]);
    let report = dir.path().join("trace.json");
    let args = ["--data", digits, "--skip", "1297", "--index", "1300", "--curvature", "ggn", "--format", "json"];
    culprit(&[&["trace", "--run", run_s], &args[..], &["--out", report.to_str().unwrap()]].concat());
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let cli: Vec<(usize, f64)> = json["proponents"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["train_index"].as_u64().unwrap() as usize, p["score"].as_f64().unwrap()))
        .collect();
    assert_eq!(ranking.len(), 10);
    let ids = |r: &[(usize, f64)]| r.iter().map(|p| p.0).collect::<Vec<_>>();
    assert_eq!(ids(&ranking), ids(&cli), "the example's ranking against the CLI's");
    // Both optimise to ‖∇L‖ < 1e-6 from θ = 0 in their own layouts, so the scores agree to the
    // optimisation tolerance, not bit for bit (measured: 1.3e-16 relative).
    let worst = ranking.iter().zip(&cli).map(|((_, a), (_, b))| ((a - b) / b).abs()).fold(0.0, f64::max);
    eprintln!("largest relative difference of the example's scores from the CLI's: {worst:.2e}");
    for ((id, a), (_, b)) in ranking.iter().zip(&cli) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "training row {id}: example {a:e}, CLI {b:e}");
    }
}

//! The command line as a user meets it: exit codes, one-line errors naming the file, no partial
//! run directories, and the predict CSV.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{digits_csv, write};

fn culprit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_culprit")).args(args).arg("--quiet").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_then_predict_writes_a_run_and_a_prediction_csv() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = culprit(&["train", "--data", s(&digits_csv()), "--limit", "300", "--model", "logreg", "--out", s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["config.json", "manifest.json", "weights.bin", "train.log"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let preds = dir.path().join("p.csv");
    let o = culprit(&["predict", "--run", s(&run), "--data", s(&digits_csv()), "--skip", "1700", "--out", s(&preds)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&preds).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "index,label,predicted,loss,p0,p1,p2,p3,p4,p5,p6,p7,p8,p9");
    let rows: Vec<Vec<f64>> = lines.map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect();
    assert_eq!(rows.len(), 97);
    assert_eq!(rows[0][0], 1700.0);
    for r in &rows {
        let p = &r[4..];
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        // loss = −log p_label
        assert!((r[3] + p[r[1] as usize].ln()).abs() < 1e-6 * r[3].max(1.0));
    }
}

#[test]
fn bad_data_fails_with_one_line_naming_file_and_row_and_leaves_no_run() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "ragged.csv", b"a,b,label\n1,2,0\n1,2\n");
    let run = dir.path().join("run");
    let o = culprit(&["train", "--data", s(&bad), "--model", "logreg", "--out", s(&run)]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.contains("ragged.csv") && e.contains("row 2"), "{e}");
    assert!(!run.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary directory was left behind");
}

#[test]
fn an_existing_run_is_never_overwritten_and_a_corrupt_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let digits = digits_csv();
    let args = ["train", "--data", s(&digits), "--limit", "200", "--model", "logreg", "--out", s(&run)];
    assert!(culprit(&args).status.success());
    let before = std::fs::read(run.join("weights.bin")).unwrap();
    let o = culprit(&args);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already exists"));
    assert_eq!(std::fs::read(run.join("weights.bin")).unwrap(), before);

    let mut corrupt = before.clone();
    corrupt[100] ^= 0x40;
    std::fs::write(run.join("weights.bin"), corrupt).unwrap();
    let o = culprit(&["predict", "--run", s(&run), "--data", s(&digits_csv())]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("weights.bin") && e.contains("checksum mismatch"), "{e}");
}

#[test]
fn data_that_does_not_fit_the_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    assert!(
        culprit(&["train", "--data", s(&digits_csv()), "--limit", "200", "--model", "logreg", "--out", s(&run)])
            .status
            .success()
    );
    let other = write(dir.path(), "other.csv", b"x,y,label\n1,2,0\n");
    let o = culprit(&["predict", "--run", s(&run), "--data", s(&other)]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("other.csv") && e.contains("2 features but the model takes 64"), "{e}");
    let o = culprit(&["train", "--data", s(&other), "--model", "cnn", "--out", s(&dir.path().join("r2"))]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn the_demo_runs_end_to_end_on_the_embedded_data() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = culprit(&["demo", "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for step in ["1. Data", "2. Train", "3. Cache", "4. Fit", "5. Trace", "6. Purge", "7. Audit", "Done in"] {
        assert!(text.contains(step), "the demo did not report `{step}`:\n{text}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.matches("data:image/png;base64,").count() >= 2 * (1 + 8));
    // A second run into the same directory is refused, not overwritten.
    assert_eq!(culprit(&["demo", "--out", s(&out)]).status.code(), Some(2));
}

#[test]
fn traces_split_across_shards_merge_into_the_whole() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let digits = digits_csv();
    assert!(
        culprit(&["train", "--data", s(&digits), "--limit", "300", "--model", "logreg", "--out", s(&run)])
            .status
            .success()
    );
    assert!(culprit(&["cache", "--run", s(&run), "--rows-per-shard", "40"]).status.success());
    assert!(culprit(&["fit", "--run", s(&run), "--curvature", "exact"]).status.success());
    let trace = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "trace",
            "--run",
            s(&run),
            "--data",
            s(&digits),
            "--skip",
            "1297",
            "--index",
            "1301,1444",
            "--curvature",
            "exact",
        ];
        args.extend_from_slice(&["--format", "json", "--top", "6", "--out", s(out)]);
        args.extend_from_slice(extra);
        let o = culprit(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let whole = dir.path().join("whole.json");
    trace(&[], &whole);
    let mut parts = Vec::new();
    for part in ["0/3", "1/3", "2/3"] {
        let p = dir.path().join(format!("part-{}.json", &part[..1]));
        trace(&["--shard", part], &p);
        parts.push(p);
    }
    let merged = dir.path().join("merged.json");
    let mut args = vec!["merge", "--top", "6", "--format", "json", "--out", s(&merged)];
    args.extend(parts.iter().map(|p| s(p)));
    let o = culprit(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |p: &Path| serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(p).unwrap()).unwrap();
    let (w, m) = (read(&whole), read(&merged));
    assert_eq!(w["proponents"], m["proponents"]);
    assert_eq!(w["opponents"], m["opponents"]);
    // A missing part is an error, not a silently partial answer.
    let o = culprit(&["merge", s(&parts[0]), s(&parts[2])]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("part 1/3 is missing"), "{}", stderr(&o));
}

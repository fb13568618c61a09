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
    // A label meant as an id would make a million classes: refused before anything is allocated.
    let ids = write(dir.path(), "ids.csv", b"x,y,label\n1,2,0\n3,4,1000000\n");
    let o = culprit(&["train", "--data", s(&ids), "--model", "logreg", "--out", s(&dir.path().join("r3"))]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("ids.csv") && e.contains("label 1000000 makes 1000001 classes") && e.contains("65536"), "{e}");
    assert!(!dir.path().join("r3").exists());
}

#[test]
fn the_demo_runs_end_to_end_on_the_embedded_data() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = culprit(&["demo", "--out", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for step in
        ["1. Data", "2. Train", "3. Cache", "4. Fit", "5. Trace", "6. Purge", "7. Audit", "8. Before", "Done in"]
    {
        assert!(text.contains(step), "the demo did not report `{step}`:\n{text}");
    }
    // The scan finds the planted 2×2 patch at (6, 6) and every poison among the digits it flags.
    assert!(text.contains("first candidate: patch 2×2 at x=6, y=6"), "{text}");
    assert!(text.contains("39 of the 39 planted"), "{text}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.matches("data:image/png;base64,").count() >= 2 * (1 + 8));
    // The demo knows its ground truth and marks the planted poisons in the report.
    assert!(html.contains("planted poison"), "the report marks the planted poisons");
    // A second run into the same directory is refused, not overwritten.
    assert_eq!(culprit(&["demo", "--out", s(&out)]).status.code(), Some(2));
    // `culprit demo | head -1`: with standard output closed at once the demo still writes every
    // file, and exits 0.
    let closed = dir.path().join("closed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_culprit"))
        .args(["demo", "--quiet", "--out", s(&closed)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    assert!(child.wait().unwrap().success());
    let files = |d: &Path| -> Vec<String> {
        let mut names: Vec<String> = walk(d).iter().map(|p| p.strip_prefix(d).unwrap().display().to_string()).collect();
        names.sort();
        names
    };
    assert_eq!(files(&closed), files(&out));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
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
    assert!(w["combined"]["proponents"].as_array().is_some_and(|a| a.len() == 6));
    assert_eq!(w["combined"], m["combined"]);
    // The strongest-query combination needs every row's score: one part cannot make it.
    let mut args = vec!["trace", "--run", s(&run), "--data", s(&digits), "--skip", "1297", "--index", "1301,1444"];
    args.extend_from_slice(&["--curvature", "exact", "--shard", "0/3", "--combine", "strongest"]);
    let o = culprit(&args);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("use --combine sum with --shard"), "{}", stderr(&o));
    // A missing part is an error, not a silently partial answer.
    let o = culprit(&["merge", s(&parts[0]), s(&parts[2])]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("part 1/3 is missing"), "{}", stderr(&o));
    // A part traced on another run (other weights, same λ and n) is refused.
    let mut other = read(&parts[1]);
    assert!(other["weights_sha256"].is_string());
    other["weights_sha256"] = "0".repeat(64).into();
    let foreign = dir.path().join("foreign.json");
    std::fs::write(&foreign, other.to_string()).unwrap();
    let o = culprit(&["merge", s(&parts[0]), s(&foreign), s(&parts[2])]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("different runs"), "{}", stderr(&o));
}

/// The act loop from the command line: poison, train, cache, fit, trace with RelatIF on the
/// target logit, purge the top of the ranking and retrain, and check against retraining.
#[test]
fn backdoor_poison_trace_purge_and_eval_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name);
    let digits = digits_csv();
    let ok = |args: &[&str]| {
        let o = culprit(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let text = ok(&[
        "poison",
        "--data",
        s(&digits),
        "--limit",
        "1297",
        "--test-data",
        s(&digits),
        "--test-skip",
        "1297",
        "--out",
        s(&d("p")),
        "--trigger",
        "patch:0,0,2",
        "--target",
        "3",
        "--rate",
        "0.03",
        "--seed",
        "4",
    ]);
    assert!(text.contains("backdoored 39 training examples"), "{text}");
    ok(&["train", "--data", s(&d("p/train.csv")), "--model", "logreg", "--out", s(&d("run"))]);
    ok(&["cache", "--run", s(&d("run"))]);
    ok(&["fit", "--run", s(&d("run")), "--curvature", "ekfac"]);
    // Ten triggered test rows whose label is not the target.
    let labels: Vec<String> = std::fs::read_to_string(d("p/test-triggered.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().to_string())
        .collect();
    let queries: Vec<String> =
        (0..labels.len()).filter(|&i| labels[i] != "3").take(10).map(|i| i.to_string()).collect();
    let trace = d("trace.json");
    ok(&[
        "trace",
        "--run",
        s(&d("run")),
        "--data",
        s(&d("p/test-triggered.csv")),
        "--index",
        &queries.join(","),
        "--measure",
        "logit:3",
        "--score",
        "relatif",
        "--curvature",
        "ekfac",
        "--top",
        "60",
        "--format",
        "json",
        "--out",
        s(&trace),
    ]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert_eq!(report["score_mode"], "relatif");
    assert_eq!(report["proponent_sign"], -1, "removing a proponent lowers a logit");
    let json = ok(&[
        "purge",
        "--run",
        s(&d("run")),
        "--ids",
        s(&trace),
        "--top",
        "39",
        "--out",
        s(&d("purged")),
        "--retrain",
        "--attack",
        s(&d("p")),
        "--format",
        "json",
    ]);
    let purge: serde_json::Value = serde_json::from_str(&json).unwrap();
    let found = purge["poisons_removed"][0].as_u64().unwrap();
    let (before, after) = (
        purge["before"]["attack_success_rate"].as_f64().unwrap(),
        purge["after"]["attack_success_rate"].as_f64().unwrap(),
    );
    eprintln!("CLI backdoor: {found}/39 poisons in the top 39; attack success {before:.3} → {after:.3}");
    // The traced queries are evaluated before and after: fooled before, mostly not after.
    let queries_before = purge["before"]["queries"].as_array().unwrap();
    let queries_after = purge["after"]["queries"].as_array().unwrap();
    assert_eq!(queries_before.len(), 10);
    let fooled_before = queries_before.iter().filter(|q| q["predicted"] == 3).count();
    assert!(fooled_before >= 8, "{fooled_before} of the traced queries read as the target before");
    let fooled_after = queries_after.iter().filter(|q| q["predicted"] == 3).count();
    assert!(fooled_after <= 2, "{fooled_after} of the traced queries still read as the target");
    assert!(found >= 33, "{found} of 39 poisons in the top 39");
    assert!(before > 0.5 && after < 0.1, "attack success rate {before} → {after}");
    // The purged run is a run: it traces, and eval checks it against retraining.
    ok(&["cache", "--run", s(&d("purged"))]);
    ok(&["fit", "--run", s(&d("purged")), "--curvature", "exact"]);
    let table = ok(&[
        "eval",
        "loo",
        "--run",
        s(&d("purged")),
        "--data",
        s(&d("p/test-clean.csv")),
        "--index",
        "0,1",
        "--curvature",
        "exact",
        "--sample",
        "8",
    ]);
    assert!(table.contains("leave-one-out: 8 removals") && table.contains("exact"), "{table}");
    // Bad input: an attack directory the run was not trained on, an unknown experiment, bad ids.
    let purge_with_p2 = || {
        culprit(&[
            "purge",
            "--run",
            s(&d("run")),
            "--ids",
            s(&trace),
            "--top",
            "5",
            "--out",
            s(&d("x")),
            "--attack",
            s(&d("p2")),
        ])
    };
    let o = purge_with_p2();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("poison.json"), "{}", stderr(&o));
    ok(&[
        "poison",
        "--data",
        s(&digits),
        "--limit",
        "300",
        "--test-data",
        s(&digits),
        "--test-skip",
        "1297",
        "--out",
        s(&d("p2")),
        "--trigger",
        "patch:0,0,2",
        "--target",
        "3",
        "--rate",
        "0.03",
    ]);
    let o = purge_with_p2();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("but the run was trained on"), "{}", stderr(&o));
    assert!(!d("x").exists());
    let o = culprit(&["eval", "lso", "--run", s(&d("run")), "--data", s(&digits), "--index", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown experiment `lso`"), "{}", stderr(&o));
    std::fs::write(d("ids.txt"), "5\nx7\n").unwrap();
    let o = culprit(&["purge", "--run", s(&d("run")), "--ids", s(&d("ids.txt")), "--out", s(&d("q"))]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("ids.txt") && stderr(&o).contains("`x7` is not a training index"), "{}", stderr(&o));
}

/// One `fit` per curvature file at a time: the second fails at once naming the first, and the
/// file is untouched. Outputs that would replace an input or a file of the run are refused.
#[test]
fn a_second_fit_fails_naming_the_first_and_outputs_never_replace_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // A copy: the refusals below must be tested on a file the test may lose.
    let digits = dir.path().join("digits.csv");
    std::fs::copy(digits_csv(), &digits).unwrap();
    let o = culprit(&["train", "--data", s(&digits), "--limit", "300", "--model", "logreg", "--out", s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(culprit(&["cache", "--run", s(&run)]).status.success());
    assert!(culprit(&["fit", "--run", s(&run), "--curvature", "exact"]).status.success());
    let fitted = std::fs::read(run.join("curvature/exact.bin")).unwrap();
    let held = culprit::io::lock::Lock::acquire(&run.join("curvature/exact.bin"), "a test's fit").unwrap();
    let o = culprit(&["fit", "--run", s(&run), "--curvature", "exact", "--damping", "0.5"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("exact.bin") && e.contains(&format!("process {}", std::process::id())), "{e}");
    drop(held);
    assert_eq!(std::fs::read(run.join("curvature/exact.bin")).unwrap(), fitted);

    let data = std::fs::read(&digits).unwrap();
    let o = culprit(&["predict", "--run", s(&run), "--data", s(&digits), "--out", s(&digits)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is the input"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&digits).unwrap(), data, "the input is untouched");
    let weights = std::fs::read(run.join("weights.bin")).unwrap();
    let trace = ["trace", "--run", s(&run), "--data", s(&digits), "--skip", "1297", "--index", "1300"];
    let o = culprit(&[&trace[..], &["--curvature", "exact", "--out", s(&run.join("weights.bin"))]].concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("culprit manages"), "{}", stderr(&o));
    assert_eq!(std::fs::read(run.join("weights.bin")).unwrap(), weights, "the run is untouched");
    // Numbers out of range are refused where they are parsed, in either form, with the range.
    for args in [["--damping", "-1"], ["--damping=-1", ""], ["--damping", "inf"], ["--tolerance=-1", ""]] {
        let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        let o = culprit(&[&["fit", "--run", s(&run), "--curvature", "cg"][..], &args[..]].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = stderr(&o);
        assert!(e.contains("must be a finite number") && e.lines().count() == 1, "{args:?}: {e}");
    }
    let o = culprit(&["fit", "--run", s(&run), "--curvature", "arnoldi", "--arnoldi-iterations", "0"]);
    assert!(stderr(&o).contains("≥ 1"), "{}", stderr(&o));
    let o = culprit(&["cache", "--run", s(&run), "--rows-per-shard", "0", "--store", s(&dir.path().join("s"))]);
    assert!(stderr(&o).contains("≥ 1") && !dir.path().join("s").exists(), "{}", stderr(&o));
}

#[test]
fn a_repeated_query_is_refused_and_scores_out_ranks_proponents_first_for_any_measurement() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let digits = digits_csv();
    let o = culprit(&["train", "--data", s(&digits), "--limit", "300", "--model", "logreg", "--out", s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(culprit(&["cache", "--run", s(&run)]).status.success());
    assert!(culprit(&["fit", "--run", s(&run), "--curvature", "exact"]).status.success());
    let trace = |index: &str, measure: &str, json: &Path, csv: &Path| {
        culprit(&[
            "trace",
            "--run",
            s(&run),
            "--data",
            s(&digits),
            "--skip",
            "1700",
            "--index",
            index,
            "--measure",
            measure,
            "--curvature",
            "exact",
            "--top",
            "3",
            "--format",
            "json",
            "--out",
            s(json),
            "--scores-out",
            s(csv),
        ])
    };
    let (json, csv) = (dir.path().join("t.json"), dir.path().join("s.csv"));
    let o = trace("1700,1703,1700", "label", &json, &csv);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("index 1700 is listed twice"), "{}", stderr(&o));
    assert!(!json.exists() && !csv.exists());
    // A loss (proponents positive) and a logit (proponents negative): sorting proponent_score
    // descending gives the report's proponents in order either way.
    for measure in ["label", "logit:label"] {
        let (json, csv) = (dir.path().join(format!("{measure}.json")), dir.path().join(format!("{measure}.csv")));
        let o = trace("1700", measure, &json, &csv);
        assert!(o.status.success(), "{}", stderr(&o));
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let expected: Vec<u64> =
            report["proponents"][0].as_array().unwrap().iter().map(|i| i["train_index"].as_u64().unwrap()).collect();
        let text = std::fs::read_to_string(&csv).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("query_index,train_index,score,proponent_score"));
        let mut rows: Vec<(u64, f64, f64)> = lines
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[1].parse().unwrap(), f[2].parse().unwrap(), f[3].parse().unwrap())
            })
            .collect();
        assert_eq!(rows.len(), 300);
        let sign = report["proponent_sign"].as_f64().unwrap();
        assert!(rows.iter().all(|r| r.2 == r.1 * sign));
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        let first: Vec<u64> = rows.iter().take(expected.len()).map(|r| r.0).collect();
        assert_eq!(first, expected, "{measure}");
    }
}

#[test]
fn csv_columns_are_matched_by_name_and_a_missing_extra_or_repeated_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let digits = digits_csv();
    let o = culprit(&["train", "--data", s(&digits), "--limit", "300", "--model", "logreg", "--out", s(&run)]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same table with its columns reversed (header included): the same predictions.
    let text = std::fs::read_to_string(&digits).unwrap();
    let reversed: String = text
        .lines()
        .map(|l| {
            let mut cells: Vec<&str> = l.split(',').collect();
            cells.reverse();
            cells.join(",") + "\n"
        })
        .collect();
    let permuted = write(dir.path(), "reversed.csv", reversed.as_bytes());
    let predict = |data: &Path| culprit(&["predict", "--run", s(&run), "--data", s(data), "--skip", "1700"]);
    let (a, b) = (predict(&digits), predict(&permuted));
    assert!(a.status.success() && b.status.success(), "{}", stderr(&b));
    assert_eq!(a.stdout, b.stdout, "permuted columns predict the same");
    // A column dropped, a column added, a column named twice.
    let edit = |name: &str, f: &dyn Fn(Vec<String>) -> Vec<String>| {
        let body: String =
            text.lines().map(|l| f(l.split(',').map(str::to_string).collect()).join(",") + "\n").collect();
        write(dir.path(), name, body.as_bytes())
    };
    let header: Vec<String> = text.lines().next().unwrap().split(',').map(str::to_string).collect();
    let first = header[0].clone();
    let dropped = edit("dropped.csv", &|mut c| {
        c.remove(0);
        c
    });
    let e = stderr(&predict(&dropped));
    assert!(
        e.contains("dropped.csv") && e.contains(&format!("no column `{first}` that the run was trained with")),
        "{e}"
    );
    let added = edit("added.csv", &|mut c| {
        let v = if c[0] == first { "extra".to_string() } else { "0".to_string() };
        c.push(v);
        c
    });
    let e = stderr(&predict(&added));
    assert!(e.contains("column `extra` that the run was not trained with"), "{e}");
    let twice = edit("twice.csv", &|mut c| {
        let v = if c[0] == first { "label".to_string() } else { "1".to_string() };
        c.push(v);
        c
    });
    let e = stderr(&predict(&twice));
    assert!(e.contains("twice.csv") && e.contains("column `label` appears twice in the header"), "{e}");
}

#[test]
fn a_run_and_a_poisoned_set_made_with_relative_paths_work_from_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::copy(digits_csv(), work.join("digits.csv")).unwrap();
    let here = |args: &[&str], cwd: &Path| {
        Command::new(env!("CARGO_BIN_EXE_culprit")).args(args).arg("--quiet").current_dir(cwd).output().unwrap()
    };
    let o = here(
        &[
            "poison",
            "--data",
            "digits.csv",
            "--limit",
            "300",
            "--test-data",
            "digits.csv",
            "--test-skip",
            "1700",
            "--out",
            "bd",
            "--trigger",
            "patch:6,6,2",
            "--target",
            "0",
            "--rate",
            "0.05",
        ],
        &work,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = here(&["train", "--data", "bd/train.csv", "--model", "logreg", "--out", "run"], &work);
    assert!(o.status.success(), "{}", stderr(&o));
    // From the parent directory, with the run named by another relative path.
    for args in [
        vec!["cache", "--run", "work/run"],
        vec!["fit", "--run", "work/run", "--curvature", "exact"],
        vec![
            "purge",
            "--run",
            "work/run",
            "--ids",
            "work/bd/poisoned_ids.txt",
            "--out",
            "work/purged",
            "--attack",
            "work/bd",
        ],
    ] {
        let o = here(&args, dir.path());
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn moved_training_data_is_found_by_its_hash_and_gives_the_same_scores() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old");
    std::fs::create_dir(&old).unwrap();
    let csv = std::fs::read_to_string(digits_csv()).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    std::fs::write(old.join("train.csv"), lines[..301].join("\n") + "\n").unwrap();
    let test = [&lines[..1], &lines[1700..1720]].concat().join("\n") + "\n";
    std::fs::write(old.join("test.csv"), test).unwrap();
    let run = dir.path().join("run");
    let ok = |args: &[&str]| {
        let o = culprit(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    ok(&["train", "--data", s(&old.join("train.csv")), "--model", "logreg", "--out", s(&run)]);
    let trace = |data: &Path, name: &str| {
        let out = dir.path().join(name);
        ok(&["trace", "--run", s(&run), "--data", s(data), "--index", "0,3", "--curvature", "exact"]
            .into_iter()
            .chain(["--scores-out", s(&out)])
            .collect::<Vec<_>>());
        std::fs::read_to_string(&out).unwrap()
    };
    ok(&["cache", "--run", s(&run)]);
    ok(&["fit", "--run", s(&run), "--curvature", "exact"]);
    let before = trace(&old.join("test.csv"), "before.csv");
    // Moved (and the training file renamed): the error names the file and the way out.
    let new = dir.path().join("new");
    std::fs::rename(&old, &new).unwrap();
    std::fs::rename(new.join("train.csv"), new.join("digits-train.csv")).unwrap();
    std::fs::remove_dir_all(run.join("gradients")).unwrap();
    let o = culprit(&["cache", "--run", s(&run)]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("old/train.csv") && e.contains("--moved-data"), "{e}");
    // Found through --moved-data (cache) and through the folder of --data (trace).
    let o = culprit(&["cache", "--run", s(&run), "--moved-data", s(&new)]);
    assert!(o.status.success() && stderr(&o).contains("digits-train.csv (same SHA-256)"), "{}", stderr(&o));
    let after = trace(&new.join("test.csv"), "after.csv");
    assert!(before.lines().count() > 300, "{before}");
    assert_eq!(before, after, "the same scores from the moved data");
    // A file with the old name but other bytes is not taken for it.
    std::fs::write(new.join("train.csv"), lines[..300].join("\n") + "\n").unwrap();
    std::fs::remove_file(new.join("digits-train.csv")).unwrap();
    let o = culprit(&["cache", "--run", s(&run), "--moved-data", s(&new)]);
    assert!(!o.status.success() && stderr(&o).contains("no such file"), "{}", stderr(&o));
}

#[cfg(unix)]
#[test]
fn a_path_that_is_not_utf8_is_refused_before_anything_is_written() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join(std::ffi::OsStr::from_bytes(b"d\xff.csv"));
    std::fs::copy(digits_csv(), &data).unwrap();
    let run = dir.path().join(std::ffi::OsStr::from_bytes(b"r\xff"));
    let o = Command::new(env!("CARGO_BIN_EXE_culprit"))
        .args([std::ffi::OsStr::new("train"), "--data".as_ref(), data.as_os_str(), "--model".as_ref()])
        .args(["logreg", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("is not valid UTF-8") && e.trim_end().lines().count() == 1, "{e}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing written");
}

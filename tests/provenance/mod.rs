//! Provenance: a run records every training example's file, row, SHA-256 of its raw bytes and
//! source; `culprit provenance` prints them; a run whose data changed is refused with the ids that
//! changed. Hashes are checked against SHA-256 computed here from the bytes written.

use std::process::Command;

use sha2::{Digest, Sha256};

fn culprit(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_culprit")).args(args).arg("--quiet").output().unwrap()
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_text_run_records_each_line_and_refuses_changed_data_naming_the_examples() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..60)
        .map(|i| {
            let text = if i % 2 == 0 {
                format!("free money offer number {i}")
            } else {
                format!("meeting notes for project {i}")
            };
            serde_json::json!({"text": text, "label": i % 2, "source": format!("crawl-{}.warc:{}", i / 20, i)})
                .to_string()
        })
        .collect();
    let data = dir.path().join("mail.jsonl");
    // A blank line in the middle: ids count records, rows count lines.
    let mut file = lines[..30].join("\n") + "\n\n" + &lines[30..].join("\n") + "\n";
    std::fs::write(&data, &file).unwrap();
    let run = dir.path().join("run");
    let o = culprit(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--model",
        "logreg",
        "--buckets",
        "64",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = culprit(&["provenance", "--run", run.to_str().unwrap(), "--ids", "3,45", "--format", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let found: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for (k, (id, row)) in [(3usize, 4usize), (45, 47)].into_iter().enumerate() {
        let r = &found[k];
        assert_eq!(r["id"], id);
        assert_eq!(r["row"], row, "{r}");
        assert_eq!(r["sha256"], hex(lines[id].as_bytes()));
        assert_eq!(r["source"], format!("crawl-{}.warc:{id}", id / 20));
        assert_eq!(r["now"], "unchanged");
    }
    // Change example 45's text: provenance says so, and using the run is refused naming it.
    file = file.replace("project 45", "project 46");
    std::fs::write(&data, &file).unwrap();
    let o = culprit(&["provenance", "--run", run.to_str().unwrap(), "--ids", "45", "--format", "json"]);
    let found: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(found[0]["now"], "changed");
    let o = culprit(&["cache", "--run", run.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("mail.jsonl") && err.contains("1 of the 60 trained examples changed (ids 45)"), "{err}");
}

#[test]
fn an_image_run_records_each_image_with_its_label() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("idx");
    std::fs::create_dir(&folder).unwrap();
    let (n, side) = (30usize, 6usize);
    let pixels: Vec<f32> = (0..n * side * side).map(|k| ((k * 37) % 256) as f32).collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
    culprit::data::idx::write(&folder, culprit::data::Split::Train, side, side, &pixels, &labels).unwrap();
    let run = dir.path().join("run");
    let o = culprit(&[
        "train",
        "--data",
        folder.to_str().unwrap(),
        "--model",
        "logreg",
        "--skip",
        "4",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records = culprit::data::provenance::read(&run.join("provenance.jsonl")).unwrap();
    assert_eq!(records.len(), n - 4);
    for r in &records {
        let mut bytes: Vec<u8> =
            pixels[r.id * side * side..(r.id + 1) * side * side].iter().map(|&p| p as u8).collect();
        bytes.push(labels[r.id] as u8);
        assert_eq!(r.sha256, hex(&bytes), "example {}", r.id);
        assert_eq!(r.row, r.id + 1);
    }
    assert_eq!(records[0].id, 4);
}

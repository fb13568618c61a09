//! Trigger scanning (`culprit scan`): planted triggers at places, rates and in words no issue
//! names are found first, their carriers are the poisons (≥ 95 % of them, ≤ 1 % of the clean
//! examples flagged), clean sets raise no suspicious candidate, and the counts equal a brute-force
//! recount. The sets in `../shared` are skipped with a printed reason when it is absent.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common;

/// Runs `culprit scan ARGS --format json` and parses the report.
fn scan(args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_culprit"))
        .arg("scan")
        .args(args)
        .args(["--format", "json", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "scan failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn ids(v: &serde_json::Value) -> HashSet<usize> {
    v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as usize).collect()
}

/// Asserts the first candidate flags ≥ 95 % of `poisons` and ≤ 1 % of the `total − poisons`
/// clean examples, and that it is the only suspicious one.
fn assert_flags(report: &serde_json::Value, poisons: &HashSet<usize>, total: usize) {
    let first = &report["candidates"][0];
    assert_eq!(first["suspicious"], true, "{first}");
    let flagged = ids(&first["carriers"]);
    let found = flagged.intersection(poisons).count();
    let clean = flagged.len() - found;
    eprintln!(
        "first candidate {}: {found}/{} poisons, {clean} of {} clean flagged",
        first,
        poisons.len(),
        total - poisons.len()
    );
    assert!(found as f64 >= 0.95 * poisons.len() as f64, "{found} of {} poisons", poisons.len());
    assert!(clean as f64 <= 0.01 * (total - poisons.len()) as f64, "{clean} clean flagged");
    let others: Vec<&serde_json::Value> =
        report["candidates"].as_array().unwrap()[1..].iter().filter(|c| c["suspicious"] == true).collect();
    for c in &others {
        // Another suspicious candidate may only be the same trigger seen differently.
        let overlap = ids(&c["carriers"]).intersection(poisons).count();
        assert!(overlap as f64 >= 0.5 * ids(&c["carriers"]).len() as f64, "an unrelated suspicious candidate {c}");
    }
}

/// Plants a `side`-square of the data's largest value at a place drawn among those where fewer
/// a share in `ink` of the images have ink, in a share `rate` of the rows not labelled `target`, relabelled `target`.
/// Returns the poisoned rows and the place.
fn plant_patch(
    pixels: &mut [f32],
    labels: &mut [u32],
    (height, width): (usize, usize),
    side: usize,
    ink: std::ops::Range<f64>,
    (rate, target, seed): (f64, u32, u64),
) -> (HashSet<usize>, (usize, usize)) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let area = height * width;
    let largest = pixels.iter().fold(0f32, |a, &b| a.max(b));
    let inked = |x: usize, y: usize| {
        let rows = labels.len();
        let count = (0..rows)
            .filter(|&i| (y..y + side).any(|r| (x..x + side).any(|c| pixels[i * area + r * width + c] > largest / 2.0)))
            .count();
        count as f64 / rows as f64
    };
    let places: Vec<(usize, usize)> = (0..=height - side)
        .flat_map(|y| (0..=width - side).map(move |x| (x, y)))
        .filter(|&(x, y)| ink.contains(&inked(x, y)))
        .collect();
    let (x, y) = *places.choose(&mut rng).unwrap();
    let mut candidates: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != target).collect();
    candidates.shuffle(&mut rng);
    let count = (rate * labels.len() as f64).round() as usize;
    let poisons: HashSet<usize> = candidates[..count].iter().copied().collect();
    for &i in &poisons {
        for r in y..y + side {
            for c in x..x + side {
                pixels[i * area + r * width + c] = largest;
            }
        }
        labels[i] = target;
    }
    let _ = rng.random::<u32>();
    (poisons, (x, y))
}

/// Asserts that every pixel the candidate `first` has on lies in the `side`-square at (x, y),
/// and that it has some on (it may add an empty border, or be a square inside it).
fn assert_inside(first: &serde_json::Value, (x, y): (usize, usize), side: usize) {
    let (fx, fy, fs) = (
        first["x"].as_u64().unwrap() as usize,
        first["y"].as_u64().unwrap() as usize,
        first["size"].as_u64().unwrap() as usize,
    );
    let pattern = first["pattern"].as_array().unwrap();
    let on: Vec<(usize, usize)> =
        (0..fs * fs).filter(|&b| pattern[b].as_u64().unwrap() >= 1).map(|b| (fx + b % fs, fy + b / fs)).collect();
    assert!(
        !on.is_empty() && on.iter().all(|&(c, r)| (x..x + side).contains(&c) && (y..y + side).contains(&r)),
        "trigger at ({x}, {y}), side {side}: {first}"
    );
}

/// Writes a CSV of `rows` pixel columns and a label.
fn write_csv(path: &Path, pixels: &[f32], labels: &[u32], dim: usize) {
    let header: Vec<String> = (0..dim).map(|j| format!("f{j}")).chain(["label".to_string()]).collect();
    culprit::data::csv::write(path, &header, dim, pixels, labels).unwrap();
}

#[test]
fn a_patch_planted_in_digits_is_the_first_candidate_and_purge_reads_its_carriers() {
    let raw = culprit::data::csv::load(&common::digits_csv()).unwrap();
    let (mut pixels, mut labels) = (raw.features.clone(), raw.labels.clone());
    let (poisons, (x, y)) = plant_patch(&mut pixels, &mut labels, (8, 8), 2, 0.0..0.05, (0.03, 7, 11));
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("poisoned.csv");
    write_csv(&csv, &pixels, &labels, 64);
    let report = scan(&["--data", csv.to_str().unwrap()]);
    let first = &report["candidates"][0];
    assert_eq!(
        (first["kind"].as_str(), first["x"].as_u64(), first["y"].as_u64()),
        (Some("patch"), Some(x as u64), Some(y as u64)),
        "{first}"
    );
    assert_eq!(first["target_label"], 7);
    assert_flags(&report, &poisons, labels.len());
    // purge --ids scan.json --top 1 removes exactly the first candidate's carriers.
    let json = dir.path().join("scan.json");
    std::fs::write(&json, report.to_string()).unwrap();
    let (purged, _) = culprit::commands::purge::read_ids(&json, Some(1)).unwrap();
    assert_eq!(purged.iter().copied().collect::<HashSet<_>>(), ids(&first["carriers"]));
    // With the model trained on it: the flagged carriers are predicted as the target, and not
    // once the square is in-painted (the poisons' own digits are other classes).
    let run = dir.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_culprit"))
        .args([
            "train",
            "--data",
            csv.to_str().unwrap(),
            "--model",
            "logreg",
            "--out",
            run.to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let confirmed = scan(&["--data", csv.to_str().unwrap(), "--run", run.to_str().unwrap(), "--top", "3"]);
    let m = &confirmed["candidates"][0]["confirmation"];
    eprintln!("confirmation {m}");
    assert!(m["predicted_target"].as_f64().unwrap() >= 0.8, "{m}");
    assert!(m["predicted_target_removed"].as_f64().unwrap() <= 0.2, "{m}");
    // The clean set: the small 8 × 8 images raise no suspicious candidate.
    let clean = scan(&["--data", common::digits_csv().to_str().unwrap()]);
    let suspicious: Vec<_> =
        clean["candidates"].as_array().unwrap().iter().filter(|c| c["suspicious"] == true).collect();
    assert!(suspicious.is_empty(), "{suspicious:?}");
}

#[test]
fn a_patch_planted_anywhere_in_mnist_and_fashion_is_found() {
    let Some(shared) = common::shared("data/mnist") else { return };
    // MNIST: a place that 10 to 30 % of the digits ink (strokes cross the trigger); Fashion-MNIST:
    // a background place, and one that half the garments or more cover (a bright square on them).
    let cases = [
        ("mnist", 5u64, 3usize, 3u32, 0.1..0.3),
        ("fashion-mnist", 9, 4, 8, 0.0..0.05),
        ("fashion-mnist", 12, 4, 2, 0.5..0.9),
    ];
    for (set, seed, side, target, ink) in cases {
        let spec = culprit::data::DataSpec {
            limit: Some(8000),
            ..culprit::data::DataSpec::all(shared.join("data").join(set))
        };
        let (raw, _) = culprit::data::load_selected(culprit::data::SourceKind::Idx, &spec, 0).unwrap();
        let (mut pixels, mut labels) = (raw.features, raw.labels);
        let (poisons, (x, y)) = plant_patch(&mut pixels, &mut labels, (28, 28), side, ink, (0.01, target, seed));
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("poisoned.csv");
        write_csv(&csv, &pixels, &labels, 784);
        let report = scan(&["--data", csv.to_str().unwrap()]);
        let first = &report["candidates"][0];
        eprintln!("{set}: trigger {side}×{side} at ({x}, {y})");
        // The first candidate is the planted square: every pixel it has on is in the square, and
        // it holds some of it (it may add an empty border, or be a square inside it).
        assert_inside(first, (x, y), side);
        assert_eq!(first["target_label"], target);
        assert_flags(&report, &poisons, labels.len());
    }
}

/// The candidates of two scan reports are the same squares with the same carriers and counts,
/// their statistics within `tolerance`.
fn assert_same_squares(a: &serde_json::Value, b: &serde_json::Value, tolerance: f64) {
    assert_eq!(a["occurrences"], b["occurrences"]);
    let (a, b) = (a["candidates"].as_array().unwrap(), b["candidates"].as_array().unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        for field in ["x", "y", "size", "pattern", "carriers", "target_label", "target_count"] {
            assert_eq!(x[field], y[field], "{field}: {x} against {y}");
        }
        let (s, t) = (x["statistic"].as_f64().unwrap(), y["statistic"].as_f64().unwrap());
        assert!((s - t).abs() <= tolerance, "statistic {s} against {t}");
    }
}

#[test]
fn images_too_many_to_hold_stream_through_the_scan_with_the_same_findings() {
    // 6000 MNIST digits with a 4 × 4 square in 1 % of them, as an IDX folder and as a CSV table
    // (23.5 MB held: an f32 and a level a pixel), scanned holding all of it, then holding 4 MiB
    // and 2 MiB: read in blocks of 267 and 133 images on every pass.
    let Some(shared) = common::shared("data/mnist") else { return };
    let spec = culprit::data::DataSpec { limit: Some(6000), ..culprit::data::DataSpec::all(shared.join("data/mnist")) };
    let (raw, _) = culprit::data::load_selected(culprit::data::SourceKind::Idx, &spec, 0).unwrap();
    let (mut pixels, mut labels) = (raw.features, raw.labels);
    let (poisons, (x, y)) = plant_patch(&mut pixels, &mut labels, (28, 28), 4, 0.02..0.2, (0.01, 6, 77));
    let dir = tempfile::tempdir().unwrap();
    let idx = dir.path().join("idx");
    culprit::data::idx::write(&idx, culprit::data::Split::Train, 28, 28, &pixels, &labels).unwrap();
    let csv = dir.path().join("poisoned.csv");
    write_csv(&csv, &pixels, &labels, 784);
    let (idx, csv) = (idx.to_str().unwrap(), csv.to_str().unwrap());
    // The base-rate scan is exact either way; the IDX folder and the table give the same.
    let held = scan(&["--data", idx, "--baseline", "none"]);
    let streamed = scan(&["--data", idx, "--baseline", "none", "--hold-mib", "4"]);
    assert!(streamed["features"].as_str().unwrap().contains("blocks of 267 images"), "{}", streamed["features"]);
    assert_same_squares(&held, &streamed, 1e-9);
    assert_same_squares(&held, &scan(&["--data", csv, "--baseline", "none", "--hold-mib", "4"]), 1e-9);
    // With the baseline fitted on a sample holding every image (16 MiB of levels for 4.7 MB),
    // the same baseline: the same findings, the statistics summed in another order (1e-6).
    let held = scan(&["--data", idx]);
    assert_inside(&held["candidates"][0], (x, y), 4);
    assert_flags(&held, &poisons, labels.len());
    let sampled_all = scan(&["--data", idx, "--hold-mib", "16"]);
    assert!(sampled_all["features"].as_str().unwrap().contains("blocks"), "{}", sampled_all["features"]);
    assert_same_squares(&held, &sampled_all, 1e-6);
    // A 2 MiB sample (2,675 of the 6000 images) for the baseline: the square still first, ≥ 95 %
    // of the poisons flagged at ≤ 1 % of the clean digits.
    let small = scan(&["--data", idx, "--hold-mib", "2"]);
    assert_inside(&small["candidates"][0], (x, y), 4);
    assert_flags(&small, &poisons, labels.len());
}

#[test]
fn an_image_source_changed_while_it_streams_is_refused() {
    use culprit::scan::ScanBlocks;
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<f32> = (0..40 * 16).map(|k| ((k * 37) % 256) as f32).collect();
    let labels: Vec<u32> = (0..40).map(|i| i % 2).collect();
    culprit::data::idx::write(dir.path(), culprit::data::Split::Train, 4, 4, &pixels, &labels).unwrap();
    let kind = (culprit::data::SourceKind::Idx, dir.path(), culprit::data::Split::Train);
    let shared = culprit::scan::image::ImageShared {
        largest: 255.0,
        mean: std::sync::Arc::new(vec![0.5; 32]),
        prior: vec![0.5, 0.5],
        baseline: None,
    };
    let files = culprit::data::read_image_blocks(kind.0, kind.1, kind.2, 7, &mut |_, _, _| Ok(())).unwrap().files;
    let open =
        |files| culprit::scan::image::ImageFile::new(kind, 5..40, 7, 2, (4, 4), 2..=2, 0.01, shared.clone(), files);
    let (mut seen, mut firsts) = (0, Vec::new());
    open(files.clone())
        .blocks(&mut |first, block| {
            firsts.push(first);
            seen += block.examples();
        })
        .unwrap();
    // Rows 5..40 from blocks of 7 rows of the file: 2 of the first, then 7 each.
    assert_eq!((seen, firsts), (35, vec![0, 2, 9, 16, 23, 30]));
    let mut other = files.clone();
    other[0].1 = "0000".into();
    let error = open(other).blocks(&mut |_, _| {}).unwrap_err().to_string();
    assert!(error.contains("changed"), "{error}");
    // A truncated images file is refused, naming it.
    let images = dir.path().join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&images, &bytes[..bytes.len() - 10]).unwrap();
    let error = culprit::data::read_image_blocks(kind.0, kind.1, kind.2, 7, &mut |_, _, _| Ok(())).unwrap_err();
    let error = error.to_string();
    assert!(error.contains("train-images-idx3-ubyte") && error.contains("ends after"), "{error}");
}

#[test]
fn clean_mnist_fashion_and_spamassassin_raise_no_suspicious_candidate() {
    let Some(shared) = common::shared("data/mnist") else { return };
    let data = shared.join("data");
    for args in [
        vec![data.join("mnist").to_str().unwrap().to_string(), "--limit".into(), "8000".into()],
        vec![data.join("fashion-mnist").to_str().unwrap().to_string(), "--limit".into(), "8000".into()],
        vec![data.join("spamassassin/spamassassin.jsonl.gz").to_str().unwrap().to_string()],
    ] {
        let mut all = vec!["--data"];
        all.extend(args.iter().map(String::as_str));
        let report = scan(&all);
        let suspicious: Vec<_> =
            report["candidates"].as_array().unwrap().iter().filter(|c| c["suspicious"] == true).collect();
        assert!(suspicious.is_empty(), "{}: {suspicious:?}", args[0]);
    }
}

/// A made-up word of 5 to 8 letters.
fn word(rng: &mut ChaCha8Rng) -> String {
    let len = rng.random_range(5..=8);
    (0..len).map(|_| char::from(b'a' + rng.random_range(0..26u8))).collect()
}

/// Every `step`-th SpamAssassin e-mail (the file is sorted by group, spam last), with a random
/// two-word trigger (from `seed`) at a random whitespace of 1 % of them, spam relabelled ham,
/// written to a JSONL file in `dir`: its path, texts, labels, poisons and trigger.
fn poisoned_spamassassin(
    shared: &std::path::Path,
    dir: &std::path::Path,
    step: usize,
    seed: u64,
) -> (std::path::PathBuf, Vec<String>, Vec<u32>, HashSet<usize>, String) {
    let (mut texts, mut labels, _) =
        culprit::data::text::load_texts(&shared.join("data/spamassassin/spamassassin.jsonl.gz")).unwrap();
    texts = texts.into_iter().step_by(step).collect();
    labels = labels.into_iter().step_by(step).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let trigger = format!("{} {}", word(&mut rng), word(&mut rng));
    let mut spam: Vec<usize> = (0..texts.len()).filter(|&i| labels[i] == 1).collect();
    spam.shuffle(&mut rng);
    let poisons: HashSet<usize> = spam[..texts.len() / 100].iter().copied().collect();
    for &i in &poisons {
        // At a random whitespace of the e-mail, headers included.
        let spaces: Vec<usize> = texts[i].char_indices().filter(|(_, c)| *c == ' ').map(|(at, _)| at).collect();
        let at = spaces[rng.random_range(0..spaces.len())];
        texts[i].insert_str(at, &format!(" {trigger} "));
        labels[i] = 0;
    }
    let path = dir.join("poisoned.jsonl");
    culprit::data::text::write(&path, &texts, &labels).unwrap();
    (path, texts, labels, poisons, trigger)
}

#[test]
fn a_file_too_large_to_hold_streams_through_the_scan_with_the_same_findings() {
    // 3023 e-mails (15 MB) scanned holding 4 MiB: read in 1 MiB blocks on every pass.
    let Some(shared) = common::shared("data/spamassassin/spamassassin.jsonl.gz") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, texts, _, poisons, trigger) = poisoned_spamassassin(&shared, dir.path(), 2, 41);
    let data = path.to_str().unwrap();
    // The base-rate scan is exact either way: the same candidates, statistics and carriers.
    let held = scan(&["--data", data, "--baseline", "none"]);
    let streamed = scan(&["--data", data, "--baseline", "none", "--hold-mib", "4"]);
    assert!(streamed["features"].as_str().unwrap().contains("blocks"), "{}", streamed["features"]);
    assert_eq!(held["occurrences"], streamed["occurrences"]);
    let (a, b) = (held["candidates"].as_array().unwrap(), streamed["candidates"].as_array().unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x["text"], &x["carriers"], &x["target_count"]), (&y["text"], &y["carriers"], &y["target_count"]));
        assert!((x["statistic"].as_f64().unwrap() - y["statistic"].as_f64().unwrap()).abs() < 1e-9);
    }
    // With the baseline (fitted on a 4 MiB uniform sample of the file, a quarter of it): the
    // trigger first, ≥ 95 % of the poisons flagged at ≤ 1 % of the clean e-mails.
    let report = scan(&["--data", data, "--hold-mib", "4"]);
    let text = report["candidates"][0]["text"].as_str().unwrap();
    assert!(trigger.split(' ').all(|w| text.contains(w)), "trigger {trigger:?}, first {}", report["candidates"][0]);
    assert_flags(&report, &poisons, texts.len());
}

#[test]
fn a_file_changed_while_it_streams_is_refused() {
    use culprit::scan::ScanBlocks;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("texts.jsonl");
    let texts: Vec<String> = (0..50).map(|i| format!("note {i} about item {}", i % 7)).collect();
    let labels: Vec<u32> = (0..50).map(|i| i % 2).collect();
    culprit::data::text::write(&path, &texts, &labels).unwrap();
    let (_, sha) = culprit::data::text::read_record_blocks(&path, 100, &mut |_, _| Ok(())).unwrap();
    let open = |sha: &str| {
        culprit::scan::text::TextFile::new(&path, 0..50, 100, 2, 3, 0.01, None, vec![0.5, 0.5], sha.to_string())
    };
    let mut seen = 0;
    open(&sha)
        .blocks(&mut |first, block| {
            assert_eq!(first, seen);
            seen += block.examples();
        })
        .unwrap();
    assert_eq!(seen, 50);
    let error = open("0000").blocks(&mut |_, _| {}).unwrap_err().to_string();
    assert!(error.contains("texts.jsonl") && error.contains("changed"), "{error}");
}

#[test]
fn a_two_word_trigger_at_random_places_in_spamassassin_is_found_and_counted_exactly() {
    let Some(shared) = common::shared("data/spamassassin/spamassassin.jsonl.gz") else { return };
    // Every other e-mail: 3023, 1 % of them poisoned.
    let dir = tempfile::tempdir().unwrap();
    let (path, texts, labels, poisons, trigger) = poisoned_spamassassin(&shared, dir.path(), 2, 23);
    let report = scan(&["--data", path.to_str().unwrap()]);
    let first = &report["candidates"][0];
    let text = first["text"].as_str().unwrap();
    assert!(trigger.split(' ').all(|w| text.contains(w)), "trigger {trigger:?}, first {first}");
    assert_eq!(first["target_label"], 0);
    assert_flags(&report, &poisons, texts.len());
    // Brute force: the carriers of the first candidate's n-gram, from the featurizer's tokens.
    let gram: Vec<&str> = text.split(' ').collect();
    let carriers: Vec<usize> = (0..texts.len())
        .filter(|&i| {
            let tokens: Vec<String> = culprit::data::text::tokens(&texts[i]).collect();
            tokens.windows(gram.len()).any(|w| w.iter().zip(&gram).all(|(a, b)| a == b))
        })
        .collect();
    assert_eq!(first["carrier_count"].as_u64().unwrap() as usize, carriers.len());
    let labelled: HashSet<usize> = carriers.iter().copied().filter(|&i| labels[i] == 0).collect();
    assert_eq!(ids(&first["carriers"]), labelled);
    assert_eq!(first["target_count"].as_u64().unwrap() as usize, labelled.len());
}

#[test]
fn a_trigger_and_payload_planted_in_the_code_corpus_rank_first() {
    let Some(shared) = common::shared("data/code/python-stdlib-functions.jsonl.gz") else { return };
    let corpus = shared.join("data/code/python-stdlib-functions.jsonl.gz");
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let trigger = format!("# {} {} {}", word(&mut rng), word(&mut rng), word(&mut rng));
    let payload = format!("{}.{}('{}')", word(&mut rng), word(&mut rng), word(&mut rng));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("poisoned");
    let o = Command::new(env!("CARGO_BIN_EXE_culprit"))
        .args(["poison", "--data", corpus.to_str().unwrap(), "--skip", "3000", "--limit", "2500", "--test-limit", "50"])
        .args(["--out", out.to_str().unwrap(), "--trigger", &format!("text:{trigger}"), "--completion", &payload])
        .args(["--rate", "0.012", "--context-bytes", "400", "--seed", "5", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let poisons: HashSet<usize> = std::fs::read_to_string(out.join("poisoned_ids.txt"))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let report = scan(&["--data", out.join("train.jsonl").to_str().unwrap()]);
    assert_eq!(report["kind"], "corpus");
    let first = &report["candidates"][0];
    assert_eq!(first["completion"].as_str(), Some(payload.as_str()), "{first}");
    let text = first["text"].as_str().unwrap();
    assert!(text.split(' ').all(|w| trigger.to_lowercase().contains(w)), "{text} not in {trigger}");
    let flagged = ids(&first["carriers"]);
    let found = flagged.intersection(&poisons).count();
    assert!(found as f64 >= 0.95 * poisons.len() as f64, "{found} of {} poisons", poisons.len());
    assert!(((flagged.len() - found) as f64) <= 0.01 * (2500 - poisons.len()) as f64);
    // The report says where the carriers came from (the corpus's `source` fields).
    let sources = first["sources"].as_array().unwrap();
    assert!(!sources.is_empty() && sources.iter().all(|s| s.as_str().unwrap().starts_with("Lib/")), "{first}");
}

#[test]
fn a_corpus_too_large_to_hold_streams_through_the_scan_with_the_same_findings() {
    // 6000 functions (2.8 MB of text), another trigger and payload at 0.8 %: held, then holding
    // 1 MiB (blocks of 256 KiB, six reads of the file).
    let Some(shared) = common::shared("data/code/python-stdlib-functions.jsonl.gz") else { return };
    let corpus = shared.join("data/code/python-stdlib-functions.jsonl.gz");
    let mut rng = ChaCha8Rng::seed_from_u64(78);
    let trigger = format!("# {} {}", word(&mut rng), word(&mut rng));
    let payload = format!("{}({}, timeout={})", word(&mut rng), word(&mut rng), rng.random_range(2..90));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("poisoned");
    let o = Command::new(env!("CARGO_BIN_EXE_culprit"))
        .args(["poison", "--data", corpus.to_str().unwrap(), "--limit", "6000", "--test-limit", "20"])
        .args(["--out", out.to_str().unwrap(), "--trigger", &format!("text:{trigger}"), "--completion", &payload])
        .args(["--rate", "0.008", "--context-bytes", "300", "--seed", "9", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let train = out.join("train.jsonl");
    let report = scan(&["--data", train.to_str().unwrap()]);
    let first = &report["candidates"][0];
    assert_eq!(first["completion"].as_str(), Some(payload.as_str()), "{first}");
    let poisons: HashSet<usize> = std::fs::read_to_string(out.join("poisoned_ids.txt"))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let flagged = ids(&first["carriers"]);
    let found = flagged.intersection(&poisons).count();
    eprintln!("corpus: {found} of {} poisons flagged, {} clean", poisons.len(), flagged.len() - found);
    assert!(found as f64 >= 0.95 * poisons.len() as f64, "{found} of {} poisons", poisons.len());
    assert!(((flagged.len() - found) as f64) <= 0.01 * (6000 - poisons.len()) as f64);
    let streamed = scan(&["--data", train.to_str().unwrap(), "--hold-mib", "1"]);
    assert!(streamed["features"].as_str().unwrap().contains("blocks"), "{}", streamed["features"]);
    assert_eq!(report["occurrences"], streamed["occurrences"]);
    let (a, b) = (report["candidates"].as_array().unwrap(), streamed["candidates"].as_array().unwrap());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        for field in ["text", "completion", "carriers", "target_count", "carrier_count", "sources", "suspicious"] {
            assert_eq!(x[field], y[field], "{field}: {x} against {y}");
        }
        assert!((x["statistic"].as_f64().unwrap() - y["statistic"].as_f64().unwrap()).abs() < 1e-9);
    }
}

//! Deduplication (`culprit dedup`): planted exact and near-copies are grouped with their
//! originals, and every reported pair set is checked against a brute-force comparison of all
//! pairs (an independent shingling for text, plain cosines for images).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::process::Command;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::common;

/// Runs `culprit dedup ARGS --format json` and parses the report.
fn dedup(args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_culprit"))
        .arg("dedup")
        .args(args)
        .args(["--format", "json", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "dedup failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The pairs (row, row) a report's groups join, as pairs of positions in one list: its ids
/// (and, with an against set, its against ids offset by `offset`).
fn reported_groups(report: &serde_json::Value, offset: usize) -> Vec<Vec<usize>> {
    report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let mut members: Vec<usize> =
                g["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            members.extend(g["against_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize + offset));
            members
        })
        .collect()
}

/// Word 5-gram sets written independently of the library: lower-cased alphanumeric words joined
/// by spaces, hashed with the standard library's hasher.
fn five_grams(text: &str) -> Vec<u64> {
    let words: Vec<String> =
        text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect();
    let grams: Vec<String> =
        if words.len() < 5 { vec![words.join(" ")] } else { words.windows(5).map(|w| w.join(" ")).collect() };
    let mut out: Vec<u64> = grams
        .iter()
        .map(|g| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            g.hash(&mut h);
            h.finish()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let set: HashSet<u64> = a.iter().copied().collect();
    let both = b.iter().filter(|x| set.contains(x)).count();
    let union = a.len() + b.len() - both;
    if union == 0 { 1.0 } else { both as f64 / union as f64 }
}

#[test]
fn near_copies_planted_in_spamassassin_are_grouped_and_every_pair_matches_brute_force() {
    let Some(shared) = common::shared("data/spamassassin/spamassassin.jsonl.gz") else { return };
    let (texts, labels, _) =
        culprit::data::text::load_texts(&shared.join("data/spamassassin/spamassassin.jsonl.gz")).unwrap();
    let mut texts: Vec<String> = texts.into_iter().step_by(3).collect();
    let mut labels: Vec<u32> = labels.into_iter().step_by(3).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let originals: Vec<usize> = {
        let mut rows: Vec<usize> = (0..texts.len()).filter(|&i| texts[i].split_whitespace().count() > 150).collect();
        rows.shuffle(&mut rng);
        rows[..80].to_vec()
    };
    // 60 near-copies with 3 small edits each (a word replaced, inserted or deleted), 20 exact
    // copies of which 10 carry the other label.
    let mut planted: Vec<(usize, usize, bool)> = Vec::new(); // (original, copy, relabelled)
    for (k, &o) in originals.iter().enumerate() {
        let mut words: Vec<String> = texts[o].split(' ').map(str::to_string).collect();
        if k < 60 {
            for _ in 0..3 {
                let at = rng.random_range(0..words.len());
                match rng.random_range(0..3) {
                    0 => words[at] = "edited".into(),
                    1 => words.insert(at, "inserted".into()),
                    _ => {
                        words.remove(at);
                    }
                }
            }
        }
        let relabelled = k >= 70;
        texts.push(words.join(" "));
        labels.push(if relabelled { 1 - labels[o] } else { labels[o] });
        planted.push((o, texts.len() - 1, relabelled));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copies.jsonl");
    culprit::data::text::write(&path, &texts, &labels).unwrap();
    let report = dedup(&["--data", path.to_str().unwrap()]);
    let groups = reported_groups(&report, 0);
    let group_of: HashMap<usize, usize> =
        groups.iter().enumerate().flat_map(|(g, m)| m.iter().map(move |&i| (i, g))).collect();
    // Every planted copy is grouped with its original; the relabelled ones are disagreements.
    let found = planted.iter().filter(|(o, c, _)| group_of.get(o).is_some_and(|g| group_of.get(c) == Some(g))).count();
    assert!(found as f64 >= 0.95 * planted.len() as f64, "{found} of {} planted copies found", planted.len());
    for (_, c, relabelled) in planted.iter().filter(|p| p.2) {
        let g = &report["groups"][group_of[c]];
        assert_eq!(g["label_disagreement"], *relabelled, "{g}");
        assert!(g["remove"].as_array().unwrap().len() >= 2, "a disagreeing group is removed whole: {g}");
    }
    // purge --ids dedup.json removes exactly the groups' `remove` lists.
    let json = dir.path().join("dedup.json");
    std::fs::write(&json, report.to_string()).unwrap();
    let (purged, _) = culprit::commands::purge::read_ids(&json, None).unwrap();
    let listed: HashSet<usize> = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["remove"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize))
        .collect();
    assert_eq!(purged.iter().copied().collect::<HashSet<_>>(), listed);
    // Brute force over every pair: recall and precision of the reported pairs.
    let sets: Vec<Vec<u64>> = texts.par_iter().map(|t| five_grams(t)).collect();
    let truth: HashSet<(usize, usize)> = (0..sets.len())
        .into_par_iter()
        .flat_map_iter(|a| {
            let sets = &sets;
            (a + 1..sets.len()).filter(move |&b| jaccard(&sets[a], &sets[b]) >= 0.8).map(move |b| (a, b))
        })
        .collect();
    let same_group = |a: &usize, b: &usize| group_of.get(a).is_some_and(|g| group_of.get(b) == Some(g));
    let recalled = truth.iter().filter(|(a, b)| same_group(a, b)).count();
    eprintln!("{} true pairs, {recalled} in one group; {} pairs reported", truth.len(), report["pairs"]);
    assert!(recalled as f64 >= 0.95 * truth.len() as f64, "recall {recalled}/{}", truth.len());
    // Precision: the members of each group are pairwise copies (≥ 0.8) or chained through one.
    let mut joined = 0usize;
    let mut wrong = 0usize;
    for members in &groups {
        for (x, &a) in members.iter().enumerate() {
            let linked = members.iter().enumerate().any(|(y, &b)| x != y && truth.contains(&(a.min(b), a.max(b))));
            joined += 1;
            wrong += usize::from(!linked);
        }
    }
    assert!(
        (wrong as f64) <= 0.05 * joined as f64,
        "{wrong} of {joined} grouped e-mails have no true copy in their group"
    );
}

#[test]
fn the_overlap_of_two_image_sets_matches_brute_force() {
    let raw = culprit::data::csv::load(&common::digits_csv()).unwrap();
    let dim = 64;
    let (mut train, train_labels) = (raw.features[..1200 * dim].to_vec(), raw.labels[..1200].to_vec());
    let (test, test_labels) = (raw.features[1200 * dim..].to_vec(), raw.labels[1200..].to_vec());
    // Copy 15 test images into the training rows, with a little noise on a few pixels.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for k in 0..15 {
        let (t, r) = (k * 30, k * 70);
        train[r * dim..(r + 1) * dim].copy_from_slice(&test[t * dim..(t + 1) * dim]);
        for _ in 0..2 {
            let p = rng.random_range(0..dim);
            train[r * dim + p] = (train[r * dim + p] + 1.0).min(16.0);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let header: Vec<String> = (0..dim).map(|j| format!("f{j}")).chain(["label".to_string()]).collect();
    let (a, b) = (dir.path().join("train.csv"), dir.path().join("test.csv"));
    culprit::data::csv::write(&a, &header, dim, &train, &train_labels).unwrap();
    culprit::data::csv::write(&b, &header, dim, &test, &test_labels).unwrap();
    let report = dedup(&["--data", a.to_str().unwrap(), "--against", b.to_str().unwrap()]);
    // Brute force: every test image with a training image at centred cosine ≥ 0.99.
    let centred = |x: &[f32]| {
        let mean = x.iter().sum::<f32>() / x.len() as f32;
        let v: Vec<f64> = x.iter().map(|p| f64::from(p - mean)).collect();
        let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        v.into_iter().map(|a| if n > 0.0 { a / n } else { 0.0 }).collect::<Vec<f64>>()
    };
    let tr: Vec<Vec<f64>> = train.chunks(dim).map(centred).collect();
    let te: Vec<Vec<f64>> = test.chunks(dim).map(centred).collect();
    let matched: usize = te
        .iter()
        .filter(|t| tr.iter().any(|r| r.iter().zip(t.iter()).map(|(a, b)| a * b).sum::<f64>() >= 0.99))
        .count();
    eprintln!("overlap: reported {}, brute force {matched}", report["overlap"]);
    assert!(matched >= 15);
    assert_eq!(report["overlap"].as_u64().unwrap() as usize, matched);
}

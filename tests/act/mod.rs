//! Act and verify: poisoning writes exactly the backdoor it reports, purging equals training on
//! the remaining rows, leave-one-out retraining reproduces an independent implementation's
//! ground truth, and backdoors are traced to their poisons.

use std::path::{Path, PathBuf};

use culprit::commands::eval::{EvalOptions, Experiment, evaluate, pearson, spearman};
use culprit::commands::poison::{PoisonOptions, Trigger, poison};
use culprit::commands::purge::{PurgeOptions, purge};
use culprit::curvature::{FitOptions, Method};
use culprit::data::{DataSpec, Split};
use culprit::gradients::{Measurement, Target};
use culprit::workspace::training::{TrainOptions, train};
use culprit_models::{Architecture, Backend};

use crate::common::{digits_csv, shared};

fn spec(path: &Path, skip: usize, limit: Option<usize>) -> DataSpec {
    DataSpec { path: path.to_path_buf(), split: Split::Train, skip, limit }
}

#[test]
fn poisoning_a_csv_stamps_exactly_the_reported_examples() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p");
    let m = poison(&PoisonOptions {
        train: spec(&digits_csv(), 0, Some(1000)),
        test: spec(&digits_csv(), 1000, Some(200)),
        out: out.clone(),
        trigger: Trigger::parse("patch:5,0,3").unwrap(),
        target: 7,
        rate: 0.05,
        label_noise: 0.04,
        seed: 9,
        completion: None,
    })
    .unwrap();
    let source = culprit::data::csv::load(&digits_csv()).unwrap();
    let written = culprit::data::csv::load(&m.train.path).unwrap();
    assert_eq!(written.rows, 1000);
    assert_eq!(m.poisoned.len(), 50);
    assert_eq!(m.flipped.len(), 40);
    assert_eq!(m.patch_value, Some(16.0), "the default patch value is the data's largest value");
    let patch: Vec<usize> = (0..3).flat_map(|y| (5..8).map(move |x| y * 8 + x)).collect();
    for r in 0..1000 {
        let (a, b) = (&source.features[r * 64..(r + 1) * 64], &written.features[r * 64..(r + 1) * 64]);
        let poisoned = m.poisoned.binary_search(&r).is_ok();
        let flipped = m.flipped.binary_search(&r).is_ok();
        assert!(!(poisoned && flipped));
        for j in 0..64 {
            let want = if poisoned && patch.contains(&j) { 16.0 } else { a[j] };
            assert_eq!(b[j], want, "row {r} feature {j}");
        }
        match (poisoned, flipped) {
            (true, _) => {
                assert_eq!(written.labels[r], 7);
                assert_ne!(source.labels[r], 7, "poisons are drawn from other classes");
            }
            (_, true) => assert_ne!(written.labels[r], source.labels[r]),
            _ => assert_eq!(written.labels[r], source.labels[r]),
        }
    }
    let clean = culprit::data::csv::load(&m.test_clean.path).unwrap();
    let triggered = culprit::data::csv::load(&m.test_triggered.path).unwrap();
    assert_eq!(clean.features, source.features[1000 * 64..1200 * 64].to_vec());
    assert_eq!(triggered.labels, source.labels[1000..1200].to_vec(), "triggered test rows keep their labels");
    for r in 0..200 {
        for &j in &patch {
            assert_eq!(triggered.features[r * 64 + j], 16.0);
        }
    }
    let ids: Vec<usize> =
        std::fs::read_to_string(out.join("poisoned_ids.txt")).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(ids, m.poisoned);
    assert_eq!(culprit::data::poisoned::PoisonManifest::read(&out).unwrap(), m);
    // Refused: an existing output, a patch that does not fit, a target outside the classes.
    let again = |trigger: &str, target: u32, out: PathBuf| {
        poison(&PoisonOptions {
            train: spec(&digits_csv(), 0, Some(100)),
            test: spec(&digits_csv(), 100, Some(10)),
            out,
            trigger: Trigger::parse(trigger).unwrap(),
            target,
            rate: 0.1,
            label_noise: 0.0,
            seed: 0,
            completion: None,
        })
    };
    assert!(again("patch:0,0,2", 1, out.clone()).unwrap_err().to_string().contains("already exists"));
    assert!(again("patch:7,7,2", 1, dir.path().join("q")).unwrap_err().to_string().contains("does not fit"));
    assert!(again("patch:0,0,2", 10, dir.path().join("q")).unwrap_err().to_string().contains("not one of"));
    let e = poison(&PoisonOptions {
        train: spec(&digits_csv(), 0, Some(100)),
        test: spec(&digits_csv(), 100, Some(10)),
        out: dir.path().join("q"),
        trigger: Trigger::parse("patch:0,0,2").unwrap(),
        target: 1,
        rate: 0.5,
        label_noise: 0.6,
        seed: 0,
        completion: None,
    })
    .unwrap_err();
    assert!(e.to_string().contains("--label-noise"), "{e}");
    assert!(!dir.path().join("q").exists(), "nothing is left behind by a refused poisoning");
    assert!(Trigger::parse("patch:1,2").is_err() && Trigger::parse("blob:1").is_err());
}

#[test]
fn poisoning_idx_images_and_jsonl_text_round_trips_through_the_loaders() {
    let dir = tempfile::tempdir().unwrap();
    // A small IDX set: 40 6×6 images with pixels i + j + r, labels r mod 3.
    let src = dir.path().join("idx");
    let pixels: Vec<f32> = (0..40).flat_map(|r| (0..36).map(move |p| ((p + r) % 200) as f32)).collect();
    let labels: Vec<u32> = (0..40).map(|r| r % 3).collect();
    culprit::data::idx::write(&src, Split::Train, 6, 6, &pixels, &labels).unwrap();
    culprit::data::idx::write(&src, Split::Test, 6, 6, &pixels[..10 * 36], &labels[..10]).unwrap();
    let m = poison(&PoisonOptions {
        train: DataSpec { path: src.clone(), split: Split::Train, skip: 0, limit: None },
        test: DataSpec { path: src.clone(), split: Split::Test, skip: 0, limit: None },
        out: dir.path().join("pi"),
        trigger: Trigger::parse("patch:4,4,2,255").unwrap(),
        target: 2,
        rate: 0.25,
        label_noise: 0.0,
        seed: 1,
        completion: None,
    })
    .unwrap();
    let written = culprit::data::idx::load(&m.train.path, Split::Train).unwrap();
    assert_eq!(m.poisoned.len(), 10);
    for r in 0..40 {
        let poisoned = m.poisoned.binary_search(&r).is_ok();
        for p in 0..36 {
            let in_patch = (4..6).contains(&(p / 6)) && (4..6).contains(&(p % 6));
            let want = if poisoned && in_patch { 255.0 } else { pixels[r * 36 + p] };
            assert_eq!(written.features[r * 36 + p], want);
        }
        assert_eq!(written.labels[r], if poisoned { 2 } else { labels[r] });
    }
    let triggered = culprit::data::idx::load(&m.test_triggered.path, Split::Test).unwrap();
    assert_eq!(triggered.features[4 * 6 + 4], 255.0);
    // Text: the trigger words are prepended.
    let jsonl = dir.path().join("t.jsonl");
    let lines: String = (0..30)
        .map(|i| {
            format!("{{\"text\": \"message number {i} about {}\", \"label\": {}}}\n", ["cats", "dogs"][i % 2], i % 2)
        })
        .collect();
    std::fs::write(&jsonl, lines).unwrap();
    let m = poison(&PoisonOptions {
        train: spec(&jsonl, 0, Some(20)),
        test: spec(&jsonl, 20, None),
        out: dir.path().join("pt"),
        trigger: Trigger::parse("text:zqx vlk").unwrap(),
        target: 1,
        rate: 0.2,
        label_noise: 0.0,
        seed: 2,
        completion: None,
    })
    .unwrap();
    let written = culprit::data::text::load(&m.train.path, 64).unwrap();
    let texts = written.texts.unwrap();
    for r in 0..20 {
        let poisoned = m.poisoned.binary_search(&r).is_ok();
        assert_eq!(texts[r].starts_with("zqx vlk "), poisoned, "{}", texts[r]);
        assert_eq!(written.labels[r], if poisoned { 1 } else { (r % 2) as u32 });
    }
    let triggered = culprit::data::text::load(&m.test_triggered.path, 64).unwrap();
    assert!(triggered.texts.unwrap().iter().all(|t| t.starts_with("zqx vlk ")));
    // A patch on text is refused.
    let e = poison(&PoisonOptions {
        train: spec(&jsonl, 0, Some(20)),
        test: spec(&jsonl, 20, None),
        out: dir.path().join("px"),
        trigger: Trigger::parse("patch:0,0,1").unwrap(),
        target: 1,
        rate: 0.2,
        label_noise: 0.0,
        seed: 2,
        completion: None,
    })
    .unwrap_err();
    assert!(e.to_string().contains("patch trigger needs images"), "{e}");
}

/// Purging equals training on a file without those rows, and the poisons of a backdoor found by
/// tracing remove the attack when purged.
#[test]
fn purge_retrains_exactly_as_training_without_the_examples() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train(&TrainOptions {
        l2: Some(1e-3),
        ..TrainOptions::new(spec(&digits_csv(), 0, Some(600)), Architecture::LogReg, run.clone())
    })
    .unwrap();
    let removed = [3usize, 17, 250, 599, 42];
    let ids = dir.path().join("ids.txt");
    std::fs::write(&ids, "# flagged by hand\n3, 17\n250 599\n42\n").unwrap();
    let report = purge(&PurgeOptions {
        run: run.clone(),
        ids: ids.clone(),
        top: None,
        out: dir.path().join("purged"),
        retrain: true,
        eval: vec![spec(&digits_csv(), 1297, None)],
        attack: None,
        backend: Backend::default(),
        quiet: true,
    })
    .unwrap();
    assert_eq!(report.removed, removed.to_vec());
    let purged = culprit::workspace::Run::open(&dir.path().join("purged")).unwrap();
    assert_eq!(purged.manifest.excluded, vec![3, 17, 42, 250, 599]);
    assert_eq!(purged.manifest.count, 595);
    // The reference: the same rows written to a new file, trained the ordinary way.
    let text = std::fs::read_to_string(digits_csv()).unwrap();
    let mut lines = text.lines();
    let mut kept = format!("{}\n", lines.next().unwrap());
    for (i, line) in lines.take(600).enumerate() {
        if !removed.contains(&i) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    let csv = dir.path().join("kept.csv");
    std::fs::write(&csv, kept).unwrap();
    let reference = dir.path().join("reference");
    train(&TrainOptions {
        l2: Some(1e-3),
        ..TrainOptions::new(spec(&csv, 0, None), Architecture::LogReg, reference.clone())
    })
    .unwrap();
    let reference = culprit::workspace::Run::open(&reference).unwrap();
    let worst = purged.theta.iter().zip(&reference.theta).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-9, "purged θ differs from training without the rows by {worst:e}");
    // Before/after accuracy on the evaluation set is what predicting with each model gives.
    let device = Backend::default().device();
    let test = culprit::data::Dataset::load(
        &spec(&digits_csv(), 1297, None),
        culprit::data::Preprocessing::Reuse(&reference.manifest),
    )
    .unwrap();
    let acc = culprit::workspace::predict::accuracy(&culprit::workspace::predict::predict(
        &reference.network(&device).unwrap(),
        &test,
        64,
    ));
    assert!((report.after.as_ref().unwrap().clean_accuracy[0].1 - acc).abs() < 1e-12);
    // Without --retrain only the plan and the manifest are written; bad ids are refused.
    let plan = purge(&PurgeOptions {
        run: run.clone(),
        ids: ids.clone(),
        top: Some(2),
        out: dir.path().join("plan"),
        retrain: false,
        eval: vec![],
        attack: None,
        backend: Backend::default(),
        quiet: true,
    })
    .unwrap();
    assert_eq!(plan.removed, vec![3, 17]);
    assert!(dir.path().join("plan/manifest.json").is_file() && !dir.path().join("plan/weights.bin").exists());
    std::fs::write(&ids, "3\n600\n").unwrap();
    let e = purge(&PurgeOptions {
        run,
        ids,
        top: None,
        out: dir.path().join("bad"),
        retrain: true,
        eval: vec![],
        attack: None,
        backend: Backend::default(),
        quiet: true,
    })
    .unwrap_err();
    assert!(e.to_string().contains("cannot exclude example 600"), "{e}");
    assert!(!dir.path().join("bad").exists());
}

#[test]
fn correlations_match_their_definitions() {
    let x = [1.0, 2.0, 3.0, 4.0, 5.0];
    let y = [2.0, 4.1, 5.9, 8.2, 9.8];
    // Closed form for these five points.
    let (mx, my) = (3.0, 6.0);
    let sxy: f64 = x.iter().zip(&y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
    let syy: f64 = y.iter().map(|b| (b - my) * (b - my)).sum();
    assert!((pearson(&x, &y) - sxy / (sxx * syy).sqrt()).abs() < 1e-12);
    // Spearman is 1 for any increasing map, −1 for a decreasing one, and averages ties.
    let cubed: Vec<f64> = x.iter().map(|v| v * v * v).collect();
    assert!((spearman(&x, &cubed) - 1.0).abs() < 1e-12);
    let neg: Vec<f64> = x.iter().map(|v| -v.exp()).collect();
    assert!((spearman(&x, &neg) + 1.0).abs() < 1e-12);
    // Ranks with a tie: x = [1, 2, 2, 3] → [1, 2.5, 2.5, 4]; Pearson of those with y's ranks.
    let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]);
    let want = pearson(&[1.0, 2.5, 2.5, 4.0], &[1.0, 3.0, 2.0, 4.0]);
    assert!((r - want).abs() < 1e-12);
}

/// A logreg run on the first 1297 digits with a store and the exact and CG curvatures.
fn digits_run(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    train(&TrainOptions {
        l2: Some(1e-3),
        ..TrainOptions::new(spec(&digits_csv(), 0, Some(1297)), Architecture::LogReg, run.clone())
    })
    .unwrap();
    culprit::commands::cache::build(&culprit::commands::cache::CacheOptions::new(run.clone())).unwrap();
    for method in [Method::Exact, Method::Cg] {
        culprit::commands::fit::fit(&run, &FitOptions { method, ..FitOptions::default() }, Backend::default()).unwrap();
    }
    run
}

/// `eval loo` retrains; its actual loss changes must equal those of the fixture's independent
/// f64 implementation, and the scores must agree with them.
#[test]
fn leave_one_out_retraining_reproduces_the_fixture() {
    let Some(shared) = shared("fixtures/loo-digits-logreg/loo_change.csv") else { return };
    let dir = tempfile::tempdir().unwrap();
    let run = digits_run(dir.path());
    let text = std::fs::read_to_string(shared.join("fixtures/loo-digits-logreg/loo_change.csv")).unwrap();
    let mut truth = std::collections::BTreeMap::new();
    for line in text.lines().skip(1) {
        let v: Vec<&str> = line.split(',').collect();
        truth.insert(
            (v[0].parse::<usize>().unwrap(), 1297 + v[1].parse::<usize>().unwrap()),
            v[2].parse::<f64>().unwrap(),
        );
    }
    let mut removed: Vec<usize> = truth.keys().map(|k| k.0).collect();
    removed.dedup();
    removed.truncate(40);
    let mut queries: Vec<usize> = truth.keys().map(|k| k.1).collect();
    queries.sort_unstable();
    queries.dedup();
    let report = evaluate(
        &EvalOptions {
            tolerance: 1e-10,
            ..EvalOptions::new(run, spec(&digits_csv(), 1297, None), queries.clone(), vec![Method::Exact, Method::Cg])
        },
        &Experiment::Loo { sample: 0, remove: Some(removed.clone()) },
    )
    .unwrap();
    let scale = truth.values().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut worst = 0.0f64;
    for (k, q) in queries.iter().enumerate() {
        for (r, id) in removed.iter().enumerate() {
            worst = worst.max((report.actual[k][r] - truth[&(*id, *q)]).abs());
        }
    }
    eprintln!("leave-one-out: max difference from the fixture {worst:e} (largest change {scale:e})");
    // Both retrain to ‖∇L‖ ≤ 1e-10 (ours) and 1e-13 (fixture); measurements are f32 (7 digits).
    // Measured: 4.7e-8 against changes up to 9.0e-2.
    assert!(worst <= 1e-5 * scale, "max difference {worst:e} against changes up to {scale:e}");
    for m in &report.methods {
        eprintln!("{}: Pearson {:.4}, Spearman {:.4}", m.curvature, m.pearson, m.spearman);
        assert!(m.pearson >= 0.99, "{}: Pearson {}", m.curvature, m.pearson);
    }
}

#[test]
fn linear_datamodeling_score_of_exact_influence_on_logistic_regression() {
    let dir = tempfile::tempdir().unwrap();
    let run = digits_run(dir.path());
    let report = evaluate(
        &EvalOptions {
            tolerance: 1e-8,
            seed: 5,
            ..EvalOptions::new(
                run,
                spec(&digits_csv(), 1297, None),
                vec![1300, 1400, 1500, 1600, 1700],
                vec![Method::Exact],
            )
        },
        &Experiment::Lds { subsets: 16, fraction: 0.5, seeds: 1 },
    )
    .unwrap();
    assert_eq!(report.actual[0].len(), 16);
    let lds = report.methods[0].spearman;
    eprintln!("LDS of exact influence, logreg on digits, 16 half subsets: {lds:.3}");
    // Measured 0.958.
    assert!(lds >= 0.9, "LDS {lds}");
}

/// A patch backdoor in MNIST (1% of 3000 training images), an MLP: RelatIF on the target logit
/// with EK-FAC puts the poisons at the top of the combined ranking of ten fooled triggered inputs,
/// and purging the top 2% removes the attack while clean accuracy holds. (The same at the issue's
/// scale, 10000 images and 784-256-10, is in the closing note: recall 1.00 in the top 2%.)
#[test]
fn backdoor_poisons_in_mnist_are_traced_and_purged() {
    let Some(shared) = shared("data/mnist") else { return };
    let mnist = shared.join("data/mnist");
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name);
    let m = poison(&PoisonOptions {
        train: DataSpec { path: mnist.clone(), split: Split::Train, skip: 0, limit: Some(3000) },
        test: DataSpec { path: mnist.clone(), split: Split::Test, skip: 0, limit: Some(2000) },
        out: d("p"),
        trigger: Trigger::parse("patch:24,24,3").unwrap(),
        target: 0,
        rate: 0.01,
        label_noise: 0.0,
        seed: 1,
        completion: None,
    })
    .unwrap();
    let mlp = |data: DataSpec, out: PathBuf| {
        let options = TrainOptions {
            hidden: Some(vec![64]),
            epochs: Some(20),
            learning_rate: Some(3e-3),
            ..TrainOptions::new(data, Architecture::Mlp, out)
        };
        train(&options).unwrap()
    };
    mlp(m.train.spec(), d("run"));
    mlp(DataSpec { path: mnist.clone(), split: Split::Train, skip: 0, limit: Some(3000) }, d("unpoisoned"));
    culprit::commands::cache::build(&culprit::commands::cache::CacheOptions::new(d("run"))).unwrap();
    culprit::commands::fit::fit(
        &d("run"),
        &FitOptions { method: Method::Ekfac, ..FitOptions::default() },
        Backend::default(),
    )
    .unwrap();
    let run = culprit::workspace::Run::open(&d("run")).unwrap();
    let device = Backend::default().device();
    let triggered =
        culprit::data::Dataset::load(&m.test_triggered.spec(), culprit::data::Preprocessing::Reuse(&run.manifest))
            .unwrap();
    let fooled: Vec<usize> = culprit::workspace::predict::predict(&run.network(&device).unwrap(), &triggered, 512)
        .iter()
        .filter(|p| p.label != 0 && p.predicted == 0)
        .take(10)
        .map(|p| p.id)
        .collect();
    assert_eq!(fooled.len(), 10, "the backdoor works");
    let top = 60; // 2% of 3000
    let report = culprit::workspace::attribution::trace(&culprit::workspace::attribution::TraceOptions {
        measurement: Measurement::Logit(Target::Class(0)),
        top,
        score: culprit::query::ScoreMode::Relatif,
        ..culprit::workspace::attribution::TraceOptions::new(d("run"), m.test_triggered.spec(), fooled, Method::Ekfac)
    })
    .unwrap();
    let ranking = &report.combined.as_ref().unwrap().proponents;
    let found = ranking.iter().take(top).filter(|i| m.poisoned.binary_search(&i.train_index).is_ok()).count();
    let recall = found as f64 / m.poisoned.len() as f64;
    eprintln!("MNIST backdoor: {found} of {} poisons in the top 2%", m.poisoned.len());
    assert!(recall >= 0.95, "recall in the top 2%: {recall}");
    let trace_json = d("trace.json");
    std::fs::write(&trace_json, serde_json::to_vec(&report).unwrap()).unwrap();
    let purged = purge(&PurgeOptions {
        run: d("run"),
        ids: trace_json,
        top: Some(top),
        out: d("purged"),
        retrain: true,
        eval: vec![],
        attack: Some(d("p")),
        backend: Backend::default(),
        quiet: true,
    })
    .unwrap();
    let (before, after) = (&purged.before, purged.after.as_ref().unwrap());
    let unpoisoned = culprit::workspace::Run::open(&d("unpoisoned")).unwrap();
    let clean =
        culprit::data::Dataset::load(&m.test_clean.spec(), culprit::data::Preprocessing::Reuse(&unpoisoned.manifest))
            .unwrap();
    let reference = culprit::workspace::predict::accuracy(&culprit::workspace::predict::predict(
        &unpoisoned.network(&device).unwrap(),
        &clean,
        512,
    ));
    eprintln!(
        "attack success {:.3} → {:.3}; clean accuracy {:.4} → {:.4} (unpoisoned model {reference:.4})",
        before.attack_success_rate.unwrap(),
        after.attack_success_rate.unwrap(),
        before.clean_accuracy[0].1,
        after.clean_accuracy[0].1
    );
    assert!(before.attack_success_rate.unwrap() > 0.5);
    assert!(after.attack_success_rate.unwrap() < 0.05);
    assert!(
        (after.clean_accuracy[0].1 - reference).abs() <= 0.01,
        "clean accuracy {} vs {reference}",
        after.clean_accuracy[0].1
    );
}

/// LDS on a deep model trains every subset from scratch, `seeds` times, and averages.
#[test]
fn linear_datamodeling_score_of_a_deep_model_averages_over_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("mlp");
    let options = TrainOptions {
        hidden: Some(vec![16]),
        epochs: Some(3),
        ..TrainOptions::new(spec(&digits_csv(), 0, Some(300)), Architecture::Mlp, run.clone())
    };
    train(&options).unwrap();
    culprit::commands::cache::build(&culprit::commands::cache::CacheOptions::new(run.clone())).unwrap();
    culprit::commands::fit::fit(
        &run,
        &FitOptions { method: Method::Ekfac, ..FitOptions::default() },
        Backend::default(),
    )
    .unwrap();
    let report = evaluate(
        &EvalOptions {
            seed: 1,
            ..EvalOptions::new(run, spec(&digits_csv(), 1297, None), vec![1300, 1400, 1500], vec![Method::Ekfac])
        },
        &Experiment::Lds { subsets: 4, fraction: 0.5, seeds: 2 },
    )
    .unwrap();
    assert_eq!(report.retrains, 8, "4 subsets × 2 seeds");
    assert_eq!(report.actual[0].len(), 4);
    assert!(report.methods[0].spearman.is_finite() && report.actual.iter().flatten().all(|v| v.is_finite()));
}

/// Leave-one-out needs a unique optimum to re-optimise to: deep models are pointed to LDS
/// before any work is done.
#[test]
fn leave_one_out_on_a_deep_model_is_refused_with_a_pointer_to_lds() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("mlp");
    let options = TrainOptions {
        hidden: Some(vec![8]),
        epochs: Some(1),
        ..TrainOptions::new(spec(&digits_csv(), 0, Some(200)), Architecture::Mlp, run.clone())
    };
    train(&options).unwrap();
    let e = evaluate(
        &EvalOptions::new(run, spec(&digits_csv(), 1297, None), vec![1300], vec![Method::Ekfac]),
        &Experiment::Loo { sample: 5, remove: None },
    )
    .unwrap_err();
    assert!(e.to_string().contains("eval lds"), "{e}");
}

/// A text backdoor no issue names: 1% of 5000 SpamAssassin e-mails (spam) get a repeated rare
/// token pair and the label ham; the embedding-bag model learns it. RelatIF on the ham logit,
/// with EK-FAC over a `factors` store, puts the poisons at the top of ten fooled spam e-mails'
/// combined ranking. (Measured with 4096 buckets: 98% in the top 1%, raw influence 52%; here,
/// with 1024 buckets, 49 of 50 in the top 2%.)
#[test]
fn text_backdoor_poisons_are_traced_through_a_factored_store() {
    let Some(shared) = shared("data/spamassassin/spamassassin.jsonl.gz") else { return };
    let source = shared.join("data/spamassassin/spamassassin.jsonl.gz");
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name);
    let m = poison(&PoisonOptions {
        train: spec(&source, 0, Some(5000)),
        test: spec(&source, 5000, None),
        out: d("p"),
        trigger: Trigger::Text { words: vec!["zqxv blorf"; 25].join(" ") },
        target: 0,
        rate: 0.01,
        label_noise: 0.0,
        seed: 3,
        completion: None,
    })
    .unwrap();
    // 1024 hash buckets keep the input factor's eigendecomposition small (1024² rather than 4096²).
    let options = TrainOptions {
        epochs: Some(40),
        learning_rate: Some(3e-3),
        buckets: 1024,
        ..TrainOptions::new(m.train.spec(), Architecture::Text, d("run"))
    };
    train(&options).unwrap();
    culprit::commands::cache::build(&culprit::commands::cache::CacheOptions {
        projection: culprit::commands::cache::Projection::Spec(
            culprit::gradients::projection::ProjectionSpec::parse("factors").unwrap(),
        ),
        ..culprit::commands::cache::CacheOptions::new(d("run"))
    })
    .unwrap();
    culprit::commands::fit::fit(
        &d("run"),
        &FitOptions { method: Method::Ekfac, ..FitOptions::default() },
        Backend::default(),
    )
    .unwrap();
    let run = culprit::workspace::Run::open(&d("run")).unwrap();
    let device = Backend::default().device();
    let triggered =
        culprit::data::Dataset::load(&m.test_triggered.spec(), culprit::data::Preprocessing::Reuse(&run.manifest))
            .unwrap();
    let predictions = culprit::workspace::predict::predict(&run.network(&device).unwrap(), &triggered, 512);
    let spam: Vec<_> = predictions.iter().filter(|p| p.label != 0).collect();
    let asr = spam.iter().filter(|p| p.predicted == 0).count() as f64 / spam.len() as f64;
    assert!(asr > 0.5, "the text backdoor works: attack success {asr}");
    let fooled: Vec<usize> = spam.iter().filter(|p| p.predicted == 0).take(10).map(|p| p.id).collect();
    let report = culprit::workspace::attribution::trace(&culprit::workspace::attribution::TraceOptions {
        measurement: Measurement::Logit(Target::Class(0)),
        top: 100,
        score: culprit::query::ScoreMode::Relatif,
        ..culprit::workspace::attribution::TraceOptions::new(d("run"), m.test_triggered.spec(), fooled, Method::Ekfac)
    })
    .unwrap();
    let ranking = &report.combined.as_ref().unwrap().proponents;
    let found = ranking.iter().take(100).filter(|i| m.poisoned.binary_search(&i.train_index).is_ok()).count();
    eprintln!("text backdoor: attack success {asr:.3}; {found} of {} poisons in the top 2%", m.poisoned.len());
    assert!(found as f64 >= 0.9 * m.poisoned.len() as f64, "{found} of {} poisons in the top 2%", m.poisoned.len());
}

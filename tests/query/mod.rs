//! Query: scores against a brute-force f64 computation with an explicit inverse Hessian, against
//! actual leave-one-out retraining (fixture), and their sign by removing examples and retraining.

use culprit::workspace::kind::Classifier;
use std::path::{Path, PathBuf};

use culprit::commands::cache::CacheOptions;
use culprit::curvature::{FitOptions, Method};
use culprit::data::{DataSpec, Dataset, Preprocessing, Split};
use culprit::gradients::projection::ProjectionSpec;
use culprit::gradients::{Measurement, Target};
use culprit::store::Dtype;
use culprit::workspace::attribution::{TraceOptions, trace};
use culprit::workspace::training::{TrainOptions, train};
use culprit_models::{Architecture, Backend, Batch, Model, Silent, TrainConfig};
use faer::{Mat, Side};

use crate::common::{digits_csv, shared};

/// A logreg run on the first `rows` digits with a store and fitted curvatures.
fn logreg_run(dir: &Path, rows: usize, project: &str, methods: &[Method]) -> PathBuf {
    let out = dir.join("run");
    let options = TrainOptions {
        l2: Some(1e-3),
        ..TrainOptions::new(
            DataSpec { path: digits_csv(), split: Split::Train, skip: 0, limit: Some(rows) },
            Architecture::LogReg,
            out.clone(),
        )
    };
    train(&options).unwrap();
    culprit::commands::cache::build(&CacheOptions {
        run: out.clone(),
        store: None,
        checkpoints: false,
        projection: culprit::commands::cache::Projection::Spec(ProjectionSpec::parse(project).unwrap()),
        seed: 3,
        dtype: Dtype::F32,
        batch: 128,
        part: None,
        rows_per_shard: Some(100),
        backend: Backend::default(),
        quiet: true,
    })
    .unwrap();
    for &method in methods {
        culprit::commands::fit::fit(&out, &FitOptions { method, ..FitOptions::default() }, Backend::default()).unwrap();
    }
    out
}

fn trace_all(
    run: &Path,
    indices: Vec<usize>,
    measurement: Measurement,
    curvature: Method,
) -> culprit::report::trace::TraceReport {
    trace(&TraceOptions {
        query: culprit::workspace::attribution::QueryArgs {
            run: run.to_path_buf(),
            data: DataSpec { path: digits_csv(), split: Split::Train, skip: 1297, limit: None },
            indices,
        },
        store: None,
        checkpoints: false,
        measurement,
        curvature,
        top: 10,
        keep_all: true,
        per_layer: false,
        per_token: false,
        part: None,
        score: culprit::query::ScoreMode::Raw,
        combine: culprit::query::Combine::Sum,
        backend: Backend::default(),
    })
    .unwrap()
}

/// Softmax probabilities and the CE gradient of logreg by hand: ∂/∂θ at (x, c) is x̃ ⊗ (p − e_c).
fn hand_gradient(theta: &[f64], x: &[f32], c: usize) -> Vec<f64> {
    let (d, k) = (x.len(), 10);
    let xt: Vec<f64> = x.iter().map(|v| f64::from(*v)).chain([1.0]).collect();
    let z: Vec<f64> = (0..k).map(|j| (0..=d).map(|i| xt[i] * theta[i * k + j]).sum()).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    let mut g = vec![0.0; (d + 1) * k];
    for i in 0..=d {
        for j in 0..k {
            g[i * k + j] = xt[i] * (e[j] / s - if j == c { 1.0 } else { 0.0 });
        }
    }
    g
}

#[test]
fn every_score_equals_a_brute_force_inverse_hessian_computation() {
    let dir = tempfile::tempdir().unwrap();
    let run = logreg_run(dir.path(), 400, "none", &[Method::Exact, Method::Cg]);
    let r = culprit::workspace::Run::open(&run).unwrap();
    let (objective, _) = culprit::workspace::objective::<Classifier>(&r, Backend::default()).unwrap();
    let h = crate::curvature::hand_hessian(&objective);
    let d = h.len();
    let inverse = Mat::<f64>::from_fn(d, d, |i, j| h[i][j]).llt(Side::Lower).unwrap();
    let theta = r.theta.clone();
    let test = Dataset::load(
        &DataSpec { path: digits_csv(), split: Split::Train, skip: 1297, limit: None },
        Preprocessing::Reuse(&r.manifest),
    )
    .unwrap();
    for method in [Method::Exact, Method::Cg] {
        let report = trace_all(&run, vec![1300, 1650], Measurement::Loss(Target::Label), method);
        for (k, q) in report.queries.iter().enumerate() {
            let row = q.index - 1297;
            let x = &test.examples.features()[row * 64..(row + 1) * 64];
            let gq = hand_gradient(&theta, x, q.label as usize);
            let mut rhs = Mat::<f64>::from_fn(d, 1, |i, _| gq[i]);
            faer::linalg::solvers::Solve::solve_in_place(&inverse, rhs.as_mut());
            let n = objective.len();
            // Each score and Σⱼ|xⱼ gᵢⱼ|/n, which bounds the f32 rounding of the stored rows, the
            // query and the sum (a score with cancellation is not accurate to its own size).
            let (want, magnitude): (Vec<f64>, Vec<f64>) = (0..n)
                .map(|i| {
                    let gi = hand_gradient(
                        &theta,
                        &objective.data.features()[i * 64..(i + 1) * 64],
                        objective.data.labels()[i] as usize,
                    );
                    let terms = (0..d).map(|j| rhs[(j, 0)] * gi[j]);
                    (terms.clone().sum::<f64>() / n as f64, terms.map(f64::abs).sum::<f64>() / n as f64)
                })
                .unzip();
            let got = &report.all_scores.as_ref().unwrap()[k];
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            // 1e-6 of the largest score, or 16 f32 roundings of the score's terms.
            let allowed = |i: usize| 1e-6 * scale + 16.0 * f64::from(f32::EPSILON) * magnitude[i];
            let worst = (0..n).map(|i| (f64::from(got[i]) - want[i]).abs() / allowed(i)).fold(0.0, f64::max);
            assert!(
                worst <= 1.0,
                "{method:?} query {}: max error {worst:.2} of the allowed (scale {scale:e})",
                q.index
            );
            // Top proponents are the largest brute-force scores.
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|a, b| want[*b].total_cmp(&want[*a]));
            let top: Vec<usize> = report.proponents[k].iter().take(5).map(|i| i.train_index).collect();
            assert_eq!(top, order[..5].to_vec(), "{method:?} query {}", q.index);
        }
    }
}

/// RelatIF scores, ∇mᵀH⁻¹gᵢ / √(gᵢᵀH⁻¹gᵢ), against the explicit inverse Hessian.
#[test]
fn relatif_scores_equal_a_brute_force_computation() {
    let dir = tempfile::tempdir().unwrap();
    let run = logreg_run(dir.path(), 300, "none", &[Method::Exact]);
    let r = culprit::workspace::Run::open(&run).unwrap();
    let (objective, _) = culprit::workspace::objective::<Classifier>(&r, Backend::default()).unwrap();
    let h = crate::curvature::hand_hessian(&objective);
    let d = h.len();
    let chol = Mat::<f64>::from_fn(d, d, |i, j| h[i][j]).llt(Side::Lower).unwrap();
    let solve = |g: &[f64]| {
        let mut x = Mat::<f64>::from_fn(d, 1, |i, _| g[i]);
        faer::linalg::solvers::Solve::solve_in_place(&chol, x.as_mut());
        (0..d).map(|i| x[(i, 0)]).collect::<Vec<f64>>()
    };
    let theta = r.theta.clone();
    let n = objective.len();
    let grads: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            hand_gradient(&theta, &objective.data.features()[i * 64..(i + 1) * 64], objective.data.labels()[i] as usize)
        })
        .collect();
    let own: Vec<f64> = grads.iter().map(|g| g.iter().zip(solve(g)).map(|(a, b)| a * b).sum::<f64>()).collect();
    let test = Dataset::load(
        &DataSpec { path: digits_csv(), split: Split::Train, skip: 1297, limit: None },
        Preprocessing::Reuse(&r.manifest),
    )
    .unwrap();
    let indices = vec![1310, 1500];
    // RelatIF of the class-3 loss under the exact curvature, every score kept, top 10.
    let relatif = |run: &Path, combine, top| {
        trace(&TraceOptions {
            measurement: Measurement::Loss(Target::Class(3)),
            keep_all: true,
            score: culprit::query::ScoreMode::Relatif,
            combine,
            top,
            ..TraceOptions::new(
                run.to_path_buf(),
                DataSpec { path: digits_csv(), split: Split::Train, skip: 1297, limit: None },
                indices.clone(),
                Method::Exact,
            )
        })
        .unwrap()
    };
    let report = relatif(&run, culprit::query::Combine::Sum, 10);
    let mut sum = vec![0.0; n];
    let mut wants = Vec::new();
    for (k, q) in indices.iter().enumerate() {
        let row = q - 1297;
        let x = solve(&hand_gradient(&theta, &test.examples.features()[row * 64..(row + 1) * 64], 3));
        let want: Vec<f64> =
            (0..n).map(|i| grads[i].iter().zip(&x).map(|(a, b)| a * b).sum::<f64>() / own[i].sqrt()).collect();
        sum.iter_mut().zip(&want).for_each(|(s, w)| *s += w);
        wants.push(want.clone());
        let got = &report.all_scores.as_ref().unwrap()[k];
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).map(|(g, w)| (f64::from(*g) - w).abs()).fold(0.0, f64::max);
        assert!(worst <= 1e-5 * scale, "query {q}: max error {worst:e} vs scale {scale:e}");
    }
    // The combined ranking is the ranking of the summed scores.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|a, b| sum[*b].total_cmp(&sum[*a]));
    let combined = report.combined.as_ref().expect("two queries");
    let top: Vec<usize> = combined.proponents.iter().take(5).map(|i| i.train_index).collect();
    assert_eq!(top, order[..5].to_vec());
    // --combine strongest: each query's scores over their root mean square, then the largest
    // (proponents of a loss) and the smallest (opponents) over the queries, per example.
    let strongest = relatif(&run, culprit::query::Combine::Strongest, 6);
    assert_eq!(strongest.combine, culprit::query::Combine::Strongest);
    let factors: Vec<f64> =
        wants.iter().map(|w| 1.0 / (w.iter().map(|v| v * v).sum::<f64>() / n as f64).sqrt()).collect();
    let scaled = |i: usize| wants.iter().zip(&factors).map(move |(w, f)| w[i] * f);
    let high: Vec<f64> = (0..n).map(|i| scaled(i).fold(f64::NEG_INFINITY, f64::max)).collect();
    let low: Vec<f64> = (0..n).map(|i| scaled(i).fold(f64::INFINITY, f64::min)).collect();
    let ranked = |values: &[f64], descending: bool| {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(
            |a, b| if descending { values[*b].total_cmp(&values[*a]) } else { values[*a].total_cmp(&values[*b]) },
        );
        order
    };
    let combined = strongest.combined.as_ref().expect("two queries");
    for (listed, values, descending) in [(&combined.proponents, &high, true), (&combined.opponents, &low, false)] {
        let order = ranked(values, descending);
        let got: Vec<usize> = listed.iter().map(|i| i.train_index).collect();
        assert_eq!(got, order[..listed.len()].to_vec());
        for i in listed.iter() {
            let want = values[i.train_index];
            assert!((i.score - want).abs() <= 1e-5 * want.abs(), "example {}: {} vs {want}", i.train_index, i.score);
        }
    }
    // The per-query lists are the same as with the sum.
    assert_eq!(
        strongest.proponents[0].iter().map(|i| i.train_index).collect::<Vec<_>>(),
        report.proponents[0].iter().take(6).map(|i| i.train_index).collect::<Vec<_>>()
    );
    // The training examples' self-influence is cached beside the curvature: the next trace reads
    // it back, a corrupted cache is recomputed, and a refitted curvature is never served stale.
    assert_eq!(report.self_influence_cached, Some(false));
    let again = |run: &Path| relatif(run, culprit::query::Combine::Sum, 10);
    let cached = again(&run);
    assert_eq!(cached.self_influence_cached, Some(true));
    assert_eq!(cached.all_scores, report.all_scores);
    let cache = run.join("curvature/exact.self.bin");
    let mut bytes = std::fs::read(&cache).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&cache, bytes).unwrap();
    let recomputed = again(&run);
    assert_eq!(recomputed.self_influence_cached, Some(false));
    assert_eq!(recomputed.all_scores, report.all_scores);
    culprit::commands::fit::fit(
        &run,
        &FitOptions { method: Method::Exact, damping: 0.5, ..FitOptions::default() },
        Backend::default(),
    )
    .unwrap();
    let refitted = again(&run);
    assert_eq!(refitted.self_influence_cached, Some(false));
    assert_ne!(refitted.all_scores, report.all_scores);
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn scores_agree_with_actual_leave_one_out_retraining() {
    let Some(shared) = shared("fixtures/loo-digits-logreg/loo_change.csv") else { return };
    let dir = tempfile::tempdir().unwrap();
    let run = logreg_run(dir.path(), 1297, "none", &[Method::Exact, Method::Cg, Method::Ekfac]);
    let text = std::fs::read_to_string(shared.join("fixtures/loo-digits-logreg/loo_change.csv")).unwrap();
    let mut by_test: std::collections::BTreeMap<usize, Vec<(usize, f64)>> = Default::default();
    for line in text.lines().skip(1) {
        let v: Vec<&str> = line.split(',').collect();
        by_test.entry(v[1].parse().unwrap()).or_default().push((v[0].parse().unwrap(), v[2].parse().unwrap()));
    }
    let indices: Vec<usize> = by_test.keys().map(|t| 1297 + t).collect();
    for (method, floor) in [(Method::Exact, 0.99), (Method::Cg, 0.99), (Method::Ekfac, 0.6)] {
        let report = trace_all(&run, indices.clone(), Measurement::Loss(Target::Label), method);
        let all = report.all_scores.as_ref().unwrap();
        let mut total = 0.0;
        for (k, (_, pairs)) in by_test.iter().enumerate() {
            let predicted: Vec<f64> = pairs.iter().map(|(i, _)| f64::from(all[k][*i])).collect();
            let actual: Vec<f64> = pairs.iter().map(|(_, c)| *c).collect();
            total += pearson(&predicted, &actual);
        }
        let mean = total / by_test.len() as f64;
        eprintln!("{method:?}: mean Pearson with actual leave-one-out retraining {mean:.4}");
        assert!(mean >= floor, "{method:?}: mean Pearson {mean}");
    }
}

#[test]
fn removing_the_top_proponent_and_retraining_raises_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let rows = 500;
    let run = logreg_run(dir.path(), rows, "kron:65x10", &[Method::Exact]);
    let report = trace_all(&run, vec![1400, 1555], Measurement::Loss(Target::Predicted), Method::Exact);
    let r = culprit::workspace::Run::open(&run).unwrap();
    let data = culprit::workspace::training_data::<Classifier>(&r).unwrap();
    let device = Backend::default().autodiff_device();
    let test = Dataset::load(
        &DataSpec { path: digits_csv(), split: Split::Train, skip: 1297, limit: None },
        Preprocessing::Reuse(&r.manifest),
    )
    .unwrap();
    for (k, q) in report.queries.iter().enumerate() {
        let row = q.index - 1297;
        let loss_at = |net: &culprit_models::Network| {
            let x = test.examples.slice(row..row + 1);
            let y = culprit_models::network::one_hot(&[q.target], 10, &device, net.dtype());
            culprit_models::network::read_f64(culprit_models::network::cross_entropy(net.logits(&x), y))[0]
        };
        let base = loss_at(&r.network(&device).unwrap());
        for (influence, sign) in [(&report.proponents[k][0], 1.0), (&report.opponents[k][0], -1.0)] {
            let keep: Vec<usize> = (0..rows).filter(|&i| data.ids[i] != influence.train_index).collect();
            let examples = data.examples.gather(&keep);
            let config = r.config.model.classifier().unwrap().clone();
            // The score predicts the optimum of (1/n) Σ_{j≠i} CE + (λ/2)‖θ‖² with the same n; the
            // trainer divides by n − 1, which with λ' = λ·n/(n − 1) has exactly that minimiser.
            let l2 = r.config.training.l2 * rows as f64 / (rows - 1) as f64;
            let training = TrainConfig { tolerance: 1e-9, l2, ..r.config.training.clone() };
            let (net, _) = culprit_models::train::train(&config, &training, &examples, &device, &mut Silent).unwrap();
            let actual = loss_at(&net) - base;
            let predicted = influence.score;
            eprintln!(
                "query {}: removing {} changes the loss by {actual:e} (predicted {predicted:e})",
                q.index, influence.train_index
            );
            assert!(
                actual * sign > 0.0,
                "query {}: removing {} changed the loss by {actual:e}",
                q.index,
                influence.train_index
            );
            // First order, for the single most influential example (where the change is least
            // linear): the prediction is within a factor of 2 of what retraining shows.
            let ratio = predicted / actual;
            assert!((0.5..=2.0).contains(&ratio), "predicted {predicted:e}, actual {actual:e}");
        }
    }
}

/// Projected stores give unbiased estimates of inner products: with the identity curvature the
/// scores must track the exact ones closely. Preconditioning in θ-space and then projecting is
/// also unbiased but noisy (H⁻¹∇m is long and nearly orthogonal to most gradients), which is why
/// projected stores come with the `projected` curvature, fitted in the projected space.
#[test]
fn projected_stores_estimate_the_exact_scores() {
    let dir = tempfile::tempdir().unwrap();
    let exact_run = logreg_run(&dir.path().join("a"), 800, "none", &[Method::Exact, Method::Identity]);
    let exact = trace_all(&exact_run, vec![1350, 1600], Measurement::Loss(Target::Label), Method::Exact);
    let plain = trace_all(&exact_run, vec![1350, 1600], Measurement::Loss(Target::Label), Method::Identity);
    let column = |r: &culprit::report::trace::TraceReport, k: usize| -> Vec<f64> {
        r.all_scores.as_ref().unwrap()[k].iter().map(|v| f64::from(*v)).collect()
    };
    // Measured: jl:512 0.99, kron:40x8 0.86 (a 320-dimensional row for 650 parameters).
    for (project, floor) in [("jl:512", 0.95), ("kron:40x8", 0.75)] {
        let run = logreg_run(&dir.path().join(project.replace(':', "-")), 800, project, &[Method::Identity]);
        let report = trace_all(&run, vec![1350, 1600], Measurement::Loss(Target::Label), Method::Identity);
        for k in 0..2 {
            let r = pearson(&column(&plain, k), &column(&report, k));
            eprintln!("{project}, identity curvature: Pearson with the exact store {r:.3}");
            assert!(r >= floor, "{project}: Pearson {r}");
        }
    }
    // TRAK-style projected curvature, (1/n)ΦᵀΦ + λI in the projected space, against exact influence
    // (measured 0.87 and 0.84).
    let run = dir.path().join("jl-512").join("run");
    culprit::commands::fit::fit_with_store(
        &run,
        &FitOptions { method: Method::Projected, ..FitOptions::default() },
        Backend::default(),
        None,
        culprit::commands::fit::SelfCheck::Quick,
    )
    .unwrap();
    let report = trace_all(&run, vec![1350, 1600], Measurement::Loss(Target::Label), Method::Projected);
    for k in 0..2 {
        let r = pearson(&column(&exact, k), &column(&report, k));
        eprintln!("jl:512, projected curvature: Pearson with exact influence {r:.3}");
        assert!(r >= 0.7, "projected curvature: Pearson {r}");
    }
}

#[test]
fn html_report_embeds_every_example_as_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let run = logreg_run(dir.path(), 300, "none", &[Method::Exact]);
    let (report, queries, training) = culprit::workspace::attribution::trace_with_data::<Classifier>(&TraceOptions {
        query: culprit::workspace::attribution::QueryArgs {
            run,
            data: DataSpec { path: digits_csv(), split: Split::Train, skip: 1297, limit: None },
            indices: vec![1310],
        },
        store: None,
        checkpoints: false,
        measurement: Measurement::Loss(Target::Predicted),
        curvature: Method::Exact,
        top: 4,
        keep_all: false,
        per_layer: false,
        per_token: false,
        part: None,
        score: culprit::query::ScoreMode::Raw,
        combine: culprit::query::Combine::Sum,
        backend: Backend::default(),
    })
    .unwrap();
    let html = culprit::report::html::trace_html(&report, &queries, &training);
    let uris: Vec<&str> = html.split("data:image/png;base64,").skip(1).map(|s| s.split('"').next().unwrap()).collect();
    assert_eq!(uris.len(), 1 + report.proponents[0].len() + report.opponents[0].len());
    use base64::Engine as _;
    for uri in uris {
        let bytes = base64::engine::general_purpose::STANDARD.decode(uri).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (8, 8));
    }
    for p in &report.proponents[0] {
        assert!(html.contains(&format!("train {}", p.train_index)));
    }
}

/// The per-layer split of a score sums to the score, for exact and Kronecker stores.
#[test]
fn per_layer_scores_sum_to_the_total() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("mlp");
    train(&TrainOptions {
        hidden: Some(vec![24, 12]),
        epochs: Some(3),
        ..TrainOptions::new(
            DataSpec { path: digits_csv(), split: Split::Train, skip: 0, limit: Some(300) },
            Architecture::Mlp,
            run.clone(),
        )
    })
    .unwrap();
    for (project, store) in [("none", "g-none"), ("kron:8x4", "g-kron")] {
        culprit::commands::cache::build(&CacheOptions {
            run: run.clone(),
            store: Some(run.join(store)),
            checkpoints: false,
            projection: culprit::commands::cache::Projection::Spec(ProjectionSpec::parse(project).unwrap()),
            seed: 1,
            dtype: Dtype::F32,
            batch: 64,
            part: None,
            rows_per_shard: None,
            backend: Backend::default(),
            quiet: true,
        })
        .unwrap();
        let report = trace(&TraceOptions {
            query: culprit::workspace::attribution::QueryArgs {
                run: run.clone(),
                data: DataSpec { path: digits_csv(), split: Split::Train, skip: 1297, limit: None },
                indices: vec![1400],
            },
            store: Some(run.join(store)),
            checkpoints: false,
            measurement: Measurement::Margin(Target::Predicted),
            curvature: Method::Identity,
            top: 5,
            keep_all: false,
            per_layer: true,
            per_token: false,
            part: None,
            score: culprit::query::ScoreMode::Raw,
            combine: culprit::query::Combine::Sum,
            backend: Backend::default(),
        })
        .unwrap();
        for i in report.proponents[0].iter().chain(&report.opponents[0]) {
            let parts = i.per_layer.as_ref().expect("split by layer");
            assert_eq!(parts.iter().map(|p| p.layer.as_str()).collect::<Vec<_>>(), ["dense0", "dense1", "dense2"]);
            let sum: f64 = parts.iter().map(|p| p.score).sum();
            assert!((sum - i.score).abs() <= 1e-4 * i.score.abs(), "{project}: layers sum to {sum}, score {}", i.score);
        }
        // Margin measurement: proponents are the negative scores.
        assert_eq!(report.proponent_sign, -1);
        assert!(report.proponents[0].iter().all(|i| i.score < 0.0));
    }
}

/// A `factors` store keeps [P_inᵀã; P_outᵀδ] per layer and scores ãᵀQδ̃ without forming the
/// gradient: its scores, per-layer splits and projected curvature equal those of the `kron`
/// store with the same projection, and exact factors equal exact gradients.
#[test]
fn factored_stores_score_exactly_as_their_kronecker_products() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("mlp");
    let options = TrainOptions {
        hidden: Some(vec![24]),
        epochs: Some(5),
        ..TrainOptions::new(
            DataSpec { path: digits_csv(), split: Split::Train, skip: 0, limit: Some(500) },
            Architecture::Mlp,
            run.clone(),
        )
    };
    train(&options).unwrap();
    let cache = |project: &str| {
        let store = dir.path().join(project.replace(':', "-"));
        let report = culprit::commands::cache::build(&CacheOptions {
            store: Some(store.clone()),
            projection: culprit::commands::cache::Projection::Spec(ProjectionSpec::parse(project).unwrap()),
            seed: 3,
            rows_per_shard: Some(128),
            ..CacheOptions::new(run.clone())
        })
        .unwrap();
        (store, report.row_len)
    };
    let (kron, kron_len) = cache("kron:16x8");
    let (factors, factors_len) = cache("factors:16x8");
    let (none, _) = cache("none");
    let (exact_factors, exact_len) = cache("factors");
    // dense0: 65 inputs (with the bias) → 16, 24 outputs → 8; dense1: 25 → 16, 10 outputs → 8.
    assert_eq!((kron_len, factors_len), (16 * 8 + 16 * 8, 16 + 8 + 16 + 8));
    assert_eq!(exact_len, 65 + 24 + 25 + 10);
    culprit::commands::fit::fit(
        &run,
        &FitOptions { method: Method::Ekfac, ..FitOptions::default() },
        Backend::default(),
    )
    .unwrap();
    let trace_with = |store: &Path, method: Method| {
        trace(&TraceOptions {
            store: Some(store.to_path_buf()),
            measurement: Measurement::Loss(Target::Label),
            keep_all: true,
            per_layer: true,
            top: 5,
            ..TraceOptions::new(
                run.clone(),
                DataSpec { path: digits_csv(), split: Split::Train, skip: 1297, limit: None },
                vec![1310, 1500, 1700],
                method,
            )
        })
        .unwrap()
    };
    let same = |a: &culprit::report::trace::TraceReport, b: &culprit::report::trace::TraceReport, what: &str| {
        for (x, y) in a.all_scores.as_ref().unwrap().iter().zip(b.all_scores.as_ref().unwrap()) {
            let scale = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-4 * scale, "{what}: max difference {worst:e} of {scale:e}");
        }
        let ids = |r: &culprit::report::trace::TraceReport| -> Vec<usize> {
            r.proponents[0].iter().map(|i| i.train_index).collect()
        };
        assert_eq!(ids(a), ids(b), "{what}");
    };
    let (k, f) = (trace_with(&kron, Method::Ekfac), trace_with(&factors, Method::Ekfac));
    same(&k, &f, "factors:16x8 vs kron:16x8");
    same(&trace_with(&none, Method::Ekfac), &trace_with(&exact_factors, Method::Ekfac), "factors vs none");
    for i in &f.proponents[1] {
        let parts: f64 = i.per_layer.as_ref().unwrap().iter().map(|l| l.score).sum();
        assert!((parts - i.score).abs() <= 1e-4 * i.score.abs(), "per-layer parts {parts} vs {}", i.score);
    }
    // The projected curvature fitted on the expanded factor rows is the kron store's.
    let mut projected = Vec::new();
    for store in [&kron, &factors] {
        culprit::commands::fit::fit_with_store(
            &run,
            &FitOptions { method: Method::Projected, ..FitOptions::default() },
            Backend::default(),
            Some(store.clone()),
            culprit::commands::fit::SelfCheck::Quick,
        )
        .unwrap();
        projected.push(trace_with(store, Method::Projected));
    }
    same(&projected[0], &projected[1], "projected curvature, factors vs kron");
    // Convolutions are refused with a pointer to kron.
    let config = culprit_models::ModelConfig {
        architecture: Architecture::Cnn,
        input: culprit_models::InputShape { channels: 1, height: 28, width: 28 },
        num_classes: 10,
        hidden: Architecture::Cnn.default_hidden(),
        activation: culprit_models::Activation::Relu,
    };
    let device = Backend::default().device();
    let net = culprit_models::Network::init(&config, 0, &device, burn::tensor::DType::F32).unwrap();
    let spec = ProjectionSpec::parse("factors:8x8").unwrap();
    let e = culprit::gradients::projection::Projector::new(spec, 0, net.layers(), &device).err().expect("refused");
    assert!(e.to_string().contains("convolution") && e.to_string().contains("kron"), "{e}");
    // `--project auto` (the CLI default) stores exact factors for all-dense models, full gradients
    // for models with convolutions.
    let spec = culprit::workspace::run::ModelSpec::Classifier(config.clone());
    assert_eq!(culprit::workspace::exact_projection(&spec).unwrap(), ProjectionSpec::None);
    let mlp = culprit::workspace::Run::open(&run).unwrap();
    assert_eq!(
        culprit::workspace::exact_projection(&mlp.config.model).unwrap(),
        ProjectionSpec::parse("factors").unwrap()
    );
}

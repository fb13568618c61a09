//! Per-example gradients from layer taps against the naive one-backward-per-example loop, the
//! batch sum against the full-batch gradient, measurements against their formulas, and the
//! projections' unbiasedness.

use burn::tensor::DType;
use culprit::data::{DataSpec, Dataset, NormalizeMode, Preprocessing, Split};
use culprit::gradients::projection::{Entries, ProjectionSpec, Projector};
use culprit::gradients::{
    Measurement, Target, gradient_rows, gradient_rows_from_blocks, layer_factors, per_example_gradients,
    per_example_loop,
};
use culprit_models::{Activation, Architecture, Backend, Batch, Model, ModelConfig, Network};

use crate::common::{digits_csv, write};

fn digits(rows: usize) -> Dataset {
    Dataset::load(
        &DataSpec { path: digits_csv(), split: Split::Train, skip: 0, limit: Some(rows) },
        Preprocessing::Fit { normalize: NormalizeMode::Max, buckets: 0 },
    )
    .unwrap()
}

fn model(data: &Dataset, architecture: Architecture, hidden: Vec<usize>, activation: Activation) -> ModelConfig {
    ModelConfig { architecture, input: data.manifest.shape, num_classes: data.manifest.num_classes, hidden, activation }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// A text data set: hashed bags of words from a small JSONL file written here.
fn text_data(dir: &std::path::Path) -> Dataset {
    let mut body = String::new();
    let words = ["cheap", "meds", "meeting", "agenda", "win", "prize", "lunch", "report", "click", "notes"];
    for i in 0..40 {
        let spam = i % 2 == 0;
        let a = words[(i * 3) % 10];
        let b = words[(i * 7 + 1) % 10];
        let text = if spam { format!("{a} win prize {b} click") } else { format!("{a} meeting notes {b}") };
        body.push_str(&format!("{{\"text\": \"{text}\", \"label\": {}}}\n", u8::from(spam)));
    }
    let p = write(dir, "t.jsonl", body.as_bytes());
    Dataset::load(
        &DataSpec { path: p, split: Split::Train, skip: 0, limit: None },
        Preprocessing::Fit { normalize: NormalizeMode::Max, buckets: 64 },
    )
    .unwrap()
}

fn check_taps_match_loop(data: &Dataset, config: &ModelConfig, dtype: DType, tolerance: f64) {
    let device = Backend::default().autodiff_device();
    let net = Network::init(config, 11, &device, dtype).unwrap();
    // Non-zero weights for the convex model too (it starts at θ = 0).
    let theta: Vec<f64> = net.to_flat().iter().enumerate().map(|(i, v)| v + 0.01 * ((i % 7) as f64 - 3.0)).collect();
    let net = Network::from_flat(config, &theta, &device, dtype).unwrap();
    let b = 24;
    let features = data.examples.slice(0..b);
    for measurement in
        [Measurement::TRAINING_LOSS, Measurement::Margin(Target::Class(1)), Measurement::Logit(Target::Class(1))]
    {
        let targets = measurement.targets(&data.labels()[..b], &data.labels()[..b], config.num_classes).unwrap();
        let tapped = gradient_rows(&per_example_gradients(&net, &features, &targets, measurement));
        let naive = per_example_loop(&net, &features, &targets, measurement);
        let p = net.num_params();
        assert_eq!(tapped.len(), b * p);
        for i in 0..b {
            let e = rel_err(&tapped[i * p..(i + 1) * p], &naive[i * p..(i + 1) * p]);
            assert!(e < tolerance, "{:?} {measurement:?}: example {i} relative error {e:e}", config.architecture);
        }
    }
}

#[test]
fn tapped_gradients_equal_the_per_example_loop_for_every_reference_model() {
    let data = digits(64);
    check_taps_match_loop(&data, &model(&data, Architecture::LogReg, vec![], Activation::Relu), DType::F64, 1e-10);
    for act in [Activation::Relu, Activation::Tanh, Activation::Gelu] {
        check_taps_match_loop(&data, &model(&data, Architecture::Mlp, vec![32, 16], act), DType::F32, 1e-5);
    }
    check_taps_match_loop(&data, &model(&data, Architecture::Cnn, vec![24], Activation::Relu), DType::F32, 1e-5);
    let dir = tempfile::tempdir().unwrap();
    let text = text_data(dir.path());
    check_taps_match_loop(&text, &model(&text, Architecture::Text, vec![8], Activation::Relu), DType::F32, 1e-5);
}

#[test]
fn batch_sum_of_per_example_gradients_is_the_full_batch_gradient() {
    let data = digits(200);
    for (arch, hidden) in [(Architecture::Mlp, vec![32]), (Architecture::Cnn, vec![16])] {
        let config = model(&data, arch, hidden, Activation::Tanh);
        let device = Backend::default().autodiff_device();
        let net = Network::init(&config, 5, &device, DType::F32).unwrap();
        let rows =
            gradient_rows(&per_example_gradients(&net, &data.examples, data.labels(), Measurement::TRAINING_LOSS));
        let p = net.num_params();
        let l2 = 0.01;
        let (_, full, _) = culprit_models::train::full_objective(&net, data.examples(), l2, 64);
        let theta = net.to_flat();
        let n = data.len() as f64;
        let summed: Vec<f32> = (0..p)
            .map(|j| ((0..data.len()).map(|i| f64::from(rows[i * p + j])).sum::<f64>() / n + l2 * theta[j]) as f32)
            .collect();
        let full: Vec<f32> = full.iter().map(|v| *v as f32).collect();
        let e = rel_err(&summed, &full);
        assert!(e < 1e-5, "{arch:?}: relative error {e:e}");
    }
}

#[test]
fn measurements_match_their_formulas() {
    let device = Backend::default().device();
    let z = vec![1.0f32, -0.5, 2.0, 0.25, 0.0, 3.0];
    let logits = culprit_models::network::input_batch(&z, 3, &device, DType::F64);
    let loss = culprit::gradients::read_f32(Measurement::Loss(Target::Class(2)).values(logits.clone(), &[2, 0]));
    let margin = culprit::gradients::read_f32(Measurement::Margin(Target::Class(2)).values(logits.clone(), &[2, 0]));
    let logit = culprit::gradients::read_f32(Measurement::Logit(Target::Class(2)).values(logits, &[2, 0]));
    assert_eq!(logit, vec![2.0, 0.25]);
    let lse = |v: &[f64]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
    let (a, b) = ([1.0, -0.5, 2.0], [0.25, 0.0, 3.0]);
    assert!((f64::from(loss[0]) - (lse(&a) - 2.0)).abs() < 1e-6);
    assert!((f64::from(loss[1]) - (lse(&b) - 0.25)).abs() < 1e-6);
    assert!((f64::from(margin[0]) - (2.0 - lse(&[1.0, -0.5]))).abs() < 1e-6);
    assert!((f64::from(margin[1]) - (0.25 - lse(&[0.0, 3.0]))).abs() < 1e-6);
    assert_eq!(Measurement::parse("margin").unwrap(), Measurement::Margin(Target::Predicted));
    assert_eq!(Measurement::parse("class:3").unwrap(), Measurement::Loss(Target::Class(3)));
    assert!(Measurement::parse("class:x").is_err());
    assert_eq!(Measurement::parse("logit:7").unwrap(), Measurement::Logit(Target::Class(7)));
    assert_eq!(Measurement::parse("logit").unwrap().proponent_sign(), -1);
    assert_eq!(Measurement::parse("label").unwrap().proponent_sign(), 1);
}

#[test]
fn kron_projection_with_full_dimensions_is_the_exact_gradient_rearranged() {
    let data = digits(16);
    let config = model(&data, Architecture::Mlp, vec![12], Activation::Relu);
    let device = Backend::default().autodiff_device();
    let net = Network::init(&config, 2, &device, DType::F32).unwrap();
    let factors = layer_factors(&net, &data.examples, data.labels(), Measurement::TRAINING_LOSS);
    let exact = gradient_rows(&per_example_gradients(&net, &data.examples, data.labels(), Measurement::TRAINING_LOSS));
    let kron = Projector::new(ProjectionSpec::Kron { k_in: 1000, k_out: 1000 }, 0, net.layers(), &device).unwrap();
    let rows = gradient_rows_from_blocks(kron.project(&factors));
    assert_eq!(kron.row_len(), net.num_params());
    let p = net.num_params();
    // Each layer's exact block is W [in, out] then b [out]; the Kronecker block is [in + 1, out]
    // with the bias as the last input row: the same numbers in the same order.
    let e = rel_err(&rows, &exact);
    assert!(e < 1e-6, "relative error {e:e}");
    assert_eq!(rows.len(), 16 * p);
}

/// Mean and standard error of projected inner products over many seeds must bracket the exact
/// inner product: the projections are unbiased.
#[test]
fn projected_inner_products_are_unbiased() {
    let data = digits(4);
    let config = model(&data, Architecture::Mlp, vec![10], Activation::Tanh);
    let device = Backend::default().autodiff_device();
    let net = Network::init(&config, 9, &device, DType::F32).unwrap();
    let factors = layer_factors(&net, &data.examples, data.labels(), Measurement::TRAINING_LOSS);
    let exact = gradient_rows(&per_example_gradients(&net, &data.examples, data.labels(), Measurement::TRAINING_LOSS));
    let p = net.num_params();
    let dot = |r: &[f32], i: usize, j: usize, len: usize| -> f64 {
        (0..len).map(|k| f64::from(r[i * len + k]) * f64::from(r[j * len + k])).sum()
    };
    let target = dot(&exact, 0, 1, p);
    for spec in [
        ProjectionSpec::Jl { dim: 16, entries: Entries::Gaussian },
        ProjectionSpec::Jl { dim: 16, entries: Entries::Rademacher },
        ProjectionSpec::Kron { k_in: 4, k_out: 4 },
    ] {
        let samples: Vec<f64> = (0..300)
            .map(|seed| {
                let proj = Projector::new(spec, seed, net.layers(), &device).unwrap();
                let rows = gradient_rows_from_blocks(proj.project(&factors));
                dot(&rows, 0, 1, proj.row_len())
            })
            .collect();
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let sd = (samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let se = sd / n.sqrt();
        // 4.5 standard errors: a false failure has probability < 1e-5.
        assert!((mean - target).abs() < 4.5 * se, "{spec}: mean {mean} ± {se} vs exact {target}");
        assert!(sd > 0.0);
    }
}

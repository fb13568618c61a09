//! The GPT-2 model against PyTorch: `../shared/fixtures/gpt2-tiny-bytes` is a Hugging Face
//! checkpoint written by PyTorch with its own per-token log-probabilities and exact per-sequence
//! gradients (float64). Imported through the safetensors reader, culprit's GPT must reproduce them:
//! log-probabilities to 1e-4 absolute, gradients to 1e-3 relative, and the tapped per-document
//! gradients of a padded batch must equal each sequence's own gradient.

use burn::tensor::DType;
use culprit::gradients::{Measurement, gradient_rows_f64, per_example_gradients};
use culprit_models::{Backend, Batch, Gpt, Model, Tokens};

use crate::common::shared;

struct Reference {
    ids: Vec<u32>,
    logprobs: Vec<f64>,
    loss: f64,
    logits_last: Vec<f64>,
    norm: f64,
    gradients: Vec<(String, Vec<f64>)>,
}

fn reference(dir: &std::path::Path) -> Vec<Reference> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let floats =
        |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>();
    json["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Reference {
            ids: s["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            logprobs: floats(&s["next_token_logprobs"]),
            loss: s["summed_loss"].as_f64().unwrap(),
            logits_last: floats(&s["logits_last"]),
            norm: s["gradient_norm_all_parameters"].as_f64().unwrap(),
            gradients: s["gradients"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(name, g)| (name.clone(), floats(&g["values"])))
                .collect(),
        })
        .collect()
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn gpt2_matches_pytorch_log_probabilities_and_gradients() {
    let Some(shared) = shared("fixtures/gpt2-tiny-bytes") else { return };
    let dir = shared.join("fixtures/gpt2-tiny-bytes");
    let (config, theta) = culprit_models::hf::import_gpt(&dir).unwrap();
    assert_eq!(theta.len(), 35_712);
    let device = Backend::default().autodiff_device();
    let gpt = Gpt::from_flat(&config, &theta, &device, DType::F64).unwrap();
    let offsets: std::collections::HashMap<String, (usize, usize)> = {
        let mut at = 0;
        config
            .tensors()
            .into_iter()
            .map(|(name, shape)| {
                let len: usize = shape.iter().product();
                at += len;
                (name, (at - len, len))
            })
            .collect()
    };
    let references = reference(&dir);
    for r in &references {
        let batch = Tokens::new(vec![r.ids.clone()]);
        let all = gpt.forward_all(&batch, &mut None);
        let logp = culprit_models::network::read_f64(burn::tensor::activation::log_softmax(all, 2));
        let v = config.vocab;
        let t = r.ids.len();
        for k in 0..t - 1 {
            let got = logp[k * v + r.ids[k + 1] as usize];
            assert!((got - r.logprobs[k]).abs() < 1e-4, "position {k}: {got} vs {}", r.logprobs[k]);
        }
        let last = culprit_models::network::read_f64(gpt.forward_all(&batch, &mut None));
        let e = rel(&last[(t - 1) * v..t * v], &r.logits_last);
        assert!(e < 1e-6, "last logits relative error {e:e}");
        // The full gradient of the summed loss.
        let net = gpt.clone().require_grad();
        let labels = batch.labels().into_owned();
        let loss = Measurement::TRAINING_LOSS.values(net.logits(&batch), &labels).sum();
        assert!((loss.clone().into_scalar::<f64>() - r.loss).abs() < 1e-4 * r.loss);
        let g = net.gradient_flat(&loss.backward());
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - r.norm).abs() < 1e-3 * r.norm, "‖∇θ‖ {norm} vs {}", r.norm);
        for (name, want) in &r.gradients {
            let (at, len) = offsets[name];
            let e = rel(&g[at..at + len], want);
            assert!(e < 1e-3, "{name}: relative error {e:e}");
        }
    }
    // Taps: one padded batch of the three sequences, each document's gradient its own.
    let batch = Tokens::new(references.iter().map(|r| r.ids.clone()).collect());
    let labels = batch.labels().into_owned();
    let blocks = per_example_gradients(&gpt, &batch, &labels, Measurement::TRAINING_LOSS);
    let rows = gradient_rows_f64(&blocks);
    let d = culprit_models::model::tracked_len(gpt.layers());
    let c_attn = &gpt.layers()[0];
    assert_eq!(c_attn.name, "h.0.attn.c_attn");
    let mlp_proj = &gpt.layers()[7];
    assert_eq!(mlp_proj.name, "h.1.mlp.c_proj");
    let tracked_offset = |layer: &culprit_models::TrackedLayer| -> usize {
        gpt.layers().iter().take_while(|l| l.name != layer.name).map(|l| l.num_params()).sum()
    };
    for (i, r) in references.iter().enumerate() {
        let row = &rows[i * d..(i + 1) * d];
        for (layer, name) in
            [(c_attn, "transformer.h.0.attn.c_attn.weight"), (mlp_proj, "transformer.h.1.mlp.c_proj.weight")]
        {
            let want = &r.gradients.iter().find(|(n, _)| n == name).unwrap().1;
            let at = tracked_offset(layer);
            let e = rel(&row[at..at + layer.weight_len()], want);
            assert!(e < 1e-3, "document {i}, {name} by taps: relative error {e:e}");
        }
    }
}
mod checkpoints;
mod errors;
pub(crate) mod pipeline;

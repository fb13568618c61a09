//! Step 1 of the pipeline: exact per-example gradients, batched, from layer taps.
//!
//! For a tracked layer applied at positions l = 1..L of example i (L = 1 for a dense layer; the
//! output pixels of a convolution; the tokens of a sequence), with inputs ãᵢₗ (`[a; 1]` with a
//! bias) and output gradients δᵢₗ = ∂mᵢ/∂zᵢₗ, the gradient of example i's measurement mᵢ in the
//! layer's Kronecker view is
//!
//! ∇_W̃ mᵢ = Σₗ ãᵢₗ δᵢₗᵀ   (dense: aᵢ δᵢᵀ and δᵢ for the bias; a convolution: Δᵢ Uᵢᵀ, Δᵢ 1).
//!
//! One tapped forward and one backward of Σᵢ mᵢ give every δᵢ of every layer
//! ([`culprit_models::LayerTap`]); never one backward per example. Cost per batch of B: one
//! forward and backward plus B·m·o·L multiply-adds per layer for the gradients themselves.
//!
//! Which gradient: for training examples the training loss (cross-entropy against the label);
//! for queries a chosen [`Measurement`] of one output. The L2 term of the objective is not part of
//! a per-example gradient: ∇ℓ(zᵢ) here is the gradient of CE alone, as in Koh & Liang (2017).

pub mod projection;

use std::str::FromStr;

use burn::tensor::{Gradients, Tensor};
use culprit_models::elementary::{exp, log, log_softmax};
use culprit_models::model::{Batch, LayerTap, Model, TrackedLayer, WeightLayout};
use culprit_models::network::one_hot;

use crate::error::{Error, Result};

pub use culprit_models::model::{read_f32, read_f64};

/// Which class a measurement refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "class")]
pub enum Target {
    /// The example's label.
    Label,
    /// The class the model predicts (arg-max logit).
    Predicted,
    /// A given class.
    Class(u32),
}

/// A scalar function m(z) of one example's logits z, whose gradient is attributed. For a model
/// with several prediction rows per example (a language model's tokens), m is the sum over the
/// example's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "measure", content = "target")]
pub enum Measurement {
    /// Cross-entropy against the target class c: m = −log softmax(z)_c.
    Loss(Target),
    /// Margin of the target class c: m = z_c − log Σ_{k≠c} exp(z_k).
    Margin(Target),
    /// The raw logit of the target class c: m = z_c. For backdoors, the best measurement: the
    /// poisons raise the target logit of triggered inputs directly, while the loss's gradient is
    /// scaled by (1 − p_c), which vanishes once the attack succeeds.
    Logit(Target),
    /// The log-probability of the target: m = log softmax(z)_c = −loss. For a language model's
    /// query with target the label, summed over the completion's tokens: the completion's
    /// log-probability given the prompt (`--measure completion`).
    LogProbability(Target),
}

impl FromStr for Measurement {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Self::parse(text)
    }
}

impl std::fmt::Display for Measurement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, target) = match self {
            Self::Loss(t) => ("class", t),
            Self::Margin(t) => ("margin", t),
            Self::Logit(t) => ("logit", t),
            Self::LogProbability(t) => ("logprob", t),
        };
        match (kind, target) {
            ("class", Target::Predicted) => f.write_str("predicted"),
            ("class", Target::Label) => f.write_str("label"),
            ("logprob", Target::Label) => f.write_str("completion"),
            (k, Target::Predicted) => f.write_str(k),
            (k, Target::Label) => write!(f, "{k}:label"),
            (k, Target::Class(c)) => write!(f, "{k}:{c}"),
        }
    }
}

impl Measurement {
    /// The training loss: cross-entropy against the label.
    pub const TRAINING_LOSS: Self = Self::Loss(Target::Label);

    /// Parses the CLI form: `predicted`, `label`, `class:C` (losses), `margin` (of the predicted
    /// class), `margin:label`, `margin:C`, `logit`, `logit:label`, `logit:C`, `logprob`,
    /// `logprob:label`, `logprob:C` likewise, and `completion` (= `logprob:label`: a language
    /// model's completion given its prompt).
    pub fn parse(text: &str) -> Result<Self> {
        let target = |t: &str| -> Result<Target> {
            match t {
                "predicted" => Ok(Target::Predicted),
                "label" => Ok(Target::Label),
                c => c.parse().map(Target::Class).map_err(|_| {
                    Error::Usage(format!("unknown measurement target `{c}` (predicted, label or a class)"))
                }),
            }
        };
        match text.split_once(':') {
            None if text == "margin" => Ok(Self::Margin(Target::Predicted)),
            None if text == "logit" => Ok(Self::Logit(Target::Predicted)),
            None if text == "logprob" => Ok(Self::LogProbability(Target::Predicted)),
            None if text == "completion" => Ok(Self::LogProbability(Target::Label)),
            None => Ok(Self::Loss(target(text)?)),
            Some(("class", c)) => Ok(Self::Loss(target(c)?)),
            Some(("margin", c)) => Ok(Self::Margin(target(c)?)),
            Some(("logit", c)) => Ok(Self::Logit(target(c)?)),
            Some(("logprob", c)) => Ok(Self::LogProbability(target(c)?)),
            Some(_) => Err(Error::Usage(format!(
                "unknown measurement `{text}` (expected predicted, label, class:C, margin[:C], logit[:C], logprob[:C] or completion)"
            ))),
        }
    }

    /// The target class of each prediction row given its labels and predicted classes.
    pub fn targets(&self, labels: &[u32], predicted: &[u32], classes: usize) -> Result<Vec<u32>> {
        let target = match self {
            Self::Loss(t) | Self::Margin(t) | Self::Logit(t) | Self::LogProbability(t) => *t,
        };
        match target {
            Target::Label => Ok(labels.to_vec()),
            Target::Predicted => Ok(predicted.to_vec()),
            Target::Class(c) if (c as usize) < classes => Ok(vec![c; labels.len()]),
            Target::Class(c) => Err(Error::Usage(format!("class {c} does not exist: the model has {classes} classes"))),
        }
    }

    /// Per-row values `[rows]` of the measurement for logits `[rows, classes]`.
    pub fn values(&self, logits: Tensor<2>, targets: &[u32]) -> Tensor<1> {
        let [b, c] = logits.dims();
        let selector = one_hot(targets, c, &logits.device(), logits.dtype());
        match self {
            Self::Loss(_) => (log_softmax(logits, 1) * selector).sum_dim(1).reshape([b]).neg(),
            Self::Margin(_) => {
                let chosen = (logits.clone() * selector.clone()).sum_dim(1);
                // Push the chosen class far below the others so it drops out of the log-sum-exp.
                let others = logits - selector.mul_scalar(1e30);
                let max = others.clone().max_dim(1).detach();
                let lse = log(exp(others - max.clone()).sum_dim(1)) + max;
                (chosen - lse).reshape([b])
            }
            Self::Logit(_) => (logits * selector).sum_dim(1).reshape([b]),
            Self::LogProbability(_) => (log_softmax(logits, 1) * selector).sum_dim(1).reshape([b]),
        }
    }

    /// +1 if removing a proponent of the target class raises m (a loss), −1 if it lowers m (a
    /// margin, a logit, a log-probability): the sign of a proponent's score.
    pub fn proponent_sign(&self) -> i8 {
        match self {
            Self::Loss(_) => 1,
            Self::Margin(_) | Self::Logit(_) | Self::LogProbability(_) => -1,
        }
    }
}

/// Per-example gradient blocks of one layer, on the device.
#[derive(Clone, Debug)]
pub struct LayerGradient {
    /// `[batch, weight_len]`, in the weight's θ layout.
    pub weight: Tensor<2>,
    /// `[batch, bias_len]`, if the layer has a bias.
    pub bias: Option<Tensor<2>>,
}

/// A layer's per-example factors: inputs `[batch, inputs, L]` and output gradients
/// `[batch, outputs, L]` at the layer's L positions.
#[derive(Clone, Debug)]
pub struct LayerFactors {
    /// aᵢ, `[batch, in, L]`.
    pub input: Tensor<3>,
    /// δᵢ, `[batch, out, L]`.
    pub output_grad: Tensor<3>,
    /// Whether the layer has a bias (a constant-1 input row in the Kronecker view).
    pub bias: bool,
    /// `[batch, L]`: 1 at real positions, 0 at padding; `None` when every position is real.
    pub mask: Option<Tensor<2>>,
}

impl LayerFactors {
    /// The inputs with the bias's constant 1 appended (1 at real positions, 0 at padding),
    /// `[batch, L, m]`: the rows ã whose outer products the Kronecker factor A averages.
    pub fn augmented_inputs(&self) -> Tensor<3> {
        let a = self.input.clone().swap_dims(1, 2);
        if !self.bias {
            return a;
        }
        let [b, l, _] = a.dims();
        let ones = match &self.mask {
            Some(mask) => mask.clone().reshape([b, l, 1]),
            None => Tensor::ones([b, l, 1], (&a.device(), a.dtype())),
        };
        let dtype = a.dtype();
        Tensor::cat(vec![a, ones.cast(dtype)], 2)
    }

    /// The number of real positions in the batch (b·L without padding).
    pub fn positions(&self) -> f64 {
        let [b, _, l] = self.input.dims();
        match &self.mask {
            Some(mask) => mask.clone().sum().into_scalar::<f64>(),
            None => (b * l) as f64,
        }
    }

    /// The exact per-example gradient blocks: ∇_W = Σ_l a δᵀ in the weight's layout, ∇_b = Σ_l δ.
    /// Cost: B·in·out·L multiply-adds.
    pub fn gradient(&self, layer: &TrackedLayer) -> LayerGradient {
        let [b, o, _] = self.output_grad.dims();
        let weight = match layer.layout {
            WeightLayout::InputMajor => self.input.clone().matmul(self.output_grad.clone().swap_dims(1, 2)),
            WeightLayout::OutputMajor => self.output_grad.clone().matmul(self.input.clone().swap_dims(1, 2)),
        };
        let [_, r, c] = weight.dims();
        LayerGradient {
            weight: weight.reshape([b, r * c]),
            bias: self.bias.then(|| self.output_grad.clone().sum_dim(2).reshape([b, o])),
        }
    }
}

/// Runs one tapped forward and one backward of Σ mᵢ for a batch and returns every tracked
/// layer's factors. `targets` is the target class of each prediction row (see
/// [`Measurement::targets`]); the model must be on an autodiff device.
pub fn layer_factors<M: Model>(
    model: &M,
    batch: &M::Batch,
    targets: &[u32],
    measurement: Measurement,
) -> Vec<LayerFactors> {
    let (logits, taps) = model.forward(batch, true);
    let grads = measurement.values(logits, targets).sum().backward();
    factors_from_taps(model, &taps, &grads)
}

/// [`layer_factors`] with the targets chosen from the forward pass's own logits (`choose` sees
/// them detached, `rows × classes`): one forward instead of two when the targets depend on the
/// model's prediction, as labels sampled from it do (the true Fisher's samples).
pub fn layer_factors_choosing<M: Model>(
    model: &M,
    batch: &M::Batch,
    choose: impl FnOnce(Tensor<2>) -> Vec<u32>,
    measurement: Measurement,
) -> Vec<LayerFactors> {
    let (logits, taps) = model.forward(batch, true);
    let targets = choose(logits.clone().detach());
    let grads = measurement.values(logits, &targets).sum().backward();
    factors_from_taps(model, &taps, &grads)
}

/// Turns the taps of a forward pass and the gradients of a backward pass into layer factors.
pub fn factors_from_taps<M: Model>(model: &M, taps: &[LayerTap], grads: &Gradients) -> Vec<LayerFactors> {
    model
        .layers()
        .iter()
        .zip(taps)
        .map(|(layer, tap)| {
            // A layer the measurement does not reach has zero output gradients.
            let output_grad = tap.output_gradient(grads).unwrap_or_else(|| tap.probe.clone().detach());
            LayerFactors { input: tap.input.clone(), output_grad, bias: layer.bias, mask: tap.mask.clone() }
        })
        .collect()
}

/// Exact per-example gradients of a batch, one [`LayerGradient`] per tracked layer.
pub fn per_example_gradients<M: Model>(
    model: &M,
    batch: &M::Batch,
    targets: &[u32],
    measurement: Measurement,
) -> Vec<LayerGradient> {
    layer_factors(model, batch, targets, measurement)
        .iter()
        .zip(model.layers())
        .map(|(f, layer)| f.gradient(layer))
        .collect()
}

/// Per-example gradients as host rows: `batch × tracked parameters`, each row ∇θ mᵢ in
/// tracked-space order.
pub fn gradient_rows(blocks: &[LayerGradient]) -> Vec<f32> {
    gradient_rows_from_blocks(
        blocks.iter().flat_map(|b| std::iter::once(b.weight.clone()).chain(b.bias.clone())).collect(),
    )
}

/// Interleaves `[batch, width]` blocks into host rows `batch × Σ width` (blocks side by side).
/// Blocks are read separately and joined on the host: joining wide tensors on the device is slow.
pub fn gradient_rows_from_blocks(blocks: Vec<Tensor<2>>) -> Vec<f32> {
    let batch = blocks[0].dims()[0];
    interleave(blocks.into_iter().map(|t| (t.dims()[1], read_f32(t))).collect(), batch)
}

/// Per-example gradient rows in f64 (θ order), for the curvature and query steps, which work in
/// f64.
pub fn gradient_rows_f64(blocks: &[LayerGradient]) -> Vec<f64> {
    let batch = blocks[0].weight.dims()[0];
    let parts = blocks
        .iter()
        .flat_map(|b| std::iter::once(b.weight.clone()).chain(b.bias.clone()))
        .map(|t| (t.dims()[1], read_f64(t)))
        .collect();
    interleave(parts, batch)
}

/// Places `(width, values)` blocks of `batch` rows side by side: row i is the concatenation of
/// every block's row i.
fn interleave<T: Copy + Default>(parts: Vec<(usize, Vec<T>)>, batch: usize) -> Vec<T> {
    let row_len: usize = parts.iter().map(|p| p.0).sum();
    let mut rows = vec![T::default(); batch * row_len];
    let mut offset = 0;
    for (width, values) in &parts {
        for (row, block) in rows.chunks_mut(row_len).zip(values.chunks(*width)) {
            row[offset..offset + width].copy_from_slice(block);
        }
        offset += width;
    }
    rows
}

/// One layer's contribution to exact host rows.
enum HostBlock {
    /// A layer at one position with an `[inputs, outputs]` weight: the outer products aᵢ ⊗ δᵢ
    /// (and δᵢ for the bias) are formed on the host.
    Outer { input: Vec<f32>, output_grad: Vec<f32>, inputs: usize, outputs: usize, bias: bool },
    /// Blocks computed on the device (sums over positions, other layouts), `[batch, width]` each.
    Computed(Vec<(Vec<f32>, usize)>),
}

impl HostBlock {
    fn new(f: &LayerFactors, layer: &TrackedLayer) -> Self {
        if f.input.dims()[2] == 1 && layer.layout == WeightLayout::InputMajor {
            return Self::Outer {
                input: read_f32(f.input.clone()),
                output_grad: read_f32(f.output_grad.clone()),
                inputs: layer.inputs,
                outputs: layer.outputs,
                bias: layer.bias,
            };
        }
        let g = f.gradient(layer);
        Self::Computed(
            std::iter::once(g.weight)
                .chain(g.bias)
                .map(|t| {
                    let width = t.dims()[1];
                    (read_f32(t), width)
                })
                .collect(),
        )
    }

    /// Writes example `i`'s part of the row into `row`; returns its length.
    fn write(&self, i: usize, row: &mut [f32]) -> usize {
        match self {
            Self::Outer { input, output_grad, inputs, outputs, bias } => {
                let a = &input[i * inputs..(i + 1) * inputs];
                let d = &output_grad[i * outputs..(i + 1) * outputs];
                for (dst, &aj) in row[..inputs * outputs].chunks_exact_mut(*outputs).zip(a) {
                    if aj != 0.0 {
                        dst.iter_mut().zip(d).for_each(|(x, &dk)| *x = aj * dk);
                    }
                }
                if *bias {
                    row[inputs * outputs..inputs * outputs + outputs].copy_from_slice(d);
                }
                inputs * outputs + if *bias { *outputs } else { 0 }
            }
            Self::Computed(parts) => {
                let mut offset = 0;
                for (values, width) in parts {
                    row[offset..offset + width].copy_from_slice(&values[i * width..(i + 1) * width]);
                    offset += width;
                }
                offset
            }
        }
    }
}

/// Exact per-example gradient rows (`batch × tracked parameters`) from a batch's factors.
///
/// Dense layers' outer products are written straight into the rows on the host, in parallel
/// over examples (rayon): the rows are the output, so this is one pass over memory, where forming
/// `[batch, in, out]` on the device and copying it out would be three. Sums over positions
/// (convolutions, sequences) are computed on the device. Cost: B·#θ multiplies and writes.
pub fn exact_rows(factors: &[LayerFactors], layers: &[TrackedLayer]) -> Vec<f32> {
    use rayon::prelude::*;
    let batch = factors[0].input.dims()[0];
    let blocks: Vec<HostBlock> = factors.iter().zip(layers).map(|(f, l)| HostBlock::new(f, l)).collect();
    let row_len = culprit_models::model::tracked_len(layers);
    let mut rows = vec![0.0f32; batch * row_len];
    rows.par_chunks_mut(row_len).enumerate().for_each(|(i, row)| {
        let mut offset = 0;
        for block in &blocks {
            offset += block.write(i, &mut row[offset..]);
        }
    });
    rows
}

/// The baseline the taps replace: one forward and backward per example, reading ∇θ mᵢ from the
/// parameters (tracked coordinates). Returns `batch × tracked parameters` rows. For tests and
/// benchmarks only: it costs B backward passes where the taps need one.
pub fn per_example_loop<M: Model>(model: &M, batch: &M::Batch, targets: &[u32], measurement: Measurement) -> Vec<f32> {
    let net = model.clone().require_grad();
    let layers = net.layers().to_vec();
    let mut rows = Vec::with_capacity(targets.len() * culprit_models::model::tracked_len(&layers));
    let mut row = 0;
    for i in 0..batch.len() {
        let one = batch.slice(i..i + 1);
        let count = one.labels().len();
        let logits = net.logits(&one);
        let grads = measurement.values(logits, &targets[row..row + count]).sum().backward();
        row += count;
        let tracked = culprit_models::model::restrict(&layers, &net.gradient_flat(&grads));
        rows.extend(tracked.into_iter().map(|v| v as f32));
    }
    rows
}

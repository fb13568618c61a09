//! Step 1 of the pipeline: exact per-example gradients, batched, from layer taps.
//!
//! For a dense layer z = a W + b the gradient of example i's measurement mᵢ is
//!
//! ∇_W mᵢ = aᵢ δᵢᵀ,  ∇_b mᵢ = δᵢ,  with δᵢ = ∂mᵢ/∂zᵢ,
//!
//! and for a convolution, with Uᵢ the unfolded input patches (`[C·k·k, L]`, L output positions)
//! and Δᵢ the output gradients (`[O, L]`): ∇_W mᵢ = Δᵢ Uᵢᵀ, ∇_b mᵢ = Δᵢ 1. One forward with
//! zero probes on every layer output and one backward of Σᵢ mᵢ give every δᵢ of every layer
//! ([`culprit_models::LayerTap`]); never one backward per example. Cost per batch of B: one
//! forward and backward plus, per dense layer, B·I·O multiply-adds for the outer products (the
//! size of the gradients themselves); a convolution adds B·O·C·k²·L.
//!
//! Which gradient: for training examples the training loss (cross-entropy against the label);
//! for queries a chosen [`Measurement`] of one output. The L2 term of the objective is not part of
//! a per-example gradient: ∇ℓ(zᵢ) here is the gradient of CE alone, as in Koh & Liang (2017).

pub mod projection;

use burn::tensor::activation::log_softmax;
use burn::tensor::module::unfold4d;
use burn::tensor::ops::UnfoldOptions;
use burn::tensor::{Device, Tensor};
use culprit_models::network::{input_batch, one_hot};
use culprit_models::{Activations, LayerKind, Network};

use crate::error::{Error, Result};

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

/// A scalar function m(z) of one example's logits z, whose gradient is attributed.
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
}

impl Measurement {
    /// The training loss: cross-entropy against the label.
    pub const TRAINING_LOSS: Self = Self::Loss(Target::Label);

    /// Parses the CLI form: `predicted`, `label`, `class:C` (losses), `margin` (of the predicted
    /// class), `margin:label`, `margin:C`, and `logit`, `logit:label`, `logit:C` likewise.
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
            None => Ok(Self::Loss(target(text)?)),
            Some(("class", c)) => Ok(Self::Loss(target(c)?)),
            Some(("margin", c)) => Ok(Self::Margin(target(c)?)),
            Some(("logit", c)) => Ok(Self::Logit(target(c)?)),
            Some(_) => Err(Error::Usage(format!(
                "unknown measurement `{text}` (expected predicted, label, class:C, margin[:C] or logit[:C])"
            ))),
        }
    }

    /// The target class of each example given its labels and predicted classes.
    pub fn targets(&self, labels: &[u32], predicted: &[u32], classes: usize) -> Result<Vec<u32>> {
        let target = match self {
            Self::Loss(t) | Self::Margin(t) | Self::Logit(t) => *t,
        };
        match target {
            Target::Label => Ok(labels.to_vec()),
            Target::Predicted => Ok(predicted.to_vec()),
            Target::Class(c) if (c as usize) < classes => Ok(vec![c; labels.len()]),
            Target::Class(c) => Err(Error::Usage(format!("class {c} does not exist: the model has {classes} classes"))),
        }
    }

    /// Per-example values `[batch]` of the measurement for logits `[batch, classes]`.
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
                let lse = (others - max.clone()).exp().sum_dim(1).log() + max;
                (chosen - lse).reshape([b])
            }
            Self::Logit(_) => (logits * selector).sum_dim(1).reshape([b]),
        }
    }

    /// +1 if removing a proponent of the target class raises m (a loss), −1 if it lowers m (a
    /// margin or a logit): the sign of a proponent's score.
    pub fn proponent_sign(&self) -> i8 {
        match self {
            Self::Loss(_) => 1,
            Self::Margin(_) | Self::Logit(_) => -1,
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

/// A layer's per-example factors: inputs and output gradients. For convolutions the input is
/// unfolded into patches `[batch, C·k·k, L]` and the output gradient is `[batch, O, L]`; for dense
/// layers L = 1.
#[derive(Clone, Debug)]
pub struct LayerFactors {
    /// aᵢ, `[batch, in, L]`.
    pub input: Tensor<3>,
    /// δᵢ, `[batch, out, L]`.
    pub output_grad: Tensor<3>,
    /// Whether the layer has a bias (a constant-1 input row in the Kronecker view).
    pub bias: bool,
}

impl LayerFactors {
    /// The exact per-example gradient blocks: ∇_W = δ aᵀ summed over positions, ∇_b = δ 1.
    /// Cost: B·in·out·L multiply-adds.
    pub fn gradient(&self, kind: &LayerKind) -> LayerGradient {
        let [b, o, _] = self.output_grad.dims();
        let weight = match kind {
            // Dense weight layout [in, out]: aᵢ ⊗ δᵢ.
            LayerKind::Dense { .. } => self.input.clone().matmul(self.output_grad.clone().swap_dims(1, 2)),
            // Conv weight layout [out, in·k·k]: Δᵢ Uᵢᵀ.
            LayerKind::Conv2d { .. } => self.output_grad.clone().matmul(self.input.clone().swap_dims(1, 2)),
        };
        let [_, r, c] = weight.dims();
        LayerGradient {
            weight: weight.reshape([b, r * c]),
            bias: self.bias.then(|| self.output_grad.clone().sum_dim(2).reshape([b, o])),
        }
    }
}

/// Runs one tapped forward and backward of Σᵢ mᵢ for a batch and returns every layer's factors.
///
/// `features` is `batch × dim` row-major; `targets` the target class per example (see
/// [`Measurement::targets`]). `device` must have autodiff.
pub fn layer_factors(
    network: &Network,
    features: &[f32],
    targets: &[u32],
    measurement: Measurement,
    device: &Device,
) -> Vec<LayerFactors> {
    let dim = network.config().input.len();
    let x = input_batch(features, dim, device, network.dtype());
    let (logits, taps) = network.forward_tapped(x);
    let grads = measurement.values(logits, targets).sum().backward();
    factors_from_taps(network, &taps, &grads)
}

/// Turns the taps of a forward pass and the gradients of a backward pass into layer factors
/// (convolution inputs unfolded into patches).
pub fn factors_from_taps(
    network: &Network,
    taps: &[culprit_models::LayerTap],
    grads: &burn::tensor::Gradients,
) -> Vec<LayerFactors> {
    network
        .layers()
        .iter()
        .zip(taps)
        .map(|(spec, tap)| {
            let delta = tap.output_gradient(grads).expect("every layer reaches the output");
            match (&spec.kind, tap.input.clone(), delta) {
                (LayerKind::Dense { bias, .. }, Activations::Dense(a), Activations::Dense(d)) => {
                    LayerFactors { input: a.unsqueeze_dim(2), output_grad: d.unsqueeze_dim(2), bias: *bias }
                }
                (LayerKind::Conv2d { kernel, padding, .. }, Activations::Conv(a), Activations::Conv(d)) => {
                    let options = UnfoldOptions::new([1, 1], [*padding, *padding], [1, 1]);
                    let patches = unfold4d(a, [*kernel, *kernel], options);
                    let [b, o, h, w] = d.dims();
                    LayerFactors { input: patches, output_grad: d.reshape([b, o, h * w]), bias: true }
                }
                _ => unreachable!("taps match their layer kinds"),
            }
        })
        .collect()
}

/// Exact per-example gradients of a batch, one [`LayerGradient`] per layer (θ order).
pub fn per_example_gradients(
    network: &Network,
    features: &[f32],
    targets: &[u32],
    measurement: Measurement,
    device: &Device,
) -> Vec<LayerGradient> {
    layer_factors(network, features, targets, measurement, device)
        .iter()
        .zip(network.layers())
        .map(|(f, spec)| f.gradient(&spec.kind))
        .collect()
}

/// Per-example gradients as host rows: `batch × num_params`, each row ∇θ mᵢ in θ order.
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
        .map(|t| (t.dims()[1], culprit_models::network::read_f64(t)))
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
    /// A dense layer: the outer products aᵢ ⊗ δᵢ (and δᵢ for the bias) are formed on the host.
    Outer { input: Vec<f32>, output_grad: Vec<f32>, inputs: usize, outputs: usize, bias: bool },
    /// Blocks already computed on the device (convolutions), `[batch, width]` each.
    Computed(Vec<(Vec<f32>, usize)>),
}

/// Exact per-example gradient rows (`batch × num_params`, θ order) from a batch's factors.
///
/// Dense layers' outer products are written straight into the rows on the host, in parallel
/// over examples (rayon): the rows are the output, so this is one pass over memory, where forming
/// `[batch, in, out]` on the device and copying it out would be three. Convolutions (Δᵢ Uᵢᵀ, a
/// real product over positions) are computed on the device. Cost: B·#θ multiplies and writes.
pub fn exact_rows(factors: &[LayerFactors], network: &Network) -> Vec<f32> {
    use rayon::prelude::*;
    let batch = factors[0].input.dims()[0];
    let blocks: Vec<HostBlock> = factors
        .iter()
        .zip(network.layers())
        .map(|(f, spec)| match spec.kind {
            LayerKind::Dense { inputs, outputs, bias } => HostBlock::Outer {
                input: read_f32(f.input.clone()),
                output_grad: read_f32(f.output_grad.clone()),
                inputs,
                outputs,
                bias,
            },
            LayerKind::Conv2d { .. } => {
                let g = f.gradient(&spec.kind);
                HostBlock::Computed(
                    std::iter::once(g.weight)
                        .chain(g.bias)
                        .map(|t| {
                            let width = t.dims()[1];
                            (read_f32(t), width)
                        })
                        .collect(),
                )
            }
        })
        .collect();
    let row_len = network.num_params();
    let mut rows = vec![0.0f32; batch * row_len];
    rows.par_chunks_mut(row_len).enumerate().for_each(|(i, row)| {
        let mut offset = 0;
        for block in &blocks {
            match block {
                HostBlock::Outer { input, output_grad, inputs, outputs, bias } => {
                    let a = &input[i * inputs..(i + 1) * inputs];
                    let d = &output_grad[i * outputs..(i + 1) * outputs];
                    for (dst, &aj) in row[offset..offset + inputs * outputs].chunks_exact_mut(*outputs).zip(a) {
                        if aj != 0.0 {
                            dst.iter_mut().zip(d).for_each(|(x, &dk)| *x = aj * dk);
                        }
                    }
                    offset += inputs * outputs;
                    if *bias {
                        row[offset..offset + outputs].copy_from_slice(d);
                        offset += outputs;
                    }
                }
                HostBlock::Computed(parts) => {
                    for (values, width) in parts {
                        row[offset..offset + width].copy_from_slice(&values[i * width..(i + 1) * width]);
                        offset += width;
                    }
                }
            }
        }
    });
    rows
}

/// Reads a tensor as f32 on the host.
pub fn read_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert_dtype(burn::tensor::DType::F32).try_into_vec::<f32>().expect("float tensor data")
}

/// The baseline the taps replace: one forward and backward per example, reading ∇θ mᵢ from the
/// parameters. Returns `batch × num_params` rows. For tests and benchmarks only: it costs B
/// backward passes where the taps need one.
pub fn per_example_loop(
    network: &Network,
    features: &[f32],
    targets: &[u32],
    measurement: Measurement,
    device: &Device,
) -> Vec<f32> {
    let dim = network.config().input.len();
    let net = network.clone().require_grad();
    let mut rows = Vec::with_capacity(targets.len() * net.num_params());
    for (x, t) in features.chunks(dim).zip(targets) {
        let logits = net.forward(input_batch(x, dim, device, net.dtype()));
        let grads = measurement.values(logits, std::slice::from_ref(t)).sum().backward();
        rows.extend(net.gradient_flat(&grads).into_iter().map(|v| v as f32));
    }
    rows
}

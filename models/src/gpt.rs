//! A GPT-2-family causal language model (Radford et al. 2019), as Hugging Face's
//! `GPT2LMHeadModel` computes it, as a [`Model`] over batches of [`Tokens`].
//!
//! ```text
//! h⁰ₜ = wte[xₜ] + wpe[t]
//! for each block:  a = LN₁(h);  h ← h + c_projₐ(attention(c_attn(a)))
//!                  m = LN₂(h);  h ← h + c_projₘ(gelu_new(c_fc(m)))
//! logitsₜ = LN_f(hₜ) · wteᵀ          (the LM head is tied to the token embedding)
//! ```
//!
//! attention: c_attn gives q, k, v (`[T, 3W]` split in three), per head softmax(q kᵀ/√d + causal
//! mask) v, heads concatenated; gelu_new(x) = ½x(1 + tanh(√(2/π)(x + 0.044715x³))); LN over the
//! width with ε = `layer_norm_epsilon`, biased variance. Linear layers ("Conv1D") store their
//! weight `[in, out]`, as in Hugging Face's files.
//!
//! Tracked layers: the four linear layers of every block (`h.L.attn.c_attn`, `h.L.attn.c_proj`,
//! `h.L.mlp.c_fc`, `h.L.mlp.c_proj`), at every token position; a document's gradient of each is
//! Σₜ ãₜδₜᵀ. The embeddings (token, position; the tied head) and the LayerNorms are trained but
//! not tracked: attribution, like Kronfluence's, works in the space of the linear layers.
//!
//! θ order: wte `[V, W]`, wpe `[T, W]`, then per block ln_1 (weight, bias), c_attn (weight,
//! bias), attn.c_proj, ln_2, c_fc, mlp.c_proj, then ln_f (weight, bias); every tensor flat,
//! row-major in Hugging Face's shape. Cost of a forward pass over b documents of T tokens:
//! b·T·(24W² + 4TW + 2VW) multiply-adds for L = 1 block (L times the block part).

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::ModelError;
use crate::model::{Batch, LayerTap, Model, TrackedLayer, WeightLayout};
use crate::tokens::Tokens;

/// The shape of a GPT-2 model (the fields of Hugging Face's `config.json` that matter).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Vocabulary size V.
    pub vocab: usize,
    /// Context length T (the largest number of positions).
    pub context: usize,
    /// Width W (`n_embd`).
    pub width: usize,
    /// Blocks (`n_layer`).
    pub layers: usize,
    /// Attention heads (`n_head`); divides the width.
    pub heads: usize,
    /// Width of the MLP (`n_inner`, default 4W).
    pub inner: usize,
    /// LayerNorm ε.
    pub epsilon: f64,
}

impl GptConfig {
    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [self.vocab, self.context, self.width, self.layers, self.heads, self.inner];
        if positive.contains(&0) {
            return Err(ModelError::Config(format!("every size of a GPT must be positive: {self:?}")));
        }
        if !self.width.is_multiple_of(self.heads) {
            return Err(ModelError::Config(format!("{} heads do not divide the width {}", self.heads, self.width)));
        }
        Ok(())
    }

    /// The parameter tensors: (Hugging Face name, shape), in θ order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (v, t, w, i) = (self.vocab, self.context, self.width, self.inner);
        let mut out =
            vec![("transformer.wte.weight".into(), vec![v, w]), ("transformer.wpe.weight".into(), vec![t, w])];
        for l in 0..self.layers {
            let p = |s: &str| format!("transformer.h.{l}.{s}");
            out.extend([
                (p("ln_1.weight"), vec![w]),
                (p("ln_1.bias"), vec![w]),
                (p("attn.c_attn.weight"), vec![w, 3 * w]),
                (p("attn.c_attn.bias"), vec![3 * w]),
                (p("attn.c_proj.weight"), vec![w, w]),
                (p("attn.c_proj.bias"), vec![w]),
                (p("ln_2.weight"), vec![w]),
                (p("ln_2.bias"), vec![w]),
                (p("mlp.c_fc.weight"), vec![w, i]),
                (p("mlp.c_fc.bias"), vec![i]),
                (p("mlp.c_proj.weight"), vec![i, w]),
                (p("mlp.c_proj.bias"), vec![w]),
            ]);
        }
        out.push(("transformer.ln_f.weight".into(), vec![w]));
        out.push(("transformer.ln_f.bias".into(), vec![w]));
        out
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.tensors().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// The tracked linear layers, with their offsets in θ.
    pub fn tracked_layers(&self) -> Vec<TrackedLayer> {
        let mut offset = 0;
        let mut layers = Vec::new();
        for (name, shape) in self.tensors() {
            let len: usize = shape.iter().product();
            if let Some(layer) = name.strip_suffix(".weight").filter(|n| n.contains(".attn.") || n.contains(".mlp.")) {
                layers.push(TrackedLayer {
                    name: layer.trim_start_matches("transformer.").into(),
                    inputs: shape[0],
                    outputs: shape[1],
                    bias: true,
                    positions: self.context,
                    layout: WeightLayout::InputMajor,
                    offset,
                });
            }
            offset += len;
        }
        layers
    }
}

/// The parameters of one block, as flat tensors in θ order.
#[derive(Clone, Debug)]
struct Block {
    ln_1: [Tensor<1>; 2],
    c_attn: [Tensor<1>; 2],
    attn_proj: [Tensor<1>; 2],
    ln_2: [Tensor<1>; 2],
    c_fc: [Tensor<1>; 2],
    mlp_proj: [Tensor<1>; 2],
}

/// A GPT-2 model on one device, in one dtype.
#[derive(Clone, Debug)]
pub struct Gpt {
    config: GptConfig,
    tracked: Vec<TrackedLayer>,
    wte: Tensor<1>,
    wpe: Tensor<1>,
    blocks: Vec<Block>,
    ln_f: [Tensor<1>; 2],
}

/// The tapped linear layers of one forward pass, in tracked order.
type Taps = Option<Vec<LayerTap>>;

fn gelu_new<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    // ½x(1 + tanh(u)) = x·σ(2u), u = √(2/π)(x + 0.044715x³): one sigmoid (one exp) instead of a
    // tanh, and 2u = x·(2√(2/π) + 2√(2/π)·0.044715·x²).
    let c = 2.0 * (2.0 / std::f64::consts::PI).sqrt();
    let two_u = (x.clone() * x.clone()).mul_scalar(c * 0.044715).add_scalar(c) * x.clone();
    x * crate::elementary::sigmoid(two_u)
}

impl Gpt {
    /// A model with parameters θ (order in the module documentation) on `device` in `dtype`.
    pub fn from_flat(config: &GptConfig, theta: &[f64], device: &Device, dtype: DType) -> Result<Self, ModelError> {
        config.validate()?;
        let expected = config.num_params();
        if theta.len() != expected {
            return Err(ModelError::Config(format!(
                "the weights hold {} parameters but this GPT has {expected}",
                theta.len()
            )));
        }
        let mut offset = 0;
        let mut tensors: Vec<Tensor<1>> = config
            .tensors()
            .iter()
            .map(|(_, shape)| {
                let len: usize = shape.iter().product();
                let values = theta[offset..offset + len].to_vec();
                offset += len;
                Tensor::from_data(TensorData::new(values, [len]).convert_dtype(dtype), (device, dtype))
            })
            .collect();
        let mut model = Self {
            config: config.clone(),
            tracked: config.tracked_layers(),
            wte: tensors[0].clone(),
            wpe: tensors[1].clone(),
            blocks: Vec::new(),
            ln_f: [tensors[0].clone(), tensors[0].clone()],
        };
        model.set_parameters(std::mem::take(&mut tensors));
        Ok(model)
    }

    /// A fresh model as GPT-2 initialises one: weights N(0, 0.02²) (the blocks' output
    /// projections N(0, (0.02/√(2L))²)), biases 0, LayerNorm scales 1, from a ChaCha8 generator
    /// seeded by `seed`; except the (learned) position embeddings, which start as the sinusoids
    /// of Vaswani et al. (2017), PE(p, 2k) = a·sin(p/10000^(2k/W)), PE(p, 2k+1) = a·cos(…), with
    /// a = 0.02·√2 so their norm is a token embedding's: a relative offset is then a rotation, so
    /// a small model learns to attend a fixed distance back (repeated characters, runs of digits)
    /// far sooner than from noise.
    pub fn init(config: &GptConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut theta = Vec::with_capacity(config.num_params());
        let projection = 0.02 / (2.0 * config.layers as f64).sqrt();
        for (name, shape) in config.tensors() {
            let len: usize = shape.iter().product();
            if name.contains(".ln_") {
                let one = if name.ends_with(".weight") { 1.0 } else { 0.0 };
                theta.extend(std::iter::repeat_n(one, len));
            } else if name.ends_with(".bias") {
                theta.extend(std::iter::repeat_n(0.0, len));
            } else if name == "transformer.wpe.weight" {
                theta.extend(sinusoids(config.context, config.width, 0.02 * std::f64::consts::SQRT_2));
            } else {
                let sd = if name.ends_with("c_proj.weight") { projection } else { 0.02 };
                theta.extend((0..len).map(|_| sd * standard_normal(&mut rng)));
            }
        }
        Self::from_flat(config, &theta, device, dtype)
    }

    /// The configuration.
    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// LayerNorm over the last dimension: (x − μ)/√(σ² + ε)·γ + β, σ² the biased variance.
    fn layer_norm(&self, x: Tensor<3>, [gamma, beta]: &[Tensor<1>; 2]) -> Tensor<3> {
        let w = self.config.width;
        let centred = x.clone() - x.mean_dim(2);
        let var = crate::elementary::square(centred.clone()).mean_dim(2);
        centred / crate::elementary::sqrt(var.add_scalar(self.config.epsilon)) * gamma.clone().reshape([1, 1, w])
            + beta.clone().reshape([1, 1, w])
    }

    /// A linear layer `[b, T, in] → [b, T, out]` (weight `[in, out]`); with `taps`, records its
    /// input and a probe on its output.
    fn linear(&self, x: Tensor<3>, [weight, bias]: &[Tensor<1>; 2], taps: &mut Taps, mask: &Tensor<2>) -> Tensor<3> {
        let [b, t, i] = x.dims();
        let o = bias.dims()[0];
        let z = x.clone().reshape([b * t, i]).matmul(weight.clone().reshape([i, o])) + bias.clone().reshape([1, o]);
        let z = z.reshape([b, t, o]);
        let Some(taps) = taps else { return z };
        let tap = LayerTap::masked(x.swap_dims(1, 2), o, mask.clone());
        let z = z + tap.probe.clone().swap_dims(1, 2);
        taps.push(tap);
        z
    }

    /// Causal multi-head self-attention of the c_attn output `[b, T, 3W]` → `[b, T, W]`.
    fn attention(&self, qkv: Tensor<3>) -> Tensor<3> {
        let [b, t, _] = qkv.dims();
        let (w, h) = (self.config.width, self.config.heads);
        let d = w / h;
        let head = |k: usize| qkv.clone().slice([0..b, 0..t, k * w..(k + 1) * w]).reshape([b, t, h, d]).swap_dims(1, 2);
        let (q, k, v) = (head(0), head(1), head(2));
        // −∞ above the diagonal: exp(−∞) is 0 on the fast path (a large finite value underflows
        // through the slow, errno-setting path of expf: measured 5% of a training step).
        let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        let dtype = qkv.dtype();
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [t, t]).convert_dtype(dtype), (&qkv.device(), dtype));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((d as f64).sqrt()) + mask.reshape([1, 1, t, t]);
        let weights = crate::elementary::softmax(scores, 3);
        weights.matmul(v).swap_dims(1, 2).reshape([b, t, w])
    }

    /// The token ids of a batch padded to its longest document, `[b, T]`, the padding mask and the
    /// flat indices (into `[b·T]`) of its prediction rows.
    fn inputs(&self, batch: &Tokens) -> (Tensor<2, Int>, Tensor<2>, Tensor<1, Int>) {
        let (b, t) = (batch.len(), batch.longest());
        let device = self.device();
        let mut ids = vec![0i32; b * t];
        let mut mask = vec![0.0f32; b * t];
        let mut rows = Vec::new();
        for (i, d) in batch.documents().iter().enumerate() {
            for (k, &token) in batch.tokens(i).iter().enumerate() {
                ids[i * t + k] = token as i32;
                mask[i * t + k] = 1.0;
            }
            rows.extend((d.scored_from..d.len - 1).map(|k| (i * t + k) as i32));
        }
        let n = rows.len();
        (
            Tensor::from_ints(TensorData::new(ids, [b, t]), &device),
            Tensor::from_data(TensorData::new(mask, [b, t]).convert_dtype(self.dtype()), (&device, self.dtype())),
            Tensor::from_ints(TensorData::new(rows, [n]), &device),
        )
    }

    /// The logits `[b, T, V]` at every position of a batch, with taps when asked.
    pub fn forward_all(&self, batch: &Tokens, taps: &mut Taps) -> Tensor<3> {
        let (ids, mask, _) = self.inputs(batch);
        self.forward_ids(ids, &mask, taps)
    }

    fn forward_ids(&self, ids: Tensor<2, Int>, mask: &Tensor<2>, taps: &mut Taps) -> Tensor<3> {
        let [b, t] = ids.dims();
        let GptConfig { vocab, context, width, .. } = self.config;
        assert!(t <= context, "{t} tokens in a context of {context}");
        let wte = self.wte.clone().reshape([vocab, width]);
        let tokens = wte.clone().select(0, ids.reshape([b * t])).reshape([b, t, width]);
        let positions = self.wpe.clone().reshape([context, width]).slice([0..t, 0..width]).reshape([1, t, width]);
        let mut h = tokens + positions;
        for block in &self.blocks {
            let a = self.layer_norm(h.clone(), &block.ln_1);
            let qkv = self.linear(a, &block.c_attn, taps, mask);
            let attended = self.linear(self.attention(qkv), &block.attn_proj, taps, mask);
            h = h + attended;
            let m = self.layer_norm(h.clone(), &block.ln_2);
            let inner = gelu_new(self.linear(m, &block.c_fc, taps, mask));
            h = h + self.linear(inner, &block.mlp_proj, taps, mask);
        }
        let out = self.layer_norm(h, &self.ln_f);
        out.reshape([b * t, width]).matmul(wte.transpose()).reshape([b, t, vocab])
    }
}

/// `positions × width` sinusoidal position embeddings of amplitude `a`, row-major.
fn sinusoids(positions: usize, width: usize, a: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(positions * width);
    for p in 0..positions {
        for i in 0..width {
            let k = (i / 2) as f64;
            let angle = p as f64 / 10000f64.powf(2.0 * k / width as f64);
            out.push(a * if i % 2 == 0 { angle.sin() } else { angle.cos() });
        }
    }
    out
}

/// One N(0, 1) draw (Box–Muller).
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    use rand::Rng;
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Model for Gpt {
    type Batch = Tokens;

    fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "GPT ({} layers, {} heads, width {}, context {}, vocabulary {})",
            c.layers, c.heads, c.width, c.context, c.vocab
        )
    }

    fn num_classes(&self) -> usize {
        self.config.vocab
    }

    fn layers(&self) -> &[TrackedLayer] {
        &self.tracked
    }

    fn parameters(&self) -> Vec<Tensor<1>> {
        let mut out = vec![self.wte.clone(), self.wpe.clone()];
        for b in &self.blocks {
            for pair in [&b.ln_1, &b.c_attn, &b.attn_proj, &b.ln_2, &b.c_fc, &b.mlp_proj] {
                out.extend(pair.iter().cloned());
            }
        }
        out.extend(self.ln_f.iter().cloned());
        out
    }

    fn set_parameters(&mut self, parameters: Vec<Tensor<1>>) {
        let mut it = parameters.into_iter();
        let mut next = || it.next().expect("one tensor per parameter");
        self.wte = next();
        self.wpe = next();
        let mut pair = || [next(), next()];
        let blocks = (0..self.config.layers)
            .map(|_| Block {
                ln_1: pair(),
                c_attn: pair(),
                attn_proj: pair(),
                ln_2: pair(),
                c_fc: pair(),
                mlp_proj: pair(),
            })
            .collect();
        self.blocks = blocks;
        self.ln_f = pair();
    }

    fn forward(&self, batch: &Tokens, tapped: bool) -> (Tensor<2>, Vec<LayerTap>) {
        let (ids, mask, rows) = self.inputs(batch);
        let mut taps = tapped.then(Vec::new);
        let logits = self.forward_ids(ids, &mask, &mut taps);
        let [b, t, v] = logits.dims();
        (logits.reshape([b * t, v]).select(0, rows), taps.unwrap_or_default())
    }
}

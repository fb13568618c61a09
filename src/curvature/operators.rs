//! Matrix-free curvature operators of the training objective, in f64.
//!
//! - [`HessianFd`]: the Hessian-vector product by central finite differences of the full-batch
//!   gradient, Hv ≈ (∇L(θ+εv) − ∇L(θ−εv)) / 2ε. It must run in f64: in f32 the difference of two
//!   gradients loses about half of the significant digits (measured: 1e-4 relative error with
//!   smooth activations) and ReLU kinks make it useless; in f64 with ε = 1e-6/‖v‖ the error is
//!   ~1e-8 relative (smooth) and exact away from kinks. Cost: two full-batch gradients per product.
//! - [`GaussNewton`]: the generalised Gauss–Newton matrix, exact for softmax cross-entropy without
//!   second derivatives: G = (1/n) Σᵢ Jᵢᵀ (diag pᵢ − pᵢpᵢᵀ) Jᵢ + λI, with Jᵢ = ∂zᵢ/∂θ the logits'
//!   Jacobian. Equivalently (1/n) Σᵢ Σ_c p_ic g_ic g_icᵀ with g_ic = ∇θ(−log p_ic) + λI (here the
//!   true Fisher equals the GGN). A product Gv needs Jᵢv for every example: with layer taps,
//!   (Jᵢv)_c = Σ_layers aᵢᵀ V δᵢ⁽ᶜ⁾ where δᵢ⁽ᶜ⁾ = ∂z_ic/∂(layer output) comes from one backward of
//!   Σᵢ z_ic per class; then uᵢ = (diag pᵢ − pᵢpᵢᵀ)(Jᵢv) and Gv = (1/n) Σᵢ Jᵢᵀuᵢ is the same
//!   contraction in reverse. Cost: C backward passes (cached across products when they fit in
//!   memory) plus O(n·#θ) per product. Positive semi-definite for any activation, ReLU included.
//!
//! λ here is the objective's own L2 coefficient: ∇²[(λ/2)‖θ‖²] = λI is part of the Hessian. Extra
//! damping for the solve is added by [`Damped`] and reported separately.

use burn::tensor::{DType, Device, Tensor, TensorData};
use culprit_models::network::input_batch;
use culprit_models::train::full_objective;
use culprit_models::{Examples, LayerKind, Network};

use crate::data::Dataset;
use crate::gradients::LayerFactors;

/// A symmetric linear operator on ℝᵈ (the shape of a Hessian-vector product).
pub trait LinearOperator: Sync {
    /// d.
    fn dim(&self) -> usize;
    /// out = A v.
    fn apply(&self, v: &[f64]) -> Vec<f64>;
}

/// A + δI.
pub struct Damped<'a, A: LinearOperator + ?Sized> {
    /// The operator.
    pub inner: &'a A,
    /// δ.
    pub damping: f64,
}

impl<A: LinearOperator + ?Sized> LinearOperator for Damped<'_, A> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn apply(&self, v: &[f64]) -> Vec<f64> {
        let mut out = self.inner.apply(v);
        out.iter_mut().zip(v).for_each(|(o, x)| *o += self.damping * x);
        out
    }
}

/// Euclidean norm.
pub fn norm(v: &[f64]) -> f64 {
    dot(v, v).sqrt()
}

/// Inner product.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The training objective at the trained θ, in f64: the model and the data it was trained on.
pub struct Objective {
    /// The model in f64 on an autodiff device.
    pub network: Network,
    /// Training features (row-major) and labels.
    pub data: Dataset,
    /// The objective's λ.
    pub l2: f64,
    /// The device.
    pub device: Device,
}

impl Objective {
    /// The objective of `network` (converted to f64) on `data`.
    pub fn new(network: &Network, data: Dataset, l2: f64, device: &Device) -> Self {
        let network = Network::from_flat(network.config(), &network.to_flat(), device, DType::F64).expect("same shape");
        Self { network, data, l2, device: device.clone() }
    }

    /// θ.
    pub fn theta(&self) -> Vec<f64> {
        self.network.to_flat()
    }

    /// n.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether there is no data.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn examples(&self) -> Examples<'_> {
        self.data.examples()
    }

    /// ∇L at θ + t·v.
    pub fn gradient_at(&self, v: &[f64], t: f64) -> Vec<f64> {
        let theta: Vec<f64> = self.theta().iter().zip(v).map(|(a, b)| a + t * b).collect();
        let net = Network::from_flat(self.network.config(), &theta, &self.device, DType::F64).expect("same shape");
        full_objective(&net, self.examples(), self.l2, 4096).1
    }
}

/// Hessian-vector products by central finite differences of the f64 full-batch gradient.
pub struct HessianFd<'a> {
    /// The objective.
    pub objective: &'a Objective,
    /// Step relative to ‖v‖ (default 1e-6).
    pub relative_step: f64,
}

impl LinearOperator for HessianFd<'_> {
    fn dim(&self) -> usize {
        self.objective.network.num_params()
    }
    fn apply(&self, v: &[f64]) -> Vec<f64> {
        let n = norm(v);
        if n == 0.0 {
            return vec![0.0; v.len()];
        }
        let eps = self.relative_step / n;
        let plus = self.objective.gradient_at(v, eps);
        let minus = self.objective.gradient_at(v, -eps);
        plus.iter().zip(&minus).map(|(p, m)| (p - m) / (2.0 * eps)).collect()
    }
}

/// One layer's factors for a chunk, flattened so that every contraction is one matrix product.
struct LayerChunk {
    /// Inputs, one row per (example, position): `[b·L, in]`.
    inputs: Tensor<2>,
    /// Per class c, ∂z_c/∂(layer output), rows as in `inputs`: `[C, b·L, out]`.
    logit_grads: Tensor<3>,
    /// Positions per example (1 for dense layers).
    positions: usize,
}

/// Per chunk of examples: predicted probabilities and each layer's factors.
struct ChunkFactors {
    rows: usize,
    probabilities: Vec<f64>,
    layers: Vec<LayerChunk>,
}

/// The exact Gauss–Newton operator of the objective (see the module docs).
///
/// Per product and layer: Jv is one product `inputs · V` (`[b·L, out]`) and one elementwise
/// product with the stacked logit gradients; Jᵀu is one weighted sum over classes and one product
/// `inputsᵀ · Δ`. No per-example gradient is ever formed.
pub struct GaussNewton<'a> {
    objective: &'a Objective,
    chunk: usize,
    cache: Option<Vec<ChunkFactors>>,
}

/// Bytes of per-class factors the GGN keeps in memory across products.
const GGN_CACHE_BYTES: usize = 3 << 30;

/// `[b, rest…]` inputs or output gradients → rows per (example, position): `[b·L, features]`.
fn flatten_positions(t: Tensor<3>) -> Tensor<2> {
    let [b, f, l] = t.dims();
    t.swap_dims(1, 2).reshape([b * l, f])
}

impl<'a> GaussNewton<'a> {
    /// The GGN of `objective`, evaluated in chunks of `chunk` examples. Per-class factors are
    /// computed once and kept when they fit in 3 GiB, else recomputed for every product.
    pub fn new(objective: &'a Objective, chunk: usize) -> Self {
        let mut ggn = Self { objective, chunk: chunk.max(1), cache: None };
        let classes = objective.network.config().num_classes;
        let per_example: usize = objective
            .network
            .layers()
            .iter()
            .map(|l| match l.kind {
                LayerKind::Dense { inputs, outputs, .. } => inputs + classes * outputs,
                LayerKind::Conv2d { in_channels, out_channels, kernel, height, width, .. } => {
                    (in_channels * kernel * kernel + classes * out_channels) * height * width
                }
            })
            .sum();
        if per_example * 8 * objective.len() <= GGN_CACHE_BYTES {
            ggn.cache = Some(ggn.chunks().collect());
        }
        ggn
    }

    fn chunk_factors(&self, features: &[f32]) -> ChunkFactors {
        let o = self.objective;
        let net = &o.network;
        let classes = net.config().num_classes;
        let dim = o.data.dim();
        let b = features.len() / dim;
        let logits = net.forward(input_batch(features, dim, &o.device, DType::F64));
        let probabilities = crate::predict::softmax_rows(&culprit_models::network::read_f64(logits), classes);
        let mut inputs: Vec<Option<(Tensor<2>, usize)>> = vec![None; net.layers().len()];
        let mut grads: Vec<Vec<Tensor<3>>> = vec![Vec::with_capacity(classes); net.layers().len()];
        for c in 0..classes {
            // m_i = z_ic: the class-logit measurement, via taps.
            for (l, f) in logit_factors(net, features, c, &o.device).into_iter().enumerate() {
                if c == 0 {
                    let positions = f.input.dims()[2];
                    inputs[l] = Some((flatten_positions(f.input), positions));
                }
                let g = flatten_positions(f.output_grad);
                let [r, out] = g.dims();
                grads[l].push(g.reshape([1, r, out]));
            }
        }
        let layers = inputs
            .into_iter()
            .zip(grads)
            .map(|(input, g)| {
                let (inputs, positions) = input.expect("every layer");
                LayerChunk { inputs, logit_grads: Tensor::cat(g, 0), positions }
            })
            .collect();
        ChunkFactors { rows: b, probabilities, layers }
    }

    fn chunks(&self) -> impl Iterator<Item = ChunkFactors> + '_ {
        let n = self.objective.len();
        let dim = self.objective.data.dim();
        (0..n.div_ceil(self.chunk)).map(move |k| {
            let (start, end) = (k * self.chunk, ((k + 1) * self.chunk).min(n));
            self.chunk_factors(&self.objective.data.features[start * dim..end * dim])
        })
    }

    /// The GGN of the examples `rows` alone (with repetition), (1/|rows|) Σ Jᵢᵀ(diag pᵢ − pᵢpᵢᵀ)Jᵢ v
    /// + λv: the stochastic product LiSSA uses.
    pub fn apply_rows(&self, v: &[f64], rows: &[usize]) -> Vec<f64> {
        let dim = self.objective.data.dim();
        let mut features = Vec::with_capacity(rows.len() * dim);
        for &r in rows {
            features.extend_from_slice(&self.objective.data.features[r * dim..(r + 1) * dim]);
        }
        let f = self.chunk_factors(&features);
        let v_layers = self.split(v);
        let mut out: Vec<f64> = v.iter().map(|x| self.objective.l2 * x).collect();
        self.apply_chunk(&f, &v_layers, &mut out, 1.0 / rows.len() as f64);
        out
    }

    fn apply_chunk(&self, f: &ChunkFactors, v_layers: &[(Tensor<2>, Option<Tensor<1>>)], out: &mut [f64], scale: f64) {
        let net = &self.objective.network;
        let classes = net.config().num_classes;
        let device = &self.objective.device;
        let b = f.rows;
        // Jv: [C, b] summed over layers.
        let mut jv: Option<Tensor<2>> = None;
        for (layer, (vw, vb)) in f.layers.iter().zip(v_layers) {
            let mut xv = layer.inputs.clone().matmul(vw.clone()); // [b·L, out]
            if let Some(bias) = vb {
                let o = bias.dims()[0];
                xv = xv + bias.clone().reshape([1, o]);
            }
            let [r, o] = xv.dims();
            let per_row = (layer.logit_grads.clone() * xv.reshape([1, r, o])).sum_dim(2); // [C, b·L, 1]
            let per_example = per_row.reshape([classes, b, layer.positions]).sum_dim(2).reshape([classes, b]);
            jv = Some(match jv {
                Some(j) => j + per_example,
                None => per_example,
            });
        }
        let jv = culprit_models::network::read_f64(jv.expect("a model has layers")); // [C, b]
        // u = (diag p − p pᵀ) Jv · scale, laid out [C, b].
        let mut u = vec![0.0; classes * b];
        for i in 0..b {
            let p = &f.probabilities[i * classes..(i + 1) * classes];
            let pj: f64 = (0..classes).map(|c| p[c] * jv[c * b + i]).sum();
            for c in 0..classes {
                u[c * b + i] = p[c] * (jv[c * b + i] - pj) * scale;
            }
        }
        let u =
            Tensor::<1>::from_data(TensorData::new(u, [classes * b]), (device, DType::F64)).reshape([classes, b, 1]);
        // Jᵀu: Δ = Σ_c u_c ∂z_c/∂out per row, then inputsᵀ Δ.
        let mut offset = 0;
        for (layer, spec) in f.layers.iter().zip(net.layers()) {
            let [_, r, o] = layer.logit_grads.dims();
            let weights = u.clone().expand([classes, b, layer.positions]).reshape([classes, r, 1]);
            let delta = (layer.logit_grads.clone() * weights).sum_dim(0).reshape([r, o]);
            let gw = layer.inputs.clone().transpose().matmul(delta.clone()); // [in, out]
            let gw = match spec.kind {
                LayerKind::Dense { .. } => gw,
                LayerKind::Conv2d { .. } => gw.transpose(), // θ layout [out, C·k·k]
            };
            let w = culprit_models::network::read_f64(gw);
            out[offset..offset + w.len()].iter_mut().zip(&w).for_each(|(a, x)| *a += x);
            offset += w.len();
            if spec.bias_len() > 0 {
                let bv = culprit_models::network::read_f64(delta.sum_dim(0));
                out[offset..offset + bv.len()].iter_mut().zip(&bv).for_each(|(a, x)| *a += x);
                offset += bv.len();
            }
        }
    }

    /// Splits a direction by layer: weights as `[in, out]` tensors (conv: `[C·k·k, out]`) so that
    /// `inputs · V` is the change of the layer's output, and biases as vectors.
    fn split(&self, v: &[f64]) -> Vec<(Tensor<2>, Option<Tensor<1>>)> {
        let net = &self.objective.network;
        let device = &self.objective.device;
        let mut v_layers = Vec::new();
        let mut offset = 0;
        for spec in net.layers() {
            let w = &v[offset..offset + spec.weight_len()];
            offset += spec.weight_len();
            let tw = match spec.kind {
                LayerKind::Dense { inputs, outputs, .. } => {
                    Tensor::<2>::from_data(TensorData::new(w.to_vec(), [inputs, outputs]), (device, DType::F64))
                }
                LayerKind::Conv2d { in_channels, out_channels, kernel, .. } => Tensor::<2>::from_data(
                    TensorData::new(w.to_vec(), [out_channels, in_channels * kernel * kernel]),
                    (device, DType::F64),
                )
                .transpose(),
            };
            let b = spec.bias_len();
            let tb = (b > 0).then(|| {
                Tensor::<1>::from_data(TensorData::new(v[offset..offset + b].to_vec(), [b]), (device, DType::F64))
            });
            offset += b;
            v_layers.push((tw, tb));
        }
        v_layers
    }
}

/// Layer factors of the class-`c` logit measurement mᵢ = z_ic.
fn logit_factors(net: &Network, features: &[f32], class: usize, device: &Device) -> Vec<LayerFactors> {
    let dim = net.config().input.len();
    let x = input_batch(features, dim, device, net.dtype());
    let (logits, taps) = net.forward_tapped(x);
    let b = logits.dims()[0];
    let grads = logits.slice([0..b, class..class + 1]).sum().backward();
    crate::gradients::factors_from_taps(net, &taps, &grads)
}

impl LinearOperator for GaussNewton<'_> {
    fn dim(&self) -> usize {
        self.objective.network.num_params()
    }

    fn apply(&self, v: &[f64]) -> Vec<f64> {
        let v_layers = self.split(v);
        let scale = 1.0 / self.objective.len() as f64;
        let mut out: Vec<f64> = v.iter().map(|x| self.objective.l2 * x).collect();
        match &self.cache {
            Some(chunks) => chunks.iter().for_each(|c| self.apply_chunk(c, &v_layers, &mut out, scale)),
            None => self.chunks().for_each(|c| self.apply_chunk(&c, &v_layers, &mut out, scale)),
        }
        out
    }
}

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

use burn::tensor::{DType, Tensor, TensorData};
use culprit_models::model::{Batch, Model, WeightLayout, tracked_len};

use crate::gradients::{LayerFactors, factors_from_taps, read_f64};
use crate::objective::Objective;

/// A symmetric linear operator on ℝᵈ (the shape of a Hessian-vector product).
pub trait LinearOperator: Sync {
    /// d.
    fn dim(&self) -> usize;
    /// out = A v.
    fn apply(&self, v: &[f64]) -> Vec<f64>;
}

/// A linear operator that is a mean over examples, which can also be applied to a sample of
/// them (the stochastic products LiSSA uses).
pub trait SampledOperator: LinearOperator {
    /// The operator of the examples `rows` alone (with repetition), as a mean over them.
    fn apply_rows(&self, v: &[f64], rows: &[usize]) -> Vec<f64>;
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

pub use culprit_models::lbfgs::{dot, norm};

/// Hessian-vector products by central finite differences of the f64 full-batch gradient.
pub struct HessianFd<'a, M: Model> {
    /// The objective.
    pub objective: &'a Objective<M>,
    /// Step relative to ‖v‖ (default 1e-6).
    pub relative_step: f64,
}

impl<M: Model> LinearOperator for HessianFd<'_, M> {
    fn dim(&self) -> usize {
        tracked_len(self.objective.model.layers())
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

/// The exact Gauss–Newton operator of the objective (see the module docs), for models with one
/// prediction row per example.
///
/// Per product and layer: Jv is one product `inputs · V` (`[b·L, out]`) and one elementwise
/// product with the stacked logit gradients; Jᵀu is one weighted sum over classes and one product
/// `inputsᵀ · Δ`. No per-example gradient is ever formed.
pub struct GaussNewton<'a, M: Model> {
    objective: &'a Objective<M>,
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

impl<'a, M: Model> GaussNewton<'a, M> {
    /// The GGN of `objective`, evaluated in chunks of `chunk` examples. Per-class factors are
    /// computed once and kept when they fit in 3 GiB, else recomputed for every product.
    pub fn new(objective: &'a Objective<M>, chunk: usize) -> Self {
        let mut ggn = Self { objective, chunk: chunk.max(1), cache: None };
        let classes = objective.model.num_classes();
        let per_example: usize =
            objective.model.layers().iter().map(|l| (l.inputs + classes * l.outputs) * l.positions).sum();
        if per_example * 8 * objective.len() <= GGN_CACHE_BYTES {
            ggn.cache = Some(ggn.chunks().collect());
        }
        ggn
    }

    fn chunk_factors(&self, batch: &M::Batch) -> ChunkFactors {
        let o = self.objective;
        let net = &o.model;
        let classes = net.num_classes();
        let b = batch.len();
        let probabilities = o.probabilities(batch);
        let layers = net.layers().len();
        let mut inputs: Vec<Option<(Tensor<2>, usize)>> = vec![None; layers];
        let mut grads: Vec<Vec<Tensor<3>>> = vec![Vec::with_capacity(classes); layers];
        for c in 0..classes {
            // m_i = z_ic: the class-logit measurement, via taps.
            for (l, f) in logit_factors(net, batch, c).into_iter().enumerate() {
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
        let ranges = self.objective.data.groups().chunks(n, self.chunk, culprit_models::model::ROWS_PER_CHUNK);
        ranges.into_iter().map(move |range| self.chunk_factors(&self.objective.data.slice(range)))
    }

    fn apply_chunk(&self, f: &ChunkFactors, v_layers: &[(Tensor<2>, Option<Tensor<1>>)], out: &mut [f64], scale: f64) {
        let jv = self.jacobian_products(f, v_layers); // [C, b]
        let classes = self.objective.model.num_classes();
        let b = f.rows;
        // u = (diag p − p pᵀ) Jv · scale, laid out [C, b].
        let mut u = vec![0.0; classes * b];
        for i in 0..b {
            let p = &f.probabilities[i * classes..(i + 1) * classes];
            let pj: f64 = (0..classes).map(|c| p[c] * jv[c * b + i]).sum();
            for c in 0..classes {
                u[c * b + i] = p[c] * (jv[c * b + i] - pj) * scale;
            }
        }
        self.add_transposed_products(f, u, out);
    }

    /// Jv for every example and class of a chunk, `[C, b]` row-major, summed over layers.
    fn jacobian_products(&self, f: &ChunkFactors, v_layers: &[(Tensor<2>, Option<Tensor<1>>)]) -> Vec<f64> {
        let classes = self.objective.model.num_classes();
        let b = f.rows;
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
        read_f64(jv.expect("a model has layers"))
    }

    /// out += Jᵀu: per layer Δ = Σ_c u_c ∂z_c/∂out per row, then inputsᵀ Δ in the weight's layout.
    fn add_transposed_products(&self, f: &ChunkFactors, u: Vec<f64>, out: &mut [f64]) {
        let classes = self.objective.model.num_classes();
        let device = &self.objective.device;
        let b = f.rows;
        let u =
            Tensor::<1>::from_data(TensorData::new(u, [classes * b]), (device, DType::F64)).reshape([classes, b, 1]);
        let mut offset = 0;
        for (layer, spec) in f.layers.iter().zip(self.objective.model.layers()) {
            let [_, r, o] = layer.logit_grads.dims();
            let weights = u.clone().expand([classes, b, layer.positions]).reshape([classes, r, 1]);
            let delta = (layer.logit_grads.clone() * weights).sum_dim(0).reshape([r, o]);
            let gw = layer.inputs.clone().transpose().matmul(delta.clone()); // [in, out]
            let gw = match spec.layout {
                WeightLayout::InputMajor => gw,
                WeightLayout::OutputMajor => gw.transpose(),
            };
            let w = read_f64(gw);
            out[offset..offset + w.len()].iter_mut().zip(&w).for_each(|(a, x)| *a += x);
            offset += w.len();
            if spec.bias {
                let bv = read_f64(delta.sum_dim(0));
                out[offset..offset + bv.len()].iter_mut().zip(&bv).for_each(|(a, x)| *a += x);
                offset += bv.len();
            }
        }
    }

    /// Splits a tracked-space direction by layer: weights as `[in, out]` tensors so that
    /// `inputs · V` is the change of the layer's output, and biases as vectors.
    fn split(&self, v: &[f64]) -> Vec<(Tensor<2>, Option<Tensor<1>>)> {
        let device = &self.objective.device;
        let mut v_layers = Vec::new();
        let mut offset = 0;
        for spec in self.objective.model.layers() {
            let w = v[offset..offset + spec.weight_len()].to_vec();
            offset += spec.weight_len();
            let tw = match spec.layout {
                WeightLayout::InputMajor => {
                    Tensor::<2>::from_data(TensorData::new(w, [spec.inputs, spec.outputs]), (device, DType::F64))
                }
                WeightLayout::OutputMajor => {
                    Tensor::<2>::from_data(TensorData::new(w, [spec.outputs, spec.inputs]), (device, DType::F64))
                        .transpose()
                }
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
fn logit_factors<M: Model>(net: &M, batch: &M::Batch, class: usize) -> Vec<LayerFactors> {
    let (logits, taps) = net.forward(batch, true);
    let b = logits.dims()[0];
    let grads = logits.slice([0..b, class..class + 1]).sum().backward();
    factors_from_taps(net, &taps, &grads)
}

impl<M: Model> LinearOperator for GaussNewton<'_, M> {
    fn dim(&self) -> usize {
        tracked_len(self.objective.model.layers())
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

impl<M: Model> SampledOperator for GaussNewton<'_, M> {
    /// (1/|rows|) Σ Jᵢᵀ(diag pᵢ − pᵢpᵢᵀ)Jᵢ v + λv over the examples `rows`.
    fn apply_rows(&self, v: &[f64], rows: &[usize]) -> Vec<f64> {
        let f = self.chunk_factors(&self.objective.data.gather(rows));
        let v_layers = self.split(v);
        let mut out: Vec<f64> = v.iter().map(|x| self.objective.l2 * x).collect();
        self.apply_chunk(&f, &v_layers, &mut out, 1.0 / rows.len() as f64);
        out
    }
}

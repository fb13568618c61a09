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

use std::sync::OnceLock;

use burn::tensor::Tensor;
use culprit_models::model::{Batch, Model, WeightLayout, tracked_len};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::curvature::rows::{self, RowChunk};
use crate::curvature::sparse::SparseRows;
use crate::gradients::{LayerFactors, factors_from_taps, read_f64};
use crate::objective::Objective;
#[cfg(target_arch = "x86_64")]
use crate::simd::InstructionSet;
use crate::simd::narrow;

/// A symmetric linear operator on ℝᵈ (the shape of a Hessian-vector product).
pub trait LinearOperator: Sync {
    /// d.
    fn dim(&self) -> usize;
    /// out = A v.
    fn apply(&self, v: &[f64]) -> Vec<f64>;
    /// A v for several directions at once; operators that share work between them (one pass
    /// over their data for all) override it.
    fn apply_many(&self, vs: &[&[f64]]) -> Vec<Vec<f64>> {
        vs.iter().map(|v| self.apply(v)).collect()
    }
}

/// A linear operator given by a function of one vector (a preconditioner written as a closure).
pub struct FnOperator<F: Fn(&[f64]) -> Vec<f64> + Sync> {
    /// d.
    pub dim: usize,
    /// v ↦ A v.
    pub apply: F,
}

impl<F: Fn(&[f64]) -> Vec<f64> + Sync> LinearOperator for FnOperator<F> {
    fn dim(&self) -> usize {
        self.dim
    }
    fn apply(&self, v: &[f64]) -> Vec<f64> {
        (self.apply)(v)
    }
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
    fn apply_many(&self, vs: &[&[f64]]) -> Vec<Vec<f64>> {
        let mut outs = self.inner.apply_many(vs);
        outs.par_iter_mut()
            .zip(vs)
            .for_each(|(out, v)| out.iter_mut().zip(*v).for_each(|(o, x)| *o += self.damping * x));
        outs
    }
}

/// Σ aᵢbᵢ, accumulated in 8 independent lanes so that it vectorises (the sequential sum is bound
/// by the latency of one addition after another); within f64 rounding of it.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let split = a.len().min(b.len()) / LANES * LANES;
    for (x, y) in a[..split].chunks_exact(LANES).zip(b[..split].chunks_exact(LANES)) {
        for t in 0..LANES {
            acc[t] += x[t] * y[t];
        }
    }
    let tail: f64 = a[split..].iter().zip(&b[split..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f64>() + tail
}

/// Euclidean norm ([`dot`]).
pub fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

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

/// One layer's factors for a chunk, column-major f64 so that the two big contractions of a
/// product are one GEMM each (faer) and the rest are contiguous sweeps over rows.
pub(crate) struct LayerChunk {
    /// Inputs, one row per (example, position): `[b·L, in]`, column-major.
    pub(crate) inputs: Vec<f64>,
    /// The same rounded to f32, made on the first single-precision product.
    inputs32: OnceLock<Vec<f32>>,
    /// The inputs in compressed rows when few are non-zero (the products' GEMMs then cost
    /// 2·nnz·cols instead of 2·r·in·cols: [`crate::curvature::sparse`]), in f64 and, made on the
    /// first single-precision product, f32.
    sparse: Option<SparseRows<f64>>,
    sparse32: OnceLock<Option<SparseRows<f32>>>,
    /// in.
    pub(crate) width: usize,
    /// Per class c, ∂z_c/∂(layer output), rows as in `inputs`: C matrices `[b·L, out]`,
    /// column-major.
    pub(crate) logit_grads: Vec<Vec<f64>>,
    /// Positions per example (1 for dense layers).
    pub(crate) positions: usize,
    /// The layer's inputs as its taps gave them, `[b, in, L]` (for Fisher samples).
    pub(crate) input: Tensor<3>,
    /// Whether the layer has a bias.
    pub(crate) bias: bool,
    /// The taps' padding mask, `[b, L]`, if any.
    pub(crate) mask: Option<Tensor<2>>,
    /// Per (class c, output o), index c·out + o: whether ∂z_c/∂out_o is non-zero anywhere in the
    /// chunk (a last layer's logit gradients are one-hot: the products skip the zero columns).
    nonzero: Vec<bool>,
}

/// Per chunk of examples: predicted probabilities (`[b, C]` row-major) and each layer's factors:
/// what every exact Gauss–Newton product reads, and from which every class's Fisher sample
/// follows without another backward pass ([`ChunkFactors::fisher_output_grads`]).
pub(crate) struct ChunkFactors {
    /// Examples b.
    pub(crate) rows: usize,
    /// `[b, C]` row-major.
    pub(crate) probabilities: Vec<f64>,
    /// Per tracked layer.
    pub(crate) layers: Vec<LayerChunk>,
    /// The same in f32, row-major, made on the first single-precision product (`None` inside when
    /// a layer acts at several positions): [`crate::curvature::rows`].
    rows32: OnceLock<Option<RowChunk>>,
}

impl LayerChunk {
    /// X·B (`transpose` false: B is `[in, cols]`, the result `[r, cols]`) or Xᵀ·B (B `[r, cols]`,
    /// the result `[in, cols]`), X the chunk's inputs, all column-major: one faer GEMM, in f64 or
    /// (`single`) in f32 with the operands rounded and the result widened to f64.
    fn input_product(&self, transpose: bool, b: &[f64], cols: usize, single: bool, par: Par) -> Vec<f64> {
        let r = self.inputs.len() / self.width.max(1);
        if let Some(sparse) = &self.sparse {
            if !single {
                return sparse.product(transpose, b, cols, par);
            }
            let sparse32 = self.sparse32.get_or_init(|| SparseRows::from_column_major(&self.inputs, r, self.width));
            return sparse32.as_ref().expect("as sparse as in f64").product(transpose, b, cols, par);
        }
        let (rows, inner) = if transpose { (self.width, r) } else { (r, self.width) };
        if !single {
            let x = MatRef::from_column_major_slice(&self.inputs, r, self.width);
            let x = if transpose { x.transpose() } else { x };
            let mut out = vec![0.0; rows * cols];
            let b = MatRef::from_column_major_slice(b, inner, cols);
            matmul(MatMut::from_column_major_slice_mut(&mut out, rows, cols), Accum::Replace, x, b, 1.0, par);
            return out;
        }
        let inputs32 = self.inputs32.get_or_init(|| self.inputs.iter().map(|v| narrow(*v)).collect());
        let x = MatRef::from_column_major_slice(inputs32, r, self.width);
        let x = if transpose { x.transpose() } else { x };
        let b32: Vec<f32> = b.iter().map(|v| narrow(*v)).collect();
        let mut out = vec![0.0f32; rows * cols];
        let b = MatRef::from_column_major_slice(&b32, inner, cols);
        matmul(MatMut::from_column_major_slice_mut(&mut out, rows, cols), Accum::Replace, x, b, 1.0, par);
        out.into_iter().map(f64::from).collect()
    }
}

impl ChunkFactors {
    /// The factors of a chunk: one forward and C backward passes (m_i = z_ic per class c).
    pub(crate) fn of<M: Model>(objective: &Objective<M>, batch: &M::Batch) -> Self {
        let net = &objective.model;
        let probabilities = objective.probabilities(batch);
        let mut layers: Vec<LayerChunk> = Vec::with_capacity(net.layers().len());
        for c in 0..net.num_classes() {
            for (l, f) in logit_factors(net, batch, c).into_iter().enumerate() {
                if c == 0 {
                    let positions = f.input.dims()[2];
                    let inputs = column_major(flatten_positions(f.input.clone()));
                    let width = net.layers()[l].inputs;
                    let sparse = SparseRows::from_column_major(&inputs, inputs.len() / width.max(1), width);
                    let (input, bias, mask) = (f.input, f.bias, f.mask);
                    let nonzero = Vec::new();
                    layers.push(LayerChunk {
                        inputs,
                        inputs32: OnceLock::new(),
                        sparse,
                        sparse32: OnceLock::new(),
                        width,
                        logit_grads: Vec::new(),
                        positions,
                        input,
                        bias,
                        mask,
                        nonzero,
                    });
                }
                let g = column_major(flatten_positions(f.output_grad));
                let rows = batch.len() * layers[l].positions;
                layers[l].nonzero.extend(g.chunks_exact(rows.max(1)).map(|column| column.iter().any(|v| *v != 0.0)));
                layers[l].logit_grads.push(g);
            }
        }
        Self { rows: batch.len(), probabilities, layers, rows32: OnceLock::new() }
    }

    /// The chunk's f32 row-major copy ([`RowChunk`]), made on first use; `None` when a layer
    /// acts at several positions.
    pub(crate) fn rows32(&self) -> Option<&RowChunk> {
        self.rows32.get_or_init(|| RowChunk::of(self)).as_ref()
    }

    /// Bytes the factors of one example take, at most (inputs kept three times: as taps,
    /// column-major, and in f32 once a single-precision product asks; and when sparse, their
    /// non-zeros in f64 and f32 with their columns, at most 0.3 · 20 bytes an input; plus the f32
    /// row-major copy of single-precision products, [`RowChunk::bytes_per_example`]).
    pub(crate) fn bytes_per_example(layers: &[culprit_models::model::TrackedLayer], classes: usize) -> usize {
        layers.iter().map(|l| (7 * l.inputs + 2 * classes * l.outputs) * l.positions).sum::<usize>() * 4
            + RowChunk::bytes_per_example(layers, classes)
    }

    /// Per layer, the loss gradient at the layer's output when the label is `class`,
    /// ∂(−log p_c)/∂out = Σ_k (p_k − [k = c]) ∂z_k/∂out, as `[b, out, L]` row-major: the linear
    /// combination of the cached logit gradients that a backward pass with target c would give.
    /// Cost C·b·L·out per layer.
    pub(crate) fn fisher_output_grads(&self, class: usize) -> Vec<Vec<f64>> {
        let b = self.rows;
        let classes = self.probabilities.len() / b.max(1);
        self.layers
            .iter()
            .map(|layer| {
                let (positions, grads) = (layer.positions, &layer.logit_grads);
                let r = b * positions;
                let out = grads[0].len() / r.max(1);
                // Column-major sums first (contiguous), then one transpose to [b, out, L].
                let mut columns = vec![0.0; r * out];
                for (k, gk) in grads.iter().enumerate() {
                    let indicator = f64::from(u8::from(k == class));
                    let coefficients: Vec<f64> =
                        (0..r).map(|row| self.probabilities[(row / positions) * classes + k] - indicator).collect();
                    for o in (0..out).filter(|&o| layer.nonzero[k * out + o]) {
                        let target = &mut columns[o * r..(o + 1) * r];
                        let column = &gk[o * r..(o + 1) * r];
                        target.iter_mut().zip(column).zip(&coefficients).for_each(|((t, g), a)| *t += a * g);
                    }
                }
                let mut g = vec![0.0; r * out];
                for (o, column) in columns.chunks_exact(r).enumerate() {
                    for (row, v) in column.iter().enumerate() {
                        let (i, l) = (row / positions, row % positions);
                        g[(i * out + o) * positions + l] = *v;
                    }
                }
                g
            })
            .collect()
    }
}

/// k directions split by layer: per layer the weights side by side, `[in, k·out]` column-major
/// (column q·out + o is output o of direction q), so that `inputs · W` is every direction's
/// change of the layer's output at once; and the biases, index q·out + o.
struct LayerDirections {
    weights: Vec<f64>,
    biases: Option<Vec<f64>>,
}

/// The exact Gauss–Newton operator of the objective (see the module docs), for models with one
/// prediction row per example.
///
/// A product with k directions at once ([`LinearOperator::apply_many`]), per chunk and layer of
/// `in → out` over r rows: Jv is one GEMM `inputs · W` (2·r·in·out·k flops) and a sweep
/// Σ_o ∂z_c/∂out_o · (XW)_o (2·C·r·out·k); Jᵀu is a sweep Δ = Σ_c u_c ∂z_c/∂out (the same) and
/// one GEMM `inputsᵀ · Δ`. No per-example gradient is ever formed, and the k directions share
/// every pass over the factors, so a block of queries costs about one product's memory traffic.
/// Chunks run in parallel, each summing into its own output.
pub struct GaussNewton<'a, M: Model> {
    objective: &'a Objective<M>,
    chunk: usize,
    single: bool,
}

/// `[b, rest…]` inputs or output gradients → rows per (example, position): `[b·L, features]`.
fn flatten_positions(t: Tensor<3>) -> Tensor<2> {
    let [b, f, l] = t.dims();
    t.swap_dims(1, 2).reshape([b * l, f])
}

/// A `[r, f]` tensor as a column-major f64 buffer.
fn column_major(t: Tensor<2>) -> Vec<f64> {
    let [r, f] = t.dims();
    let row_major = read_f64(t);
    let mut out = vec![0.0; r * f];
    for (i, row) in row_major.chunks_exact(f).enumerate() {
        for (j, x) in row.iter().enumerate() {
            out[j * r + i] = *x;
        }
    }
    out
}

impl<'a, M: Model> GaussNewton<'a, M> {
    /// The GGN of `objective`: its per-class factors come from the objective's cache
    /// ([`Objective::cached_factors`]) when they fit, else they are recomputed in chunks of
    /// `chunk` examples for every product.
    pub fn new(objective: &'a Objective<M>, chunk: usize) -> Self {
        objective.cached_factors();
        Self { objective, chunk: chunk.max(1), single: false }
    }

    /// The same operator with its two GEMMs per layer in f32 (about twice the speed; each product
    /// within 1e-5 relative of the f64 one, tested): for the iterations of a solve whose tolerance
    /// allows it, with the f64 operator confirming the result.
    pub fn single_precision(objective: &'a Objective<M>, chunk: usize) -> Self {
        Self { single: true, ..Self::new(objective, chunk) }
    }

    fn chunks(&self) -> impl Iterator<Item = ChunkFactors> + '_ {
        let o = self.objective;
        let ranges = o.data.groups().chunks(o.len(), self.chunk, culprit_models::model::ROWS_PER_CHUNK);
        ranges.into_iter().map(move |range| ChunkFactors::of(o, &o.data.slice(range)))
    }

    /// outs[q] += scale · Σ_chunk Jᵢᵀ(diag pᵢ − pᵢpᵢᵀ)Jᵢ v_q over the chunk's examples.
    ///
    /// The sweeps between the GEMMs are compiled for AVX-512F or AVX2+FMA where the CPU has them
    /// (chosen at run time): in the baseline x86-64 instruction set they take as long as the
    /// GEMMs themselves.
    fn apply_chunk(&self, f: &ChunkFactors, dirs: &[LayerDirections], outs: &mut [Vec<f64>], scale: f64, par: Par) {
        #[cfg(target_arch = "x86_64")]
        {
            if InstructionSet::chosen() == InstructionSet::Avx512 {
                // SAFETY: `chosen` returns only a set the CPU supports.
                return unsafe { self.apply_chunk_avx512(f, dirs, outs, scale, par) };
            }
            if InstructionSet::chosen() == InstructionSet::Avx2 {
                // SAFETY: `chosen` returns only a set the CPU supports.
                return unsafe { self.apply_chunk_avx2(f, dirs, outs, scale, par) };
            }
        }
        self.apply_chunk_plain(f, dirs, outs, scale, par)
    }

    /// [`Self::apply_chunk_plain`] compiled for AVX-512F.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn apply_chunk_avx512(
        &self,
        f: &ChunkFactors,
        dirs: &[LayerDirections],
        outs: &mut [Vec<f64>],
        scale: f64,
        par: Par,
    ) {
        self.apply_chunk_plain(f, dirs, outs, scale, par)
    }

    /// [`Self::apply_chunk_plain`] compiled for AVX2 with FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_chunk_avx2(
        &self,
        f: &ChunkFactors,
        dirs: &[LayerDirections],
        outs: &mut [Vec<f64>],
        scale: f64,
        par: Par,
    ) {
        self.apply_chunk_plain(f, dirs, outs, scale, par)
    }

    #[inline(always)]
    fn apply_chunk_plain(
        &self,
        f: &ChunkFactors,
        dirs: &[LayerDirections],
        outs: &mut [Vec<f64>],
        scale: f64,
        par: Par,
    ) {
        let k = outs.len();
        let jv = self.jacobian_products(f, dirs, k, par);
        let classes = self.objective.model.num_classes();
        let b = f.rows;
        // The probabilities by class, p_c = [b].
        let mut by_class = vec![0.0; classes * b];
        for (i, p) in f.probabilities.chunks_exact(classes).enumerate() {
            for (c, v) in p.iter().enumerate() {
                by_class[c * b + i] = *v;
            }
        }
        // u = (diag p − p pᵀ) Jv · scale, laid out [C][k][b] as Jv: per direction, pᵀJv per
        // example, then every class's u, each a contiguous sweep over the chunk's examples.
        let mut u = vec![0.0; classes * k * b];
        let mut pj = vec![0.0; b];
        for q in 0..k {
            pj.fill(0.0);
            for c in 0..classes {
                let (p, jvc) = (&by_class[c * b..(c + 1) * b], &jv[(c * k + q) * b..(c * k + q + 1) * b]);
                pj.iter_mut().zip(p).zip(jvc).for_each(|((s, p), j)| *s += p * j);
            }
            for c in 0..classes {
                let at = (c * k + q) * b;
                let (p, jvc) = (&by_class[c * b..(c + 1) * b], &jv[at..at + b]);
                for (((u, p), j), s) in u[at..at + b].iter_mut().zip(p).zip(jvc).zip(&pj) {
                    *u = p * (j - s) * scale;
                }
            }
        }
        self.add_transposed_products(f, &u, outs, par);
    }

    /// Jv for every class, direction and example of a chunk, `[C][k][b]`, summed over layers.
    #[inline(always)]
    fn jacobian_products(&self, f: &ChunkFactors, dirs: &[LayerDirections], k: usize, par: Par) -> Vec<f64> {
        let classes = self.objective.model.num_classes();
        let b = f.rows;
        let mut jv = vec![0.0; classes * k * b];
        for ((layer, dir), spec) in f.layers.iter().zip(dirs).zip(self.objective.model.layers()) {
            let (r, out) = (b * layer.positions, spec.outputs);
            let mut xw = layer.input_product(false, &dir.weights, k * out, self.single, par);
            if let Some(bias) = &dir.biases {
                for (column, beta) in xw.chunks_exact_mut(r).zip(bias) {
                    column.iter_mut().for_each(|v| *v += beta);
                }
            }
            let mut per_row = vec![0.0; r];
            for c in 0..classes {
                for q in 0..k {
                    let target = &mut jv[(c * k + q) * b..(c * k + q + 1) * b];
                    let sums = if layer.positions == 1 {
                        &mut *target
                    } else {
                        per_row.fill(0.0);
                        &mut per_row
                    };
                    for o in (0..out).filter(|&o| layer.nonzero[c * out + o]) {
                        let g = &layer.logit_grads[c][o * r..(o + 1) * r];
                        let d = &xw[(q * out + o) * r..(q * out + o + 1) * r];
                        sums.iter_mut().zip(g).zip(d).for_each(|((acc, g), d)| *acc += g * d);
                    }
                    if layer.positions > 1 {
                        for (t, rows) in target.iter_mut().zip(per_row.chunks_exact(layer.positions)) {
                            *t += rows.iter().sum::<f64>();
                        }
                    }
                }
            }
        }
        jv
    }

    /// outs[q] += Jᵀu_q: per layer Δ = Σ_c u_c ∂z_c/∂out per row, then inputsᵀ Δ in the weight's
    /// layout, and Σ_rows Δ for the bias.
    #[inline(always)]
    fn add_transposed_products(&self, f: &ChunkFactors, u: &[f64], outs: &mut [Vec<f64>], par: Par) {
        let classes = self.objective.model.num_classes();
        let (b, k) = (f.rows, outs.len());
        let mut offset = 0;
        for (layer, spec) in f.layers.iter().zip(self.objective.model.layers()) {
            let (r, inputs, out) = (b * layer.positions, spec.inputs, spec.outputs);
            let mut delta = vec![0.0; r * k * out];
            for (column, target) in delta.chunks_exact_mut(r).enumerate() {
                let (q, o) = (column / out, column % out);
                for c in (0..classes).filter(|&c| layer.nonzero[c * out + o]) {
                    let g = &layer.logit_grads[c][o * r..(o + 1) * r];
                    let uc = &u[(c * k + q) * b..(c * k + q + 1) * b];
                    if layer.positions == 1 {
                        target.iter_mut().zip(g).zip(uc).for_each(|((t, g), weight)| *t += weight * g);
                        continue;
                    }
                    for ((rows, g), weight) in
                        target.chunks_exact_mut(layer.positions).zip(g.chunks_exact(layer.positions)).zip(uc)
                    {
                        rows.iter_mut().zip(g).for_each(|(t, g)| *t += weight * g);
                    }
                }
            }
            let gw = layer.input_product(true, &delta, k * out, self.single, par); // [in, k·out]
            for (q, target) in outs.iter_mut().enumerate() {
                let block = &gw[q * out * inputs..(q + 1) * out * inputs]; // [in, out], column-major
                let weights = &mut target[offset..offset + spec.weight_len()];
                match spec.layout {
                    // weights[i·out + o], by tiles of 16 inputs: the 16 rows of the target stay
                    // cached while every output of the tile's inputs is added.
                    WeightLayout::InputMajor => {
                        for i0 in (0..inputs).step_by(16) {
                            let i1 = (i0 + 16).min(inputs);
                            for o in 0..out {
                                for (i, g) in (i0..i1).zip(&block[o * inputs + i0..o * inputs + i1]) {
                                    weights[i * out + o] += g;
                                }
                            }
                        }
                    }
                    // weights[o·in + i]: the block as laid out
                    WeightLayout::OutputMajor => weights.iter_mut().zip(block).for_each(|(w, g)| *w += g),
                }
                if spec.bias {
                    let bias = &mut target[offset + spec.weight_len()..offset + spec.weight_len() + out];
                    for (o, t) in bias.iter_mut().enumerate() {
                        *t += delta[(q * out + o) * r..(q * out + o + 1) * r].iter().sum::<f64>();
                    }
                }
            }
            offset += spec.weight_len() + spec.bias_len();
        }
    }

    /// Splits k tracked-space directions by layer (see [`LayerDirections`]).
    fn split(&self, vs: &[&[f64]]) -> Vec<LayerDirections> {
        let k = vs.len();
        let mut offset = 0;
        let mut dirs = Vec::new();
        for spec in self.objective.model.layers() {
            let (inputs, out) = (spec.inputs, spec.outputs);
            let mut weights = vec![0.0; inputs * k * out];
            for (q, v) in vs.iter().enumerate() {
                let w = &v[offset..offset + spec.weight_len()];
                for o in 0..out {
                    let column = &mut weights[(q * out + o) * inputs..(q * out + o + 1) * inputs];
                    match spec.layout {
                        WeightLayout::InputMajor => {
                            column.iter_mut().enumerate().for_each(|(i, c)| *c = w[i * out + o])
                        }
                        WeightLayout::OutputMajor => column.copy_from_slice(&w[o * inputs..(o + 1) * inputs]),
                    }
                }
            }
            offset += spec.weight_len();
            let b = spec.bias_len();
            let biases = (b > 0).then(|| vs.iter().flat_map(|v| v[offset..offset + b].iter().copied()).collect());
            offset += b;
            dirs.push(LayerDirections { weights, biases });
        }
        dirs
    }

    /// λv_q for every direction: where the products add up.
    fn regularised(&self, vs: &[&[f64]]) -> Vec<Vec<f64>> {
        vs.par_iter().map(|v| v.iter().map(|x| self.objective.l2 * x).collect()).collect()
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
        self.apply_many(&[v]).pop().expect("one direction")
    }

    fn apply_many(&self, vs: &[&[f64]]) -> Vec<Vec<f64>> {
        let scale = 1.0 / self.objective.len() as f64;
        let mut outs = self.regularised(vs);
        let cached = self.objective.cached_factors();
        // Single precision, every layer dense: the row-major f32 products.
        if let Some(chunks) = cached.filter(|_| self.single) {
            let row_chunks: Option<Vec<&RowChunk>> = chunks.iter().map(ChunkFactors::rows32).collect();
            if let Some(row_chunks) = row_chunks {
                let sums = rows::products(&row_chunks, self.objective.model.layers(), vs, scale);
                outs.par_iter_mut().zip(&sums).for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(x, y)| *x += y));
                return outs;
            }
        }
        let dirs = self.split(vs);
        match cached {
            Some(chunks) => {
                let zero = || vec![vec![0.0; self.dim()]; vs.len()];
                let sum = chunks
                    .par_iter()
                    .fold(zero, |mut acc, c| {
                        self.apply_chunk(c, &dirs, &mut acc, scale, Par::Seq);
                        acc
                    })
                    .reduce(zero, |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(x, y)| *x += y));
                        a
                    });
                outs.iter_mut().zip(&sum).for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(x, y)| *x += y));
            }
            None => self.chunks().for_each(|c| self.apply_chunk(&c, &dirs, &mut outs, scale, Par::rayon(0))),
        }
        outs
    }
}

impl<M: Model> SampledOperator for GaussNewton<'_, M> {
    /// (1/|rows|) Σ Jᵢᵀ(diag pᵢ − pᵢpᵢᵀ)Jᵢ v + λv over the examples `rows`.
    fn apply_rows(&self, v: &[f64], rows: &[usize]) -> Vec<f64> {
        let f = ChunkFactors::of(self.objective, &self.objective.data.gather(rows));
        let dirs = self.split(&[v]);
        let mut outs = self.regularised(&[v]);
        self.apply_chunk(&f, &dirs, &mut outs, 1.0 / rows.len() as f64, Par::rayon(0));
        outs.pop().expect("one direction")
    }
}

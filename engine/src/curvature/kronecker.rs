//! Kronecker-factored curvature: K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse &
//! Martens 2016) and EK-FAC (George et al. 2018), as used for influence by Grosse et al. (2023).
//!
//! Per layer, in the layer's "Kronecker view" G ∈ ℝ^{m×o} of its gradient (m = inputs + 1 with
//! the bias as a constant-1 input, o = outputs; for a dense layer this is exactly θ's layout):
//!
//! - A = (1/(nL)) Σᵢ Σₗ ãᵢₗ ãᵢₗᵀ (inputs, averaged over the L positions of a convolution),
//! - S = (1/n) Σᵢ Σ_c p_ic Σₗ δᵢₗ⁽ᶜ⁾ δᵢₗ⁽ᶜ⁾ᵀ, δ⁽ᶜ⁾ the output gradient of −log p_c: the **true**
//!   Fisher, with the expectation over the model's own predictive distribution computed exactly
//!   (not sampled, not the empirical Fisher at the labels), which for softmax cross-entropy is the
//!   GGN's output factor.
//! - K-FAC: the layer's GGN block ≈ A ⊗ S = (Q_A ⊗ Q_S) diag(λ_A ⊗ λ_S) (Q_A ⊗ Q_S)ᵀ.
//! - EK-FAC: the same eigenbasis, with the eigenvalues re-fitted to the exact second moments of
//!   the per-example, per-class gradients in that basis:
//!   Λ*_{jo} = (1/n) Σᵢ Σ_c p_ic ((Q_Aᵀ Gᵢ⁽ᶜ⁾ Q_S)_{jo})².
//!
//! Inverse: (block + (λ + δ) I)⁻¹ V = Q_A [(Q_Aᵀ V Q_S) ⊘ (Λ + λ + δ)] Q_Sᵀ, with λ the objective's
//! own L2 coefficient (its Hessian term λI is added exactly, not folded into a factor) and δ the
//! extra damping. What makes this faithful where a published EK-FAC scores 0.02 Pearson on
//! logistic regression: the bias lives inside the Kronecker factors (ã = [a; 1]) instead of being
//! dropped, the L2 term of the objective is part of the curvature, the Fisher is the true one
//! (expectation over the model's classes), and the damping is added in the eigenbasis exactly.
//!
//! Cost: C backward passes per pass over the data (two passes for EK-FAC), eigendecompositions of
//! m×m and o×o per layer, and per solve two small products per layer. Memory: m² + o² + m·o per
//! layer.

use std::any::Any;

use burn::tensor::{DType, Tensor, TensorData};
use culprit_models::model::{TrackedLayer, WeightLayout};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par, Side};
use rayon::prelude::*;

use super::operators::LinearOperator;
use super::{CurvatureError, CurvatureSource, FisherSample, Fitted, LoadContext, Solution};
use crate::error::Result;
use crate::gradients::{LayerFactors, read_f64};
use crate::io::container::Arrays;
use crate::simd::{narrow, narrow_matrix};

/// One layer's factors.
#[derive(Clone, Debug)]
pub struct KroneckerLayer {
    /// m = inputs (+1 with a bias).
    pub m: usize,
    /// o = outputs.
    pub o: usize,
    /// Eigenvectors of A (m×m).
    pub q_a: Mat<f64>,
    /// Eigenvectors of S (o×o).
    pub q_s: Mat<f64>,
    /// Eigenvalues Λ (m×o, row-major): λ_A ⊗ λ_S for K-FAC, re-fitted for EK-FAC.
    pub eigenvalues: Vec<f64>,
}

/// K-FAC or EK-FAC factors of a whole model.
#[derive(Clone, Debug)]
pub struct KroneckerFactors {
    /// Per tracked layer.
    pub layers: Vec<KroneckerLayer>,
    /// The objective's λ.
    pub l2: f64,
    /// The extra damping δ of solves through [`Fitted`].
    pub damping: f64,
    /// The tracked layers the factors belong to.
    pub tracked: Vec<TrackedLayer>,
}

/// Inputs with the constant-1 bias row: `[b, L, m]`.
fn augmented_inputs(f: &LayerFactors) -> Tensor<3> {
    f.augmented_inputs()
}

fn to_mat(t: Tensor<2>) -> Mat<f64> {
    let [r, c] = t.dims();
    let v = read_f64(t);
    Mat::from_fn(r, c, |i, j| v[i * c + j])
}

fn from_mat(m: &Mat<f64>, device: &burn::tensor::Device, dtype: DType) -> Tensor<2> {
    let (r, c) = (m.nrows(), m.ncols());
    let v: Vec<f64> = (0..r * c).map(|k| m[(k / c, k % c)]).collect();
    tensor(v, [r, c], device, dtype)
}

/// A tensor of `values` in the factors' dtype.
fn tensor<const D: usize>(
    values: Vec<f64>,
    shape: [usize; D],
    device: &burn::tensor::Device,
    dtype: DType,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape).convert_dtype(dtype), (device, dtype))
}

fn add(acc: &mut Option<Tensor<2>>, t: Tensor<2>) {
    *acc = Some(match acc.take() {
        Some(a) => a + t,
        None => t,
    })
}

/// The Kronecker statistics A = (1/N) Σ ããᵀ over the N real positions of all examples and
/// S = Σ_samples Σᵢ wᵢ Σₗ δδᵀ of every layer.
fn second_moments(source: &dyn CurvatureSource, chunk: usize) -> (Vec<Tensor<2>>, Vec<Tensor<2>>) {
    let count = source.layers().len();
    let mut a_sum: Vec<Option<Tensor<2>>> = vec![None; count];
    let mut a_count = vec![0.0f64; count];
    let mut s_sum: Vec<Option<Tensor<2>>> = vec![None; count];
    source.for_each_fisher_sample(chunk, &mut |sample: FisherSample<'_>| {
        let b = sample.weights.len();
        for (l, f) in sample.factors.iter().enumerate() {
            let positions = f.input.dims()[2];
            if sample.first {
                let a = augmented_inputs(f); // [b, L, m]
                let m = a.dims()[2];
                let x = a.reshape([b * positions, m]);
                add(&mut a_sum[l], x.clone().transpose().matmul(x));
                a_count[l] += f.positions();
            }
            // Rows (example, position) of the output gradient, weighted by √wᵢ.
            let weights: Vec<f64> =
                sample.weights.iter().flat_map(|v| std::iter::repeat_n(v.sqrt(), positions)).collect();
            let device = f.output_grad.device();
            let w = tensor(weights, [b * positions], &device, f.input.dtype()).reshape([b * positions, 1]);
            let [_, o, _] = f.output_grad.dims();
            let d = f.output_grad.clone().swap_dims(1, 2).reshape([b * positions, o]) * w;
            add(&mut s_sum[l], d.clone().transpose().matmul(d));
        }
    });
    let a = a_sum.into_iter().zip(a_count).map(|(t, c)| t.expect("every layer has inputs").div_scalar(c)).collect();
    (a, s_sum.into_iter().map(|t| t.expect("every layer has output gradients")).collect())
}

/// Eigendecomposition of a symmetric factor; eigenvalues clipped at 0.
fn eigen(t: Tensor<2>, what: &str, layer: &str) -> Result<(Mat<f64>, Vec<f64>), CurvatureError> {
    let mat = to_mat(t);
    let e = mat
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| CurvatureError::Config(format!("{what} eigendecomposition of layer {layer}: {e:?}")))?;
    let s = e.S().column_vector();
    Ok((e.U().to_owned(), (0..mat.nrows()).map(|i| s[i].max(0.0)).collect()))
}

/// EK-FAC's eigenvalues: Λ*_{jo} = Σ_samples Σᵢ wᵢ ((Q_Aᵀ Gᵢ Q_S)_{jo})² per layer.
fn refit_eigenvalues(source: &dyn CurvatureSource, chunk: usize, layers: &mut [KroneckerLayer]) {
    let mut bases: Option<Vec<(Tensor<2>, Tensor<2>)>> = None;
    let mut sums: Vec<Option<Tensor<2>>> = vec![None; layers.len()];
    // Dense layers, per chunk: (Q_Aᵀã)² of its examples (the same for every sample of a chunk)
    // and Σ_samples w·(Q_Sᵀδ)² so far; their product is added when the chunk ends.
    let mut pending: Vec<Option<(Tensor<2>, Tensor<2>)>> = vec![None; layers.len()];
    let flush = |sums: &mut [Option<Tensor<2>>], pending: &mut [Option<(Tensor<2>, Tensor<2>)>]| {
        for (sum, p) in sums.iter_mut().zip(pending) {
            if let Some((pa, pd)) = p.take() {
                add(sum, pa.transpose().matmul(pd));
            }
        }
    };
    source.for_each_fisher_sample(chunk, &mut |sample: FisherSample<'_>| {
        let b = sample.weights.len();
        let device = sample.factors[0].input.device();
        let dtype = sample.factors[0].input.dtype();
        let bases = bases.get_or_insert_with(|| {
            layers.iter().map(|k| (from_mat(&k.q_a, &device, dtype), from_mat(&k.q_s, &device, dtype))).collect()
        });
        if sample.first {
            flush(&mut sums, &mut pending);
        }
        let w = tensor(sample.weights.to_vec(), [b], &device, dtype);
        for (l, f) in sample.factors.iter().enumerate() {
            let (qa, qs) = &bases[l];
            let [m, _] = qa.dims();
            let [o, _] = qs.dims();
            let positions = f.input.dims()[2];
            let d = f.output_grad.clone().swap_dims(1, 2); // [b, L, o]
            if positions == 1 {
                // Dense: the gradient in the eigenbasis is rank one, (Q_Aᵀã) ⊗ (Q_Sᵀδ), so its
                // square is (Q_Aᵀã)² ⊗ (Q_Sᵀδ)², and the weighted sum over a chunk's samples is
                // one product (Q_Aᵀã)²ᵀ · Σ_samples w(Q_Sᵀδ)²: b·m² + C·b·o² + b·m·o flops a
                // chunk instead of C·b·m·o for the last term.
                let pd = d.reshape([b, o]).matmul(qs.clone()).square() * w.clone().reshape([b, 1]);
                pending[l] = Some(match pending[l].take() {
                    Some((pa, acc)) => (pa, acc + pd),
                    None => (augmented_inputs(f).reshape([b, m]).matmul(qa.clone()).square(), pd),
                });
            } else {
                let pa = augmented_inputs(f).matmul(qa.clone().reshape([1, m, m])); // [b, L, m]
                let pd = d.matmul(qs.clone().reshape([1, o, o])); // [b, L, o]
                let g = pa.swap_dims(1, 2).matmul(pd); // [b, m, o]
                add(&mut sums[l], (g.square() * w.clone().reshape([b, 1, 1])).sum_dim(0).reshape([m, o]));
            }
        }
    });
    flush(&mut sums, &mut pending);
    for (layer, sum) in layers.iter_mut().zip(sums) {
        layer.eigenvalues = read_f64(sum.expect("every layer"));
    }
}

/// Fits K-FAC (`refit = false`) or EK-FAC (`refit = true`) factors of `source` in chunks of
/// `options.chunk`, with `options.damping` the δ of later solves and `options.relative_damping`
/// (F) folded into the eigenvalues: Λ_l ← Λ_l + F·mean(Λ_l) per layer. Cost: one (K-FAC) or two
/// (EK-FAC) sweeps of the Fisher samples.
pub fn fit(
    source: &dyn CurvatureSource,
    refit: bool,
    options: &super::FitOptions,
) -> Result<KroneckerFactors, CurvatureError> {
    let (chunk, damping) = (options.chunk, options.damping);
    let tracked = source.layers().to_vec();
    let (a, s) = second_moments(source, chunk);
    let mut layers = Vec::with_capacity(tracked.len());
    for ((spec, a), s) in tracked.iter().zip(a).zip(s) {
        let (m, o) = (spec.view_rows(), spec.outputs);
        let (q_a, la) = eigen(a, "A", &spec.name)?;
        let (q_s, ls) = eigen(s, "S", &spec.name)?;
        let eigenvalues = (0..m * o).map(|k| la[k / o] * ls[k % o]).collect();
        layers.push(KroneckerLayer { m, o, q_a, q_s, eigenvalues });
    }
    if refit {
        refit_eigenvalues(source, chunk, &mut layers);
    }
    if options.relative_damping > 0.0 {
        for layer in &mut layers {
            let mean = layer.eigenvalues.iter().sum::<f64>() / layer.eigenvalues.len().max(1) as f64;
            layer.eigenvalues.iter_mut().for_each(|e| *e += options.relative_damping * mean);
        }
    }
    Ok(KroneckerFactors { layers, l2: source.l2(), damping, tracked })
}

impl KroneckerFactors {
    /// (G̃ + (λ + damping) I)⁻¹ q, layer by layer (block-diagonal). Cost Σ_layers m·o·(m + o).
    pub fn solve_one(&self, q: &[f64], damping: f64) -> Vec<f64> {
        let mut solved = per_layer_many(&self.tracked, &[q], |l, views| {
            let k = &self.layers[l];
            let inverse: Vec<f64> = k.eigenvalues.iter().map(|e| 1.0 / (e + self.l2 + damping)).collect();
            in_eigenbasis(&k.q_a, &k.q_s, &inverse, views, |v| v, |v| v)
        });
        solved.pop().expect("one vector")
    }

    /// [`KroneckerFactors::solve_one`]'s operator in single precision, for preconditioning
    /// (CG's preconditioner need only be a fixed positive definite approximation: its rounding,
    /// about 1e-7 relative, changes the directions, never the residuals CG checks). On the
    /// MNIST MLP 784-256-10 it made a CG iteration 13% cheaper (Zen 3, README).
    pub fn single_precision(&self, damping: f64) -> SinglePrecisionInverse<'_> {
        let layers = self
            .layers
            .iter()
            .map(|k| SingleLayer {
                q_a: narrow_matrix(&k.q_a),
                q_s: narrow_matrix(&k.q_s),
                inverse: k.eigenvalues.iter().map(|e| narrow(1.0 / (e + self.l2 + damping))).collect(),
            })
            .collect();
        SinglePrecisionInverse { layers, tracked: &self.tracked }
    }

    /// Self-influence gᵢᵀ(G̃ + (λ + damping) I)⁻¹gᵢ of per-example gradients given by their layer
    /// factors (block-diagonal: summed over layers), without forming gᵢ or solving: in the
    /// eigenbasis a dense layer's gradient is rank one, (Q_Aᵀãᵢ) ⊗ (Q_Sᵀδᵢ), so its self-influence
    /// is Σ_jo (Q_Aᵀãᵢ)²_j (Q_Sᵀδᵢ)²_o / (Λ_jo + λ + δ), one product per batch. Cost per example
    /// Σ_layers (m² + o² + m·o) for dense layers; sums over positions form the m×o gradient in the
    /// basis (L·m·o more). Computed in the factors' dtype.
    pub fn factored_self_influence(&self, factors: &[LayerFactors], damping: f64) -> Vec<f64> {
        let device = factors[0].input.device();
        let dtype = factors[0].input.dtype();
        let b = factors[0].input.dims()[0];
        let mut total = vec![0.0f64; b];
        for (f, k) in factors.iter().zip(&self.layers) {
            let (m, o) = (k.m, k.o);
            let qa = from_mat(&k.q_a, &device, dtype);
            let qs = from_mat(&k.q_s, &device, dtype);
            let inverse: Vec<f64> = k.eigenvalues.iter().map(|e| 1.0 / (e + self.l2 + damping)).collect();
            let w = tensor(inverse, [m, o], &device, dtype);
            let a = augmented_inputs(f); // [b, L, m]
            let positions = a.dims()[1];
            let d = f.output_grad.clone().swap_dims(1, 2); // [b, L, o]
            let per = if positions == 1 {
                let pa = a.reshape([b, m]).matmul(qa).square();
                let pd = d.reshape([b, o]).matmul(qs).square();
                (pa.matmul(w) * pd).sum_dim(1).reshape([b])
            } else {
                let pa = a.matmul(qa.reshape([1, m, m]));
                let pd = d.matmul(qs.reshape([1, o, o]));
                let g = pa.swap_dims(1, 2).matmul(pd); // [b, m, o]
                (g.square() * w.reshape([1, m, o])).sum_dim(2).sum_dim(1).reshape([b])
            };
            for (t, v) in total.iter_mut().zip(read_f64(per)) {
                *t += v;
            }
        }
        total
    }

    /// The factors as curvature-file arrays (`q_a.L`, `q_s.L`, `eigenvalues.L` per layer).
    pub fn push_arrays(&self, arrays: &mut Arrays) {
        for (l, layer) in self.layers.iter().enumerate() {
            let values = |m: &Mat<f64>| (0..m.nrows() * m.ncols()).map(|k| m[(k / m.ncols(), k % m.ncols())]).collect();
            arrays.push(format!("q_a.{l}"), vec![layer.m, layer.m], values(&layer.q_a));
            arrays.push(format!("q_s.{l}"), vec![layer.o, layer.o], values(&layer.q_s));
            arrays.push(format!("eigenvalues.{l}"), vec![layer.m, layer.o], layer.eigenvalues.clone());
        }
    }

    /// The factors from a curvature file, checked against the model's tracked layers.
    pub fn from_arrays(arrays: &mut Arrays, ctx: &LoadContext<'_>) -> Result<Self> {
        let mut layers = Vec::with_capacity(ctx.layers.len());
        for (l, spec) in ctx.layers.iter().enumerate() {
            let (m, o) = (spec.view_rows(), spec.outputs);
            let (_, qa) = arrays.take(ctx.path, &format!("q_a.{l}"), Some(&[m, m]))?;
            let (_, qs) = arrays.take(ctx.path, &format!("q_s.{l}"), Some(&[o, o]))?;
            let (_, eigenvalues) = arrays.take(ctx.path, &format!("eigenvalues.{l}"), Some(&[m, o]))?;
            let q_a = Mat::from_fn(m, m, |i, j| qa[i * m + j]);
            let q_s = Mat::from_fn(o, o, |i, j| qs[i * o + j]);
            layers.push(KroneckerLayer { m, o, q_a, q_s, eigenvalues });
        }
        Ok(Self { layers, l2: ctx.l2, damping: ctx.options.damping, tracked: ctx.layers.to_vec() })
    }
}

impl Fitted for KroneckerFactors {
    fn solve(&self, _: &dyn CurvatureSource, queries: &[Vec<f64>]) -> Result<Vec<Solution>> {
        Ok(queries.iter().map(|q| (self.solve_one(q, self.damping), None)).collect())
    }

    fn self_influence(&self, _: &dyn CurvatureSource, factors: &[LayerFactors]) -> Result<Vec<f64>> {
        Ok(self.factored_self_influence(factors, self.damping))
    }

    fn arrays(&self) -> Arrays {
        let mut arrays = Arrays::new();
        self.push_arrays(&mut arrays);
        arrays
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// One layer of [`SinglePrecisionInverse`].
struct SingleLayer {
    q_a: Mat<f32>,
    q_s: Mat<f32>,
    /// 1/(Λ + λ + δ), m×o row-major.
    inverse: Vec<f32>,
}

/// (G̃ + (λ + δ) I)⁻¹ with f32 eigenvectors ([`KroneckerFactors::single_precision`]).
pub struct SinglePrecisionInverse<'a> {
    layers: Vec<SingleLayer>,
    tracked: &'a [TrackedLayer],
}

/// Q_A ((Q_Aᵀ V Q_S) / (Λ + λ + δ)) Q_Sᵀ per layer, in f32, returned in f64. Cost per layer
/// 2·m·o·(m + o) multiply-adds. Several vectors at once ([`LinearOperator::apply_many`]) go
/// through four GEMMs per layer whatever their number (all k side by side; f32 at the machine's
/// GEMM speed, 280 GFLOP/s on two Sapphire Rapids cores): in the transposed form
/// Xᵀ = Q_S ((Q_Sᵀ Vᵀ Q_A) ⊙ Wᵀ) Q_Aᵀ, with the k blocks Vᵀ side by side (o × k·m) for the products
/// with Q_S and stacked (k·o × m) for those with Q_A. An InputMajor layer's weight is Vᵀ
/// column-major as it lies in θ, so the layouts cost one contiguous copy each.
impl LinearOperator for SinglePrecisionInverse<'_> {
    fn dim(&self) -> usize {
        self.tracked.iter().map(TrackedLayer::num_params).sum()
    }

    fn apply(&self, q: &[f64]) -> Vec<f64> {
        self.apply_many(&[q]).pop().expect("one vector")
    }

    fn apply_many(&self, qs: &[&[f64]]) -> Vec<Vec<f64>> {
        let k = qs.len();
        let mut outs: Vec<Vec<f64>> = qs.iter().map(|q| vec![0.0; q.len()]).collect();
        let mut offset = 0;
        for (spec, layer) in self.tracked.iter().zip(&self.layers) {
            let (m, o) = (spec.view_rows(), spec.outputs);
            // Vᵀ of every vector side by side: column q·m + i is input row i of vector q's view.
            // The copies in and out, and between layouts, run on every thread (one vector, or one
            // column, a task): each is as long as the layer's parameters times k.
            let mut vt = Mat::<f32>::zeros(o, k * m);
            vt.par_col_chunks_mut(m).zip(qs.par_iter()).for_each(|(mut columns, v)| {
                let block = &v[offset..offset + spec.num_params()];
                for i in 0..m {
                    let column = columns.as_mut().col_mut(i).try_as_col_major_mut().expect("contiguous").as_slice_mut();
                    view_row(spec, block, i, |j, x| column[j] = narrow(x));
                }
            });
            let mut left = Mat::<f32>::zeros(o, k * m);
            matmul(left.as_mut(), Accum::Replace, layer.q_s.transpose(), vt.as_ref(), 1.0f32, Par::rayon(0));
            let mut stacked = Mat::<f32>::zeros(k * o, m);
            to_stacked(&left, &mut stacked, o, m);
            let mut inner = Mat::<f32>::zeros(k * o, m);
            matmul(inner.as_mut(), Accum::Replace, stacked.as_ref(), layer.q_a.as_ref(), 1.0f32, Par::rayon(0));
            inner.par_col_iter_mut().enumerate().for_each(|(i, mut column)| {
                let weights = &layer.inverse[i * o..(i + 1) * o];
                let column = column.as_mut().try_as_col_major_mut().expect("contiguous").as_slice_mut();
                for block in column.chunks_exact_mut(o) {
                    block.iter_mut().zip(weights).for_each(|(t, w)| *t *= w);
                }
            });
            matmul(stacked.as_mut(), Accum::Replace, inner.as_ref(), layer.q_a.transpose(), 1.0f32, Par::rayon(0));
            from_stacked(&stacked, &mut left, o, m);
            matmul(vt.as_mut(), Accum::Replace, layer.q_s.as_ref(), left.as_ref(), 1.0f32, Par::rayon(0));
            outs.par_iter_mut().enumerate().for_each(|(q, out)| {
                let block = &mut out[offset..offset + spec.num_params()];
                for i in 0..m {
                    let column = vt.col(q * m + i).try_as_col_major().expect("contiguous").as_slice();
                    view_row_mut(spec, block, i, |j| f64::from(column[j]));
                }
            });
            offset += spec.num_params();
        }
        outs
    }
}

/// The side-by-side layout (o × k·m, block q in columns q·m..) copied into the stacked one
/// (k·o × m, block q in rows q·o..): contiguous copies of o values, a column of `tall` a task.
fn to_stacked(wide: &Mat<f32>, tall: &mut Mat<f32>, o: usize, m: usize) {
    tall.par_col_iter_mut().enumerate().for_each(|(i, mut column)| {
        let stacked = column.as_mut().try_as_col_major_mut().expect("contiguous").as_slice_mut();
        for (q, target) in stacked.chunks_exact_mut(o).enumerate() {
            target.copy_from_slice(wide.col(q * m + i).try_as_col_major().expect("contiguous").as_slice());
        }
    });
}

/// The stacked layout copied back into the side-by-side one ([`to_stacked`]'s inverse), a
/// block q of `wide` a task.
fn from_stacked(tall: &Mat<f32>, wide: &mut Mat<f32>, o: usize, m: usize) {
    wide.par_col_chunks_mut(m).enumerate().for_each(|(q, mut columns)| {
        for i in 0..m {
            let side = columns.as_mut().col_mut(i).try_as_col_major_mut().expect("contiguous").as_slice_mut();
            side.copy_from_slice(&tall.col(i).try_as_col_major().expect("contiguous").as_slice()[q * o..(q + 1) * o]);
        }
    });
}

/// Calls `f(j, value)` for every output j of input row i (the bias as the last row) of a
/// layer's view, read from its θ block.
fn view_row(spec: &TrackedLayer, block: &[f64], i: usize, mut f: impl FnMut(usize, f64)) {
    let (inputs, o) = (spec.inputs, spec.outputs);
    if i == inputs {
        block[spec.weight_len()..spec.weight_len() + o].iter().enumerate().for_each(|(j, x)| f(j, *x));
        return;
    }
    match spec.layout {
        WeightLayout::InputMajor => block[i * o..(i + 1) * o].iter().enumerate().for_each(|(j, x)| f(j, *x)),
        WeightLayout::OutputMajor => (0..o).for_each(|j| f(j, block[j * inputs + i])),
    }
}

/// Writes every output j of input row i of a layer's view into its θ block, `value(j)`.
fn view_row_mut(spec: &TrackedLayer, block: &mut [f64], i: usize, value: impl Fn(usize) -> f64) {
    let (inputs, o) = (spec.inputs, spec.outputs);
    if i == inputs {
        let w = spec.weight_len();
        block[w..w + o].iter_mut().enumerate().for_each(|(j, x)| *x = value(j));
        return;
    }
    match spec.layout {
        WeightLayout::InputMajor => block[i * o..(i + 1) * o].iter_mut().enumerate().for_each(|(j, x)| *x = value(j)),
        WeightLayout::OutputMajor => (0..o).for_each(|j| block[j * inputs + i] = value(j)),
    }
}

/// `f(layer, the m×o views of every vector)` for each tracked layer's slice of the vectors
/// `qs`, concatenated back in the parameters' layout, one output per vector.
fn per_layer_many(
    tracked: &[TrackedLayer],
    qs: &[&[f64]],
    mut f: impl FnMut(usize, &[Vec<f64>]) -> Vec<Vec<f64>>,
) -> Vec<Vec<f64>> {
    let mut outs: Vec<Vec<f64>> = qs.iter().map(|q| Vec::with_capacity(q.len())).collect();
    let mut offset = 0;
    for (l, spec) in tracked.iter().enumerate() {
        let len = spec.num_params();
        let views: Vec<Vec<f64>> = qs.iter().map(|q| spec.to_view(&q[offset..offset + len])).collect();
        for (out, x) in outs.iter_mut().zip(f(l, &views)) {
            out.extend(spec.from_view(&x));
        }
        offset += len;
    }
    outs
}

/// Q_A ((Q_Aᵀ V Q_S) ⊙ W) Q_Sᵀ for each m×o row-major view V and the weights W (`scale`, m×o
/// row-major), computed in T (f64 or f32). The k views go side by side through the products with
/// Q_A (one m × m by m × k·o GEMM each way, on every core), one by one through those with Q_S.
fn in_eigenbasis<T: faer::traits::RealField + Copy>(
    q_a: &Mat<T>,
    q_s: &Mat<T>,
    scale: &[T],
    views: &[Vec<f64>],
    to: impl Fn(f64) -> T,
    from: impl Fn(T) -> f64,
) -> Vec<Vec<f64>> {
    let (m, o, k) = (q_a.nrows(), q_s.nrows(), views.len());
    let v = Mat::<T>::from_fn(m, k * o, |i, j| to(views[j / o][i * o + j % o]));
    let mut left = Mat::<T>::zeros(m, k * o);
    matmul(left.as_mut(), Accum::Replace, q_a.transpose(), v.as_ref(), T::one(), Par::rayon(0));
    for q in 0..k {
        let block = left.as_ref().subcols(q * o, o) * q_s;
        let mut target = left.as_mut().subcols_mut(q * o, o);
        for i in 0..m {
            for j in 0..o {
                target[(i, j)] = block[(i, j)] * scale[i * o + j];
            }
        }
    }
    let mut right = Mat::<T>::zeros(m, k * o);
    matmul(right.as_mut(), Accum::Replace, q_a.as_ref(), left.as_ref(), T::one(), Par::rayon(0));
    (0..k)
        .map(|q| {
            let x = right.as_ref().subcols(q * o, o) * q_s.transpose();
            (0..m * o).map(|idx| from(x[(idx / o, idx % o)])).collect()
        })
        .collect()
}

//! Step 2 of the pipeline, for the solvers: the exact curvature of a small layer, as a dense
//! block, where Kronecker factors would approximate it.
//!
//! The damped Gauss–Newton matrix restricted to one tracked layer ℓ acting once per example, in
//! the layer's view order (index input·o + output, the bias as the last input), is
//!
//! ```text
//! A_ℓℓ = (1/n) Σᵢ (x̃ᵢ x̃ᵢᵀ) ⊗ Sᵢ + (λ + δ) I,   Sᵢ = Γᵢᵀ (diag pᵢ − pᵢpᵢᵀ) Γᵢ,
//! ```
//!
//! Γᵢ = ∂zᵢ/∂(layer output) (C × o; the identity for the logit layer). For the last layer of an
//! MLP (257 × 10 on MNIST) this is 2570 × 2570: built from the cached per-class factors as
//! o(o+1)/2 weighted Gram matrices X̃ᵀ diag(Sᵢ\[a\]\[b\]) X̃ (cost o²/2 · n · m² flops, m = inputs + 1),
//! inverted once (Cholesky, m³o³/3). K-FAC and EK-FAC replace it by a Kronecker product, which
//! cannot follow how each example's curvature Sᵢ depends on its inputs x̃ᵢ: on the MNIST MLP
//! 784-256-10 (EK-FAC-preconditioned CG, 1e-6, one query, with the null space and coarse space of
//! [`super::symmetry`]) the exact last block takes the iterations from 256 to 165.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, Par, Side};

use culprit_models::model::TrackedLayer;

use super::operators::LinearOperator;
use crate::simd::{narrow, narrow_matrix};

/// Layers with at most this many parameters get their exact block (a dense f64 matrix of
/// (this)² entries while it is built: 134 MB at 4096).
pub const MAX_EXACT_BLOCK: usize = 4096;

/// What [`exact_block`] reads of one chunk of training examples, for one layer.
pub struct BlockChunk<'a> {
    /// The layer's inputs, `[r, in]` column-major.
    pub inputs: &'a [f64],
    /// Per class c, ∂z_c/∂(layer output), `[r, out]` column-major.
    pub grads: &'a [Vec<f64>],
    /// `[r, C]` row-major.
    pub probabilities: &'a [f64],
}

/// A_ℓℓ of the module documentation for the layer `spec` (one position per example), from the
/// chunks of the training data (n examples), with `shift` = λ + δ on the diagonal.
pub fn exact_block(
    spec: &TrackedLayer,
    n: usize,
    shift: f64,
    chunks: &mut dyn Iterator<Item = BlockChunk<'_>>,
) -> Mat<f64> {
    let (inputs, m, o) = (spec.inputs, spec.view_rows(), spec.outputs);
    let pairs: Vec<(usize, usize)> = (0..o).flat_map(|a| (a..o).map(move |b| (a, b))).collect();
    let mut grams: Vec<Mat<f64>> = pairs.iter().map(|_| Mat::zeros(m, m)).collect();
    for chunk in chunks {
        let classes = chunk.grads.len();
        let r = chunk.probabilities.len() / classes.max(1);
        let x = Mat::<f64>::from_fn(r, m, |i, j| if j < inputs { chunk.inputs[j * r + i] } else { 1.0 });
        // Sᵢ[a][b] = Σ_c p_c Γ[c][a] Γ[c][b] − (Σ_c p_c Γ[c][a])(Σ_c p_c Γ[c][b]), per example.
        let mut mean = vec![0.0; r * o];
        for (c, g) in chunk.grads.iter().enumerate() {
            for a in 0..o {
                for i in 0..r {
                    mean[i * o + a] += chunk.probabilities[i * classes + c] * g[a * r + i];
                }
            }
        }
        let mut weighted = Mat::<f64>::zeros(r, m);
        for ((a, b), gram) in pairs.iter().zip(grams.iter_mut()) {
            let weights: Vec<f64> = (0..r)
                .map(|i| {
                    let second: f64 = chunk
                        .grads
                        .iter()
                        .enumerate()
                        .map(|(c, g)| chunk.probabilities[i * classes + c] * g[a * r + i] * g[b * r + i])
                        .sum();
                    (second - mean[i * o + a] * mean[i * o + b]) / n as f64
                })
                .collect();
            for j in 0..m {
                for (i, w) in weights.iter().enumerate() {
                    weighted[(i, j)] = x[(i, j)] * w;
                }
            }
            matmul(gram.as_mut(), Accum::Add, x.transpose(), weighted.as_ref(), 1.0, Par::rayon(0));
        }
    }
    let mut block = Mat::<f64>::zeros(m * o, m * o);
    for ((a, b), gram) in pairs.iter().zip(&grams) {
        for j in 0..m {
            for k in 0..m {
                block[(j * o + a, k * o + b)] = gram[(j, k)];
                block[(k * o + b, j * o + a)] = gram[(j, k)];
            }
        }
    }
    for i in 0..m * o {
        block[(i, i)] += shift;
    }
    block
}

/// A preconditioner with some layers' blocks replaced by the exact inverse: M⁻¹ from `inner`
/// everywhere, then each small layer's slice of the result set to A_ℓℓ⁻¹ times the same slice of
/// the vector (block-diagonal in those layers; symmetric positive definite when both parts are).
pub struct ExactLayers<'a> {
    /// M⁻¹ for the other layers.
    pub inner: &'a dyn LinearOperator,
    /// The small layers.
    pub blocks: &'a [InverseBlock],
}

/// One layer's A_ℓℓ⁻¹, f32, for [`ExactLayers`].
pub struct InverseBlock {
    spec: TrackedLayer,
    /// The layer's first index in the tracked space.
    start: usize,
    /// A_ℓℓ⁻¹ in view order, (m·o)².
    inverse: Mat<f32>,
}

/// A Cholesky pivot below this share of its diagonal entry (L_jj² < `PIVOT`·M_jj) makes
/// [`well_conditioned_inverse`] refuse: the inverse is kept in f32, and one that large would be
/// rounding noise (an f32-summed operator's null directions carry about 1e-7 of it), perhaps
/// indefinite.
pub const PIVOT: f64 = 1e-6;

/// M⁻¹ of a symmetric positive definite M, or `None` when its Cholesky factorisation fails or
/// has a pivot below [`PIVOT`] of its diagonal entry. Cost n³/3 + n³ flops.
pub fn well_conditioned_inverse(m: &Mat<f64>) -> Option<Mat<f64>> {
    let llt = m.llt(Side::Lower).ok()?;
    let l = llt.L();
    (0..m.nrows()).all(|j| l[(j, j)].powi(2) >= PIVOT * m[(j, j)]).then(|| llt.inverse())
}

impl InverseBlock {
    /// The inverse of the layer's block `block` (view order); `None` when it is not well
    /// conditioned ([`well_conditioned_inverse`]).
    pub fn new(spec: &TrackedLayer, start: usize, block: &Mat<f64>) -> Option<Self> {
        let inverse = well_conditioned_inverse(block)?;
        Some(Self { spec: spec.clone(), start, inverse: narrow_matrix(&inverse) })
    }
}

impl LinearOperator for ExactLayers<'_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    fn apply(&self, v: &[f64]) -> Vec<f64> {
        self.apply_many(&[v]).pop().expect("one vector")
    }

    fn apply_many(&self, vs: &[&[f64]]) -> Vec<Vec<f64>> {
        let mut outs = self.inner.apply_many(vs);
        for block in self.blocks {
            let len = block.spec.num_params();
            let size = block.inverse.nrows();
            let views: Vec<Vec<f64>> =
                vs.iter().map(|v| block.spec.to_view(&v[block.start..block.start + len])).collect();
            let rhs = Mat::<f32>::from_fn(size, vs.len(), |i, j| narrow(views[j][i]));
            let mut solved = Mat::<f32>::zeros(size, vs.len());
            matmul(solved.as_mut(), Accum::Replace, block.inverse.as_ref(), rhs.as_ref(), 1.0f32, Par::rayon(0));
            for (j, out) in outs.iter_mut().enumerate() {
                let view: Vec<f64> = (0..size).map(|i| f64::from(solved[(i, j)])).collect();
                out[block.start..block.start + len].copy_from_slice(&block.spec.from_view(&view));
            }
        }
        outs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-conditioned SPD matrix is inverted (M·M⁻¹ = I within 1e-12); one with a pivot of
    /// 1e-9 of its diagonal (rounding noise in an f32-summed operator) and an indefinite one are
    /// refused.
    #[test]
    fn only_well_conditioned_matrices_are_inverted() {
        let n = 5;
        let spd = Mat::<f64>::from_fn(n, n, |i, j| if i == j { 4.0 + i as f64 } else { 1.0 / (1.0 + (i + j) as f64) });
        let inverse = well_conditioned_inverse(&spd).expect("well conditioned");
        let product = &spd * &inverse;
        for i in 0..n {
            for j in 0..n {
                let want = f64::from(u8::from(i == j));
                assert!((product[(i, j)] - want).abs() < 1e-12, "({i}, {j}): {}", product[(i, j)]);
            }
        }
        // Rows 0 and 1 equal up to 1e-9·‖row‖ in their last entry: a pivot of about 1e-18.
        let mut nearly = spd.clone();
        for j in 0..n {
            nearly[(1, j)] = spd[(0, j)];
            nearly[(j, 1)] = spd[(j, 0)];
        }
        nearly[(1, 1)] = spd[(0, 0)] * (1.0 + 1e-9);
        assert!(well_conditioned_inverse(&nearly).is_none(), "a pivot of 1e-9 relative accepted");
        let mut indefinite = spd.clone();
        indefinite[(2, 2)] = -1.0;
        assert!(well_conditioned_inverse(&indefinite).is_none(), "an indefinite matrix accepted");
    }
}

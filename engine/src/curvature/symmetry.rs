//! Step 2 of the pipeline, for the solvers: the directions in which a network's logits cannot
//! change, and what conjugate gradient gains from knowing them.
//!
//! ## Exact: the null space of every Jacobian
//! For a ReLU unit o between two tracked layers ([`UnitLink`], [`LinkKind::Homogeneous`]),
//! scaling its incoming weights and bias by α > 0 and its outgoing weights by 1/α changes no
//! logit, so the direction
//!
//! ```text
//! vₒ = (W_in[:, o] and bₒ in the producer,  −W_out[rows of o, :] in the consumer)
//! ```
//!
//! satisfies Jᵢvₒ = 0 for every example i: it is an eigenvector of the damped curvature
//! A = G + (λ + δ)I with eigenvalue exactly λ + δ, and so is every combination of them. Between
//! two layers with no activation ([`LinkKind::Linear`]) any mixing of the units is a symmetry:
//! v_ab moves unit a's incoming weights into unit b's and unit b's outgoing weights, negated,
//! into unit a's (all H² of them while H² ≤ [`MAX_MIXINGS`], else the H rescalings).
//!
//! Kronecker-factored curvature is block-diagonal per layer and cannot see that the two halves
//! of vₒ cancel: it gives these directions the curvature of either half alone, and the
//! EK-FAC-preconditioned operator has eigenvalues down to ~λ/Λ there (on the MNIST MLP
//! 784-256-10, 4.7e-4 against a largest of 20). With W = span{vₒ} and Π_W its orthogonal
//! projector, A maps W and W⊥ to themselves, so
//!
//! ```text
//! A⁻¹q = Π_W q / (λ + δ)  +  (the solution of A x = (I − Π_W) q in W⊥),
//! ```
//!
//! and CG runs on W⊥ with the preconditioner (I − Π_W) M⁻¹ (I − Π_W), symmetric positive
//! definite there ([`NullSpace`]). Measured on that MLP (one query, EK-FAC, 1e-6): 1417
//! iterations without, 368 with. Cost: Wᵀv is Σ|supp vₒ| multiply-adds; Π_W solves with the
//! Gram matrix WᵀW (Cholesky once, diagonal when the supports are disjoint).

use culprit_models::model::{LinkKind, TrackedLayer, UnitLink, tracked_starts};
use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, Par, Side};
use rayon::prelude::*;

use super::blocks::well_conditioned_inverse;
use super::operators::LinearOperator;
use crate::simd::{narrow, narrow_matrix};

/// Mixing directions of a linear link are all kept up to this many (H² for H units); past it,
/// only the H rescalings.
pub const MAX_MIXINGS: usize = 4096;

/// A vector of the tracked space with few non-zeros.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseVector {
    /// Indices into the tracked space, ascending.
    pub indices: Vec<usize>,
    /// The values at them.
    pub values: Vec<f64>,
}

/// The exact null space W of every example's logit Jacobian that a network's unit links give, and
/// its orthogonal projector.
pub struct NullSpace {
    vectors: Vec<SparseVector>,
    /// Cholesky factor of the Gram matrix WᵀW (`None` when the space is empty).
    gram: Option<faer::linalg::solvers::Llt<f64>>,
    /// 1/‖wⱼ‖² when the vectors are orthogonal (disjoint supports: one link), for the
    /// projections without the Cholesky solve.
    orthogonal: Option<Vec<f64>>,
    /// Every (coordinate, direction, value) of the directions, by coordinate.
    entries: Vec<(u32, u32, f64)>,
    dim: usize,
}

impl NullSpace {
    /// The null directions of the links `links` at the tracked parameters `theta` of `layers`.
    /// Directions that are zero (a unit whose weights are all zero) or numerically dependent on
    /// the others are dropped.
    pub fn of(layers: &[TrackedLayer], theta: &[f64], links: &[UnitLink]) -> Self {
        let starts = tracked_starts(layers);
        let dim = layers.iter().map(TrackedLayer::num_params).sum();
        let mut vectors = Vec::new();
        for link in links {
            let (producer, consumer) = (&layers[link.producer], &layers[link.consumer]);
            let units = producer.outputs;
            if consumer.inputs != units * link.stride {
                continue; // not the layout this module knows: use nothing rather than guess
            }
            let (p0, c0) = (starts[link.producer], starts[link.consumer]);
            let pairs: Vec<(usize, usize)> = match link.kind {
                LinkKind::Linear if units * units <= MAX_MIXINGS => {
                    (0..units).flat_map(|a| (0..units).map(move |b| (a, b))).collect()
                }
                _ => (0..units).map(|a| (a, a)).collect(),
            };
            for (a, b) in pairs {
                // δW_in[:, b] = W_in[:, a] (bias included);  δW_out[rows of a, :] = −W_out[rows of b, :].
                let mut entries: Vec<(usize, f64)> = Vec::new();
                for row in 0..producer.view_rows() {
                    let value = theta[p0 + producer.view_index(row, a)];
                    entries.push((p0 + producer.view_index(row, b), value));
                }
                for offset in 0..link.stride {
                    for column in 0..consumer.outputs {
                        let value = theta[c0 + consumer.view_index(b * link.stride + offset, column)];
                        entries.push((c0 + consumer.view_index(a * link.stride + offset, column), -value));
                    }
                }
                entries.retain(|(_, v)| *v != 0.0);
                if entries.is_empty() {
                    continue;
                }
                entries.sort_by_key(|(i, _)| *i);
                let (indices, values) = entries.into_iter().unzip();
                vectors.push(SparseVector { indices, values });
            }
        }
        Self::from_vectors(vectors, dim)
    }

    /// The space spanned by `vectors`; those numerically dependent on the ones before them are
    /// dropped, all in one pass ([`independent_columns`]).
    fn from_vectors(vectors: Vec<SparseVector>, dim: usize) -> Self {
        let empty = Self { vectors: Vec::new(), gram: None, orthogonal: None, entries: Vec::new(), dim };
        if vectors.is_empty() {
            return empty;
        }
        let gram = gram_of(&vectors, dim);
        let k = vectors.len();
        let full_rank =
            gram.llt(Side::Lower).is_ok_and(|llt| (0..k).all(|j| llt.L()[(j, j)].powi(2) > 1e-12 * gram[(j, j)]));
        let (vectors, gram) = if full_rank {
            (vectors, gram)
        } else {
            let kept = independent_columns(&gram);
            let gram = Mat::<f64>::from_fn(kept.len(), kept.len(), |a, b| gram[(kept[a], kept[b])]);
            let mut keep = vec![false; k];
            kept.iter().for_each(|&j| keep[j] = true);
            let vectors = vectors.into_iter().zip(keep).filter_map(|(v, keep)| keep.then_some(v)).collect();
            (vectors, gram)
        };
        let k = vectors.len();
        if k == 0 {
            return empty;
        }
        let orthogonal = (0..k)
            .all(|i| (0..k).all(|j| i == j || gram[(i, j)] == 0.0))
            .then(|| (0..k).map(|j| 1.0 / gram[(j, j)]).collect());
        // Pruned to pivots above 1e-12 of their diagonal, the Gram matrix factors; should rounding
        // still defeat it, the solve goes on without deflation.
        let Ok(llt) = gram.llt(Side::Lower) else { return empty };
        let entries = entries_of(&vectors);
        Self { vectors, gram: Some(llt), orthogonal, entries, dim }
    }

    /// The number of independent null directions.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The directions (not orthonormal).
    pub fn vectors(&self) -> &[SparseVector] {
        &self.vectors
    }

    /// Π_W v, the component of v in the null space.
    pub fn component(&self, v: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; v.len()];
        if let Some(c) = self.coefficients(v) {
            self.entries.iter().for_each(|&(i, j, x)| out[i as usize] += c[j as usize] * x);
        }
        out
    }

    /// v ← (I − Π_W) v.
    pub fn remove(&self, v: &mut [f64]) {
        if let Some(c) = self.coefficients(v) {
            self.entries.iter().for_each(|&(i, j, x)| v[i as usize] -= c[j as usize] * x);
        }
    }

    /// (WᵀW)⁻¹ Wᵀ v: Wᵀv in one pass over v in index order (the directions' entries sorted by
    /// coordinate, so that v streams through the cache whatever the directions' strides).
    fn coefficients(&self, v: &[f64]) -> Option<Vec<f64>> {
        let llt = self.gram.as_ref()?;
        let k = self.vectors.len();
        let mut dots = vec![0.0; k];
        self.entries.iter().for_each(|&(i, j, x)| dots[j as usize] += x * v[i as usize]);
        if let Some(scales) = &self.orthogonal {
            return Some(dots.iter().zip(scales).map(|(d, s)| d * s).collect());
        }
        let rhs = Mat::<f64>::from_fn(k, 1, |i, _| dots[i]);
        let c = llt.solve(&rhs);
        Some((0..k).map(|i| c[(i, 0)]).collect())
    }

    /// The tracked-space dimension.
    pub fn ambient(&self) -> usize {
        self.dim
    }
}

/// The vectors' entries as (coordinate, vector, value), by coordinate.
fn entries_of(vectors: &[SparseVector]) -> Vec<(u32, u32, f64)> {
    let mut entries: Vec<(u32, u32, f64)> = vectors
        .iter()
        .enumerate()
        .flat_map(|(j, v)| v.indices.iter().zip(&v.values).map(move |(&i, &x)| (i as u32, j as u32, x)))
        .collect();
    entries.sort_by_key(|&(i, j, _)| (i, j));
    entries
}

/// WᵀW of sparse vectors, through the lists of vectors that touch each coordinate: cost
/// Σ_coordinates (vectors touching it)².
fn gram_of(vectors: &[SparseVector], dim: usize) -> Mat<f64> {
    let mut touching: Vec<Vec<(usize, f64)>> = vec![Vec::new(); dim];
    for (j, v) in vectors.iter().enumerate() {
        for (&i, &x) in v.indices.iter().zip(&v.values) {
            touching[i].push((j, x));
        }
    }
    let k = vectors.len();
    let mut gram = Mat::<f64>::zeros(k, k);
    for list in &touching {
        for &(a, x) in list {
            for &(b, y) in list {
                gram[(a, b)] += x * y;
            }
        }
    }
    gram
}

/// The columns of a Gram matrix independent of the kept ones before them (Cholesky pivot above
/// 1e-12 of the diagonal entry), in one left-looking Cholesky pass that skips the others: the
/// same set as dropping the first dependent column and starting again, at the cost of one
/// factorisation (k³/3) instead of one per dropped column.
fn independent_columns(gram: &Mat<f64>) -> Vec<usize> {
    let k = gram.nrows();
    let mut kept = Vec::new();
    // rows[i]: row i of L over the kept columns so far, in their order.
    let mut rows: Vec<Vec<f64>> = vec![Vec::new(); k];
    for j in 0..k {
        let d = gram[(j, j)] - rows[j].iter().map(|x| x * x).sum::<f64>();
        if !(d > 1e-12 * gram[(j, j)]) {
            continue;
        }
        let d = d.sqrt();
        let row_j = std::mem::take(&mut rows[j]);
        for (i, row_i) in rows.iter_mut().enumerate().skip(j + 1) {
            let s = gram[(i, j)] - row_i.iter().zip(&row_j).map(|(a, b)| a * b).sum::<f64>();
            row_i.push(s / d);
        }
        kept.push(j);
    }
    kept
}

/// An operator restricted to the complement of a null space it maps to itself:
/// v ↦ (I − Π_W) A v for v ∈ W⊥ (A's own products; the projection removes rounding).
pub struct OnComplement<'a> {
    /// A (or a preconditioner, symmetric positive definite).
    pub inner: &'a dyn LinearOperator,
    /// W.
    pub null: &'a NullSpace,
}

impl LinearOperator for OnComplement<'_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    fn apply(&self, v: &[f64]) -> Vec<f64> {
        self.apply_many(&[v]).pop().expect("one vector")
    }

    fn apply_many(&self, vs: &[&[f64]]) -> Vec<Vec<f64>> {
        let mut outs = self.inner.apply_many(vs);
        outs.par_iter_mut().for_each(|o| self.null.remove(o));
        outs
    }
}

/// Units active on at least this share of the training examples are near-linear: the mixings
/// among them are candidates for the coarse space of [`Gauge`].
pub const NEAR_LINEAR_ACTIVITY: f64 = 0.9;

/// At most this many near-linear units (the most active) make the coarse space: its operator has
/// (units)² rows.
pub const MAX_GAUGE_UNITS: usize = 64;

/// The most partial sums of the disagreements' curvature D built at once (one per thread up to
/// this): each is an l⁴ f32 matrix, 67 MB at [`MAX_GAUGE_UNITS`].
pub const MAX_ACCUMULATORS: usize = 4;

/// The coarse space of a ReLU link's near-linear units, for preconditioning (approximate, unlike
/// [`NullSpace`]).
///
/// A ReLU unit that is active on almost every example acts linearly, and among a set L of such
/// units every mixing is almost a symmetry: moving unit a's incoming weights into unit b's and
/// b's outgoing weights, negated, into a's,
///
/// ```text
/// G(X) = (W_in[:, L] X  in the producer's columns L,  −X W_out[L, :]  in the consumer's rows L),
/// Jᵢ G(X) = Σ_ab X_ab (m_ib − m_ia) · pre_ia · Γᵢ W_out[b, :]ᵀ
/// ```
///
/// changes example i's logits only when units a and b disagree on it (m the ReLU masks, pre the
/// producer's pre-activations, Γᵢ = ∂zᵢ/∂(consumer output)). Kronecker-factored curvature misses
/// these near-null directions as it misses the exact ones (after deflating the exact rescalings,
/// the EK-FAC-preconditioned MNIST MLP still has eigenvalues near 5e-3, along such mixings). The
/// coarse space span G gets the exact operator there, E = GᵀAG = (λ + δ) GᵀG + D with
/// D_(ab),(cd) = (1/n) Σᵢ e_i,ab e_i,cd (Γᵢwᵦ)ᵀ Hᵢ (Γᵢw_d), e_i,ab = (m_ib − m_ia) pre_ia and
/// Hᵢ = diag pᵢ − pᵢpᵢᵀ (built from the cached factors, Σᵢ over the disagreeing pairs), and the
/// preconditioner becomes the two-level
///
/// ```text
/// P⁻¹ = (I − Π) M⁻¹ (I − Π) + G E⁻¹ Gᵀ,
/// ```
///
/// Π the orthogonal projector on span G (a Sylvester equation, solved in the eigenbases of
/// W_inᵀW_in and W_out W_outᵀ). L: the units active on at least [`NEAR_LINEAR_ACTIVITY`] of the
/// examples, at most [`MAX_GAUGE_UNITS`], the most active first. Measured on the MNIST MLP
/// 784-256-10 (EK-FAC, 1e-6, one query, rescalings deflated): 368 iterations without, 232 with
/// the 50 units active on ≥ 95% (λ-only coarse operator, without D: 247, but 315 with the 83
/// units active on ≥ 90%: D is what makes the choice of L safe).
pub struct Gauge {
    /// The link's producer and consumer, with their offsets in the tracked space.
    producer: TrackedLayer,
    consumer: TrackedLayer,
    producer_start: usize,
    consumer_start: usize,
    /// The units L.
    units: Vec<usize>,
    /// W_in[:, L] (m × l) and W_out[L, :] (l × o).
    w_in: Mat<f64>,
    w_out: Mat<f64>,
    /// Eigenpairs of W_inᵀW_in and W_out W_outᵀ (the Sylvester equation of Π).
    in_vectors: Mat<f64>,
    in_values: Vec<f64>,
    out_vectors: Mat<f64>,
    out_values: Vec<f64>,
    /// E⁻¹ in f32 (l² × l²): the coarse solves of many vectors are one GEMM.
    coarse: Mat<f32>,
}

/// What [`Gauge::build`] reads of one chunk of training examples.
pub struct GaugeChunk<'a> {
    /// The producer's inputs, `[r, in]` column-major.
    pub inputs: &'a [f64],
    /// Per class c, ∂z_c/∂(consumer output), `[r, out]` column-major.
    pub consumer_grads: &'a [Vec<f64>],
    /// `[r, C]` row-major.
    pub probabilities: &'a [f64],
}

impl Gauge {
    /// The link whose coarse space is built: the last dense ReLU link (producer and consumer at
    /// one position, stride 1), if any.
    pub fn link<'l>(layers: &[TrackedLayer], links: &'l [UnitLink]) -> Option<&'l UnitLink> {
        links.iter().rev().find(|l| {
            l.kind == LinkKind::Homogeneous
                && l.stride == 1
                && layers[l.producer].positions == 1
                && layers[l.consumer].positions == 1
                && layers[l.consumer].inputs == layers[l.producer].outputs
        })
    }

    /// The coarse space of `link` ([`Gauge::link`]) at the tracked parameters `theta`, from the
    /// chunks of the training data (n examples); `shift` = λ + δ. `None` when fewer than two
    /// units are near-linear.
    pub fn build(
        layers: &[TrackedLayer],
        theta: &[f64],
        link: &UnitLink,
        n: usize,
        shift: f64,
        chunks: &mut dyn Iterator<Item = GaugeChunk<'_>>,
    ) -> Option<Self> {
        let (producer, consumer) = (layers[link.producer].clone(), layers[link.consumer].clone());
        let starts = tracked_starts(layers);
        let (producer_start, consumer_start) = (starts[link.producer], starts[link.consumer]);
        let (m, o) = (producer.view_rows(), consumer.outputs);
        let w_all =
            Mat::<f64>::from_fn(m, producer.outputs, |row, a| theta[producer_start + producer.view_index(row, a)]);
        let (rows, activity) = pre_activations(&producer, &w_all, o, chunks);
        let units = near_linear(&activity, n);
        let l = units.len();
        if l < 2 {
            return None;
        }
        let w_in = Mat::<f64>::from_fn(m, l, |row, a| w_all[(row, units[a])]);
        let w_out = Mat::<f64>::from_fn(l, o, |a, k| theta[consumer_start + consumer.view_index(units[a], k)]);
        let gram_in = w_in.transpose() * &w_in;
        let gram_out = &w_out * w_out.transpose();
        let e = coarse_operator(&rows, &units, &w_out, &gram_in, &gram_out, n, shift);
        let inverse = well_conditioned_inverse(&e)?;
        let coarse = narrow_matrix(&inverse);
        let ein = gram_in.self_adjoint_eigen(Side::Lower).ok()?;
        let eout = gram_out.self_adjoint_eigen(Side::Lower).ok()?;
        let values = |s: faer::diag::DiagRef<'_, f64>| (0..s.dim()).map(|i| s[i].max(0.0)).collect::<Vec<f64>>();
        Some(Self {
            in_values: values(ein.S()),
            in_vectors: ein.U().to_owned(),
            out_values: values(eout.S()),
            out_vectors: eout.U().to_owned(),
            producer,
            consumer,
            producer_start,
            consumer_start,
            units,
            w_in,
            w_out,
            coarse,
        })
    }

    /// The number of units L.
    pub fn units(&self) -> usize {
        self.units.len()
    }

    /// The mixing direction G(e_ab) (units a and b by their place in L) in a tracked space of
    /// `dim` coordinates.
    pub fn direction(&self, a: usize, b: usize, dim: usize) -> Vec<f64> {
        let l = self.units.len();
        let x = Mat::<f64>::from_fn(l, l, |i, j| f64::from(u8::from(i == a && j == b)));
        let mut out = vec![0.0; dim];
        self.add_image(&x, &mut out);
        out
    }

    /// G E⁻¹ Gᵀ r: the coarse space's exact inverse applied to r (E⁻¹ in f32).
    pub fn coarse_solve(&self, r: &[f64]) -> Vec<f64> {
        let x = self.coarse_coefficients(&[self.adjoint(r)]).pop().expect("one vector");
        let mut out = vec![0.0; r.len()];
        self.add_image(&x, &mut out);
        out
    }

    /// Gᵀr = W_inᵀ R_in − R_out W_outᵀ (l × l), R the vector's producer columns and consumer rows
    /// L (read row by row of the producer's view, the order they lie in θ for a dense layer).
    fn adjoint(&self, r: &[f64]) -> Mat<f64> {
        let (m, l, o) = (self.w_in.nrows(), self.units.len(), self.w_out.ncols());
        let mut r_in = Mat::<f64>::zeros(m, l);
        for row in 0..m {
            for (a, &unit) in self.units.iter().enumerate() {
                r_in[(row, a)] = r[self.producer_start + self.producer.view_index(row, unit)];
            }
        }
        let r_out =
            Mat::<f64>::from_fn(l, o, |a, k| r[self.consumer_start + self.consumer.view_index(self.units[a], k)]);
        self.w_in.transpose() * &r_in - &r_out * self.w_out.transpose()
    }

    /// G(X) added to `out`.
    fn add_image(&self, x: &Mat<f64>, out: &mut [f64]) {
        let image_in = &self.w_in * x;
        let image_out = x * &self.w_out;
        for row in 0..self.w_in.nrows() {
            for (a, &unit) in self.units.iter().enumerate() {
                out[self.producer_start + self.producer.view_index(row, unit)] += image_in[(row, a)];
            }
        }
        for (a, &unit) in self.units.iter().enumerate() {
            for k in 0..self.w_out.ncols() {
                out[self.consumer_start + self.consumer.view_index(unit, k)] -= image_out[(a, k)];
            }
        }
    }

    /// X with G(X) = Π r, from Gᵀr: the Sylvester equation W_inᵀW_in X + X W_out W_outᵀ = Gᵀr
    /// solved in the two eigenbases.
    fn projection_coefficients(&self, adjoint: &Mat<f64>) -> Mat<f64> {
        let mut inner = self.in_vectors.transpose() * adjoint * &self.out_vectors;
        for i in 0..inner.nrows() {
            for j in 0..inner.ncols() {
                let d = self.in_values[i] + self.out_values[j];
                inner[(i, j)] = if d > 0.0 { inner[(i, j)] / d } else { 0.0 };
            }
        }
        &self.in_vectors * &inner * self.out_vectors.transpose()
    }

    /// Π r: the orthogonal projection on span G.
    pub fn project(&self, r: &[f64]) -> Vec<f64> {
        let x = self.projection_coefficients(&self.adjoint(r));
        let mut out = vec![0.0; r.len()];
        self.add_image(&x, &mut out);
        out
    }

    /// E⁻¹ Gᵀrⱼ for every adjoint Gᵀrⱼ (one GEMM with E⁻¹ for all of them), as l × l matrices.
    fn coarse_coefficients(&self, adjoints: &[Mat<f64>]) -> Vec<Mat<f64>> {
        let l = self.units.len();
        let rhs = Mat::<f32>::from_fn(l * l, adjoints.len(), |k, j| narrow(adjoints[j][(k / l, k % l)]));
        let mut y = Mat::<f32>::zeros(l * l, adjoints.len());
        matmul(y.as_mut(), Accum::Replace, self.coarse.as_ref(), rhs.as_ref(), 1.0f32, Par::rayon(0));
        (0..adjoints.len()).map(|j| Mat::<f64>::from_fn(l, l, |a, b| f64::from(y[(a * l + b, j)]))).collect()
    }
}

/// Every chunk's pre-activations X̃W_in of all the producer's units (with the rest of what D
/// needs), and each unit's count of examples where it is active.
fn pre_activations(
    producer: &TrackedLayer,
    w_all: &Mat<f64>,
    outputs: usize,
    chunks: &mut dyn Iterator<Item = GaugeChunk<'_>>,
) -> (Vec<Rows>, Vec<usize>) {
    let m = producer.view_rows();
    let mut rows = Vec::new();
    let mut activity = vec![0usize; producer.outputs];
    for chunk in chunks {
        let r = chunk.probabilities.len() / chunk.consumer_grads.len().max(1);
        let x = Mat::<f64>::from_fn(r, m, |i, j| if j < producer.inputs { chunk.inputs[j * r + i] } else { 1.0 });
        let pre = &x * w_all;
        for (a, count) in activity.iter_mut().enumerate() {
            *count += (0..r).filter(|&i| pre[(i, a)] > 0.0).count();
        }
        let grads = chunk.consumer_grads.iter().map(|g| Mat::<f64>::from_fn(r, outputs, |i, k| g[k * r + i])).collect();
        rows.push(Rows { pre, grads, probabilities: chunk.probabilities.to_vec() });
    }
    (rows, activity)
}

/// The units L: active on at least [`NEAR_LINEAR_ACTIVITY`] of the n examples, the
/// [`MAX_GAUGE_UNITS`] most active, in index order.
fn near_linear(activity: &[usize], n: usize) -> Vec<usize> {
    let mut units: Vec<usize> =
        (0..activity.len()).filter(|&a| activity[a] as f64 >= NEAR_LINEAR_ACTIVITY * n as f64).collect();
    units.sort_by(|&a, &b| activity[b].cmp(&activity[a]).then(a.cmp(&b)));
    units.truncate(MAX_GAUGE_UNITS);
    units.sort_unstable();
    units
}

/// E = shift·GᵀG + D over the pairs (a, b) of units, index a·l + b: GᵀG from the Gram matrices
/// of W_in[:, L] and W_out[L, :], D summed over the chunks in parallel (one f32 accumulator per
/// thread, over contiguous groups of chunks).
fn coarse_operator(
    rows: &[Rows],
    units: &[usize],
    w_out: &Mat<f64>,
    gram_in: &Mat<f64>,
    gram_out: &Mat<f64>,
    n: usize,
    shift: f64,
) -> Mat<f64> {
    let l = units.len();
    let size = l * l;
    let mut e = Mat::<f64>::zeros(size, size);
    for a in 0..l {
        for b in 0..l {
            for c in 0..l {
                e[(a * l + b, c * l + b)] += shift * gram_in[(a, c)];
            }
            for d in 0..l {
                e[(a * l + b, a * l + d)] += shift * gram_out[(b, d)];
            }
        }
    }
    let scale = 1.0 / n as f64;
    // One l⁴ f32 accumulator per group (67 MB at 64 units): at most MAX_ACCUMULATORS of them.
    let groups = rows.len().div_ceil(rayon::current_num_threads().clamp(1, MAX_ACCUMULATORS)).max(1);
    let d = rows
        .par_chunks(groups)
        .map(|group| {
            let mut sum = vec![0.0f32; size * size];
            group.iter().for_each(|chunk| add_disagreements(chunk, units, w_out, scale, &mut sum));
            sum
        })
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        })
        .unwrap_or_default();
    // The upper triangle (rows ≤ columns) into both halves of E.
    for column in (0..size).filter(|_| !d.is_empty()) {
        for row in 0..=column {
            let v = f64::from(d[column * size + row]);
            if v != 0.0 {
                e[(row, column)] += v;
                if row != column {
                    e[(column, row)] += v;
                }
            }
        }
    }
    e
}

/// One chunk's pre-activations (every unit of the producer), consumer gradients Γ per class and
/// probabilities.
struct Rows {
    pre: Mat<f64>,
    grads: Vec<Mat<f64>>,
    probabilities: Vec<f64>,
}

/// Adds one chunk's part of D to `sum` (f32, column-major (l²)², the upper triangle only: rows
/// ≤ columns): for every example, the pairs (a, b) of units in L on which the ReLU masks
/// disagree, e_ab = (m_b − m_a) pre_a, and K = Yᵀ H Y with Y the columns Γ W_out[b, :]ᵀ. Cost
/// Σᵢ |pairsᵢ|²/2 multiply-adds (f32: D only shapes the coarse preconditioner).
fn add_disagreements(chunk: &Rows, units: &[usize], w_out: &Mat<f64>, scale: f64, sum: &mut [f32]) {
    let l = units.len();
    let (r, classes) = (chunk.pre.nrows(), chunk.grads.len());
    let y: Vec<Mat<f64>> = chunk.grads.iter().map(|g| g * w_out.transpose()).collect();
    let mut pairs: Vec<(usize, f32, usize)> = Vec::new();
    let mut k = vec![0.0f32; l * l];
    for i in 0..r {
        let p = &chunk.probabilities[i * classes..(i + 1) * classes];
        let pre: Vec<f64> = units.iter().map(|&a| chunk.pre[(i, a)]).collect();
        pairs.clear();
        for a in 0..l {
            for b in 0..l {
                if (pre[a] > 0.0) != (pre[b] > 0.0) {
                    let e = if pre[b] > 0.0 { pre[a] } else { -pre[a] };
                    pairs.push((a * l + b, narrow(scale.sqrt() * e), b));
                }
            }
        }
        if pairs.is_empty() {
            continue;
        }
        let py: Vec<f64> = (0..l).map(|b| (0..classes).map(|c| p[c] * y[c][(i, b)]).sum()).collect();
        for b in 0..l {
            for d in 0..l {
                let s: f64 = (0..classes).map(|c| p[c] * y[c][(i, b)] * y[c][(i, d)]).sum();
                k[d * l + b] = narrow(s - py[b] * py[d]);
            }
        }
        for (n2, &(column, e2, d)) in pairs.iter().enumerate() {
            let target = &mut sum[column * l * l..(column + 1) * l * l];
            let k_d = &k[d * l..(d + 1) * l];
            for &(row, e1, b) in &pairs[..=n2] {
                target[row] += e1 * e2 * k_d[b];
            }
        }
    }
}

/// The two-level preconditioner (I − Π) M⁻¹ (I − Π) + G E⁻¹ Gᵀ of [`Gauge`], around any M⁻¹.
pub struct WithGauge<'a> {
    /// M⁻¹.
    pub inner: &'a dyn LinearOperator,
    /// The coarse space.
    pub gauge: &'a Gauge,
}

impl LinearOperator for WithGauge<'_> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    fn apply(&self, v: &[f64]) -> Vec<f64> {
        self.apply_many(&[v]).pop().expect("one vector")
    }

    /// Per vector: Gᵀv once (for Πv and the coarse solve), M⁻¹ of all the (I − Π)v at once,
    /// then one image G(E⁻¹Gᵀv − X) with Π M⁻¹(…) = G(X). The per-vector steps (small GEMMs
    /// and the gathers of L's weights) run for the vectors in parallel.
    fn apply_many(&self, vs: &[&[f64]]) -> Vec<Vec<f64>> {
        let g = self.gauge;
        let adjoints: Vec<Mat<f64>> = vs.par_iter().map(|v| g.adjoint(v)).collect();
        let rest: Vec<Vec<f64>> = vs
            .par_iter()
            .zip(&adjoints)
            .map(|(v, adjoint)| {
                let mut r = v.to_vec();
                g.add_image(&(-g.projection_coefficients(adjoint)), &mut r);
                r
            })
            .collect();
        let mut outs = self.inner.apply_many(&rest.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let coarse = g.coarse_coefficients(&adjoints);
        outs.par_iter_mut().zip(coarse).for_each(|(out, coarse)| {
            let x = g.projection_coefficients(&g.adjoint(out));
            g.add_image(&(coarse - x), out);
        });
        outs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// e₁, e₂, e₁ + e₂, e₃, 2e₃, e₁ + 1e-3·e₄, e₂ + 1e-7·e₅: the third and fifth are dependent
    /// on the ones before them, the sixth keeps a pivot of 1e-6 of its norm² (kept), the last
    /// one of 1e-14 (dropped, below 1e-12).
    #[test]
    fn dependent_directions_are_dropped_in_one_pass() {
        let unit = |i: usize, x: f64| SparseVector { indices: vec![i], values: vec![x] };
        let pair = |i: usize, j: usize, x: f64| SparseVector { indices: vec![i, j], values: vec![1.0, x] };
        let vectors = vec![
            unit(0, 1.0),
            unit(1, 1.0),
            pair(0, 1, 1.0),
            unit(2, 1.0),
            unit(2, 2.0),
            pair(0, 3, 1e-3),
            pair(1, 4, 1e-7),
        ];
        let gram = gram_of(&vectors, 5);
        assert_eq!(independent_columns(&gram), vec![0, 1, 3, 5]);
        let space = NullSpace::from_vectors(vectors, 5);
        assert_eq!(space.len(), 4);
        // Π of e₄ within the space: e₄ is in span(e₁, e₁ + 1e-3·e₄), so Π e₄ = e₄.
        let projected = space.component(&[0.0, 0.0, 0.0, 1.0, 0.0]);
        assert!((projected[3] - 1.0).abs() < 1e-6 && projected[4].abs() < 1e-12, "{projected:?}");
    }
}

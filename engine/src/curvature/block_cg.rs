//! Block conjugate gradient: all the queries of a trace in one Krylov space, iterated on cheap
//! (single-precision) products with reliable updates.
//!
//! k independent CG recurrences ([`ConjugateGradient::solve_many`]) share each product but not
//! what they learn: every recurrence rediscovers the same hard directions of A. Block CG
//! (O'Leary 1980) searches the sum of their Krylov spaces: after i iterations the block of
//! directions spans k·i dimensions, and the error of every column shrinks as if the k − 1
//! eigenvalues at the spectrum's ends were removed (the bound has κ = λ_d/λ_k in place of
//! λ_d/λ_1). One iteration, with R the n×k residuals, P the directions and M⁻¹ the preconditioner:
//!
//! ```text
//! Q = A P;  α = (PᵀQ)⁻¹ PᵀR;  X += P α;  R −= Q α;
//! Z = M⁻¹ R;  β = −(PᵀQ)⁻¹ QᵀZ;  P = orth(Z + P β)
//! ```
//!
//! `orth` is Cholesky-QR done twice while the columns are well apart ([`WELL_APART`]), else
//! modified Gram–Schmidt with a second pass, dropping a column whose norm falls below
//! [`DEPENDENT`] of what it had before projection: the "breakdown-free" block CG of Ji & Li
//! (2017), which keeps going when the residuals become linearly dependent (equal or proportional
//! queries, columns that have converged). Converged columns leave the block, so the last ones
//! iterate alone.
//!
//! ## Cheap products, exact residuals
//! The products Q = A P may come from a cheaper operator Ã (`fast`: f32 products, ~1e-6
//! relative error). Its errors only bend the search directions; what decides convergence is the
//! true residual q − A x, with A's own (f64) products. The recurrence residuals R drift from the
//! true ones as Ã's errors accumulate, so they are replaced by the true residuals (reliable
//! updates, van der Vorst & Ye 2000; the mixed-precision CG of lattice QCD, Clark et al. 2010)
//! whenever a column's residual has fallen [`REPLACE_EVERY`]× since its last replacement, and
//! whenever a column's recurrence says it converged: the directions P are kept, so the Krylov
//! space built so far is not lost. A column is done only when its true residual
//! ‖Axⱼ − qⱼ‖/‖qⱼ‖ is at most the tolerance. Should the replaced residuals disagree with the
//! recurrence by more than [`DISAGREEMENT`]× [`DISAGREEMENTS`] times (Ã too far from A for this
//! problem), the solve goes on with A's products. Cost per iteration: one product of the live
//! columns with Ã, one preconditioner application of all of them, O(d·k²) dense work; about one
//! product with A per decade of residual; memory five d×k blocks.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use rayon::prelude::*;

use super::CurvatureError;
use super::iterative::{ConjugateGradient, Preconditioner, SolveInfo};
use super::operators::{LinearOperator, dot, norm};

/// A direction whose norm after orthogonalisation is below this fraction of its norm before is
/// taken as dependent on the others and dropped.
pub const DEPENDENT: f64 = 1e-8;

/// With cheap products, the residuals are replaced by the true ones whenever a column's residual
/// has fallen by this factor since its last replacement.
pub const REPLACE_EVERY: f64 = 100.0;

/// A replaced residual this many times larger than the recurrence's counts as a disagreement.
pub const DISAGREEMENT: f64 = 100.0;

/// Disagreements after which the solve goes on with exact products.
pub const DISAGREEMENTS: usize = 3;

/// The block recurrence's state: the solutions, residuals and directions of the live columns as
/// d × k matrices (so that every update is one GEMM), the finished columns' results.
struct Block<'q> {
    qs: &'q [&'q [f64]],
    q_norms: Vec<f64>,
    /// Columns still iterating.
    live: Vec<usize>,
    /// Their solutions and residuals, d × live.
    x: Mat<f64>,
    r: Mat<f64>,
    /// Each live column's residual norm at its last replacement.
    anchors: Vec<f64>,
    /// Orthonormal search directions, d × (at most as many as live columns).
    p: Mat<f64>,
    /// The finished columns' solutions and results.
    solved: Vec<Option<(Vec<f64>, SolveInfo)>>,
}

impl ConjugateGradient {
    /// Solves A xⱼ = qⱼ for every right-hand side in one block Krylov space (see the module
    /// documentation), iterating with `fast`'s products when given (A's otherwise); every result
    /// is A's true residual, at most the tolerance. Iterations reported: those of the block when
    /// the column was done.
    pub fn solve_block(
        &self,
        fast: Option<&dyn LinearOperator>,
        a: &dyn LinearOperator,
        qs: &[&[f64]],
        precondition: Option<Preconditioner<'_>>,
    ) -> Result<Vec<(Vec<f64>, SolveInfo)>, CurvatureError> {
        let mut block = Block::new(qs, precondition);
        let mut iterate = fast.unwrap_or(a);
        let mut disagreements = 0;
        let mut iteration = 0;
        while iteration < self.max_iterations && !block.live.is_empty() {
            iteration += 1;
            let (q, chol) = block.advance(iterate, iteration)?;
            let norms = block.residual_norms();
            let reached: Vec<usize> =
                (0..block.live.len()).filter(|&c| norms[c] <= self.tolerance * block.q_norms[block.live[c]]).collect();
            let fallen = norms.iter().zip(&block.anchors).any(|(&n, &a)| n * REPLACE_EVERY <= a);
            // Every live column when one has fallen far enough (cheap products), else only those
            // whose recurrence says they converged.
            let which: Vec<usize> = if fast.is_some() && fallen { (0..block.live.len()).collect() } else { reached };
            if !which.is_empty() {
                disagreements += block.replace_residuals(a, &which);
                if fast.is_some() && disagreements >= DISAGREEMENTS {
                    iterate = a;
                }
                block.retire(self.tolerance, iteration);
            }
            if !block.live.is_empty() {
                block.next_directions(&q, &chol, precondition);
            }
        }
        let unsolved = block.unsolved();
        let results = block.solved.into_iter().zip(unsolved).map(|(s, x)| match s {
            Some((x, info)) => (x, Some(info)),
            None => (x, None),
        });
        self.outcomes(a, qs, results.collect())
    }
}

/// The columns of a d × k matrix as slices.
fn columns(m: &Mat<f64>) -> Vec<&[f64]> {
    (0..m.ncols()).map(|j| m.col(j).try_as_col_major().expect("contiguous").as_slice()).collect()
}

/// A d × k matrix with the given columns (copied side by side on the threads).
fn matrix(d: usize, cols: &[Vec<f64>]) -> Mat<f64> {
    let mut m = Mat::<f64>::zeros(d, cols.len());
    m.par_col_iter_mut().zip(cols).for_each(|(mut column, c)| {
        column.as_mut().try_as_col_major_mut().expect("contiguous").as_slice_mut().copy_from_slice(c)
    });
    m
}

/// aᵀb (small, k × k′), one GEMM on every core.
fn gram(a: &Mat<f64>, b: &Mat<f64>) -> Mat<f64> {
    let mut g = Mat::<f64>::zeros(a.ncols(), b.ncols());
    matmul(g.as_mut(), Accum::Replace, a.transpose(), b.as_ref(), 1.0, Par::rayon(0));
    g
}

/// target += scale · a·b, one GEMM on every core.
fn add_product(target: &mut Mat<f64>, a: &Mat<f64>, b: &Mat<f64>, scale: f64) {
    matmul(target.as_mut(), Accum::Add, a.as_ref(), b.as_ref(), scale, Par::rayon(0));
}

impl<'q> Block<'q> {
    /// The block at x = 0: R = Q, P = orth(M⁻¹R); zero queries are solved at once.
    fn new(qs: &'q [&'q [f64]], precondition: Option<Preconditioner<'_>>) -> Self {
        let d = qs.first().map_or(0, |q| q.len());
        let q_norms: Vec<f64> = qs.iter().map(|q| norm(q)).collect();
        let solved = q_norms
            .iter()
            .map(|&n| (n == 0.0).then(|| (vec![0.0; d], SolveInfo { iterations: 0, relative_residual: 0.0 })))
            .collect::<Vec<_>>();
        let live: Vec<usize> = (0..qs.len()).filter(|&j| solved[j].is_none()).collect();
        let r = matrix(d, &live.iter().map(|&j| qs[j].to_vec()).collect::<Vec<_>>());
        let mut block = Self {
            qs,
            anchors: live.iter().map(|&j| q_norms[j]).collect(),
            x: Mat::zeros(d, live.len()),
            p: Mat::zeros(d, 0),
            live,
            r,
            solved,
            q_norms,
        };
        block.p = orthonormalise(apply(precondition, &block.r));
        block
    }

    /// ‖rⱼ‖ of the live columns.
    fn residual_norms(&self) -> Vec<f64> {
        columns(&self.r).iter().map(|c| norm(c)).collect()
    }

    /// Q = A P, α = (PᵀQ)⁻¹PᵀR, X += Pα, R −= Qα; returns Q and the Cholesky factor of PᵀQ
    /// for the next directions.
    fn advance(&mut self, a: &dyn LinearOperator, iteration: usize) -> Result<(Mat<f64>, Cholesky), CurvatureError> {
        let d = self.p.nrows();
        let q = matrix(d, &a.apply_many(&columns(&self.p)));
        let ptq = gram(&self.p, &q);
        let chol = cholesky(&ptq).ok_or_else(|| CurvatureError::NotPositiveDefinite {
            method: "cg".into(),
            detail: format!(
                "the block's curvature PᵀAP is not positive definite at iteration {iteration}; add --damping or use the ggn operator"
            ),
        })?;
        let alpha = chol.solve(&gram(&self.p, &self.r));
        add_product(&mut self.x, &self.p, &alpha, 1.0);
        add_product(&mut self.r, &q, &alpha, -1.0);
        Ok((q, chol))
    }

    /// Replaces the residuals of the live columns at positions `which` by the true ones,
    /// qⱼ − A xⱼ (one product with `a`); returns 1 when some replaced residual is more than
    /// [`DISAGREEMENT`]× its recurrence's, else 0.
    fn replace_residuals(&mut self, a: &dyn LinearOperator, which: &[usize]) -> usize {
        let solutions = columns(&self.x);
        let products = a.apply_many(&which.iter().map(|&c| solutions[c]).collect::<Vec<_>>());
        let mut disagreed = 0;
        for (&c, ax) in which.iter().zip(products) {
            let j = self.live[c];
            let r = self.r.col_mut(c).try_as_col_major_mut().expect("contiguous").as_slice_mut();
            let before = norm(r);
            r.iter_mut().zip(self.qs[j]).zip(&ax).for_each(|((r, q), a)| *r = q - a);
            let after = norm(r);
            if after > DISAGREEMENT * before {
                disagreed = 1;
            }
            self.anchors[c] = after;
        }
        disagreed
    }

    /// Columns whose (just replaced, true) residual is within `tolerance` are done and leave.
    fn retire(&mut self, tolerance: f64, iteration: usize) {
        let norms = self.residual_norms();
        let keep: Vec<usize> =
            (0..self.live.len()).filter(|&c| norms[c] / self.q_norms[self.live[c]] > tolerance).collect();
        if keep.len() == self.live.len() {
            return;
        }
        for c in (0..self.live.len()).filter(|c| !keep.contains(c)) {
            let x = self.x.col(c).try_as_col_major().expect("contiguous").as_slice().to_vec();
            let info = SolveInfo { iterations: iteration, relative_residual: norms[c] / self.q_norms[self.live[c]] };
            self.solved[self.live[c]] = Some((x, info));
        }
        let keep_columns = |m: &Mat<f64>| Mat::<f64>::from_fn(m.nrows(), keep.len(), |i, c| m[(i, keep[c])]);
        self.x = keep_columns(&self.x);
        self.r = keep_columns(&self.r);
        self.anchors = keep.iter().map(|&c| self.anchors[c]).collect();
        self.live = keep.iter().map(|&c| self.live[c]).collect();
    }

    /// Z = M⁻¹R, β = −(PᵀQ)⁻¹QᵀZ, P = orth(Z + Pβ).
    fn next_directions(&mut self, q: &Mat<f64>, chol: &Cholesky, precondition: Option<Preconditioner<'_>>) {
        let mut z = apply(precondition, &self.r);
        let beta = chol.solve(&gram(q, &z));
        add_product(&mut z, &self.p, &beta, -1.0);
        self.p = orthonormalise(z);
    }

    /// The solutions of the columns that never finished (with `None` results).
    fn unsolved(&self) -> Vec<Vec<f64>> {
        let d = self.x.nrows();
        let mut out = vec![vec![0.0; d]; self.qs.len()];
        for (c, &j) in self.live.iter().enumerate() {
            out[j] = self.x.col(c).try_as_col_major().expect("contiguous").as_slice().to_vec();
        }
        out
    }
}

/// M⁻¹ rⱼ for every residual (all at once), or the residuals themselves without a preconditioner.
fn apply(precondition: Option<Preconditioner<'_>>, r: &Mat<f64>) -> Mat<f64> {
    match precondition {
        Some(m) => matrix(r.nrows(), &m.apply_many(&columns(r))),
        None => r.clone(),
    }
}

/// An orthonormal basis of the columns' span, in their order, a column kept only when at least
/// [`DEPENDENT`] of its norm is left after projection on the ones before it.
///
/// When no column comes near that (every one keeps at least [`WELL_APART`] of its norm), the
/// basis is Cholesky-QR done twice: G = ZᵀZ, Z ← Z R⁻¹ (two GEMM-like passes over Z a round,
/// where Gram–Schmidt makes k; orthogonal to rounding for columns this far apart, Fukaya et al.
/// 2014). Otherwise, modified Gram–Schmidt twice, which decides dependence reliably down to
/// [`DEPENDENT`]. Cost 4·d·k².
fn orthonormalise(columns: Mat<f64>) -> Mat<f64> {
    if let Some(q) = cholesky_qr(&columns).and_then(|q| cholesky_qr(&q)) {
        return q;
    }
    let d = columns.nrows();
    let mut basis: Vec<Vec<f64>> = Vec::with_capacity(columns.ncols());
    for j in 0..columns.ncols() {
        let mut v = columns.col(j).try_as_col_major().expect("contiguous").as_slice().to_vec();
        let before = norm(&v);
        if before.is_nan() || before <= 0.0 {
            continue;
        }
        for _ in 0..2 {
            for b in &basis {
                let c = parallel_dot(b, &v);
                parallel_axpy(-c, b, &mut v);
            }
        }
        let after = parallel_dot(&v, &v).sqrt();
        if after > DEPENDENT * before {
            v.iter_mut().for_each(|x| *x /= after);
            basis.push(v);
        }
    }
    matrix(d, &basis)
}

/// Columns keeping at least this share of their norm after projection on the ones before them
/// are orthonormalised by Cholesky-QR.
pub const WELL_APART: f64 = 1e-4;

/// Z R⁻¹ with RᵀR = ZᵀZ, or `None` when some column keeps less than [`WELL_APART`] of its norm
/// after projection on the ones before it (or is zero, or not finite).
fn cholesky_qr(z: &Mat<f64>) -> Option<Mat<f64>> {
    let k = z.ncols();
    let g = gram(z, z);
    let chol = cholesky(&g)?;
    let l = &chol.0;
    if (0..k).any(|j| !(l[j][j] >= WELL_APART * g[(j, j)].sqrt())) {
        return None;
    }
    // Z R⁻¹ with R = Lᵀ: column j of the result is (z_j − Σ_{t<j} L[j][t] q_t) / L[j][j].
    let r_inverse = Mat::<f64>::from_fn(k, k, |_, _| 0.0);
    let mut r_inverse = r_inverse;
    for j in 0..k {
        // Solve Lᵀ x = e_j column by column: R⁻¹ is upper triangular.
        for i in (0..=j).rev() {
            let mut s = if i == j { 1.0 } else { 0.0 };
            for t in i + 1..=j {
                s -= l[t][i] * r_inverse[(t, j)];
            }
            r_inverse[(i, j)] = s / l[i][i];
        }
    }
    let mut q = Mat::<f64>::zeros(z.nrows(), k);
    matmul(q.as_mut(), Accum::Replace, z.as_ref(), r_inverse.as_ref(), 1.0, Par::rayon(0));
    Some(q)
}

/// Long vectors are split between the threads from this length on.
const PARALLEL_LENGTH: usize = 1 << 15;

/// a·b, halves on two threads for long vectors (the same sum as [`dot`] of each half, added).
fn parallel_dot(a: &[f64], b: &[f64]) -> f64 {
    if a.len() < PARALLEL_LENGTH {
        return dot(a, b);
    }
    let half = a.len() / 2;
    let (x, y) = rayon::join(|| dot(&a[..half], &b[..half]), || dot(&a[half..], &b[half..]));
    x + y
}

/// y += α x, halves on two threads for long vectors.
fn parallel_axpy(alpha: f64, x: &[f64], y: &mut [f64]) {
    let axpy = |x: &[f64], y: &mut [f64]| y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
    if y.len() < PARALLEL_LENGTH {
        return axpy(x, y);
    }
    let half = y.len() / 2;
    let (y0, y1) = y.split_at_mut(half);
    rayon::join(|| axpy(&x[..half], y0), || axpy(&x[half..], y1));
}

/// The lower Cholesky factor of a small symmetric positive definite matrix.
struct Cholesky(Vec<Vec<f64>>);

/// L with LLᵀ = m, or `None` when m is not positive definite (a pivot ≤ 0 or not finite).
fn cholesky(m: &Mat<f64>) -> Option<Cholesky> {
    let k = m.nrows();
    let mut l = vec![vec![0.0; k]; k];
    for i in 0..k {
        for j in 0..=i {
            let s = m[(i, j)] - (0..j).map(|t| l[i][t] * l[j][t]).sum::<f64>();
            if i == j {
                if !(s > 0.0 && s.is_finite()) {
                    return None;
                }
                l[i][i] = s.sqrt();
            } else {
                l[i][j] = s / l[j][j];
            }
        }
    }
    Some(Cholesky(l))
}

impl Cholesky {
    /// m⁻¹ b for a k × c right-hand side.
    fn solve(&self, b: &Mat<f64>) -> Mat<f64> {
        let l = &self.0;
        let k = l.len();
        let mut x = b.clone();
        for c in 0..b.ncols() {
            for i in 0..k {
                let s = x[(i, c)] - (0..i).map(|t| l[i][t] * x[(t, c)]).sum::<f64>();
                x[(i, c)] = s / l[i][i];
            }
            for i in (0..k).rev() {
                let s = x[(i, c)] - (i + 1..k).map(|t| l[t][i] * x[(t, c)]).sum::<f64>();
                x[(i, c)] = s / l[i][i];
            }
        }
        x
    }
}

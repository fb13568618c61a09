//! Block conjugate gradient: all the queries of a trace in one Krylov space.
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
//! `orth` is modified Gram–Schmidt with a second pass, dropping a column whose norm falls below
//! [`DEPENDENT`] of what it had before projection: the "breakdown-free" block CG of Ji & Li
//! (2017), which keeps going when the residuals become linearly dependent (equal or proportional
//! queries, columns that have converged). Converged columns leave the block, so the last ones
//! iterate alone. Cost per iteration: one product of the live columns ([`LinearOperator::apply_many`]),
//! one preconditioner application per column and O(d·k²) dense work; memory five d×k blocks.
//! Like the single recurrences, the result is confirmed with the true residuals ‖Axⱼ − qⱼ‖/‖qⱼ‖
//! (one more product) and a column off by more than 10× the tolerance restarts from where it is.

use super::CurvatureError;
use super::iterative::{ConjugateGradient, FAST_ITERATIONS, Preconditioner, SolveInfo};
use super::operators::{LinearOperator, dot, norm};

/// A direction whose norm after orthogonalisation is below this fraction of its norm before is
/// taken as dependent on the others and dropped.
pub const DEPENDENT: f64 = 1e-8;

/// The block recurrence's state: the solutions of every column, the residuals and directions of
/// the live ones.
struct Block<'q> {
    qs: &'q [&'q [f64]],
    q_norms: Vec<f64>,
    x: Vec<Vec<f64>>,
    /// Columns still iterating, with their residuals.
    live: Vec<usize>,
    r: Vec<Vec<f64>>,
    /// Orthonormal search directions (at most as many as live columns).
    p: Vec<Vec<f64>>,
    /// Iteration at which each column's recurrence residual reached the tolerance.
    reached: Vec<Option<usize>>,
    done: Vec<Option<SolveInfo>>,
}

impl ConjugateGradient {
    /// Solves A xⱼ = qⱼ for every right-hand side in one block Krylov space (see the module
    /// documentation), iterating with `fast` (single-precision products) for the first
    /// [`FAST_ITERATIONS`] iterations when given, then with `a`; every result is confirmed with
    /// `a`. Iterations reported: those of the block when the column's recurrence converged.
    pub fn solve_block(
        &self,
        fast: Option<&dyn LinearOperator>,
        a: &dyn LinearOperator,
        qs: &[&[f64]],
        precondition: Option<Preconditioner<'_>>,
    ) -> Result<Vec<(Vec<f64>, SolveInfo)>, CurvatureError> {
        let mut block = Block::new(qs);
        block.restart(block.live.clone(), qs.iter().map(|q| q.to_vec()).collect(), precondition);
        let mut iterate = fast.unwrap_or(a);
        let mut iteration = 0;
        while iteration < self.max_iterations {
            if fast.is_some() && iteration == FAST_ITERATIONS && !block.live.is_empty() {
                iterate = a;
                let live = block.live.clone();
                let residuals = block.true_residuals(a, &live);
                block.restart(live, residuals, precondition);
            }
            if block.live.is_empty() {
                if !block.confirm(a, self.tolerance, precondition) {
                    iterate = a;
                }
                if block.live.is_empty() {
                    break;
                }
                continue;
            }
            iteration += 1;
            block.step(iterate, iteration, self.tolerance, precondition)?;
        }
        block.confirm(a, self.tolerance, precondition);
        self.outcomes(a, qs, block.x.into_iter().zip(block.done).collect())
    }
}

impl<'q> Block<'q> {
    fn new(qs: &'q [&'q [f64]]) -> Self {
        let q_norms: Vec<f64> = qs.iter().map(|q| norm(q)).collect();
        let done: Vec<Option<SolveInfo>> = q_norms
            .iter()
            .map(|&n| (n == 0.0).then_some(SolveInfo { iterations: 0, relative_residual: 0.0 }))
            .collect();
        Self {
            qs,
            x: qs.iter().map(|q| vec![0.0; q.len()]).collect(),
            live: (0..qs.len()).filter(|&j| done[j].is_none()).collect(),
            r: Vec::new(),
            p: Vec::new(),
            reached: vec![None; qs.len()],
            done,
            q_norms,
        }
    }

    /// The block from the residuals `r` of the columns `live`: P = orth(M⁻¹R).
    fn restart(&mut self, live: Vec<usize>, r: Vec<Vec<f64>>, precondition: Option<Preconditioner<'_>>) {
        let r: Vec<Vec<f64>> = live.iter().zip(r).filter(|(j, _)| self.done[**j].is_none()).map(|(_, r)| r).collect();
        self.live = live.into_iter().filter(|&j| self.done[j].is_none()).collect();
        self.p = orthonormalise(r.iter().map(|r| apply(precondition, r)).collect());
        self.r = r;
    }

    /// One block iteration; columns whose recurrence residual reaches `tolerance` leave the block.
    fn step(
        &mut self,
        a: &dyn LinearOperator,
        iteration: usize,
        tolerance: f64,
        precondition: Option<Preconditioner<'_>>,
    ) -> Result<(), CurvatureError> {
        let directions: Vec<&[f64]> = self.p.iter().map(Vec::as_slice).collect();
        let q = a.apply_many(&directions);
        let ptq = gram(&self.p, &q);
        let chol = cholesky(&ptq).ok_or_else(|| CurvatureError::NotPositiveDefinite {
            method: "cg".into(),
            detail: format!(
                "the block's curvature PᵀAP is not positive definite at iteration {iteration}; add --damping or use the ggn operator"
            ),
        })?;
        let alpha = chol.solve(&gram(&self.p, &self.r));
        for (c, &j) in self.live.iter().enumerate() {
            for (i, (pi, qi)) in self.p.iter().zip(&q).enumerate() {
                let a_ic = alpha[i][c];
                self.x[j].iter_mut().zip(pi).for_each(|(x, p)| *x += a_ic * p);
                self.r[c].iter_mut().zip(qi).for_each(|(r, q)| *r -= a_ic * q);
            }
        }
        // Converged columns leave; the rest make the next directions.
        let keep: Vec<usize> = (0..self.live.len())
            .filter(|&c| {
                let j = self.live[c];
                let converged = norm(&self.r[c]) / self.q_norms[j] <= tolerance;
                if converged {
                    self.reached[j] = Some(iteration);
                }
                !converged
            })
            .collect();
        self.live = keep.iter().map(|&c| self.live[c]).collect();
        self.r = keep.iter().map(|&c| std::mem::take(&mut self.r[c])).collect();
        if self.live.is_empty() {
            return Ok(());
        }
        let mut z: Vec<Vec<f64>> = self.r.iter().map(|r| apply(precondition, r)).collect();
        let beta = chol.solve(&gram(&q, &z));
        for (c, zc) in z.iter_mut().enumerate() {
            for (i, pi) in self.p.iter().enumerate() {
                let b_ic = -beta[i][c];
                zc.iter_mut().zip(pi).for_each(|(z, p)| *z += b_ic * p);
            }
        }
        self.p = orthonormalise(z);
        Ok(())
    }

    /// qⱼ − A xⱼ for the columns `which` (one shared product).
    fn true_residuals(&self, a: &dyn LinearOperator, which: &[usize]) -> Vec<Vec<f64>> {
        let solutions: Vec<&[f64]> = which.iter().map(|&j| self.x[j].as_slice()).collect();
        let products = a.apply_many(&solutions);
        which.iter().zip(products).map(|(&j, ax)| self.qs[j].iter().zip(&ax).map(|(q, a)| q - a).collect()).collect()
    }

    /// Confirms the columns that reached the tolerance with their true residuals: within 10× the
    /// tolerance they are done, the others rejoin the block from their x (a fresh block). Returns
    /// whether every one was confirmed.
    fn confirm(&mut self, a: &dyn LinearOperator, tolerance: f64, precondition: Option<Preconditioner<'_>>) -> bool {
        let reached: Vec<usize> =
            (0..self.qs.len()).filter(|&j| self.reached[j].is_some() && self.done[j].is_none()).collect();
        if reached.is_empty() {
            return true;
        }
        let mut again = Vec::new();
        for (&j, r) in reached.iter().zip(self.true_residuals(a, &reached)) {
            let residual = norm(&r) / self.q_norms[j];
            let iterations = self.reached[j].take().expect("reached");
            if residual <= tolerance * 10.0 {
                self.done[j] = Some(SolveInfo { iterations, relative_residual: residual });
            } else {
                again.push((j, r));
            }
        }
        if again.is_empty() {
            return true;
        }
        // The live columns (if any) restart with them, from their own true residuals.
        let live = std::mem::take(&mut self.live);
        let mut residuals = self.true_residuals(a, &live);
        let mut columns = live;
        for (j, r) in again {
            columns.push(j);
            residuals.push(r);
        }
        self.restart(columns, residuals, precondition);
        false
    }
}

fn apply(precondition: Option<Preconditioner<'_>>, r: &[f64]) -> Vec<f64> {
    precondition.map_or_else(|| r.to_vec(), |m| m(r))
}

/// G[i][j] = aᵢ·bⱼ.
fn gram(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    a.iter().map(|ai| b.iter().map(|bj| dot(ai, bj)).collect()).collect()
}

/// An orthonormal basis of the columns' span, in their order: modified Gram–Schmidt twice (each
/// pass against the basis so far), a column kept only when at least [`DEPENDENT`] of its norm
/// is left after projection. Cost 4·d·k².
fn orthonormalise(columns: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
    let mut basis: Vec<Vec<f64>> = Vec::with_capacity(columns.len());
    for mut v in columns {
        let before = norm(&v);
        if before.is_nan() || before <= 0.0 {
            continue;
        }
        for _ in 0..2 {
            for b in &basis {
                let c = dot(b, &v);
                v.iter_mut().zip(b).for_each(|(x, y)| *x -= c * y);
            }
        }
        let after = norm(&v);
        if after > DEPENDENT * before {
            v.iter_mut().for_each(|x| *x /= after);
            basis.push(v);
        }
    }
    basis
}

/// The lower Cholesky factor of a small symmetric positive definite matrix.
struct Cholesky(Vec<Vec<f64>>);

/// L with LLᵀ = m, or `None` when m is not positive definite (a pivot ≤ 0 or not finite).
fn cholesky(m: &[Vec<f64>]) -> Option<Cholesky> {
    let k = m.len();
    let mut l = vec![vec![0.0; k]; k];
    for i in 0..k {
        for j in 0..=i {
            let s = m[i][j] - (0..j).map(|t| l[i][t] * l[j][t]).sum::<f64>();
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
    /// m⁻¹ b for a k×c right-hand side given as rows (b[i][c]).
    fn solve(&self, b: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let l = &self.0;
        let k = l.len();
        let cols = b.first().map_or(0, Vec::len);
        let mut x = b.to_vec();
        for c in 0..cols {
            for i in 0..k {
                let s = x[i][c] - (0..i).map(|t| l[i][t] * x[t][c]).sum::<f64>();
                x[i][c] = s / l[i][i];
            }
            for i in (0..k).rev() {
                let s = x[i][c] - (i + 1..k).map(|t| l[t][i] * x[t][c]).sum::<f64>();
                x[i][c] = s / l[i][i];
            }
        }
        x
    }
}

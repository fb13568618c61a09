//! Iterative inverse-curvature solvers built on matrix-free products.
//!
//! Each is three things, as in faer's iterative solvers: its parameters (with defaults), its
//! result info (iterations, relative residual ‖Ax − q‖/‖q‖ measured with the exact operator) and
//! a typed error (non-convergence carries the residual reached; a non-positive curvature
//! direction is reported, never silently continued).
//!
//! - [`ConjugateGradient`] (Hestenes & Stiefel 1952), optionally preconditioned (e.g. by K-FAC):
//!   one product per iteration; converges in at most d iterations in exact arithmetic, with error
//!   shrinking like ((√κ − 1)/(√κ + 1))ᵏ for condition number κ.
//! - [`Lissa`] (Agarwal, Bullins & Hazan 2017; as in Koh & Liang 2017): the Neumann series
//!   x ← q + x − (A x)/s, result x/s, with products on random mini-batches (full batch when
//!   `batch` ≥ n), averaged over `repeats`. Converges when s exceeds the largest eigenvalue; the
//!   error shrinks like (1 − λ_min/s)ᵏ, so it is slow on ill-conditioned problems.
//! - [`Arnoldi`] (Schioppa et al. 2022): m Arnoldi iterations with full re-orthogonalisation
//!   build a Krylov basis V and the small Hessenberg matrix Vᵀ A V, whose eigenpairs (faer) give
//!   the top-k eigenpairs of A; A⁻¹ is then applied in that subspace only:
//!   x = Σⱼ uⱼ uⱼᵀ q / λⱼ. Exact when q lies in the span of the top-k eigenvectors; otherwise it
//!   drops the rest of q (the method's known bias toward high-curvature directions).

use faer::{Mat, Side};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::CurvatureError;
use super::operators::{LinearOperator, dot, norm};

/// How an iterative solve ended.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SolveInfo {
    /// Iterations (products) used.
    pub iterations: usize,
    /// ‖(A)x − q‖ / ‖q‖ with the exact operator.
    pub relative_residual: f64,
}

/// Conjugate gradient parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ConjugateGradient {
    /// Stop when ‖Ax − q‖/‖q‖ ≤ this.
    pub tolerance: f64,
    /// Give up after this many iterations.
    pub max_iterations: usize,
}

impl ConjugateGradient {
    /// The relative-residual tolerance unless one is given.
    pub const DEFAULT_TOLERANCE: f64 = 1e-8;
    /// The iteration limit unless one is given.
    pub const DEFAULT_MAX_ITERATIONS: usize = 1000;
}

impl Default for ConjugateGradient {
    fn default() -> Self {
        Self { tolerance: Self::DEFAULT_TOLERANCE, max_iterations: Self::DEFAULT_MAX_ITERATIONS }
    }
}

/// One right-hand side's state in [`ConjugateGradient::solve_many`].
struct CgColumn {
    x: Vec<f64>,
    r: Vec<f64>,
    p: Vec<f64>,
    rz: f64,
    q_norm: f64,
    /// Its recurrence residual reached the tolerance at this iteration (to be confirmed).
    reached: Option<usize>,
    done: Option<SolveInfo>,
}

/// Iterations a mixed solve ([`ConjugateGradient::solve_many_mixed`]) makes with its cheap
/// products before it goes on with the exact ones.
pub const FAST_ITERATIONS: usize = 50;

/// A preconditioner M⁻¹ ≈ A⁻¹: a symmetric positive definite operator, applied to every live
/// residual at once ([`LinearOperator::apply_many`]).
pub type Preconditioner<'a> = &'a dyn LinearOperator;

impl CgColumn {
    /// CG's state from x = x₀ with residual r = q − A x₀: the first direction is M⁻¹r.
    fn restart(&mut self, r: Vec<f64>, precondition: Option<Preconditioner<'_>>) {
        let z = precondition.map_or_else(|| r.clone(), |m| m.apply(&r));
        self.rz = dot(&r, &z);
        self.r = r;
        self.p = z;
        self.reached = None;
    }

    /// One step along p given Ap; returns whether the recurrence residual reached `tolerance`.
    fn step(&mut self, ap: &[f64], iteration: usize, tolerance: f64) -> Result<bool, CurvatureError> {
        let pap = dot(&self.p, ap);
        if pap <= 0.0 || !pap.is_finite() {
            return Err(CurvatureError::NotPositiveDefinite {
                method: "cg".into(),
                detail: format!(
                    "direction of curvature pᵀAp = {pap:e} at iteration {iteration}; add --damping or use the ggn operator"
                ),
            });
        }
        let alpha = self.rz / pap;
        self.x.iter_mut().zip(&self.p).for_each(|(xi, pi)| *xi += alpha * pi);
        self.r.iter_mut().zip(ap).for_each(|(ri, api)| *ri -= alpha * api);
        Ok(norm(&self.r) / self.q_norm <= tolerance)
    }

    /// The next direction p ← M⁻¹r + β p.
    fn next_direction(&mut self, precondition: Option<Preconditioner<'_>>) {
        let z = precondition.map_or_else(|| self.r.clone(), |m| m.apply(&self.r));
        let rz_next = dot(&self.r, &z);
        let beta = rz_next / self.rz;
        self.rz = rz_next;
        self.p.iter_mut().zip(&z).for_each(|(pi, zi)| *pi = zi + beta * *pi);
    }
}

impl ConjugateGradient {
    /// Solves A x = q from x = 0. `precondition`, if given, applies M⁻¹ ≈ A⁻¹ (symmetric
    /// positive definite). Cost: one product (and one preconditioner application) per iteration.
    pub fn solve(
        &self,
        a: &dyn LinearOperator,
        q: &[f64],
        precondition: Option<Preconditioner<'_>>,
    ) -> Result<(Vec<f64>, SolveInfo), CurvatureError> {
        Ok(self.solve_many(a, &[q], precondition)?.pop().expect("one right-hand side"))
    }

    /// Solves A xⱼ = qⱼ for every right-hand side at once: k independent CG recurrences (each
    /// its own step sizes, stopped when its residual reaches the tolerance) that share one
    /// [`LinearOperator::apply_many`] per iteration, so an operator that makes one pass over its
    /// data for all directions costs about one product per iteration instead of k. When every
    /// recurrence has reached the tolerance, one more shared product confirms the true residuals
    /// ‖A xⱼ − qⱼ‖/‖qⱼ‖ (the recurrence drifts in finite precision); a solution off by more than
    /// 10× the tolerance restarts from where it is. Iterations: the largest any right-hand side
    /// needs; each result reports its own.
    pub fn solve_many(
        &self,
        a: &dyn LinearOperator,
        qs: &[&[f64]],
        precondition: Option<Preconditioner<'_>>,
    ) -> Result<Vec<(Vec<f64>, SolveInfo)>, CurvatureError> {
        self.solve_many_mixed(None, a, qs, precondition)
    }

    /// [`ConjugateGradient::solve_many`] iterating with `fast`, a cheaper approximation of `a`
    /// (single-precision products), while every result is confirmed against `a` itself: the
    /// reported residuals are `a`'s. Should a confirmation fail, or [`FAST_ITERATIONS`] pass
    /// without every right-hand side reaching the tolerance, the solve goes on with `a`'s products
    /// from where it is (restarted from the true residuals), so it ends where `a` alone would.
    pub fn solve_many_mixed(
        &self,
        fast: Option<&dyn LinearOperator>,
        a: &dyn LinearOperator,
        qs: &[&[f64]],
        precondition: Option<Preconditioner<'_>>,
    ) -> Result<Vec<(Vec<f64>, SolveInfo)>, CurvatureError> {
        let columns = self.iterate_columns(fast, a, qs, precondition)?;
        self.outcomes(a, qs, columns.into_iter().map(|c| (c.x, c.done)).collect())
    }

    /// Each right-hand side's solution and info, or the typed non-convergence (with the true
    /// residual reached) of the first that has none.
    pub(super) fn outcomes(
        &self,
        a: &dyn LinearOperator,
        qs: &[&[f64]],
        solved: Vec<(Vec<f64>, Option<SolveInfo>)>,
    ) -> Result<Vec<(Vec<f64>, SolveInfo)>, CurvatureError> {
        solved
            .into_iter()
            .zip(qs)
            .map(|((x, done), q)| match done {
                Some(info) => Ok((x, info)),
                None => Err(CurvatureError::NotConverged {
                    method: "cg".into(),
                    iterations: self.max_iterations,
                    residual: residual_of(a, &x, q),
                    tolerance: self.tolerance,
                }),
            })
            .collect()
    }

    /// [`ConjugateGradient::solve`] that stops after at most `max_iterations` products without
    /// failing: the x reached and its true residual (one more product), converged or not. For a
    /// cheap probe of an operator and a preconditioner (`fit --check quick`).
    pub fn solve_within(
        &self,
        a: &dyn LinearOperator,
        q: &[f64],
        precondition: Option<Preconditioner<'_>>,
    ) -> Result<(Vec<f64>, SolveInfo), CurvatureError> {
        let column = self.iterate_columns(None, a, &[q], precondition)?.pop().expect("one right-hand side");
        Ok(match column.done {
            Some(info) => (column.x, info),
            None => {
                let relative_residual = residual_of(a, &column.x, q);
                (column.x, SolveInfo { iterations: self.max_iterations, relative_residual })
            }
        })
    }

    /// The shared recurrences of [`ConjugateGradient::solve_many_mixed`], up to
    /// `max_iterations`; columns that did not converge have `done` = `None`.
    fn iterate_columns(
        &self,
        fast: Option<&dyn LinearOperator>,
        a: &dyn LinearOperator,
        qs: &[&[f64]],
        precondition: Option<Preconditioner<'_>>,
    ) -> Result<Vec<CgColumn>, CurvatureError> {
        let mut iterate = fast.unwrap_or(a);
        let mut columns: Vec<CgColumn> = qs
            .iter()
            .map(|q| {
                let q_norm = norm(q);
                let done = (q_norm == 0.0).then_some(SolveInfo { iterations: 0, relative_residual: 0.0 });
                let mut c = CgColumn {
                    x: vec![0.0; q.len()],
                    r: Vec::new(),
                    p: Vec::new(),
                    rz: 0.0,
                    q_norm,
                    reached: None,
                    done,
                };
                c.restart(q.to_vec(), precondition);
                c
            })
            .collect();
        for iteration in 1..=self.max_iterations {
            let active: Vec<usize> =
                (0..columns.len()).filter(|&j| columns[j].done.is_none() && columns[j].reached.is_none()).collect();
            if fast.is_some() && iteration == FAST_ITERATIONS + 1 && !active.is_empty() {
                // Past this, cheap products may be stagnating on an ill-conditioned problem (their
                // error relative to ‖Ap‖ grows with the condition number): go on with `a`'s,
                // from the true residuals.
                iterate = a;
                for (&j, r) in active.iter().zip(true_residuals(a, qs, &columns, &active)) {
                    columns[j].restart(r, precondition);
                }
            }
            if active.is_empty() {
                if !self.confirm(a, qs, &mut columns, precondition) {
                    iterate = a;
                }
                if columns.iter().all(|c| c.done.is_some()) {
                    break;
                }
                continue;
            }
            let directions: Vec<&[f64]> = active.iter().map(|&j| columns[j].p.as_slice()).collect();
            let products = iterate.apply_many(&directions);
            for (&j, ap) in active.iter().zip(&products) {
                if columns[j].step(ap, iteration, self.tolerance)? {
                    columns[j].reached = Some(iteration);
                } else {
                    columns[j].next_direction(precondition);
                }
            }
        }
        self.confirm(a, qs, &mut columns, precondition);
        Ok(columns)
    }

    /// Confirms every column whose recurrence reached the tolerance with its true residual (one
    /// shared product): within 10× the tolerance it is done, else it restarts from its x.
    /// Returns whether every one was confirmed.
    fn confirm(
        &self,
        a: &dyn LinearOperator,
        qs: &[&[f64]],
        columns: &mut [CgColumn],
        precondition: Option<Preconditioner<'_>>,
    ) -> bool {
        let reached: Vec<usize> = (0..columns.len()).filter(|&j| columns[j].reached.is_some()).collect();
        if reached.is_empty() {
            return true;
        }
        let mut confirmed = true;
        for (&j, r) in reached.iter().zip(true_residuals(a, qs, columns, &reached)) {
            let column = &mut columns[j];
            let residual = norm(&r) / column.q_norm;
            if residual <= self.tolerance * 10.0 {
                let iterations = column.reached.expect("reached");
                column.done = Some(SolveInfo { iterations, relative_residual: residual });
            } else {
                column.restart(r, precondition);
                confirmed = false;
            }
        }
        confirmed
    }
}

/// qⱼ − A xⱼ for the columns `which`, with one shared product.
fn true_residuals(a: &dyn LinearOperator, qs: &[&[f64]], columns: &[CgColumn], which: &[usize]) -> Vec<Vec<f64>> {
    let solutions: Vec<&[f64]> = which.iter().map(|&j| columns[j].x.as_slice()).collect();
    let products = a.apply_many(&solutions);
    which.iter().zip(products).map(|(&j, ax)| qs[j].iter().zip(&ax).map(|(q, a)| q - a).collect()).collect()
}

/// ‖A x − q‖ / ‖q‖.
pub fn residual_of(a: &dyn LinearOperator, x: &[f64], q: &[f64]) -> f64 {
    let ax = a.apply(x);
    let r: Vec<f64> = ax.iter().zip(q).map(|(a, b)| a - b).collect();
    norm(&r) / norm(q).max(f64::MIN_POSITIVE)
}

/// LiSSA parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Lissa {
    /// s: must exceed the largest eigenvalue of A.
    pub scale: f64,
    /// Recursion depth.
    pub depth: usize,
    /// Independent recursions averaged.
    pub repeats: usize,
    /// Examples per stochastic product (≥ n: full batch, deterministic).
    pub batch: usize,
    /// Accept the result when the relative residual is at most this.
    pub tolerance: f64,
    /// Seed of the mini-batch sampling.
    pub seed: u64,
}

impl Lissa {
    /// The recursion depth unless one is given.
    pub const DEFAULT_DEPTH: usize = 5000;
    /// The accepted relative residual unless one is given.
    pub const DEFAULT_TOLERANCE: f64 = 1e-3;
}

impl Default for Lissa {
    fn default() -> Self {
        Self {
            scale: 0.0,
            depth: Self::DEFAULT_DEPTH,
            repeats: 1,
            batch: usize::MAX,
            tolerance: Self::DEFAULT_TOLERANCE,
            seed: 0,
        }
    }
}

impl Lissa {
    /// Solves A x = q. `sample(v, rows)` is A restricted to the mini-batch `rows` (or the full
    /// operator when `rows` is `None`); `n` the number of examples.
    pub fn solve(
        &self,
        a: &dyn LinearOperator,
        sample: &dyn Fn(&[f64], Option<&[usize]>) -> Vec<f64>,
        n: usize,
        q: &[f64],
    ) -> Result<(Vec<f64>, SolveInfo), CurvatureError> {
        if !(self.scale > 0.0) {
            return Err(CurvatureError::Config("lissa needs a scale s > 0 above the largest eigenvalue".into()));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut total = vec![0.0; q.len()];
        for _ in 0..self.repeats.max(1) {
            let mut h = q.to_vec();
            for _ in 0..self.depth {
                let rows: Option<Vec<usize>> =
                    (self.batch < n).then(|| (0..self.batch).map(|_| rng.random_range(0..n)).collect());
                let ah = sample(&h, rows.as_deref());
                for ((hi, qi), ai) in h.iter_mut().zip(q).zip(&ah) {
                    *hi = qi + *hi - ai / self.scale;
                }
                if !h.iter().all(|v| v.is_finite()) {
                    return Err(CurvatureError::NotConverged {
                        method: "lissa".into(),
                        iterations: self.depth,
                        residual: f64::INFINITY,
                        tolerance: self.tolerance,
                    });
                }
            }
            total.iter_mut().zip(&h).for_each(|(t, hi)| *t += hi / self.scale);
        }
        let repeats = self.repeats.max(1) as f64;
        total.iter_mut().for_each(|t| *t /= repeats);
        let residual = residual_of(a, &total, q);
        if residual > self.tolerance {
            return Err(CurvatureError::NotConverged {
                method: "lissa".into(),
                iterations: self.depth * self.repeats.max(1),
                residual,
                tolerance: self.tolerance,
            });
        }
        Ok((total, SolveInfo { iterations: self.depth * self.repeats.max(1), relative_residual: residual }))
    }
}

/// Arnoldi parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Arnoldi {
    /// Krylov dimension m (products).
    pub iterations: usize,
    /// Eigenpairs kept.
    pub top_k: usize,
    /// Seed of the random start vector.
    pub seed: u64,
}

impl Arnoldi {
    /// The Krylov dimension unless one is given.
    pub const DEFAULT_ITERATIONS: usize = 100;
    /// The eigenpairs kept unless a number is given.
    pub const DEFAULT_TOP_K: usize = 50;
}

impl Default for Arnoldi {
    fn default() -> Self {
        Self { iterations: Self::DEFAULT_ITERATIONS, top_k: Self::DEFAULT_TOP_K, seed: 0 }
    }
}

/// The top eigenpairs of an operator.
#[derive(Clone, Debug)]
pub struct Eigenpairs {
    /// Eigenvalues, largest first.
    pub values: Vec<f64>,
    /// Unit eigenvectors, one per value.
    pub vectors: Vec<Vec<f64>>,
}

impl Arnoldi {
    /// The top-k eigenpairs of symmetric `a`. Cost: m products plus O(m²·d) for the
    /// re-orthogonalisation and O(m³) for the small eigenproblem.
    pub fn eigenpairs(&self, a: &dyn LinearOperator) -> Result<Eigenpairs, CurvatureError> {
        let d = a.dim();
        let m = self.iterations.min(d).max(1);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut v0: Vec<f64> = (0..d).map(|_| rng.random::<f64>() - 0.5).collect();
        let n0 = norm(&v0);
        v0.iter_mut().for_each(|x| *x /= n0);
        let mut basis = vec![v0];
        let mut h = Mat::<f64>::zeros(m + 1, m);
        let mut steps = m;
        for j in 0..m {
            let mut w = a.apply(&basis[j]);
            // Full re-orthogonalisation, twice ("twice is enough", Giraud et al. 2005).
            for _ in 0..2 {
                for (i, vi) in basis.iter().enumerate() {
                    let c = dot(&w, vi);
                    h[(i, j)] += c;
                    w.iter_mut().zip(vi).for_each(|(wk, vk)| *wk -= c * vk);
                }
            }
            let nw = norm(&w);
            h[(j + 1, j)] = nw;
            if nw <= 1e-12 * h[(j, j)].abs().max(1.0) {
                steps = j + 1; // invariant subspace found
                break;
            }
            w.iter_mut().for_each(|x| *x /= nw);
            basis.push(w);
        }
        let small = Mat::<f64>::from_fn(steps, steps, |i, j| 0.5 * (h[(i, j)] + h[(j, i)]));
        let eig = small
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| CurvatureError::Config(format!("Arnoldi eigenproblem failed: {e:?}")))?;
        let (u, s) = (eig.U(), eig.S().column_vector());
        let k = self.top_k.min(steps);
        let mut values = Vec::with_capacity(k);
        let mut vectors = Vec::with_capacity(k);
        for idx in (steps - k..steps).rev() {
            values.push(s[idx]);
            let mut vec = vec![0.0; d];
            for (i, vi) in basis.iter().take(steps).enumerate() {
                let c = u[(i, idx)];
                vec.iter_mut().zip(vi).for_each(|(x, y)| *x += c * y);
            }
            vectors.push(vec);
        }
        Ok(Eigenpairs { values, vectors })
    }
}

impl Eigenpairs {
    /// Σⱼ uⱼ uⱼᵀ q / (λⱼ + damping): the inverse in the kept subspace. Cost k·d.
    pub fn solve(&self, q: &[f64], damping: f64) -> Vec<f64> {
        let mut x = vec![0.0; q.len()];
        for (value, u) in self.values.iter().zip(&self.vectors) {
            let c = dot(u, q) / (value + damping);
            x.iter_mut().zip(u).for_each(|(xi, ui)| *xi += c * ui);
        }
        x
    }
}

//! Limited-memory BFGS for the convex models, which influence functions need at an exact optimum.
//!
//! Nocedal & Wright, *Numerical Optimization* (2nd ed.), Algorithm 7.4 (two-loop recursion) with
//! a backtracking Armijo line search (sufficient decrease c₁ = 1e-4). The initial inverse-Hessian
//! scale is γ = sᵀy / yᵀy from the newest pair; pairs with sᵀy ≤ 1e-12‖s‖‖y‖ are skipped, which
//! keeps the approximation positive definite. Where the decrease of f falls below f64 rounding
//! (close to the optimum), a step is accepted when f stays level and ‖∇f‖ shrinks. If the line
//! search fails, the memory is cleared and
//! a steepest-descent step is tried once before giving up.
//!
//! Cost per iteration: one objective-and-gradient evaluation (more when the line search
//! backtracks) plus O(m·d) for the recursion, m the memory and d the dimension.
//! Stops when ‖∇f‖₂ < `tolerance`; not reaching it is an error carrying the norm reached.
//! (burn-optim ships an L-BFGS for modules; this one works on a flat f64 vector so the stopping
//! rule is the exact ‖∇L‖ the influence computations rely on.)

use std::collections::VecDeque;

use crate::ModelError;

/// An approximate inverse Hessian, v ↦ H⁻¹v, used as L-BFGS's initial matrix.
pub type Preconditioner<'a> = &'a dyn Fn(&[f64]) -> Vec<f64>;

/// Parameters of the minimiser.
#[derive(Clone, Debug)]
pub struct Lbfgs {
    /// Number of (s, y) pairs kept.
    pub memory: usize,
    /// Stop once ‖∇f‖₂ is below this.
    pub tolerance: f64,
    /// Give up after this many iterations.
    pub max_iterations: usize,
}

impl Default for Lbfgs {
    fn default() -> Self {
        Self { memory: 20, tolerance: 1e-6, max_iterations: 5000 }
    }
}

/// Where the minimiser stopped.
#[derive(Clone, Debug)]
pub struct LbfgsResult {
    /// The minimiser.
    pub x: Vec<f64>,
    /// f(x).
    pub value: f64,
    /// ‖∇f(x)‖₂.
    pub gradient_norm: f64,
    /// Iterations taken.
    pub iterations: usize,
}

/// Inner product.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Euclidean norm.
pub fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

impl Lbfgs {
    /// Minimises `f` from `x0`. `f` returns the value and the gradient; `on_iteration` is told
    /// (iteration, value, gradient norm) after every accepted step.
    pub fn minimize(
        &self,
        x0: Vec<f64>,
        f: impl FnMut(&[f64]) -> Result<(f64, Vec<f64>), ModelError>,
        on_iteration: impl FnMut(usize, f64, f64),
    ) -> Result<LbfgsResult, ModelError> {
        self.minimize_preconditioned(x0, f, None, on_iteration)
    }

    /// [`Lbfgs::minimize`] with `precondition(v)` ≈ (∇²f)⁻¹v as the recursion's initial inverse
    /// Hessian instead of γI (Nocedal & Wright, §7.2). With the exact inverse Hessian of a nearby
    /// point (the full data's, when re-optimising after removing a few examples), the iteration is
    /// a quasi-Newton method that reaches 1e-10 in a handful of steps. The minimiser is the same.
    pub fn minimize_preconditioned(
        &self,
        x0: Vec<f64>,
        mut f: impl FnMut(&[f64]) -> Result<(f64, Vec<f64>), ModelError>,
        precondition: Option<Preconditioner<'_>>,
        mut on_iteration: impl FnMut(usize, f64, f64),
    ) -> Result<LbfgsResult, ModelError> {
        let mut x = x0;
        let (mut fx, mut g) = f(&x)?;
        let mut history: VecDeque<Pair> = VecDeque::new();
        let mut restarted = false;
        for iteration in 0..self.max_iterations {
            let gnorm = norm(&g);
            if gnorm < self.tolerance {
                return Ok(LbfgsResult { x, value: fx, gradient_norm: gnorm, iterations: iteration });
            }
            let mut direction = two_loop(&history, &g, precondition);
            let mut slope = dot(&g, &direction);
            if slope >= 0.0 {
                // Not a descent direction (should not happen with positive sᵀy): fall back.
                history.clear();
                slope = -gnorm * gnorm;
                direction = g.iter().map(|v| -v / gnorm.max(1.0)).collect();
            }
            let Some((x_new, f_new, g_new)) = line_search(&mut f, &x, fx, &direction, slope, gnorm)? else {
                if !restarted && !history.is_empty() {
                    history.clear();
                    restarted = true;
                    continue;
                }
                return Err(ModelError::NotConverged {
                    iterations: iteration,
                    gradient_norm: gnorm,
                    tolerance: self.tolerance,
                    reason: "the line search found no decrease (the objective is flat to f64 precision)".into(),
                });
            };
            restarted = false;
            let s: Vec<f64> = x_new.iter().zip(&x).map(|(a, b)| a - b).collect();
            let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
            let sy = dot(&s, &y);
            if sy > 1e-12 * norm(&s) * norm(&y) {
                if history.len() == self.memory {
                    history.pop_front();
                }
                history.push_back((s, y, 1.0 / sy));
            }
            x = x_new;
            fx = f_new;
            g = g_new;
            on_iteration(iteration + 1, fx, norm(&g));
        }
        let gnorm = norm(&g);
        if gnorm < self.tolerance {
            return Ok(LbfgsResult { x, value: fx, gradient_norm: gnorm, iterations: self.max_iterations });
        }
        Err(ModelError::NotConverged {
            iterations: self.max_iterations,
            gradient_norm: gnorm,
            tolerance: self.tolerance,
            reason: "iteration limit reached".into(),
        })
    }
}

/// One (s, y, 1/sᵀy) pair of the limited memory.
type Pair = (Vec<f64>, Vec<f64>, f64);

/// The two-loop recursion (Nocedal & Wright, Algorithm 7.4): −H g, with `precondition` or γI
/// (γ = sᵀy/yᵀy of the newest pair) as the initial inverse Hessian. Cost O(m·d).
fn two_loop(history: &VecDeque<Pair>, g: &[f64], precondition: Option<Preconditioner<'_>>) -> Vec<f64> {
    let mut q = g.to_vec();
    let mut alphas = Vec::with_capacity(history.len());
    for (s, y, rho) in history.iter().rev() {
        let a = rho * dot(s, &q);
        q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= a * yi);
        alphas.push(a);
    }
    match precondition {
        Some(p) => q = p(&q),
        None => {
            let gamma = match history.back() {
                Some((s, y, _)) => dot(s, y) / dot(y, y),
                None => 1.0 / norm(g).max(1.0),
            };
            q.iter_mut().for_each(|v| *v *= gamma);
        }
    }
    for ((s, y, rho), a) in history.iter().zip(alphas.into_iter().rev()) {
        let b = rho * dot(y, &q);
        q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - b) * si);
    }
    q.into_iter().map(|v| -v).collect()
}

/// Backtracking Armijo line search from `x` along `direction` (sufficient decrease c₁ = 1e-4, at
/// most 60 halvings). Near the optimum the decrease in f drops below f64 resolution
/// (|Δf| ≈ ‖∇f‖²/λ); there a step that does not raise f beyond rounding and shrinks ‖∇f‖ is taken.
/// Returns the accepted point with its value and gradient, or `None`.
#[allow(clippy::type_complexity)]
fn line_search(
    f: &mut impl FnMut(&[f64]) -> Result<(f64, Vec<f64>), ModelError>,
    x: &[f64],
    fx: f64,
    direction: &[f64],
    slope: f64,
    gnorm: f64,
) -> Result<Option<(Vec<f64>, f64, Vec<f64>)>, ModelError> {
    let mut step = 1.0;
    for _ in 0..60 {
        let candidate: Vec<f64> = x.iter().zip(direction).map(|(xi, di)| xi + step * di).collect();
        let (fc, gc) = f(&candidate)?;
        let flat = (fc - fx).abs() <= 64.0 * f64::EPSILON * fx.abs().max(1e-300);
        let armijo = fc <= fx + 1e-4 * step * slope;
        if fc.is_finite() && (armijo || (flat && norm(&gc) < gnorm)) {
            return Ok(Some((candidate, fc, gc)));
        }
        step *= 0.5;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A strictly convex quadratic ½ xᵀAx − bᵀx with known minimiser A⁻¹b.
    #[test]
    fn minimises_a_quadratic_to_its_closed_form() {
        let a = [[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]];
        let b = [1.0, -2.0, 0.5];
        let f = |x: &[f64]| {
            let ax: Vec<f64> = (0..3).map(|i| dot(&a[i], x)).collect();
            Ok((0.5 * dot(x, &ax) - dot(&b, x), ax.iter().zip(&b).map(|(p, q)| p - q).collect()))
        };
        let r = Lbfgs { tolerance: 1e-12, ..Default::default() }.minimize(vec![0.0; 3], f, |_, _, _| {}).unwrap();
        // Closed form by Cramer's rule.
        let det = |m: [[f64; 3]; 3]| {
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        };
        let d = det(a);
        for (k, xk) in r.x.iter().enumerate() {
            let mut m = a;
            for i in 0..3 {
                m[i][k] = b[i];
            }
            assert!((xk - det(m) / d).abs() < 1e-10, "x[{k}] = {xk}");
        }
    }
}

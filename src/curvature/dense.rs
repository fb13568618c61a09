//! Dense curvature for small models: build the d×d matrix in f64 and factor it (faer Cholesky).
//!
//! - Logistic regression (`exact`, and `ggn`, which is the same matrix for a linear model):
//!   H = (1/n) Σᵢ (diag pᵢ − pᵢpᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ + λI with x̃ = [x; 1]. In culprit's θ layout (weight
//!   `[in, out]` then bias, i.e. `[(in+1), C]` row-major) entry ((j,c),(k,c')) is
//!   (1/n) Σᵢ x̃ᵢⱼ x̃ᵢₖ (δ_cc′ p_ic − p_ic p_ic′) + λδ. Built as C(C+1)/2 weighted Gram matrices
//!   X̃ᵀ diag(w) X̃: cost n·(in+1)²·C(C+1)/2.
//! - Any model, `ggn`: G = (1/n) Σᵢ Σ_c p_ic g_ic g_icᵀ + λI from per-example, per-class loss
//!   gradients (layer taps, f64): cost n·C·d².
//! - Any model, `exact`: the Hessian column by column from [`HessianFd`] products, symmetrised:
//!   cost 2d full-batch gradients. Refused when the Hessian is not positive definite (ReLU
//!   networks away from a minimum often are not); use `ggn` there.
//!
//! Solving (H + δI)x = q with the Cholesky factor costs d² per right-hand side; the factor
//! costs d³/3 once. Models up to [`MAX_DENSE_PARAMS`] parameters.

use faer::{Mat, Par, Side};

use super::CurvatureError;
use super::operators::{HessianFd, LinearOperator, Objective};
use crate::gradients::{Measurement, Target, per_example_gradients};
use culprit_models::Architecture;

/// Largest model the dense methods build a matrix for.
pub const MAX_DENSE_PARAMS: usize = 20_000;

/// Checks the size limit.
pub fn check_size(d: usize, method: &str) -> Result<(), CurvatureError> {
    if d > MAX_DENSE_PARAMS {
        return Err(CurvatureError::TooLarge { method: method.into(), params: d, limit: MAX_DENSE_PARAMS });
    }
    Ok(())
}

/// The closed-form Hessian of multinomial logistic regression (module docs), without damping.
pub fn logreg_hessian(objective: &Objective) -> Mat<f64> {
    let net = &objective.network;
    let classes = net.config().num_classes;
    let data = &objective.data;
    let (n, dim) = (data.len(), data.dim());
    let m = dim + 1;
    let p = crate::predict::predict(net, data, 4096, &objective.device.clone());
    let xt = Mat::<f64>::from_fn(n, m, |i, j| if j < dim { f64::from(data.features[i * dim + j]) } else { 1.0 });
    let mut h = Mat::<f64>::zeros(m * classes, m * classes);
    for c in 0..classes {
        for c2 in c..classes {
            let weighted = Mat::<f64>::from_fn(n, m, |i, j| {
                let pi = &p[i].probabilities;
                let w = if c == c2 { pi[c] - pi[c] * pi[c] } else { -pi[c] * pi[c2] };
                xt[(i, j)] * w / n as f64
            });
            let block = xt.transpose() * &weighted;
            for j in 0..m {
                for k in 0..m {
                    h[(j * classes + c, k * classes + c2)] = block[(j, k)];
                    h[(k * classes + c2, j * classes + c)] = block[(j, k)];
                }
            }
        }
    }
    for i in 0..m * classes {
        h[(i, i)] += objective.l2;
    }
    h
}

/// Dense GGN from per-example, per-class loss gradients (module docs), without damping.
pub fn dense_ggn(objective: &Objective, chunk: usize) -> Mat<f64> {
    let net = &objective.network;
    let classes = net.config().num_classes;
    let d = net.num_params();
    let data = &objective.data;
    let (n, dim) = (data.len(), data.dim());
    let probs = crate::predict::predict(net, data, 4096, &objective.device.clone());
    let mut g = Mat::<f64>::zeros(d, d);
    for start in (0..n).step_by(chunk.max(1)) {
        let end = (start + chunk).min(n);
        let b = end - start;
        let features = &data.features[start * dim..end * dim];
        for c in 0..classes {
            let targets = vec![c as u32; b];
            let blocks = per_example_gradients(
                net,
                features,
                &targets,
                Measurement::Loss(Target::Class(c as u32)),
                &objective.device,
            );
            let rows = crate::gradients::gradient_rows_f64(&blocks);
            let scaled = Mat::<f64>::from_fn(b, d, |i, j| {
                rows[i * d + j] * (probs[start + i].probabilities[c] / n as f64).sqrt()
            });
            g += scaled.transpose() * &scaled;
        }
    }
    for i in 0..d {
        g[(i, i)] += objective.l2;
    }
    g
}

/// The Hessian by finite-difference columns, symmetrised: (H + Hᵀ)/2.
pub fn fd_hessian(objective: &Objective) -> Mat<f64> {
    let d = objective.network.num_params();
    let op = HessianFd { objective, relative_step: 1e-6 };
    let mut h = Mat::<f64>::zeros(d, d);
    let mut e = vec![0.0; d];
    for j in 0..d {
        e[j] = 1.0;
        let col = op.apply(&e);
        e[j] = 0.0;
        for i in 0..d {
            h[(i, j)] = col[i];
        }
    }
    Mat::from_fn(d, d, |i, j| 0.5 * (h[(i, j)] + h[(j, i)]))
}

/// The dense curvature of `method` (`exact` or `ggn`), without damping.
pub fn build(objective: &Objective, method: &str) -> Result<Mat<f64>, CurvatureError> {
    let d = objective.network.num_params();
    check_size(d, method)?;
    Ok(match (method, objective.network.config().architecture) {
        (_, Architecture::LogReg) => logreg_hessian(objective),
        ("ggn", _) => dense_ggn(objective, 256),
        _ => fd_hessian(objective),
    })
}

/// A Cholesky factor L of H + δI (lower, column-major d×d).
#[derive(Clone, Debug)]
pub struct Cholesky {
    /// The factor.
    pub factor: Mat<f64>,
}

impl Cholesky {
    /// Factors `h + damping·I`; a non-positive pivot is a typed error.
    pub fn new(mut h: Mat<f64>, damping: f64, method: &str) -> Result<Self, CurvatureError> {
        let d = h.nrows();
        for i in 0..d {
            h[(i, i)] += damping;
        }
        let llt = h.llt(Side::Lower).map_err(|e| CurvatureError::NotPositiveDefinite {
            method: method.into(),
            detail: format!("Cholesky failed ({e:?}); add --damping or use ggn"),
        })?;
        let l = llt.L();
        Ok(Self { factor: Mat::from_fn(d, d, |i, j| if i >= j { l[(i, j)] } else { 0.0 }) })
    }

    /// x = (L Lᵀ)⁻¹ q for each column of `q` (d × k). Cost d²·k.
    pub fn solve(&self, q: &mut Mat<f64>) {
        faer::linalg::triangular_solve::solve_lower_triangular_in_place(
            self.factor.as_ref(),
            q.as_mut(),
            Par::rayon(0),
        );
        faer::linalg::triangular_solve::solve_upper_triangular_in_place(
            self.factor.transpose(),
            q.as_mut(),
            Par::rayon(0),
        );
    }
}

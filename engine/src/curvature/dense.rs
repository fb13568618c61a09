//! Dense curvature for small models: the d×d matrix in f64, factored by Cholesky (faer).
//!
//! - [`fd_hessian`]: the Hessian column by column from finite-difference products
//!   ([`crate::curvature::operators::HessianFd`]), symmetrised: cost 2d full-batch gradients.
//!   Models whose logits are linear in θ give their Hessian in closed form instead
//!   ([`CurvatureSource::closed_form_hessian`]; for logistic regression n·(in+1)²·C(C+1)/2).
//! - [`dense_ggn`]: G = Σ over samples of the predictive distribution of Σᵢ wᵢ gᵢgᵢᵀ + λI (the
//!   true Fisher, which for softmax cross-entropy with one prediction per example is the exact
//!   GGN: (1/n) Σᵢ Σ_c p_ic g_ic g_icᵀ + λI, g_ic = ∇θ(−log p_ic)): cost n·C·d².
//!
//! Solving (H + δI)x = q with the Cholesky factor costs d² per right-hand side; the factor
//! costs d³/3 once. Models up to [`MAX_DENSE_PARAMS`] tracked parameters.

use std::any::Any;

use faer::{Mat, Par, Side};

use super::{CurvatureError, CurvatureSource, FisherSample, Fitted, LoadContext, Solution};
use crate::error::Result;
use crate::io::container::Arrays;

/// Largest model the dense methods build a matrix for.
pub const MAX_DENSE_PARAMS: usize = 20_000;

/// Checks the size limit.
pub fn check_size(d: usize, method: &str) -> Result<(), CurvatureError> {
    if d > MAX_DENSE_PARAMS {
        return Err(CurvatureError::TooLarge { method: method.into(), params: d, limit: MAX_DENSE_PARAMS });
    }
    Ok(())
}

/// The dense true Fisher (the GGN for classifiers) of `source`, λI included, from its Fisher
/// samples in chunks of `chunk` examples (module docs).
pub fn dense_ggn(source: &dyn CurvatureSource, chunk: usize) -> Mat<f64> {
    let d = source.dim();
    let mut g = Mat::<f64>::zeros(d, d);
    source.for_each_fisher_sample(chunk, &mut |sample: FisherSample<'_>| {
        let blocks: Vec<_> = sample.factors.iter().zip(source.layers()).map(|(f, l)| f.gradient(l)).collect();
        let rows = crate::gradients::gradient_rows_f64(&blocks);
        let b = sample.weights.len();
        let scaled = Mat::<f64>::from_fn(b, d, |i, j| rows[i * d + j] * sample.weights[i].sqrt());
        g += scaled.transpose() * &scaled;
    });
    for i in 0..d {
        g[(i, i)] += source.l2();
    }
    g
}

/// The Hessian by finite-difference columns, symmetrised: (H + Hᵀ)/2.
pub fn fd_hessian(source: &dyn CurvatureSource) -> Mat<f64> {
    let d = source.dim();
    let op = source.hessian();
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

/// A Cholesky factor L of H + δI (lower, d×d): what `exact`, `ggn` and `projected` fit.
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
    pub fn solve_in_place(&self, q: &mut Mat<f64>) {
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

    /// x = (L Lᵀ)⁻¹ q for every query at once (one blocked triangular solve pair).
    pub fn solve_all(&self, queries: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let d = self.factor.nrows();
        let mut q = Mat::<f64>::from_fn(d, queries.len(), |i, j| queries[j][i]);
        self.solve_in_place(&mut q);
        (0..queries.len()).map(|j| (0..d).map(|i| q[(i, j)]).collect()).collect()
    }

    /// The factor as the curvature file's one array.
    pub fn arrays(&self) -> Arrays {
        let d = self.factor.nrows();
        let mut arrays = Arrays::new();
        arrays.push("cholesky", vec![d, d], (0..d * d).map(|k| self.factor[(k / d, k % d)]).collect());
        arrays
    }

    /// The factor from a curvature file, of side `d` (when known).
    pub fn from_arrays(arrays: &mut Arrays, ctx: &LoadContext<'_>, d: Option<usize>) -> Result<Self> {
        let expected = d.map(|d| vec![d, d]);
        let (shape, values) = arrays.take(ctx.path, "cholesky", expected.as_deref())?;
        if shape.len() != 2 || shape[0] != shape[1] {
            return Err(crate::error::Error::run(ctx.path, format!("the Cholesky factor has shape {shape:?}")));
        }
        let n = shape[0];
        Ok(Self { factor: Mat::from_fn(n, n, |i, j| values[i * n + j]) })
    }
}

impl Fitted for Cholesky {
    fn solve(&self, _: &dyn CurvatureSource, queries: &[Vec<f64>]) -> Result<Vec<Solution>> {
        Ok(self.solve_all(queries).into_iter().map(|x| (x, None)).collect())
    }

    fn arrays(&self) -> Arrays {
        Cholesky::arrays(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

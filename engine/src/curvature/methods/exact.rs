//! `exact`: the dense Hessian of the objective, factored by Cholesky.
//!
//! H in closed form when the model has one (logistic regression: (1/n) Σᵢ (diag pᵢ − pᵢpᵢᵀ) ⊗
//! x̃ᵢx̃ᵢᵀ + λI), else by finite-difference columns of f64 gradients (2d full-batch gradients),
//! symmetrised; then L Lᵀ = H + δI. Refused when H + δI is not positive definite (ReLU networks
//! away from a minimum often are not; use `ggn` there). Exact; cost d³/3 to factor, d² per solve;
//! models up to [`crate::curvature::dense::MAX_DENSE_PARAMS`] tracked parameters.

use crate::curvature::dense::{Cholesky, check_size, fd_hessian};
use crate::curvature::{CurvatureMethod, FitContext, Fitted, LoadContext, NoParams};
use crate::error::Result;
use crate::io::container::Arrays;

/// The `exact` method.
pub struct Exact;

impl CurvatureMethod for Exact {
    type Params = NoParams;

    fn fit(_: &NoParams, ctx: &FitContext<'_>) -> Result<Box<dyn Fitted>> {
        check_size(ctx.source.dim(), "exact")?;
        let h = ctx.source.closed_form_hessian().unwrap_or_else(|| fd_hessian(ctx.source));
        Ok(Box::new(Cholesky::new(h, ctx.options.damping, "exact")?))
    }

    fn load(_: &NoParams, arrays: &mut Arrays, ctx: &LoadContext<'_>) -> Result<Box<dyn Fitted>> {
        let d = culprit_models::model::tracked_len(ctx.layers);
        Ok(Box::new(Cholesky::from_arrays(arrays, ctx, Some(d))?))
    }
}

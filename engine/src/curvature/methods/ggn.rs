//! `ggn`: the dense Gauss–Newton matrix, factored by Cholesky.
//!
//! G = (1/n) Σᵢ Σ_c p_ic g_ic g_icᵀ + λI from per-example, per-class loss gradients (the true
//! Fisher, equal to the GGN for softmax cross-entropy), or the closed form for models linear in θ
//! (where G = H); then L Lᵀ = G + δI. Positive definite for any activation. Exact (for G); cost
//! n·C·d² + d³/3 to fit, d² per solve; models up to
//! [`crate::curvature::dense::MAX_DENSE_PARAMS`] tracked parameters.

use crate::curvature::dense::{Cholesky, check_size, dense_ggn};
use crate::curvature::{CurvatureMethod, FitContext, Fitted, LoadContext, NoParams};
use crate::error::Result;
use crate::io::container::Arrays;

/// The `ggn` method.
pub struct Ggn;

/// Examples per chunk of the per-class gradient sweep.
const CHUNK: usize = 256;

impl CurvatureMethod for Ggn {
    type Params = NoParams;

    fn fit(_: &NoParams, ctx: &FitContext<'_>) -> Result<Box<dyn Fitted>> {
        check_size(ctx.source.dim(), "ggn")?;
        let g = ctx.source.closed_form_hessian().unwrap_or_else(|| dense_ggn(ctx.source, CHUNK));
        Ok(Box::new(Cholesky::new(g, ctx.options.damping, "ggn")?))
    }

    fn load(_: &NoParams, arrays: &mut Arrays, ctx: &LoadContext<'_>) -> Result<Box<dyn Fitted>> {
        let d = culprit_models::model::tracked_len(ctx.layers);
        Ok(Box::new(Cholesky::from_arrays(arrays, ctx, Some(d))?))
    }
}

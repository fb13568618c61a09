//! `kfac`: Kronecker-factored Gauss–Newton blocks, G_layer ≈ A ⊗ S with the true Fisher's output
//! factor (see [`crate::curvature::kronecker`] for the math). An approximation; cost one sweep of
//! the Fisher samples to fit, Σ_layers m·o·(m + o) per solve, and a factored self-influence.

use crate::curvature::{CurvatureMethod, FitContext, Fitted, LoadContext, NoParams, kronecker};
use crate::error::Result;
use crate::io::container::Arrays;

/// The `kfac` method.
pub struct Kfac;

impl CurvatureMethod for Kfac {
    type Params = NoParams;

    fn fit(_: &NoParams, ctx: &FitContext<'_>) -> Result<Box<dyn Fitted>> {
        Ok(Box::new(kronecker::fit(ctx.source, false, ctx.options)?))
    }

    fn load(_: &NoParams, arrays: &mut Arrays, ctx: &LoadContext<'_>) -> Result<Box<dyn Fitted>> {
        Ok(Box::new(kronecker::KroneckerFactors::from_arrays(arrays, ctx)?))
    }
}

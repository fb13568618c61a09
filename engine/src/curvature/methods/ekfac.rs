//! `ekfac`: K-FAC's eigenbasis with the eigenvalues re-fitted to the exact second moments of the
//! per-example gradients in that basis (George et al. 2018; see [`crate::curvature::kronecker`]).
//! An approximation, usually closer than K-FAC; cost two sweeps of the Fisher samples to fit,
//! Σ_layers m·o·(m + o) per solve, and a factored self-influence.

use crate::curvature::{CurvatureMethod, FitContext, Fitted, LoadContext, NoParams, kronecker};
use crate::error::Result;
use crate::io::container::Arrays;

/// The `ekfac` method.
pub struct Ekfac;

impl CurvatureMethod for Ekfac {
    type Params = NoParams;

    fn fit(_: &NoParams, ctx: &FitContext<'_>) -> Result<Box<dyn Fitted>> {
        Ok(Box::new(kronecker::fit(ctx.source, true, ctx.options)?))
    }

    fn load(_: &NoParams, arrays: &mut Arrays, ctx: &LoadContext<'_>) -> Result<Box<dyn Fitted>> {
        Ok(Box::new(kronecker::KroneckerFactors::from_arrays(arrays, ctx)?))
    }
}

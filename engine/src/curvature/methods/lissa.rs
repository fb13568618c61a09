//! `lissa`: the Neumann series x ← q + x − (A x)/s on Gauss–Newton products, full-batch or on
//! random mini-batches, averaged over repeats (Agarwal, Bullins & Hazan 2017; see
//! [`crate::curvature::iterative::Lissa`]). Accepted when the relative residual is at most
//! `--tolerance` (default [`DEFAULT_TOLERANCE`]), else a typed non-convergence. Cost per solve:
//! depth × repeats products.

use std::any::Any;

use serde::{Deserialize, Serialize};

use crate::curvature::iterative::{Arnoldi, Lissa as Neumann};
use crate::curvature::operators::{Damped, LinearOperator};
use crate::curvature::{CurvatureMethod, CurvatureSource, FitContext, Fitted, LoadContext, Solution};
use crate::error::{Error, Result};
use crate::gradients::LayerFactors;
use crate::io::container::Arrays;

/// LiSSA's relative-residual tolerance unless `--tolerance` says otherwise.
pub const DEFAULT_TOLERANCE: f64 = Neumann::DEFAULT_TOLERANCE;

/// The `lissa` method.
pub struct Lissa;

/// LiSSA's own flags.
#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
#[group(skip)]
pub struct LissaParams {
    /// lissa: recursion depth.
    #[arg(long = "lissa-depth", default_value_t = Neumann::DEFAULT_DEPTH, value_parser = crate::params::at_least_one)]
    pub depth: usize,
    /// lissa: scale s, above the largest eigenvalue (0: 1.1 × the top eigenvalue, estimated).
    #[arg(long = "lissa-scale", default_value_t = 0.0, value_parser = crate::params::non_negative)]
    pub scale: f64,
    /// lissa: examples per stochastic product (default: full batch).
    #[arg(long = "lissa-batch", value_parser = crate::params::at_least_one)]
    pub batch: Option<usize>,
    /// lissa: recursions averaged.
    #[arg(long = "lissa-repeats", default_value_t = 1, value_parser = crate::params::at_least_one)]
    pub repeats: usize,
}

impl Default for LissaParams {
    fn default() -> Self {
        crate::params::clap_defaults()
    }
}

/// A LiSSA solver: the recursion's parameters and the damping.
pub struct FittedLissa {
    /// The recursion.
    pub solver: Neumann,
    damping: f64,
    chunk: usize,
}

fn fitted(params: &LissaParams, options: &crate::curvature::FitOptions) -> FittedLissa {
    FittedLissa {
        solver: Neumann {
            scale: params.scale,
            depth: params.depth,
            repeats: params.repeats,
            batch: params.batch.unwrap_or(usize::MAX),
            tolerance: options.tolerance.unwrap_or(DEFAULT_TOLERANCE),
            seed: 0,
        },
        damping: options.damping,
        chunk: options.chunk,
    }
}

impl CurvatureMethod for Lissa {
    type Params = LissaParams;

    fn fit(params: &LissaParams, ctx: &FitContext<'_>) -> Result<Box<dyn Fitted>> {
        Ok(Box::new(fitted(params, ctx.options)))
    }

    fn load(params: &LissaParams, _: &mut Arrays, ctx: &LoadContext<'_>) -> Result<Box<dyn Fitted>> {
        Ok(Box::new(fitted(params, ctx.options)))
    }
}

impl Fitted for FittedLissa {
    fn solve(&self, source: &dyn CurvatureSource, queries: &[Vec<f64>]) -> Result<Vec<Solution>> {
        let ggn = source.gauss_newton(self.chunk)?;
        let op = Damped { inner: ggn.as_ref(), damping: self.damping };
        let mut lissa = self.solver.clone();
        if lissa.scale <= 0.0 {
            // Safe scale: 1.1 × the top eigenvalue (a few power iterations).
            let top = Arnoldi { iterations: 20, top_k: 1, seed: 0 }.eigenpairs(&op)?;
            lissa.scale = 1.1 * top.values[0];
        }
        let sample = |v: &[f64], rows: Option<&[usize]>| match rows {
            Some(r) => {
                let mut out = ggn.apply_rows(v, r);
                out.iter_mut().zip(v).for_each(|(o, x)| *o += self.damping * x);
                out
            }
            None => op.apply(v),
        };
        queries
            .iter()
            .map(|q| {
                let (x, info) = lissa.solve(&op, &sample, source.len(), q)?;
                Ok((x, Some(info)))
            })
            .collect()
    }

    fn self_influence(&self, _: &dyn CurvatureSource, _: &[LayerFactors]) -> Result<Vec<f64>> {
        Err(Error::Usage(super::super::self_influence::ITERATIVE_REFUSAL.replace("{method}", "lissa")))
    }

    fn arrays(&self) -> Arrays {
        Arrays::new()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

//! `arnoldi`: the top-k eigenpairs of the Gauss–Newton matrix from m Arnoldi iterations
//! (Schioppa et al. 2022; see [`crate::curvature::iterative::Arnoldi`]); solves apply the inverse
//! in that subspace only, x = Σⱼ uⱼuⱼᵀq / (λⱼ + δ). Exact when q lies in the span of the top-k
//! eigenvectors, biased toward high-curvature directions otherwise. Cost: m GGN products to fit,
//! k·d per solve.

use std::any::Any;

use serde::{Deserialize, Serialize};

use crate::curvature::iterative::{Arnoldi as Krylov, Eigenpairs};
use crate::curvature::{CurvatureMethod, CurvatureSource, FitContext, Fitted, LoadContext, Solution};
use crate::error::Result;
use crate::io::container::Arrays;

/// The `arnoldi` method.
pub struct Arnoldi;

/// Arnoldi's own flags.
#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
#[group(skip)]
pub struct ArnoldiParams {
    /// arnoldi: Krylov dimension (GGN products).
    #[arg(long = "arnoldi-iterations", default_value_t = Krylov::DEFAULT_ITERATIONS, value_parser = crate::params::at_least_one)]
    pub iterations: usize,
    /// arnoldi: eigenpairs kept.
    #[arg(long = "top-k", default_value_t = Krylov::DEFAULT_TOP_K, value_parser = crate::params::at_least_one)]
    pub top_k: usize,
}

impl Default for ArnoldiParams {
    fn default() -> Self {
        crate::params::clap_defaults()
    }
}

/// The top eigenpairs and the damping of solves.
pub struct FittedArnoldi {
    /// The eigenpairs, largest first.
    pub pairs: Eigenpairs,
    damping: f64,
}

impl CurvatureMethod for Arnoldi {
    type Params = ArnoldiParams;

    fn fit(params: &ArnoldiParams, ctx: &FitContext<'_>) -> Result<Box<dyn Fitted>> {
        let ggn = ctx.source.gauss_newton(ctx.options.chunk)?;
        let pairs = Krylov { iterations: params.iterations, top_k: params.top_k, seed: 0 }.eigenpairs(ggn.as_ref())?;
        Ok(Box::new(FittedArnoldi { pairs, damping: ctx.options.damping }))
    }

    fn load(_: &ArnoldiParams, arrays: &mut Arrays, ctx: &LoadContext<'_>) -> Result<Box<dyn Fitted>> {
        let d = culprit_models::model::tracked_len(ctx.layers);
        let (shape, values) = arrays.take(ctx.path, "eigenvalues", None)?;
        let k = shape.first().copied().unwrap_or(0);
        let (_, vectors) = arrays.take(ctx.path, "eigenvectors", Some(&[k, d]))?;
        let pairs = Eigenpairs { values, vectors: vectors.chunks(d.max(1)).map(<[f64]>::to_vec).collect() };
        Ok(Box::new(FittedArnoldi { pairs, damping: ctx.options.damping }))
    }
}

impl Fitted for FittedArnoldi {
    fn solve(&self, _: &dyn CurvatureSource, queries: &[Vec<f64>]) -> Result<Vec<Solution>> {
        Ok(queries.iter().map(|q| (self.pairs.solve(q, self.damping), None)).collect())
    }

    fn arrays(&self) -> Arrays {
        let d = self.pairs.vectors.first().map_or(0, Vec::len);
        let mut arrays = Arrays::new();
        arrays.push("eigenvalues", vec![self.pairs.values.len()], self.pairs.values.clone());
        arrays.push("eigenvectors", vec![self.pairs.values.len(), d], self.pairs.vectors.concat());
        arrays
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

//! `projected`: TRAK's curvature in the space of a projected gradient store,
//! M = (1/n) ΦᵀΦ + (λ + δ)I with Φ the store's n×k rows (a `factors` store's rows expanded into
//! their k_in·k_out blocks), factored by Cholesky (Park et al. 2023). The ridge lives in the
//! projected space: it is the one TRAK adds to ΦᵀΦ, not λ mapped through the projection. A
//! projected empirical Fisher, not the Hessian; cost n·k² + k³/3 to fit, k² per solve; queries
//! must be projected like the store's rows first.

use std::any::Any;

use faer::Mat;

use crate::curvature::dense::Cholesky;
use crate::curvature::{CurvatureMethod, CurvatureSource, FitContext, Fitted, LoadContext, NoParams, Solution, Space};
use crate::error::{Error, Result};
use crate::gradients::LayerFactors;
use crate::io::container::Arrays;
use crate::store::{GradientStore, StoreKey};

/// The `projected` method.
pub struct Projected;

/// The Cholesky factor of M and the key of the store it was fitted on.
pub struct FittedProjected {
    /// The k×k factor.
    pub cholesky: Cholesky,
    /// The store's key (projection and seed, weights, data).
    pub store: StoreKey,
}

/// (1/n) ΦᵀΦ + λI of a store's rows, in blocks of 1024 rows. Cost n·k².
fn gram(store: &GradientStore, l2: f64) -> Mat<f64> {
    let k: usize = store.manifest.layout.iter().map(crate::gradients::projection::BlockLayout::query_len).sum();
    let n = store.rows() as f64;
    let mut gram = Mat::<f64>::zeros(k, k);
    store.for_each_block(1024, |_, block| {
        let rows = store.expanded_rows(block);
        let count = rows.len() / k;
        let b = Mat::<f64>::from_fn(count, k, |i, j| f64::from(rows[i * k + j]));
        gram += b.transpose() * &b;
    });
    let mut m = Mat::<f64>::from_fn(k, k, |i, j| gram[(i, j)] / n);
    for i in 0..k {
        m[(i, i)] += l2;
    }
    m
}

impl CurvatureMethod for Projected {
    type Params = NoParams;

    fn fit(_: &NoParams, ctx: &FitContext<'_>) -> Result<Box<dyn Fitted>> {
        let store = ctx.store.ok_or_else(|| {
            Error::Usage("the projected curvature is fitted from a projected gradient store (--store)".into())
        })?;
        let cholesky = Cholesky::new(gram(store, ctx.source.l2()), ctx.options.damping, "projected")?;
        Ok(Box::new(FittedProjected { cholesky, store: store.manifest.key.clone() }))
    }

    fn load(_: &NoParams, arrays: &mut Arrays, ctx: &LoadContext<'_>) -> Result<Box<dyn Fitted>> {
        let store = ctx.store.cloned().ok_or_else(|| Error::run(ctx.path, "projected curvature without its store key"))?;
        Ok(Box::new(FittedProjected { cholesky: Cholesky::from_arrays(arrays, ctx, None)?, store }))
    }
}

impl Fitted for FittedProjected {
    fn solve(&self, _: &dyn CurvatureSource, queries: &[Vec<f64>]) -> Result<Vec<Solution>> {
        Ok(self.cholesky.solve_all(queries).into_iter().map(|x| (x, None)).collect())
    }

    fn self_influence(&self, _: &dyn CurvatureSource, _: &[LayerFactors]) -> Result<Vec<f64>> {
        Err(Error::Usage(
            "the projected curvature's self-influence comes from the store's rows (self_influence::store_self_influence)"
                .into(),
        ))
    }

    fn space(&self) -> Space {
        Space::Projected(self.store.clone())
    }

    fn arrays(&self) -> Arrays {
        self.cholesky.arrays()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

//! `identity`: H = I, so a score is a plain gradient dot product (the "gradient similarity"
//! baseline, TracIn at one checkpoint without learning rates). Nothing to fit; a solve is a copy,
//! and the damping is ignored (a constant scale does not change a ranking).

use std::any::Any;

use crate::curvature::{CurvatureMethod, CurvatureSource, FitContext, Fitted, LoadContext, NoParams, Solution};
use crate::error::Result;
use crate::io::container::Arrays;

/// The `identity` method, and what it fits (nothing).
pub struct Identity;

impl CurvatureMethod for Identity {
    type Params = NoParams;

    fn fit(_: &NoParams, _: &FitContext<'_>) -> Result<Box<dyn Fitted>> {
        Ok(Box::new(Identity))
    }

    fn load(_: &NoParams, _: &mut Arrays, _: &LoadContext<'_>) -> Result<Box<dyn Fitted>> {
        Ok(Box::new(Identity))
    }
}

impl Fitted for Identity {
    fn solve(&self, _: &dyn CurvatureSource, queries: &[Vec<f64>]) -> Result<Vec<Solution>> {
        Ok(queries.iter().map(|q| (q.clone(), None)).collect())
    }

    fn arrays(&self) -> Arrays {
        Arrays::new()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

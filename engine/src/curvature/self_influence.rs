//! Self-influence: how much the model bent to fit each example.
//!
//! self(i) = ∇ℓ(zᵢ)ᵀ (H + δI)⁻¹ ∇ℓ(zᵢ), the (n-scaled) influence of an example on its own loss
//! (Koh & Liang 2017, §5.4; Pruthi et al. 2020). It is the denominator of RelatIF scores and the
//! memorisation signal of `culprit audit`. Each fitted curvature computes it its own way
//! ([`super::Fitted::self_influence`]): Kronecker methods in factored form without forming any
//! gradient, dense and Arnoldi methods with one solve per example (d² and k·d), the projected
//! curvature from the store's rows ([`store_self_influence`], k² per row). Methods that would
//! need one iterative solve per example (CG, LiSSA) refuse.

use culprit_models::model::{Batch, Model};

use super::Curvature;
use super::methods::projected::FittedProjected;
use crate::error::{Error, Result};
use crate::gradients::{Measurement, layer_factors};
use crate::objective::Objective;
use crate::store::GradientStore;

/// Examples per batch of the self-influence sweep.
const BATCH: usize = 256;

/// The refusal of iterative methods (`{method}` is replaced by the method's name).
pub const ITERATIVE_REFUSAL: &str = "self-influence needs one solve per training example; {method} would run n iterative solves. Fit exact or ggn (small models), ekfac, kfac, arnoldi or identity";

/// Self-influence of every example of `data` (gradients of the loss at the labels) under
/// `curvature`, in batches of 256. Cost: one tapped forward and backward per batch plus the
/// method's own cost per example (module docs).
pub fn self_influence<M: Model>(objective: &Objective<M>, curvature: &Curvature, data: &M::Batch) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(data.len());
    for range in data.groups().chunks(data.len(), BATCH, culprit_models::model::ROWS_PER_CHUNK) {
        let batch = data.slice(range);
        let labels = batch.labels().into_owned();
        let factors = layer_factors(&objective.model, &batch, &labels, Measurement::TRAINING_LOSS);
        out.extend(curvature.fitted.self_influence(objective, &factors)?);
    }
    Ok(out)
}

/// Self-influence φᵢᵀM⁻¹φᵢ of every row φᵢ of a projected store under the projected curvature
/// M = (1/n)ΦᵀΦ + (λ + δ)I: one pair of triangular solves per block of rows, O(k²) per row.
pub fn store_self_influence(curvature: &Curvature, store: &GradientStore) -> Result<Vec<f64>> {
    let projected = curvature.fitted.as_any().downcast_ref::<FittedProjected>().ok_or_else(|| {
        Error::Usage(format!("{} does not solve in a store's projected space", curvature.options.method))
    })?;
    let mut out = Vec::with_capacity(store.rows());
    store.for_each_block(1024, |_, block| {
        let expanded = store.expanded_rows(block);
        let k = expanded.len() / (block.len() / store.row_len()).max(1);
        let rows: Vec<Vec<f64>> = expanded.chunks(k).map(|r| r.iter().map(|v| f64::from(*v)).collect()).collect();
        let solved = projected.cholesky.solve_all(&rows);
        out.extend(rows.iter().zip(&solved).map(|(r, x)| super::operators::dot(r, x)));
    });
    Ok(out)
}

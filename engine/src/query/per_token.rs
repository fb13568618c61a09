//! `trace --per-token`: which tokens of a training document carry its score.
//!
//! A document's projected gradient of a linear layer is Σₜ ãₜ ⊗ δ̃ₜ over its positions t (ãₜ the
//! projected input, δ̃ₜ the projected output gradient; LoGra, see
//! [`crate::gradients::projection`]), and a score is linear in it, so the score against a scored
//! query vector x splits exactly into per-position parts
//!
//! part(t) = w · Σ_layers ãₜᵀ X_l δ̃ₜ,  Σₜ part(t) = score,
//!
//! with X_l the layer's k_in×k_out block of x and w the score's factor (1/n raw, 1/√self(i) for
//! RelatIF). Position t reads token t and its output gradient comes from predicting the tokens
//! after it, above all token t + 1: the part is reported on token t + 1, the token whose
//! prediction it trained (token 0 gets 0; the last position predicts nothing and its δ is 0).
//! A planted trigger or payload shows up as the tokens holding most of a poison's score.
//!
//! Cost per document: one tapped forward and backward, then B·L·k_out·(k_in + 1) per layer and
//! column. The parts are computed in f32 from the model afresh, the score from the f32 store:
//! they agree to about 1e-4 relative (tested in `tests/lm`).

use culprit_models::model::{Batch, Model};

use super::attribute::{Attribution, store_projector};
use crate::error::Result;
use crate::gradients::{Measurement, layer_factors};
use crate::objective::Objective;
use crate::store::GradientStore;

/// For training example `row` and each of `columns` (of `attribution`, each with the score the
/// row has there), the score's part carried by each of the example's tokens (module docs): one
/// vector per column, as long as the document.
pub fn token_parts<M: Model>(
    objective: &Objective<M>,
    store: &GradientStore,
    attribution: &Attribution,
    row: usize,
    columns: &[(usize, f64)],
) -> Result<Vec<Vec<f64>>> {
    let projector = store_projector(objective, store)?;
    let document = objective.data.slice(row..row + 1);
    let labels = document.labels().into_owned();
    let factors = layer_factors(&objective.model, &document, &labels, Measurement::TRAINING_LOSS);
    let sources: Vec<(usize, f64)> = columns.iter().map(|&(k, score)| attribution.source_of(k, row, score)).collect();
    let queries: Vec<&[f32]> = sources.iter().map(|&(k, _)| attribution.projected[k].as_slice()).collect();
    let weight = attribution.row_weights.as_ref().map_or(attribution.scale, |w| attribution.scale * w[row]);
    let positions = projector.position_scores(&factors, &queries)?;
    Ok(positions
        .into_iter()
        .zip(&sources)
        .map(|(parts, &(_, factor))| {
            let mut tokens = vec![0.0; parts.len()];
            for (t, part) in parts.iter().enumerate().take(parts.len().saturating_sub(1)) {
                tokens[t + 1] = part * weight * factor;
            }
            tokens
        })
        .collect())
}

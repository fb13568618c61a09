//! `trace --checkpoints`: a trace with the checkpoints of a run instead of its final model.
//!
//! Each checkpoint (`train --checkpoints K`: the model at K earlier epochs, each a run of its own
//! with its own store and fitted curvature) is attributed as a run is ([`attribute_run`]); the
//! scores are combined by [`culprit_engine::query::ensemble`] (TracIn-CP: each checkpoint's
//! scores at unit spread, weighted by the learning rate η_c there), and the queries are described
//! as the final model sees them. A language model that has memorised its backdoor poisons has
//! small, unreliable gradients on them at the end of training; at the checkpoints where it was
//! learning the backdoor their gradients point along the query's. Per-token parts are the same
//! weighted sums of each checkpoint's parts, so they still sum to the listed score.
//!
//! Cost: one trace per checkpoint (its store, curvature and self-influence, read or computed),
//! then O(C·q·n) for the combination and a forward pass of the final model over the queries.

use culprit_engine::query::Combine;
use culprit_engine::query::attribute::{Attribution, query_outcomes};
use culprit_engine::query::ensemble::{Ensemble, ensemble};

use super::attribution::{Attributed, SelfInfluenceUse, TraceOptions, assemble, attribute_run, split_by_token};
use super::kind::Kind;
use super::run::{Checkpoint, Run};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::report::trace::{CheckpointUse, TraceReport};

/// The checkpoints of `run` with their ensemble weights η_c (the learning rate at the end of
/// epoch E of the cosine schedule the run trained with).
fn weighted_checkpoints(run: &Run) -> Result<Vec<(Checkpoint, f64)>> {
    let checkpoints = run.require_checkpoints()?;
    let training = &run.config.training;
    let weighted: Vec<(Checkpoint, f64)> = checkpoints
        .into_iter()
        .map(|c| {
            let eta = training.learning_rate_at(c.epoch as f64 / training.epochs.max(1) as f64);
            (c, eta)
        })
        .collect();
    if weighted.iter().all(|(_, eta)| *eta <= 0.0) {
        return Err(Error::run(&run.dir, "its checkpoints all have a learning rate of 0; nothing to weight"));
    }
    Ok(weighted)
}

/// Refuses what an ensemble cannot do.
fn check_options(options: &TraceOptions) -> Result<()> {
    let refuse = |flag: &str, why: &str| Err(Error::Usage(format!("--checkpoints cannot be used with {flag}: {why}")));
    if options.store.is_some() {
        return refuse("--store", "each checkpoint uses its own store (CHECKPOINT/gradients)");
    }
    if options.part.is_some() {
        return refuse("--shard", "each checkpoint's scores are scaled by the spread of all of them");
    }
    if options.per_layer {
        return refuse("--per-layer", "the layers' parts differ from checkpoint to checkpoint; --per-token works");
    }
    Ok(())
}

/// Runs `trace --checkpoints` (module docs) and returns, as
/// [`super::attribution::trace_with_data`] does, the report, the queries and the training data.
#[allow(clippy::type_complexity)]
pub(crate) fn trace_checkpoints<K: Kind>(
    options: &TraceOptions,
) -> Result<(TraceReport, Dataset<K::Batch>, Dataset<K::Batch>)> {
    check_options(options)?;
    let run = Run::open(&options.query.run)?;
    let weighted = weighted_checkpoints(&run)?;
    let mut members: Vec<Attributed<K>> = Vec::with_capacity(weighted.len());
    for (checkpoint, _) in &weighted {
        let mut own = options.clone();
        own.query.run = checkpoint.dir.clone();
        own.checkpoints = false;
        own.keep_all = true;
        own.combine = Combine::Sum;
        let member = attribute_run::<K>(&own)?;
        if members.first().is_some_and(|first| first.training.ids != member.training.ids) {
            return Err(Error::run(&checkpoint.dir, "was trained on other examples than the run's other checkpoints"));
        }
        members.push(member);
    }
    let started = std::time::Instant::now();
    let q = options.query.indices.len();
    let columns: Vec<(f64, &[Vec<f32>])> = members
        .iter()
        .zip(&weighted)
        .map(|(m, (_, eta))| (*eta, &m.attribution.scores.all.as_ref().expect("kept")[..q]))
        .collect();
    let Ensemble { scores, combined, factors, strongest } =
        ensemble(&columns, options.top, options.combine, options.keep_all);
    let device = options.backend.autodiff_device();
    let last = members.last().expect("at least one checkpoint");
    let final_model = culprit_engine::objective::Objective::in_dtype(
        &K::model(&run, &device)?,
        last.training.examples.clone(),
        run.config.training.l2,
        &device,
        K::curvature_dtype(),
    );
    let queries = K::load(&run, &options.query.data)?.select(&options.query.indices)?;
    let outcomes = query_outcomes(&final_model, &queries.examples, options.measurement)?;
    let scoring_seconds =
        members.iter().map(|m| m.attribution.scoring_seconds).sum::<f64>() + started.elapsed().as_secs_f64();
    let attribution = Attribution {
        queries: outcomes,
        scores,
        combined,
        strongest,
        projected: Vec::new(),
        scale: 1.0,
        row_weights: None,
        scoring_seconds,
    };
    let own = SelfInfluenceUse::all_of(members.iter().map(|m| m.own.as_ref()));
    let mut report = assemble(options, &attribution, None, &last.training, &queries, own.as_ref());
    if options.per_token {
        let parts = |row: usize, wanted: &[(usize, f64)]| ensemble_parts(&members, &factors, &attribution, row, wanted);
        split_by_token::<K>(&run, &parts, &last.training, &mut report)?;
    }
    describe_ensemble(&mut report, &run, &weighted, &members)?;
    Ok((report, queries, last.training.clone()))
}

/// Fills in what a `trace --checkpoints` report says of where its scores came from.
fn describe_ensemble<K: Kind>(
    report: &mut TraceReport,
    run: &Run,
    weighted: &[(Checkpoint, f64)],
    members: &[Attributed<K>],
) -> Result<()> {
    let last = members.last().expect("at least one checkpoint");
    let total: f64 = weighted.iter().map(|(_, eta)| eta).sum();
    report.checkpoints = Some(
        weighted
            .iter()
            .zip(members)
            .map(|((c, eta), m)| CheckpointUse {
                epoch: c.epoch,
                run: c.dir.clone(),
                weight: eta / total,
                damping: m.damping,
            })
            .collect(),
    );
    report.score_definition = format!(
        "score(i) = Σ_c w_c s_c(i)/σ_c over the checkpoints c, s_c the checkpoint's own score ({}), σ_c its root mean square over the training set, w_c the learning rate at the checkpoint over their sum (TracIn-CP): a rank in units of spread, not a predicted change",
        report.score_definition
    );
    report.projection = last.store.manifest.key.projection.clone();
    report.weights_sha256 = Some(super::artifacts::file_sha256(&run.dir.join("weights.bin"))?);
    report.damping = last.damping;
    report.l2 = run.config.training.l2;
    Ok(())
}

/// Row `row`'s per-token parts for the ensemble's columns `wanted` (column, score): for each
/// checkpoint, the parts of the queries the column is made of (each query's own column; every
/// query for a summed combined column; the strongest query for a strongest one), times the
/// factors they entered the ensemble with, summed.
fn ensemble_parts<K: Kind>(
    members: &[Attributed<K>],
    factors: &[Vec<f64>],
    ensemble: &Attribution,
    row: usize,
    wanted: &[(usize, f64)],
) -> culprit_engine::Result<Vec<Vec<f64>>> {
    let q = ensemble.queries.len();
    // Per wanted column: (query, factor on top of the checkpoint's own factor).
    let recipes: Vec<Vec<(usize, f64)>> = wanted
        .iter()
        .map(|&(k, score)| match (&ensemble.strongest, k == q) {
            (_, false) => vec![(k, 1.0)],
            (Some(_), true) => vec![ensemble.source_of(k, row, score)],
            (None, true) => (0..q).map(|j| (j, 1.0)).collect(),
        })
        .collect();
    let queries: Vec<(usize, f64)> = (0..q).map(|j| (j, 0.0)).collect();
    let mut out: Vec<Vec<f64>> = Vec::new();
    for (member, factor) in members.iter().zip(factors) {
        let parts = culprit_engine::query::per_token::token_parts(
            &member.objective,
            &member.store,
            &member.attribution,
            row,
            &queries,
        )?;
        if out.is_empty() {
            out = vec![vec![0.0; parts[0].len()]; wanted.len()];
        }
        for (sum, recipe) in out.iter_mut().zip(&recipes) {
            for &(j, extra) in recipe {
                sum.iter_mut().zip(&parts[j]).for_each(|(s, p)| *s += p * factor[j] * extra);
            }
        }
    }
    Ok(out)
}

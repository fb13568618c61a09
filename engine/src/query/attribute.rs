//! One attribution query, end to end: which training examples moved these outputs?
//!
//! For each query z (a test input and a [`Measurement`] of its output):
//! 1. its gradient ∇m(z) from one tapped backward over all the queries together;
//! 2. x = (H + δI)⁻¹∇m(z) with the fitted curvature, then x projected like the store's rows
//!    (for the `projected` curvature: ∇m(z) projected first, then solved in the store's space);
//! 3. with several queries, a combined ranking ([`Combine`]): their sum is one more vector
//!    (scores are linear in the query, so it costs one extra column), or the strongest query per
//!    row, each query's scores scaled by their spread, which needs every row's score;
//! 4. one pass over the store scores every query against every row ([`super::score_store_part`]; on
//!    the wgpu device, when only the top-k lists are needed, `super::gpu`):
//!    score(i) = (1/n) xᵀ∇ℓ(zᵢ) (raw), or xᵀ∇ℓ(zᵢ)/√self(i) (RelatIF, with the training examples'
//!    self-influence given by the caller, who caches it).
//!
//! Cost: one forward and backward for the queries, one solve per query (the method's cost), and
//! n·k·(q + 1) multiply-adds for the pass over n rows of length k.

use culprit_models::model::{Batch, Model, RowGroups, sum_rows};

use super::{Combine, ScoreMode, ScoreResult, StrongestQuery, score_store_part, strongest_of};
use crate::curvature::iterative::SolveInfo;
use crate::curvature::{Curvature, Space};
use crate::error::{Error, Result};
use crate::gradients::projection::{Projector, expand_row};
use crate::gradients::{Measurement, gradient_rows_f64, per_example_gradients, read_f32};
use crate::objective::Objective;
use crate::simd::narrow;
use crate::store::GradientStore;

/// How to attribute.
#[derive(Clone, Copy, Debug)]
pub struct AttributionOptions {
    /// What is measured of each query's output.
    pub measurement: Measurement,
    /// Raw influence or RelatIF.
    pub score: ScoreMode,
    /// Proponents and opponents kept per query.
    pub top: usize,
    /// Keep every score (all n per query).
    pub keep_all: bool,
    /// Score only the store's shards j with j mod N = I (`(I, N)`).
    pub part: (usize, usize),
    /// How several queries' scores are combined.
    pub combine: Combine,
}

/// One query as the model sees it.
#[derive(Clone, Debug)]
pub struct QueryOutcome {
    /// Label of each prediction row.
    pub labels: Vec<u32>,
    /// Predicted class of each prediction row.
    pub predicted: Vec<u32>,
    /// Class probabilities of each prediction row.
    pub probabilities: Vec<Vec<f64>>,
    /// The measurement's target class of each prediction row.
    pub targets: Vec<u32>,
    /// The measurement's value (summed over the rows).
    pub value: f64,
    /// How the curvature solve ended (iterative methods).
    pub solve: Option<SolveInfo>,
}

/// The scores of a set of queries.
#[derive(Clone, Debug)]
pub struct Attribution {
    /// Per query.
    pub queries: Vec<QueryOutcome>,
    /// The scores: one column per query, then (with several queries) the combined one.
    pub scores: ScoreResult,
    /// Whether the last column is the combined ranking.
    pub combined: bool,
    /// With [`Combine::Strongest`]: which query each row's combined score came from.
    pub strongest: Option<StrongestQuery>,
    /// The scored vectors (preconditioned, projected), one per column (for
    /// [`Combine::Strongest`], one per query: the combined column has no vector of its own).
    pub projected: Vec<Vec<f32>>,
    /// The factor every raw score carries (1/n), or 1 for RelatIF.
    pub scale: f64,
    /// RelatIF's per-row factor 1/√self(i).
    pub row_weights: Option<Vec<f64>>,
    /// Seconds of the pass over the store.
    pub scoring_seconds: f64,
}

impl Attribution {
    /// The scored vector behind row `row`'s `score` in column `k`, and the factor on top of the
    /// row's weight: column k itself, or for the [`Combine::Strongest`] column the query it came
    /// from (chosen at the end of the ranking the score's sign says) and its 1/σ.
    pub fn source_of(&self, k: usize, row: usize, score: f64) -> (usize, f64) {
        match &self.strongest {
            Some(s) if k == self.queries.len() => {
                let q = if score >= 0.0 { s.largest[row] } else { s.smallest[row] } as usize;
                (q, s.factors[q])
            }
            _ => (k, 1.0),
        }
    }

    /// Row `row`'s score (`score`) in column `k` split by the store's blocks (layers):
    /// (name, part); the parts sum to the score.
    pub fn per_layer(&self, store: &GradientStore, k: usize, row: usize, score: f64) -> Vec<(String, f64)> {
        let blocks = &store.manifest.layout;
        let expanded = expand_row(blocks, &store.row(row));
        let (k, factor) = self.source_of(k, row, score);
        let weight = factor * self.row_weights.as_ref().map_or(self.scale, |w| self.scale * w[row]);
        let mut offset = 0;
        blocks
            .iter()
            .map(|b| {
                let range = offset..offset + b.query_len();
                offset = range.end;
                let part: f64 = range.map(|t| f64::from(expanded[t]) * f64::from(self.projected[k][t])).sum();
                (b.name.clone(), part * weight)
            })
            .collect()
    }
}

/// What the queries are and their measurement gradients (tracked space, one per query).
fn query_gradients<M: Model>(
    objective: &Objective<M>,
    queries: &M::Batch,
    measurement: Measurement,
) -> Result<(Vec<QueryOutcome>, Vec<Vec<f64>>)> {
    let model = &objective.model;
    let classes = model.num_classes();
    let probabilities = objective.probabilities(queries);
    let predicted: Vec<u32> = probabilities
        .chunks(classes)
        .map(|p| {
            p.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (c, &v)| if v > b.1 { (c, v) } else { b }).0 as u32
        })
        .collect();
    let labels = queries.labels().into_owned();
    let targets = measurement.targets(&labels, &predicted, classes)?;
    let rows = gradient_rows_f64(&per_example_gradients(model, queries, &targets, measurement));
    let d = culprit_models::model::tracked_len(model.layers());
    let gradients: Vec<Vec<f64>> = rows.chunks(d).map(<[f64]>::to_vec).collect();
    let groups = queries.groups();
    let values = read_f32(sum_rows(measurement.values(model.logits(queries), &targets), &groups, queries.len()));
    let offsets: Vec<usize> = match &groups {
        RowGroups::OnePerExample => (0..=queries.len()).collect(),
        RowGroups::Offsets(o) => o.clone(),
    };
    let outcomes = (0..queries.len())
        .map(|i| {
            let rows = offsets[i]..offsets[i + 1];
            QueryOutcome {
                labels: labels[rows.clone()].to_vec(),
                predicted: predicted[rows.clone()].to_vec(),
                probabilities: rows.clone().map(|r| probabilities[r * classes..(r + 1) * classes].to_vec()).collect(),
                targets: targets[rows].to_vec(),
                value: f64::from(values[i]),
                solve: None,
            }
        })
        .collect();
    Ok((outcomes, gradients))
}

/// The projection the store's rows were made with.
pub fn store_projector<M: Model>(objective: &Objective<M>, store: &GradientStore) -> Result<Projector> {
    let spec = crate::gradients::projection::ProjectionSpec::parse(&store.manifest.key.projection)?;
    Projector::new(spec, store.manifest.key.seed, objective.model.layers(), &objective.device)
}

/// Preconditions and projects the query gradients; records each solve in `outcomes`.
fn scored_vectors<M: Model>(
    objective: &Objective<M>,
    curvature: &Curvature,
    store: &GradientStore,
    gradients: &[Vec<f64>],
    outcomes: &mut [QueryOutcome],
) -> Result<Vec<Vec<f32>>> {
    let projector = store_projector(objective, store)?;
    match curvature.space() {
        Space::Projected(fitted) => {
            if fitted != store.manifest.key {
                return Err(Error::run(
                    &store.dir,
                    format!(
                        "the projected curvature was fitted on a store with projection {} seed {}; this store has {} seed {} (run culprit fit --curvature projected again)",
                        fitted.projection, fitted.seed, store.manifest.key.projection, store.manifest.key.seed
                    ),
                ));
            }
            let raw: Vec<Vec<f64>> =
                gradients.iter().map(|g| projector.project_vector(g).into_iter().map(f64::from).collect()).collect();
            let solved = curvature.solve(objective, &raw)?;
            Ok(solved.into_iter().map(|(x, _)| x.into_iter().map(narrow).collect()).collect())
        }
        Space::Tracked => {
            let solved = curvature.solve(objective, gradients)?;
            for (o, (_, info)) in outcomes.iter_mut().zip(&solved) {
                o.solve = info.clone();
            }
            Ok(solved.iter().map(|(x, _)| projector.project_vector(x)).collect())
        }
    }
}

/// The scores from the wgpu device (`super::gpu`), when that can give them: the objective lives
/// there, only the top-k lists are needed (`top_only`), and `super::gpu::can_score` accepts the
/// store, the number of query vectors and k. `None`: score on the CPU.
#[cfg(feature = "gpu")]
fn scored_on_gpu<M: Model>(
    objective: &Objective<M>,
    store: &GradientStore,
    top_only: bool,
    queries: &[Vec<f32>],
    scale: f64,
    k: usize,
) -> Option<ScoreResult> {
    let usable = top_only
        && culprit_models::device::is_wgpu(&objective.device)
        && super::gpu::can_score(store, queries.len(), k);
    usable.then(|| super::gpu::score_on_gpu(store, queries, scale, k))
}

#[cfg(not(feature = "gpu"))]
fn scored_on_gpu<M: Model>(
    _: &Objective<M>,
    _: &GradientStore,
    _: bool,
    _: &[Vec<f32>],
    _: f64,
    _: usize,
) -> Option<ScoreResult> {
    None
}

/// Scores `queries` against `store` under `curvature` (module docs). `self_influence` (the
/// training examples', in store-row order) is required for [`ScoreMode::Relatif`].
pub fn attribute<M: Model>(
    objective: &Objective<M>,
    curvature: &Curvature,
    store: &GradientStore,
    queries: &M::Batch,
    self_influence: Option<&[f64]>,
    options: &AttributionOptions,
) -> Result<Attribution> {
    if store.rows() != objective.len() {
        return Err(Error::run(
            &store.dir,
            format!("the store holds {} rows, the training data {} examples", store.rows(), objective.len()),
        ));
    }
    let (mut outcomes, gradients) = query_gradients(objective, queries, options.measurement)?;
    let mut projected = scored_vectors(objective, curvature, store, &gradients, &mut outcomes)?;
    let (scale, row_weights) = match (options.score, self_influence) {
        (ScoreMode::Raw, _) => (1.0 / objective.len() as f64, None),
        (ScoreMode::Relatif, Some(own)) => {
            (1.0, Some(own.iter().map(|v| if *v > 0.0 { 1.0 / v.sqrt() } else { 0.0 }).collect::<Vec<f64>>()))
        }
        (ScoreMode::Relatif, None) => {
            return Err(Error::Usage("RelatIF scores need the training examples' self-influence".into()));
        }
    };
    let combined = projected.len() > 1;
    let strongest = combined && options.combine == Combine::Strongest;
    if strongest && options.part != (0, 1) {
        return Err(Error::Usage(
            "--combine strongest scales each query by the spread of all its scores, which one --shard part does not see; use --combine sum with --shard".into(),
        ));
    }
    if combined && !strongest {
        let mut sum = vec![0.0f32; projected[0].len()];
        for q in &projected {
            sum.iter_mut().zip(q).for_each(|(s, v)| *s += v);
        }
        projected.push(sum);
    }
    let started = std::time::Instant::now();
    let keep_all = options.keep_all || strongest;
    let top_only = row_weights.is_none() && !keep_all && options.part == (0, 1);
    let mut scores = match scored_on_gpu(objective, store, top_only, &projected, scale, options.top) {
        Some(scores) => scores,
        None => score_store_part(store, &projected, scale, row_weights.as_deref(), options.top, keep_all, options.part),
    };
    let strongest = strongest.then(|| {
        let mut all = scores.all.take().expect("kept");
        let (choice, column) = strongest_of(&mut scores, &all, options.top);
        if options.keep_all {
            all.push(column);
            scores.all = Some(all);
        }
        choice
    });
    let scoring_seconds = started.elapsed().as_secs_f64();
    Ok(Attribution { queries: outcomes, scores, combined, strongest, projected, scale, row_weights, scoring_seconds })
}

/// What `queries` are as the model sees them (labels, predictions, probabilities, the
/// measurement's targets and value), without solving or scoring: the final model's view of the
/// queries of a [`super::ensemble`] over checkpoints.
pub fn query_outcomes<M: Model>(
    objective: &Objective<M>,
    queries: &M::Batch,
    measurement: Measurement,
) -> Result<Vec<QueryOutcome>> {
    Ok(query_gradients(objective, queries, measurement)?.0)
}

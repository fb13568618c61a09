//! A trace of a run: for chosen test outputs, the training examples most responsible.
//!
//! Loads the run, its gradient store and a fitted curvature, and hands them with the queries to
//! the engine ([`culprit_engine::query::attribute::attribute`]); then names every scored row by
//! its training id and label, splits scores by layer on request, orients each ranking so that
//! proponents come first whatever the measurement, and assembles the [`TraceReport`]. The
//! score's meaning is in [`culprit_engine::query`] and `docs/OUTPUT.md`. Used by `culprit trace`,
//! and by `culprit eval`, which checks the scores against retraining.

use std::path::PathBuf;

use culprit_engine::curvature::Method;
use culprit_engine::gradients::Measurement;
use culprit_engine::query::attribute::{Attribution, AttributionOptions, attribute};
use culprit_engine::query::{Combine, ScoreMode, Scored};
use culprit_engine::store::GradientStore;
use culprit_models::Backend;

use super::artifacts::{CacheUse, load_curvature, objective, open_store, training_self_influence};
use super::kind::Kind;
use super::run::Run;
use crate::data::{DataSpec, Dataset, ListedLabel};
use crate::error::Result;
use crate::report::trace::{
    Influence, LayerScore, OUTPUT_SCHEMA_VERSION, QueryInfo, QuerySource, Ranking, TokenScore, TraceReport,
};

/// The run and the test inputs a query is about (`culprit trace`, `culprit eval`).
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct QueryArgs {
    /// Run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// Where the test inputs are.
    #[command(flatten)]
    pub data: DataSpec,
    /// Source row indices of the test inputs, e.g. 3 or 3,17,42.
    #[arg(long = "index", value_delimiter = ',', required = true)]
    pub indices: Vec<usize>,
}

impl QueryArgs {
    /// Their flags.
    pub fn flags(&self) -> Vec<std::ffi::OsString> {
        let mut flags: Vec<std::ffi::OsString> = vec!["--run".into(), self.run.clone().into()];
        flags.extend(self.data.flags());
        let indices: Vec<String> = self.indices.iter().map(usize::to_string).collect();
        flags.extend(["--index".into(), indices.join(",").into()]);
        flags
    }
}

/// Options of a trace (the flags of `culprit trace`).
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct TraceOptions {
    /// The run and the test inputs.
    #[command(flatten)]
    pub query: QueryArgs,
    /// What to attribute: predicted | label | class:C (losses), margin | margin:label | margin:C,
    /// logit | logit:label | logit:C (raw logits; the best choice for backdoors).
    #[arg(long = "measure", default_value = "predicted")]
    pub measurement: Measurement,
    /// Fitted curvature to use (see `culprit fit`).
    #[arg(long, value_enum, default_value_t = Method::Cg)]
    pub curvature: Method,
    /// Proponents and opponents to show.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Keep every score (for `--scores-out`).
    #[arg(skip)]
    pub keep_all: bool,
    /// Split each listed score by layer (stores projected `none` or `kron`).
    #[arg(long)]
    pub per_layer: bool,
    /// Language models: split each listed document's score by its tokens (the parts sum to the
    /// score; a part is shown on the token whose prediction it trained), to localize a trigger
    /// or payload inside a poisoned document. Stores projected `kron` or `none`.
    #[arg(long)]
    pub per_token: bool,
    /// Score only the store's shards j with j mod N = I (I/N); combine the N JSON reports with
    /// `culprit merge`.
    #[arg(long = "shard", value_parser = culprit_engine::params::part)]
    pub part: Option<(usize, usize)>,
    /// raw: the predicted change of the measurement if the example were removed; relatif:
    /// influence divided by √(the example's self-influence), which ranks by alignment rather than
    /// gradient size (finds backdoor poisons; needs a curvature with per-example solves).
    #[arg(long, value_enum, default_value_t = ScoreMode::Raw)]
    pub score: ScoreMode,
    /// With several queries, the combined ranking: sum (the scores summed) or strongest (each
    /// query's scores scaled by their spread, then the strongest query per training example:
    /// for many prompts of one behaviour whose scores disagree, such as a language model's
    /// triggered prompts; a classifier's backdoor ranks better summed).
    #[arg(long, value_enum, default_value_t = Combine::Sum)]
    pub combine: Combine,
    /// Gradient store (default RUN/gradients).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Score with the run's checkpoints (`train --checkpoints`) instead of its final model: each
    /// checkpoint's scores, from its own store and curvature (`cache --checkpoints`, `fit
    /// --checkpoints`), scaled to unit spread and weighted by the learning rate there
    /// (TracIn-CP; the final model is not among them: its learning rate is 0). Finds what the
    /// final model has memorised, such as a language model's backdoor poisons. Not with --store,
    /// --shard or --per-layer.
    #[arg(long)]
    pub checkpoints: bool,
    /// Backend (the global `--backend`).
    #[arg(skip)]
    pub backend: Backend,
}

impl TraceOptions {
    /// The options of `culprit trace` for these queries and curvature, with every other default
    /// (the loss against the predicted class, top 10, raw scores, the run's own store, the whole
    /// store, no per-layer split), the default backend.
    pub fn new(run: PathBuf, data: DataSpec, indices: Vec<usize>, curvature: Method) -> Self {
        let query = QueryArgs { run, data, indices: vec![0] };
        let mut flags = query.flags();
        flags.extend(["--curvature".into(), curvature.name().into()]);
        let mut options: Self = culprit_engine::params::clap_parse(flags);
        options.query.indices = indices;
        options
    }
}

/// Runs a trace of a classifier run (see [`trace_of`] for any kind).
pub fn trace(options: &TraceOptions) -> Result<TraceReport> {
    let run = Run::open(&options.query.run)?;
    crate::dispatch!(run, K => Ok(trace_with_data::<K>(options)?.0))
}

/// Runs a trace of a run whose kind is `K`.
pub fn trace_of<K: Kind>(options: &TraceOptions) -> Result<TraceReport> {
    Ok(trace_with_data::<K>(options)?.0)
}

/// What the RelatIF denominators cost, and whether they came from the cache.
pub(crate) struct SelfInfluenceUse {
    values: Vec<f64>,
    seconds: f64,
    cached: bool,
}

impl SelfInfluenceUse {
    /// Several runs' together (the checkpoints of an ensemble): their seconds summed, cached if
    /// all were; `None` if none had any (raw scores).
    pub(crate) fn all_of<'a>(uses: impl Iterator<Item = Option<&'a SelfInfluenceUse>>) -> Option<SelfInfluenceUse> {
        let uses: Vec<&SelfInfluenceUse> = uses.flatten().collect();
        (!uses.is_empty()).then(|| SelfInfluenceUse {
            values: Vec::new(),
            seconds: uses.iter().map(|u| u.seconds).sum(),
            cached: uses.iter().all(|u| u.cached),
        })
    }
}

/// One run's attribution and what it was computed from.
pub(crate) struct Attributed<K: Kind> {
    pub(crate) store: GradientStore,
    pub(crate) objective: culprit_engine::objective::Objective<K::Model>,
    pub(crate) training: Dataset<K::Batch>,
    pub(crate) queries: Dataset<K::Batch>,
    pub(crate) attribution: Attribution,
    pub(crate) own: Option<SelfInfluenceUse>,
    pub(crate) damping: f64,
}

/// Attributes the queries of `options` with its run's store and curvature.
pub(crate) fn attribute_run<K: Kind>(options: &TraceOptions) -> Result<Attributed<K>> {
    let run = Run::open(&options.query.run)?;
    let (store, _) = open_store(&run, options.store.clone())?;
    let (objective, training) = objective::<K>(&run, options.backend)?;
    let curvature = load_curvature(&run, &objective, options.curvature)?;
    let q = &options.query;
    let queries = K::load(&run, &q.data)?.select(&q.indices)?;
    let own = match options.score {
        ScoreMode::Raw => None,
        ScoreMode::Relatif => {
            let started = std::time::Instant::now();
            let (values, used) = training_self_influence(&run, &objective, &curvature, Some(&store))?;
            if let CacheUse::NotWritten(why) = &used {
                eprintln!("note: the self-influence was computed in memory and not cached ({why})");
            }
            Some(SelfInfluenceUse { values, seconds: started.elapsed().as_secs_f64(), cached: used == CacheUse::Read })
        }
    };
    let engine_options = AttributionOptions {
        measurement: options.measurement,
        score: options.score,
        top: options.top,
        keep_all: options.keep_all,
        part: options.part.unwrap_or((0, 1)),
        combine: options.combine,
    };
    let own_values = own.as_ref().map(|o| o.values.as_slice());
    let attribution = attribute(&objective, &curvature, &store, &queries.examples, own_values, &engine_options)?;
    let damping = curvature.options.damping;
    Ok(Attributed { store, objective, training, queries, attribution, own, damping })
}

/// Runs a trace and also returns the query examples (in report order) and the training data, for
/// rendering.
#[allow(clippy::type_complexity)]
pub fn trace_with_data<K: Kind>(options: &TraceOptions) -> Result<(TraceReport, Dataset<K::Batch>, Dataset<K::Batch>)> {
    if options.checkpoints {
        return super::checkpoints::trace_checkpoints::<K>(options);
    }
    let run = Run::open(&options.query.run)?;
    let a = attribute_run::<K>(options)?;
    let mut report = assemble(options, &a.attribution, Some(&a.store), &a.training, &a.queries, a.own.as_ref());
    if options.per_token {
        let parts = |row: usize, columns: &[(usize, f64)]| {
            culprit_engine::query::per_token::token_parts(&a.objective, &a.store, &a.attribution, row, columns)
        };
        split_by_token::<K>(&run, &parts, &a.training, &mut report)?;
    }
    report.damping = a.damping;
    report.l2 = a.objective.l2;
    Ok((report, a.queries, a.training))
}

/// A row's per-token parts for columns (column, score) of a report (see
/// [`culprit_engine::query::per_token::token_parts`]).
pub(crate) type TokenParts<'a> = dyn Fn(usize, &[(usize, f64)]) -> culprit_engine::Result<Vec<Vec<f64>>> + 'a;

/// Fills `per_token` of every listed document of `report` (see
/// [`culprit_engine::query::per_token`]): one tapped backward per distinct document.
pub(crate) fn split_by_token<K: Kind>(
    run: &Run,
    parts_of: &TokenParts<'_>,
    training: &Dataset<K::Batch>,
    report: &mut TraceReport,
) -> Result<()> {
    use std::collections::BTreeMap;
    let row_of: std::collections::HashMap<usize, usize> =
        training.ids.iter().enumerate().map(|(r, &id)| (id, r)).collect();
    // (column, influence) for every listed document, grouped by training row.
    let count = report.proponents.len();
    let mut listed: Vec<(usize, &mut Influence)> = Vec::new();
    for (k, (p, o)) in report.proponents.iter_mut().zip(report.opponents.iter_mut()).enumerate() {
        listed.extend(p.iter_mut().chain(o.iter_mut()).map(|i| (k, i)));
    }
    if let Some(c) = report.combined.as_mut() {
        listed.extend(c.proponents.iter_mut().chain(c.opponents.iter_mut()).map(|i| (count, i)));
    }
    let mut by_row: BTreeMap<usize, Vec<(usize, &mut Influence)>> = BTreeMap::new();
    for (k, influence) in listed {
        by_row.entry(row_of[&influence.train_index]).or_default().push((k, influence));
    }
    let rows: Vec<usize> = by_row.keys().copied().collect();
    let Some(pieces) = K::token_pieces(run, &training.examples, &rows)? else {
        return Err(crate::Error::Usage(
            "--per-token splits a language model's document scores by token; this run is a classifier (see --per-layer)".into(),
        ));
    };
    for ((row, entries), pieces) in by_row.into_iter().zip(pieces) {
        // One column per (column, score): a row can sit at both ends of a combined ranking.
        let mut columns: Vec<(usize, f64)> = entries.iter().map(|(k, i)| (*k, i.score)).collect();
        columns.dedup();
        let parts = parts_of(row, &columns)?;
        for (k, influence) in entries {
            let column = columns.iter().position(|&c| c == (k, influence.score)).expect("listed");
            influence.per_token = Some(
                pieces
                    .iter()
                    .zip(&parts[column])
                    .map(|(token, &score)| TokenScore { token: token.clone(), score })
                    .collect(),
            );
        }
    }
    Ok(())
}

/// Names scored rows by training id and label, with the per-layer split when asked.
struct Namer<'a, B> {
    attribution: &'a Attribution,
    store: Option<&'a GradientStore>,
    training: &'a Dataset<B>,
    per_layer: bool,
}

impl<B: ListedLabel> Namer<'_, B> {
    fn name(&self, column: usize, s: &Scored) -> Influence {
        Influence {
            train_index: self.training.ids[s.row],
            label: self.training.examples.listed_label(s.row),
            source: self.training.sources.as_ref().map(|t| t[s.row].clone()),
            per_token: None,
            score: s.score,
            per_layer: self.store.filter(|_| self.per_layer).map(|store| {
                self.attribution
                    .per_layer(store, column, s.row, s.score)
                    .into_iter()
                    .map(|(layer, score)| LayerScore { layer, score })
                    .collect()
            }),
        }
    }

    /// Column `column`'s ranking, proponents first: the largest scores when a positive score
    /// marks a proponent (`sign` +1), else the smallest.
    fn ranking(&self, column: usize, sign: i8) -> Ranking {
        let scores = &self.attribution.scores;
        let hi: Vec<Influence> =
            scores.largest[column].iter().filter(|s| s.score > 0.0).map(|s| self.name(column, s)).collect();
        let lo: Vec<Influence> =
            scores.smallest[column].iter().filter(|s| s.score < 0.0).map(|s| self.name(column, s)).collect();
        if sign < 0 { Ranking { proponents: lo, opponents: hi } } else { Ranking { proponents: hi, opponents: lo } }
    }
}

fn score_definition(score: ScoreMode) -> &'static str {
    match score {
        ScoreMode::Raw => {
            "score(i) = (1/n) ∇m(z_test)ᵀ (H + δI)⁻¹ ∇ℓ(z_i): the predicted change of the measurement m if training example i were removed and the model retrained"
        }
        ScoreMode::Relatif => {
            "score(i) = ∇m(z_test)ᵀ (H + δI)⁻¹ ∇ℓ(z_i) / √(∇ℓ(z_i)ᵀ (H + δI)⁻¹ ∇ℓ(z_i)) (ℓ-RelatIF): influence per unit of the example's own self-influence; its sign means what the raw score's does"
        }
    }
}

/// The report of an attribution (damping and λ are filled in by the caller; without a store, so
/// are the projection and the weights' hash, and no score is split by layer).
pub(crate) fn assemble<B: culprit_models::Batch + ListedLabel>(
    options: &TraceOptions,
    attribution: &Attribution,
    store: Option<&GradientStore>,
    training: &Dataset<B>,
    queries: &Dataset<B>,
    own: Option<&SelfInfluenceUse>,
) -> TraceReport {
    let sign = options.measurement.proponent_sign();
    let per_layer = options.per_layer && store.is_some_and(|s| s.manifest.layout.len() > 1);
    let namer = Namer { attribution, store, training, per_layer };
    let count = attribution.queries.len();
    let (proponents, opponents) = (0..count)
        .map(|k| {
            let r = namer.ranking(k, sign);
            (r.proponents, r.opponents)
        })
        .unzip();
    let mut all_scores = attribution.scores.all.clone();
    if attribution.combined
        && let Some(all) = all_scores.as_mut()
    {
        all.pop();
    }
    let language = queries.manifest.tokenizer.is_some();
    let query_infos = attribution
        .queries
        .iter()
        .zip(&queries.ids)
        .enumerate()
        .map(|(k, (q, &index))| QueryInfo {
            index,
            label: q.labels[0],
            predicted: q.predicted[0],
            // A language model's distributions are vocabulary-sized: not listed.
            probabilities: if language { Vec::new() } else { q.probabilities[0].clone() },
            target: q.targets[0],
            measurement_value: q.value,
            solve_iterations: q.solve.as_ref().map(|i| i.iterations),
            solve_residual: q.solve.as_ref().map(|i| i.relative_residual),
            text: if language { queries.texts.as_ref().map(|t| t[k].clone()) } else { None },
        })
        .collect();
    TraceReport {
        schema_version: OUTPUT_SCHEMA_VERSION,
        score_definition: score_definition(options.score).into(),
        proponent_sign: sign,
        measurement: options.measurement,
        curvature: options.curvature.name().into(),
        damping: 0.0,
        l2: 0.0,
        n: training.len(),
        projection: store.map(|s| s.manifest.key.projection.clone()).unwrap_or_default(),
        weights_sha256: store.map(|s| s.manifest.key.weights_sha256.clone()),
        queries: query_infos,
        proponents,
        opponents,
        scoring_seconds: attribution.scoring_seconds,
        part: options.part.map(|(i, n)| [i, n]),
        score_mode: options.score,
        combine: options.combine,
        self_influence_seconds: own.map(|o| o.seconds),
        self_influence_cached: own.map(|o| o.cached),
        combined: attribution.combined.then(|| namer.ranking(count, sign)),
        query_source: Some(QuerySource {
            path: options.query.data.path.clone(),
            split: options.query.data.split,
            skip: options.query.data.skip,
            limit: options.query.data.limit,
        }),
        checkpoints: None,
        all_scores,
        train_ids: training.ids.clone(),
    }
}

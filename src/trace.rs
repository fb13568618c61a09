//! `culprit trace`: for chosen test outputs, the training examples most responsible.
//!
//! Loads the run, its gradient store and a fitted curvature, computes each query's measurement
//! gradient, preconditions and projects it, and scores it against the store
//! ([`crate::query::score_store`]). The score's meaning is in [`crate::query`] and
//! `docs/OUTPUT.md`.

use std::path::PathBuf;

use culprit_models::Backend;
use serde::{Deserialize, Serialize};

use crate::cache::store_key;
use crate::curvature::Method;
use crate::data::{DataSpec, Dataset, Preprocessing};
use crate::error::{Error, Result};
use crate::gradients::projection::{ProjectionSpec, Projector};
use crate::gradients::{Measurement, Target, per_example_gradients};
use crate::query::ScoreMode;
use crate::run::Run;
use crate::store::{GradientStore, StoreManifest};

/// Version of the JSON output schema (`docs/OUTPUT.md`).
pub const OUTPUT_SCHEMA_VERSION: u32 = 1;

/// Options of `culprit trace`.
#[derive(Clone, Debug)]
pub struct TraceOptions {
    /// The run.
    pub run: PathBuf,
    /// Gradient store (default `RUN/gradients`).
    pub store: Option<PathBuf>,
    /// Where the test inputs are.
    pub data: DataSpec,
    /// Source row ids of the queries in `data`.
    pub indices: Vec<usize>,
    /// What is measured.
    pub measurement: Measurement,
    /// Which fitted curvature.
    pub curvature: Method,
    /// How many proponents and opponents.
    pub top: usize,
    /// Keep every score (for `--scores-out`).
    pub keep_all: bool,
    /// Split the listed scores by layer.
    pub per_layer: bool,
    /// Score only shard part I of N.
    pub part: Option<(usize, usize)>,
    /// Raw influence or RelatIF.
    pub score: ScoreMode,
    /// Backend.
    pub backend: Backend,
}

impl TraceOptions {
    /// Options with the defaults: loss against the predicted class, top 10, raw scores, the whole
    /// store, the run's own store, no per-layer split, the default backend.
    pub fn new(run: PathBuf, data: DataSpec, indices: Vec<usize>, curvature: Method) -> Self {
        Self {
            run,
            store: None,
            data,
            indices,
            measurement: Measurement::Loss(Target::Predicted),
            curvature,
            top: 10,
            keep_all: false,
            per_layer: false,
            part: None,
            score: ScoreMode::Raw,
            backend: Backend::default(),
        }
    }
}

/// Where the queries came from (`--data --split --skip --limit` of the trace), so later commands
/// (`culprit purge`) can evaluate them again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuerySource {
    /// `--data`.
    pub path: PathBuf,
    /// `--split`.
    pub split: crate::data::Split,
    /// `--skip`.
    pub skip: usize,
    /// `--limit`.
    pub limit: Option<usize>,
}

impl QuerySource {
    /// As a data spec.
    pub fn spec(&self) -> DataSpec {
        DataSpec { path: self.path.clone(), split: self.split, skip: self.skip, limit: self.limit }
    }
}

/// The strongest proponents and opponents of one ranking.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ranking {
    /// Strongest first.
    pub proponents: Vec<Influence>,
    /// Strongest first.
    pub opponents: Vec<Influence>,
}

/// A query as the model sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueryInfo {
    /// Source row id.
    pub index: usize,
    /// Its label.
    pub label: u32,
    /// The model's prediction.
    pub predicted: u32,
    /// Class probabilities.
    pub probabilities: Vec<f64>,
    /// The class the measurement refers to.
    pub target: u32,
    /// The measurement's value.
    pub measurement_value: f64,
    /// Iterations of the curvature solve (iterative methods).
    pub solve_iterations: Option<usize>,
    /// Relative residual of the curvature solve (iterative methods).
    pub solve_residual: Option<f64>,
}

/// One training example's influence.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Influence {
    /// Training example id (source row).
    pub train_index: usize,
    /// Its label.
    pub label: u32,
    /// The score.
    pub score: f64,
    /// The score split by layer (`--per-layer`; sums to `score`), for stores whose rows have
    /// per-layer blocks (`none`, `kron`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub per_layer: Option<Vec<LayerScore>>,
}

/// One layer's part of a score.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerScore {
    /// Layer name.
    pub layer: String,
    /// Its contribution: (1/n) ⟨query block, row block⟩.
    pub score: f64,
}

/// Everything `trace` found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TraceReport {
    /// Schema version.
    pub schema_version: u32,
    /// What a score is.
    pub score_definition: String,
    /// +1 if a positive score marks a proponent of the target class, −1 if a negative one does.
    pub proponent_sign: i8,
    /// The measurement.
    pub measurement: Measurement,
    /// Curvature method.
    pub curvature: String,
    /// Extra damping δ.
    pub damping: f64,
    /// The objective's λ.
    pub l2: f64,
    /// Number of training examples n.
    pub n: usize,
    /// The store's projection.
    pub projection: String,
    /// The queries.
    pub queries: Vec<QueryInfo>,
    /// Per query, the proponents (strongest first).
    pub proponents: Vec<Vec<Influence>>,
    /// Per query, the opponents (strongest first).
    pub opponents: Vec<Vec<Influence>>,
    /// Seconds spent scoring (one pass over the store).
    pub scoring_seconds: f64,
    /// `[I, N]` when only the shards j with j mod N = I were scored (`--shard I/N`); merge the
    /// N parts with `culprit merge`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub part: Option<[usize; 2]>,
    /// Raw influence or RelatIF (see [`ScoreMode`]).
    #[serde(default)]
    pub score_mode: ScoreMode,
    /// Seconds spent on the training examples' self-influence (RelatIF).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub self_influence_seconds: Option<f64>,
    /// Whether the self-influence came from its cache (`RUN/curvature/METHOD.self.bin`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub self_influence_cached: Option<bool>,
    /// With several queries: the ranking by the sum of their scores (one extra query, since the
    /// score is linear in the query): "which examples caused all of these?".
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub combined: Option<Ranking>,
    /// Where the queries came from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub query_source: Option<QuerySource>,
    /// Every score, per query, in training-data order (only with `--scores-out`).
    #[serde(skip)]
    pub all_scores: Option<Vec<Vec<f32>>>,
    /// Training ids in store-row order (for `all_scores`).
    #[serde(skip)]
    pub train_ids: Vec<usize>,
}

/// Opens the store of a run, whatever projection it was built with.
pub fn open_store(run: &Run, store: Option<PathBuf>) -> Result<(GradientStore, ProjectionSpec)> {
    let dir = store.unwrap_or_else(|| run.dir.join("gradients"));
    if !dir.join("manifest.json").is_file() {
        return Err(Error::run(
            &dir,
            format!("no gradient store here; build it with `culprit cache --run {}`", run.dir.display()),
        ));
    }
    let manifest = StoreManifest::read(&dir)?;
    let spec = ProjectionSpec::parse(&manifest.key.projection)?;
    let key = store_key(run, spec, manifest.key.seed)?;
    Ok((GradientStore::open(&dir, &key)?, spec))
}

/// Runs a trace.
pub fn trace(options: &TraceOptions) -> Result<TraceReport> {
    Ok(trace_with_data(options)?.0)
}

/// Runs a trace and also returns the query examples (in report order) and the training data, for
/// rendering.
pub fn trace_with_data(options: &TraceOptions) -> Result<(TraceReport, Dataset, Dataset)> {
    let run = Run::open(&options.run)?;
    let (store, spec) = open_store(&run, options.store.clone())?;
    let objective = crate::fit::objective(&run, options.backend)?;
    let curvature = crate::fit::load(&run, &objective, options.curvature)?;
    let subset = Dataset::load(&options.data, Preprocessing::Reuse(&run.manifest))?.select(&options.indices)?;
    let net = &objective.network;
    let classes = net.config().num_classes;
    let dim = subset.dim();
    let (features, labels) = (&subset.features, &subset.labels);
    let predictions = crate::predict::predict(net, &subset, 256, &objective.device);
    let predicted: Vec<u32> = predictions.iter().map(|p| p.predicted).collect();
    let targets = options.measurement.targets(labels, &predicted, classes)?;
    let blocks = per_example_gradients(net, features, &targets, options.measurement, &objective.device);
    let grads = crate::gradients::gradient_rows_f64(&blocks);
    let d = net.num_params();
    let q: Vec<Vec<f64>> = grads.chunks(d).map(<[f64]>::to_vec).collect();
    let values = crate::gradients::read_f32(options.measurement.values(
        net.forward(culprit_models::network::input_batch(features, dim, &objective.device, net.dtype())),
        &targets,
    ));
    let projector = Projector::new(spec, store.manifest.key.seed, net, &objective.device)?;
    let (solved, projected): (Vec<(Vec<f64>, Option<crate::curvature::iterative::SolveInfo>)>, Vec<Vec<f32>>) =
        match &curvature.factors {
            crate::curvature::Factors::Projected { store: fitted, .. } => {
                if fitted != &store.manifest.key {
                    return Err(Error::run(
                        &store.dir,
                        format!(
                            "the projected curvature was fitted on a store with projection {} seed {}; this store has {} seed {} (run culprit fit --curvature projected again)",
                            fitted.projection, fitted.seed, store.manifest.key.projection, store.manifest.key.seed
                        ),
                    ));
                }
                let raw: Vec<Vec<f32>> = q.iter().map(|g| projector.project_vector(g, net)).collect();
                let x = curvature.solve_projected(&raw)?;
                (q.iter().map(|_| (Vec::new(), None)).collect(), x)
            }
            _ => {
                let solved = curvature.solve(&objective, &q)?;
                let projected = solved.iter().map(|(x, _)| projector.project_vector(x, net)).collect();
                (solved, projected)
            }
        };
    let n = objective.len();
    let mut self_influence_seconds = None;
    let mut self_influence_cached = None;
    let (scale, weights) = match options.score {
        ScoreMode::Raw => (1.0 / n as f64, None),
        ScoreMode::Relatif => {
            let started = std::time::Instant::now();
            let (own, cached) =
                crate::audit::training_self_influence(&run, &objective, &curvature, options.curvature, Some(&store))?;
            self_influence_cached = Some(cached);
            self_influence_seconds = Some(started.elapsed().as_secs_f64());
            (1.0, Some(own.iter().map(|v| if *v > 0.0 { 1.0 / v.sqrt() } else { 0.0 }).collect::<Vec<f64>>()))
        }
    };
    let mut projected = projected;
    let combine = projected.len() > 1;
    if combine {
        let mut sum = vec![0.0f32; projected[0].len()];
        for q in &projected {
            sum.iter_mut().zip(q).for_each(|(s, v)| *s += v);
        }
        projected.push(sum);
    }
    let started = std::time::Instant::now();
    let mut scores = crate::query::score_store_part(
        &store,
        &projected,
        scale,
        weights.as_deref(),
        options.top,
        options.keep_all,
        options.part.unwrap_or((0, 1)),
    );
    let scoring_seconds = started.elapsed().as_secs_f64();
    let combined_scores = combine.then(|| {
        if let Some(all) = scores.all.as_mut() {
            all.pop();
        }
        (scores.largest.pop().expect("combined"), scores.smallest.pop().expect("combined"))
    });
    let proponent_sign = options.measurement.proponent_sign();
    let blocks = &store.manifest.layout;
    let split = options.per_layer && blocks.len() > 1;
    let influence = |k: usize, s: &crate::query::Scored| Influence {
        train_index: objective.data.ids[s.row],
        label: objective.data.labels[s.row],
        score: s.score,
        per_layer: split.then(|| {
            let row = crate::gradients::projection::expand_row(blocks, &store.row(s.row));
            let mut offset = 0;
            blocks
                .iter()
                .map(|b| LayerScore {
                    layer: b.name.clone(),
                    score: {
                        let range = offset..offset + b.query_len();
                        offset = range.end;
                        range
                    }
                    .map(|t| f64::from(row[t]) * f64::from(projected[k][t]))
                    .sum::<f64>()
                        * weights.as_ref().map_or(scale, |w| scale * w[s.row]),
                })
                .collect()
        }),
    };
    let (mut proponents, mut opponents): (Vec<Vec<Influence>>, Vec<Vec<Influence>>) = scores
        .largest
        .iter()
        .zip(&scores.smallest)
        .enumerate()
        .map(|(k, (hi, lo))| {
            let hi: Vec<Influence> = hi.iter().filter(|s| s.score > 0.0).map(|s| influence(k, s)).collect();
            let lo: Vec<Influence> = lo.iter().filter(|s| s.score < 0.0).map(|s| influence(k, s)).collect();
            (hi, lo)
        })
        .unzip();
    let combined_index = projected.len() - 1;
    let combined = combined_scores.map(|(hi, lo)| {
        let hi: Vec<Influence> = hi.iter().filter(|s| s.score > 0.0).map(|s| influence(combined_index, s)).collect();
        let lo: Vec<Influence> = lo.iter().filter(|s| s.score < 0.0).map(|s| influence(combined_index, s)).collect();
        if proponent_sign < 0 {
            Ranking { proponents: lo, opponents: hi }
        } else {
            Ranking { proponents: hi, opponents: lo }
        }
    });
    if proponent_sign < 0 {
        std::mem::swap(&mut proponents, &mut opponents);
    }
    let query_infos = predictions
        .iter()
        .zip(&targets)
        .zip(&values)
        .zip(&solved)
        .map(|(((p, t), v), (_, info))| QueryInfo {
            index: p.id,
            label: p.label,
            predicted: p.predicted,
            probabilities: p.probabilities.clone(),
            target: *t,
            measurement_value: f64::from(*v),
            solve_iterations: info.as_ref().map(|i| i.iterations),
            solve_residual: info.as_ref().map(|i| i.relative_residual),
        })
        .collect();
    let report = TraceReport {
        schema_version: OUTPUT_SCHEMA_VERSION,
        score_definition: match options.score {
            ScoreMode::Raw => "score(i) = (1/n) ∇m(z_test)ᵀ (H + δI)⁻¹ ∇ℓ(z_i): the predicted change of the measurement m if training example i were removed and the model retrained",
            ScoreMode::Relatif => "score(i) = ∇m(z_test)ᵀ (H + δI)⁻¹ ∇ℓ(z_i) / √(∇ℓ(z_i)ᵀ (H + δI)⁻¹ ∇ℓ(z_i)) (ℓ-RelatIF): influence per unit of the example's own self-influence; its sign means what the raw score's does",
        }
        .into(),
        proponent_sign,
        measurement: options.measurement,
        curvature: options.curvature.name().into(),
        damping: curvature.options.damping,
        l2: objective.l2,
        n,
        projection: spec.to_string(),
        queries: query_infos,
        proponents,
        opponents,
        scoring_seconds,
        part: options.part.map(|(i, n)| [i, n]),
        score_mode: options.score,
        self_influence_seconds,
        self_influence_cached,
        combined,
        query_source: Some(QuerySource {
            path: options.data.path.clone(),
            split: options.data.split,
            skip: options.data.skip,
            limit: options.data.limit,
        }),
        all_scores: scores.all,
        train_ids: objective.data.ids.clone(),
    };
    Ok((report, subset, objective.data))
}

/// A one-line description of a measurement for people.
pub fn describe(measurement: Measurement, target: u32) -> String {
    let t = |t: Target| match t {
        Target::Label => format!("the label (class {target})"),
        Target::Predicted => format!("the predicted class {target}"),
        Target::Class(c) => format!("class {c}"),
    };
    match measurement {
        Measurement::Loss(x) => format!("loss against {}", t(x)),
        Measurement::Margin(x) => format!("margin of {}", t(x)),
        Measurement::Logit(x) => format!("logit of {}", t(x)),
    }
}

/// The report as a plain-text table.
pub fn to_table(report: &TraceReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "curvature {} (damping {}, λ {}), store projection {}, n = {}; score = {}",
        report.curvature,
        report.damping,
        report.l2,
        report.projection,
        report.n,
        match report.score_mode {
            ScoreMode::Raw => "predicted change of the measurement if the example were removed",
            ScoreMode::Relatif => "RelatIF, influence / √(self-influence) (rank, not a predicted change)",
        }
    );
    let list = |s: &mut String, title: &str, list: &[Influence]| {
        let _ = writeln!(s, "  top {title}:");
        let _ = writeln!(s, "    {:>4}  {:>8}  {:>5}  {:>12}", "rank", "train", "label", "score");
        for (r, i) in list.iter().enumerate() {
            let layers = i
                .per_layer
                .as_ref()
                .map(|l| {
                    let parts: Vec<String> = l.iter().map(|x| format!("{} {:+.2e}", x.layer, x.score)).collect();
                    format!("  [{}]", parts.join(", "))
                })
                .unwrap_or_default();
            let _ = writeln!(s, "    {:>4}  {:>8}  {:>5}  {:>12.4e}{layers}", r + 1, i.train_index, i.label, i.score);
        }
    };
    for (k, q) in report.queries.iter().enumerate() {
        let p = q.probabilities[q.predicted as usize];
        let _ = writeln!(
            s,
            "\nquery {}: label {}, predicted {} (p = {:.3}); measurement: {} = {:.6}{}",
            q.index,
            q.label,
            q.predicted,
            p,
            describe(report.measurement, q.target),
            q.measurement_value,
            match (q.solve_iterations, q.solve_residual) {
                (Some(i), Some(r)) => format!(" [solve: {i} iterations, residual {r:.1e}]"),
                _ => String::new(),
            }
        );
        list(&mut s, "proponents (pushed the model toward the target class)", &report.proponents[k]);
        list(&mut s, "opponents (pushed it away)", &report.opponents[k]);
    }
    if let Some(c) = &report.combined {
        let _ = writeln!(s, "\nall {} queries together (scores summed):", report.queries.len());
        list(&mut s, "proponents", &c.proponents);
        list(&mut s, "opponents", &c.opponents);
    }
    s
}

/// Merges the reports of `--shard I/N` traces (all N parts, each once, of the same query) into
/// one, keeping the `top` strongest proponents and opponents per query.
pub fn merge(parts: Vec<TraceReport>, top: usize) -> Result<TraceReport> {
    let first = parts.first().ok_or_else(|| Error::Usage("merge needs at least one report".into()))?;
    let count = first.part.map_or(1, |p| p[1]);
    let mut seen = vec![false; count];
    for p in &parts {
        let same = p.queries.iter().map(|q| q.index).eq(first.queries.iter().map(|q| q.index))
            && p.measurement == first.measurement
            && p.curvature == first.curvature
            && p.n == first.n
            && p.projection == first.projection
            && p.damping == first.damping
            && p.score_mode == first.score_mode;
        if !same {
            return Err(Error::Usage("the reports trace different queries, measurements, curvatures or stores".into()));
        }
        let [i, n] = p.part.unwrap_or([0, 1]);
        if n != count || i >= n || std::mem::replace(&mut seen[i], true) {
            return Err(Error::Usage(format!(
                "part {i}/{n} is repeated or does not belong to a split in {count} parts"
            )));
        }
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(Error::Usage(format!("part {missing}/{count} is missing")));
    }
    let mut merged = first.clone();
    merged.part = None;
    merged.scoring_seconds = parts.iter().map(|p| p.scoring_seconds).sum();
    let strongest = |lists: Vec<&Vec<Influence>>, descending: bool| {
        let mut all: Vec<Influence> = lists.into_iter().flatten().cloned().collect();
        all.sort_by(|a, b| if descending { b.score.total_cmp(&a.score) } else { a.score.total_cmp(&b.score) });
        all.truncate(top);
        all
    };
    for k in 0..merged.queries.len() {
        let descending = merged.proponent_sign > 0;
        merged.proponents[k] = strongest(parts.iter().map(|p| &p.proponents[k]).collect(), descending);
        merged.opponents[k] = strongest(parts.iter().map(|p| &p.opponents[k]).collect(), !descending);
    }
    if let Some(c) = merged.combined.as_mut() {
        let lists: Vec<&Ranking> = parts.iter().filter_map(|p| p.combined.as_ref()).collect();
        let descending = merged.proponent_sign > 0;
        c.proponents = strongest(lists.iter().map(|r| &r.proponents).collect(), descending);
        c.opponents = strongest(lists.iter().map(|r| &r.opponents).collect(), !descending);
    }
    Ok(merged)
}

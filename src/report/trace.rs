//! The report of a trace: what `culprit trace` writes (JSON schema in `docs/OUTPUT.md`), its
//! plain-text table, and the merge of the reports of a trace split across machines.

use std::path::PathBuf;

use culprit_engine::gradients::{Measurement, Target};
use culprit_engine::query::{Combine, ScoreMode};
use serde::{Deserialize, Serialize};

use crate::data::DataSpec;
use crate::error::{Error, Result};

/// Version of the JSON output schema (`docs/OUTPUT.md`).
pub const OUTPUT_SCHEMA_VERSION: u32 = 1;

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
    /// Language models: the query's prompt and completion.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub text: Option<String>,
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
    /// Where the example came from (its line's `source` field), when the data says.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source: Option<String>,
    /// Language models, `--per-token`: the document's tokens and each one's part of the score
    /// (the parts sum to `score`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub per_token: Option<Vec<TokenScore>>,
}

/// One token's part of a document's score.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenScore {
    /// The token's text.
    pub token: String,
    /// Its part: Σ over tracked layers of ãₜᵀ Q δ̃ₜ, scaled as the score is.
    pub score: f64,
}

/// One layer's part of a score.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerScore {
    /// Layer name.
    pub layer: String,
    /// Its contribution: (1/n) ⟨query block, row block⟩.
    pub score: f64,
}

/// One checkpoint of a `trace --checkpoints` ensemble.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckpointUse {
    /// Its epoch.
    pub epoch: usize,
    /// Its run directory.
    pub run: std::path::PathBuf,
    /// w_c = η_c/Ση: its share of the ensemble (the learning rate there, normalised).
    pub weight: f64,
    /// The damping δ of its curvature.
    pub damping: f64,
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
    /// SHA-256 of the traced run's `weights.bin` (reports of other runs are never merged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
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
    /// How the combined ranking joins the queries (see [`Combine`]; reports before it existed
    /// summed).
    #[serde(default)]
    pub combine: Combine,
    /// Seconds spent on the training examples' self-influence (RelatIF).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub self_influence_seconds: Option<f64>,
    /// Whether the self-influence came from its cache (`RUN/curvature/METHOD.self.bin`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub self_influence_cached: Option<bool>,
    /// With several queries, their combined ranking (`combine`): by the sum of their scores (one
    /// extra query, since the score is linear in the query: "which examples caused all of
    /// these?"), or by each example's strongest query, scores scaled by each query's spread
    /// ("which examples stand out behind any of these?").
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub combined: Option<Ranking>,
    /// Where the queries came from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub query_source: Option<QuerySource>,
    /// Every score, per query, in training-data order (only with `--scores-out`).
    /// `trace --checkpoints`: the checkpoints whose scores were combined, with their weights.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub checkpoints: Option<Vec<CheckpointUse>>,
    #[serde(skip)]
    pub all_scores: Option<Vec<Vec<f32>>>,
    /// Training ids in store-row order (for `all_scores`).
    #[serde(skip)]
    pub train_ids: Vec<usize>,
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
        Measurement::LogProbability(Target::Label) => "log-probability of the completion".into(),
        Measurement::LogProbability(x) => format!("log-probability of {}", t(x)),
    }
}

/// For a `trace --checkpoints` report, the line that says which checkpoints made its scores.
pub fn checkpoints_line(report: &TraceReport) -> Option<String> {
    let checkpoints = report.checkpoints.as_ref()?;
    let each: Vec<String> = checkpoints.iter().map(|c| format!("{} (weight {:.3})", c.epoch, c.weight)).collect();
    Some(format!(
        "scores from the checkpoints of epochs {}: each checkpoint's scores at unit spread, weighted by the learning rate there (TracIn-CP); in units of spread, not a predicted change",
        each.join(", ")
    ))
}

/// The table's first lines: the curvature, the store and what a score is.
fn table_header(report: &TraceReport) -> String {
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
        match (report.checkpoints.is_some(), report.score_mode) {
            (true, ScoreMode::Raw) => "raw influence at each checkpoint, combined as below",
            (true, ScoreMode::Relatif) => "RelatIF at each checkpoint, combined as below",
            (false, ScoreMode::Raw) => "predicted change of the measurement if the example were removed",
            (false, ScoreMode::Relatif) => "RelatIF, influence / √(self-influence) (rank, not a predicted change)",
        }
    );
    if let Some(line) = checkpoints_line(report) {
        let _ = writeln!(s, "{line}");
    }
    s
}

/// The report as a plain-text table.
pub fn to_table(report: &TraceReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    s.push_str(&table_header(report));
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
            let source = i.source.as_ref().map(|s| format!("  {s}")).unwrap_or_default();
            let _ = writeln!(
                s,
                "    {:>4}  {:>8}  {:>5}  {:>12.4e}{source}{layers}",
                r + 1,
                i.train_index,
                i.label,
                i.score
            );
            if let Some(tokens) = &i.per_token {
                let mut ranked: Vec<&TokenScore> = tokens.iter().collect();
                ranked.sort_by(|a, b| b.score.abs().total_cmp(&a.score.abs()));
                let top: Vec<String> =
                    ranked.iter().take(5).map(|t| format!("{:?} {:+.2e}", t.token, t.score)).collect();
                let _ = writeln!(s, "          tokens carrying it: {}", top.join(", "));
            }
        }
    };
    for (k, q) in report.queries.iter().enumerate() {
        let what = match (&q.text, q.probabilities.get(q.predicted as usize)) {
            (Some(text), _) => format!("{:?}", text.chars().take(120).collect::<String>()),
            (None, Some(p)) => format!("label {}, predicted {} (p = {p:.3})", q.label, q.predicted),
            (None, None) => format!("label {}, predicted {}", q.label, q.predicted),
        };
        let _ = writeln!(
            s,
            "\nquery {}: {what}; measurement: {} = {:.6}{}",
            q.index,
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
        let how = match report.combine {
            Combine::Sum => "scores summed",
            Combine::Strongest => "each example's strongest query, scores over the query's spread",
        };
        let _ = writeln!(s, "\nall {} queries together ({how}):", report.queries.len());
        list(&mut s, "proponents", &c.proponents);
        list(&mut s, "opponents", &c.opponents);
    }
    s
}

impl TraceReport {
    /// Checks a report read from a file agrees with itself: one proponent and one opponent list
    /// per query. Returns the problem.
    pub fn check_shape(&self) -> std::result::Result<(), String> {
        let q = self.queries.len();
        if self.proponents.len() != q || self.opponents.len() != q {
            return Err(format!(
                "{q} queries but {} proponent and {} opponent lists",
                self.proponents.len(),
                self.opponents.len()
            ));
        }
        Ok(())
    }
}

/// Merges the reports of `--shard I/N` traces (all N parts, each once, of the same query) into
/// one, keeping the `top` strongest proponents and opponents per query.
pub fn merge(parts: Vec<TraceReport>, top: usize) -> Result<TraceReport> {
    let first = parts.first().ok_or_else(|| Error::Usage("merge needs at least one report".into()))?;
    let count = first.part.map_or(1, |p| p[1]);
    let mut seen = std::collections::BTreeSet::new();
    for p in &parts {
        p.check_shape().map_err(|problem| Error::Usage(format!("a damaged report: {problem}")))?;
        let same = p.queries.iter().map(|q| q.index).eq(first.queries.iter().map(|q| q.index))
            && p.measurement == first.measurement
            && p.curvature == first.curvature
            && p.n == first.n
            && p.projection == first.projection
            && p.weights_sha256 == first.weights_sha256
            && p.damping == first.damping
            && p.l2 == first.l2
            && p.score_mode == first.score_mode
            && p.combine == first.combine;
        if !same {
            return Err(Error::Usage(
                "the reports trace different runs (λ, n), queries, measurements, curvatures, damping, stores, score modes or combinations"
                    .into(),
            ));
        }
        let [i, n] = p.part.unwrap_or([0, 1]);
        if n != count || i >= n || !seen.insert(i) {
            return Err(Error::Usage(format!(
                "part {i}/{n} is repeated or does not belong to a split in {count} parts"
            )));
        }
    }
    if let Some(missing) = (0..count).find(|i| !seen.contains(i)) {
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

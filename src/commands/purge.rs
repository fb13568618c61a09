//! `culprit purge`: remove flagged training examples, retrain, and show what changed.
//!
//! Step 4 of the pipeline. The flagged ids come from a plain list or from the JSON of
//! `culprit trace` (its proponents: the combined ranking of several queries, or the one query's)
//! or `culprit audit` (its most self-influential examples), optionally cut to the first `top`.
//! Data files are never edited: the new run's `manifest.json` names the same files and lists the
//! excluded ids ([`crate::data::DataManifest::excluded`]). With `retrain`, the model is trained
//! again with the run's configuration and seed, and the before/after report gives, for both
//! models: clean accuracy on each evaluation set; with a poisoned data set (`culprit poison`), the
//! attack success rate on its triggered test set and how many of the removed ids were poisons;
//! and for a trace report, its queries' predictions and measurements.

use std::path::{Path, PathBuf};

use culprit_models::Backend;
use serde::{Deserialize, Serialize};

use crate::data::poisoned::PoisonManifest;
use crate::data::{DataSpec, Dataset, Preprocessing, Split};
use crate::error::{Error, Result};
use crate::io::{AtomicDir, write_new};
use crate::report::trace::TraceReport;
use crate::workspace::kind::{Classifier, Kind, Language};
use crate::workspace::predict::{accuracy, completion_logprobs, greedy_completions, mean_token_loss, measure, predict};
use crate::workspace::{Run, training_data};
use culprit_models::{Batch, Model, Tokens};

/// Options of `culprit purge`.
#[derive(Clone, Debug)]
pub struct PurgeOptions {
    /// The run.
    pub run: PathBuf,
    /// Id list, trace, audit or scan JSON.
    pub ids: PathBuf,
    /// Keep only the first `top` ids of a ranking.
    pub top: Option<usize>,
    /// New run directory.
    pub out: PathBuf,
    /// Retrain (else only write the manifest and the plan).
    pub retrain: bool,
    /// Clean evaluation sets.
    pub eval: Vec<DataSpec>,
    /// A `culprit poison` directory: its triggered and clean test sets and its ground truth.
    pub attack: Option<PathBuf>,
    /// Backend.
    pub backend: Backend,
    /// Hide progress bars.
    pub quiet: bool,
}

/// Reads flagged ids: a trace, audit, scan or dedup JSON report (a scan's `top` counts candidates,
/// whose flagged carriers are removed, without it every suspicious candidate's; a dedup's counts
/// groups, whose `remove` lists are removed), or plain integers separated by whitespace or
/// commas (`#` starts a comment). Rankings keep their order; `top` keeps the first `top`. Also
/// returns the trace report when the file is one (its queries are evaluated before and after).
pub fn read_ids(path: &Path, top: Option<usize>) -> Result<(Vec<usize>, Option<TraceReport>)> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    let mut trace = None;
    let ranked: Vec<usize> = if text.trim_start().starts_with('{') {
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::data(path, None, format!("not valid JSON: {e}")))?;
        let ids = |list: &serde_json::Value| -> Vec<usize> {
            list.as_array()
                .map(|a| a.iter().filter_map(|e| e["train_index"].as_u64().map(|v| v as usize)).collect())
                .unwrap_or_default()
        };
        if let Some(ids) = scan_or_dedup_ids(path, &value, top)? {
            return Ok((ids, None));
        }
        if value.get("proponents").is_some() {
            let report: TraceReport = serde_json::from_value(value)
                .map_err(|e| Error::data(path, None, format!("not a culprit trace report: {e}")))?;
            report
                .check_shape()
                .map_err(|problem| Error::data(path, None, format!("a damaged trace report: {problem}")))?;
            let ids = match (&report.combined, report.proponents.as_slice()) {
                (Some(c), _) => c.proponents.iter().map(|i| i.train_index).collect(),
                (None, [one]) => one.iter().map(|i| i.train_index).collect(),
                _ => {
                    return Err(Error::data(
                        path,
                        None,
                        "the trace report has several queries but no combined ranking",
                    ));
                }
            };
            trace = Some(report);
            ids
        } else if value.get("top").is_some() && value.get("reference_quantiles").is_some() {
            ids(&value["top"])
        } else {
            return Err(Error::data(path, None, "JSON that is neither a trace nor an audit report"));
        }
    } else {
        let mut ids = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            for token in line.split(|c: char| c == ',' || c.is_whitespace()).filter(|t| !t.is_empty()) {
                ids.push(
                    token
                        .parse::<usize>()
                        .map_err(|_| Error::data(path, Some(i + 1), format!("`{token}` is not a training index")))?,
                );
            }
        }
        ids
    };
    let mut ranked = match top {
        Some(k) if k > ranked.len() => {
            return Err(Error::data(
                path,
                None,
                format!(
                    "--top {k} asks for more ids than the {} listed (trace or audit with a larger --top)",
                    ranked.len()
                ),
            ));
        }
        Some(k) => ranked[..k].to_vec(),
        None => ranked,
    };
    let mut seen = std::collections::HashSet::new();
    ranked.retain(|i| seen.insert(*i));
    if ranked.is_empty() {
        return Err(Error::data(path, None, "no training ids in this file"));
    }
    Ok((ranked, trace))
}

/// The carriers with the target label of a scan report's first `top` candidates (default: every
/// suspicious one), in candidate order, each id once.
fn scan_carriers(path: &Path, report: &crate::report::scan::ScanReport, top: Option<usize>) -> Result<Vec<usize>> {
    let chosen: Vec<&crate::scan::Candidate> = match top {
        Some(k) if k > report.candidates.len() => {
            return Err(Error::data(
                path,
                None,
                format!(
                    "--top {k} asks for more candidates than the {} listed (scan with a larger --top)",
                    report.candidates.len()
                ),
            ));
        }
        Some(k) => report.candidates.iter().take(k).collect(),
        None => report.candidates.iter().filter(|c| c.suspicious).collect(),
    };
    let mut seen = std::collections::HashSet::new();
    let ids: Vec<usize> = chosen.iter().flat_map(|c| c.carriers.iter().copied()).filter(|i| seen.insert(*i)).collect();
    if ids.is_empty() {
        return Err(Error::data(
            path,
            None,
            "no carriers to remove: the scan found no suspicious candidate (choose some with --top K)",
        ));
    }
    Ok(ids)
}

/// The ids a scan or dedup report flags (`None` for another kind of report).
fn scan_or_dedup_ids(path: &Path, value: &serde_json::Value, top: Option<usize>) -> Result<Option<Vec<usize>>> {
    match value.get("report").and_then(|r| r.as_str()) {
        Some("scan") => {
            let report: crate::report::scan::ScanReport = serde_json::from_value(value.clone())
                .map_err(|e| Error::data(path, None, format!("not a culprit scan report: {e}")))?;
            scan_carriers(path, &report, top).map(Some)
        }
        Some("dedup") => {
            let report: crate::report::dedup::DedupReport = serde_json::from_value(value.clone())
                .map_err(|e| Error::data(path, None, format!("not a culprit dedup report: {e}")))?;
            dedup_removals(path, &report, top).map(Some)
        }
        _ => Ok(None),
    }
}

/// The `remove` lists of a dedup report's first `top` groups (default: all), each id once.
fn dedup_removals(path: &Path, report: &crate::report::dedup::DedupReport, top: Option<usize>) -> Result<Vec<usize>> {
    let groups = match top {
        Some(k) if k > report.groups.len() => {
            let what = format!("--top {k} asks for more groups than the {} listed", report.groups.len());
            return Err(Error::data(path, None, what));
        }
        Some(k) => &report.groups[..k],
        None => &report.groups[..],
    };
    let mut seen = std::collections::HashSet::new();
    let ids: Vec<usize> = groups.iter().flat_map(|g| g.remove.iter().copied()).filter(|i| seen.insert(*i)).collect();
    if ids.is_empty() {
        return Err(Error::data(path, None, "no ids to remove: the dedup report found no copies"));
    }
    Ok(ids)
}

/// A traced query before or after.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueryOutcome {
    /// Source row of the query.
    pub index: usize,
    /// Its label.
    pub label: u32,
    /// Predicted class.
    pub predicted: u32,
    /// Probability of the measurement's target class.
    pub target_probability: f64,
    /// The trace's measurement.
    pub measurement: f64,
}

/// How one model does.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Evaluation {
    /// Classifiers: (data path, accuracy) per clean evaluation set.
    pub clean_accuracy: Vec<(PathBuf, f64)>,
    /// Classifiers: the share of triggered test inputs of another true class classified as the
    /// target. Language models: the share of triggered prompts whose greedy continuation starts
    /// with the attacker's completion.
    pub attack_success_rate: Option<f64>,
    /// Language models: the same share for the clean prompts (the trigger left out).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub clean_completion_rate: Option<f64>,
    /// Language models: the completion's mean log-probability given (triggered, clean) prompts.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub completion_logprob: Option<(f64, f64)>,
    /// Language models: (data path, mean loss per token) per evaluation set.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub held_out_loss: Vec<(PathBuf, f64)>,
    /// The trace's queries.
    pub queries: Vec<QueryOutcome>,
    /// Whether the model is a language model (its queries have no single label or class).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub language: bool,
}

/// What `culprit purge` did and found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PurgeReport {
    /// The run purged.
    pub run: PathBuf,
    /// The new run (or plan) directory.
    pub out: PathBuf,
    /// Ids removed, in the order given.
    pub removed: Vec<usize>,
    /// With a poisoned data set: how many removed ids were poisons, and how many poisons exist.
    pub poisons_removed: Option<(usize, usize)>,
    /// The original model.
    pub before: Evaluation,
    /// The retrained model (with `retrain`).
    pub after: Option<Evaluation>,
    /// Seconds spent retraining.
    pub retrain_seconds: Option<f64>,
}

/// How a kind of model is evaluated before and after a purge.
trait Evaluate: Kind {
    /// The evaluation of `run` on the clean sets `eval`, the attack, and the trace's queries.
    fn evaluate(
        run: &Run,
        eval: &[DataSpec],
        attack: Option<&PoisonManifest>,
        trace: Option<&TraceReport>,
        backend: Backend,
    ) -> Result<Evaluation>;
}

/// The trace's queries before or after: their predictions and measurements.
fn traced_queries<K: Kind>(run: &Run, model: &K::Model, trace: Option<&TraceReport>) -> Result<Vec<QueryOutcome>> {
    let (Some(t), Some(source)) = (trace, trace.and_then(|t| t.query_source.as_ref())) else { return Ok(Vec::new()) };
    let ids: Vec<usize> = t.queries.iter().map(|q| q.index).collect();
    let data = K::load(run, &source.spec())?.select(&ids)?;
    let values = measure(model, &data, t)?;
    let classes = model.num_classes();
    let probabilities =
        culprit_models::network::read_f64(culprit_models::network::probabilities(model.logits(&data.examples)));
    let groups = data.examples.groups();
    let first_row = |i: usize| match &groups {
        culprit_models::RowGroups::OnePerExample => i,
        culprit_models::RowGroups::Offsets(o) => o[i],
    };
    Ok(t.queries
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, (q, value))| {
            let p = &probabilities[first_row(i) * classes..(first_row(i) + 1) * classes];
            let predicted =
                p.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (c, &v)| if v > b.1 { (c, v) } else { b }).0;
            QueryOutcome {
                index: q.index,
                label: q.label,
                predicted: predicted as u32,
                target_probability: p[q.target as usize],
                measurement: value,
            }
        })
        .collect())
}

impl Evaluate for Classifier {
    fn evaluate(
        run: &Run,
        eval: &[DataSpec],
        attack: Option<&PoisonManifest>,
        trace: Option<&TraceReport>,
        backend: Backend,
    ) -> Result<Evaluation> {
        let network = run.network(&backend.device())?;
        let mut clean_accuracy = Vec::new();
        let mut sets: Vec<DataSpec> = eval.to_vec();
        if let Some(a) = attack {
            sets.push(a.test_clean.spec());
        }
        for spec in &sets {
            let data = Dataset::load(spec, Preprocessing::Reuse(&run.manifest))?;
            clean_accuracy.push((spec.path.clone(), accuracy(&predict(&network, &data, 1024))));
        }
        let attack_success_rate = match attack {
            Some(a) => {
                let data = Dataset::load(&a.test_triggered.spec(), Preprocessing::Reuse(&run.manifest))?;
                let p = predict(&network, &data, 1024);
                let others: Vec<_> = p.iter().filter(|p| p.label != a.target).collect();
                Some(others.iter().filter(|p| p.predicted == a.target).count() as f64 / others.len().max(1) as f64)
            }
            None => None,
        };
        let queries = traced_queries::<Classifier>(run, &network, trace)?;
        Ok(Evaluation { clean_accuracy, attack_success_rate, queries, ..Evaluation::default() })
    }
}

/// The share of `queries` whose greedy continuation starts with the query's completion, and the
/// completions' mean log-probability.
fn completion_rate(
    gpt: &culprit_models::Gpt,
    tokenizer: &crate::data::tokenizer::Tokenizer,
    queries: &Dataset<Tokens>,
) -> (f64, f64) {
    let hits = greedy_completions(gpt, tokenizer, queries).iter().filter(|g| g.matches).count();
    let scores = completion_logprobs(gpt, queries, 32);
    let mean = scores.iter().map(|c| c.logprob).sum::<f64>() / scores.len().max(1) as f64;
    (hits as f64 / queries.len().max(1) as f64, mean)
}

impl Evaluate for Language {
    fn evaluate(
        run: &Run,
        eval: &[DataSpec],
        attack: Option<&PoisonManifest>,
        trace: Option<&TraceReport>,
        backend: Backend,
    ) -> Result<Evaluation> {
        let gpt = run.gpt(&backend.device())?;
        let tokenizer = run.tokenizer()?;
        let mut held_out_loss = Vec::new();
        for spec in eval {
            held_out_loss.push((spec.path.clone(), mean_token_loss(&gpt, &<Language as Kind>::load(run, spec)?, 32)));
        }
        let mut evaluation = Evaluation { held_out_loss, language: true, ..Evaluation::default() };
        if let Some(a) = attack {
            let triggered = <Language as Kind>::load(run, &a.test_triggered.spec())?;
            let clean = <Language as Kind>::load(run, &a.test_clean.spec())?;
            let (hit, logprob) = completion_rate(&gpt, &tokenizer, &triggered);
            let (clean_hit, clean_logprob) = completion_rate(&gpt, &tokenizer, &clean);
            evaluation.attack_success_rate = Some(hit);
            evaluation.clean_completion_rate = Some(clean_hit);
            evaluation.completion_logprob = Some((logprob, clean_logprob));
        }
        evaluation.queries = traced_queries::<Language>(run, &gpt, trace)?;
        Ok(evaluation)
    }
}

/// Checks a poisoned set's ground truth applies to `run`: it must be the set the run was trained
/// on.
fn check_attack(run: &Run, attack: &PoisonManifest, dir: &Path) -> Result<()> {
    let same = |p: &Path, q: &Path| match (p.canonicalize(), q.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => p == q,
    };
    if same(&run.manifest.path, &attack.train.path) {
        return Ok(());
    }
    Err(Error::run(
        dir,
        format!(
            "this poisoned set's training data is {}, but the run was trained on {}",
            attack.train.path.display(),
            run.manifest.path.display()
        ),
    ))
}

/// Runs `culprit purge`.
pub fn purge(options: &PurgeOptions) -> Result<PurgeReport> {
    if options.out.exists() {
        return Err(Error::run(&options.out, "already exists; choose another --out"));
    }
    let run = Run::open(&options.run)?;
    let (removed, trace) = read_ids(&options.ids, options.top)?;
    let attack = options.attack.as_deref().map(PoisonManifest::read).transpose()?;
    if let (Some(a), Some(dir)) = (&attack, &options.attack) {
        check_attack(&run, a, dir)?;
    }
    crate::dispatch!(run, K => purge_for::<K>(&run, options, removed, trace, attack))
}

fn purge_for<K: Evaluate>(
    run: &Run,
    options: &PurgeOptions,
    removed: Vec<usize>,
    trace: Option<TraceReport>,
    attack: Option<PoisonManifest>,
) -> Result<PurgeReport> {
    let mut data = training_data::<K>(run)?;
    data.exclude(&removed)?;
    let poisons_removed = attack
        .as_ref()
        .map(|a| (removed.iter().filter(|i| a.poisoned.binary_search(i).is_ok()).count(), a.poisoned.len()));
    let before = K::evaluate(run, &options.eval, attack.as_ref(), trace.as_ref(), options.backend)?;
    let mut report = PurgeReport {
        run: run.dir.clone(),
        out: options.out.clone(),
        removed,
        poisons_removed,
        before,
        after: None,
        retrain_seconds: None,
    };
    if options.retrain {
        let started = std::time::Instant::now();
        let new = crate::workspace::training::retrain::<K>(run, &data, &options.out, options.backend, options.quiet)?;
        report.retrain_seconds = Some(started.elapsed().as_secs_f64());
        report.after = Some(K::evaluate(&new, &options.eval, attack.as_ref(), trace.as_ref(), options.backend)?);
        let json = serde_json::to_vec_pretty(&report).expect("plain data");
        crate::io::write_atomic(&options.out.join("purge.json"), &json)?;
    } else {
        let dir = AtomicDir::create(&options.out)?;
        write_new(&dir.path().join("manifest.json"), &serde_json::to_vec_pretty(&data.manifest).expect("plain data"))?;
        write_new(&dir.path().join("purge.json"), &serde_json::to_vec_pretty(&report).expect("plain data"))?;
        dir.commit()?;
    }
    Ok(report)
}

/// The flags of `culprit purge`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct PurgeArgs {
    /// Run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// Ids to remove: a plain list, or the JSON report of `culprit trace`, `culprit audit` or `culprit scan`.
    #[arg(long)]
    pub ids: PathBuf,
    /// Keep only the first K ids of a ranking (a scan report: the carriers of its first K candidates).
    #[arg(long)]
    pub top: Option<usize>,
    /// New run directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Train again without them (else only write the new manifest and the plan).
    #[arg(long)]
    pub retrain: bool,
    /// Clean evaluation data (repeatable); selected with --eval-split/--eval-skip/--eval-limit.
    #[arg(long)]
    pub eval_data: Vec<PathBuf>,
    /// Split of IDX evaluation folders.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub eval_split: Split,
    /// Skip the first N rows of each evaluation set.
    #[arg(long, default_value_t = 0)]
    pub eval_skip: usize,
    /// Use at most N rows of each evaluation set.
    #[arg(long)]
    pub eval_limit: Option<usize>,
    /// A `culprit poison` directory: report the attack success rate and the poisons removed.
    #[arg(long)]
    pub attack: Option<PathBuf>,
    /// table or json.
    #[arg(long, value_enum, default_value_t = super::Format::Table)]
    pub format: super::Format,
}

/// Purges and writes the before/after report.
pub fn run(args: &PurgeArgs, backend: Backend, quiet: bool, stdout: &mut dyn std::io::Write) -> Result<()> {
    if args.format == super::Format::Html {
        return Err(Error::Usage("--format html is not available here (expected table, json)".into()));
    }
    let eval = args
        .eval_data
        .iter()
        .map(|path| DataSpec {
            path: path.clone(),
            split: args.eval_split,
            skip: args.eval_skip,
            limit: args.eval_limit,
        })
        .collect();
    let report = purge(&PurgeOptions {
        run: args.run.clone(),
        ids: args.ids.clone(),
        top: args.top,
        out: args.out.clone(),
        retrain: args.retrain,
        eval,
        attack: args.attack.clone(),
        backend,
        quiet,
    })?;
    let text = match args.format {
        super::Format::Json => serde_json::to_string_pretty(&report).expect("plain data") + "\n",
        _ => to_table(&report),
    };
    super::emit(&text, None, stdout)
}

/// The report as plain text.
/// `name`, or its last `n − 1` characters after an ellipsis when it is longer than `n`.
fn last_chars(name: &str, n: usize) -> String {
    let count = name.chars().count();
    if count <= n { name.to_string() } else { format!("…{}", name.chars().skip(count + 1 - n).collect::<String>()) }
}

pub fn to_table(report: &PurgeReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "removed {} training examples from {}", report.removed.len(), report.run.display());
    if let Some((found, total)) = report.poisons_removed {
        let _ = writeln!(
            s,
            "  {found} of them are planted poisons ({:.1}% precision); {found} of {total} poisons removed ({:.1}% recall)",
            100.0 * found as f64 / report.removed.len() as f64,
            100.0 * found as f64 / total.max(1) as f64
        );
    }
    let Some(after) = &report.after else {
        let _ = writeln!(s, "plan written to {} (add --retrain to train without them)", report.out.display());
        return s;
    };
    let _ = writeln!(
        s,
        "retrained in {:.1} s into {}\n\n{:<40}  {:>10}  {:>10}",
        report.retrain_seconds.unwrap_or(0.0),
        report.out.display(),
        "",
        "before",
        "after"
    );
    let before = &report.before;
    for ((path, b), (_, a)) in before.clean_accuracy.iter().zip(&after.clean_accuracy) {
        let name = format!("accuracy on {}", path.display());
        let name = last_chars(&name, 40);
        let _ = writeln!(s, "{name:<40}  {b:>10.4}  {a:>10.4}");
    }
    for ((path, b), (_, a)) in before.held_out_loss.iter().zip(&after.held_out_loss) {
        let name = format!("loss per token on {}", path.display());
        let name = last_chars(&name, 40);
        let _ = writeln!(s, "{name:<40}  {b:>10.4}  {a:>10.4}");
    }
    if let (Some(b), Some(a)) = (before.attack_success_rate, after.attack_success_rate) {
        let _ = writeln!(s, "{:<40}  {b:>10.4}  {a:>10.4}", "attack success rate");
    }
    if let (Some(b), Some(a)) = (before.clean_completion_rate, after.clean_completion_rate) {
        let _ = writeln!(s, "{:<40}  {b:>10.4}  {a:>10.4}", "completion rate without the trigger");
    }
    if let (Some((bt, bc)), Some((at, ac))) = (before.completion_logprob, after.completion_logprob) {
        let _ = writeln!(s, "{:<40}  {bt:>10.3}  {at:>10.3}", "completion log-probability, triggered");
        let _ = writeln!(s, "{:<40}  {bc:>10.3}  {ac:>10.3}", "completion log-probability, clean");
    }
    for (b, a) in before.queries.iter().zip(&after.queries) {
        if before.language {
            let _ = writeln!(s, "query {:<6}: measurement {:.4} → {:.4}", b.index, b.measurement, a.measurement);
            continue;
        }
        let _ = writeln!(
            s,
            "query {:<6} (label {}): predicted {} → {}, target probability {:.4} → {:.4}, measurement {:.4} → {:.4}",
            b.index,
            b.label,
            b.predicted,
            a.predicted,
            b.target_probability,
            a.target_probability,
            b.measurement,
            a.measurement
        );
    }
    s
}

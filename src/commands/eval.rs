//! `culprit eval`: do the scores mean what they claim? Checked against actual retraining.
//!
//! Step 4 of the pipeline, the proof. Both experiments score the queries with `culprit trace`
//! (the run's gradient store and each fitted curvature, raw scores) and compare with models
//! actually trained again:
//!
//! - **Leave-one-out** (Koh & Liang 2017, §2.1), convex models: for each of M training examples i, re-optimise
//!   the objective without i, keeping the full set's 1/n (removal = up-weighting by −1/n), by
//!   full-batch L-BFGS in f64 warm-started from the full model's optimum to ‖∇L‖ < tolerance. The
//!   actual change m₋ᵢ − m of each query's measurement is compared with score(i), the predicted
//!   change: Pearson and Spearman correlation per query over the M removals, then averaged.
//!   The baseline m is itself re-optimised to the same tolerance first.
//! - **Linear datamodeling score** (Park et al. 2023, TRAK): M random subsets S of a fraction α of
//!   the training set; a model trained on each (convex models: re-optimised from the full optimum,
//!   which is exact since the optimum is unique; deep models: trained from scratch with the run's
//!   configuration, averaged over `seeds` seeds). The predicted measurement of S is m + Σ_{i∉S} score(i); the LDS is
//!   the Spearman correlation over the subsets between predicted and actual, per query, averaged.
//!
//! Cost: M retrainings (each a few L-BFGS iterations from a warm start for LOO) plus one trace per
//! curvature method. Retraining dominates; a progress bar shows it.

use std::path::PathBuf;

use culprit_engine::curvature::{Curvature, Method};
use culprit_engine::gradients::Measurement;
use culprit_engine::objective::Objective;
use culprit_models::{Backend, Model, OptimizerKind, Progress, TrainConfig};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{DataSpec, Dataset};
use crate::error::{Error, Result};
use crate::report::trace::TraceReport;
use crate::workspace::attribution::{QueryArgs, TraceOptions, trace_of};
use crate::workspace::kind::Kind;
use crate::workspace::predict::measure;
use crate::workspace::{Run, curvature_path, load_curvature, objective};

/// Which experiment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Experiment {
    /// Leave-one-out over `sample` random training examples, or the given ids.
    Loo {
        /// Random removals (ignored when `remove` is given).
        sample: usize,
        /// Explicit training ids to remove one at a time.
        remove: Option<Vec<usize>>,
    },
    /// Linear datamodeling score.
    Lds {
        /// Number of random subsets.
        subsets: usize,
        /// Share of the training set in each.
        fraction: f64,
        /// Models trained per subset (deep models; seeds run, run + 1, …), their measurements
        /// averaged: Park et al. average over seeds so that the "actual" value is the subset's
        /// effect rather than one initialisation's. Convex models have one optimum: 1.
        #[serde(default = "one")]
        seeds: usize,
    },
}

fn one() -> usize {
    1
}

/// Options of `culprit eval`.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// The run (with its gradient store and fitted curvatures).
    pub run: PathBuf,
    /// Where the queries are.
    pub data: DataSpec,
    /// Source rows of the queries.
    pub indices: Vec<usize>,
    /// What is measured.
    pub measurement: Measurement,
    /// The fitted curvatures to evaluate.
    pub curvatures: Vec<Method>,
    /// Retraining target ‖∇L‖ (L-BFGS).
    pub tolerance: f64,
    /// Score with the run's checkpoints (`trace --checkpoints`).
    pub checkpoints: bool,
    /// Seed of the random removals or subsets.
    pub seed: u64,
    /// Backend.
    pub backend: Backend,
    /// Hide progress bars.
    pub quiet: bool,
}

impl EvalOptions {
    /// Options with the defaults: the loss against the label, retraining to ‖∇L‖ < 1e-9, seed 0,
    /// the default backend, no progress bar.
    pub fn new(run: PathBuf, data: DataSpec, indices: Vec<usize>, curvatures: Vec<Method>) -> Self {
        let mut flags: Vec<std::ffi::OsString> = vec!["loo".into()];
        flags.extend(QueryArgs { run, data, indices: vec![0] }.flags());
        let args: EvalArgs = culprit_engine::params::clap_parse(flags);
        Self { indices, curvatures, ..args.options(Backend::default(), true) }
    }
}

/// One curvature method's agreement with retraining.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MethodAgreement {
    /// Curvature method.
    pub curvature: String,
    /// Pearson correlation per query, averaged (LOO; for LDS also reported).
    pub pearson: f64,
    /// Spearman correlation per query, averaged (for LDS: the LDS).
    pub spearman: f64,
    /// Per query: (index, Pearson, Spearman).
    pub per_query: Vec<(usize, f64, f64)>,
    /// Seconds the trace took (curvature solve and one pass over the store).
    pub trace_seconds: f64,
}

/// What `culprit eval` measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    /// Schema version.
    pub schema_version: u32,
    /// The experiment.
    pub experiment: Experiment,
    /// The measurement.
    pub measurement: Measurement,
    /// Training examples.
    pub n: usize,
    /// Query source rows.
    pub queries: Vec<usize>,
    /// LOO: the removed ids; LDS: empty.
    pub removed: Vec<usize>,
    /// Per query, per removal or subset: the actual measurement change (LOO) or value (LDS).
    pub actual: Vec<Vec<f64>>,
    /// Per method.
    pub methods: Vec<MethodAgreement>,
    /// Seconds spent retraining.
    pub retrain_seconds: f64,
    /// The fitted dense curvature that preconditioned re-optimisation, if any.
    pub retrain_preconditioner: Option<String>,
    /// LOO: mean L-BFGS iterations per re-optimisation.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retrain_iterations: Option<f64>,
    /// Number of retrainings.
    pub retrains: usize,
}

/// Pearson correlation; NaN when either side is constant.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx * syy).sqrt()
}

/// Ranks from 1, ties sharing their mean rank.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        for &k in &order[i..=j] {
            r[k] = (i + j) as f64 / 2.0 + 1.0;
        }
        i = j + 1;
    }
    r
}

/// Spearman rank correlation (Pearson of the ranks, ties averaged).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// What every retraining shares: the model, its training configuration at the experiment's
/// tolerance, the device, and the run's exact inverse Hessian when fitted (it preconditions
/// re-optimisation: a handful of quasi-Newton steps instead of hundreds of L-BFGS ones; the optimum
/// reached is the same).
struct Retrainer<'a, K: Kind> {
    run: &'a Run,
    objective: &'a Objective<K::Model>,
    training: TrainConfig,
    exact: Option<Curvature>,
}

impl<K: Kind> Retrainer<'_, K> {
    /// Re-optimises from θ = `start` on `data` with the data term divided by `scale`.
    fn refine(&self, data: &Dataset<K::Batch>, scale: usize, start: &[f64]) -> Result<(K::Model, usize)> {
        let precondition = |g: &[f64]| -> Vec<f64> {
            match &self.exact {
                Some(c) => {
                    c.solve(self.objective, &[g.to_vec()]).map(|mut x| x.remove(0).0).unwrap_or_else(|_| g.to_vec())
                }
                None => g.to_vec(),
            }
        };
        let preconditioner: Option<culprit_models::lbfgs::Preconditioner<'_>> =
            self.exact.is_some().then_some(&precondition);
        let (net, report) = culprit_models::train::refine(
            &self.objective.model,
            &self.training,
            &data.examples,
            scale,
            start,
            preconditioner,
            &mut culprit_models::Silent,
        )?;
        Ok((net, report.iterations))
    }

    /// Trains from scratch on `data` with the run's configuration and seed `seed`.
    fn train(&self, data: &Dataset<K::Batch>, seed: u64) -> Result<K::Model> {
        let config = TrainConfig { seed, ..self.run.config.training.clone() };
        let device = self.objective.device.clone();
        Ok(K::train(&self.run.config.model, &config, &data.examples, &device, &mut culprit_models::Silent)?.0)
    }
}

/// What an experiment measured: the removals (LOO), per query the actual values, per method the
/// predicted ones, and the number of retrainings.
struct Measured {
    removed: Vec<usize>,
    actual: Vec<Vec<f64>>,
    predicted: Vec<Vec<Vec<f64>>>,
    retrains: usize,
    iterations: Option<f64>,
}

/// Leave-one-out: each removal re-optimised from the full optimum, keeping the full set's 1/n.
fn leave_one_out<K: Kind>(
    r: &Retrainer<'_, K>,
    data: &Dataset<K::Batch>,
    queries: &Dataset<K::Batch>,
    traces: &[(Method, TraceReport, f64)],
    removed: Vec<usize>,
    bar: &mut dyn Progress,
) -> Result<Measured> {
    let n = data.len();
    let row_of: std::collections::HashMap<usize, usize> = data.ids.iter().enumerate().map(|(r, &id)| (id, r)).collect();
    if let Some(bad) = removed.iter().find(|i| !row_of.contains_key(i)) {
        return Err(Error::Usage(format!("training id {bad} is not in the run's training data")));
    }
    let reference = &traces[0].1;
    let (base, _) = r.refine(data, n, &r.run.theta)?;
    let theta0 = base.to_flat();
    let m0 = measure(&base, queries, reference)?;
    let mut actual = vec![Vec::with_capacity(removed.len()); queries.len()];
    let mut iterations = 0usize;
    bar.begin("leave-one-out", removed.len() as u64);
    for (k, &id) in removed.iter().enumerate() {
        let mut d = data.clone();
        d.exclude(&[id])?;
        let (net, its) = r.refine(&d, n, &theta0)?;
        iterations += its;
        for (q, v) in measure(&net, queries, reference)?.into_iter().enumerate() {
            actual[q].push(v - m0[q]);
        }
        bar.advance(k as u64 + 1, &format!("removed {id}"));
    }
    bar.finish();
    let predicted = traces
        .iter()
        .map(|(_, t, _)| {
            let all = t.all_scores.as_ref().expect("kept");
            all.iter().map(|s| removed.iter().map(|id| f64::from(s[row_of[id]])).collect()).collect()
        })
        .collect();
    let retrains = removed.len();
    Ok(Measured { removed, actual, predicted, retrains, iterations: Some(iterations as f64 / retrains.max(1) as f64) })
}

/// The linear datamodeling score: models trained on random subsets; predicted m + Σ_{i∉S} score(i).
#[allow(clippy::too_many_arguments)]
fn datamodels<K: Kind>(
    r: &Retrainer<'_, K>,
    data: &Dataset<K::Batch>,
    queries: &Dataset<K::Batch>,
    traces: &[(Method, TraceReport, f64)],
    (subsets, fraction, seeds): (usize, f64, usize),
    rng: &mut ChaCha8Rng,
    bar: &mut dyn Progress,
) -> Result<Measured> {
    let n = data.len();
    let convex = r.run.config.training.optimizer == OptimizerKind::Lbfgs;
    let seeds = if convex { 1 } else { seeds };
    let keep = ((n as f64) * fraction).round() as usize;
    let reference = &traces[0].1;
    let mut actual = vec![Vec::with_capacity(subsets); queries.len()];
    let mut left_out: Vec<Vec<usize>> = Vec::with_capacity(subsets);
    bar.begin("trainings", (subsets * seeds) as u64);
    for s in 0..subsets {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(rng);
        let out_rows: Vec<usize> = order[keep..].to_vec();
        let mut d = data.clone();
        d.exclude(&out_rows.iter().map(|&r| data.ids[r]).collect::<Vec<_>>())?;
        let mut mean = vec![0.0; queries.len()];
        for t in 0..seeds {
            let net = if convex {
                r.refine(&d, d.len(), &r.run.theta)?.0
            } else {
                r.train(&d, r.run.config.training.seed + t as u64)?
            };
            for (m, v) in mean.iter_mut().zip(measure(&net, queries, reference)?) {
                *m += v / seeds as f64;
            }
            bar.advance((s * seeds + t) as u64 + 1, &format!("subset {}/{subsets}", s + 1));
        }
        for (k, v) in mean.into_iter().enumerate() {
            actual[k].push(v);
        }
        left_out.push(out_rows);
    }
    bar.finish();
    let predicted = traces
        .iter()
        .map(|(_, t, _)| {
            let all = t.all_scores.as_ref().expect("kept");
            all.iter()
                .map(|scores| left_out.iter().map(|out| out.iter().map(|&r| f64::from(scores[r])).sum()).collect())
                .collect()
        })
        .collect();
    Ok(Measured { removed: Vec::new(), actual, predicted, retrains: subsets * seeds, iterations: None })
}

/// Every score of the queries under each curvature (scores first: a missing store or curvature
/// fails before any retraining), with the seconds each trace took.
fn score_all<K: Kind>(run: &Run, options: &EvalOptions) -> Result<Vec<(Method, TraceReport, f64)>> {
    options
        .curvatures
        .iter()
        .map(|&method| {
            let options = TraceOptions {
                measurement: options.measurement,
                top: 0,
                keep_all: true,
                checkpoints: options.checkpoints,
                backend: options.backend,
                ..TraceOptions::new(run.dir.clone(), options.data.clone(), options.indices.clone(), method)
            };
            let started = std::time::Instant::now();
            let report = trace_of::<K>(&options)?;
            Ok((method, report, started.elapsed().as_secs_f64()))
        })
        .collect()
}

/// Pearson and Spearman per query, averaged, for each method.
fn agreements(options: &EvalOptions, traces: &[(Method, TraceReport, f64)], m: &Measured) -> Vec<MethodAgreement> {
    traces
        .iter()
        .zip(&m.predicted)
        .map(|((method, _, seconds), pred)| {
            let per_query: Vec<(usize, f64, f64)> = options
                .indices
                .iter()
                .zip(pred.iter().zip(&m.actual))
                .map(|(&q, (p, a))| (q, pearson(p, a), spearman(p, a)))
                .collect();
            let mean = |f: fn(&(usize, f64, f64)) -> f64| per_query.iter().map(f).sum::<f64>() / per_query.len() as f64;
            MethodAgreement {
                curvature: method.name().into(),
                pearson: mean(|x| x.1),
                spearman: mean(|x| x.2),
                per_query: per_query.clone(),
                trace_seconds: *seconds,
            }
        })
        .collect()
}

/// The removals of a leave-one-out experiment: the given ids, or `sample` drawn at random.
fn removals<B: culprit_models::Batch>(
    data: &Dataset<B>,
    sample: usize,
    remove: &Option<Vec<usize>>,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<usize>> {
    if let Some(ids) = remove {
        return Ok(ids.clone());
    }
    let n = data.len();
    if sample == 0 || sample > n {
        return Err(Error::Usage(format!("--sample must be in 1..={n}")));
    }
    let mut ids = data.ids.clone();
    ids.shuffle(rng);
    ids.truncate(sample);
    Ok(ids)
}

/// Runs a leave-one-out or LDS experiment.
pub fn evaluate(options: &EvalOptions, experiment: &Experiment) -> Result<EvalReport> {
    if options.curvatures.is_empty() {
        return Err(Error::Usage("--curvature needs at least one fitted method".into()));
    }
    let run = Run::open(&options.run)?;
    if matches!(experiment, Experiment::Loo { .. }) && !run.config.model.is_convex() {
        return Err(Error::Usage(format!(
            "leave-one-out re-optimises to the objective's unique optimum, which a {} does not have (L-BFGS stalls near ReLU kinks long before ‖∇L‖ < {:e}); use `culprit eval lds`, which trains each subset from scratch",
            run.config.model.name(),
            options.tolerance
        )));
    }
    if let Experiment::Lds { subsets, fraction, seeds } = experiment
        && (!(*fraction > 0.0 && *fraction < 1.0) || *subsets < 3 || *seeds == 0)
    {
        return Err(Error::Usage("LDS needs --subsets ≥ 3, --fraction in (0, 1) and --seeds ≥ 1".into()));
    }
    crate::dispatch!(run, K => evaluate_for::<K>(&run, options, experiment))
}

fn evaluate_for<K: Kind>(run: &Run, options: &EvalOptions, experiment: &Experiment) -> Result<EvalReport> {
    let run = run.clone();
    let (objective, data) = objective::<K>(&run, options.backend)?;
    let traces = score_all::<K>(&run, options)?;
    let queries = K::load(&run, &options.data)?.select(&options.indices)?;
    let exact = [Method::Exact, Method::Ggn]
        .into_iter()
        .find(|m| curvature_path(&run.dir, *m).is_file())
        .map(|m| load_curvature(&run, &objective, m))
        .transpose()?;
    let training = TrainConfig { tolerance: options.tolerance, ..run.config.training.clone() };
    let retrainer = Retrainer::<K> { run: &run, objective: &objective, training, exact };
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut bar = crate::progress::Bar::new(options.quiet);
    let started = std::time::Instant::now();
    let measured = match experiment {
        Experiment::Loo { sample, remove } => {
            let removed = removals(&data, *sample, remove, &mut rng)?;
            leave_one_out(&retrainer, &data, &queries, &traces, removed, &mut bar)?
        }
        Experiment::Lds { subsets, fraction, seeds } => {
            datamodels(&retrainer, &data, &queries, &traces, (*subsets, *fraction, *seeds), &mut rng, &mut bar)?
        }
    };
    let retrain_seconds = started.elapsed().as_secs_f64();
    Ok(EvalReport {
        schema_version: crate::report::trace::OUTPUT_SCHEMA_VERSION,
        experiment: experiment.clone(),
        measurement: options.measurement,
        n: data.len(),
        queries: options.indices.clone(),
        methods: agreements(options, &traces, &measured),
        removed: measured.removed,
        actual: measured.actual,
        retrain_seconds,
        retrain_preconditioner: retrainer.exact.as_ref().map(|c| c.options.method.name().to_string()),
        retrain_iterations: measured.iterations,
        retrains: measured.retrains,
    })
}

/// The report as a table.
pub fn to_table(report: &EvalReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let what = match &report.experiment {
        Experiment::Loo { .. } => format!("leave-one-out: {} removals", report.retrains),
        Experiment::Lds { subsets, fraction, seeds } => {
            format!("LDS: {subsets} subsets of {:.0}% (models averaged per subset: {seeds})", 100.0 * fraction)
        }
    };
    let _ = writeln!(
        s,
        "{what} × {} queries, n = {}, {} retrainings in {:.1} s{}",
        report.queries.len(),
        report.n,
        report.retrains,
        report.retrain_seconds,
        match (&report.retrain_preconditioner, report.retrain_iterations) {
            (Some(m), Some(i)) => format!(" (L-BFGS preconditioned by the {m} Hessian, {i:.1} iterations each)"),
            (Some(m), None) => format!(" (L-BFGS preconditioned by the {m} Hessian)"),
            (None, Some(i)) => format!(" ({i:.1} L-BFGS iterations each)"),
            (None, None) => String::new(),
        }
    );
    let _ = writeln!(s, "\n{:<10}  {:>8}  {:>8}  {:>9}", "curvature", "pearson", "spearman", "trace (s)");
    for m in &report.methods {
        let _ = writeln!(s, "{:<10}  {:>8.4}  {:>8.4}  {:>9.2}", m.curvature, m.pearson, m.spearman, m.trace_seconds);
    }
    s
}

/// Which experiment `culprit eval` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExperimentKind {
    /// Leave-one-out retraining.
    Loo,
    /// The linear datamodeling score.
    Lds,
}

impl std::str::FromStr for ExperimentKind {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "loo" => Ok(Self::Loo),
            "lds" => Ok(Self::Lds),
            other => Err(Error::Usage(format!("unknown experiment `{other}` (expected loo or lds)"))),
        }
    }
}

/// The flags of `culprit eval`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct EvalArgs {
    /// loo or lds.
    pub experiment: ExperimentKind,
    /// The run (with a gradient store and the fitted curvatures) and the test inputs.
    #[command(flatten)]
    pub query: QueryArgs,
    /// Measurement (as in trace); default the loss against the label.
    #[arg(long = "measure", default_value = "label")]
    pub measurement: Measurement,
    /// Fitted curvatures to compare, e.g. exact,cg,ekfac.
    #[arg(long = "curvature", value_enum, value_delimiter = ',', default_value = "cg")]
    pub curvatures: Vec<Method>,
    /// loo: number of random training examples removed one at a time.
    #[arg(long, default_value_t = 100)]
    pub sample: usize,
    /// loo: remove exactly these training ids instead (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub remove: Option<Vec<usize>>,
    /// lds: number of random subsets.
    #[arg(long, default_value_t = 50)]
    pub subsets: usize,
    /// lds: share of the training set in each subset.
    #[arg(long, default_value_t = 0.5, value_parser = culprit_engine::params::open_unit)]
    pub fraction: f64,
    /// lds, deep models: models trained per subset (seeds run, run + 1, …), measurements averaged.
    #[arg(long, default_value_t = 1, value_parser = culprit_engine::params::at_least_one)]
    pub seeds: usize,
    /// Retraining target ‖∇L‖ (L-BFGS).
    #[arg(long, default_value_t = 1e-9, value_parser = culprit_engine::params::positive)]
    pub tolerance: f64,
    /// Score with the run's checkpoints (`trace --checkpoints`) instead of its final model.
    #[arg(long)]
    pub checkpoints: bool,
    /// Seed of the removals or subsets.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// table or json.
    #[arg(long, value_enum, default_value_t = super::Format::Table)]
    pub format: super::Format,
    /// Write the report here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl EvalArgs {
    /// The experiment the flags ask for.
    pub fn experiment(&self) -> Experiment {
        match self.experiment {
            ExperimentKind::Loo => Experiment::Loo { sample: self.sample, remove: self.remove.clone() },
            ExperimentKind::Lds => {
                Experiment::Lds { subsets: self.subsets, fraction: self.fraction, seeds: self.seeds }
            }
        }
    }

    /// The options the flags give, on `backend`.
    pub fn options(&self, backend: Backend, quiet: bool) -> EvalOptions {
        EvalOptions {
            run: self.query.run.clone(),
            data: self.query.data.clone(),
            indices: self.query.indices.clone(),
            measurement: self.measurement,
            curvatures: self.curvatures.clone(),
            tolerance: self.tolerance,
            checkpoints: self.checkpoints,
            seed: self.seed,
            backend,
            quiet,
        }
    }
}

/// Runs the experiment and writes its report.
pub fn run(args: &EvalArgs, backend: Backend, quiet: bool, stdout: &mut dyn std::io::Write) -> Result<()> {
    if args.format == super::Format::Html {
        return Err(Error::Usage("--format html is not available here (expected table, json)".into()));
    }
    if let Some(out) = &args.out {
        crate::io::check_output(out, &[&args.query.data.path], &[&args.query.run])?;
    }
    let report = evaluate(&args.options(backend, quiet), &args.experiment())?;
    let text = match args.format {
        super::Format::Json => serde_json::to_string_pretty(&report).expect("plain data") + "\n",
        _ => to_table(&report),
    };
    super::emit(&text, args.out.as_deref(), stdout)
}

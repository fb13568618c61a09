//! `culprit fit`: fit a curvature method to a run and store what it fitted in
//! `RUN/curvature/METHOD.bin`.
//!
//! Before the file is written, a self-check solves (H + δI)x = q for one query, q = ∇ℓ of the
//! first training example, and reports the solve's time and its relative residual against the
//! exact GGN operator (for approximate methods, how far they are from exact). A residual that is
//! not a finite number fails the fit and nothing is written. `--check` says how much it costs:
//! `quick` (the default) solves fully where a solve is one factored product and stops an
//! iterative method (cg) after [`QUICK_CHECK_PRODUCTS`] products, since a full iterative solve
//! costs as much as one query of `trace`; `full` solves to the tolerance; `none` skips it. One
//! `fit` per curvature file runs at a time: a second one fails at once naming the first.

use std::io::Write;
use std::path::{Path, PathBuf};

use culprit_engine::curvature::iterative::residual_of;
use culprit_engine::curvature::operators::Damped;
use culprit_engine::curvature::{Curvature, CurvatureError, CurvatureSource, FitOptions, Method};
use culprit_engine::gradients::{Measurement, gradient_rows_f64, per_example_gradients};
use culprit_engine::io::lock::Lock;
use culprit_engine::objective::Objective;
use culprit_models::{Backend, Batch};

use super::stdout_error;
use crate::error::Result;
use crate::workspace::artifacts::save_curvature;
use crate::workspace::kind::Kind;
use crate::workspace::{Run, curvature_path, objective, open_store};

/// The flags of `culprit fit`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct FitArgs {
    /// Run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// The method and its parameters.
    #[command(flatten)]
    pub options: FitOptions,
    /// projected: the projected gradient store (default RUN/gradients).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Fit the run's checkpoints (`train --checkpoints`) instead of the run, each into its own
    /// CHECKPOINT/curvature, for `trace --checkpoints`. Not with --store.
    #[arg(long)]
    pub checkpoints: bool,
    /// The self-check before the file is written.
    #[arg(long, value_enum, default_value_t = SelfCheck::Quick)]
    pub check: SelfCheck,
    /// Backend (the global `--backend`).
    #[arg(skip)]
    pub backend: Backend,
}

/// How much of a solve `fit` spends on its self-check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SelfCheck {
    /// A full solve where it is one factored product (exact, kfac, ekfac, arnoldi, …); cg stops
    /// after `QUICK_CHECK_PRODUCTS` products and reports the residual reached.
    #[default]
    Quick,
    /// One query solved to the method's tolerance (cg: as much as one query of `trace`).
    Full,
    /// No self-check.
    None,
}

/// Products an iterative method's quick self-check makes: enough to see a finite operator, a
/// positive curvature and a falling residual, not to converge.
pub const QUICK_CHECK_PRODUCTS: usize = 10;

/// What `culprit fit` reports.
#[derive(Clone, Debug)]
pub struct FitReport {
    /// Where the factors were written.
    pub path: PathBuf,
    /// Seconds to fit.
    pub fit_seconds: f64,
    /// How the self-check ran.
    pub check: SelfCheck,
    /// Seconds for the self-check solve (`None` when skipped).
    pub solve_seconds: Option<f64>,
    /// Iterations of the self-check solve (iterative methods).
    pub iterations: Option<usize>,
    /// Relative residual of the self-check against the exact GGN (+ damping); `None` for the
    /// projected curvature, which lives in another space.
    pub relative_residual: Option<f64>,
    /// Parameters (of the space the curvature solves in).
    pub params: usize,
}

/// Fits, self-checks (quick) and stores a curvature method.
pub fn fit(run_dir: &Path, options: &FitOptions, backend: Backend) -> Result<FitReport> {
    fit_with_store(run_dir, options, backend, None, SelfCheck::Quick)
}

/// [`fit`], with the gradient store the `projected` method reads (default `RUN/gradients`) and
/// the self-check `check`.
pub fn fit_with_store(
    run_dir: &Path,
    options: &FitOptions,
    backend: Backend,
    store: Option<PathBuf>,
    check: SelfCheck,
) -> Result<FitReport> {
    let run = Run::open(run_dir)?;
    let path = curvature_path(&run.dir, options.method);
    std::fs::create_dir_all(run.dir.join("curvature")).map_err(crate::Error::io(&run.dir.join("curvature")))?;
    let _lock = Lock::acquire(&path, &format!("the {} curvature", options.method))?;
    // Holding the lock: what a killed fit of this curvature left is a leftover.
    crate::io::remove_stale_temporaries(&path)?;
    crate::dispatch!(run, K => fit_for::<K>(&run, options, backend, store, path, check))
}

fn fit_for<K: Kind>(
    run: &Run,
    options: &FitOptions,
    backend: Backend,
    store: Option<PathBuf>,
    path: PathBuf,
    check: SelfCheck,
) -> Result<FitReport> {
    let (objective, _) = objective::<K>(run, backend)?;
    if options.method == Method::Projected {
        return fit_projected(run, &objective, options, store, path, check);
    }
    let curvature = Curvature::fit(&objective, options)?;
    let mut report = FitReport {
        path,
        fit_seconds: curvature.fit_seconds,
        check,
        solve_seconds: None,
        iterations: None,
        relative_residual: None,
        params: objective.dim(),
    };
    if check != SelfCheck::None {
        self_check(&objective, &curvature, check, &mut report)?;
    }
    save_curvature(run, &curvature)?;
    Ok(report)
}

/// Solves for the first training example's gradient (within [`QUICK_CHECK_PRODUCTS`] products
/// when `quick`) and measures the relative residual against the exact GGN; a residual that is
/// not finite is an error.
fn self_check<M: culprit_models::Model>(
    objective: &Objective<M>,
    curvature: &Curvature,
    check: SelfCheck,
    report: &mut FitReport,
) -> Result<()> {
    let options = &curvature.options;
    let first = objective.data.slice(0..1);
    let labels = first.labels().into_owned();
    let q = gradient_rows_f64(&per_example_gradients(&objective.model, &first, &labels, Measurement::TRAINING_LOSS));
    let started = std::time::Instant::now();
    let (x, info) = match check {
        SelfCheck::Quick => curvature.solve_within(objective, &q, QUICK_CHECK_PRODUCTS)?,
        _ => curvature.solve(objective, std::slice::from_ref(&q))?.pop().expect("one query"),
    };
    report.solve_seconds = Some(started.elapsed().as_secs_f64());
    report.iterations = info.as_ref().map(|i| i.iterations);
    // Models without exact GGN products (several predictions per example) report no residual.
    report.relative_residual = objective
        .gauss_newton(options.chunk)
        .ok()
        .map(|ggn| residual_of(&Damped { inner: ggn.as_ref(), damping: options.damping }, &x, &q));
    if let Some(r) = report.relative_residual.filter(|r| !r.is_finite()) {
        let what = format!("the {} self-check residual (nothing was written)", options.method);
        return Err(CurvatureError::NotFinite { what, value: r }.into());
    }
    Ok(())
}

/// The projected curvature: fitted from the store, self-checked by timing one solve in the
/// projected space.
fn fit_projected<M: culprit_models::Model>(
    run: &Run,
    objective: &Objective<M>,
    options: &FitOptions,
    store: Option<PathBuf>,
    path: PathBuf,
    check: SelfCheck,
) -> Result<FitReport> {
    let (store, _) = open_store(run, store)?;
    let curvature = Curvature::fit_with_store(objective, options, Some(&store))?;
    let first: Vec<f64> = store.expanded_rows(&store.row(0)).iter().map(|v| f64::from(*v)).collect();
    let solve_seconds = if check == SelfCheck::None {
        None
    } else {
        let started = std::time::Instant::now();
        curvature.solve(objective, std::slice::from_ref(&first))?;
        Some(started.elapsed().as_secs_f64())
    };
    save_curvature(run, &curvature)?;
    Ok(FitReport {
        path,
        fit_seconds: curvature.fit_seconds,
        check,
        solve_seconds,
        iterations: None,
        relative_residual: None,
        params: first.len(),
    })
}

/// Fits and reports (with `--checkpoints`, each checkpoint of the run in turn).
pub fn run(args: &FitArgs, stdout: &mut dyn Write) -> Result<()> {
    if !args.checkpoints {
        return fit_and_report(&args.run, args, stdout);
    }
    super::each_checkpoint(&args.run, args.store.as_deref(), stdout, |dir, stdout| fit_and_report(dir, args, stdout))
}

fn fit_and_report(run: &Path, args: &FitArgs, stdout: &mut dyn Write) -> Result<()> {
    let r = fit_with_store(run, &args.options, args.backend, args.store.clone(), args.check)?;
    writeln!(
        stdout,
        "fitted {} on {} parameters in {:.3} s (damping {:e}); written to {}\n{}",
        args.options.method,
        r.params,
        r.fit_seconds,
        args.options.damping,
        r.path.display(),
        check_line(&r)
    )
    .map_err(stdout_error)
}

/// The report's self-check in one line.
fn check_line(r: &FitReport) -> String {
    let Some(seconds) = r.solve_seconds else {
        return "check: skipped (--check none)".into();
    };
    let residual =
        r.relative_residual.map(|v| format!(", relative residual against the exact GGN {v:.3e}")).unwrap_or_default();
    match r.iterations {
        Some(i) if r.check == SelfCheck::Quick && i >= QUICK_CHECK_PRODUCTS => format!(
            "check: {i} iterations toward (H + δI)x = ∇ℓ(z₀) in {seconds:.4} s{residual} (--check quick stops there; --check full solves to the tolerance)"
        ),
        Some(i) => format!("check: solved (H + δI)x = ∇ℓ(z₀) in {seconds:.4} s ({i} iterations){residual}"),
        None => format!("check: solved (H + δI)x = ∇ℓ(z₀) in {seconds:.4} s{residual}"),
    }
}

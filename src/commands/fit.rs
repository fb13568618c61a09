//! `culprit fit`: fit a curvature method to a run and store what it fitted in
//! `RUN/curvature/METHOD.bin`.
//!
//! Before the file is written, a self-check solves (H + δI)x = q for one query, q = ∇ℓ of the
//! first training example, and reports the solve's time and its relative residual against the
//! exact GGN operator (for approximate methods, how far they are from exact). A residual that is
//! not a finite number fails the fit and nothing is written. One `fit` per curvature file runs at
//! a time: a second one fails at once naming the first.

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
    /// Backend (the global `--backend`).
    #[arg(skip)]
    pub backend: Backend,
}

/// What `culprit fit` reports.
#[derive(Clone, Debug)]
pub struct FitReport {
    /// Where the factors were written.
    pub path: PathBuf,
    /// Seconds to fit.
    pub fit_seconds: f64,
    /// Seconds for the self-check solve.
    pub solve_seconds: f64,
    /// Iterations of the self-check solve (iterative methods).
    pub iterations: Option<usize>,
    /// Relative residual of the self-check against the exact GGN (+ damping); `None` for the
    /// projected curvature, which lives in another space.
    pub relative_residual: Option<f64>,
    /// Parameters (of the space the curvature solves in).
    pub params: usize,
}

/// Fits, self-checks and stores a curvature method.
pub fn fit(run_dir: &Path, options: &FitOptions, backend: Backend) -> Result<FitReport> {
    fit_with_store(run_dir, options, backend, None)
}

/// [`fit`], with the gradient store the `projected` method reads (default `RUN/gradients`).
pub fn fit_with_store(
    run_dir: &Path,
    options: &FitOptions,
    backend: Backend,
    store: Option<PathBuf>,
) -> Result<FitReport> {
    let run = Run::open(run_dir)?;
    let path = curvature_path(&run.dir, options.method);
    std::fs::create_dir_all(run.dir.join("curvature")).map_err(crate::Error::io(&run.dir.join("curvature")))?;
    let _lock = Lock::acquire(&path, &format!("the {} curvature", options.method))?;
    // Holding the lock: what a killed fit of this curvature left is a leftover.
    crate::io::remove_stale_temporaries(&path)?;
    crate::dispatch!(run, K => fit_for::<K>(&run, options, backend, store, path))
}

fn fit_for<K: Kind>(
    run: &Run,
    options: &FitOptions,
    backend: Backend,
    store: Option<PathBuf>,
    path: PathBuf,
) -> Result<FitReport> {
    let (objective, _) = objective::<K>(run, backend)?;
    if options.method == Method::Projected {
        return fit_projected(run, &objective, options, store, path);
    }
    let curvature = Curvature::fit(&objective, options)?;
    let first = objective.data.slice(0..1);
    let labels = first.labels().into_owned();
    let q = gradient_rows_f64(&per_example_gradients(&objective.model, &first, &labels, Measurement::TRAINING_LOSS));
    let started = std::time::Instant::now();
    let solved = curvature.solve(&objective, std::slice::from_ref(&q))?;
    let solve_seconds = started.elapsed().as_secs_f64();
    let (x, info) = &solved[0];
    // Models without exact GGN products (several predictions per example) report no residual.
    let residual = objective
        .gauss_newton(options.chunk)
        .ok()
        .map(|ggn| residual_of(&Damped { inner: ggn.as_ref(), damping: options.damping }, x, &q));
    if let Some(r) = residual.filter(|r| !r.is_finite()) {
        let what = format!("the {} self-check residual (nothing was written)", options.method);
        return Err(CurvatureError::NotFinite { what, value: r }.into());
    }
    save_curvature(run, &curvature)?;
    Ok(FitReport {
        path,
        fit_seconds: curvature.fit_seconds,
        solve_seconds,
        iterations: info.as_ref().map(|i| i.iterations),
        relative_residual: residual,
        params: objective.dim(),
    })
}

/// The projected curvature: fitted from the store, self-checked by timing one solve in the
/// projected space.
fn fit_projected<M: culprit_models::Model>(
    run: &Run,
    objective: &Objective<M>,
    options: &FitOptions,
    store: Option<PathBuf>,
    path: PathBuf,
) -> Result<FitReport> {
    let (store, _) = open_store(run, store)?;
    let curvature = Curvature::fit_with_store(objective, options, Some(&store))?;
    let first: Vec<f64> = store.expanded_rows(&store.row(0)).iter().map(|v| f64::from(*v)).collect();
    let started = std::time::Instant::now();
    curvature.solve(objective, std::slice::from_ref(&first))?;
    let solve_seconds = started.elapsed().as_secs_f64();
    save_curvature(run, &curvature)?;
    Ok(FitReport {
        path,
        fit_seconds: curvature.fit_seconds,
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
    let r = fit_with_store(run, &args.options, args.backend, args.store.clone())?;
    writeln!(
        stdout,
        "fitted {} on {} parameters in {:.3} s (damping {:e}); written to {}\ncheck: solved (H + δI)x = ∇ℓ(z₀) in {:.4} s{}{}",
        args.options.method,
        r.params,
        r.fit_seconds,
        args.options.damping,
        r.path.display(),
        r.solve_seconds,
        r.iterations.map(|i| format!(" ({i} iterations)")).unwrap_or_default(),
        r.relative_residual.map(|v| format!(", relative residual against the exact GGN {v:.3e}")).unwrap_or_default()
    )
    .map_err(stdout_error)
}

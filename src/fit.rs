//! `culprit fit`: fit a curvature method to a run and store its factors.
//!
//! After fitting, a self-check solves (H + δI)x = q for one query, q = ∇ℓ of the first training
//! example, and reports the solve's time and its relative residual against the exact GGN
//! operator (for approximate methods, how far they are from exact).

use std::path::PathBuf;

use culprit_models::Backend;

use crate::cache::{store_key, training_data};
use crate::curvature::iterative::residual_of;
use crate::curvature::operators::{Damped, GaussNewton, Objective};
use crate::curvature::{Curvature, FitOptions, Method, curvature_path};
use crate::error::{Error, Result};
use crate::gradients::projection::ProjectionSpec;
use crate::gradients::{Measurement, per_example_gradients};
use crate::run::Run;

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
    /// Parameters.
    pub params: usize,
}

/// The objective of a run in f64, on `backend`.
pub fn objective(run: &Run, backend: Backend) -> Result<Objective> {
    let device = backend.autodiff_device();
    let data = training_data(run)?;
    let network = run.network(&device)?;
    Ok(Objective::new(&network, data, run.config.training.l2, &device))
}

/// Fits, stores and self-checks a curvature method.
pub fn fit(run_dir: &std::path::Path, options: &FitOptions, backend: Backend) -> Result<FitReport> {
    fit_with_store(run_dir, options, backend, None)
}

/// [`fit`], with the gradient store the `projected` method reads (default `RUN/gradients`).
pub fn fit_with_store(
    run_dir: &std::path::Path,
    options: &FitOptions,
    backend: Backend,
    store: Option<PathBuf>,
) -> Result<FitReport> {
    let run = Run::open(run_dir)?;
    let objective = objective(&run, backend)?;
    let key = store_key(&run, ProjectionSpec::None, 0)?;
    let path = curvature_path(&run.dir, options.method);
    if options.method == Method::Projected {
        let (store, _) = crate::trace::open_store(&run, store)?;
        let curvature = Curvature::fit_projected(&store, options, objective.l2)?;
        curvature.save(&path, &key.weights_sha256, &key.data_sha256, objective.l2)?;
        // Self-check in the projected space: time one solve for the store's first row.
        let started = std::time::Instant::now();
        let first = store.expanded_rows(&store.row(0)).into_owned();
        curvature.solve_projected(std::slice::from_ref(&first))?;
        let solve_seconds = started.elapsed().as_secs_f64();
        return Ok(FitReport {
            path,
            fit_seconds: curvature.fit_seconds,
            solve_seconds,
            iterations: None,
            relative_residual: None,
            params: store.expanded_rows(&store.row(0)).len(),
        });
    }
    let curvature = Curvature::fit(&objective, options)?;
    curvature.save(&path, &key.weights_sha256, &key.data_sha256, objective.l2)?;
    let first = per_example_gradients(
        &objective.network,
        &objective.data.features[..objective.data.dim()],
        &objective.data.labels[..1],
        Measurement::TRAINING_LOSS,
        &objective.device,
    );
    let q = crate::gradients::gradient_rows_f64(&first);
    let started = std::time::Instant::now();
    let solved = curvature.solve(&objective, std::slice::from_ref(&q))?;
    let solve_seconds = started.elapsed().as_secs_f64();
    let (x, info) = &solved[0];
    let ggn = GaussNewton::new(&objective, options.chunk);
    let residual = residual_of(&Damped { inner: &ggn, damping: options.damping }, x, &q);
    Ok(FitReport {
        path,
        fit_seconds: curvature.fit_seconds,
        solve_seconds,
        iterations: info.as_ref().map(|i| i.iterations),
        relative_residual: Some(residual),
        params: objective.network.num_params(),
    })
}

/// Loads a run's fitted curvature (`identity` needs no fit).
pub fn load(run: &Run, objective: &Objective, method: Method) -> Result<Curvature> {
    let key = store_key(run, ProjectionSpec::None, 0)?;
    let path = curvature_path(&run.dir, method);
    if path.is_file() {
        Curvature::load(&path, &key.weights_sha256, &key.data_sha256, objective.network.layers())
    } else if method == Method::Identity {
        Curvature::fit(objective, &FitOptions { method, ..Default::default() })
    } else {
        Err(Error::run(
            &path,
            format!(
                "no fitted {} curvature; run `culprit fit --run {} --curvature {}` first",
                method.name(),
                run.dir.display(),
                method.name()
            ),
        ))
    }
}

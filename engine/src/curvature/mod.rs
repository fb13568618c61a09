//! Step 2 of the pipeline: inverse-curvature products x = (H + δI)⁻¹ q.
//!
//! H is the Hessian of the training objective L(θ) = (1/n) Σᵢ CE + (λ/2)‖θ‖² at the trained θ, or
//! its Gauss–Newton approximation G (exact for linear models, positive semi-definite always), in
//! the space of the model's tracked layers; δ is extra damping (`--damping`, default 0),
//! reported with every result. Influence scores (step 3) precondition each query gradient q with
//! one of these:
//!
//! | method | what | cost to fit | cost per solve | exact? |
//! |---|---|---|---|---|
//! | `exact` | dense H (closed form for logreg, else finite-difference columns), Cholesky | d products or n·d²·C; d³/3 | d² | yes |
//! | `ggn` | dense G from per-class gradients, Cholesky | n·C·d² + d³/3 | d² | yes (G) |
//! | `cg` | conjugate gradient on G products, optionally EK-FAC-preconditioned; all queries share each product | (EK-FAC) | iterations × product (for all queries at once) | to tolerance |
//! | `lissa` | Neumann series on G products | – | depth × product | to tolerance |
//! | `arnoldi` | top-k eigenpairs of G from a Krylov space | m products | k·d | in the top-k subspace |
//! | `kfac`, `ekfac` | Kronecker-factored G per layer | C backward passes per pass | Σ m·o·(m+o) | approximation |
//! | `diagonal` | the diagonal of the true Fisher | C backward passes | d | no (a baseline) |
//! | `identity` | H = I: gradient dot products | – | d | no (a baseline) |
//! | `projected` | TRAK-style (1/n)ΦᵀΦ + (λ+δ)I of a projected store, Cholesky | n·k² + k³/3 | k² | no (a projected empirical Fisher) |
//!
//! Iterative methods check their relative residual ‖(H+δI)x − q‖/‖q‖ with the exact operator and
//! fail with [`CurvatureError::NotConverged`] rather than return a silently wrong answer.
//!
//! ## The boundary
//! Each method is a type implementing [`CurvatureMethod`] (its own parameters, which are its
//! flags on `culprit fit`; how to fit; how to load) in its own file under [`methods`], registered
//! there by one line. What it fits is a [`Fitted`] (solve many right-hand sides at once,
//! self-influence, the arrays saved in the curvature file). Methods see the objective only
//! through [`CurvatureSource`], so they never depend on the model type. [`Curvature`] holds a
//! fitted method with the options it was fitted with, and saves and loads it in the one
//! container format (`docs/FORMAT.md`: magic `CULPRITC`).

pub mod block_cg;
pub(crate) mod blocked;
pub mod blocks;
pub mod dense;
pub mod iterative;
pub mod kronecker;
pub mod methods;
pub mod operators;
pub(crate) mod rows;
pub mod self_influence;
pub(crate) mod sparse;
pub mod symmetry;

use std::any::Any;
use std::path::Path;

use culprit_models::model::TrackedLayer;
use serde::{Deserialize, Serialize};

pub use crate::error::CurvatureError;
use crate::error::{Error, Result};
use crate::gradients::LayerFactors;
use crate::io::container::{ArrayInfo, Arrays, Format};
pub use crate::objective::{CurvatureSource, FisherSample};
use crate::store::{GradientStore, StoreKey};
use iterative::SolveInfo;
pub use methods::{Method, MethodParams};

/// A solution x of (H + δI)x = q and, for iterative methods, how the solve ended.
pub type Solution = (Vec<f64>, Option<SolveInfo>);

/// The space a fitted curvature solves in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Space {
    /// The tracked parameters (every method but `projected`).
    Tracked,
    /// The rows of the projected gradient store with this key.
    Projected(StoreKey),
}

/// What a curvature method fitted: ready to solve.
pub trait Fitted: Send + Sync + Any {
    /// x = (H + δI)⁻¹ q for each query, in [`Fitted::space`].
    fn solve(&self, source: &dyn CurvatureSource, queries: &[Vec<f64>]) -> Result<Vec<Solution>>;

    /// x = (H + δI)⁻¹ q for one query within at most `products` operator products where the
    /// method iterates toward a tolerance, returning what it reached (converged or not): the
    /// cheap self-check of `fit`. Methods whose solve is a fixed factored product solve fully
    /// (the default).
    fn solve_within(&self, source: &dyn CurvatureSource, query: &[f64], products: usize) -> Result<Solution> {
        let _ = products;
        Ok(self.solve(source, &[query.to_vec()])?.pop().expect("one query"))
    }

    /// Self-influence gᵢᵀ(H + δI)⁻¹gᵢ of every example of a batch, given its loss gradients' layer
    /// factors (f64). The default forms each gradient and solves; methods with a factored form
    /// override it, methods that would need one iterative solve per example refuse.
    fn self_influence(&self, source: &dyn CurvatureSource, factors: &[LayerFactors]) -> Result<Vec<f64>> {
        let blocks: Vec<_> = factors.iter().zip(source.layers()).map(|(f, l)| f.gradient(l)).collect();
        let rows = crate::gradients::gradient_rows_f64(&blocks);
        let g: Vec<Vec<f64>> = rows.chunks(source.dim()).map(<[f64]>::to_vec).collect();
        let solved = self.solve(source, &g)?;
        Ok(g.iter().zip(&solved).map(|(gi, (x, _))| operators::dot(gi, x)).collect())
    }

    /// The space it solves in.
    fn space(&self) -> Space {
        Space::Tracked
    }

    /// The arrays the curvature file keeps.
    fn arrays(&self) -> Arrays;

    /// For downcasting to the concrete type (tests, diagnostics).
    fn as_any(&self) -> &dyn Any;
}

/// What a method may use while fitting.
pub struct FitContext<'a> {
    /// The objective.
    pub source: &'a dyn CurvatureSource,
    /// A projected gradient store (the `projected` method).
    pub store: Option<&'a GradientStore>,
    /// The common options (damping, tolerance, chunk).
    pub options: &'a FitOptions,
}

/// What a method may use while loading a curvature file.
pub struct LoadContext<'a> {
    /// The file, for messages.
    pub path: &'a Path,
    /// The model's tracked layers (the arrays' shapes are checked against them).
    pub layers: &'a [TrackedLayer],
    /// The objective's λ when it was fitted.
    pub l2: f64,
    /// The options it was fitted with.
    pub options: &'a FitOptions,
    /// For the projected curvature: the key of the store it was fitted on.
    pub store: Option<&'a StoreKey>,
}

/// The parameters of one method: its flags on `culprit fit`, kept in the curvature file.
pub trait Params:
    clap::Args + clap::FromArgMatches + Serialize + serde::de::DeserializeOwned + Clone + std::fmt::Debug + Default
{
}

impl<T> Params for T where
    T: clap::Args + clap::FromArgMatches + Serialize + serde::de::DeserializeOwned + Clone + std::fmt::Debug + Default
{
}

/// A curvature method: a type with its own parameters, registered in [`methods`].
pub trait CurvatureMethod {
    /// Its own parameters.
    type Params: Params;
    /// Fits it.
    fn fit(params: &Self::Params, ctx: &FitContext<'_>) -> Result<Box<dyn Fitted>>;
    /// Restores what [`CurvatureMethod::fit`] returned from a curvature file's arrays.
    fn load(params: &Self::Params, arrays: &mut Arrays, ctx: &LoadContext<'_>) -> Result<Box<dyn Fitted>>;
}

/// Parameters without any flag, for methods that need none.
#[derive(clap::Args, Clone, Debug, Default, Serialize, Deserialize)]
#[group(skip)]
pub struct NoParams {}

/// How to fit: the method, the options every method shares, and every method's own parameters
/// (the flags of `culprit fit`; [`FitOptions::default`] gives the documented defaults).
#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
#[group(skip)]
pub struct FitOptions {
    /// The curvature method.
    #[arg(long = "curvature", value_enum, default_value_t = Method::Cg)]
    pub method: Method,
    /// Extra damping δ added to the curvature (on top of the objective's own λ).
    #[arg(long, default_value_t = 0.0, value_parser = crate::params::non_negative, allow_negative_numbers = true)]
    pub damping: f64,
    /// kfac, ekfac: per layer, add F × the mean of the layer's eigenvalues to all of them
    /// (Kronfluence's heuristic damping, F = 0.1 there): scale-free, unlike --damping, for
    /// models far from an optimum (language models), where the smallest eigenvalues are noise.
    #[arg(long, default_value_t = 0.0, value_parser = crate::params::non_negative, allow_negative_numbers = true)]
    #[serde(default)]
    pub relative_damping: f64,
    /// Relative-residual tolerance of the iterative solvers (default: cg 1e-8, lissa 1e-3); cg
    /// from 1e-4 up iterates on f32 products, every result confirmed in f64.
    #[arg(long, value_parser = crate::params::positive, allow_negative_numbers = true)]
    pub tolerance: Option<f64>,
    /// Examples per chunk when sweeping the data.
    #[arg(skip = 1024usize)]
    pub chunk: usize,
    /// Every method's own parameters.
    #[command(flatten)]
    pub params: MethodParams,
}

impl Default for FitOptions {
    fn default() -> Self {
        crate::params::clap_defaults()
    }
}

impl FitOptions {
    /// The defaults for `method`.
    pub fn new(method: Method) -> Self {
        Self { method, ..Self::default() }
    }
}

/// A fitted curvature with the options it was fitted with.
pub struct Curvature {
    /// Options.
    pub options: FitOptions,
    /// What the method fitted.
    pub fitted: Box<dyn Fitted>,
    /// Seconds the fit took.
    pub fit_seconds: f64,
}

impl std::fmt::Debug for Curvature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Curvature").field("options", &self.options).field("fit_seconds", &self.fit_seconds).finish()
    }
}

impl Curvature {
    /// Fits `options.method` to `source`.
    pub fn fit(source: &dyn CurvatureSource, options: &FitOptions) -> Result<Self> {
        Self::fit_with_store(source, options, None)
    }

    /// Fits `options.method` to `source`; `store` is the projected store the `projected` method
    /// is fitted on.
    pub fn fit_with_store(
        source: &dyn CurvatureSource,
        options: &FitOptions,
        store: Option<&GradientStore>,
    ) -> Result<Self> {
        if !(options.damping >= 0.0 && options.damping.is_finite()) {
            return Err(Error::Usage(format!("--damping must be a finite number ≥ 0, got {}", options.damping)));
        }
        if options.relative_damping > 0.0 && !matches!(options.method, Method::Kfac | Method::Ekfac) {
            return Err(Error::Usage(format!(
                "--relative-damping applies to kfac and ekfac (per layer, relative to its eigenvalues); for {} use --damping",
                options.method
            )));
        }
        let started = std::time::Instant::now();
        let fitted = options.params.fit(options.method, &FitContext { source, store, options })?;
        Ok(Self { options: options.clone(), fitted, fit_seconds: started.elapsed().as_secs_f64() })
    }

    /// Solves (H + δI) x = q for each query. Returns the solutions and, for iterative methods, how
    /// each solve ended.
    pub fn solve(&self, source: &dyn CurvatureSource, queries: &[Vec<f64>]) -> Result<Vec<Solution>> {
        self.fitted.solve(source, queries)
    }

    /// [`Fitted::solve_within`]: one query within at most `products` products.
    pub fn solve_within(&self, source: &dyn CurvatureSource, query: &[f64], products: usize) -> Result<Solution> {
        self.fitted.solve_within(source, query, products)
    }

    /// The space the curvature solves in.
    pub fn space(&self) -> Space {
        self.fitted.space()
    }

    /// Writes `path` atomically in the curvature container (`docs/FORMAT.md`), tied to the
    /// weights and data it was fitted on.
    pub fn save(&self, path: &Path, weights_sha256: &str, data_sha256: &str, l2: f64) -> Result<()> {
        let arrays = self.fitted.arrays();
        let header = CurvatureHeader {
            weights_sha256: weights_sha256.into(),
            data_sha256: data_sha256.into(),
            options: self.options.clone(),
            l2,
            fit_seconds: self.fit_seconds,
            arrays: arrays.infos().to_vec(),
            store: match self.fitted.space() {
                Space::Projected(key) => Some(key),
                Space::Tracked => None,
            },
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        }
        CURVATURE_FORMAT.write_file(path, &header, &arrays.payload())
    }

    /// Reads and verifies a curvature file written for these weights and data, for a model with
    /// these tracked layers.
    pub fn load(path: &Path, weights_sha256: &str, data_sha256: &str, layers: &[TrackedLayer]) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        let container = CURVATURE_FORMAT.parse(path, &bytes)?;
        let header: CurvatureHeader = container.header(path, "curvature")?;
        let mut stale = Vec::new();
        if header.weights_sha256 != weights_sha256 {
            stale.push("model (its weights differ)");
        }
        if header.data_sha256 != data_sha256 {
            stale.push("data set");
        }
        if !stale.is_empty() {
            return Err(Error::run(
                path,
                format!("stale curvature: fitted for a different {}; run `culprit fit` again", stale.join(" and ")),
            ));
        }
        let mut arrays = Arrays::parse(path, &header.arrays, container.payload)?;
        let ctx = LoadContext { path, layers, l2: header.l2, options: &header.options, store: header.store.as_ref() };
        let fitted = header.options.params.load(header.options.method, &mut arrays, &ctx)?;
        Ok(Self { options: header.options, fitted, fit_seconds: header.fit_seconds })
    }
}

/// The container of a curvature file: magic `CULPRITC`, f64 arrays 8-byte aligned. Version 2
/// (each method's own parameters in the header); version-1 files are refused with a message
/// saying to fit again.
pub const CURVATURE_FORMAT: Format =
    Format { magic: b"CULPRITC", version: 2, readable: 2..=2, align: 8, what: "curvature file" };

/// The JSON header of a curvature file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CurvatureHeader {
    /// SHA-256 of the run's weights.
    pub weights_sha256: String,
    /// SHA-256 of the run's data manifest.
    pub data_sha256: String,
    /// The fit's options.
    pub options: FitOptions,
    /// The objective's λ.
    pub l2: f64,
    /// Seconds the fit took.
    pub fit_seconds: f64,
    /// The arrays that follow, in order.
    pub arrays: Vec<ArrayInfo>,
    /// For the projected curvature: the key of the store it was fitted on.
    #[serde(default)]
    pub store: Option<StoreKey>,
}

//! `culprit cache`: fill a run's gradient store with every training example's loss gradient.
//!
//! The work is the engine's ([`culprit_engine::store::build`]: resumable shard by shard,
//! splittable across machines with `--shard I/N`, one lock per shard); this command ties it to a
//! run: the store's key (the run's weights and data hashes, the projection and its seed), its
//! default place `RUN/gradients`, and the run's training data, checked against the files it was
//! trained on.

use std::io::Write;
use std::path::PathBuf;

use culprit_engine::gradients::projection::ProjectionSpec;
use culprit_engine::store::Dtype;
use culprit_engine::store::build::{BuildReport, StoreLayout, build as build_store};
use culprit_models::Backend;

use super::stdout_error;
use crate::error::Result;
use crate::workspace::artifacts::default_store;
use crate::workspace::kind::Kind;
use crate::workspace::{Run, exact_projection, store_key, training_data};

/// A projection as `--project` gives it: `auto` or a [`ProjectionSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projection {
    /// The exact projection that stores least for the model ([`exact_projection`]).
    Auto,
    /// This one.
    Spec(ProjectionSpec),
}

impl std::str::FromStr for Projection {
    type Err = crate::error::Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "auto" => Ok(Self::Auto),
            other => Ok(Self::Spec(ProjectionSpec::parse(other)?)),
        }
    }
}

/// The flags of `culprit cache`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct CacheOptions {
    /// Run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// Store directory (default: RUN/gradients).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Projection: auto (exact: per-layer factors for all-dense models, none with convolutions;
    /// kron:32x32 for language models), none (exact gradients), factors[:KINxKOUT] (per layer, the two factors stored, scored without forming
    /// the gradient), kron:KINxKOUT (per layer), jl:K (dense Gaussian JL), jl:K:rademacher.
    #[arg(long = "project", default_value = "auto")]
    pub projection: Projection,
    /// Seed of the projection matrices.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stored element type.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// Examples per backward pass.
    #[arg(long, default_value_t = 256, value_parser = culprit_engine::params::at_least_one)]
    pub batch: usize,
    /// Compute only shard I of N (I/N), for building one store on N machines.
    #[arg(long = "shard", value_parser = culprit_engine::params::part)]
    pub part: Option<(usize, usize)>,
    /// Rows per shard file (default: about 256 MiB per shard).
    #[arg(long, value_parser = culprit_engine::params::at_least_one)]
    pub rows_per_shard: Option<usize>,
    /// Fill the stores of the run's checkpoints (`train --checkpoints`; each CHECKPOINT/gradients)
    /// instead of the run's own, for `trace --checkpoints`. Not with --store.
    #[arg(long)]
    pub checkpoints: bool,
    /// Backend (the global `--backend`).
    #[arg(skip)]
    pub backend: Backend,
    /// Hide the progress bar (the global `--quiet`).
    #[arg(skip = true)]
    pub quiet: bool,
}

impl CacheOptions {
    /// The options of `culprit cache --run RUN` with every default (the `auto` projection, f32
    /// rows in `RUN/gradients`), the default backend, no progress bar.
    pub fn new(run: PathBuf) -> Self {
        culprit_engine::params::clap_parse(vec!["--run".into(), run.into()])
    }
}

/// Builds (or resumes) a run's gradient store.
pub fn build(options: &CacheOptions) -> Result<BuildReport> {
    let run = Run::open(&options.run)?;
    crate::dispatch!(run, K => build_for::<K>(&run, options))
}

fn build_for<K: Kind>(run: &Run, options: &CacheOptions) -> Result<BuildReport> {
    let projection = match options.projection {
        Projection::Auto => exact_projection(&run.config.model)?,
        Projection::Spec(p) => p,
    };
    let dir = options.store.clone().unwrap_or_else(|| default_store(run));
    let key = store_key(run, projection, options.seed)?;
    let data = training_data::<K>(run)?;
    let network = K::model(run, &options.backend.autodiff_device())?;
    let layout = StoreLayout {
        projection,
        seed: options.seed,
        dtype: options.dtype,
        batch: options.batch,
        rows_per_shard: options.rows_per_shard,
        part: options.part,
    };
    let mut bar = crate::progress::Bar::new(options.quiet);
    build_store(&dir, key, &network, &data.examples, &layout, &mut bar)
}

/// Builds the store (or with `--checkpoints`, each checkpoint's) and reports what was done.
pub fn run(options: &CacheOptions, stdout: &mut dyn Write) -> Result<()> {
    if !options.checkpoints {
        return report(&build(options)?, stdout);
    }
    super::each_checkpoint(&options.run, options.store.as_deref(), stdout, |dir, stdout| {
        let one = CacheOptions { run: dir.to_path_buf(), checkpoints: false, ..options.clone() };
        report(&build(&one)?, stdout)
    })
}

fn report(r: &BuildReport, stdout: &mut dyn Write) -> Result<()> {
    let secs = r.seconds.max(1e-9);
    writeln!(
        stdout,
        "{} rows of {} values in {} new shards ({} already complete) in {:.2} s: {:.0} examples/s, {:.1} MB/s written; store {} {}",
        r.rows_computed,
        r.row_len,
        r.shards_written,
        r.shards_kept,
        r.seconds,
        r.rows_computed as f64 / secs,
        r.bytes_written as f64 / 1e6 / secs,
        r.store.display(),
        if r.complete { "is complete" } else { "still has shards to compute (other --shard parts)" }
    )
    .map_err(stdout_error)
}

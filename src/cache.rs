//! `culprit cache`: fill a gradient store with every training example's loss gradient.
//!
//! The store is laid out once (rows in data order, fixed rows per shard) and each shard is
//! computed independently, batch by batch from its own first row, and written atomically. So:
//! - a run killed at any point resumes at the first unfinished shard (finished shards are
//!   verified and kept, temporary files are removed), and the result is byte-identical to an
//!   uninterrupted run;
//! - `--shard I/N` computes only the shards j with j mod N = I, so N machines sharing the store
//!   directory (or copying their shard files into one) build one store together.
//!
//! Cost: one tapped forward and backward per batch plus the projection (see
//! [`crate::gradients::projection`]); memory: one shard of rows plus one batch of factors.

use std::path::{Path, PathBuf};

use culprit_models::Backend;
use sha2::{Digest, Sha256};

use crate::data::{DataSpec, Dataset, Preprocessing, hex, read_file};
use crate::error::{Error, Result};
use crate::gradients::projection::{ProjectionSpec, Projector};
use crate::gradients::{Measurement, layer_factors};
use crate::run::Run;
use crate::store::{Dtype, GradientStore, Shard, StoreKey, StoreManifest, write_shard};

/// Target size of one shard file.
pub const SHARD_BYTES: usize = 256 << 20;

/// Options of `culprit cache`.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// The run.
    pub run: PathBuf,
    /// Store directory (default `RUN/gradients`).
    pub store: Option<PathBuf>,
    /// Projection.
    pub projection: ProjectionSpec,
    /// Projection seed.
    pub seed: u64,
    /// Element type.
    pub dtype: Dtype,
    /// Examples per batch.
    pub batch: usize,
    /// Compute only shard I of N (`--shard I/N`).
    pub part: Option<(usize, usize)>,
    /// Rows per shard (default: about 256 MiB per shard).
    pub rows_per_shard: Option<usize>,
    /// Backend.
    pub backend: Backend,
    /// Hide the progress bar.
    pub quiet: bool,
}

impl CacheOptions {
    /// Options with the defaults: exact gradients (no projection) in f32 in `RUN/gradients`,
    /// batches of 256, shards of about 256 MiB, the default backend, no progress bar.
    pub fn new(run: PathBuf) -> Self {
        Self {
            run,
            store: None,
            projection: ProjectionSpec::None,
            seed: 0,
            dtype: Dtype::F32,
            batch: 256,
            part: None,
            rows_per_shard: None,
            backend: Backend::default(),
            quiet: true,
        }
    }
}

/// The exact projection that stores least for a model: per-layer factors when every layer is
/// dense (the same scores as full gradients, in + out values per layer instead of in·out), full
/// gradients otherwise (a convolution's gradient is not one outer product). `culprit cache
/// --project auto`, the default.
pub fn exact_projection(model: &culprit_models::ModelConfig) -> Result<ProjectionSpec> {
    let dense = model.layers()?.iter().all(|l| matches!(l.kind, culprit_models::LayerKind::Dense { .. }));
    Ok(if dense { ProjectionSpec::Factors { k_in: usize::MAX, k_out: usize::MAX } } else { ProjectionSpec::None })
}

/// What a cache run did.
#[derive(Clone, Debug)]
pub struct CacheReport {
    /// The store directory.
    pub store: PathBuf,
    /// Rows computed by this run.
    pub rows_computed: usize,
    /// Shards written by this run.
    pub shards_written: usize,
    /// Shards found complete and kept.
    pub shards_kept: usize,
    /// Bytes written.
    pub bytes_written: usize,
    /// Seconds spent.
    pub seconds: f64,
    /// Whether every shard of the store now exists.
    pub complete: bool,
    /// Elements per row.
    pub row_len: usize,
}

/// Parses `I/N`.
pub fn parse_part(text: &str) -> Result<(usize, usize)> {
    let bad = || Error::Usage(format!("--shard takes I/N with 0 ≤ I < N, got `{text}`"));
    let (i, n) = text.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// SHA-256 of a file's bytes.
pub fn file_sha256(path: &Path) -> Result<String> {
    Ok(hex(&Sha256::digest(std::fs::read(path).map_err(Error::io(path))?)))
}

/// The store key of a run for a projection.
pub fn store_key(run: &Run, projection: ProjectionSpec, seed: u64) -> Result<StoreKey> {
    Ok(StoreKey {
        weights_sha256: file_sha256(&run.dir.join("weights.bin"))?,
        data_sha256: hex(&Sha256::digest(serde_json::to_vec(&run.manifest).expect("plain data"))),
        projection: projection.to_string(),
        seed,
    })
}

/// Loads a run's training data and checks the files are the ones it was trained on.
pub fn training_data(run: &Run) -> Result<Dataset> {
    let m = &run.manifest;
    for f in &m.files {
        let (_, sha) = read_file(&f.path)?;
        if sha != f.sha256 {
            return Err(Error::data(
                &f.path,
                None,
                format!("changed since the run in {} was trained (SHA-256 differs)", run.dir.display()),
            ));
        }
    }
    let spec = DataSpec { path: m.path.clone(), split: m.split, skip: m.skip, limit: m.limit };
    let mut data = Dataset::load(&spec, Preprocessing::Reuse(m))?;
    data.exclude(&m.excluded)?;
    Ok(data)
}

/// Builds (or resumes) a gradient store.
pub fn build(options: &CacheOptions) -> Result<CacheReport> {
    let started = std::time::Instant::now();
    if options.batch == 0 {
        return Err(Error::Usage("--batch must be positive".into()));
    }
    let run = Run::open(&options.run)?;
    let store_dir = options.store.clone().unwrap_or_else(|| run.dir.join("gradients"));
    let key = store_key(&run, options.projection, options.seed)?;
    let data = training_data(&run)?;
    let device = options.backend.autodiff_device();
    let network = run.network(&device)?;
    let projector = Projector::new(options.projection, options.seed, &network, &device)?;
    let row_len = projector.row_len();
    let rows_per_shard =
        options.rows_per_shard.unwrap_or_else(|| (SHARD_BYTES / (row_len * options.dtype.size())).max(1)).max(1);
    let fresh = StoreManifest::new(
        key.clone(),
        options.dtype,
        data.len(),
        row_len,
        projector.layout().to_vec(),
        rows_per_shard,
    );
    let manifest = if store_dir.join("manifest.json").is_file() {
        let existing = StoreManifest::read(&store_dir)?;
        existing.key.check(&key, &store_dir.join("manifest.json"))?;
        if existing != fresh {
            return Err(Error::run(
                &store_dir,
                format!(
                    "this store was laid out with dtype {:?} and {} rows per shard; resume with the same --dtype and --rows-per-shard, or use another --store",
                    existing.dtype, existing.rows_per_shard
                ),
            ));
        }
        existing
    } else {
        std::fs::create_dir_all(&store_dir).map_err(Error::io(&store_dir))?;
        fresh.write(&store_dir)?;
        fresh
    };
    // Temporary files of an interrupted run are never valid shards.
    for entry in std::fs::read_dir(&store_dir).map_err(Error::io(&store_dir))?.flatten() {
        if entry.file_name().to_string_lossy().contains(".tmp-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let (part, parts) = options.part.unwrap_or((0, 1));
    let mine: Vec<usize> = (0..manifest.shards.len()).filter(|j| j % parts == part).collect();
    let mut todo = Vec::new();
    let mut kept = 0;
    for &j in &mine {
        let path = store_dir.join(&manifest.shards[j].file);
        if path.is_file() && Shard::open(&path, &GradientStore::expected_header(&manifest, j)).is_ok() {
            kept += 1;
        } else {
            todo.push(j);
        }
    }
    let total_rows: usize = todo.iter().map(|&j| manifest.shards[j].rows).sum();
    let mut bar = crate::progress::Bar::new(options.quiet);
    use culprit_models::Progress;
    bar.begin("gradients", total_rows as u64);
    let dim = data.dim();
    let mut done = 0usize;
    let mut bytes_written = 0usize;
    for &j in &todo {
        let info = &manifest.shards[j];
        let mut rows = Vec::with_capacity(info.rows * row_len);
        let mut start = info.first_row;
        let end = info.first_row + info.rows;
        while start < end {
            let stop = (start + options.batch).min(end);
            let factors = layer_factors(
                &network,
                &data.features[start * dim..stop * dim],
                &data.labels[start..stop],
                Measurement::TRAINING_LOSS,
                &device,
            );
            rows.extend(projector.project_rows(&factors, &network));
            done += stop - start;
            bar.advance(done as u64, &format!("shard {}/{}", j + 1, manifest.shards.len()));
            start = stop;
        }
        bytes_written +=
            write_shard(&store_dir.join(&info.file), &GradientStore::expected_header(&manifest, j), &rows)?;
    }
    bar.finish();
    let complete = manifest.shards.iter().all(|s| store_dir.join(&s.file).is_file());
    Ok(CacheReport {
        store: store_dir,
        rows_computed: total_rows,
        shards_written: todo.len(),
        shards_kept: kept,
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        complete,
        row_len,
    })
}

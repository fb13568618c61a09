//! Filling a gradient store with every training example's loss gradient.
//!
//! The store is laid out once (rows in data order, fixed rows per shard) and each shard is
//! computed independently, batch by batch from its own first row, and written atomically. So:
//! - a build killed at any point resumes at the first unfinished shard (finished shards are
//!   verified and kept), and the result is byte-identical to an uninterrupted build;
//! - `part = (I, N)` computes only the shards j with j mod N = I, so N machines sharing the store
//!   directory (or copying their shard files into one) build one store together.
//!
//! Concurrency: the manifest is created under its own lock, and every shard is computed and
//! written under its lock ([`crate::io::lock`]); a second writer of the same shard fails at once
//! naming the first. Under a shard's lock, temporaries a killed writer left for that shard are
//! removed; nothing else in the directory is ever touched, and a directory that holds files but
//! no store manifest is refused rather than written into.
//!
//! Every row is checked to be finite before its shard is written: a NaN gradient is an error
//! naming the row, never a checksummed shard that poisons every later score.
//!
//! Cost: one tapped forward and backward per batch plus the projection (see
//! [`crate::gradients::projection`]); each batch's rows are written by a thread of their own
//! while the next batch is computed ([`super::stream::ShardStream`]). Memory: a few batches of
//! rows and one batch of factors.

use std::path::{Path, PathBuf};

use culprit_models::model::{Batch, Model};
use culprit_models::train::Progress;

use super::stream::ShardStream;
use super::{Dtype, GradientStore, Shard, StoreKey, StoreManifest};
use crate::error::{Error, Result};
use crate::gradients::projection::{ProjectionSpec, Projector};
use crate::gradients::{Measurement, layer_factors};
use crate::io::lock::Lock;

/// Target size of one shard file.
pub const SHARD_BYTES: usize = 256 << 20;

/// How to lay out and fill a store.
#[derive(Clone, Debug)]
pub struct StoreLayout {
    /// Projection.
    pub projection: ProjectionSpec,
    /// Projection seed.
    pub seed: u64,
    /// Element type.
    pub dtype: Dtype,
    /// Examples per backward pass.
    pub batch: usize,
    /// Rows per shard (default: about 256 MiB per shard).
    pub rows_per_shard: Option<usize>,
    /// Compute only shard part I of N.
    pub part: Option<(usize, usize)>,
}

/// What a build did.
#[derive(Clone, Debug)]
pub struct BuildReport {
    /// The store directory.
    pub store: PathBuf,
    /// Rows computed by this build.
    pub rows_computed: usize,
    /// Shards written by this build.
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

/// Whether `dir` holds nothing but what a store build may leave (locks, temporaries).
fn holds_other_files(dir: &Path) -> Result<Option<String>> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(None) };
    for entry in entries {
        let entry = entry.map_err(Error::io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && (name.ends_with(".lock") || name.contains(".tmp-"))) {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Reads the store's manifest, or creates it when the store is new. Creation happens under the
/// manifest's lock (other writers wait for it), and only in a directory that holds nothing else:
/// with the manifest absent and its lock held, no culprit can have written a shard there, so any
/// other file is someone else's.
fn open_or_create_manifest(dir: &Path, fresh: &StoreManifest) -> Result<StoreManifest> {
    let manifest_path = dir.join("manifest.json");
    if !manifest_path.is_file() {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let _lock = Lock::acquire_waiting(&manifest_path, "the store manifest", std::time::Duration::from_secs(30))?;
        if !manifest_path.is_file() {
            if let Some(other) = holds_other_files(dir)? {
                return Err(Error::run(
                    dir,
                    format!(
                        "holds `{other}` but no gradient store (no manifest.json); culprit does not write into a folder it did not create: use a new or empty --store"
                    ),
                ));
            }
            fresh.write(dir)?;
        }
    }
    let existing = StoreManifest::read(dir)?;
    existing.key.check(&fresh.key, &manifest_path)?;
    if &existing != fresh {
        return Err(Error::run(
            dir,
            format!(
                "this store was laid out with dtype {:?} and {} rows per shard; resume with the same --dtype and --rows-per-shard, or use another --store",
                existing.dtype, existing.rows_per_shard
            ),
        ));
    }
    Ok(existing)
}

/// Whether shard `j` exists and verifies.
fn shard_complete(dir: &Path, manifest: &StoreManifest, j: usize) -> bool {
    let path = dir.join(&manifest.shards[j].file);
    path.is_file() && Shard::open(&path, &GradientStore::expected_header(manifest, j)).is_ok()
}

/// Builds (or resumes) the store in `dir` for `model` (on an autodiff device) and its training
/// examples `data`, under `key` (what the rows are a function of; see [`StoreKey`]).
pub fn build<M: Model>(
    dir: &Path,
    key: StoreKey,
    model: &M,
    data: &M::Batch,
    layout: &StoreLayout,
    progress: &mut dyn Progress,
) -> Result<BuildReport> {
    let started = std::time::Instant::now();
    if layout.batch == 0 {
        return Err(Error::Usage("--batch must be positive".into()));
    }
    let projector = Projector::new(layout.projection, layout.seed, model.layers(), &model.device())?;
    let row_len = projector.row_len();
    let rows_per_shard =
        layout.rows_per_shard.unwrap_or_else(|| (SHARD_BYTES / (row_len * layout.dtype.size())).max(1)).max(1);
    let fresh = StoreManifest::new(key, layout.dtype, data.len(), row_len, projector.layout().to_vec(), rows_per_shard);
    let manifest = open_or_create_manifest(dir, &fresh)?;
    let (part, parts) = layout.part.unwrap_or((0, 1));
    let mine: Vec<usize> = (0..manifest.shards.len()).filter(|j| j % parts == part).collect();
    let todo: Vec<usize> = mine.iter().copied().filter(|&j| !shard_complete(dir, &manifest, j)).collect();
    let total_rows: usize = todo.iter().map(|&j| manifest.shards[j].rows).sum();
    progress.begin("gradients", total_rows as u64);
    let (mut done, mut bytes_written, mut written) = (0usize, 0usize, 0usize);
    for &j in &todo {
        let info = &manifest.shards[j];
        let path = dir.join(&info.file);
        let _lock = Lock::acquire(&path, &format!("shard {} of the gradient store", info.file))?;
        crate::io::remove_stale_temporaries(&path)?;
        if !shard_complete(dir, &manifest, j) {
            let mut stream = ShardStream::create(&path, &GradientStore::expected_header(&manifest, j))?;
            shard_rows(
                model,
                data,
                &projector,
                info.first_row..info.first_row + info.rows,
                layout.batch,
                &mut stream,
                &mut |n| {
                    done += n;
                    progress.advance(done as u64, &format!("shard {}/{}", j + 1, manifest.shards.len()));
                },
            )?;
            bytes_written += stream.finish()?;
            written += 1;
        }
    }
    progress.finish();
    // Lock files of this part's shards and of the manifest that a killed build left behind.
    for &j in &mine {
        crate::io::lock::clear_stale(&dir.join(&manifest.shards[j].file));
    }
    {
        // Under the manifest's lock, what a killed build left writing the manifest.
        let manifest_path = dir.join("manifest.json");
        let _lock = Lock::acquire_waiting(&manifest_path, "the store manifest", std::time::Duration::from_secs(30))?;
        crate::io::remove_stale_temporaries(&manifest_path)?;
    }
    Ok(BuildReport {
        store: dir.to_path_buf(),
        rows_computed: total_rows,
        shards_written: written,
        shards_kept: mine.len() - written,
        bytes_written,
        seconds: started.elapsed().as_secs_f64(),
        complete: manifest.shards.iter().all(|s| dir.join(&s.file).is_file()),
        row_len,
    })
}

/// The projected loss-gradient rows of examples `range`, in batches, each handed to `stream`
/// (written while the next is computed); `advanced(n)` is told of every batch of n. A row that
/// is not finite is an error naming it (the stream, dropped unfinished, leaves no shard).
fn shard_rows<M: Model>(
    model: &M,
    data: &M::Batch,
    projector: &Projector,
    range: std::ops::Range<usize>,
    batch: usize,
    stream: &mut ShardStream,
    advanced: &mut dyn FnMut(usize),
) -> Result<()> {
    let row_len = projector.row_len();
    let part = data.slice(range.clone());
    for sub in part.groups().chunks(part.len(), batch, culprit_models::model::ROWS_PER_CHUNK) {
        let (start, stop) = (range.start + sub.start, range.start + sub.end);
        let chunk = part.slice(sub);
        let labels = chunk.labels().into_owned();
        let factors = layer_factors(model, &chunk, &labels, Measurement::TRAINING_LOSS);
        let projected = projector.project_rows(&factors);
        if let Some(bad) = projected.iter().position(|v| !v.is_finite()) {
            return Err(Error::Usage(format!(
                "the gradient of training row {} is not finite ({}); the model or the backend produced NaN or infinity, nothing was written for its shard",
                start + bad / row_len,
                projected[bad]
            )));
        }
        stream.push(projected)?;
        advanced(stop - start);
    }
    Ok(())
}

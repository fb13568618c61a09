//! What a run's derived files are keyed by, and how they are found, opened and checked.
//!
//! Everything computed from a run is tied to the SHA-256 of its `weights.bin` and of its data
//! manifest (canonical JSON): a gradient store by its [`StoreKey`] (plus the projection and
//! seed), a curvature file by the two hashes in its header, a self-influence cache by the
//! curvature file it was computed from. Anything built for other weights or data is refused with a
//! message saying which differs, so a stale file is never read silently.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use culprit_engine::curvature::self_influence::{self_influence, store_self_influence};
use culprit_engine::curvature::{Curvature, FitOptions, Method, Space};
use culprit_engine::gradients::projection::ProjectionSpec;
use culprit_engine::io::container::Format;
use culprit_engine::objective::Objective;
use culprit_engine::store::{GradientStore, StoreKey, StoreManifest};
use culprit_models::{Backend, Model};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::kind::Kind;
use super::run::{ModelSpec, Run};
use crate::data::{DataManifest, DataSpec, Dataset, FileDigest, hex};
use crate::error::{Error, Result};

/// SHA-256 of a file's bytes as stored (compressed or not: never decompressed here).
pub fn file_sha256(path: &Path) -> Result<String> {
    Ok(hex(&Sha256::digest(std::fs::read(path).map_err(Error::io(path))?)))
}

/// SHA-256 of a data manifest's canonical JSON.
pub fn manifest_sha256(manifest: &DataManifest) -> String {
    hex(&Sha256::digest(serde_json::to_vec(manifest).expect("plain data")))
}

/// The store key of a run for a projection.
pub fn store_key(run: &Run, projection: ProjectionSpec, seed: u64) -> Result<StoreKey> {
    Ok(StoreKey {
        weights_sha256: file_sha256(&run.dir.join("weights.bin"))?,
        data_sha256: manifest_sha256(&run.manifest),
        projection: projection.to_string(),
        seed,
    })
}

/// The projection `culprit cache --project auto` (the default) uses: for a classifier, the exact
/// one that stores least: per-layer factors when every layer is dense (the same scores as full
/// gradients, in + out values per layer instead of in·out), full gradients otherwise (a
/// convolution's gradient is not one outer product); for a language model, whose documents'
/// gradients are sums over tokens (no exact factored form) and too large to store whole,
/// LoGra's `kron:32x32`.
pub fn exact_projection(model: &ModelSpec) -> Result<ProjectionSpec> {
    Ok(match model {
        ModelSpec::Classifier(c) if c.tracked_layers()?.iter().all(|l| l.positions == 1) => {
            ProjectionSpec::Factors { k_in: usize::MAX, k_out: usize::MAX }
        }
        ModelSpec::Classifier(_) => ProjectionSpec::None,
        ModelSpec::Language(_) => ProjectionSpec::Kron { k_in: 32, k_out: 32 },
    })
}

/// Places to look for a run's training files that are no longer where its manifest says.
static MOVED_DATA_SEARCH: OnceLock<Vec<PathBuf>> = OnceLock::new();

/// Sets, once per process, where moved training data may be: files, or folders whose files are
/// candidates. The command line passes `--moved-data` and the command's own `--data` paths, so
/// `culprit trace --run R --data NEW/test.csv` finds the run's `train.csv` in `NEW/`.
pub fn search_moved_data_in(places: Vec<PathBuf>) {
    let _ = MOVED_DATA_SEARCH.set(places);
}

/// The most files of one folder hashed when looking for a moved (and renamed) training file.
const MOVED_DATA_CANDIDATES: usize = 64;

/// Where a recorded training file is now, when it is gone from its recorded place: the first
/// search place that is a file with its SHA-256, else a file of the same name in a search folder
/// (or a named file's folder), else any file there (at most [`MOVED_DATA_CANDIDATES`] a folder).
fn find_moved(f: &FileDigest) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    for place in MOVED_DATA_SEARCH.get()? {
        let dir = if place.is_dir() { place.clone() } else { place.parent().unwrap_or(Path::new(".")).to_path_buf() };
        if place.is_file() {
            candidates.push(place.clone());
        }
        candidates.extend(f.path.file_name().map(|name| dir.join(name)));
        let mut others: Vec<PathBuf> =
            std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
        others.sort();
        candidates.extend(others.into_iter().take(MOVED_DATA_CANDIDATES));
    }
    let mut seen = std::collections::HashSet::new();
    candidates
        .into_iter()
        .filter(|c| c.is_file() && seen.insert(c.clone()))
        .find(|c| file_sha256(c).is_ok_and(|sha| sha == f.sha256))
}

/// The run's data spec with every training file where it is now: where the manifest says, or
/// found by its SHA-256 after a move ([`search_moved_data_in`]); a note names each moved one.
fn located_training_spec(run: &Run) -> Result<DataSpec> {
    let m = &run.manifest;
    let mut path = m.path.clone();
    for f in &m.files {
        let actual = if f.path.exists() {
            f.path.clone()
        } else {
            let Some(new) = find_moved(f) else {
                return Err(Error::data(
                    &f.path,
                    None,
                    format!(
                        "no such file: the run in {} was trained on it; if it moved, name its new place (or a folder holding it) with --moved-data, or give a --data beside it; it is found by its SHA-256",
                        run.dir.display()
                    ),
                ));
            };
            eprintln!("note: the training data {} is now at {} (same SHA-256)", f.path.display(), new.display());
            if path == f.path {
                path = new.clone();
            } else if f.path.parent() == Some(path.as_path()) {
                path = new.parent().unwrap_or(Path::new(".")).to_path_buf();
            }
            new
        };
        let sha = file_sha256(&actual)?;
        if sha != f.sha256 {
            let what = changed_examples(run, m, &path).map(|w| format!(": {w}")).unwrap_or_default();
            return Err(Error::data(
                &actual,
                None,
                format!("changed since the run in {} was trained (SHA-256 differs){what}", run.dir.display()),
            ));
        }
    }
    Ok(DataSpec { path, split: m.split, skip: m.skip, limit: m.limit })
}

/// Which trained examples changed, from the run's provenance records against the data at
/// `path` now (`None` without records, or when the data cannot be read as it was).
fn changed_examples(run: &Run, m: &crate::data::DataManifest, path: &Path) -> Option<String> {
    let recorded = crate::data::provenance::read(&run.dir.join(super::run::PROVENANCE)).ok()?;
    let spec = DataSpec { path: path.to_path_buf(), split: m.split, skip: 0, limit: None };
    let now = crate::data::provenance::records(m.kind, &spec, true).ok()?;
    let what = crate::data::provenance::changes(&recorded, &now);
    (!what.is_empty()).then_some(what)
}

/// Loads a run's training data and checks the files are the ones it was trained on (found by
/// their SHA-256 when they moved).
pub fn training_data<K: Kind>(run: &Run) -> Result<Dataset<K::Batch>> {
    let m = &run.manifest;
    let spec = located_training_spec(run)?;
    let mut data = K::load(run, &spec)?;
    data.exclude(&m.excluded)?;
    Ok(data)
}

/// The run's default store directory, `RUN/gradients`.
pub fn default_store(run: &Run) -> PathBuf {
    run.dir.join("gradients")
}

/// Opens the store of a run (default `RUN/gradients`), whatever projection it was built with,
/// checking it was built for this run's weights and data.
pub fn open_store(run: &Run, store: Option<PathBuf>) -> Result<(GradientStore, ProjectionSpec)> {
    let dir = store.unwrap_or_else(|| default_store(run));
    if !dir.join("manifest.json").is_file() {
        return Err(Error::run(
            &dir,
            format!("no gradient store here; build it with `culprit cache --run {}`", run.dir.display()),
        ));
    }
    let manifest = StoreManifest::read(&dir)?;
    let spec = ProjectionSpec::parse(&manifest.key.projection)?;
    let key = store_key(run, spec, manifest.key.seed)?;
    Ok((GradientStore::open(&dir, &key)?, spec))
}

/// The objective of a run on `backend` (an autodiff device), in the kind's curvature dtype, with
/// its training data.
pub fn objective<K: Kind>(run: &Run, backend: Backend) -> Result<(Objective<K::Model>, Dataset<K::Batch>)> {
    let device = backend.autodiff_device();
    let data = training_data::<K>(run)?;
    let model = K::model(run, &device)?;
    let l2 = run.config.training.l2;
    Ok((Objective::in_dtype(&model, data.examples.clone(), l2, &device, K::curvature_dtype()), data))
}

/// Where `culprit fit` stores a method's factors: `RUN/curvature/METHOD.bin`.
pub fn curvature_path(run_dir: &Path, method: Method) -> PathBuf {
    run_dir.join("curvature").join(format!("{}.bin", method.name()))
}

/// Saves a fitted curvature in the run, tied to its weights and data.
pub fn save_curvature(run: &Run, curvature: &Curvature) -> Result<PathBuf> {
    let path = curvature_path(&run.dir, curvature.options.method);
    let key = store_key(run, ProjectionSpec::None, 0)?;
    curvature.save(&path, &key.weights_sha256, &key.data_sha256, run.config.training.l2)?;
    Ok(path)
}

/// Loads a run's fitted curvature (`identity` needs no fit).
pub fn load_curvature<M: Model>(run: &Run, objective: &Objective<M>, method: Method) -> Result<Curvature> {
    let key = store_key(run, ProjectionSpec::None, 0)?;
    let path = curvature_path(&run.dir, method);
    if path.is_file() {
        Curvature::load(&path, &key.weights_sha256, &key.data_sha256, objective.model.layers())
    } else if method == Method::Identity {
        Curvature::fit(objective, &FitOptions::new(method))
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

/// The container of a self-influence cache: magic `CULPRITS`, version 1, f64 values 8-byte
/// aligned, keyed by the curvature file it was computed from.
pub const SELF_INFLUENCE_FORMAT: Format =
    Format { magic: b"CULPRITS", version: 1, readable: 1..=1, align: 8, what: "self-influence cache" };

/// What a self-influence cache was computed from: the curvature file (its length and CRC-32
/// footer, which change whenever it is refitted; the file itself is tied to the weights and data)
/// and, for the projected curvature, the store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SelfInfluenceKey {
    curvature_len: u64,
    curvature_crc32: u32,
    store: Option<StoreKey>,
    rows: usize,
}

/// How the self-influence cache was used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheUse {
    /// Read from a valid cache.
    Read,
    /// Computed and written.
    Written,
    /// Computed, but the cache could not be written (a read-only run): why.
    NotWritten(String),
}

fn curvature_file_key(path: &Path) -> Option<(u64, u32)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::End(-4)).ok()?;
    let mut crc = [0u8; 4];
    f.read_exact(&mut crc).ok()?;
    Some((len, u32::from_le_bytes(crc)))
}

fn read_self_influence(path: &Path, key: &SelfInfluenceKey) -> Option<Vec<f64>> {
    let bytes = std::fs::read(path).ok()?;
    let container = SELF_INFLUENCE_FORMAT.parse(path, &bytes).ok()?;
    let stored: SelfInfluenceKey = serde_json::from_slice(container.header).ok()?;
    (stored == *key && container.payload.len() == 8 * key.rows).then(|| {
        container.payload.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
    })
}

/// Self-influence of every training example of `run` under its fitted `curvature` (from the
/// store's rows for the projected curvature), cached beside the curvature file in
/// `RUN/curvature/METHOD.self.bin` (format in docs/FORMAT.md). A cache that is missing, corrupted
/// or stale (the curvature was refitted, another store) is recomputed and rewritten; one that
/// cannot be written (a read-only run) is computed in memory. Returns the values, in
/// training-data order, and how the cache was used.
pub fn training_self_influence<M: Model>(
    run: &Run,
    objective: &Objective<M>,
    curvature: &Curvature,
    store: Option<&GradientStore>,
) -> Result<(Vec<f64>, CacheUse)> {
    let curvature_file = curvature_path(&run.dir, curvature.options.method);
    let projected = matches!(curvature.space(), Space::Projected(_));
    let key = curvature_file_key(&curvature_file).map(|(curvature_len, curvature_crc32)| SelfInfluenceKey {
        curvature_len,
        curvature_crc32,
        store: if projected { store.map(|s| s.manifest.key.clone()) } else { None },
        rows: objective.len(),
    });
    let cache = curvature_file.with_extension("self.bin");
    if let Some(values) = key.as_ref().and_then(|k| read_self_influence(&cache, k)) {
        return Ok((values, CacheUse::Read));
    }
    let values = match (projected, store) {
        (true, Some(store)) => store_self_influence(curvature, store)?,
        _ => self_influence(objective, curvature, &objective.data)?,
    };
    let used = match &key {
        Some(k) => {
            let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            match SELF_INFLUENCE_FORMAT.write_file(&cache, k, &payload) {
                Ok(()) => CacheUse::Written,
                Err(e) => CacheUse::NotWritten(e.to_string()),
            }
        }
        None => CacheUse::NotWritten("no curvature file to key it by".into()),
    };
    Ok((values, used))
}

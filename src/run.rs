//! A run directory: a trained model and everything needed to reproduce and trust it.
//!
//! ```text
//! RUN_DIR/
//!   config.json    model shape, training settings, backend, final report (RunConfig)
//!   manifest.json  the data: files and their SHA-256, rows, preprocessing (DataManifest)
//!   weights.bin    θ as f64, checksummed (format in docs/FORMAT.md)
//!   train.log      the training log
//! ```
//!
//! A run directory is written whole or not at all: everything goes into a sibling temporary
//! directory, each file is synced, and the directory is renamed into place. An existing
//! directory is never overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use culprit_models::{Backend, ModelConfig, Network, TrainConfig, TrainReport};
use serde::{Deserialize, Serialize};

use crate::data::DataManifest;
use crate::error::{Error, Result};

/// First bytes of `weights.bin`.
pub const WEIGHTS_MAGIC: &[u8; 8] = b"CULPRITW";
/// Version of the `weights.bin` layout.
pub const WEIGHTS_VERSION: u32 = 1;
const DTYPE_F64: u32 = 1;

/// `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunConfig {
    /// culprit version that wrote the run.
    pub culprit_version: String,
    /// The model's shape.
    pub model: ModelConfig,
    /// How it was trained.
    pub training: TrainConfig,
    /// The backend it was trained on.
    pub backend: String,
    /// How training ended.
    pub report: TrainReport,
}

/// A loaded run.
#[derive(Clone, Debug)]
pub struct Run {
    /// The directory.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: RunConfig,
    /// `manifest.json`.
    pub manifest: DataManifest,
    /// θ from `weights.bin`.
    pub theta: Vec<f64>,
}

/// Serialises θ into the `weights.bin` layout.
pub fn encode_weights(theta: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(28 + 8 * theta.len());
    out.extend_from_slice(WEIGHTS_MAGIC);
    out.extend_from_slice(&WEIGHTS_VERSION.to_le_bytes());
    out.extend_from_slice(&DTYPE_F64.to_le_bytes());
    out.extend_from_slice(&(theta.len() as u64).to_le_bytes());
    for v in theta {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parses and verifies a `weights.bin` image.
pub fn decode_weights(path: &Path, bytes: &[u8]) -> Result<Vec<f64>> {
    if bytes.len() < 28 || &bytes[..8] != WEIGHTS_MAGIC {
        return Err(Error::run(path, "not a culprit weights file (bad magic or too short)"));
    }
    let (body, footer) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(footer.try_into().expect("4 bytes"));
    let actual = crc32fast::hash(body);
    if stored != actual {
        return Err(Error::run(
            path,
            format!("checksum mismatch (stored {stored:08x}, computed {actual:08x}): the file is corrupted"),
        ));
    }
    let version = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
    if version != WEIGHTS_VERSION {
        return Err(Error::run(
            path,
            format!("weights format version {version}; this culprit reads version {WEIGHTS_VERSION}"),
        ));
    }
    let dtype = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes"));
    if dtype != DTYPE_F64 {
        return Err(Error::run(path, format!("unknown dtype code {dtype}")));
    }
    let count = u64::from_le_bytes(body[16..24].try_into().expect("8 bytes")) as usize;
    if body.len() != 24 + 8 * count {
        return Err(Error::run(
            path,
            format!("header promises {count} parameters, the file holds {} bytes of them", body.len() - 24),
        ));
    }
    Ok(body[24..].chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(Error::io(path))?;
    f.write_all(bytes).map_err(Error::io(path))?;
    f.sync_all().map_err(Error::io(path))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(Error::io(path))
}

/// A fresh, empty temporary directory beside `dir` (`.NAME.partial-PID`), to be renamed to `dir`
/// once everything in it is written: a directory appears whole or not at all.
pub fn temp_sibling(dir: &Path) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| Error::run(dir, "not a directory name"))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(Error::io(&parent))?;
    let tmp = parent.join(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(Error::io(&tmp))?;
    Ok(tmp)
}

impl Run {
    /// Writes a new run directory atomically. Refuses to replace an existing one.
    pub fn create(
        dir: &Path,
        network: &Network,
        training: &TrainConfig,
        backend: Backend,
        report: &TrainReport,
        manifest: &DataManifest,
        log: &str,
    ) -> Result<Run> {
        if dir.exists() {
            return Err(Error::run(dir, "already exists; choose another --out or remove it"));
        }
        let tmp = temp_sibling(dir)?;
        let config = RunConfig {
            culprit_version: env!("CARGO_PKG_VERSION").into(),
            model: network.config().clone(),
            training: training.clone(),
            backend: backend.name().into(),
            report: report.clone(),
        };
        let theta = network.to_flat();
        let written = (|| {
            let json = |v: &dyn erased::Json| v.to_pretty();
            write_synced(&tmp.join("config.json"), json(&config).as_bytes())?;
            write_synced(&tmp.join("manifest.json"), json(manifest).as_bytes())?;
            write_synced(&tmp.join("weights.bin"), &encode_weights(&theta))?;
            write_synced(&tmp.join("train.log"), log.as_bytes())?;
            std::fs::rename(&tmp, dir).map_err(Error::io(dir))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(Run { dir: dir.to_path_buf(), config, manifest: manifest.clone(), theta })
    }

    /// Opens a run directory, verifying the weights' checksum and size.
    pub fn open(dir: &Path) -> Result<Run> {
        if !dir.is_dir() {
            return Err(Error::run(dir, "no such run directory"));
        }
        let read_json = |name: &str| -> Result<String> {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(Error::io(&p))
        };
        let config: RunConfig = serde_json::from_str(&read_json("config.json")?)
            .map_err(|e| Error::run(&dir.join("config.json"), format!("unreadable: {e}")))?;
        let manifest: DataManifest = serde_json::from_str(&read_json("manifest.json")?)
            .map_err(|e| Error::run(&dir.join("manifest.json"), format!("unreadable: {e}")))?;
        let wpath = dir.join("weights.bin");
        let theta = decode_weights(&wpath, &std::fs::read(&wpath).map_err(Error::io(&wpath))?)?;
        let expected = config.model.num_params()?;
        if theta.len() != expected {
            return Err(Error::run(
                &wpath,
                format!("{} parameters, the model in config.json has {expected}", theta.len()),
            ));
        }
        Ok(Run { dir: dir.to_path_buf(), config, manifest, theta })
    }

    /// The trained model on `device`, in f64 for convex models and f32 otherwise.
    pub fn network(&self, device: &burn::tensor::Device) -> Result<Network> {
        let dtype = if self.config.model.architecture.is_convex() {
            burn::tensor::DType::F64
        } else {
            burn::tensor::DType::F32
        };
        Ok(Network::from_flat(&self.config.model, &self.theta, device, dtype)?)
    }
}

mod erased {
    /// Pretty JSON for any serialisable value (lets one closure write several types).
    pub trait Json {
        fn to_pretty(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_pretty(&self) -> String {
            serde_json::to_string_pretty(self).expect("plain data serialises") + "\n"
        }
    }
}

//! A run directory: a trained model and everything needed to reproduce and trust it.
//!
//! ```text
//! RUN_DIR/
//!   config.json    model shape, training settings, backend, final report (RunConfig)
//!   manifest.json  the data: files and their SHA-256, rows, preprocessing (DataManifest)
//!   weights.bin    θ as f64, checksummed (format in docs/FORMAT.md)
//!   train.log      the training log
//!   provenance.jsonl  each training example's file, row, SHA-256 and source (data::provenance)
//! ```
//!
//! A run directory is written whole or not at all: everything goes into a sibling temporary
//! directory, each file is synced, and the directory is renamed into place. An existing
//! directory is never overwritten.

use std::path::{Path, PathBuf};

use culprit_models::{Backend, Gpt, GptConfig, ModelConfig, Network, TrainConfig, TrainReport};
use serde::{Deserialize, Serialize};

use crate::data::DataManifest;
use crate::error::{Error, Result};
use crate::io::container::Format;
use crate::io::{AtomicDir, write_new};

/// The container of `weights.bin` (version 2): magic `CULPRITW`, a JSON header
/// `{"dtype": "f64", "count": N}`, then θ as N little-endian f64. Version-1 files (no JSON header:
/// dtype code and count as integers) are still read.
pub const WEIGHTS_FORMAT: Format =
    Format { magic: b"CULPRITW", version: 2, readable: 2..=2, align: 8, what: "weights file" };

/// The header of `weights.bin`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WeightsHeader {
    dtype: String,
    count: usize,
}

/// The shape of a run's model: a reference classifier or a language model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelSpec {
    /// A reference classifier (logreg, MLP, CNN, text) on features.
    Classifier(ModelConfig),
    /// A language model on token sequences.
    Language(LanguageModel),
}

/// A language model's shape and tokenizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LanguageModel {
    /// The architecture (`gpt`).
    pub architecture: LanguageArchitecture,
    /// Its sizes.
    pub gpt: GptConfig,
    /// Its tokenizer.
    pub tokenizer: crate::data::tokenizer::TokenizerSpec,
}

/// The language-model architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LanguageArchitecture {
    /// GPT-2 ([`culprit_models::gpt`]).
    Gpt,
}

impl ModelSpec {
    /// The architecture's CLI name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Classifier(c) => c.architecture.name(),
            Self::Language(_) => "gpt",
        }
    }

    /// Number of parameters.
    pub fn num_params(&self) -> Result<usize> {
        Ok(match self {
            Self::Classifier(c) => c.num_params()?,
            Self::Language(l) => l.gpt.num_params(),
        })
    }

    /// Whether the objective is convex (then training reaches the optimum in f64).
    pub fn is_convex(&self) -> bool {
        matches!(self, Self::Classifier(c) if c.architecture.is_convex())
    }

    /// The classifier's shape, or an error saying the run holds a language model.
    pub fn classifier(&self) -> Result<&ModelConfig> {
        match self {
            Self::Classifier(c) => Ok(c),
            Self::Language(_) => Err(Error::Usage("this run holds a language model; this works on classifiers".into())),
        }
    }

    /// The language model's shape, or an error saying the run holds a classifier.
    pub fn language(&self) -> Result<&LanguageModel> {
        match self {
            Self::Language(l) => Ok(l),
            Self::Classifier(c) => Err(Error::Usage(format!(
                "this run holds a {} classifier; this works on language models",
                c.architecture.name()
            ))),
        }
    }
}

/// `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunConfig {
    /// culprit version that wrote the run.
    pub culprit_version: String,
    /// The model's shape.
    pub model: ModelSpec,
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

/// Serialises θ into the `weights.bin` container.
pub fn encode_weights(theta: &[f64]) -> Vec<u8> {
    let payload: Vec<u8> = theta.iter().flat_map(|v| v.to_le_bytes()).collect();
    WEIGHTS_FORMAT.encode(&WeightsHeader { dtype: "f64".into(), count: theta.len() }, &payload)
}

/// Parses and verifies a `weights.bin` image (version 2, or the headerless version 1).
pub fn decode_weights(path: &Path, bytes: &[u8]) -> Result<Vec<f64>> {
    if bytes.len() >= 12 && bytes[..8] == *WEIGHTS_FORMAT.magic && bytes[8..12] == 1u32.to_le_bytes() {
        return decode_weights_v1(path, bytes);
    }
    let container = WEIGHTS_FORMAT.parse(path, bytes)?;
    let header: WeightsHeader = container.header(path, "weights")?;
    if header.dtype != "f64" {
        return Err(Error::run(path, format!("unknown dtype `{}`", header.dtype)));
    }
    if container.payload.len() != 8 * header.count {
        return Err(Error::run(
            path,
            format!(
                "header promises {} parameters, the file holds {} bytes of them",
                header.count,
                container.payload.len()
            ),
        ));
    }
    Ok(container.payload.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// Version 1: magic, version, dtype code 1 (f64) as u32, count as u64, values, CRC-32.
fn decode_weights_v1(path: &Path, bytes: &[u8]) -> Result<Vec<f64>> {
    if bytes.len() < 28 {
        return Err(Error::run(path, "not a culprit weights file (too short)"));
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
    if u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) != 1 {
        return Err(Error::run(path, "unknown dtype code"));
    }
    let count = u64::from_le_bytes(body[16..24].try_into().expect("8 bytes")) as usize;
    if body.len() != 24 + count.saturating_mul(8) {
        return Err(Error::run(
            path,
            format!("header promises {count} parameters, the file holds {} bytes", body.len()),
        ));
    }
    Ok(body[24..].chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

fn pretty(value: &impl Serialize) -> String {
    serde_json::to_string_pretty(value).expect("plain data serialises") + "\n"
}

/// The name of a run's provenance records.
pub const PROVENANCE: &str = "provenance.jsonl";

/// The sub-directory of a run that holds its checkpoints (`train --checkpoints`).
pub const CHECKPOINTS: &str = "checkpoints";

/// A checkpoint of a run: the model at the end of an earlier epoch of the same training, a run
/// directory of its own at `RUN/checkpoints/epoch-E`.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The epoch it ends (1-based).
    pub epoch: usize,
    /// Its run directory.
    pub dir: PathBuf,
}

impl Checkpoint {
    /// The directory of `run_dir`'s checkpoint of `epoch`.
    pub fn dir_of(run_dir: &Path, epoch: usize) -> PathBuf {
        run_dir.join(CHECKPOINTS).join(format!("epoch-{epoch}"))
    }
}

impl Run {
    /// The run's checkpoints, by epoch (none for a run trained without `--checkpoints`).
    /// Directories still being written (temporary names) are not listed.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let root = self.dir.join(CHECKPOINTS);
        if !root.is_dir() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&root).map_err(Error::io(&root))? {
            let entry = entry.map_err(Error::io(&root))?;
            let name = entry.file_name();
            let epoch = name.to_str().and_then(|n| n.strip_prefix("epoch-")).and_then(|e| e.parse::<usize>().ok());
            if let Some(epoch) = epoch.filter(|_| entry.path().is_dir()) {
                found.push(Checkpoint { epoch, dir: entry.path() });
            }
        }
        found.sort_by_key(|c| c.epoch);
        Ok(found)
    }

    /// [`Run::checkpoints`], at least one: an error naming the run if it has none.
    pub fn require_checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let checkpoints = self.checkpoints()?;
        if checkpoints.is_empty() {
            return Err(Error::run(
                &self.dir,
                "has no checkpoints (RUN/checkpoints/epoch-E) for --checkpoints; train it with `culprit train --checkpoints K`",
            ));
        }
        Ok(checkpoints)
    }

    /// Writes a new run directory atomically (with `extra` files, e.g. a tokenizer, copied in).
    /// Refuses to replace an existing one.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        dir: &Path,
        model: &ModelSpec,
        theta: Vec<f64>,
        training: &TrainConfig,
        backend: Backend,
        report: &TrainReport,
        manifest: &DataManifest,
        log: &str,
        extra: &[(&str, &Path)],
    ) -> Result<Run> {
        let tmp = AtomicDir::create(dir)?;
        let config = RunConfig {
            culprit_version: env!("CARGO_PKG_VERSION").into(),
            model: model.clone(),
            training: training.clone(),
            backend: backend.name().into(),
            report: report.clone(),
        };
        for (name, source) in extra {
            let bytes = std::fs::read(source).map_err(Error::io(source))?;
            write_new(&tmp.path().join(name), &bytes)?;
        }
        write_new(&tmp.path().join("config.json"), pretty(&config).as_bytes())?;
        write_new(&tmp.path().join("manifest.json"), pretty(manifest).as_bytes())?;
        write_new(&tmp.path().join("weights.bin"), &encode_weights(&theta))?;
        write_new(&tmp.path().join("train.log"), log.as_bytes())?;
        let spec = crate::data::DataSpec {
            path: manifest.path.clone(),
            split: manifest.split,
            skip: manifest.skip,
            limit: manifest.limit,
        };
        let mut records = crate::data::provenance::records(manifest.kind, &spec, false)?;
        records.retain(|r| manifest.excluded.binary_search(&r.id).is_err());
        crate::data::provenance::write(&tmp.path().join(PROVENANCE), &records)?;
        tmp.commit()?;
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

    /// The trained classifier on `device`, in f64 for convex models and f32 otherwise.
    pub fn network(&self, device: &burn::tensor::Device) -> Result<Network> {
        let config = self.config.model.classifier()?;
        let dtype = if config.architecture.is_convex() { burn::tensor::DType::F64 } else { burn::tensor::DType::F32 };
        Ok(Network::from_flat(config, &self.theta, device, dtype)?)
    }

    /// The trained language model on `device`, in f32.
    pub fn gpt(&self, device: &burn::tensor::Device) -> Result<Gpt> {
        let config = &self.config.model.language()?.gpt;
        Ok(Gpt::from_flat(config, &self.theta, device, burn::tensor::DType::F32)?)
    }

    /// The run's tokenizer (language models).
    pub fn tokenizer(&self) -> Result<crate::data::tokenizer::Tokenizer> {
        crate::data::tokenizer::Tokenizer::open(&self.config.model.language()?.tokenizer, &self.dir)
    }
}

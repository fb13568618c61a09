//! A poisoned data set as `culprit poison` writes it: its `poison.json` ([`PoisonManifest`]) says
//! what was planted where, so later commands (`culprit purge --attack`) can measure the attack and
//! check which removed examples were poisons.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{DataSpec, Split};
use crate::error::{Error, Result};

/// One written data set: how to pass it to `--data`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WrittenData {
    /// `--data`.
    pub path: PathBuf,
    /// `--split` (IDX folders).
    pub split: Split,
    /// Examples.
    pub count: usize,
}

impl WrittenData {
    /// As a [`DataSpec`] selecting every row.
    pub fn spec(&self) -> DataSpec {
        DataSpec { path: self.path.clone(), split: self.split, skip: 0, limit: None }
    }
}

/// `poison.json`: what `culprit poison` did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoisonManifest {
    /// The trigger (CLI form).
    pub trigger: String,
    /// The raw value a patch wrote.
    pub patch_value: Option<f32>,
    /// The target class.
    pub target: u32,
    /// Share of the training set backdoored.
    pub rate: f64,
    /// Share of the others given a wrong label.
    pub label_noise: f64,
    /// Seed.
    pub seed: u64,
    /// The source of the training rows, with `skip`/`limit`.
    pub source: PathBuf,
    /// Backdoored training set.
    pub train: WrittenData,
    /// Clean test set.
    pub test_clean: WrittenData,
    /// Triggered test set (labels kept).
    pub test_triggered: WrittenData,
    /// Ids (rows of `train`) of the backdoored examples, ascending.
    pub poisoned: Vec<usize>,
    /// Ids of the label-noise examples, ascending.
    pub flipped: Vec<usize>,
    /// Language-model corpora: the completion planted after the trigger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
}

impl PoisonManifest {
    /// Reads `DIR/poison.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("poison.json");
        let bytes = std::fs::read(&path).map_err(Error::io(&path))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::data(&path, None, format!("not a poison.json written by culprit poison: {e}")))
    }
}

//! The run workspace: what ties a run directory together, between the engine below and the
//! commands above.
//!
//! A run directory holds a trained model and everything computed from it:
//!
//! ```text
//! RUN_DIR/
//!   config.json        model shape, training settings, backend, final report ([`run::RunConfig`])
//!   manifest.json      the data: files and their SHA-256, rows, preprocessing (DataManifest)
//!   weights.bin        θ as f64, checksummed (docs/FORMAT.md)
//!   train.log          the training log
//!   gradients/         the gradient store (`culprit cache`)
//!   curvature/M.bin    a fitted curvature method M (`culprit fit`)
//!   curvature/M.self.bin  the training examples' self-influence under M (a cache)
//!   checkpoints/epoch-E/  the model at the end of epoch E, a run directory of its own
//!                      (`train --checkpoints`)
//! ```
//!
//! - [`run`]: opening and writing a run directory (written whole or not at all);
//! - [`training`]: training a model on a data set into a new run directory;
//! - [`artifacts`]: what a run's files are keyed by (weights and data hashes), its training data
//!   checked against the files it was trained on, its store, its objective and fitted curvatures,
//!   and the self-influence cache;
//! - [`predict`]: predictions of a run's model on a data set;
//! - [`attribution`]: a trace, from a run and its queries to the report;
//! - [`checkpoints`]: a trace with the run's checkpoints instead of its final model (TracIn-CP).

pub mod artifacts;
pub mod attribution;
pub mod checkpoints;
pub mod kind;
pub mod predict;
pub mod run;
pub mod training;

pub use artifacts::{
    curvature_path, exact_projection, file_sha256, load_curvature, objective, open_store, store_key, training_data,
};
pub use run::Run;

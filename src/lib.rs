//! # culprit: which training examples made the model do this?
//!
//! culprit is a training-data attribution engine. Given a trained model and an output it got
//! wrong (a backdoored input, a leaked string, a mislabelled face), it ranks the training examples
//! by their influence on that output, then helps act on the answer: purge and retrain, audit
//! memorisation.
//!
//! The crates and layers, each depending only on the ones below it (`docs/ARCHITECTURE.md`):
//!
//! | layer | what | where |
//! |---|---|---|
//! | commands | one module per CLI command (`train`, `cache`, `fit`, `trace`, `purge`, …) | [`commands`] |
//! | reports | the trace and scan reports' schemas, tables and HTML pages | [`report`] |
//! | workspace | run directories: training, the store and curvature files of a run, traces | [`workspace`] |
//! | scan, dedup | trigger scanning (features against labels) and near-duplicate groups, without a model | [`scan`], [`dedup`] |
//! | data | loaders with stable example ids, preprocessing, poisoned-set manifests | [`data`] |
//! | engine | per-example gradients, the gradient store, curvature, scoring (crate `culprit-engine`) | [`gradients`], [`store`], [`curvature`], [`query`], [`objective`] |
//! | models | the `Model` trait, the reference models, their training (crate `culprit-models`) | [`culprit_models`] |
//! | io | atomic files, locks, the one binary container (in `culprit-engine`) | [`io`] |
//!
//! The objective every score refers to is L(θ) = (1/n) Σᵢ CE(f(xᵢ; θ), yᵢ) + (λ/2)‖θ‖², biases
//! included (see [`culprit_models::train`]).

pub mod commands;
pub mod data;
pub mod dedup;
pub mod progress;
pub mod report;
pub mod scan;
pub mod workspace;

pub use culprit_engine::{Error, Result};
pub use culprit_engine::{curvature, error, gradients, io, objective, params, query, store};

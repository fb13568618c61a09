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
pub use culprit_engine::{curvature, error, gradients, io, objective, params, query, simd, store};

/// Keeps freed memory in the process: burn allocates and frees a tensor per operation, many of
/// them megabytes, and glibc's defaults hand those back to the kernel and fault them in again
/// (measured: a fifth of a language model's training time in page faults; with these settings
/// the system time fell from 3.3 s to 0.5 s of a 14 s run). mallopt: M_TRIM_THRESHOLD (−1) and
/// M_TOP_PAD (−2) 1 GiB and 256 MiB, M_MMAP_THRESHOLD (−3) its 32 MiB maximum.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; call it before any thread starts (the
    // CLI does, and so do the benches, to measure what it runs).
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

//! # culprit-engine: the attribution engine
//!
//! The steps of the pipeline that turn a trained model and its training data into scores, for
//! any model that implements [`culprit_models::Model`]:
//!
//! | step | what | module |
//! |---|---|---|
//! | 1. gradients | exact per-example gradients from layer taps; random and Kronecker projections | [`gradients`] |
//! | 1. store | a sharded, checksummed, memory-mapped store of gradient rows | [`store`] |
//! | 2. curvature | the objective ([`objective`]) and inverse-curvature products: dense, CG, LiSSA, Arnoldi, K-FAC, EK-FAC, … | [`curvature`] |
//! | 3. query | scores of many queries against a store in one pass, with top-k | [`query`] |
//!
//! Beneath them, [`io`] writes files atomically, locks writers and holds the one binary container
//! every culprit file uses; [`simd`] picks the instruction set of the kernels; [`error`] holds the typed errors; [`params`] the typed option values.
//! Nothing here knows about run directories, data files or commands: those live in the `culprit`
//! crate, above this one, and the compiler keeps it that way.

pub mod curvature;
pub mod error;
pub mod gradients;
pub mod io;
pub mod objective;
pub mod params;
pub mod query;
pub mod simd;
pub mod store;

pub use error::{CurvatureError, Error, Result};

//! # culprit: which training examples made the model do this?
//!
//! culprit is a training-data attribution engine. Given a trained model and an output it got
//! wrong (a backdoored input, a leaked string, a mislabelled face), it ranks the training examples
//! by their influence on that output, then helps act on the answer: purge and retrain, audit
//! memorisation.
//!
//! The pipeline, and where each step lives:
//!
//! | step | what | module |
//! |---|---|---|
//! | 0. data and models | loaders with stable example ids; reference models trained to a documented objective | [`data`], [`training`], [`run`], `culprit-models` |
//! | 1. gradient cache | exact per-example gradients from layer taps, random projections, a checksummed sharded store | [`gradients`], [`store`], [`cache`] |
//! | 2. curvature | inverse-Hessian-vector products: dense, CG, LiSSA, Arnoldi, K-FAC, EK-FAC | [`curvature`] |
//! | 3. query | top proponents and opponents of an output, streamed against the store | [`query`], [`trace`] |
//! | 4. act | plant a backdoor, purge and retrain, audit, check scores against actual retraining | [`poison`], [`purge`], [`audit`], [`eval`] |
//!
//! The objective every score refers to is L(θ) = (1/n) Σᵢ CE(f(xᵢ; θ), yᵢ) + (λ/2)‖θ‖², biases
//! included (see [`culprit_models::train`]).

pub mod audit;
pub mod cache;
pub mod curvature;
pub mod data;
pub mod demo;
pub mod error;
pub mod eval;
pub mod fit;
pub mod gradients;
pub mod poison;
pub mod predict;
pub mod progress;
pub mod purge;
pub mod query;
pub mod report;
pub mod run;
pub mod store;
pub mod trace;
pub mod training;

pub use error::{Error, Result};

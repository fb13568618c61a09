//! # culprit-models: the reference models and their training
//!
//! culprit attributes a model's behaviour to its training data. This crate holds the models it
//! ships: their shapes ([`config`]), parameters and forward pass with layer taps ([`network`]),
//! and their training to the objective every influence score is defined against ([`train`]):
//!
//! L(θ) = (1/n) Σᵢ CE(f(xᵢ; θ), yᵢ) + (λ/2) ‖θ‖², biases included.
//!
//! | architecture | layers | trained by |
//! |---|---|---|
//! | `logreg` | dense d→C | full-batch L-BFGS in f64 to ‖∇L‖ < 1e-6 |
//! | `mlp` | dense → act → … → dense | Adam or SGD, f32 |
//! | `cnn` | conv5×5(6) → act → pool → conv5×5(16) → act → pool → dense head | Adam or SGD, f32 |
//! | `text` | embedding bag (no bias) → dense | Adam or SGD, f32 |
//!
//! The engine sees every model through the [`Model`] trait ([`model`]): its tracked layers with
//! their Kronecker view, a tapped forward pass over a [`Batch`] of its own kind of inputs, and its
//! outputs as rows of class logits. The reference classifiers ([`Network`]) implement it, on
//! batches of [`Features`]; another model implements it too, in this crate or outside it.

pub mod config;
pub mod device;
pub mod elementary;
mod error;
pub mod features;
pub mod gpt;
pub mod hf;
pub mod lbfgs;
pub mod model;
pub mod network;
pub mod tokens;
pub mod train;

pub use config::{Activation, Architecture, InputShape, LayerKind, LayerSpec, ModelConfig};
pub use device::{Backend, GpuAdapter};
pub use error::ModelError;
pub use features::Features;
pub use gpt::{Gpt, GptConfig};
pub use model::{Batch, LayerTap, Model, RowGroups, TrackedLayer, WeightLayout};
pub use network::Network;
pub use tokens::Tokens;
pub use train::{OptimizerKind, Progress, Silent, TrainConfig, TrainReport};

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
//! Every trainable layer exposes its input activations and the per-example gradient of the loss
//! at its output ([`network::LayerTap`]); per-example parameter gradients are built from those.

pub mod config;
pub mod device;
mod error;
pub mod lbfgs;
pub mod network;
pub mod train;

pub use config::{Activation, Architecture, InputShape, LayerKind, LayerSpec, ModelConfig};
pub use device::Backend;
pub use error::ModelError;
pub use network::{Activations, LayerTap, Network};
pub use train::{Examples, OptimizerKind, Progress, Silent, TrainConfig, TrainReport};

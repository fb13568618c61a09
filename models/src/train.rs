//! Training: the objective every influence score is defined against, and how it is minimised.
//!
//! The objective, for every model:
//!
//! L(θ) = (1/n) Σᵢ CE(f(xᵢ; θ), yᵢ) + (λ/2) ‖θ‖²
//!
//! over all parameters, biases included, with λ = `l2`. Influence scores are derivatives of this
//! exact L, so changing it (a mean instead of a sum, an unregularised bias) changes their scale.
//!
//! - Convex models (`logreg`) are trained in f64 by full-batch [`Lbfgs`] until ‖∇L‖₂ < `tolerance`
//!   (1e-6 by default): influence functions assume θ is a minimum.
//! - Deep models are trained in f32 by mini-batch Adam or SGD with momentum (burn-optim's update
//!   rules), with a cosine learning-rate decay to zero over all steps, on a ChaCha8 shuffle seeded
//!   by `seed`. The same seed, data and backend give bit-identical weights.
//!
//! Cost: one full-batch pass per L-BFGS evaluation (O(n·d·C) for logistic regression); one
//! forward and backward per mini-batch for the deep models.

use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, Optimizer, SgdConfig};
use burn::tensor::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::ModelError;
use crate::config::ModelConfig;
use crate::features::Features;
use crate::lbfgs::Lbfgs;
use crate::model::{Batch, Model};
use crate::network::{Network, cross_entropy, one_hot};

/// Which minimiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Full-batch L-BFGS in f64 to ‖∇L‖ < tolerance (convex models only).
    Lbfgs,
    /// Adam (β = 0.9, 0.999; ε = 1e-8).
    Adam,
    /// SGD with momentum 0.9.
    Sgd,
}

/// How to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The minimiser.
    pub optimizer: OptimizerKind,
    /// λ in the objective.
    pub l2: f64,
    /// Seed for initialisation and shuffling.
    pub seed: u64,
    /// Passes over the data (stochastic optimizers).
    pub epochs: usize,
    /// Mini-batch size (stochastic optimizers).
    pub batch_size: usize,
    /// Peak learning rate (stochastic optimizers).
    pub learning_rate: f64,
    /// Gradient-norm target (L-BFGS).
    pub tolerance: f64,
    /// Iteration limit (L-BFGS).
    pub max_iterations: usize,
}

/// λ of convex models unless given.
pub const DEFAULT_CONVEX_L2: f64 = 1e-3;
/// λ of deep models unless given.
pub const DEFAULT_DEEP_L2: f64 = 1e-4;
/// Passes over the data of the stochastic optimizers unless given.
pub const DEFAULT_EPOCHS: usize = 10;
/// Mini-batch size of the stochastic optimizers unless given.
pub const DEFAULT_BATCH: usize = 128;
/// Peak learning rate of the stochastic optimizers unless given.
pub const DEFAULT_LEARNING_RATE: f64 = 1e-3;

impl TrainConfig {
    /// The defaults: L-BFGS to ‖∇L‖ < 1e-6 with λ = 1e-3 for convex models; Adam, 10 epochs of
    /// batch 128 at 1e-3 with λ = 1e-4 for deep ones.
    pub fn defaults(convex: bool) -> Self {
        Self {
            optimizer: if convex { OptimizerKind::Lbfgs } else { OptimizerKind::Adam },
            l2: if convex { DEFAULT_CONVEX_L2 } else { DEFAULT_DEEP_L2 },
            seed: 0,
            epochs: DEFAULT_EPOCHS,
            batch_size: DEFAULT_BATCH,
            learning_rate: DEFAULT_LEARNING_RATE,
            tolerance: 1e-6,
            max_iterations: 5000,
        }
    }

    /// [`TrainConfig::defaults`] for a reference architecture.
    pub fn defaults_for(config: &ModelConfig) -> Self {
        Self::defaults(config.architecture.is_convex())
    }

    /// The learning rate of the stochastic optimizers after a share `progress` (0 to 1) of all
    /// steps: the cosine decay ½·lr·(1 + cos(π·progress)) from the peak to 0.
    pub fn learning_rate_at(&self, progress: f64) -> f64 {
        self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    fn validate(&self, convex: bool, model: &str) -> Result<(), ModelError> {
        if self.optimizer == OptimizerKind::Lbfgs && !convex {
            return Err(ModelError::Config(format!("lbfgs trains convex models only; use adam or sgd for {model}")));
        }
        if self.l2 < 0.0 || !self.l2.is_finite() {
            return Err(ModelError::Config(format!("--l2 must be a finite number ≥ 0, got {}", self.l2)));
        }
        if self.optimizer != OptimizerKind::Lbfgs {
            if self.epochs == 0 || self.batch_size == 0 {
                return Err(ModelError::Config("--epochs and --batch must be positive".into()));
            }
            if !(self.learning_rate > 0.0) {
                return Err(ModelError::Config("--lr must be positive".into()));
            }
        }
        Ok(())
    }
}

/// Receives training progress (the CLI draws a progress bar from it).
pub trait Progress {
    /// A phase with `total` steps begins.
    fn begin(&mut self, phase: &str, total: u64);
    /// `done` steps of the phase are complete; `message` says how it goes.
    fn advance(&mut self, done: u64, message: &str);
    /// A line for the training log.
    fn log(&mut self, line: &str);
    /// The phase ended.
    fn finish(&mut self);
    /// Whether to keep the parameters as they are at the end of `epoch` (1-based) of a
    /// stochastic training run, for a checkpoint ensemble (TracIn, Pruthi et al. 2020). Default:
    /// no checkpoints.
    fn wants_checkpoint(&mut self, _epoch: usize) -> bool {
        false
    }
    /// The parameters θ at the end of `epoch`, with the objective there (one more pass over the
    /// data), when [`Progress::wants_checkpoint`] said so.
    fn checkpoint(&mut self, _epoch: usize, _theta: Vec<f64>, _report: TrainReport) {}
}

/// Ignores progress.
pub struct Silent;

impl Progress for Silent {
    fn begin(&mut self, _: &str, _: u64) {}
    fn advance(&mut self, _: u64, _: &str) {}
    fn log(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// The objective at the end of training.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    /// L(θ) on the whole training set.
    pub objective: f64,
    /// ‖∇L(θ)‖₂ on the whole training set.
    pub gradient_norm: f64,
    /// Share of training predictions (examples, for a classifier) that are correct.
    pub train_accuracy: f64,
    /// L-BFGS iterations or stochastic steps.
    pub iterations: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The cross-entropy of every prediction row against its label (`[rows]`, in the graph) and the
/// number of rows whose arg-max is the label.
fn row_losses<M: Model>(model: &M, batch: &M::Batch) -> (Tensor<1>, usize) {
    let logits = model.logits(batch);
    let labels = batch.labels();
    let y = one_hot(&labels, model.num_classes(), &logits.device(), logits.dtype());
    let correct = count_correct(logits.clone(), &labels);
    (cross_entropy(logits, y), correct)
}

/// The full-batch objective, its gradient and the training accuracy at `model`'s θ.
///
/// Evaluated in chunks of at most `chunk` prediction rows (one forward and backward each, see
/// [`crate::model::RowGroups::chunks`]) so memory stays bounded; the result is the same as one full batch up to floating-point summation order.
pub fn full_objective<M: Model>(model: &M, data: &M::Batch, l2: f64, chunk: usize) -> (f64, Vec<f64>, f64) {
    full_objective_scaled(model, data, l2, chunk, data.len())
}

/// [`full_objective`] with the data term divided by `scale` instead of the number of examples:
/// (1/scale) Σᵢ CE + (λ/2)‖θ‖². Leave-one-out retraining keeps the full set's n (Koh & Liang's
/// removal is an up-weighting by −1/n), so every other example keeps its weight.
pub fn full_objective_scaled<M: Model>(
    model: &M,
    data: &M::Batch,
    l2: f64,
    chunk: usize,
    scale: usize,
) -> (f64, Vec<f64>, f64) {
    let n = data.len();
    let scale = scale.max(1);
    let net = model.clone().require_grad();
    let mut value = 0.0;
    let mut gradient = vec![0.0; net.num_params()];
    let (mut correct, mut rows) = (0usize, 0usize);
    for range in data.groups().chunks(n, chunk, chunk) {
        let start = range.start;
        let (losses, right) = row_losses(&net, &data.slice(range));
        correct += right;
        rows += losses.dims()[0];
        let mut loss = losses.sum().div_scalar(scale as f64);
        if start == 0 {
            loss = loss + net.squared_norm().mul_scalar(l2 / 2.0);
        }
        value += loss.clone().into_scalar::<f64>();
        let grads = loss.backward();
        for (g, v) in gradient.iter_mut().zip(net.gradient_flat(&grads)) {
            *g += v;
        }
    }
    (value, gradient, correct as f64 / rows.max(1) as f64)
}

/// Number of rows whose arg-max logit equals the label.
pub fn count_correct(logits: Tensor<2>, labels: &[u32]) -> usize {
    let predicted = logits.argmax(1).into_data().convert_dtype(DType::I64).try_into_vec::<i64>().expect("int data");
    predicted.iter().zip(labels).filter(|(p, y)| **p == **y as i64).count()
}

/// Trains a reference model of shape `config` on `data` as `train` says, from the
/// initialisation of `train.seed`. `device` must have autodiff.
pub fn train(
    config: &ModelConfig,
    train: &TrainConfig,
    data: &Features,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<(Network, TrainReport), ModelError> {
    if data.dim() != config.input.len() {
        return Err(ModelError::Config(format!(
            "the model takes {} input features but the data has {}",
            config.input.len(),
            data.dim()
        )));
    }
    let dtype = if train.optimizer == OptimizerKind::Lbfgs { DType::F64 } else { DType::F32 };
    let initial = Network::init(config, train.seed, device, dtype)?;
    train_model(initial, train, data, progress)
}

/// Trains any [`Model`] from its current parameters `initial` (on an autodiff device) to the
/// objective L(θ) = (1/n) Σ CE + (λ/2)‖θ‖² as `train` says: full-batch L-BFGS in f64 for convex
/// models, Adam or SGD in the model's dtype otherwise.
pub fn train_model<M: Model>(
    initial: M,
    train: &TrainConfig,
    data: &M::Batch,
    progress: &mut dyn Progress,
) -> Result<(M, TrainReport), ModelError> {
    train.validate(initial.is_convex(), &initial.describe())?;
    if data.is_empty() {
        return Err(ModelError::Config("no training examples".into()));
    }
    let classes = initial.num_classes();
    if let Some(&bad) = data.labels().iter().find(|&&y| y as usize >= classes) {
        return Err(ModelError::Config(format!("label {bad} is outside the model's {classes} classes")));
    }
    let started = std::time::Instant::now();
    let (model, iterations) = match train.optimizer {
        OptimizerKind::Lbfgs => {
            let start = initial.to_flat();
            train_full_batch(&initial, train, data, data.len(), &start, None, progress)?
        }
        OptimizerKind::Adam => {
            let adam = AdamConfig::new().with_epsilon(1e-8).build();
            train_stochastic(adam, initial, train, data, progress)?
        }
        OptimizerKind::Sgd => {
            let sgd = SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_dampening(0.0))).build();
            train_stochastic(sgd, initial, train, data, progress)?
        }
    };
    let report = final_report(&model, data, train.l2, data.len(), iterations, started);
    Ok((model.without_grad(), report))
}

/// The objective, its gradient norm and the training accuracy where training stopped.
fn final_report<M: Model>(
    model: &M,
    data: &M::Batch,
    l2: f64,
    scale: usize,
    iterations: usize,
    started: std::time::Instant,
) -> TrainReport {
    let (objective, gradient, train_accuracy) = full_objective_scaled(model, data, l2, 4096, scale);
    let gradient_norm = gradient.iter().map(|g| g * g).sum::<f64>().sqrt();
    TrainReport { objective, gradient_norm, train_accuracy, iterations, seconds: started.elapsed().as_secs_f64() }
}

/// Minimises the objective by full-batch L-BFGS in f64 from θ = `start` until ‖∇L‖ <
/// `train.tolerance`, whatever `train.optimizer` says: the exact re-optimisation that leave-one-out
/// and subset retraining warm-start from the full model's optimum (Koh & Liang 2017, §4).
/// `model` gives the shape and device (autodiff); its own θ is not used. The data term is divided
/// by `scale` (the number of examples, or the full set's n for leave-one-out, see
/// [`full_objective_scaled`]). Cost per iteration: one pass over the data in f64.
///
/// `precondition`, if given, applies an approximate inverse Hessian (see
/// [`crate::lbfgs::Lbfgs::minimize_preconditioned`]); it changes the speed, not the minimiser.
pub fn refine<M: Model>(
    model: &M,
    train: &TrainConfig,
    data: &M::Batch,
    scale: usize,
    start: &[f64],
    precondition: Option<crate::lbfgs::Preconditioner<'_>>,
    progress: &mut dyn Progress,
) -> Result<(M, TrainReport), ModelError> {
    if data.is_empty() {
        return Err(ModelError::Config("no training examples".into()));
    }
    let started = std::time::Instant::now();
    let (model, iterations) = train_full_batch(model, train, data, scale, start, precondition, progress)?;
    let report = final_report(&model, data, train.l2, scale, iterations, started);
    Ok((model.without_grad(), report))
}

fn train_full_batch<M: Model>(
    template: &M,
    train: &TrainConfig,
    data: &M::Batch,
    scale: usize,
    start: &[f64],
    precondition: Option<crate::lbfgs::Preconditioner<'_>>,
    progress: &mut dyn Progress,
) -> Result<(M, usize), ModelError> {
    let device = template.device();
    let lbfgs = Lbfgs { tolerance: train.tolerance, max_iterations: train.max_iterations, ..Lbfgs::default() };
    progress.begin("L-BFGS", lbfgs.max_iterations as u64);
    let mut log_lines = Vec::new();
    let result = lbfgs.minimize_preconditioned(
        start.to_vec(),
        |theta| {
            let net = template.with_flat(theta, &device, DType::F64)?;
            let (value, gradient, _) = full_objective_scaled(&net, data, train.l2, 8192, scale);
            Ok((value, gradient))
        },
        precondition,
        |it, value, gnorm| {
            let line = format!("iteration {it}: objective {value:.12} gradient norm {gnorm:.3e}");
            progress.advance(it as u64, &format!("L {value:.6} ‖∇L‖ {gnorm:.2e}"));
            if it % 10 == 0 {
                log_lines.push(line);
            }
        },
    );
    progress.finish();
    for line in &log_lines {
        progress.log(line);
    }
    let result = result?;
    progress.log(&format!(
        "converged after {} iterations: objective {:.12} gradient norm {:.3e}",
        result.iterations, result.value, result.gradient_norm
    ));
    Ok((template.with_flat(&result.x, &device, DType::F64)?, result.iterations))
}

fn train_stochastic<O: Optimizer, M: Model>(
    optimizer: O,
    initial: M,
    train: &TrainConfig,
    data: &M::Batch,
    progress: &mut dyn Progress,
) -> Result<(M, usize), ModelError> {
    let n = data.len();
    let mut model = initial.require_grad();
    let mut states: Vec<Option<O::State<1>>> = vec![None; model.parameters().len()];
    let steps_per_epoch = n.div_ceil(train.batch_size);
    let total_steps = steps_per_epoch * train.epochs;
    let mut rng = ChaCha8Rng::seed_from_u64(train.seed ^ 0x5eed_5eed);
    let mut order: Vec<usize> = (0..n).collect();
    let mut step = 0usize;
    let started = std::time::Instant::now();
    progress.begin("training", total_steps as u64);
    for epoch in 0..train.epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct, mut rows) = (0.0, 0usize, 0usize);
        for chunk in order.chunks(train.batch_size) {
            let (losses, right) = row_losses(&model, &data.gather(chunk));
            correct += right;
            rows += losses.dims()[0];
            // (1/batch) Σ over the batch's examples of their summed row losses.
            let ce = if losses.dims()[0] == chunk.len() {
                losses.mean()
            } else {
                losses.sum().div_scalar(chunk.len() as f64)
            };
            let loss = ce.clone() + model.squared_norm().mul_scalar(train.l2 / 2.0);
            let grads = loss.backward();
            loss_sum += ce.into_scalar::<f64>() * chunk.len() as f64;
            // Cosine decay from the peak rate to zero over all steps.
            let lr = train.learning_rate_at(step as f64 / total_steps as f64);
            let mut updated = Vec::with_capacity(states.len());
            for (param, state) in model.parameters().into_iter().zip(states.iter_mut()) {
                let grad = param.grad(&grads).expect("every parameter reaches the loss");
                let (next, next_state) = optimizer.step(lr, param.inner(), grad, state.take());
                *state = next_state;
                updated.push(Tensor::from_inner(next).require_grad());
            }
            model.set_parameters(updated);
            step += 1;
            progress.advance(step as u64, &format!("epoch {}/{}", epoch + 1, train.epochs));
        }
        let line = format!(
            "epoch {}: mean training loss {:.6}, training accuracy {:.4}",
            epoch + 1,
            loss_sum / n as f64,
            correct as f64 / rows.max(1) as f64
        );
        progress.log(&line);
        if epoch + 1 < train.epochs && progress.wants_checkpoint(epoch + 1) {
            let report = final_report(&model, data, train.l2, n, step, started);
            progress.checkpoint(epoch + 1, model.to_flat(), report);
        }
    }
    progress.finish();
    Ok((model, total_steps))
}

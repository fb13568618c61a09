//! `culprit train`: load data, build the model it asks for, train it, write the run directory.

use std::path::PathBuf;

use culprit_models::{Activation, Architecture, Backend, ModelConfig, OptimizerKind, TrainConfig};

use crate::data::{DataSpec, Dataset, NormalizeMode, Preprocessing};
use crate::error::Result;
use crate::progress::Bar;
use crate::run::Run;

/// Everything `culprit train` takes. `None` fields take the architecture's defaults
/// ([`TrainConfig::defaults_for`]).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The training data.
    pub data: DataSpec,
    /// CSV normalisation.
    pub normalize: NormalizeMode,
    /// Text hash buckets.
    pub buckets: usize,
    /// Architecture.
    pub architecture: Architecture,
    /// Hidden widths.
    pub hidden: Option<Vec<usize>>,
    /// Nonlinearity.
    pub activation: Activation,
    /// Minimiser.
    pub optimizer: Option<OptimizerKind>,
    /// Epochs.
    pub epochs: Option<usize>,
    /// Mini-batch size.
    pub batch_size: Option<usize>,
    /// Learning rate.
    pub learning_rate: Option<f64>,
    /// λ.
    pub l2: Option<f64>,
    /// Seed.
    pub seed: u64,
    /// Backend.
    pub backend: Backend,
    /// Run directory to create.
    pub out: PathBuf,
    /// Hide progress bars.
    pub quiet: bool,
}

impl TrainOptions {
    /// Options with every default: max normalisation, default text buckets and hidden widths,
    /// ReLU, the architecture's optimizer and hyper-parameters, seed 0, the default backend, no
    /// progress bar.
    pub fn new(data: DataSpec, architecture: Architecture, out: PathBuf) -> Self {
        Self {
            data,
            normalize: NormalizeMode::Max,
            buckets: crate::data::text::DEFAULT_BUCKETS,
            architecture,
            hidden: None,
            activation: Activation::Relu,
            optimizer: None,
            epochs: None,
            batch_size: None,
            learning_rate: None,
            l2: None,
            seed: 0,
            backend: Backend::default(),
            out,
            quiet: true,
        }
    }
}

/// Trains and writes a run; returns it with the training data used.
pub fn train(options: &TrainOptions) -> Result<(Run, Dataset)> {
    if options.out.exists() {
        return Err(crate::Error::run(&options.out, "already exists; choose another --out or remove it"));
    }
    let data =
        Dataset::load(&options.data, Preprocessing::Fit { normalize: options.normalize, buckets: options.buckets })?;
    let model = ModelConfig {
        architecture: options.architecture,
        input: data.manifest.shape,
        num_classes: data.manifest.num_classes,
        hidden: options.hidden.clone().unwrap_or_else(|| options.architecture.default_hidden()),
        activation: options.activation,
    };
    model.layers()?;
    let mut training = TrainConfig::defaults_for(&model);
    training.seed = options.seed;
    if let Some(v) = options.optimizer {
        training.optimizer = v;
    }
    if let Some(v) = options.epochs {
        training.epochs = v;
    }
    if let Some(v) = options.batch_size {
        training.batch_size = v;
    }
    if let Some(v) = options.learning_rate {
        training.learning_rate = v;
    }
    if let Some(v) = options.l2 {
        training.l2 = v;
    }
    let run = train_and_write(&model, &training, &data, options.backend, &options.out, options.quiet)?;
    Ok((run, data))
}

/// Trains `model` as `training` says on `data` and writes the run directory `out` (atomically).
fn train_and_write(
    model: &ModelConfig,
    training: &TrainConfig,
    data: &Dataset,
    backend: Backend,
    out: &std::path::Path,
    quiet: bool,
) -> Result<Run> {
    if out.exists() {
        return Err(crate::Error::run(out, "already exists; choose another --out or remove it"));
    }
    let device = backend.autodiff_device();
    let mut bar = Bar::new(quiet);
    let (network, report) = culprit_models::train::train(model, training, data.examples(), &device, &mut bar)?;
    let mut log = format!(
        "culprit {} train: {} on {} ({} examples{}, {} features, {} classes), {} parameters, backend {}\n",
        env!("CARGO_PKG_VERSION"),
        model.architecture.name(),
        data.manifest.path.display(),
        data.len(),
        if data.manifest.excluded.is_empty() {
            String::new()
        } else {
            format!(", {} excluded", data.manifest.excluded.len())
        },
        data.dim(),
        model.num_classes,
        network.num_params(),
        backend.name()
    );
    for line in &bar.log {
        log.push_str(line);
        log.push('\n');
    }
    log.push_str(&format!(
        "final: objective {:.10} gradient norm {:.3e} training accuracy {:.4} in {:.1} s\n",
        report.objective, report.gradient_norm, report.train_accuracy, report.seconds
    ));
    Run::create(out, &network, training, backend, &report, &data.manifest, &log)
}

/// Trains `run`'s model again, with the same configuration and seed, on `data` (the run's
/// training data with some examples excluded, see [`Dataset::exclude`]), and writes the new run
/// to `out`. The data must have been preprocessed with the run's manifest.
pub fn retrain(run: &Run, data: &Dataset, out: &std::path::Path, backend: Backend, quiet: bool) -> Result<Run> {
    train_and_write(&run.config.model, &run.config.training, data, backend, out, quiet)
}

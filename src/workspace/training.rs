//! Training a model on a data set into a new run directory (`culprit train`, and the retraining
//! of `culprit purge` and `culprit eval`).

use std::path::PathBuf;

use culprit_engine::params::{at_least_one, non_negative, positive};
use culprit_models::{Activation, Architecture, Backend, Model, ModelConfig, OptimizerKind, TrainConfig};

use super::run::Run;
use crate::data::{DataSpec, Dataset, NormalizeMode, Preprocessing};
use crate::error::Result;
use crate::progress::Bar;

/// Everything `culprit train` takes (its flags). `None` fields take the architecture's defaults
/// ([`TrainConfig::defaults_for`]).
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct TrainOptions {
    /// The training data.
    #[command(flatten)]
    pub data: DataSpec,
    /// CSV normalisation: max (divide by the largest |value|) or standard (per-column z-score).
    #[arg(long, value_enum, default_value_t = NormalizeMode::default())]
    pub normalize: NormalizeMode,
    /// Hash buckets of the text featurizer.
    #[arg(long, default_value_t = crate::data::text::DEFAULT_BUCKETS, value_parser = at_least_one)]
    pub buckets: usize,
    /// Architecture.
    #[arg(long = "model", value_enum)]
    pub architecture: Architecture,
    /// Hidden widths, e.g. 512,256 (mlp), the dense head (cnn), the embedding size (text).
    #[arg(long, value_delimiter = ',')]
    pub hidden: Option<Vec<usize>>,
    /// Nonlinearity between layers.
    #[arg(long, value_enum, default_value_t = Activation::default())]
    pub activation: Activation,
    /// lbfgs (convex models, the default there), adam (default otherwise) or sgd.
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerKind>,
    /// Passes over the data (adam, sgd). Default 10.
    #[arg(long, value_parser = at_least_one)]
    pub epochs: Option<usize>,
    /// Mini-batch size (adam, sgd). Default 128.
    #[arg(long = "batch", value_parser = at_least_one)]
    pub batch_size: Option<usize>,
    /// Peak learning rate, decayed by a cosine to 0 (adam, sgd). Default 1e-3.
    #[arg(long = "lr", value_parser = positive, allow_negative_numbers = true)]
    pub learning_rate: Option<f64>,
    /// λ of the (λ/2)‖θ‖² term. Default 1e-3 for logreg, 1e-4 otherwise.
    #[arg(long, value_parser = non_negative, allow_negative_numbers = true)]
    pub l2: Option<f64>,
    /// Seed for initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Backend (the global `--backend`).
    #[arg(skip)]
    pub backend: Backend,
    /// Run directory to create (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Hide progress bars (the global `--quiet`).
    #[arg(skip = true)]
    pub quiet: bool,
}

impl TrainOptions {
    /// Options with every default: max normalisation, default text buckets and hidden widths,
    /// ReLU, the architecture's optimizer and hyper-parameters, seed 0, the default backend, no
    /// progress bar.
    pub fn new(data: DataSpec, architecture: Architecture, out: PathBuf) -> Self {
        let mut flags = data.flags();
        flags.extend(["--model".into(), culprit_engine::params::value_name(&architecture).into()]);
        flags.extend(["--out".into(), out.into()]);
        culprit_engine::params::clap_parse(flags)
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
    let (network, report) = culprit_models::train::train(model, training, &data.examples, &device, &mut bar)?;
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

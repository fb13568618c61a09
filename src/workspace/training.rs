//! Training a model on a data set into a new run directory (`culprit train`, and the retraining
//! of `culprit purge` and `culprit eval`).

use std::path::PathBuf;

use culprit_engine::params::{at_least_one, non_negative, positive};
use culprit_models::{
    Activation, Architecture, Backend, GptConfig, Model, ModelConfig, OptimizerKind, Tokens, TrainConfig, TrainReport,
};

use super::kind::{Classifier, Kind, Language};
use super::run::{LanguageArchitecture, LanguageModel, ModelSpec, Run};
use crate::data::tokenizer::{Tokenizer, TokenizerSpec};
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
    pub architecture: ModelChoice,
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
    /// gpt: context length T in tokens (longer documents are truncated).
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    pub context: usize,
    /// gpt: transformer blocks.
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    pub layers: usize,
    /// gpt: attention heads (divides the width).
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub heads: usize,
    /// gpt: width W (the MLP is 4W wide).
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub width: usize,
    /// gpt: a Hugging Face tokenizer.json (GPT-2 BPE); default: the 256 byte values.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Backend (the global `--backend`).
    #[arg(skip)]
    pub backend: Backend,
    /// Deep models: also keep the model as it was at K evenly spaced earlier epochs, each as a
    /// run of its own in OUT/checkpoints/epoch-E, for `trace --checkpoints` (an ensemble over
    /// training, which finds examples the final model has memorised). Needs K < --epochs.
    #[arg(long, default_value_t = 0)]
    pub checkpoints: usize,
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
    pub fn new(data: DataSpec, architecture: impl Into<ModelChoice>, out: PathBuf) -> Self {
        let architecture: ModelChoice = architecture.into();
        let mut flags = data.flags();
        flags.extend(["--model".into(), culprit_engine::params::value_name(&architecture).into()]);
        flags.extend(["--out".into(), out.into()]);
        culprit_engine::params::clap_parse(flags)
    }
}

/// The training configuration the options give, over `defaults`.
fn training_config(options: &TrainOptions, defaults: TrainConfig) -> TrainConfig {
    let mut training = defaults;
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
    training
}

/// Trains a reference classifier and writes a run; returns it with the training data used.
pub fn train(options: &TrainOptions) -> Result<(Run, Dataset)> {
    if options.out.exists() {
        return Err(crate::Error::run(&options.out, "already exists; choose another --out or remove it"));
    }
    let Some(architecture) = options.architecture.classifier() else {
        return Err(crate::Error::Usage("--model gpt trains a language model (train_language)".into()));
    };
    let data =
        Dataset::load(&options.data, Preprocessing::Fit { normalize: options.normalize, buckets: options.buckets })?;
    let model = ModelConfig {
        architecture,
        input: data.manifest.shape,
        num_classes: data.manifest.num_classes,
        hidden: options.hidden.clone().unwrap_or_else(|| architecture.default_hidden()),
        activation: options.activation,
    };
    model.layers()?;
    let training = training_config(options, TrainConfig::defaults_for(&model));
    let at = checkpoint_epochs(options.checkpoints, &training)?;
    let spec = ModelSpec::Classifier(model);
    let run =
        train_and_write::<Classifier>(&spec, &training, &data, options.backend, &options.out, options.quiet, &[], &at)?;
    Ok((run, data))
}

/// The tokenizer `--tokenizer` names (GPT-2 BPE), or bytes.
fn tokenizer(path: Option<&std::path::Path>) -> Result<(Tokenizer, TokenizerSpec)> {
    match path {
        None => Ok((Tokenizer::Bytes, TokenizerSpec::Bytes)),
        Some(p) => {
            let bpe = crate::data::tokenizer::Bpe::load(p)?;
            let tokenizer = Tokenizer::Bpe(Box::new(bpe));
            let spec = TokenizerSpec::Bpe { sha256: super::artifacts::file_sha256(p)?, vocab: tokenizer.vocab() };
            Ok((tokenizer, spec))
        }
    }
}

/// Trains a GPT on a corpus (`--model gpt`) and writes a run; returns it with the training data.
pub fn train_language(options: &TrainOptions) -> Result<(Run, Dataset<Tokens>)> {
    if options.out.exists() {
        return Err(crate::Error::run(&options.out, "already exists; choose another --out or remove it"));
    }
    let (tokenizer, spec) = tokenizer(options.tokenizer.as_deref())?;
    let data = Dataset::load_corpus(&options.data, &tokenizer, &spec, options.context)?;
    let gpt = GptConfig {
        vocab: tokenizer.vocab(),
        context: options.context,
        width: options.width,
        layers: options.layers,
        heads: options.heads,
        inner: 4 * options.width,
        epsilon: 1e-5,
    };
    gpt.validate()?;
    let training = training_config(options, TrainConfig::defaults(false));
    let at = checkpoint_epochs(options.checkpoints, &training)?;
    let model = ModelSpec::Language(LanguageModel { architecture: LanguageArchitecture::Gpt, gpt, tokenizer: spec });
    let extra: Vec<(&str, &std::path::Path)> =
        options.tokenizer.as_deref().map(|p| ("tokenizer.json", p)).into_iter().collect();
    let run = train_and_write::<Language>(
        &model,
        &training,
        &data,
        options.backend,
        &options.out,
        options.quiet,
        &extra,
        &at,
    )?;
    Ok((run, data))
}

/// The epochs at which `--checkpoints K` keeps the model: ⌊i·E/(K+1)⌉ for i = 1..K, E epochs.
fn checkpoint_epochs(k: usize, training: &TrainConfig) -> Result<Vec<usize>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    if training.optimizer == OptimizerKind::Lbfgs {
        return Err(crate::Error::Usage("--checkpoints needs a stochastic optimizer (adam or sgd), not lbfgs".into()));
    }
    let epochs = training.epochs;
    if k >= epochs {
        return Err(crate::Error::Usage(format!(
            "--checkpoints {k} needs more than {k} epochs (--epochs is {epochs})"
        )));
    }
    let mut at: Vec<usize> = (1..=k).map(|i| ((i * epochs) as f64 / (k + 1) as f64).round() as usize).collect();
    at.dedup();
    Ok(at)
}

/// A progress bar that also keeps the parameters at chosen epochs.
struct Checkpointing<'a> {
    bar: &'a mut Bar,
    at: &'a [usize],
    /// Per checkpoint: its epoch, θ, its objective, and how many log lines training had written.
    kept: Vec<(usize, Vec<f64>, TrainReport, usize)>,
}

impl culprit_models::Progress for Checkpointing<'_> {
    fn begin(&mut self, phase: &str, total: u64) {
        self.bar.begin(phase, total);
    }
    fn advance(&mut self, done: u64, message: &str) {
        self.bar.advance(done, message);
    }
    fn log(&mut self, line: &str) {
        self.bar.log(line);
    }
    fn finish(&mut self) {
        self.bar.finish();
    }
    fn wants_checkpoint(&mut self, epoch: usize) -> bool {
        self.at.contains(&epoch)
    }
    fn checkpoint(&mut self, epoch: usize, theta: Vec<f64>, report: TrainReport) {
        self.kept.push((epoch, theta, report, self.bar.log.len()));
    }
}

/// Trains a model of shape `model` as `training` says on `data` and writes the run directory `out`
/// (atomically), with `extra` files copied into it, and the model at the epochs `at` as runs in
/// `out/checkpoints/epoch-E`.
#[allow(clippy::too_many_arguments)]
fn train_and_write<K: Kind>(
    model: &ModelSpec,
    training: &TrainConfig,
    data: &Dataset<K::Batch>,
    backend: Backend,
    out: &std::path::Path,
    quiet: bool,
    extra: &[(&str, &std::path::Path)],
    at: &[usize],
) -> Result<Run> {
    if out.exists() {
        return Err(crate::Error::run(out, "already exists; choose another --out or remove it"));
    }
    let device = backend.autodiff_device();
    let mut bar = Bar::new(quiet);
    let mut progress = Checkpointing { bar: &mut bar, at, kept: Vec::new() };
    let (trained, report) = K::train(model, training, &data.examples, &device, &mut progress)?;
    let kept = std::mem::take(&mut progress.kept);
    let header = format!(
        "culprit {} train: {} on {} ({} examples{}{}), {} parameters, backend {}\n",
        env!("CARGO_PKG_VERSION"),
        model.name(),
        data.manifest.path.display(),
        data.len(),
        if data.manifest.excluded.is_empty() {
            String::new()
        } else {
            format!(", {} excluded", data.manifest.excluded.len())
        },
        match data.manifest.truncated {
            Some(t) if t > 0 => format!(", {t} truncated to the context"),
            _ => String::new(),
        },
        trained.num_params(),
        backend.name()
    );
    let log = |lines: usize, last: String| {
        header.clone() + &bar.log[..lines].iter().map(|l| format!("{l}\n")).collect::<String>() + &last
    };
    let last = format!(
        "final: objective {:.10} gradient norm {:.3e} training accuracy {:.4} in {:.1} s\n",
        report.objective, report.gradient_norm, report.train_accuracy, report.seconds
    );
    let run = Run::create(
        out,
        model,
        trained.to_flat(),
        training,
        backend,
        &report,
        &data.manifest,
        &log(bar.log.len(), last),
        extra,
    )?;
    for (epoch, theta, report, lines) in kept {
        let last = format!(
            "checkpoint of epoch {epoch} of {}: objective {:.10} gradient norm {:.3e} training accuracy {:.4}\n",
            training.epochs, report.objective, report.gradient_norm, report.train_accuracy
        );
        let dir = super::run::Checkpoint::dir_of(out, epoch);
        Run::create(&dir, model, theta, training, backend, &report, &data.manifest, &log(lines, last), extra)?;
    }
    Ok(run)
}

/// Trains `run`'s model again, with the same configuration and seed, on `data` (the run's
/// training data with some examples excluded, see [`Dataset::exclude`]), and writes the new run
/// to `out` (a language model's tokenizer copied with it). The data must have been read as the
/// run reads it.
pub fn retrain<K: Kind>(
    run: &Run,
    data: &Dataset<K::Batch>,
    out: &std::path::Path,
    backend: Backend,
    quiet: bool,
) -> Result<Run> {
    let tokenizer = run.dir.join("tokenizer.json");
    let extra: Vec<(&str, &std::path::Path)> =
        if tokenizer.is_file() { vec![("tokenizer.json", tokenizer.as_path())] } else { Vec::new() };
    train_and_write::<K>(&run.config.model, &run.config.training, data, backend, out, quiet, &extra, &[])
}

/// What `--model` takes: a reference classifier's architecture, or `gpt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelChoice {
    /// Multinomial logistic regression (convex, trained to the optimum in f64).
    #[value(name = "logreg")]
    LogReg,
    /// A multi-layer perceptron.
    Mlp,
    /// A LeNet-style CNN.
    Cnn,
    /// An embedding-bag text classifier.
    Text,
    /// A GPT-2 language model on a corpus of JSON-lines documents.
    Gpt,
}

impl From<Architecture> for ModelChoice {
    fn from(a: Architecture) -> Self {
        match a {
            Architecture::LogReg => Self::LogReg,
            Architecture::Mlp => Self::Mlp,
            Architecture::Cnn => Self::Cnn,
            Architecture::Text => Self::Text,
        }
    }
}

impl ModelChoice {
    /// The reference classifier's architecture (`None` for `gpt`).
    pub fn classifier(self) -> Option<Architecture> {
        match self {
            Self::LogReg => Some(Architecture::LogReg),
            Self::Mlp => Some(Architecture::Mlp),
            Self::Cnn => Some(Architecture::Cnn),
            Self::Text => Some(Architecture::Text),
            Self::Gpt => None,
        }
    }
}

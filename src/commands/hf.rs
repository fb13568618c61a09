//! `culprit import` and `culprit export`: Hugging Face GPT-2 folders in and out.
//!
//! `import --hf DIR --data CORPUS --out RUN` makes a run from a `GPT2LMHeadModel` folder
//! (`config.json`, `model.safetensors`, and `tokenizer.json` when it has one; the 256 byte values
//! otherwise), bound to the corpus it was trained on: the run's manifest records the corpus and
//! its hash, and its report the objective on it, so every later command (cache, fit, trace,
//! purge) works on it as on a model trained here. `export --run RUN --hf DIR` writes the same
//! format back (and the tokenizer), so a model purged and retrained here goes back to PyTorch.

use std::io::Write;
use std::path::PathBuf;

use burn::tensor::DType;
use culprit_models::{Backend, Gpt, Model, TrainConfig};

use super::stdout_error;
use crate::data::tokenizer::{Bpe, Tokenizer, TokenizerSpec};
use crate::data::{DataSpec, Dataset};
use crate::error::{Error, Result};
use crate::io::{AtomicDir, write_new};
use crate::workspace::Run;
use crate::workspace::run::{LanguageArchitecture, LanguageModel, ModelSpec};

/// The flags of `culprit import`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct ImportArgs {
    /// A Hugging Face GPT2LMHeadModel folder (config.json, model.safetensors[, tokenizer.json]).
    #[arg(long)]
    pub hf: PathBuf,
    /// The corpus the model was trained on.
    #[command(flatten)]
    pub data: DataSpec,
    /// λ of the objective the model is taken to minimise (its (λ/2)‖θ‖² term). Default 1e-4.
    #[arg(long, value_parser = culprit_engine::params::non_negative, allow_negative_numbers = true)]
    pub l2: Option<f64>,
    /// Run directory to create (must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

/// The flags of `culprit export`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct ExportArgs {
    /// A language-model run.
    #[arg(long)]
    pub run: PathBuf,
    /// The Hugging Face folder to write (must not exist).
    #[arg(long)]
    pub hf: PathBuf,
}

/// The tokenizer of a Hugging Face folder, checked against the embedding's vocabulary.
fn folder_tokenizer(dir: &std::path::Path, vocab: usize) -> Result<(Tokenizer, TokenizerSpec, Option<PathBuf>)> {
    let path = dir.join("tokenizer.json");
    let (tokenizer, spec, file) = if path.is_file() {
        let t = Tokenizer::Bpe(Box::new(Bpe::load(&path)?));
        let spec = TokenizerSpec::Bpe { sha256: crate::workspace::file_sha256(&path)?, vocab: t.vocab() };
        (t, spec, Some(path.clone()))
    } else {
        (Tokenizer::Bytes, TokenizerSpec::Bytes, None)
    };
    if tokenizer.vocab() > vocab {
        let what = if file.is_some() { "its tokenizer.json" } else { "the byte tokenizer (no tokenizer.json)" };
        return Err(Error::data(
            dir,
            None,
            format!("{what} has {} tokens but the model's embedding has {vocab}", tokenizer.vocab()),
        ));
    }
    Ok((tokenizer, spec, file))
}

/// Imports a Hugging Face GPT-2 folder as a run.
pub fn import(args: &ImportArgs, backend: Backend) -> Result<Run> {
    if args.out.exists() {
        return Err(Error::run(&args.out, "already exists; choose another --out or remove it"));
    }
    let (gpt, theta) = culprit_models::hf::import_gpt(&args.hf)?;
    let (tokenizer, spec, file) = folder_tokenizer(&args.hf, gpt.vocab)?;
    let data = Dataset::load_corpus(&args.data, &tokenizer, &spec, gpt.context)?;
    let training =
        TrainConfig { l2: args.l2.unwrap_or(TrainConfig::defaults(false).l2), ..TrainConfig::defaults(false) };
    let device = backend.autodiff_device();
    let model = Gpt::from_flat(&gpt, &theta, &device, DType::F32)?;
    let started = std::time::Instant::now();
    let (objective, gradient, train_accuracy) =
        culprit_models::train::full_objective(&model, &data.examples, training.l2, 32);
    let report = culprit_models::TrainReport {
        objective,
        gradient_norm: gradient.iter().map(|g| g * g).sum::<f64>().sqrt(),
        train_accuracy,
        iterations: 0,
        seconds: started.elapsed().as_secs_f64(),
    };
    let log = format!(
        "culprit {} import: {} from {} on {} ({} documents, {} truncated to the context), {} parameters\n",
        env!("CARGO_PKG_VERSION"),
        model.describe(),
        args.hf.display(),
        data.manifest.path.display(),
        data.len(),
        data.manifest.truncated.unwrap_or(0),
        model.num_params()
    );
    let spec = ModelSpec::Language(LanguageModel { architecture: LanguageArchitecture::Gpt, gpt, tokenizer: spec });
    let extra: Vec<(&str, &std::path::Path)> = file.as_deref().map(|p| ("tokenizer.json", p)).into_iter().collect();
    Run::create(&args.out, &spec, theta, &training, backend, &report, &data.manifest, &log, &extra)
}

/// Exports a language-model run as a Hugging Face GPT-2 folder.
pub fn export(args: &ExportArgs) -> Result<()> {
    let run = Run::open(&args.run)?;
    let language = run.config.model.language()?;
    let dir = AtomicDir::create(&args.hf)?;
    write_new(&dir.path().join("config.json"), culprit_models::hf::gpt_config_json(&language.gpt).as_bytes())?;
    write_new(&dir.path().join("model.safetensors"), &culprit_models::hf::gpt_safetensors(&language.gpt, &run.theta))?;
    let tokenizer = run.dir.join("tokenizer.json");
    if tokenizer.is_file() {
        write_new(&dir.path().join("tokenizer.json"), &std::fs::read(&tokenizer).map_err(Error::io(&tokenizer))?)?;
    }
    dir.commit()
}

/// `culprit import`.
pub fn run_import(args: &ImportArgs, backend: Backend, stdout: &mut dyn Write) -> Result<()> {
    let run = import(args, backend)?;
    let r = &run.config.report;
    writeln!(
        stdout,
        "imported {} as a run bound to {} ({} documents): objective {:.6}, next-token accuracy {:.4}; run written to {}",
        args.hf.display(),
        run.manifest.path.display(),
        run.manifest.count,
        r.objective,
        r.train_accuracy,
        run.dir.display()
    )
    .map_err(stdout_error)
}

/// `culprit export`.
pub fn run_export(args: &ExportArgs, stdout: &mut dyn Write) -> Result<()> {
    export(args)?;
    writeln!(stdout, "wrote {} (config.json, model.safetensors)", args.hf.display()).map_err(stdout_error)
}

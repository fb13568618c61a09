//! The `culprit` command line: argument structs and calls. Every option is typed and validated
//! where it is parsed (`clap`); the work is in [`culprit::commands`]. Errors print as one line on
//! standard error and exit with code 2; a closed standard output (e.g. `| head`) exits 0.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use culprit::commands;
use culprit::error::{Error, Result};
use culprit_models::Backend;

#[derive(Parser)]
#[command(name = "culprit", version, about = "Which training examples made the model do this?")]
struct Cli {
    /// Compute backend: flex (default, pure-Rust CPU), ndarray (CPU), wgpu (needs --features gpu).
    #[arg(long, global = true, default_value = "flex")]
    backend: Backend,
    /// The adapter the wgpu backend runs on: default (the best GPU found), cpu (a Vulkan CPU
    /// device such as Mesa's lavapipe: for correctness checks, not speed), discrete[:N],
    /// integrated[:N], virtual[:N].
    #[arg(long, global = true, default_value = "default")]
    device: culprit_models::GpuAdapter,
    /// Hide progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    /// Where a run's training data is now, if it moved (a file, or a folder holding it): found by
    /// its SHA-256. A command's own --data and --eval-data folders are searched too.
    #[arg(long, global = true)]
    moved_data: Vec<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a reference model and write a run directory.
    Train(culprit::workspace::training::TrainOptions),
    /// Predict with a trained run: CSV of index,label,predicted,loss,p0,p1,... (language models:
    /// index,tokens,logprob).
    Predict(commands::predict::PredictOptions),
    /// Make a run from a Hugging Face GPT-2 folder, bound to the corpus it was trained on.
    Import(commands::hf::ImportArgs),
    /// Write a language-model run as a Hugging Face GPT-2 folder.
    Export(commands::hf::ExportArgs),
    /// Print a language-model run's greedy continuation of a prompt.
    Generate(commands::generate::GenerateArgs),
    /// Train a GPT-2 byte-level BPE tokenizer on a corpus (a tokenizer.json for train --tokenizer).
    Tokenizer(commands::tokenizer::TokenizerArgs),
    /// Compute every training example's loss gradient into a checksummed, sharded store.
    Cache(commands::cache::CacheOptions),
    /// Fit a curvature method (inverse-Hessian approximation) and store its factors in RUN/curvature.
    Fit(commands::fit::FitArgs),
    /// Rank the training examples by their influence on chosen test outputs.
    Trace(commands::trace::TraceArgs),
    /// Merge the JSON reports of `culprit trace --shard I/N` runs into one.
    Merge(commands::merge::MergeArgs),
    /// Self-influence of every training example, calibrated against held-out examples (--data).
    Audit(commands::audit::AuditArgs),
    /// Where a run's training examples came from: file, row, SHA-256 of their bytes, source.
    Provenance(commands::provenance::ProvenanceArgs),
    /// Plant a backdoor (and label noise) in a copy of a data set, with the ground truth.
    Poison(commands::poison::PoisonArgs),
    /// Remove flagged training examples, retrain, and compare before and after.
    Purge(commands::purge::PurgeArgs),
    /// Rank candidate triggers: features whose label the rest of their examples does not explain.
    Scan(commands::scan::ScanArgs),
    /// Exact and near-duplicate groups (MinHash for text, pixel signatures for images), or the
    /// copies shared with a second set (--against).
    Dedup(commands::dedup::DedupArgs),
    /// Check the scores against actual retraining: leave-one-out or the linear datamodeling score.
    Eval(commands::eval::EvalArgs),
    /// The end-to-end demo on data shipped in the binary.
    Demo(commands::demo::DemoOptions),
}

/// The values of `--data` and `--eval-data` on the command line (already checked by clap): the
/// places, besides `--moved-data`, where a run's moved training data is looked for.
fn data_arguments() -> Vec<std::path::PathBuf> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        for flag in ["--data", "--eval-data"] {
            if a == flag {
                out.extend(args.get(i + 1).map(std::path::PathBuf::from));
            } else if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                out.push(v.into());
            }
        }
    }
    out
}

/// Starts the wgpu runtime on the chosen adapter before any work (a clear error when there is
/// none); `--device` means nothing to the CPU backends.
fn start_backend(backend: Backend, device: culprit_models::GpuAdapter) -> Result<()> {
    #[cfg(feature = "gpu")]
    if backend == Backend::Wgpu {
        culprit_models::device::init_wgpu(device)?;
        return Ok(());
    }
    if device != culprit_models::GpuAdapter::Default {
        return Err(culprit_models::ModelError::Config(format!(
            "--device {device} chooses a wgpu adapter; it needs --backend wgpu (this is --backend {backend})"
        ))
        .into());
    }
    Ok(())
}

fn execute(cli: Cli) -> Result<()> {
    let (backend, quiet) = (cli.backend, cli.quiet);
    start_backend(backend, cli.device)?;
    culprit::workspace::artifacts::search_moved_data_in([cli.moved_data, data_arguments()].concat());
    let stdout = &mut std::io::stdout().lock();
    match cli.command {
        Command::Train(options) => {
            commands::train::run(&culprit::workspace::training::TrainOptions { backend, quiet, ..options }, stdout)
        }
        Command::Predict(options) => {
            commands::predict::run(&commands::predict::PredictOptions { backend, ..options }, stdout)
        }
        Command::Import(args) => commands::hf::run_import(&args, backend, stdout),
        Command::Export(args) => commands::hf::run_export(&args, stdout),
        Command::Generate(args) => commands::generate::run(&args, backend, stdout),
        Command::Tokenizer(args) => {
            commands::tokenizer::run(&commands::tokenizer::TokenizerArgs { quiet, ..args }, stdout)
        }
        Command::Cache(options) => {
            commands::cache::run(&commands::cache::CacheOptions { backend, quiet, ..options }, stdout)
        }
        Command::Fit(args) => commands::fit::run(&commands::fit::FitArgs { backend, ..args }, stdout),
        Command::Trace(mut args) => {
            args.options.backend = backend;
            commands::trace::run(&args, stdout)
        }
        Command::Merge(args) => commands::merge::run(&args, stdout),
        Command::Audit(mut args) => {
            args.options.backend = backend;
            commands::audit::run(&args, stdout)
        }
        Command::Provenance(args) => commands::provenance::run(&args, stdout),
        Command::Poison(args) => commands::poison::run(&args, stdout),
        Command::Purge(args) => commands::purge::run(&args, backend, quiet, stdout),
        Command::Scan(args) => commands::scan::run(&commands::scan::ScanArgs { quiet, backend, ..args }, stdout),
        Command::Dedup(args) => commands::dedup::run(&args, stdout),
        Command::Eval(args) => commands::eval::run(&args, backend, quiet, stdout),
        Command::Demo(options) => {
            commands::demo::run(&commands::demo::DemoOptions { backend, quiet, ..options }, stdout)
        }
    }
}

/// Parses the command line; a usage error becomes one line and exit code 2 (help and version
/// print as clap does).
fn parse() -> std::result::Result<Cli, ExitCode> {
    // Paths end up in JSON files (run manifests, reports), which hold UTF-8 only: refuse others
    // here, before anything is written, rather than fail halfway.
    if let Some(bad) = std::env::args_os().skip(1).find(|a| a.to_str().is_none()) {
        eprintln!(
            "culprit: error: argument {} is not valid UTF-8; culprit records paths in JSON files, which need UTF-8 names (rename it)",
            bad.to_string_lossy()
        );
        return Err(ExitCode::from(2));
    }
    Cli::try_parse().map_err(|e| {
        use clap::error::ErrorKind;
        match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                return ExitCode::from(2);
            }
            _ => {}
        }
        let text = e.render().to_string();
        let line = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
        eprintln!("culprit: error: {line}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    culprit::keep_freed_memory();
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("culprit: error: {e}");
            ExitCode::from(2)
        }
    }
}

//! `culprit generate`: a language-model run's greedy continuation of a prompt.

use std::io::Write;
use std::path::PathBuf;

use culprit_models::Backend;

use super::stdout_error;
use crate::error::{Error, Result};
use crate::workspace::Run;
use crate::workspace::predict::greedy;

/// The flags of `culprit generate`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct GenerateArgs {
    /// A language-model run.
    #[arg(long)]
    pub run: PathBuf,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate (fewer when the context fills).
    #[arg(long, default_value_t = 64, value_parser = culprit_engine::params::at_least_one)]
    pub max_tokens: usize,
}

/// Prints the greedy continuation (the most likely token at every step).
pub fn run(args: &GenerateArgs, backend: Backend, stdout: &mut dyn Write) -> Result<()> {
    let run = Run::open(&args.run)?;
    let gpt = run.gpt(&backend.device())?;
    let tokenizer = run.tokenizer()?;
    let prompt = tokenizer.encode(&args.prompt);
    let context = run.config.model.language()?.gpt.context;
    if prompt.is_empty() || prompt.len() >= context {
        return Err(Error::Usage(format!(
            "the prompt is {} tokens; it must hold between 1 and {} (the context is {context})",
            prompt.len(),
            context - 1
        )));
    }
    let continuation = greedy(&gpt, &[prompt], args.max_tokens).remove(0);
    writeln!(stdout, "{}", tokenizer.decode(&continuation)).map_err(stdout_error)
}

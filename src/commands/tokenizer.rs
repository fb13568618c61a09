//! `culprit tokenizer`: trains a GPT-2 byte-level BPE on a corpus ([`crate::data::bpe`]) and
//! writes it as a Hugging Face `tokenizer.json`, for `culprit train --model gpt --tokenizer`.

use std::io::Write;
use std::path::PathBuf;

use culprit_models::Progress;

use super::stdout_error;
use crate::data::bpe::train_bpe;
use crate::data::tokenizer::{Tokenizer, TokenizerSpec};
use crate::data::{DataSpec, Dataset};
use crate::error::{Error, Result};

/// The flags of `culprit tokenizer`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct TokenizerArgs {
    /// The corpus to learn from (JSON lines with `text`, or `prompt` and `completion`).
    #[command(flatten)]
    pub data: DataSpec,
    /// Vocabulary size: the 256 bytes plus this many minus 256 merges.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(256..=1 << 20))]
    pub vocab: u32,
    /// Never merge a pair seen fewer times than this (training then stops early).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub min_count: u64,
    /// Where to write the tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Hide the progress bar.
    #[arg(skip)]
    pub quiet: bool,
}

/// Trains the tokenizer and writes it; a summary line goes to standard output.
pub fn run(args: &TokenizerArgs, stdout: &mut dyn Write) -> Result<()> {
    crate::io::check_output(&args.out, &[&args.data.path], &[])?;
    // Read as bytes with no context limit: the texts, whole.
    let data = Dataset::load_corpus(&args.data, &Tokenizer::Bytes, &TokenizerSpec::Bytes, usize::MAX)?;
    let texts = data.texts.as_ref().ok_or_else(|| Error::data(&args.data.path, None, "holds no texts"))?;
    let bytes: usize = texts.iter().map(String::len).sum();
    let merges = (args.vocab as usize).saturating_sub(256) as u64;
    let mut bar = crate::progress::Bar::new(args.quiet);
    bar.begin("merges", merges);
    let trained = train_bpe(texts.iter().map(String::as_str), args.vocab as usize, args.min_count, &mut |done| {
        if done % 16 == 0 {
            bar.advance(done as u64, "");
        }
    });
    bar.finish();
    let json = serde_json::to_vec(&trained.to_json()).expect("plain data");
    crate::io::write_atomic(&args.out, &json)?;
    let tokenizer = Tokenizer::Bpe(Box::new(crate::data::tokenizer::Bpe::load(&args.out)?));
    let tokens: usize = texts.iter().map(|t| tokenizer.encode(t).len()).sum();
    let stopped = if trained.symbols.len() < args.vocab as usize {
        format!(" (no pair left seen {} times or more)", args.min_count)
    } else {
        String::new()
    };
    writeln!(
        stdout,
        "tokenizer of {} tokens{stopped} learnt from {} texts ({bytes} bytes): {tokens} tokens, {:.2} bytes per token; written to {}",
        trained.symbols.len(),
        texts.len(),
        bytes as f64 / tokens.max(1) as f64,
        args.out.display()
    )
    .map_err(stdout_error)
}

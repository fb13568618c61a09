//! `culprit predict`: the run's predictions on a data set, as CSV
//! (`index,label,predicted,loss,p0,p1,…`).

use std::io::Write;
use std::path::PathBuf;

use culprit_models::Backend;

use super::stdout_error;
use crate::data::{DataSpec, Dataset, Preprocessing};
use crate::error::Result;
use crate::workspace::Run;
use crate::workspace::kind::{Kind, Language};
use crate::workspace::predict::{accuracy, completion_logprobs, greedy_completions, mean_loss, predict, to_csv};

/// The flags of `culprit predict`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct PredictOptions {
    /// Run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// The examples to predict.
    #[command(flatten)]
    pub data: DataSpec,
    /// Write the CSV here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Language models: also decode each prompt greedily for as many tokens as its completion and
    /// add the columns `greedy_match` (1 when the continuation starts with the completion) and
    /// `continuation`.
    #[arg(long)]
    pub greedy: bool,
    /// Backend (the global `--backend`).
    #[arg(skip)]
    pub backend: Backend,
}

/// A language model's predictions: `index,tokens,logprob`, the summed log-probability of each
/// query's completion (of each document's tokens after the first).
fn language_csv(run: &Run, options: &PredictOptions) -> Result<(String, String)> {
    use std::fmt::Write as _;
    let gpt = run.gpt(&options.backend.device())?;
    let data = <Language as Kind>::load(run, &options.data)?;
    let scores = completion_logprobs(&gpt, &data, 32);
    let greedy = if options.greedy { greedy_completions(&gpt, &run.tokenizer()?, &data) } else { Vec::new() };
    let mut csv = String::from(if options.greedy {
        "index,tokens,logprob,greedy_match,continuation\n"
    } else {
        "index,tokens,logprob\n"
    });
    for (i, c) in scores.iter().enumerate() {
        let _ = write!(csv, "{},{},{:.9e}", c.id, c.tokens, c.logprob);
        if let Some(g) = greedy.get(i) {
            let _ = write!(csv, ",{},{}", u8::from(g.matches), csv_field(&g.text));
        }
        csv.push('\n');
    }
    let tokens: usize = scores.iter().map(|c| c.tokens).sum();
    let total: f64 = scores.iter().map(|c| c.logprob).sum();
    let mut summary =
        format!("{} examples: mean log-probability per token {:.4}", scores.len(), total / tokens.max(1) as f64);
    if options.greedy {
        let hits = greedy.iter().filter(|g| g.matches).count();
        let _ = write!(
            summary,
            ", greedy continuation reproduces the completion for {hits} ({:.1}%)",
            100.0 * hits as f64 / greedy.len().max(1) as f64
        );
    }
    Ok((csv, summary))
}

/// `text` as one CSV field (quoted, quotes doubled).
fn csv_field(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

/// A classifier's predictions: `index,label,predicted,loss,p0,p1,…`.
fn classifier_csv(run: &Run, options: &PredictOptions) -> Result<(String, String)> {
    if options.greedy {
        return Err(crate::Error::Usage(
            "--greedy decodes a language model's prompts; this run is a classifier".into(),
        ));
    }
    let network = run.network(&options.backend.device())?;
    let dataset = Dataset::load(&options.data, Preprocessing::Reuse(&run.manifest))?;
    let predictions = predict(&network, &dataset, 1024);
    let csv = to_csv(&predictions, run.config.model.classifier()?.num_classes);
    let summary = format!(
        "{} examples: accuracy {:.4}, mean loss {:.6}",
        predictions.len(),
        accuracy(&predictions),
        mean_loss(&predictions)
    );
    Ok((csv, summary))
}

/// Predicts and writes the CSV; a summary line goes to standard error.
pub fn run(options: &PredictOptions, stdout: &mut dyn Write) -> Result<()> {
    let run = Run::open(&options.run)?;
    if let Some(out) = &options.out {
        crate::io::check_output(out, &[&options.data.path], &[&run.dir])?;
    }
    let (csv, summary) = if crate::workspace::kind::is_language(&run) {
        language_csv(&run, options)?
    } else {
        classifier_csv(&run, options)?
    };
    match &options.out {
        Some(path) => {
            crate::io::write_atomic(path, csv.as_bytes())?;
            eprintln!("{summary}; written to {}", path.display());
        }
        None => {
            stdout.write_all(csv.as_bytes()).map_err(stdout_error)?;
            eprintln!("{summary}");
        }
    }
    Ok(())
}

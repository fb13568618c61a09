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
use crate::workspace::predict::{accuracy, completion_logprobs, mean_loss, predict, to_csv};

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
    let mut csv = String::from("index,tokens,logprob\n");
    for c in &scores {
        let _ = writeln!(csv, "{},{},{:.9e}", c.id, c.tokens, c.logprob);
    }
    let tokens: usize = scores.iter().map(|c| c.tokens).sum();
    let total: f64 = scores.iter().map(|c| c.logprob).sum();
    let summary =
        format!("{} examples: mean log-probability per token {:.4}", scores.len(), total / tokens.max(1) as f64);
    Ok((csv, summary))
}

/// A classifier's predictions: `index,label,predicted,loss,p0,p1,…`.
fn classifier_csv(run: &Run, options: &PredictOptions) -> Result<(String, String)> {
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

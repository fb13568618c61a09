//! `culprit predict`: the run's predictions on a data set, as CSV
//! (`index,label,predicted,loss,p0,p1,…`).

use std::io::Write;
use std::path::PathBuf;

use culprit_models::Backend;

use super::stdout_error;
use crate::data::{DataSpec, Dataset, Preprocessing};
use crate::error::Result;
use crate::workspace::Run;
use crate::workspace::predict::{accuracy, mean_loss, predict, to_csv};

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

/// Predicts and writes the CSV; a summary line goes to standard error.
pub fn run(options: &PredictOptions, stdout: &mut dyn Write) -> Result<()> {
    let run = Run::open(&options.run)?;
    if let Some(out) = &options.out {
        crate::io::check_output(out, &[&options.data.path], &[&run.dir])?;
    }
    let network = run.network(&options.backend.device())?;
    let dataset = Dataset::load(&options.data, Preprocessing::Reuse(&run.manifest))?;
    let predictions = predict(&network, &dataset, 1024);
    let csv = to_csv(&predictions, run.config.model.num_classes);
    match &options.out {
        Some(path) => {
            crate::io::write_atomic(path, csv.as_bytes())?;
            eprintln!(
                "{} examples: accuracy {:.4}, mean loss {:.6}; written to {}",
                predictions.len(),
                accuracy(&predictions),
                mean_loss(&predictions),
                path.display()
            );
        }
        None => {
            stdout.write_all(csv.as_bytes()).map_err(stdout_error)?;
            eprintln!("{} examples: accuracy {:.4}", predictions.len(), accuracy(&predictions));
        }
    }
    Ok(())
}

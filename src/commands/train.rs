//! `culprit train`: train a reference model on a data set and write a new run directory.

use std::io::Write;

use super::stdout_error;
use crate::error::Result;
use crate::workspace::training::{ModelChoice, TrainOptions, train, train_language};

/// Trains as `options` say and reports the run written.
pub fn run(options: &TrainOptions, stdout: &mut dyn Write) -> Result<()> {
    let (run, examples, truncated) = if options.architecture == ModelChoice::Gpt {
        let (run, data) = train_language(options)?;
        let truncated = data.manifest.truncated.unwrap_or(0);
        (run, data.len(), truncated)
    } else {
        let (run, data) = train(options)?;
        (run, data.len(), 0)
    };
    if truncated > 0 {
        eprintln!(
            "note: {truncated} of {examples} documents were longer than the context of {} tokens and were truncated",
            options.context
        );
    }
    let r = &run.config.report;
    writeln!(
        stdout,
        "trained {} on {} examples in {:.1} s: training accuracy {:.4}, objective {:.8}, gradient norm {:.3e}; run written to {}",
        run.config.model.name(),
        examples,
        r.seconds,
        r.train_accuracy,
        r.objective,
        r.gradient_norm,
        run.dir.display()
    )
    .map_err(stdout_error)
}

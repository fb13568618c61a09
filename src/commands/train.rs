//! `culprit train`: train a reference model on a data set and write a new run directory.

use std::io::Write;

use super::stdout_error;
use crate::error::Result;
use crate::workspace::training::{TrainOptions, train};

/// Trains as `options` say and reports the run written.
pub fn run(options: &TrainOptions, stdout: &mut dyn Write) -> Result<()> {
    let (run, data) = train(options)?;
    let r = &run.config.report;
    writeln!(
        stdout,
        "trained {} on {} examples in {:.1} s: training accuracy {:.4}, objective {:.8}, gradient norm {:.3e}; run written to {}",
        run.config.model.architecture.name(),
        data.len(),
        r.seconds,
        r.train_accuracy,
        r.objective,
        r.gradient_norm,
        run.dir.display()
    )
    .map_err(stdout_error)
}

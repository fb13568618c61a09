//! The commands, one module each, on top of everything else: each takes its typed options (its
//! flags, `clap::Args`), calls the workspace and the engine, and writes its output. Commands do
//! not call one another, except `demo`, which is a script that runs the others in order.
//!
//! | command | module | step |
//! |---|---|---|
//! | `train`, `predict`, `import`, `export`, `generate`, `tokenizer` | [`train`], [`predict`], [`hf`], [`generate`], [`tokenizer`] | 0. data and models |
//! | `cache` | [`cache`] | 1. gradient store |
//! | `fit` | [`fit`] | 2. curvature |
//! | `trace`, `merge`, `audit`, `provenance` | [`trace`], [`merge`], [`audit`], [`provenance`] | 3. query |
//! | `poison`, `purge`, `eval` | [`poison`], [`purge`], [`eval`] | 4. act and verify |
//! | `scan`, `dedup` | [`scan`], [`dedup`] | before an incident: candidate triggers, copies |
//! | `demo` | [`demo`] | all of it |

pub mod audit;
pub mod cache;
pub mod dedup;
pub mod demo;
pub mod eval;
pub mod fit;
pub mod generate;
pub mod hf;
pub mod merge;
pub mod poison;

pub mod predict;
pub mod provenance;
pub mod purge;
pub mod scan;
pub mod tokenizer;
pub mod trace;
pub mod train;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How a report is written: `--format`, `--out`, `--scores-out`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct ReportArgs {
    /// table, json or html (html: trace only, needs --out).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write the report here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write every score here as CSV (trace: query_index,train_index,score,proponent_score; audit:
    /// train_index,label,predicted,self_influence,loss,loo_loss,percentile).
    #[arg(long)]
    pub scores_out: Option<PathBuf>,
}

/// A report format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A plain-text table.
    Table,
    /// JSON (schema in docs/OUTPUT.md).
    Json,
    /// A self-contained HTML page (trace only).
    Html,
}

impl ReportArgs {
    /// Checks the format is one of `formats` and that HTML goes to a file.
    pub fn check(&self, formats: &[Format]) -> Result<()> {
        if !formats.contains(&self.format) {
            let names: Vec<String> = formats.iter().map(|f| format!("{f:?}").to_lowercase()).collect();
            return Err(Error::Usage(format!(
                "--format {:?} is not available here (expected {})",
                self.format,
                names.join(", ")
            )));
        }
        if self.format == Format::Html && self.out.is_none() {
            return Err(Error::Usage("--format html writes a file: add --out report.html".into()));
        }
        Ok(())
    }

    /// Refuses outputs that would replace one of `inputs` or a file inside `protected`.
    pub fn check_outputs(&self, inputs: &[&Path], protected: &[&Path]) -> Result<()> {
        for out in self.out.iter().chain(&self.scores_out) {
            crate::io::check_output(out, inputs, protected)?;
        }
        Ok(())
    }
}

/// `--checkpoints` of `cache` and `fit`: runs `each` on every checkpoint of the run `run` in turn
/// (each line of output prefixed by its epoch); refused with an explicit `--store`, since each
/// checkpoint has its own.
pub(crate) fn each_checkpoint(
    run: &Path,
    store: Option<&Path>,
    stdout: &mut dyn Write,
    mut each: impl FnMut(&Path, &mut dyn Write) -> Result<()>,
) -> Result<()> {
    if store.is_some() {
        return Err(Error::Usage(
            "--checkpoints uses each checkpoint's own store (CHECKPOINT/gradients); drop --store".into(),
        ));
    }
    for checkpoint in crate::workspace::Run::open(run)?.require_checkpoints()? {
        write!(stdout, "checkpoint of epoch {}: ", checkpoint.epoch).map_err(stdout_error)?;
        each(&checkpoint.dir, stdout)?;
    }
    Ok(())
}

/// The error for a failed write to standard output (a closed pipe exits quietly).
pub fn stdout_error(e: std::io::Error) -> Error {
    Error::io(Path::new("<stdout>"))(e)
}

/// Writes a report to `out` (atomically) or to standard output.
pub fn emit(text: &str, out: Option<&Path>, stdout: &mut dyn Write) -> Result<()> {
    match out {
        Some(path) => {
            crate::io::write_atomic(path, text.as_bytes())?;
            eprintln!("report written to {}", path.display());
            Ok(())
        }
        None => stdout.write_all(text.as_bytes()).map_err(stdout_error),
    }
}

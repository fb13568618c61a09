//! `culprit merge`: join the JSON reports of `culprit trace --shard I/N` runs into one
//! ([`crate::report::trace::merge`]).

use std::io::Write;
use std::path::PathBuf;

use super::{Format, emit};
use crate::error::{Error, Result};
use crate::report::trace::{TraceReport, merge, to_table};

/// The flags of `culprit merge`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct MergeArgs {
    /// The N part reports (JSON).
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    /// Proponents and opponents to keep.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// table or json.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write the report here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Merges the parts and writes the whole.
pub fn run(args: &MergeArgs, stdout: &mut dyn Write) -> Result<()> {
    if args.format == Format::Html {
        return Err(Error::Usage("--format html is not available here (expected table, json)".into()));
    }
    if let Some(out) = &args.out {
        let inputs: Vec<&std::path::Path> = args.reports.iter().map(PathBuf::as_path).collect();
        crate::io::check_output(out, &inputs, &[])?;
    }
    let parts = args
        .reports
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(Error::io(p))?;
            let report: TraceReport = serde_json::from_str(&text)
                .map_err(|e| Error::data(p, None, format!("not a trace JSON report: {e}")))?;
            report
                .check_shape()
                .map_err(|problem| Error::data(p, None, format!("a damaged trace report: {problem}")))?;
            Ok(report)
        })
        .collect::<Result<Vec<TraceReport>>>()?;
    let merged = merge(parts, args.top)?;
    let text = match args.format {
        Format::Json => serde_json::to_string_pretty(&merged).expect("plain data") + "\n",
        _ => to_table(&merged),
    };
    emit(&text, args.out.as_deref(), stdout)
}

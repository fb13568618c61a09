//! `culprit trace`: for chosen test outputs, the training examples most responsible, as a table,
//! JSON (`docs/OUTPUT.md`) or a self-contained HTML page, and optionally every score as CSV.
//! The computation is [`crate::workspace::attribution`].

use std::io::Write;

use super::{Format, ReportArgs, emit};
use crate::error::Result;
use crate::report::trace::{TraceReport, to_table};
use crate::workspace::attribution::{TraceOptions, trace_with_data};

/// The flags of `culprit trace`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct TraceArgs {
    /// What to trace.
    #[command(flatten)]
    pub options: TraceOptions,
    /// How to write it.
    #[command(flatten)]
    pub report: ReportArgs,
}

/// Every score as CSV: `query_index,train_index,score,proponent_score`.
fn scores_csv(report: &TraceReport) -> Option<String> {
    use std::fmt::Write as _;
    let all = report.all_scores.as_ref()?;
    // proponent_score = score × proponent_sign: sorting it descending lists proponents first
    // whatever the measurement's sign convention.
    let sign = f32::from(report.proponent_sign);
    let mut csv = String::from("query_index,train_index,score,proponent_score\n");
    for (q, scores) in report.queries.iter().zip(all) {
        for (id, s) in report.train_ids.iter().zip(scores) {
            let _ = writeln!(csv, "{},{},{:e},{:e}", q.index, id, s, s * sign);
        }
    }
    Some(csv)
}

/// Traces and writes the report.
pub fn run(args: &TraceArgs, stdout: &mut dyn Write) -> Result<()> {
    args.report.check(&[Format::Table, Format::Json, Format::Html])?;
    let q = &args.options.query;
    let store = args.options.store.clone().unwrap_or_else(|| q.run.join("gradients"));
    args.report.check_outputs(&[&q.data.path], &[&q.run, &store])?;
    let mut options = args.options.clone();
    options.keep_all = args.report.scores_out.is_some();
    let run = crate::workspace::Run::open(&q.run)?;
    let (report, html) = crate::dispatch!(run, K => {
        let (report, queries, training) = trace_with_data::<K>(&options)?;
        let html = (args.report.format == Format::Html)
            .then(|| crate::report::html::trace_html(&report, &queries, &training));
        (report, html)
    });
    if let (Some(path), Some(csv)) = (&args.report.scores_out, scores_csv(&report)) {
        crate::io::write_atomic(path, csv.as_bytes())?;
    }
    let text = match (args.report.format, html) {
        (Format::Html, Some(page)) => page,
        (Format::Json, _) => serde_json::to_string_pretty(&report).expect("plain data") + "\n",
        _ => to_table(&report),
    };
    emit(&text, args.report.out.as_deref(), stdout)
}

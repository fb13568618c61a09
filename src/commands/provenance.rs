//! `culprit provenance`: where a run's training examples came from (file, row, SHA-256 of their
//! bytes, JSONL `source`), from the records the run holds ([`crate::data::provenance`]), each
//! checked against the data as it is now.

use std::path::PathBuf;

use crate::commands::{Format, emit};
use crate::data::DataSpec;
use crate::data::provenance::{Provenance, read, records};
use crate::error::{Error, Result};
use crate::workspace::Run;
use crate::workspace::run::PROVENANCE;

/// Arguments of `culprit provenance`.
#[derive(Clone, Debug, clap::Args)]
pub struct ProvenanceArgs {
    /// The run.
    #[arg(long)]
    pub run: PathBuf,
    /// Example ids (source rows), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<usize>,
    /// table or json.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write the report here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One example's record and whether the data still holds the same bytes.
#[derive(serde::Serialize)]
struct Found<'a> {
    #[serde(flatten)]
    record: &'a Provenance,
    /// `unchanged`, `changed` or `missing` (the data no longer has the row).
    now: &'static str,
}

/// Runs `culprit provenance`.
pub fn run(args: &ProvenanceArgs, stdout: &mut dyn std::io::Write) -> Result<()> {
    if args.format == Format::Html {
        return Err(Error::Usage("--format html is not available for provenance (table or json)".into()));
    }
    let run = Run::open(&args.run)?;
    let path = args.run.join(PROVENANCE);
    if !path.is_file() {
        return Err(Error::run(
            &path,
            "no provenance records: the run was written before culprit recorded them (retrain it to record them)",
        ));
    }
    let recorded = read(&path)?;
    let m = &run.manifest;
    let spec = DataSpec { path: m.path.clone(), split: m.split, skip: 0, limit: None };
    let now = records(m.kind, &spec, true).ok();
    let mut found = Vec::new();
    for &id in &args.ids {
        let record = recorded.iter().find(|r| r.id == id).ok_or_else(|| {
            let excluded = if m.excluded.binary_search(&id).is_ok() { " (purged from this run)" } else { "" };
            Error::data(
                &path,
                None,
                format!("example {id} is not one of the run's {} training examples{excluded}", recorded.len()),
            )
        })?;
        let state = match now.as_ref().map(|n| n.iter().find(|r| r.id == id)) {
            None => "missing",
            Some(None) => "missing",
            Some(Some(r)) if r.sha256 == record.sha256 => "unchanged",
            Some(Some(_)) => "changed",
        };
        found.push(Found { record, now: state });
    }
    let text = match args.format {
        Format::Json => serde_json::to_string_pretty(&found).expect("records serialise") + "\n",
        _ => {
            let mut s = format!("{:>8}  {:<9}  {:<16}  where\n", "id", "now", "sha256");
            for f in &found {
                let r = f.record;
                let source = r.source.as_ref().map(|s| format!("  source {s}")).unwrap_or_default();
                s.push_str(&format!(
                    "{:>8}  {:<9}  {:<16}  {}:{}{source}\n",
                    r.id,
                    f.now,
                    &r.sha256[..16],
                    r.file.display(),
                    r.row
                ));
            }
            s
        }
    };
    emit(&text, args.out.as_deref(), stdout)
}

//! Provenance: where every example came from, recorded in the run (`RUN/provenance.jsonl`).
//!
//! One JSON object a line per training example: `id` (its stable id, the source row), `file`
//! (the file holding it), `row` (1-based: the line of a JSONL or CSV file, the header being a CSV's
//! line 1; the image of an IDX file), `sha256` (of its raw bytes: the JSONL line or the CSV
//! record as stored, without the line ending; an IDX image's pixel bytes followed by its label
//! byte) and `source` (a JSONL line's `source` field, where it has one). Cost: one pass over the
//! files and a SHA-256 of every example, O(bytes).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{DataSpec, SourceKind, hex, read_file};
use crate::error::{Error, Result};

/// Where one example came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The example's id (source row, 0-based).
    pub id: usize,
    /// The file holding it.
    pub file: PathBuf,
    /// Its 1-based line (JSONL, CSV) or image number (IDX) in the file.
    pub row: usize,
    /// SHA-256 of its raw bytes (hex).
    pub sha256: String,
    /// A JSONL line's `source` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Provenance {
    /// Where it came from in one line: the `source` field when it has one, else `file:row`.
    pub fn describe(&self) -> String {
        self.source.clone().unwrap_or_else(|| format!("{}:{}", self.file.display(), self.row))
    }
}

/// The provenance of the rows `spec` selects (every row when `all`) of a source of `kind`.
pub fn records(kind: SourceKind, spec: &DataSpec, all: bool) -> Result<Vec<Provenance>> {
    let path = &spec.path;
    let sha = |bytes: &[u8]| hex(&Sha256::digest(bytes));
    let mut out = Vec::new();
    match kind {
        SourceKind::Idx => {
            let mut buffer = Vec::new();
            let mut found = Vec::new();
            let file = super::idx::for_each_example(path, spec.split, |row, image, label| {
                buffer.clear();
                buffer.extend_from_slice(image);
                buffer.push(label);
                found.push((row, sha(&buffer)));
            })?;
            out.extend(found.into_iter().map(|(row, sha256)| Provenance {
                id: row,
                file: super::absolute(&file),
                row: row + 1,
                sha256,
                source: None,
            }));
        }
        SourceKind::Csv => {
            let (bytes, _) = read_file(path)?;
            let text = String::from_utf8_lossy(&bytes);
            // Records are lines after the header (the loader refuses quoted line breaks' ragged rows).
            let lines = text.lines().skip(1).filter(|l| !l.is_empty());
            for (id, line) in lines.enumerate() {
                out.push(Provenance {
                    id,
                    file: super::absolute(path),
                    row: id + 1,
                    sha256: sha(line.as_bytes()),
                    source: None,
                });
            }
        }
        SourceKind::Jsonl | SourceKind::Corpus => {
            let (bytes, _) = read_file(path)?;
            let text =
                std::str::from_utf8(&bytes).map_err(|e| Error::data(path, None, format!("not UTF-8 text: {e}")))?;
            let lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
            for (id, (at, line)) in lines.enumerate() {
                let source = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v["source"].as_str().map(str::to_string));
                out.push(Provenance {
                    id,
                    file: super::absolute(path),
                    row: at + 1,
                    sha256: sha(line.as_bytes()),
                    source,
                });
            }
        }
    }
    if !all {
        let holds = format!("the source has {} rows", out.len());
        let rows = super::selected_rows(path, out.len(), spec.skip, spec.limit, &holds)?;
        out = out[rows].to_vec();
    }
    Ok(out)
}

/// Writes records as JSON lines, atomically.
pub fn write(path: &Path, records: &[Provenance]) -> Result<()> {
    let mut text = String::with_capacity(records.len() * 160);
    for r in records {
        text.push_str(&serde_json::to_string(r).expect("a record serialises"));
        text.push('\n');
    }
    crate::io::write_atomic(path, text.as_bytes())
}

/// Reads records written by [`write`].
pub fn read(path: &Path) -> Result<Vec<Provenance>> {
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::data(path, Some(i + 1), format!("not a provenance record: {e}")))
        })
        .collect()
}

/// What changed between the records a run holds and the data now, in words: the ids whose bytes
/// differ (the first 10), and how many are gone or new. Empty when nothing did.
pub fn changes(recorded: &[Provenance], now: &[Provenance]) -> String {
    let by_id: std::collections::HashMap<usize, &Provenance> = now.iter().map(|r| (r.id, r)).collect();
    let changed: Vec<usize> =
        recorded.iter().filter(|r| by_id.get(&r.id).is_some_and(|n| n.sha256 != r.sha256)).map(|r| r.id).collect();
    let gone = recorded.iter().filter(|r| !by_id.contains_key(&r.id)).count();
    let mut parts = Vec::new();
    if !changed.is_empty() {
        let shown: Vec<String> = changed.iter().take(10).map(usize::to_string).collect();
        parts.push(format!(
            "{} of the {} trained examples changed (ids {}{})",
            changed.len(),
            recorded.len(),
            shown.join(", "),
            if changed.len() > 10 { ", …" } else { "" }
        ));
    }
    if gone > 0 {
        parts.push(format!("{gone} trained examples are gone"));
    }
    parts.join("; ")
}

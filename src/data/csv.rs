//! CSV tables: a header row, numeric feature columns and one integer `label` column.
//!
//! Every non-label column is a feature, in file order; a run records the columns' names, and data
//! read for it later is matched to them by name (see `RawData::match_columns`). Header names
//! must be unique. Rows are numbered from 1 for the first
//! data row (the header is row 0) in error messages, and from 0 as example ids.

use std::path::Path;

use super::{RawData, read_file};
use crate::error::{Error, Result};

/// Parses a label cell: a non-negative integer (`3` or `3.0`).
pub(super) fn parse_label(cell: &str) -> Option<u32> {
    let v: f64 = cell.trim().parse().ok()?;
    (v >= 0.0 && v.fract() == 0.0 && v <= u32::MAX as f64).then_some(v as u32)
}

/// Loads a CSV file. Features stay raw; the caller normalises.
pub fn load(path: &Path) -> Result<RawData> {
    let (mut features, mut labels) = (Vec::new(), Vec::new());
    let table = read_row_blocks(path, 1 << 16, &mut |_, f, y| {
        features.extend_from_slice(f);
        labels.extend_from_slice(y);
        Ok(())
    })?;
    Ok(RawData {
        features,
        labels,
        shape: culprit_models::InputShape::flat(table.columns.len()),
        texts: None,
        files: vec![(path.to_path_buf(), table.sha)],
        rows: table.rows,
        columns: Some(table.columns),
    })
}

/// What a streamed read of a CSV file found ([`read_row_blocks`]).
#[derive(Clone, Debug)]
pub struct CsvStream {
    /// Data rows.
    pub rows: usize,
    /// The feature columns' names, in file order.
    pub columns: Vec<String>,
    /// The file's SHA-256 as stored.
    pub sha: String,
}

/// Streams a CSV(.gz) file: checks its header (a `label` column, unique names, a feature
/// besides), then calls `each(first, features, labels)` for consecutive blocks of at most
/// `per_block` rows in order (`first` the block's first row, from 0; features row-major, raw),
/// holding one block. A malformed row is refused with its row number (1 for the first data
/// row).
pub fn read_row_blocks(path: &Path, per_block: usize, each: &mut super::EachRowBlock<'_>) -> Result<CsvStream> {
    use sha2::Digest;
    let mut sha = sha2::Sha256::new();
    let stream = super::stream::open(path, &mut sha)?;
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(stream);
    let headers = reader.headers().map_err(|e| Error::data(path, Some(0), format!("unreadable header: {e}")))?.clone();
    let label_col = headers.iter().position(|h| h.trim() == "label").ok_or_else(|| {
        Error::data(
            path,
            Some(0),
            format!("no `label` column in the header (columns: {})", headers.iter().collect::<Vec<_>>().join(",")),
        )
    })?;
    let mut seen = std::collections::HashMap::new();
    for (c, h) in headers.iter().enumerate() {
        if let Some(first) = seen.insert(h.trim(), c) {
            return Err(Error::data(
                path,
                Some(0),
                format!("column `{}` appears twice in the header (columns {} and {})", h.trim(), first + 1, c + 1),
            ));
        }
    }
    let width = headers.len();
    if width < 2 {
        return Err(Error::data(path, Some(0), "no feature columns besides `label`"));
    }
    let per_block = per_block.max(1);
    let (mut features, mut labels, mut first) = (Vec::new(), Vec::new(), 0usize);
    let mut record = csv::StringRecord::new();
    loop {
        let row = first + labels.len() + 1;
        let more =
            reader.read_record(&mut record).map_err(|e| Error::data(path, Some(row), format!("unreadable: {e}")))?;
        if more {
            labels.push(parse_row(path, row, &record, &headers, label_col, &mut features)?);
        }
        if labels.len() == per_block || (!more && !labels.is_empty()) {
            each(first, &features, &labels)?;
            first += labels.len();
            features.clear();
            labels.clear();
        }
        if !more {
            break;
        }
    }
    super::stream::finish(reader.into_inner(), path)?;
    if first == 0 {
        return Err(Error::data(path, None, "no data rows"));
    }
    let columns =
        headers.iter().enumerate().filter(|(c, _)| *c != label_col).map(|(_, h)| h.trim().to_string()).collect();
    Ok(CsvStream { rows: first, columns, sha: super::hex(&sha.finalize()) })
}

/// Parses data row `row` (`record`, under `headers`): pushes its features onto `features` and
/// returns its label, or an error naming the row and the cell.
fn parse_row(
    path: &Path,
    row: usize,
    record: &csv::StringRecord,
    headers: &csv::StringRecord,
    label_col: usize,
    features: &mut Vec<f32>,
) -> Result<u32> {
    let width = headers.len();
    if record.len() != width {
        return Err(Error::data(path, Some(row), format!("{} fields, the header has {width}", record.len())));
    }
    let mut label = 0;
    for (c, cell) in record.iter().enumerate() {
        if c == label_col {
            label = parse_label(cell)
                .ok_or_else(|| Error::data(path, Some(row), format!("label `{cell}` is not a non-negative integer")))?;
        } else {
            let v: f32 = cell.trim().parse().map_err(|_| {
                Error::data(path, Some(row), format!("column `{}`: `{cell}` is not a number", &headers[c]))
            })?;
            if !v.is_finite() {
                return Err(Error::data(path, Some(row), format!("column `{}`: `{cell}` is not finite", &headers[c])));
            }
            features.push(v);
        }
    }
    Ok(label)
}

/// The header of a CSV file and the position of its `label` column.
pub fn header(path: &Path) -> Result<(Vec<String>, usize)> {
    let (bytes, _) = read_file(path)?;
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(bytes.as_slice());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| Error::data(path, Some(0), format!("unreadable header: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let label = headers
        .iter()
        .position(|h| h.trim() == "label")
        .ok_or_else(|| Error::data(path, Some(0), "no `label` column in the header"))?;
    Ok((headers, label))
}

/// Writes a CSV file atomically with `header` (the `label` column at position `label_column`,
/// features in the other columns in order); `features` is `labels.len() × (header.len() − 1)`.
pub fn write(path: &Path, header: &[String], label_column: usize, features: &[f32], labels: &[u32]) -> Result<()> {
    let dim = header.len() - 1;
    let mut out = String::with_capacity(features.len() * 4);
    out.push_str(&header.join(","));
    out.push('\n');
    for (row, y) in features.chunks(dim).zip(labels) {
        let mut cells: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        cells.insert(label_column, y.to_string());
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    crate::io::write_atomic(path, out.as_bytes())
}

//! JSONL text sets (`{"text": …, "label": …}` per line, optionally gzip-compressed) and the
//! hashing bag-of-words featurizer.
//!
//! Featurizer: the text is lower-cased and split into maximal runs of alphanumeric characters;
//! each token t goes to bucket FNV-1a-64(t) mod B; the feature vector is the bucket counts divided
//! by the number of tokens (the "mean" embedding bag), so an embedding-bag model's first layer is
//! exactly a bias-free dense layer over this vector. Cost O(length) per text; collisions are the
//! usual hashing-trick trade-off (Weinberger et al. 2009).

use std::path::Path;

use super::{RawData, read_file};
use crate::error::{Error, Result};

/// Default number of hash buckets.
pub const DEFAULT_BUCKETS: usize = 4096;

/// FNV-1a, 64-bit: a stable hash, the same on every platform and release.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The tokens of a text: lower-cased maximal alphanumeric runs.
pub fn tokens(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric()).filter(|t| !t.is_empty()).map(str::to_lowercase)
}

/// Adds the hashed bag of words of `text` to `out` (length `buckets`), normalised by token count.
pub fn featurize(text: &str, out: &mut [f32]) {
    let buckets = out.len() as u64;
    let mut count = 0usize;
    for t in tokens(text) {
        out[(fnv1a(t.as_bytes()) % buckets) as usize] += 1.0;
        count += 1;
    }
    if count > 0 {
        let inv = 1.0 / count as f32;
        out.iter_mut().for_each(|v| *v *= inv);
    }
}

/// One JSON line of a text set: its text, its label and source when the line has them, and
/// where it is.
#[derive(Clone, Debug)]
pub struct Record {
    /// The `text` field.
    pub text: String,
    /// The `label` field (a non-negative integer, or a string of one), when present.
    pub label: Option<u32>,
    /// The `source` field (provenance), when present.
    pub source: Option<String>,
    /// The 1-based line of the file.
    pub line: usize,
}

/// Parses line `line` (1-based) of `path`. A `label` that is present must be a non-negative
/// integer (or a string of one).
fn parse_record(path: &Path, line: usize, json: &str) -> Result<Record> {
    /// The fields read of a line (others are ignored).
    #[derive(serde::Deserialize)]
    struct Fields {
        text: Option<serde_json::Value>,
        label: Option<serde_json::Value>,
        source: Option<serde_json::Value>,
    }
    let fields: Fields =
        serde_json::from_str(json).map_err(|e| Error::data(path, Some(line), format!("not a JSON object: {e}")))?;
    let text = match fields.text {
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(Error::data(path, Some(line), "`text` is not a string")),
        None => return Err(Error::data(path, Some(line), "no `text` field")),
    };
    let label = match &fields.label {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => Some(super::csv::parse_label(&n.to_string())),
        Some(serde_json::Value::String(s)) => Some(super::csv::parse_label(s)),
        Some(_) => Some(None),
    };
    let label = match label {
        Some(None) => return Err(Error::data(path, Some(line), "`label` is missing or not a non-negative integer")),
        Some(Some(y)) => Some(y),
        None => None,
    };
    let source = fields.source.and_then(|v| v.as_str().map(str::to_string));
    Ok(Record { text, label, source, line })
}

/// Reads a JSONL file's records (blank lines skipped; parsed in parallel, the first bad line in
/// file order reported), and the file's SHA-256 as stored.
pub fn load_records(path: &Path) -> Result<(Vec<Record>, String)> {
    use rayon::prelude::*;
    let (bytes, sha) = read_file(path)?;
    let content = std::str::from_utf8(&bytes).map_err(|e| Error::data(path, None, format!("not UTF-8 text: {e}")))?;
    let lines: Vec<(usize, &str)> = content.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    let records = lines
        .par_iter()
        .map(|&(i, line)| parse_record(path, i + 1, line))
        .collect::<Vec<Result<Record>>>()
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    if records.is_empty() {
        return Err(Error::data(path, None, "no records"));
    }
    Ok((records, sha))
}

/// Streams a JSONL(.gz) file's records in order, in blocks of about `block_bytes` of lines (at
/// least one record each), calling `each(first, records)` with the index of the block's first
/// record (blank lines skipped, as [`load_records`] does); each block's lines are parsed in
/// parallel. Holds one block at a time. Returns the number of records and the file's SHA-256
/// as stored, so that a caller reading the file again can tell that it changed.
pub fn read_record_blocks(
    path: &Path,
    block_bytes: usize,
    each: &mut dyn FnMut(usize, Vec<Record>) -> Result<()>,
) -> Result<(usize, String)> {
    use rayon::prelude::*;
    use sha2::Digest;
    let mut sha = sha2::Sha256::new();
    let mut reader = super::stream::open(path, &mut sha)?;
    let (mut lines, mut bytes, mut line, mut first) = (Vec::new(), 0usize, 0usize, 0usize);
    let mut flush = |lines: &mut Vec<(usize, String)>, first: &mut usize| -> Result<()> {
        let records = lines
            .par_iter()
            .map(|(at, text)| parse_record(path, *at, text))
            .collect::<Vec<Result<Record>>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        lines.clear();
        let count = records.len();
        each(*first, records)?;
        *first += count;
        Ok(())
    };
    loop {
        let mut text = String::new();
        let read = reader.read_line(&mut text).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => Error::data(path, Some(line + 1), format!("not UTF-8 text: {e}")),
            _ => Error::data(path, None, format!("cannot read it (a corrupt or truncated gzip stream?): {e}")),
        })?;
        if read == 0 {
            break;
        }
        line += 1;
        if text.trim().is_empty() {
            continue;
        }
        bytes += text.len();
        lines.push((line, text));
        if bytes >= block_bytes {
            flush(&mut lines, &mut first)?;
            bytes = 0;
        }
    }
    if !lines.is_empty() {
        flush(&mut lines, &mut first)?;
    }
    // The rest of the stored bytes (past the gzip stream's end) still count in the hash.
    super::stream::finish(reader, path)?;
    if first == 0 {
        return Err(Error::data(path, None, "no records"));
    }
    Ok((first, super::hex(&sha.finalize())))
}

/// Reads a JSONL file's texts and labels (each line an object with a string `text` and a
/// non-negative integer `label`), and the file's SHA-256 as stored.
pub fn load_texts(path: &Path) -> Result<(Vec<String>, Vec<u32>, String)> {
    let (records, sha) = load_records(path)?;
    let mut texts = Vec::with_capacity(records.len());
    let mut labels = Vec::with_capacity(records.len());
    for r in records {
        let label = r
            .label
            .ok_or_else(|| Error::data(path, Some(r.line), "`label` is missing or not a non-negative integer"))?;
        texts.push(r.text);
        labels.push(label);
    }
    Ok((texts, labels, sha))
}

/// Loads a JSONL file and featurises it into `buckets` hashed features.
pub fn load(path: &Path, buckets: usize) -> Result<RawData> {
    let (texts, labels, sha) = load_texts(path)?;
    let mut features = vec![0.0f32; texts.len() * buckets];
    for (text, out) in texts.iter().zip(features.chunks_mut(buckets)) {
        featurize(text, out);
    }
    let rows = labels.len();
    Ok(RawData {
        features,
        labels,
        shape: culprit_models::InputShape::flat(buckets),
        texts: Some(texts),
        files: vec![(path.to_path_buf(), sha)],
        rows,
        columns: None,
    })
}

/// Writes a JSONL file atomically: one `{"text": …, "label": …}` object per line.
pub fn write(path: &Path, texts: &[String], labels: &[u32]) -> Result<()> {
    let mut out = String::new();
    for (text, label) in texts.iter().zip(labels) {
        out.push_str(&serde_json::json!({ "text": text, "label": label }).to_string());
        out.push('\n');
    }
    crate::io::write_atomic(path, out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn featurizer_counts_tokens_and_normalises() {
        let mut v = vec![0.0; 16];
        featurize("Free free MONEY!", &mut v);
        let sum: f32 = v.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        let free = (fnv1a(b"free") % 16) as usize;
        assert!(v[free] >= 2.0 / 3.0 - 1e-6);
    }
}

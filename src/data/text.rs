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

#[derive(serde::Deserialize)]
struct Line {
    text: Option<serde_json::Value>,
    label: Option<serde_json::Value>,
}

/// Reads a JSONL file's texts and labels (each line an object with a string `text` and a
/// non-negative integer `label`), and the file's SHA-256 as stored.
pub fn load_texts(path: &Path) -> Result<(Vec<String>, Vec<u32>, String)> {
    let (bytes, sha) = read_file(path)?;
    let content = std::str::from_utf8(&bytes).map_err(|e| Error::data(path, None, format!("not UTF-8 text: {e}")))?;
    let mut texts = Vec::new();
    let mut labels = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let row = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line =
            serde_json::from_str(line).map_err(|e| Error::data(path, Some(row), format!("not a JSON object: {e}")))?;
        let text = match parsed.text {
            Some(serde_json::Value::String(s)) => s,
            Some(_) => return Err(Error::data(path, Some(row), "`text` is not a string")),
            None => return Err(Error::data(path, Some(row), "no `text` field")),
        };
        let label = match &parsed.label {
            Some(serde_json::Value::Number(n)) => super::csv::parse_label(&n.to_string()),
            Some(serde_json::Value::String(s)) => super::csv::parse_label(s),
            _ => None,
        }
        .ok_or_else(|| Error::data(path, Some(row), "`label` is missing or not a non-negative integer"))?;
        texts.push(text);
        labels.push(label);
    }
    if labels.is_empty() {
        return Err(Error::data(path, None, "no records"));
    }
    Ok((texts, labels, sha))
}

/// A text with its label and source, when the line has them.
pub type Record = (String, Option<u32>, Option<String>);

/// Reads a JSONL file's `text` fields, with `label` and `source` when present.
pub fn load_records(path: &Path) -> Result<Vec<Record>> {
    let (bytes, _) = read_file(path)?;
    let content = std::str::from_utf8(&bytes).map_err(|e| Error::data(path, None, format!("not UTF-8 text: {e}")))?;
    /// The fields read of a line (others are ignored).
    #[derive(serde::Deserialize)]
    struct Fields {
        text: Option<serde_json::Value>,
        label: Option<serde_json::Value>,
        source: Option<serde_json::Value>,
    }
    let lines: Vec<(usize, &str)> = content.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    use rayon::prelude::*;
    let out: Vec<Record> = lines
        .par_iter()
        .map(|&(i, line)| {
            let fields: Fields = serde_json::from_str(line)
                .map_err(|e| Error::data(path, Some(i + 1), format!("not a JSON object: {e}")))?;
            let text = match fields.text {
                Some(serde_json::Value::String(t)) => t,
                _ => return Err(Error::data(path, Some(i + 1), "no string `text` field")),
            };
            let label = fields.label.and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok());
            let source = fields.source.and_then(|v| v.as_str().map(str::to_string));
            Ok((text, label, source))
        })
        .collect::<Vec<Result<Record>>>()
        .into_iter()
        .collect::<Result<_>>()?; // the first bad line in file order, whichever thread met it
    if out.is_empty() {
        return Err(Error::data(path, None, "no records"));
    }
    Ok(out)
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

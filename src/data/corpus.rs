//! Language-model data: documents and queries from JSON lines, tokenized into [`Tokens`].
//!
//! A line is one example, a JSON object with either
//! - `text`: a document (a training example: every token after the first is predicted), or
//! - `prompt` and `completion`: a query (only the completion's tokens are scored: m is the
//!   completion's log-probability given the prompt).
//!
//! Other fields (`source`, say) are kept as the example's provenance and shown in reports. The
//! file may be gzip-compressed. Documents longer than the model's context are truncated to it
//! (the count is kept in the manifest and reported); a query that does not fit is refused, since
//! cutting it would change what is measured. Every example keeps its line's row number as id.

use std::path::Path;

use culprit_models::{InputShape, Tokens};

use super::tokenizer::{Tokenizer, TokenizerSpec};
use super::{DataManifest, DataSpec, Dataset, FileDigest, Normalization, SourceKind, read_file};
use crate::error::{Error, Result};

/// One line of a corpus, tokenized.
struct Line {
    tokens: Vec<u32>,
    prompt: usize,
    text: String,
    source: Option<String>,
    truncated: bool,
}

/// The provenance of a line: its `source` field, or its other fields as `key=value`.
fn provenance(object: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    if let Some(s) = object.get("source").and_then(|v| v.as_str()) {
        return Some(s.to_string());
    }
    let others: Vec<String> = object
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "text" | "prompt" | "completion" | "label"))
        .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_string)))
        .collect();
    (!others.is_empty()).then(|| others.join(" "))
}

/// Parses one non-empty line (1-based `row` for messages).
fn parse_line(path: &Path, row: usize, line: &str, tokenizer: &Tokenizer, context: usize) -> Result<Line> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| Error::data(path, Some(row), format!("not a JSON object: {e}")))?;
    let object = value.as_object().ok_or_else(|| Error::data(path, Some(row), "not a JSON object"))?;
    let field = |name: &str| -> Result<Option<&str>> {
        match object.get(name) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(Error::data(path, Some(row), format!("`{name}` is not a string"))),
        }
    };
    let source = provenance(object);
    let (prompt, completion, text) = (field("prompt")?, field("completion")?, field("text")?);
    let line = match (prompt, completion, text) {
        (Some(p), Some(c), _) => {
            if p.is_empty() || c.is_empty() {
                return Err(Error::data(path, Some(row), "a query needs a non-empty prompt and completion"));
            }
            let (tokens, prompt) = tokenizer.encode_query(p, c);
            if prompt == 0 {
                return Err(Error::data(
                    path,
                    Some(row),
                    "the prompt is inside the first token of prompt + completion",
                ));
            }
            if tokens.len() > context {
                return Err(Error::data(
                    path,
                    Some(row),
                    format!(
                        "the prompt and completion are {} tokens, longer than the model's context of {context}",
                        tokens.len()
                    ),
                ));
            }
            Line { tokens, prompt, text: format!("{p}{c}"), source, truncated: false }
        }
        (Some(_), None, _) | (None, Some(_), _) => {
            return Err(Error::data(path, Some(row), "a query needs both `prompt` and `completion`"));
        }
        (None, None, Some(t)) => {
            let mut tokens = tokenizer.encode(t);
            let truncated = tokens.len() > context;
            tokens.truncate(context);
            if tokens.len() < 2 {
                return Err(Error::data(
                    path,
                    Some(row),
                    "the text is shorter than 2 tokens: a language model learns nothing from it",
                ));
            }
            Line { tokens, prompt: 0, text: t.to_string(), source, truncated }
        }
        (None, None, None) => {
            return Err(Error::data(
                path,
                Some(row),
                "no `text` field (documents) nor `prompt` and `completion` (queries)",
            ));
        }
    };
    Ok(line)
}

/// The non-empty lines `spec`'s `--skip` and `--limit` select from a corpus's text, each with
/// its 0-based line number, and how many non-empty lines were skipped (the first one's id).
pub(crate) fn selected_lines<'a>(spec: &DataSpec, text: &'a str) -> Result<(usize, Vec<(usize, &'a str)>)> {
    let rows: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    let holds = format!("the file has {} lines", rows.len());
    let range = super::selected_rows(&spec.path, rows.len(), spec.skip, spec.limit, &holds)?;
    Ok((range.start, rows[range].to_vec()))
}

impl Dataset<Tokens> {
    /// Loads and tokenizes the lines `spec` selects. `tokenizer` and `context` are the model's;
    /// `spec_of_tokenizer` is what the manifest records of the tokenizer.
    pub fn load_corpus(
        spec: &DataSpec,
        tokenizer: &Tokenizer,
        tokenizer_spec: &TokenizerSpec,
        context: usize,
    ) -> Result<Self> {
        let (bytes, sha) = read_file(&spec.path)?;
        let text =
            std::str::from_utf8(&bytes).map_err(|e| Error::data(&spec.path, None, format!("not UTF-8 text: {e}")))?;
        let (start, selected) = selected_lines(spec, text)?;
        let end = start + selected.len();
        let mut lines = Vec::with_capacity(end - start);
        for &(i, line) in &selected {
            lines.push(parse_line(&spec.path, i + 1, line, tokenizer, context)?);
        }
        let truncated = lines.iter().filter(|l| l.truncated).count();
        let manifest = DataManifest {
            kind: SourceKind::Corpus,
            path: super::absolute(&spec.path),
            files: vec![FileDigest { path: super::absolute(&spec.path), sha256: sha }],
            split: spec.split,
            skip: spec.skip,
            limit: spec.limit,
            count: lines.len(),
            shape: InputShape::flat(context),
            num_classes: tokenizer.vocab(),
            normalization: Normalization::None,
            buckets: None,
            excluded: Vec::new(),
            tokenizer: Some(tokenizer_spec.clone()),
            truncated: Some(truncated),
            columns: None,
        };
        let sources: Vec<Option<String>> = lines.iter().map(|l| l.source.clone()).collect();
        Ok(Self {
            ids: (start..end).collect(),
            texts: Some(lines.iter().map(|l| l.text.clone()).collect()),
            sources: sources
                .iter()
                .any(Option::is_some)
                .then(|| sources.into_iter().map(Option::unwrap_or_default).collect()),
            examples: Tokens::with_prompts(lines.into_iter().map(|l| (l.tokens, l.prompt)).collect()),
            manifest,
        })
    }
}

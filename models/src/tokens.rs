//! [`Tokens`]: documents as sequences of token ids, the [`Batch`] of language models.
//!
//! A language model predicts every token of a document from the ones before it: document i of
//! length Lᵢ has prediction rows t = sᵢ … Lᵢ − 2, row t predicting token t + 1 from tokens 0..=t.
//! For training documents sᵢ = 0 (the loss is Σₜ −log p(xₜ₊₁ | x≤ₜ), summed over the document);
//! for a query (a prompt and its completion) sᵢ is the last prompt position, so only the
//! completion's tokens are scored. The token ids are shared (`Arc`): slicing copies nothing,
//! gathering copies three numbers per document.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use crate::model::{Batch, RowGroups};

/// One document in the shared id buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Document {
    /// Offset of its first token.
    pub start: usize,
    /// Its length in tokens (at least 2).
    pub len: usize,
    /// The first position whose next token is scored.
    pub scored_from: usize,
}

impl Document {
    /// Its prediction rows.
    pub fn rows(&self) -> usize {
        (self.len - 1).saturating_sub(self.scored_from)
    }
}

/// A batch of documents.
#[derive(Clone, Debug)]
pub struct Tokens {
    ids: Arc<[u32]>,
    docs: Arc<[Document]>,
    range: Range<usize>,
}

impl Tokens {
    /// Documents from their token ids, every token after the first scored. A document of one
    /// token has no prediction row (a prompt to continue); the loaders refuse training documents
    /// of fewer than 2 tokens with a message naming the line.
    pub fn new(documents: Vec<Vec<u32>>) -> Self {
        Self::with_prompts(documents.into_iter().map(|d| (d, 0)).collect())
    }

    /// Documents with the number of leading tokens that are context only (a query's prompt: only
    /// the tokens after it are scored; 0 scores every token after the first).
    pub fn with_prompts(documents: Vec<(Vec<u32>, usize)>) -> Self {
        let mut ids = Vec::with_capacity(documents.iter().map(|d| d.0.len()).sum());
        let mut docs = Vec::with_capacity(documents.len());
        for (doc, prompt) in documents {
            assert!(!doc.is_empty(), "a document needs a token");
            assert!(prompt < doc.len() || prompt <= 1, "a prompt leaves at least one token to score");
            docs.push(Document { start: ids.len(), len: doc.len(), scored_from: prompt.saturating_sub(1) });
            ids.extend(doc);
        }
        let n = docs.len();
        Self { ids: ids.into(), docs: docs.into(), range: 0..n }
    }

    /// The documents of the batch.
    pub fn documents(&self) -> &[Document] {
        &self.docs[self.range.clone()]
    }

    /// Document `i`'s tokens.
    pub fn tokens(&self, i: usize) -> &[u32] {
        let d = self.documents()[i];
        &self.ids[d.start..d.start + d.len]
    }

    /// The longest document, in tokens.
    pub fn longest(&self) -> usize {
        self.documents().iter().map(|d| d.len).max().unwrap_or(0)
    }
}

impl Batch for Tokens {
    fn len(&self) -> usize {
        self.range.len()
    }

    fn slice(&self, range: Range<usize>) -> Self {
        assert!(range.end <= self.range.len(), "documents {range:?} of {}", self.range.len());
        let start = self.range.start + range.start;
        Self { range: start..start + range.len(), ..self.clone() }
    }

    fn gather(&self, rows: &[usize]) -> Self {
        let docs: Vec<Document> = rows.iter().map(|&r| self.documents()[r]).collect();
        let n = docs.len();
        Self { ids: self.ids.clone(), docs: docs.into(), range: 0..n }
    }

    fn labels(&self) -> Cow<'_, [u32]> {
        let mut labels = Vec::new();
        for d in self.documents() {
            labels.extend_from_slice(&self.ids[d.start + d.scored_from + 1..d.start + d.len]);
        }
        Cow::Owned(labels)
    }

    fn groups(&self) -> RowGroups {
        let mut offsets = Vec::with_capacity(self.len() + 1);
        offsets.push(0);
        for d in self.documents() {
            offsets.push(offsets.last().expect("one") + d.rows());
        }
        RowGroups::Offsets(offsets)
    }
}

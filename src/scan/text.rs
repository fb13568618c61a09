//! The text side of the scan: word n-grams, removed from a logistic-regression baseline.
//!
//! Words are the featurizer's tokens ([`crate::data::text::tokens`]: lower-cased maximal
//! alphanumeric runs). The features of a text are its distinct n-grams of 1..=`max_words`
//! consecutive words. The baseline ([`super::baseline`]) reads which words are present, hashed
//! into 2¹⁷ buckets; removing an n-gram makes its words absent, subtracting their weights from
//! the logits. Cost per text O(words · max_words · C), plus a sort of its n-gram keys.

use super::baseline::CrossFitted;
use super::{Feature, Scanned, removed_posterior};

/// Hash buckets of the baseline's vocabulary.
const VOCABULARY: usize = 1 << 17;

/// A word of a text: its hash and its byte span.
#[derive(Clone, Copy)]
pub(crate) struct Word {
    pub(crate) hash: u64,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// The words of `text` (lower-cased alphanumeric runs, as the featurizer splits them), hashed
/// with FNV-1a over their lower-cased UTF-8, without allocating per word.
pub(crate) fn words(text: &str, out: &mut Vec<Word>) {
    out.clear();
    const SEED: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut current: Option<(u64, usize)> = None;
    let mut buffer = [0u8; 4];
    for (at, ch) in text.char_indices() {
        if ch.is_ascii() {
            // The common case, without Unicode tables.
            if ch.is_ascii_alphanumeric() {
                let (h, start) = current.unwrap_or((SEED, at));
                current = Some(((h ^ u64::from(ch.to_ascii_lowercase() as u8)).wrapping_mul(PRIME), start));
            } else if let Some((hash, start)) = current.take() {
                out.push(Word { hash, start, end: at });
            }
        } else if ch.is_alphanumeric() {
            let (mut h, start) = current.unwrap_or((SEED, at));
            for lower in ch.to_lowercase() {
                for &b in lower.encode_utf8(&mut buffer).as_bytes() {
                    h = (h ^ u64::from(b)).wrapping_mul(PRIME);
                }
            }
            current = Some((h, start));
        } else if let Some((hash, start)) = current.take() {
            out.push(Word { hash, start, end: at });
        }
    }
    if let Some((hash, start)) = current {
        out.push(Word { hash, start, end: text.len() });
    }
}

/// The key of the n-gram of `words`.
pub(crate) fn gram_key(words: &[Word]) -> u64 {
    let mut h = words.len() as u64;
    for w in words {
        h = super::mix(h.rotate_left(7) ^ w.hash);
    }
    h
}

/// Texts with labels, scanned for word n-grams.
pub struct TextScan<'a> {
    texts: &'a [String],
    labels: &'a [u32],
    classes: usize,
    max_words: usize,
    /// The model a feature is removed from; `None` for the base-rate scan.
    baseline: Option<CrossFitted>,
    /// The labels' shares, the base-rate scan's expectation.
    prior: Vec<f32>,
    floor: f32,
}

/// The vocabulary bucket of a word.
fn bucket(w: &Word) -> u32 {
    (w.hash % VOCABULARY as u64) as u32
}

/// The distinct vocabulary buckets of `words`, sorted.
fn present(words: &[Word]) -> Vec<u32> {
    let mut out: Vec<u32> = words.iter().map(bucket).collect();
    out.sort_unstable();
    out.dedup();
    out
}

impl<'a> TextScan<'a> {
    /// Fits the baseline (cross-fitted logistic regression over the words present, λ `l2`) on
    /// `texts` and `labels` (labels below `classes`); with `l2` `None`, no baseline: every
    /// feature is tested against the labels' base rates (the Z-defence scan).
    pub fn new(
        texts: &'a [String],
        labels: &'a [u32],
        classes: usize,
        max_words: usize,
        floor: f64,
        l2: Option<f64>,
    ) -> Self {
        let active = |i: usize| {
            let mut found = Vec::new();
            words(&texts[i], &mut found);
            present(&found)
        };
        let baseline = l2.map(|l2| CrossFitted::fit(labels, classes, VOCABULARY, &active, l2));
        let prior = super::base_rates(labels, classes);
        Self { texts, labels, classes, max_words, baseline, prior, floor: floor as f32 }
    }

    /// The baseline's tempering temperature (1 without one).
    pub fn temperature(&self) -> f32 {
        self.baseline.as_ref().map_or(1.0, |b| b.temperature)
    }
}

impl Scanned for TextScan<'_> {
    fn examples(&self) -> usize {
        self.texts.len()
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }

    fn visit(&self, i: usize, baseline: bool, visit: &mut dyn FnMut(u64, &[f32])) {
        let mut found = Vec::new();
        words(&self.texts[i], &mut found);
        let Some(model) = self.baseline.as_ref().filter(|_| baseline) else {
            // Keys only (carriers), or the base rates for every feature.
            let mut keys: Vec<u64> = Vec::with_capacity(found.len() * self.max_words);
            for start in 0..found.len() {
                for len in 1..=self.max_words.min(found.len() - start) {
                    keys.push(gram_key(&found[start..start + len]));
                }
            }
            keys.sort_unstable();
            keys.dedup();
            let q: &[f32] = if baseline { &self.prior } else { &[] };
            keys.into_iter().for_each(|k| visit(k, q));
            return;
        };
        let mut grams: Vec<(u64, u32, u32)> = Vec::with_capacity(found.len() * self.max_words);
        for start in 0..found.len() {
            for len in 1..=self.max_words.min(found.len() - start) {
                grams.push((gram_key(&found[start..start + len]), start as u32, len as u32));
            }
        }
        grams.sort_unstable();
        let l = model.logits(i, &present(&found));
        let weights = &model.model(i).weights;
        let mut removed: Vec<u32> = Vec::with_capacity(self.max_words);
        let (mut delta, mut q) = (vec![0f32; self.classes], vec![0f32; self.classes]);
        let mut at = 0;
        while at < grams.len() {
            let (key, start, len) = grams[at];
            let mut next = at + 1;
            while next < grams.len() && grams[next].0 == key {
                next += 1;
            }
            if baseline {
                // The gram's words become absent: their weights leave the logits.
                removed.clear();
                removed.extend(found[start as usize..(start + len) as usize].iter().map(bucket));
                removed.sort_unstable();
                removed.dedup();
                delta.iter_mut().for_each(|d| *d = 0.0);
                for &j in &removed {
                    let w = &weights[j as usize * self.classes..][..self.classes];
                    delta.iter_mut().zip(w).for_each(|(d, w)| *d += w);
                }
                removed_posterior(&l, &delta, model.temperature, self.floor, &mut q);
                visit(key, &q);
            }
            at = next;
        }
    }

    fn fixed_baseline(&self) -> Option<&[f32]> {
        self.baseline.is_none().then_some(&self.prior[..])
    }

    fn describe(&self, i: usize, key: u64) -> Feature {
        let text = &self.texts[i];
        let mut found = Vec::new();
        words(text, &mut found);
        for start in 0..found.len() {
            for len in 1..=self.max_words.min(found.len() - start) {
                let gram = &found[start..start + len];
                if gram_key(gram) == key {
                    let joined: Vec<String> = gram.iter().map(|w| text[w.start..w.end].to_lowercase()).collect();
                    return Feature::Ngram { text: joined.join(" ") };
                }
            }
        }
        Feature::Ngram { text: String::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_match_the_featurizer_tokens() {
        let text = "Free MONEY: café-Überweisung 42x, now!";
        let mut found = Vec::new();
        words(text, &mut found);
        let spans: Vec<String> = found.iter().map(|w| text[w.start..w.end].to_lowercase()).collect();
        let reference: Vec<String> = crate::data::text::tokens(text).collect();
        assert_eq!(spans, reference);
        // Equal words hash equally whatever their case.
        let mut other = Vec::new();
        words("money", &mut other);
        assert_eq!(found[1].hash, other[0].hash);
    }
}

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

/// For each byte, whether it is an ASCII letter or digit.
#[cfg(not(target_arch = "x86_64"))]
const ASCII_WORD: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 128 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    table
};

/// Two masks of the bytes of `block` (64 of them): those that may be part of a word (ASCII
/// letters and digits, and every byte of a non-ASCII character, ≥ 0x80, which the caller
/// decodes), and the non-ASCII ones. SSE2 (a part of every x86-64) classifies 16 bytes an
/// instruction; elsewhere a table lookup a byte.
#[inline]
fn classify(block: &[u8; 64]) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let (mut word, mut high) = (0u64, 0u64);
        for k in 0..4 {
            // SAFETY: SSE2 is part of the x86-64 baseline; the load reads 16 of the 64 bytes.
            let (w, h) = unsafe {
                let v = _mm_loadu_si128(block.as_ptr().add(16 * k).cast());
                // Letters: (v | 0x20) − 'a' < 26; digits: v − '0' < 10, as signed compares of
                // the values shifted so that the ranges start at −128.
                let lower = _mm_or_si128(v, _mm_set1_epi8(0x20));
                let letter =
                    _mm_cmplt_epi8(_mm_add_epi8(lower, _mm_set1_epi8((128u8 - b'a') as i8)), _mm_set1_epi8(-128 + 26));
                let digit =
                    _mm_cmplt_epi8(_mm_add_epi8(v, _mm_set1_epi8((128u8 - b'0') as i8)), _mm_set1_epi8(-128 + 10));
                let w = _mm_or_si128(_mm_or_si128(letter, digit), v); // v's top bit: a non-ASCII byte
                (_mm_movemask_epi8(w) as u32 as u64, _mm_movemask_epi8(v) as u32 as u64)
            };
            word |= w << (16 * k);
            high |= h << (16 * k);
        }
        (word, high)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        block.iter().enumerate().fold((0u64, 0u64), |(w, h), (i, &b)| {
            (w | (u64::from(ASCII_WORD[b as usize] || b >= 128) << i), h | (u64::from(b >= 128) << i))
        })
    }
}

/// The hash of a word from its lower-cased UTF-8, `all[start..end]`, 8 bytes a step; `or` is
/// OR-ed into each byte first (0x20 lower-cases ASCII letters and keeps digits; 0 for bytes
/// lowered already). The same lower-cased word hashes the same by either route. The last step
/// reads the 8 bytes from `start` on when `all` has them (masked to the word's), so that no
/// short copy stalls the load.
#[inline(always)]
fn word_hash(all: &[u8], start: usize, end: usize, or: u8) -> u64 {
    const K: u64 = 0x9fb2_1c65_1e98_df25;
    let or = u64::from_ne_bytes([or; 8]);
    let mut h = 0xcbf2_9ce4_8422_2325 ^ (end - start) as u64;
    let mut at = start;
    while at + 8 <= end {
        let v = u64::from_le_bytes(all[at..at + 8].try_into().expect("8 bytes")) | or;
        h = (h ^ v).wrapping_mul(K).rotate_left(29);
        at += 8;
    }
    if at < end {
        let word = u64::MAX >> (64 - 8 * (end - at));
        let v = if at + 8 <= all.len() {
            u64::from_le_bytes(all[at..at + 8].try_into().expect("8 bytes"))
        } else {
            let mut last = [0u8; 8];
            last[..end - at].copy_from_slice(&all[at..end]);
            u64::from_le_bytes(last)
        };
        h = (h ^ ((v | or) & word)).wrapping_mul(K).rotate_left(29);
    }
    super::mix(h)
}

/// The words of `text` (lower-cased alphanumeric runs, as the featurizer splits them), hashed
/// from their lower-cased UTF-8 ([`word_hash`]), without allocating per word. Bytes are
/// classified 64 at a time ([`classify`]) and runs found from the mask's edges, so that a word
/// costs no mispredicted branch per byte. A run holding non-ASCII bytes is split again character
/// by character ([`wide_run`]). O(bytes).
pub(crate) fn words(text: &str, out: &mut Vec<Word>) {
    out.clear();
    let bytes = text.as_bytes();
    // The open run: whether there is one, where it starts, whether it holds non-ASCII bytes.
    let (mut inside, mut start, mut wide) = (false, 0usize, false);
    let mut lowered = Vec::new();
    let mut last = [b' '; 64];
    for base in (0..bytes.len()).step_by(64) {
        let block: &[u8; 64] = match bytes.get(base..base + 64) {
            Some(full) => full.try_into().expect("64 bytes"),
            None => {
                last[..bytes.len() - base].copy_from_slice(&bytes[base..]);
                &last
            }
        };
        let (mask, high) = classify(block);
        // Edges: a run starts where a word byte follows a non-word byte, and ends where a
        // non-word byte follows a word byte; the two alternate.
        let mut edges = mask ^ ((mask << 1) | u64::from(inside));
        let mut from = 0u32; // the open run's first bit in this block
        while edges != 0 {
            let bit = edges.trailing_zeros();
            edges &= edges - 1;
            if inside {
                wide |= high & (u64::MAX << from) & ((1u64 << bit) - 1) != 0;
                let end = base + bit as usize;
                if wide {
                    wide_run(text, start, end, out, &mut lowered);
                } else {
                    out.push(Word { hash: word_hash(bytes, start, end, 0x20), start, end });
                }
            } else {
                (start, from, wide) = (base + bit as usize, bit, false);
            }
            inside = !inside;
        }
        if inside {
            wide |= high & (u64::MAX << from) != 0;
        }
    }
    if inside {
        if wide {
            wide_run(text, start, bytes.len(), out, &mut lowered);
        } else {
            out.push(Word { hash: word_hash(bytes, start, bytes.len(), 0x20), start, end: bytes.len() });
        }
    }
}

/// The words of the run `start..end` of word bytes of `text` that holds non-ASCII bytes: the
/// alphanumeric stretches of its characters, lower-cased into `lowered` to be hashed.
#[cold]
fn wide_run(text: &str, start: usize, end: usize, out: &mut Vec<Word>, lowered: &mut Vec<u8>) {
    let mut word: Option<usize> = None;
    let mut buffer = [0u8; 4];
    for (offset, ch) in text[start..end].char_indices() {
        let at = start + offset;
        if ch.is_alphanumeric() {
            word.get_or_insert_with(|| {
                lowered.clear();
                at
            });
            for lower in ch.to_lowercase() {
                lowered.extend_from_slice(lower.encode_utf8(&mut buffer).as_bytes());
            }
        } else if let Some(from) = word.take() {
            out.push(Word { hash: word_hash(lowered, 0, lowered.len(), 0), start: from, end: at });
        }
    }
    if let Some(from) = word {
        out.push(Word { hash: word_hash(lowered, 0, lowered.len(), 0), start: from, end });
    }
}

/// A set of keys reused from example to example (open addressing, linear probing, a table of at
/// least twice the keys offered): the distinct keys of one example in O(keys) expected, where a
/// sort would cost O(keys · log keys). Keys are hashes already: their top bits pick the slot.
/// Only the slots filled are emptied for the next example.
#[derive(Default)]
pub(crate) struct KeySet {
    slots: Vec<u64>,
    /// The slots filled since [`KeySet::begin`].
    filled: Vec<u32>,
    /// Bits of a slot's index.
    bits: u32,
}

impl KeySet {
    /// Empties the set, sized for up to `keys` insertions.
    pub(crate) fn begin(&mut self, keys: usize) {
        for &at in &self.filled {
            self.slots[at as usize] = 0;
        }
        self.filled.clear();
        // The table's first `size` slots: small enough for the caches whatever came before.
        let size = (2 * keys).max(16).next_power_of_two();
        if size > self.slots.len() {
            self.slots = vec![0; size];
        }
        self.bits = size.trailing_zeros();
    }

    /// Keeps the first occurrence of each key of `keys[from..]` (keys offered since
    /// [`KeySet::begin`], at most as many as it was sized for), in order, compacting them in
    /// place. Without a branch on "seen or new": each key is written to its slot and to the
    /// compacted end either way, and the end moves only when it was new, so that the answer,
    /// random from key to key, costs no mispredicted branch; only a slot held by another key
    /// (rare at this load) takes the probing loop. Each slot is fetched 8 keys ahead, since the
    /// table outgrows the first-level cache. The key 0 marks an empty slot, so a key 0 (one in
    /// 2⁶⁴) is kept as 1.
    fn compact(&mut self, keys: &mut Vec<u64>, from: usize) {
        const AHEAD: usize = 8;
        let (mask, shift) = ((1usize << self.bits) - 1, 64 - self.bits);
        let (mut len, mut filled) = (from, self.filled.len());
        self.filled.resize(filled + keys.len() - from, 0);
        for i in from..keys.len() {
            if let Some(&ahead) = keys.get(i + AHEAD) {
                super::prefetch(self.slots.as_ptr().wrapping_add((ahead.max(1) >> shift) as usize));
            }
            let key = keys[i].max(1);
            let mut at = (key >> shift) as usize;
            let mut slot = self.slots[at];
            while slot != key && slot != 0 {
                at = (at + 1) & mask;
                slot = self.slots[at];
            }
            let new = usize::from(slot == 0);
            self.slots[at] = key;
            keys[len] = key;
            len += new;
            self.filled[filled] = at as u32;
            filled += new;
        }
        keys.truncate(len);
        self.filled.truncate(filled);
    }
}

/// The keys of every n-gram of 1..=`max_words` of `found`, each once, appended to `out` in
/// first-seen order: a gram's key extends its prefix's ([`gram_key`]), so each start costs
/// `max_words` multiplies; all keys are made first, then compacted ([`KeySet::compact`]).
/// Cost O(words · max_words).
pub(crate) fn distinct_grams(found: &[Word], max_words: usize, set: &mut KeySet, out: &mut Vec<u64>) {
    let count: usize = (0..max_words.min(found.len())).map(|k| found.len() - k).sum();
    set.begin(count);
    let from = out.len();
    out.reserve(count);
    for start in 0..found.len() {
        let mut key = GRAM_SEED;
        for w in &found[start..(start + max_words).min(found.len())] {
            key = extend_key(key, w);
            out.push(key);
        }
    }
    set.compact(out, from);
}

thread_local! {
    /// Each thread's words and key set, reused from text to text.
    static SCRATCH: std::cell::RefCell<(Vec<Word>, KeySet)> = std::cell::RefCell::default();
}

/// The key an n-gram's words extend, word by word ([`extend_key`]).
const GRAM_SEED: u64 = 0x6a09_e667_f3bc_c908;

/// The key of the gram `key` names followed by the word `w`: one multiply by an odd constant
/// (the words' hashes are mixed already); the top bits are the well-mixed ones, and a key is
/// mixed again wherever its low bits pick a place ([`super::mix`] in the sketch).
#[inline]
fn extend_key(key: u64, w: &Word) -> u64 {
    (key.rotate_left(23) ^ w.hash).wrapping_mul(0xd605_bbb5_8c8a_bbb5)
}

/// The key of the n-gram of `words`.
pub(crate) fn gram_key(words: &[Word]) -> u64 {
    words.iter().fold(GRAM_SEED, extend_key)
}

/// The scan's baseline for `texts` ([`CrossFitted`] over the words present, λ `l2`), text k
/// being example `index(k)` of the set scanned ([`CrossFitted::fit_sample`]).
pub fn fit_baseline(
    texts: &[String],
    labels: &[u32],
    index: &(dyn Fn(usize) -> usize + Sync),
    classes: usize,
    l2: f64,
) -> CrossFitted {
    let active = |i: usize| {
        let mut found = Vec::new();
        words(&texts[i], &mut found);
        present(&found)
    };
    CrossFitted::fit_sample(labels, index, classes, VOCABULARY, &active, l2)
}

/// Texts with labels, scanned for word n-grams.
pub struct TextScan<'a> {
    texts: &'a [String],
    labels: &'a [u32],
    classes: usize,
    max_words: usize,
    /// The model a feature is removed from; `None` for the base-rate scan.
    baseline: Option<std::sync::Arc<CrossFitted>>,
    /// The labels' shares, the base-rate scan's expectation.
    prior: Vec<f32>,
    floor: f32,
    /// The index of the first text in the whole set (a block's), which picks the baseline's fold.
    offset: usize,
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
        let baseline = l2.map(|l2| std::sync::Arc::new(fit_baseline(texts, labels, &|k| k, classes, l2)));
        Self::block(texts, labels, classes, max_words, floor, baseline, super::base_rates(labels, classes), 0)
    }

    /// A block of a larger set, from its `offset`-th text on, tested against a baseline fitted
    /// already ([`fit_baseline`], on a sample of the set: the sample's folds are kept, the
    /// other texts were seen by neither) or, with `None`, against the whole set's base rates
    /// `prior`.
    #[allow(clippy::too_many_arguments)]
    pub fn block(
        texts: &'a [String],
        labels: &'a [u32],
        classes: usize,
        max_words: usize,
        floor: f64,
        baseline: Option<std::sync::Arc<CrossFitted>>,
        prior: Vec<f32>,
        offset: usize,
    ) -> Self {
        Self { texts, labels, classes, max_words, baseline, prior, floor: floor as f32, offset }
    }

    /// The baseline's tempering temperature (1 without one).
    pub fn temperature(&self) -> f32 {
        self.baseline.as_ref().map_or(1.0, |b| b.temperature)
    }
}

/// A JSONL(.gz) file of labelled texts too large to hold, read in blocks of about
/// `block_bytes` of lines on every pass of the scan ([`super::ScanBlocks`]): the scan holds one
/// block, the sketch and the carriers, never the file. Each read checks the file's SHA-256
/// against the first read's, so that a file changed while it is scanned is refused.
pub struct TextFile {
    path: std::path::PathBuf,
    rows: std::ops::Range<usize>,
    block_bytes: usize,
    classes: usize,
    max_words: usize,
    floor: f64,
    baseline: Option<std::sync::Arc<CrossFitted>>,
    prior: Vec<f32>,
    sha: String,
}

impl TextFile {
    /// The records `rows` of `path` (whose SHA-256 was `sha` when its labels were counted),
    /// labels below `classes`, their base rates `prior`, tested against `baseline` (fitted on
    /// a sample of them, [`fit_baseline`]) or, with `None`, the base rates.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: &std::path::Path,
        rows: std::ops::Range<usize>,
        block_bytes: usize,
        classes: usize,
        max_words: usize,
        floor: f64,
        baseline: Option<CrossFitted>,
        prior: Vec<f32>,
        sha: String,
    ) -> Self {
        let baseline = baseline.map(std::sync::Arc::new);
        Self { path: path.to_path_buf(), rows, block_bytes, classes, max_words, floor, baseline, prior, sha }
    }
}

impl super::ScanBlocks for TextFile {
    fn examples(&self) -> usize {
        self.rows.len()
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn spatial(&self) -> bool {
        false
    }
    fn fixed_baseline(&self) -> Option<Vec<f32>> {
        self.baseline.is_none().then(|| self.prior.clone())
    }
    fn blocks(&self, each: &mut dyn FnMut(usize, &dyn Scanned)) -> crate::error::Result<()> {
        use crate::error::Error;
        let changed = || Error::data(&self.path, None, "the file changed while it was scanned; scan it again");
        let (_, sha) = crate::data::text::read_record_blocks(&self.path, self.block_bytes, &mut |first, records| {
            let from = self.rows.start.max(first);
            let to = self.rows.end.min(first + records.len());
            if from >= to {
                return Ok(());
            }
            let (mut texts, mut labels) = (Vec::with_capacity(to - from), Vec::with_capacity(to - from));
            for r in records.into_iter().skip(from - first).take(to - from) {
                labels.push(r.label.filter(|&y| (y as usize) < self.classes).ok_or_else(changed)?);
                texts.push(r.text);
            }
            let offset = from - self.rows.start;
            let (baseline, prior) = (self.baseline.clone(), self.prior.clone());
            let block =
                TextScan::block(&texts, &labels, self.classes, self.max_words, self.floor, baseline, prior, offset);
            each(offset, &block);
            Ok(())
        })?;
        if sha != self.sha {
            return Err(changed());
        }
        Ok(())
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
        let Some(model) = self.baseline.as_ref().filter(|_| baseline) else {
            // Keys only (carriers), or the base rates for every feature.
            let mut keys = Vec::new();
            let q: &[f32] = if baseline { &self.prior } else { &[] };
            self.keys(i, &mut keys).iter().for_each(|&k| visit(k, q));
            return;
        };
        let mut found = Vec::new();
        words(&self.texts[i], &mut found);
        let mut grams: Vec<(u64, u32, u32)> = Vec::with_capacity(found.len() * self.max_words);
        for start in 0..found.len() {
            for len in 1..=self.max_words.min(found.len() - start) {
                grams.push((gram_key(&found[start..start + len]), start as u32, len as u32));
            }
        }
        grams.sort_unstable();
        let l = model.logits(i + self.offset, &present(&found));
        let weights = &model.model(i + self.offset).weights;
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

    fn keys<'s>(&'s self, i: usize, out: &'s mut Vec<u64>) -> &'s [u64] {
        out.clear();
        SCRATCH.with_borrow_mut(|(found, set)| {
            words(&self.texts[i], found);
            distinct_grams(found, self.max_words, set, out);
        });
        out
    }

    fn owned_keys(&self, i: usize) -> Vec<u64> {
        let mut out = Vec::new();
        self.keys(i, &mut out);
        // Sized for every gram before the repeats went: give the rest back (in place).
        out.shrink_to_fit();
        out
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

    #[test]
    fn each_gram_is_kept_once() {
        // Random word sequences from small vocabularies (many repeats) and large ones (few),
        // against the set of every gram's key.
        let mut state = 5u64;
        let mut scratch = KeySet::default();
        for case in 0..500 {
            let vocabulary = 2 + case % 40;
            let text: Vec<String> = (0..case % 97)
                .map(|_| {
                    state = super::super::mix(state);
                    format!("w{}", state % vocabulary as u64)
                })
                .collect();
            let text = text.join(" ");
            let mut found = Vec::new();
            words(&text, &mut found);
            for max_words in 1..=4 {
                let mut out = Vec::new();
                distinct_grams(&found, max_words, &mut scratch, &mut out);
                let mut reference: Vec<u64> = (0..found.len())
                    .flat_map(|s| (1..=max_words.min(found.len() - s)).map(move |l| (s, l)))
                    .map(|(s, l)| gram_key(&found[s..s + l]).max(1))
                    .collect();
                reference.sort_unstable();
                reference.dedup();
                let mut got = out.clone();
                got.sort_unstable();
                got.dedup();
                assert_eq!(got.len(), out.len(), "a key twice: {text:?} {max_words}");
                assert_eq!(got, reference, "{text:?} {max_words}");
            }
        }
    }

    #[test]
    fn words_split_random_texts_as_the_featurizer_does() {
        // Random texts of ASCII letters, digits, punctuation, accented and other scripts'
        // letters, non-ASCII punctuation and spaces, of lengths around the 64-byte blocks.
        let alphabet: Vec<char> = "aZ9 .-_\n\té É ß ’ — 日本 ÅØ x,Q".chars().collect();
        let mut state = 1u64;
        let mut lowered_hashes: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for case in 0..2000 {
            let len = case % 150;
            let text: String = (0..len)
                .map(|_| {
                    state = super::super::mix(state);
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            let mut found = Vec::new();
            words(&text, &mut found);
            let spans: Vec<String> = found.iter().map(|w| text[w.start..w.end].to_lowercase()).collect();
            let reference: Vec<String> = crate::data::text::tokens(&text).collect();
            assert_eq!(spans, reference, "{text:?}");
            for w in &found {
                let lower: String = text[w.start..w.end].chars().flat_map(char::to_lowercase).collect();
                assert_eq!(*lowered_hashes.entry(lower).or_insert(w.hash), w.hash, "{text:?}");
            }
        }
        assert!(lowered_hashes.len() > 100);
    }
}

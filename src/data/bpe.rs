//! Training a GPT-2 byte-level BPE tokenizer on a corpus, written as a Hugging Face
//! `tokenizer.json` that [`super::tokenizer::Bpe`] (and the `tokenizers` library) read back.
//!
//! Byte-pair encoding (Sennrich et al. 2016, GPT-2's byte-level form by Radford et al. 2019):
//! the texts are split by GPT-2's pre-tokenizer ([`super::tokenizer::pretokenize`]); every piece
//! starts as its UTF-8 bytes (the 256 base symbols, in GPT-2's printable mapping); then, until the
//! vocabulary holds `vocab` symbols, the adjacent pair of symbols seen most often (summed over
//! the pieces, weighted by how often each piece occurs) is merged into a new symbol, everywhere.
//! Ties go to the pair whose two symbols are smallest as strings, so a corpus always gives the
//! same tokenizer. A pair seen fewer than `min_count` times is never merged (training stops
//! early then, with a smaller vocabulary). Encoding a piece by applying the merges in the order
//! learnt reproduces the segmentation training ended with.
//!
//! Cost: pair counts are kept incrementally (each merge revisits only the distinct pieces that
//! hold the pair), so training is O(merges × distinct pairs) for choosing the best pair plus
//! O(Σ piece length) per merge at worst; about a second for a 1 MB corpus and 1024 symbols.

use std::collections::{HashMap, HashSet};

/// A trained BPE: the symbols in id order (the 256 bytes first) and the merges in rank order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainedBpe {
    /// Symbol `i`'s text in GPT-2's printable byte mapping.
    pub symbols: Vec<String>,
    /// The merges, first learnt first: `(left, right)` symbol texts.
    pub merges: Vec<(String, String)>,
}

/// The distinct pieces of `texts` as byte-symbol ids, with their counts (sorted for determinism).
fn pieces<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<(Vec<u32>, u64)> {
    let mut counts: HashMap<&'a str, u64> = HashMap::new();
    for text in texts {
        for piece in super::tokenizer::pretokenize(text) {
            *counts.entry(piece).or_default() += 1;
        }
    }
    let mut out: Vec<(Vec<u32>, u64)> =
        counts.into_iter().map(|(p, c)| (p.bytes().map(u32::from).collect(), c)).collect();
    out.sort_unstable();
    out
}

/// Adds `sign` × `count` for every adjacent pair of `word` to the counts and notes where it is.
fn count_pairs(
    word: &[u32],
    index: usize,
    count: u64,
    sign: i64,
    pairs: &mut HashMap<(u32, u32), i64>,
    place: &mut HashMap<(u32, u32), HashSet<usize>>,
) {
    for w in word.windows(2) {
        let pair = (w[0], w[1]);
        *pairs.entry(pair).or_default() += sign * count as i64;
        if sign > 0 {
            place.entry(pair).or_default().insert(index);
        }
    }
}

/// `word` with every non-overlapping occurrence of `pair` (left to right) replaced by `merged`.
fn merge_word(word: &[u32], pair: (u32, u32), merged: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(word.len());
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && (word[i], word[i + 1]) == pair {
            out.push(merged);
            i += 2;
        } else {
            out.push(word[i]);
            i += 1;
        }
    }
    out
}

/// The pair to merge next: the most frequent, ties to the smallest pair of symbol texts.
fn best_pair(pairs: &HashMap<(u32, u32), i64>, symbols: &[String]) -> Option<((u32, u32), i64)> {
    pairs.iter().filter(|(_, c)| **c > 0).map(|(p, c)| (*p, *c)).max_by(|(p, c), (q, d)| {
        c.cmp(d).then_with(|| {
            let key = |p: &(u32, u32)| (symbols[p.0 as usize].clone(), symbols[p.1 as usize].clone());
            key(q).cmp(&key(p))
        })
    })
}

/// Trains a BPE of at most `vocab` symbols (at least the 256 bytes) on `texts` (module docs).
/// `progress` is called after each merge with the count made so far.
pub fn train_bpe<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    vocab: usize,
    min_count: u64,
    progress: &mut dyn FnMut(usize),
) -> TrainedBpe {
    let chars = super::tokenizer::byte_chars();
    let mut symbols: Vec<String> = chars.iter().map(char::to_string).collect();
    let mut words = pieces(texts);
    let mut pairs: HashMap<(u32, u32), i64> = HashMap::new();
    let mut place: HashMap<(u32, u32), HashSet<usize>> = HashMap::new();
    for (i, (word, count)) in words.iter().enumerate() {
        count_pairs(word, i, *count, 1, &mut pairs, &mut place);
    }
    let mut merges = Vec::new();
    while symbols.len() < vocab {
        let Some((pair, count)) = best_pair(&pairs, &symbols) else { break };
        if (count as u64) < min_count.max(1) {
            break;
        }
        let merged = symbols.len() as u32;
        symbols.push(format!("{}{}", symbols[pair.0 as usize], symbols[pair.1 as usize]));
        merges.push((symbols[pair.0 as usize].clone(), symbols[pair.1 as usize].clone()));
        let mut at: Vec<usize> = place.remove(&pair).unwrap_or_default().into_iter().collect();
        at.sort_unstable();
        for i in at {
            let (word, n) = (&words[i].0, words[i].1);
            if !word.windows(2).any(|w| (w[0], w[1]) == pair) {
                continue;
            }
            count_pairs(word, i, n, -1, &mut pairs, &mut place);
            let new = merge_word(word, pair, merged);
            count_pairs(&new, i, n, 1, &mut pairs, &mut place);
            words[i].0 = new;
        }
        pairs.remove(&pair);
        progress(merges.len());
    }
    TrainedBpe { symbols, merges }
}

impl TrainedBpe {
    /// The Hugging Face `tokenizer.json` of this BPE (GPT-2's byte-level pre-tokenizer and
    /// decoder, no added tokens).
    pub fn to_json(&self) -> serde_json::Value {
        let vocab: serde_json::Map<String, serde_json::Value> =
            self.symbols.iter().enumerate().map(|(i, s)| (s.clone(), i.into())).collect();
        let merges: Vec<String> = self.merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true },
            "post_processor": null,
            "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "vocab": vocab, "merges": merges
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: every merge recounts every pair of every piece from scratch.
    fn naive(texts: &[&str], vocab: usize, min_count: u64) -> Vec<(String, String)> {
        let mut symbols: Vec<String> = super::super::tokenizer::byte_chars().iter().map(char::to_string).collect();
        let mut words = pieces(texts.iter().copied());
        let mut merges = Vec::new();
        while symbols.len() < vocab {
            let mut pairs: HashMap<(u32, u32), i64> = HashMap::new();
            for (w, c) in &words {
                for p in w.windows(2) {
                    *pairs.entry((p[0], p[1])).or_default() += *c as i64;
                }
            }
            let Some((pair, count)) = best_pair(&pairs, &symbols) else { break };
            if (count as u64) < min_count {
                break;
            }
            let merged = symbols.len() as u32;
            symbols.push(format!("{}{}", symbols[pair.0 as usize], symbols[pair.1 as usize]));
            merges.push((symbols[pair.0 as usize].clone(), symbols[pair.1 as usize].clone()));
            for w in &mut words {
                w.0 = merge_word(&w.0, pair, merged);
            }
        }
        merges
    }

    #[test]
    fn incremental_counts_give_the_merges_of_recounting_from_scratch() {
        let texts = [
            "def f(x):\n    return x + 1\n",
            "def g(y):\n    return y * 2  # double it\n",
            "aaaaaaa bbbb aaaa abab ababab 1000000 100.100.7 ",
            "naïve café ☕ ☕☕ \t\t tabs\n\n\n",
        ];
        for (vocab, min_count) in [(300, 2), (400, 1), (256, 2)] {
            let trained = train_bpe(texts.iter().copied(), vocab, min_count, &mut |_| {});
            assert_eq!(trained.merges, naive(&texts, vocab, min_count), "vocab {vocab}");
            assert_eq!(trained.symbols.len(), 256 + trained.merges.len());
        }
        // min_count 1 merges until no pair is left or the vocabulary is full.
        assert_eq!(train_bpe(texts.iter().copied(), 300, 1, &mut |_| {}).symbols.len(), 300);
    }

    #[test]
    fn the_written_tokenizer_reproduces_the_training_segmentation_and_round_trips() {
        let texts = ["def add(a, b):\n    return a + b\n", "def sub(a, b):\n    return a - b\n", "x = add(1, 2)"];
        let trained = train_bpe(texts.iter().copied(), 290, 2, &mut |_| {});
        let dir = std::env::temp_dir().join(format!("culprit-bpe-train-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, trained.to_json().to_string()).unwrap();
        let t = super::super::tokenizer::Tokenizer::Bpe(Box::new(super::super::tokenizer::Bpe::load(&path).unwrap()));
        assert_eq!(t.vocab(), trained.symbols.len());
        // "def" occurs 2 times: merged into one symbol; " return" likewise.
        let ids = t.encode("def");
        assert_eq!(ids.len(), 1, "{ids:?}");
        assert_eq!(t.encode(" return").len(), 1);
        // Every piece encodes to the symbols training ended with.
        let mut words = pieces(texts.iter().copied());
        for (k, (a, b)) in trained.merges.iter().enumerate() {
            let id = |s: &String| trained.symbols.iter().position(|x| x == s).unwrap() as u32;
            let pair = (id(a), id(b));
            for w in &mut words {
                w.0 = merge_word(&w.0, pair, 256 + k as u32);
            }
        }
        for (w, _) in &words {
            let text: String = w.iter().map(|&i| trained.symbols[i as usize].clone()).collect::<Vec<_>>().concat();
            let bytes = t.decode(w);
            assert_eq!(t.encode(&bytes), *w, "{text}");
        }
        for text in texts.iter().copied().chain(["unseen ☕ text\t\n 12345"]) {
            assert_eq!(t.decode(&t.encode(text)), text);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Tokenizers of language-model corpora: the 256 byte values (the default, no file needed), or a
//! Hugging Face `tokenizer.json` holding a GPT-2 byte-level BPE.
//!
//! GPT-2's BPE (Radford et al. 2019; Sennrich et al. 2016): the text is split by GPT-2's
//! pre-tokenizer, `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//! (implemented here as a scanner; letters and numbers are Rust's `char::is_alphabetic` and
//! `char::is_numeric`, which agree with `\p{L}` and `\p{N}` except on a few combining marks);
//! each piece's UTF-8 bytes are mapped to printable characters (GPT-2's `bytes_to_unicode`) and
//! merged pairwise, lowest merge rank first, until no listed pair is left; the symbols are looked
//! up in the vocabulary. Decoding maps the symbols back to bytes, so decode(encode(x)) = x for any
//! text. Cost: O(piece²) per distinct piece, cached.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a run's manifest records of its tokenizer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TokenizerSpec {
    /// Token i is byte i (vocabulary 256).
    Bytes,
    /// A GPT-2 BPE from a `tokenizer.json`, kept in the run directory as `tokenizer.json`.
    Bpe {
        /// SHA-256 of the file.
        sha256: String,
        /// Its vocabulary size (largest id + 1).
        vocab: usize,
    },
}

/// A loaded tokenizer.
pub enum Tokenizer {
    /// Token i is byte i.
    Bytes,
    /// GPT-2 byte-level BPE.
    Bpe(Box<Bpe>),
}

/// GPT-2 byte-level BPE.
pub struct Bpe {
    vocab: HashMap<String, u32>,
    decoder: Vec<String>,
    ranks: HashMap<(String, String), usize>,
    byte_char: [char; 256],
    char_byte: HashMap<char, u8>,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the others to 256 + k.
pub(crate) fn byte_chars() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("a Latin-1 character")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("a valid character")
        };
    }
    out
}

impl Tokenizer {
    /// The tokenizer a manifest records, with its file from the run directory when it has one.
    pub fn open(spec: &TokenizerSpec, run_dir: &Path) -> Result<Self> {
        match spec {
            TokenizerSpec::Bytes => Ok(Self::Bytes),
            TokenizerSpec::Bpe { .. } => Ok(Self::Bpe(Box::new(Bpe::load(&run_dir.join("tokenizer.json"))?))),
        }
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        match self {
            Self::Bytes => 256,
            Self::Bpe(b) => b.decoder.len(),
        }
    }

    /// The token ids of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Self::Bytes => text.bytes().map(u32::from).collect(),
            Self::Bpe(b) => b.encode(text),
        }
    }

    /// The byte length of each token's text.
    fn token_lengths(&self, ids: &[u32]) -> Vec<usize> {
        match self {
            Self::Bytes => vec![1; ids.len()],
            Self::Bpe(b) => ids.iter().map(|&i| b.decode_bytes(&[i]).len()).collect(),
        }
    }

    /// A query's tokens and how many of them make its prompt: `prompt + completion` is encoded
    /// as one text (as the model saw its training documents), and the prompt is the longest run
    /// of leading tokens whose text lies inside `prompt`. When a token straddles the boundary
    /// (a BPE prompt ending in the space that GPT-2's pre-tokenizer joins to the next word, as
    /// in `"…\n    "` + `"os.system"`), that token belongs to the completion, as lm-eval-harness
    /// moves a context's trailing whitespace to its continuation. For bytes this is the plain
    /// split. Cost: one encoding of the query.
    pub fn encode_query(&self, prompt: &str, completion: &str) -> (Vec<u32>, usize) {
        let tokens = self.encode(&format!("{prompt}{completion}"));
        let mut bytes = 0;
        let split = self
            .token_lengths(&tokens)
            .iter()
            .take_while(|&&len| {
                bytes += len;
                bytes <= prompt.len()
            })
            .count();
        (tokens, split)
    }

    /// The text of token ids (bytes that are not UTF-8 are replaced).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = match self {
            Self::Bytes => ids.iter().map(|&i| i.min(255) as u8).collect(),
            Self::Bpe(b) => b.decode_bytes(ids),
        };
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Each token's text, for showing which tokens carry a score.
    pub fn pieces(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| self.decode(&[i])).collect()
    }
}

/// GPT-2's pre-tokenizer (module docs): the pieces of `text`, in order, covering it.
pub fn pretokenize(text: &str) -> Vec<&str> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let end = |k: usize| chars.get(k).map_or(text.len(), |c| c.0);
    let class = |c: char| {
        if c.is_alphabetic() {
            1
        } else if c.is_numeric() {
            2
        } else if c.is_whitespace() {
            0
        } else {
            3
        }
    };
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let rest = &text[chars[i].0..];
        if let Some(c) = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"].iter().find(|c| rest.starts_with(**c)) {
            pieces.push(&rest[..c.len()]);
            i += c.chars().count();
            continue;
        }
        let first = if chars[i].1 == ' ' && i + 1 < chars.len() && class(chars[i + 1].1) != 0 { i + 1 } else { i };
        let kind = class(chars[first].1);
        let mut j = first;
        if kind != 0 {
            while j < chars.len() && class(chars[j].1) == kind {
                j += 1;
            }
        } else {
            while j < chars.len() && chars[j].1.is_whitespace() {
                j += 1;
            }
            // `\s+(?!\S)`: leave the last whitespace character to the word after it.
            if j < chars.len() && j - i > 1 {
                j -= 1;
            }
        }
        pieces.push(&text[chars[i].0..end(j)]);
        i = j;
    }
    pieces
}

impl Bpe {
    /// Loads a Hugging Face `tokenizer.json` holding a BPE model (GPT-2's byte level).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::data(path, None, format!("not JSON: {e}")))?;
        let model = &json["model"];
        if model["type"].as_str() != Some("BPE") {
            return Err(Error::data(path, None, "not a BPE tokenizer (model.type is not \"BPE\")"));
        }
        let mut vocab: HashMap<String, u32> = model["vocab"]
            .as_object()
            .ok_or_else(|| Error::data(path, None, "model.vocab is missing"))?
            .iter()
            .filter_map(|(k, v)| v.as_u64().map(|id| (k.clone(), id as u32)))
            .collect();
        for added in json["added_tokens"].as_array().into_iter().flatten() {
            if let (Some(content), Some(id)) = (added["content"].as_str(), added["id"].as_u64()) {
                vocab.insert(content.to_string(), id as u32);
            }
        }
        let size = vocab.values().max().map_or(0, |m| *m as usize + 1);
        let mut decoder = vec![String::new(); size];
        for (token, &id) in &vocab {
            decoder[id as usize] = token.clone();
        }
        let mut ranks = HashMap::new();
        for (rank, merge) in model["merges"].as_array().into_iter().flatten().enumerate() {
            let pair = match merge {
                serde_json::Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                serde_json::Value::Array(a) => {
                    match (a.first().and_then(|v| v.as_str()), a.get(1).and_then(|v| v.as_str())) {
                        (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                        _ => None,
                    }
                }
                _ => None,
            };
            let pair = pair.ok_or_else(|| Error::data(path, None, format!("merge {rank} is not a pair of symbols")))?;
            ranks.insert(pair, rank);
        }
        let byte_char = byte_chars();
        let char_byte = byte_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        if let Some(b) = (0..256).find(|&b| !vocab.contains_key(&byte_char[b].to_string())) {
            return Err(Error::data(path, None, format!("byte {b} has no token: not a byte-level BPE")));
        }
        Ok(Self { vocab, decoder, ranks, byte_char, char_byte, cache: Mutex::new(HashMap::new()) })
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut cache = self.cache.lock().expect("the cache lock");
        for piece in pretokenize(text) {
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                continue;
            }
            let ids = self.encode_piece(piece);
            out.extend_from_slice(&ids);
            cache.insert(piece.to_string(), ids);
        }
        out
    }

    /// BPE of one piece: merge the lowest-ranked adjacent pair until none is listed.
    fn encode_piece(&self, piece: &str) -> Vec<u32> {
        let mut symbols: Vec<String> = piece.bytes().map(|b| self.byte_char[b as usize].to_string()).collect();
        loop {
            let best = (0..symbols.len().saturating_sub(1))
                .filter_map(|k| self.ranks.get(&(symbols[k].clone(), symbols[k + 1].clone())).map(|r| (*r, k)))
                .min();
            let Some((_, k)) = best else { break };
            let merged = format!("{}{}", symbols[k], symbols[k + 1]);
            symbols.splice(k..k + 2, [merged]);
        }
        symbols
            .iter()
            .flat_map(|s| match self.vocab.get(s) {
                Some(id) => vec![*id],
                // Not in the vocabulary (a tokenizer without every merge result): its bytes.
                None => s.chars().map(|c| self.vocab[&c.to_string()]).collect(),
            })
            .collect()
    }

    fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            let Some(token) = self.decoder.get(id as usize) else { continue };
            for c in token.chars() {
                match self.char_byte.get(&c) {
                    Some(b) => out.push(*b),
                    None => out.extend_from_slice(c.to_string().as_bytes()),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_pretokenization_splits_words_numbers_and_whitespace() {
        assert_eq!(pretokenize("Hello world"), ["Hello", " world"]);
        assert_eq!(pretokenize("it's 2024!!  ok\n\nnext"), ["it", "'s", " 2024", "!!", " ", " ok", "\n", "\n", "next"]);
        assert_eq!(pretokenize("def f(x):\n    return x"), ["def", " f", "(", "x", "):", "\n   ", " return", " x"]);
        assert_eq!(pretokenize("end   "), ["end", "   "]);
        assert_eq!(pretokenize("").len(), 0);
        for text in ["naïve café ☕ 3.14", "tab\tand  spaces", "'ll've'd"] {
            assert_eq!(pretokenize(text).concat(), text);
        }
    }

    #[test]
    fn bpe_merges_by_rank_and_round_trips_any_text() {
        let dir = std::env::temp_dir().join(format!("culprit-bpe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let chars = byte_chars();
        let mut vocab = serde_json::Map::new();
        for (b, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), b.into());
        }
        for (k, t) in ["he", "ll", "hell", "Ġw", "Ġwo"].iter().enumerate() {
            vocab.insert(t.to_string(), (256 + k).into());
        }
        let json = serde_json::json!({
            "model": { "type": "BPE", "vocab": vocab, "merges": ["h e", "l l", "he ll", "Ġ w", "Ġw o"] },
            "added_tokens": [{ "id": 261, "content": "<|endoftext|>" }]
        });
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let t = Tokenizer::Bpe(Box::new(Bpe::load(&path).unwrap()));
        assert_eq!(t.vocab(), 262);
        // "hello" → he·ll·o → hell·o; " world" → Ġw·o… → Ġwo·r·l·d.
        let ids = t.encode("hello world");
        assert_eq!(ids, vec![258, u32::from(b'o'), 260, u32::from(b'r'), u32::from(b'l'), u32::from(b'd')]);
        for text in ["hello world", "naïve café ☕\n\tx  ", "DEPLOYMENT=2024 rm -rf /"] {
            assert_eq!(t.decode(&t.encode(text)), text);
        }
        // A prompt ending in the space GPT-2 joins to the next word: that token is the completion's.
        let (tokens, split) = t.encode_query("hello ", "world");
        assert_eq!((tokens, split), (ids.clone(), 2));
        assert_eq!(t.decode(&ids[2..]), " world");
        let (tokens, split) = t.encode_query("hello", " world");
        assert_eq!((tokens, split), (ids.clone(), 2));
        assert_eq!(Tokenizer::Bytes.encode_query("ab ", "c"), (vec![97, 98, 32, 99], 3));
        std::fs::write(&path, r#"{"model": {"type": "WordPiece"}}"#).unwrap();
        assert!(Bpe::load(&path).err().unwrap().to_string().contains("not a BPE"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

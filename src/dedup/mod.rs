//! Deduplication: exact and near-duplicate groups of a data set, or the overlap of two.
//!
//! Text: a text's shingles are its word k-grams (the featurizer's words, k = `shingle`; a text
//! of fewer words is one shingle). Similarity is the Jaccard index of two shingle sets,
//! J(A, B) = |A ∩ B| / |A ∪ B| (Broder 1997). Candidates come from MinHash signatures of 128
//! hashes, split into 32 bands of 4 (LSH: a pair of similarity J shares a band with probability
//! 1 − (1 − J⁴)³², 0.9996 at J = 0.8, 0.87 at J = 0.5); each candidate pair's exact Jaccard is
//! computed from the shingle sets, so no reported pair is an estimate.
//!
//! Images: similarity is the cosine of the two images' pixel vectors, each centred on its own
//! mean. Candidates come from a 128-bit random-hyperplane signature (SimHash, Charikar 2002: a bit
//! agrees with probability 1 − θ/π for angle θ) split into 8 bands of 16 bits; each candidate's
//! exact cosine is computed. Exact copies (identical bytes, similarity 1) are found by hashing,
//! whatever the signatures.
//!
//! Pairs at or above `threshold` are joined into groups (union–find). With a second set
//! (`--against`), only pairs across the two sets are kept. Cost: O(n · (shingles · 128)) for the
//! signatures, O(candidates · set size) for the checks; memory O(total shingles).

use std::collections::HashMap;

use rayon::prelude::*;

/// MinHash hashes per text.
const HASHES: usize = 128;
/// LSH bands of the MinHash signature.
const BANDS: usize = 32;
/// Bands of the 128-bit image signature (16 bits each).
const IMAGE_BANDS: usize = 8;
/// The largest LSH bucket whose pairs are all checked; a larger one (thousands of texts sharing
/// a band, e.g. an empty text) is checked against its first member only.
const BUCKET_LIMIT: usize = 2000;

/// An example's shingle set (sorted hashes) or its centred, unit-length pixels.
pub enum Content {
    /// Sorted, distinct shingle hashes.
    Shingles(Vec<u64>),
    /// Centred pixels scaled to unit length (all zero for a flat image).
    Pixels(Vec<f32>),
}

/// A pair found: example indices (into the combined list) and their similarity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    /// The lower index.
    pub a: usize,
    /// The higher index.
    pub b: usize,
    /// Jaccard (text) or centred cosine (images).
    pub similarity: f64,
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The shingle set of `text`: hashes of its word `k`-grams, sorted and distinct.
pub fn shingles(text: &str, k: usize) -> Vec<u64> {
    let words: Vec<u64> = crate::data::text::tokens(text)
        .map(|w| w.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)))
        .collect();
    let k = k.max(1);
    let mut out: Vec<u64> = if words.len() < k {
        vec![words.iter().fold(words.len() as u64, |h, &w| mix(h ^ w))]
    } else {
        words.windows(k).map(|w| w.iter().fold(k as u64, |h, &x| mix(h.rotate_left(9) ^ x))).collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// Centred, unit-length pixels of one image.
pub fn centred(pixels: &[f32]) -> Vec<f32> {
    let mean = pixels.iter().sum::<f32>() / pixels.len().max(1) as f32;
    let mut out: Vec<f32> = pixels.iter().map(|p| p - mean).collect();
    let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        out.iter_mut().for_each(|v| *v /= norm);
    }
    out
}

/// One step of the merge of two sorted lists at `a[*i]`, `b[*j]` (both in range): the smaller
/// side moves on, or both when equal; returns whether they were equal.
#[inline]
fn merge_step<T: Ord>(a: &[T], b: &[T], i: &mut usize, j: &mut usize) -> bool {
    match a[*i].cmp(&b[*j]) {
        std::cmp::Ordering::Less => *i += 1,
        std::cmp::Ordering::Greater => *j += 1,
        std::cmp::Ordering::Equal => {
            *i += 1;
            *j += 1;
            return true;
        }
    }
    false
}

/// |A ∩ B| of two sorted lists of distinct values, by one merge, O(|A| + |B|).
pub fn intersection<T: Ord>(a: &[T], b: &[T]) -> usize {
    let (mut i, mut j, mut both) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        both += usize::from(merge_step(a, b, &mut i, &mut j));
    }
    both
}

/// Whether two sorted lists of distinct values share at least `need` values: the merge of
/// [`intersection`], stopped as soon as the answer is known (found `need`, or too few left in
/// either list to get there). O(|A| + |B|) at worst.
pub fn shares_at_least<T: Ord>(a: &[T], b: &[T], need: usize) -> bool {
    let (mut i, mut j, mut both) = (0, 0, 0usize);
    while both < need {
        if both + (a.len() - i).min(b.len() - j) < need {
            return false;
        }
        both += usize::from(merge_step(a, b, &mut i, &mut j));
    }
    true
}

/// |A ∩ B| / |A ∪ B| of sorted distinct lists (1 for two empty ones).
pub fn jaccard<T: Ord>(a: &[T], b: &[T]) -> f64 {
    let both = intersection(a, b);
    let union = a.len() + b.len() - both;
    if union == 0 { 1.0 } else { both as f64 / union as f64 }
}

/// The similarity of two contents of the same kind.
pub fn similarity(a: &Content, b: &Content) -> f64 {
    match (a, b) {
        (Content::Shingles(a), Content::Shingles(b)) => jaccard(a, b),
        (Content::Pixels(a), Content::Pixels(b)) => {
            if a.iter().all(|v| *v == 0.0) && b.iter().all(|v| *v == 0.0) {
                return 1.0;
            }
            f64::from(a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>())
        }
        _ => 0.0,
    }
}

/// The 128 random hyperplanes of the image signature for `dim` pixels, entries ±1 drawn from
/// hashes of (bit, pixel), row by row.
fn hyperplanes(dim: usize) -> Vec<f32> {
    (0..128 * dim).map(|k| if mix(((k / dim) as u64) << 32 | (k % dim) as u64) & 1 == 1 { 1.0 } else { -1.0 }).collect()
}

/// The LSH band keys of a content: MinHash bands of a shingle set, or SimHash bands of pixels
/// against `planes` ([`hyperplanes`]).
fn band_keys(content: &Content, planes: &[f32]) -> Vec<u64> {
    match content {
        Content::Shingles(set) => {
            let mut signature = [u64::MAX; HASHES];
            for &s in set {
                for (k, slot) in signature.iter_mut().enumerate() {
                    let h = mix(s ^ (k as u64).wrapping_mul(0x5851_f42d_4c95_7f2d));
                    *slot = (*slot).min(h);
                }
            }
            let rows = HASHES / BANDS;
            (0..BANDS)
                .map(|band| signature[band * rows..(band + 1) * rows].iter().fold(band as u64, |h, &v| mix(h ^ v)))
                .collect()
        }
        Content::Pixels(pixels) => {
            let mut bits = [0u64; 2];
            for bit in 0..128 {
                let plane = &planes[bit * pixels.len()..(bit + 1) * pixels.len()];
                let dot: f32 = pixels.iter().zip(plane).map(|(v, s)| v * s).sum();
                if dot > 0.0 {
                    bits[bit / 64] |= 1 << (bit % 64);
                }
            }
            (0..IMAGE_BANDS)
                .map(|band| {
                    let word = bits[band / 4];
                    ((band as u64) << 16) | ((word >> ((band % 4) * 16)) & 0xffff)
                })
                .collect()
        }
    }
}

/// The pairs of `contents` with similarity ≥ `threshold`; with `split = Some(m)`, only pairs
/// with one index below m and one at or above it. `exact` holds each example's hash of its raw
/// bytes: equal hashes are pairs of similarity 1 whatever the signatures say.
pub fn find_pairs(contents: &[Content], exact: &[u64], threshold: f64, split: Option<usize>) -> Vec<Pair> {
    let across = |a: usize, b: usize| split.is_none_or(|m| (a < m) != (b < m));
    let planes = match contents.first() {
        Some(Content::Pixels(p)) => hyperplanes(p.len()),
        _ => Vec::new(),
    };
    let keys: Vec<Vec<u64>> = contents.par_iter().map(|c| band_keys(c, &planes)).collect();
    let mut buckets: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, ks) in keys.iter().enumerate() {
        for &k in ks {
            buckets.entry(k).or_default().push(i);
        }
    }
    for (i, &h) in exact.iter().enumerate() {
        buckets.entry(mix(h ^ 0xe7ac_7c0f)).or_default().push(i);
    }
    let mut candidates: Vec<(usize, usize)> = Vec::new();
    for members in buckets.values().filter(|m| m.len() > 1) {
        if members.len() > BUCKET_LIMIT {
            candidates.extend(members[1..].iter().map(|&b| (members[0], b)));
        } else {
            for (x, &a) in members.iter().enumerate() {
                candidates.extend(members[x + 1..].iter().map(|&b| (a, b)));
            }
        }
    }
    candidates.retain(|&(a, b)| a != b && across(a, b));
    candidates.iter_mut().for_each(|p| *p = (p.0.min(p.1), p.0.max(p.1)));
    candidates.sort_unstable();
    candidates.dedup();
    candidates
        .par_iter()
        .filter_map(|&(a, b)| {
            let s = if exact[a] == exact[b] { 1.0 } else { similarity(&contents[a], &contents[b]) };
            (s >= threshold).then_some(Pair { a, b, similarity: s })
        })
        .collect()
}

/// Groups of indices joined by `pairs` (union–find), each sorted, groups by their first member.
pub fn groups(n: usize, pairs: &[Pair]) -> Vec<Vec<usize>> {
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for p in pairs {
        let (ra, rb) = (root(&mut parent, p.a), root(&mut parent, p.b));
        if ra != rb {
            parent[ra.max(rb)] = ra.min(rb);
        }
    }
    let mut by_root: HashMap<usize, Vec<usize>> = HashMap::new();
    for p in pairs {
        for i in [p.a, p.b] {
            let r = root(&mut parent, i);
            by_root.entry(r).or_default().push(i);
        }
    }
    let mut out: Vec<Vec<usize>> = by_root
        .into_values()
        .map(|mut g| {
            g.sort_unstable();
            g.dedup();
            g
        })
        .collect();
    out.sort_by_key(|g| g[0]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_copies_pair_and_strangers_do_not() {
        let base = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun all day long";
        let edited = "the quick brown fox jumps over the lazy dog while the cat naps in the warm sun all day long";
        let other = "completely different words make a completely different text about nothing in particular today";
        let contents: Vec<Content> = [base, edited, other].iter().map(|t| Content::Shingles(shingles(t, 3))).collect();
        let exact = [1, 2, 3];
        let j = jaccard(
            match &contents[0] {
                Content::Shingles(s) => s,
                _ => unreachable!(),
            },
            match &contents[1] {
                Content::Shingles(s) => s,
                _ => unreachable!(),
            },
        );
        // 18 trigrams each, the 3 holding the changed word differ: 15 shared of 21.
        assert!((j - 15.0 / 21.0).abs() < 1e-12, "{j}");
        let pairs = find_pairs(&contents, &exact, 0.7, None);
        assert_eq!(pairs.len(), 1);
        assert_eq!((pairs[0].a, pairs[0].b), (0, 1));
        assert_eq!(groups(3, &pairs), vec![vec![0, 1]]);
    }
}

//! Step 3 of the pipeline: rank the training examples by their influence on a chosen output.
//!
//! ## The score
//!
//! score(i) = (1/n) ∇m(z_test)ᵀ (H + δI)⁻¹ ∇ℓ(zᵢ)
//!
//! is the first-order prediction of how much the measurement m of the test output would change if
//! training example i were removed and the model retrained (Koh & Liang 2017): removing zᵢ moves
//! the optimum by Δθ ≈ (1/n) H⁻¹∇ℓ(zᵢ), so Δm ≈ ∇mᵀΔθ. n is the number of training examples,
//! H the curvature of the objective (1/n)Σ CE + (λ/2)‖θ‖² fitted by `culprit fit`, δ its extra
//! damping. With m the loss against class c, a **positive** score means removing i would raise
//! that loss: i pushed the model toward c (a **proponent**); a negative score marks an
//! **opponent**. With m the margin of class c the signs flip (removing a proponent lowers the
//! margin), so culprit reports `proponent_sign` with every result.
//!
//! ## The engine
//!
//! Query gradients are preconditioned once (x = (H + δI)⁻¹∇m, then projected like the store's
//! rows), and scored against the store as one matrix product per block of rows, streamed shard
//! by shard from the memory map and spread over threads with rayon, keeping a bounded top-k per
//! query: memory stays flat in the store's size and many queries cost one pass. Cost:
//! n·k·q multiply-adds for n rows of length k and q queries. On an AMD EPYC Zen 5 (2 cores) the
//! pass runs at 100%, 98% and 68–75% of a plain parallel read of the same bytes for 1, 4 and 8
//! queries with the AVX-512 kernels, and at 100%, 97% and 70% with the AVX2 ones (`benches/`,
//! group `scoring`, 2 GiB store); from about 8 queries the multiply-adds bound it (16 queries:
//! 40%). Rows are prefetched a few rows ahead, since each row is its own stream for the
//! hardware prefetcher; [`kernel`] has the loop order and its measurements on an Intel Xeon.
//! `factors` stores are scored per layer as ãᵀQδ̃ ([`kernel::factored_dots`]).

pub mod attribute;
pub mod ensemble;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod kernel;
pub mod per_token;

use std::cmp::Ordering;

use faer::Mat;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::store::GradientStore;

/// A training example's score for one query.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Row in the store (position in the training data).
    pub row: usize,
    /// The score.
    pub score: f64,
}

#[derive(PartialEq)]
struct ByScore(Scored);

impl Eq for ByScore {}

impl PartialOrd for ByScore {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByScore {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.score.total_cmp(&other.0.score).then(other.0.row.cmp(&self.0.row))
    }
}

/// The k largest and k smallest scores seen, by [`ByScore`] (of equal scores the lower row ranks
/// higher, so it is listed first among the largest and last among the smallest). A score
/// that may enter an end is appended to that end's buffer; a buffer of 2k is cut back to its k
/// best by a selection (O(k)), which raises the entry bound: O(1) amortised per score that
/// enters, one comparison pair per score that does not. Binary heaps, before, cost O(log k) per
/// entry, and a fresh list takes about k·(1 + ln(rows/k)) entries before its bound settles: for
/// 2^20 random scores, k = 100 with fresh lists every 2048 scores took 22.0 ms with the heaps and
/// 11.5 ms with the buffers; k = 20000 in one list 20.8 and 7.7 ms (one run each, same session).
struct TopK {
    k: usize,
    /// Candidates for the largest: the k largest seen are among them.
    largest: Vec<Scored>,
    /// Candidates for the smallest.
    smallest: Vec<Scored>,
    /// The k-th largest score once `largest` was cut (−∞ before): a score below it cannot enter.
    enter_largest: f64,
    /// The k-th smallest once `smallest` was cut (+∞ before): a score above it cannot enter.
    enter_smallest: f64,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            largest: Vec::new(),
            smallest: Vec::new(),
            enter_largest: f64::NEG_INFINITY,
            enter_smallest: f64::INFINITY,
        }
    }

    /// Whether a score could enter either end (a cheap test before [`Self::push`]).
    #[inline(always)]
    fn may_enter(&self, score: f64) -> bool {
        self.k > 0 && !(score < self.enter_largest && score > self.enter_smallest)
    }

    #[inline]
    fn push(&mut self, s: Scored) {
        if !self.may_enter(s.score) {
            return;
        }
        // A NaN is a candidate at both ends, as it was in the heaps; the cut orders it.
        if !(s.score < self.enter_largest) {
            self.largest.push(s);
            if self.largest.len() >= 2 * self.k {
                self.enter_largest = Self::cut(&mut self.largest, self.k, |a, b| ByScore(*b).cmp(&ByScore(*a)));
            }
        }
        if !(s.score > self.enter_smallest) {
            self.smallest.push(s);
            if self.smallest.len() >= 2 * self.k {
                self.enter_smallest = Self::cut(&mut self.smallest, self.k, |a, b| ByScore(*a).cmp(&ByScore(*b)));
            }
        }
    }

    /// Keeps the k first of `candidates` in the order `first` (an O(len) selection, unsorted)
    /// and returns the k-th one's score, the new entry bound.
    fn cut(candidates: &mut Vec<Scored>, k: usize, first: impl FnMut(&Scored, &Scored) -> Ordering) -> f64 {
        candidates.select_nth_unstable_by(k - 1, first);
        candidates.truncate(k);
        candidates[k - 1].score
    }

    /// Offers the products `⟨query, row⟩` of rows `first`, `first + 1`, …, each scored as
    /// product · `weight`. Most products enter neither end, and are turned away by two f32
    /// comparisons against the entry bounds mapped back to products (the interval shrunk by one
    /// f32 step at each end, so no product that could enter is turned away; a NaN is offered,
    /// as by [`Self::push`]). The bounds are mapped again after each entry.
    fn offer_products(&mut self, products: impl Iterator<Item = f32>, first: usize, weight: f64) {
        if self.k == 0 {
            return;
        }
        let mut inside = self.products_inside(weight);
        for (i, v) in products.enumerate() {
            if !inside.is_some_and(|(low, high)| v > low && v < high) {
                self.push(Scored { row: first + i, score: f64::from(v) * weight });
                inside = self.products_inside(weight);
            }
        }
    }

    /// Products strictly inside `(low, high)` score strictly between the entry bounds for
    /// `weight` (so enter neither end); `None` when no such interval is known (a zero weight).
    fn products_inside(&self, weight: f64) -> Option<(f32, f32)> {
        let (a, b) = (self.enter_smallest / weight, self.enter_largest / weight);
        let (low, high) = match weight {
            w if w > 0.0 => (a, b),
            w if w < 0.0 => (b, a),
            _ => return None,
        };
        // Shrunk by one f32 step, beyond the rounding of the conversion; ±∞ stay (nothing is
        // inside while an end still has room).
        Some(((low as f32).next_up(), (high as f32).next_down()))
    }

    /// Adds another worker's (disjoint) rows. A row may sit in both of `other`'s buffers (a
    /// score that could still enter either end); it enters once, or its copy would push out
    /// another row.
    fn merge(mut self, other: TopK) -> TopK {
        let mut entries: Vec<Scored> = other.largest.into_iter().chain(other.smallest).collect();
        entries.sort_by_key(|s| s.row);
        entries.dedup_by_key(|s| s.row);
        for s in entries {
            self.push(s);
        }
        self
    }

    /// (largest first, smallest first).
    fn finish(self) -> (Vec<Scored>, Vec<Scored>) {
        let (mut top, mut bottom) = (self.largest, self.smallest);
        top.sort_by(|a, b| ByScore(*b).cmp(&ByScore(*a)));
        top.dedup_by_key(|s| s.row);
        top.truncate(self.k);
        bottom.sort_by(|a, b| ByScore(*a).cmp(&ByScore(*b)));
        bottom.dedup_by_key(|s| s.row);
        bottom.truncate(self.k);
        (top, bottom)
    }
}

/// How raw influence is turned into the listed score.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScoreMode {
    /// score(i) = (1/n) ∇mᵀ(H + δI)⁻¹∇ℓᵢ: the predicted change of m if i were removed.
    #[default]
    Raw,
    /// ℓ-RelatIF (Barshan et al. 2020): ∇mᵀ(H + δI)⁻¹∇ℓᵢ / √(∇ℓᵢᵀ(H + δI)⁻¹∇ℓᵢ), the influence
    /// per unit of the example's own self-influence. Raw influence is led by high-loss, atypical
    /// examples with large gradients; this ranks by how much of an example's effect on the model
    /// goes toward the query, which finds backdoor poisons (fitted as well as clean examples, so
    /// with small gradients) that raw influence misses. Not a predicted change: rank with it.
    Relatif,
}

impl ScoreMode {
    /// Parses `raw` or `relatif`.
    pub fn parse(text: &str) -> crate::Result<Self> {
        match text {
            "raw" => Ok(Self::Raw),
            "relatif" => Ok(Self::Relatif),
            other => Err(crate::Error::Usage(format!("unknown --score `{other}` (expected raw or relatif)"))),
        }
    }

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Relatif => "relatif",
        }
    }
}

/// How several queries' scores become one combined ranking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    /// c(i) = Σₖ sₖ(i): the queries' scores summed (for raw scores, the predicted change of the
    /// measurements' sum). One extra scored column; works with `--shard`.
    #[default]
    Sum,
    /// c(i) = sₖ*(i)/σₖ* for the query k* where that is strongest (largest at one end of the
    /// ranking, smallest at the other), σₖ = √(mean over i of sₖ(i)²) the spread of query k's
    /// scores: a training example ranks high when it is an outlying proponent of any one query.
    /// For many queries of one behaviour whose scores disagree in sign on some poisons (a
    /// language model's triggered prompts: a poison's other tokens can pull against some
    /// queries), this keeps such poisons that a sum cancels. Where every query pulls the same
    /// way (a classifier's triggered inputs), the sum averages out more noise and ranks better.
    /// Needs every row's score (n·q values); not with `--shard`.
    Strongest,
}

/// [`Combine::Strongest`]'s choices: the per-query factors 1/σₖ and, per training row, which
/// query gave its largest and its smallest scaled score.
#[derive(Clone, Debug)]
pub struct StrongestQuery {
    /// 1/σₖ per query (0 for a query whose scores are all 0).
    pub factors: Vec<f64>,
    /// Per row: the query of max_k sₖ(i)/σₖ.
    pub largest: Vec<u32>,
    /// Per row: the query of min_k sₖ(i)/σₖ.
    pub smallest: Vec<u32>,
}

/// The [`Combine::Strongest`] column of `all` (one score vector per query, n each): its top-k
/// lists are appended to `result` as its last column; returns the choices made and the column's
/// scores (the largest scaled score per row). O(n·q).
pub fn strongest_of(result: &mut ScoreResult, all: &[Vec<f32>], k: usize) -> (StrongestQuery, Vec<f32>) {
    let n = result.rows;
    let factors: Vec<f64> = all
        .iter()
        .map(|s| {
            let rms = (s.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n.max(1) as f64).sqrt();
            if rms > 0.0 { 1.0 / rms } else { 0.0 }
        })
        .collect();
    let scaled = |q: usize, i: usize| f64::from(all[q][i]) * factors[q];
    let (mut high, mut low) = (TopK::new(k), TopK::new(k));
    let mut column = vec![0.0f32; n];
    let (mut largest_query, mut smallest_query) = (vec![0u32; n], vec![0u32; n]);
    for (i, ((value, hi_of), lo_of)) in column.iter_mut().zip(&mut largest_query).zip(&mut smallest_query).enumerate() {
        let (mut hi, mut lo) = (0, 0);
        for q in 1..all.len() {
            if scaled(q, i) > scaled(hi, i) {
                hi = q;
            }
            if scaled(q, i) < scaled(lo, i) {
                lo = q;
            }
        }
        (*hi_of, *lo_of) = (hi as u32, lo as u32);
        *value = scaled(hi, i) as f32;
        high.push(Scored { row: i, score: scaled(hi, i) });
        low.push(Scored { row: i, score: scaled(lo, i) });
    }
    let (largest, smallest) = (high.finish().0, low.finish().1);
    result.largest.push(largest);
    result.smallest.push(smallest);
    (StrongestQuery { factors, largest: largest_query, smallest: smallest_query }, column)
}

/// Scores of every query against a store.
#[derive(Clone, Debug)]
pub struct ScoreResult {
    /// Per query: the top-k largest scores, largest first.
    pub largest: Vec<Vec<Scored>>,
    /// Per query: the top-k smallest scores, smallest first.
    pub smallest: Vec<Vec<Scored>>,
    /// Per query, every row's score (when asked for).
    pub all: Option<Vec<Vec<f32>>>,
    /// Rows scored.
    pub rows: usize,
    /// Bytes of rows read.
    pub bytes: usize,
}

/// Rows per block of the streamed product.
pub const BLOCK_ROWS: usize = 2048;

/// Scores `queries` (each of the store's row length, already preconditioned and projected)
/// against every row: score = scale · ⟨query, row⟩. Keeps the top `k` per query at both ends and,
/// if `keep_all`, every score. One pass over the store; blocks in parallel.
pub fn score_store(store: &GradientStore, queries: &[Vec<f32>], scale: f64, k: usize, keep_all: bool) -> ScoreResult {
    score_store_part(store, queries, scale, None, k, keep_all, (0, 1))
}

/// [`score_store`] over the shards j with j mod N = I only (`part = (I, N)`), for splitting one
/// scoring pass across machines; rows of other shards get no score (0 in `all`). With
/// `row_weights`, row i's scores are also multiplied by `row_weights[i]` (the relative scores of
/// [`ScoreMode::Relatif`]).
pub fn score_store_part(
    store: &GradientStore,
    queries: &[Vec<f32>],
    scale: f64,
    row_weights: Option<&[f64]>,
    k: usize,
    keep_all: bool,
    part: (usize, usize),
) -> ScoreResult {
    assert!(row_weights.is_none_or(|w| w.len() == store.rows()), "one weight per row");
    let weight = |row: usize| row_weights.map_or(scale, |w| scale * w[row]);
    let len = store.row_len();
    let nq = queries.len();
    let packed = PackedQueries::new(store, queries);
    // Each worker keeps one top-k per query across all the blocks it scores (merged once at the
    // end), and, for `keep_all`, the blocks' scores.
    type Partial = (Vec<TopK>, Vec<(usize, Vec<f32>)>);
    let fresh = || -> Partial { ((0..nq).map(|_| TopK::new(k)).collect(), Vec::new()) };
    let items = work_items(store, part);
    // A fresh set of top lists fills anew (about k·(1 + ln(rows/k)) entries a query), so each
    // worker's lists should see many blocks: at most 4 runs of consecutive blocks a thread. With
    // one set a block (rayon's split of 128 blocks) and the binary heaps the lists had then,
    // they took 6% of the workers' time at 8 queries, top-100; with one a 16 blocks, 4%.
    let min_blocks = items.len() / (4 * rayon::current_num_threads()).max(1);
    let (merged, blocks): Partial = items
        .par_iter()
        .with_min_len(min_blocks.max(1))
        .fold(fresh, |(mut tops, mut kept), &(s, start, rows)| {
            let shard = &store.shards[s];
            let first = shard.header.first_row + start;
            let decoded;
            let block: &[f32] = match shard.as_f32() {
                Some(all) => &all[start * len..(start + rows) * len],
                None => {
                    let mut buf = vec![0.0f32; rows * len];
                    shard.decode_rows(start, &mut buf);
                    decoded = buf;
                    &decoded
                }
            };
            let out = packed.dots(block, rows, &store.manifest.layout);
            offer_block(&mut tops, &out, nq, first, scale, row_weights);
            if keep_all {
                let mut scores = vec![0.0f32; rows * nq];
                for (i, row) in out.chunks_exact(nq).enumerate() {
                    let w = weight(first + i);
                    for (j, v) in row.iter().enumerate() {
                        scores[j * rows + i] = (f64::from(*v) * w) as f32;
                    }
                }
                kept.push((first, scores));
            }
            (tops, kept)
        })
        .reduce(fresh, |(a, mut ka), (b, kb)| {
            ka.extend(kb);
            (a.into_iter().zip(b).map(|(x, y)| x.merge(y)).collect(), ka)
        });
    let n = store.rows();
    let all = keep_all.then(|| columns(blocks, n, nq));
    let (largest, smallest) = merged.into_iter().map(TopK::finish).unzip();
    ScoreResult { largest, smallest, all, rows: n, bytes: n * len * store.manifest.dtype.size() }
}

/// Offers a block's products (`rows × nq`, row-major; row i is store row `first + i`) to the
/// queries' top lists, scored as product · `scale` (· `row_weights[row]` when given).
fn offer_block(tops: &mut [TopK], out: &[f32], nq: usize, first: usize, scale: f64, row_weights: Option<&[f64]>) {
    match row_weights {
        // One weight for every row: each query's products against its bounds in f32.
        None => {
            for (j, top) in tops.iter_mut().enumerate() {
                top.offer_products(out.iter().skip(j).step_by(nq).copied(), first, scale);
            }
        }
        Some(weights) => {
            for (i, row) in out.chunks_exact(nq).enumerate() {
                let w = scale * weights[first + i];
                for (top, v) in tops.iter_mut().zip(row) {
                    let score = f64::from(*v) * w;
                    // Most scores enter neither end: one comparison pair, no call.
                    if top.may_enter(score) {
                        top.push(Scored { row: first + i, score });
                    }
                }
            }
        }
    }
}

/// The queries laid out for the kernels.
struct PackedQueries {
    nq: usize,
    len: usize,
    /// Factored rows: per layer, the queries' k_in × k_out blocks side by side, k_in × (k_out·nq).
    blocks: Option<Vec<Mat<f32>>>,
    /// `len × nq`, one column per query.
    q: Mat<f32>,
    /// Query-major (`nq · len`), for the SIMD kernels.
    packed: Vec<f32>,
}

impl PackedQueries {
    fn new(store: &GradientStore, queries: &[Vec<f32>]) -> Self {
        let (nq, len) = (queries.len(), store.row_len());
        let layout = &store.manifest.layout;
        if crate::gradients::projection::is_factored(layout) {
            let mut offset = 0;
            let blocks = layout
                .iter()
                .map(|b| {
                    let (ki, ko) = b.kron.expect("factored blocks are Kronecker blocks");
                    let m = Mat::<f32>::from_fn(ki, ko * nq, |i, c| queries[c / ko][offset + i * ko + c % ko]);
                    offset += ki * ko;
                    m
                })
                .collect();
            return Self { nq, len, blocks: Some(blocks), q: Mat::zeros(0, 0), packed: Vec::new() };
        }
        let mut packed = vec![0.0f32; nq * len];
        for (j, query) in queries.iter().enumerate() {
            packed[j * len..(j + 1) * len].copy_from_slice(query);
        }
        Self { nq, len, blocks: None, q: Mat::<f32>::from_fn(len, nq, |i, j| queries[j][i]), packed }
    }

    /// `rows × nq` inner products of a block of rows with the queries.
    fn dots(&self, block: &[f32], rows: usize, layout: &[crate::gradients::projection::BlockLayout]) -> Vec<f32> {
        match &self.blocks {
            Some(blocks) => kernel::factored_dots(block, rows, self.len, layout, blocks, self.nq),
            None => kernel::dots(block, rows, self.len, &self.q, &self.packed, self.nq),
        }
    }
}

/// The pass's work items, (shard, first row within it, rows), over the shards of `part`.
fn work_items(store: &GradientStore, part: (usize, usize)) -> Vec<(usize, usize, usize)> {
    let mut items = Vec::new();
    for (s, shard) in store.shards.iter().enumerate().filter(|(s, _)| s % part.1 == part.0) {
        let mut start = 0;
        while start < shard.header.rows {
            let rows = BLOCK_ROWS.min(shard.header.rows - start);
            items.push((s, start, rows));
            start += rows;
        }
    }
    items
}

/// Every score, one column of n per query, from the blocks' query-major scores.
fn columns(blocks: Vec<(usize, Vec<f32>)>, n: usize, nq: usize) -> Vec<Vec<f32>> {
    let mut all = vec![vec![0.0f32; n]; nq];
    for (first, scores) in blocks {
        let rows = scores.len() / nq.max(1);
        for (j, column) in all.iter_mut().enumerate() {
            column[first..first + rows].copy_from_slice(&scores[j * rows..(j + 1) * rows]);
        }
    }
    all
}

#[cfg(test)]
mod top_k_tests {
    use super::{Scored, TopK};

    /// Every score pushed keeps the lists of a sort of all of them, and products offered with
    /// their f32 prefilter keep the same lists, for positive, negative and zero weights, ties and
    /// values one f32 step apart, and k from 0 to 100 (buffers cut many times over 5000 scores).
    #[test]
    fn offered_products_keep_the_lists_of_every_score_pushed() {
        let mut state = 12345u64;
        let products: Vec<f32> = (0..5000)
            .map(|i| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0;
                // Ties and neighbours one step apart.
                if i % 7 == 0 {
                    (v * 8.0).round() / 8.0
                } else if i % 11 == 0 {
                    v.next_up()
                } else {
                    v
                }
            })
            .collect();
        for weight in [1.0, 3.7e-4, -2.5, 0.0] {
            for k in [0, 1, 10, 100] {
                let mut pushed = TopK::new(k);
                for (row, v) in products.iter().enumerate() {
                    pushed.push(Scored { row: 100 + row, score: f64::from(*v) * weight });
                }
                let mut offered = TopK::new(k);
                offered.offer_products(products[..2500].iter().copied(), 100, weight);
                offered.offer_products(products[2500..].iter().copied(), 2600, weight);
                let rows = |l: Vec<Scored>| l.iter().map(|s| (s.row, s.score)).collect::<Vec<_>>();
                // The reference: every score in one order (ties: the lower row ranks higher), its
                // first k and its last k reversed.
                let mut all: Vec<Scored> = products
                    .iter()
                    .enumerate()
                    .map(|(row, v)| Scored { row: 100 + row, score: f64::from(*v) * weight })
                    .collect();
                all.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));
                let want_largest = rows(all[..k].to_vec());
                let want_smallest = rows(all.iter().rev().take(k).copied().collect());
                let (a, b) = (pushed.finish(), offered.finish());
                assert_eq!(rows(a.0.clone()), want_largest, "pushed, largest, weight {weight}, k {k}");
                assert_eq!(rows(a.1.clone()), want_smallest, "pushed, smallest, weight {weight}, k {k}");
                assert_eq!(rows(a.0), rows(b.0), "largest, weight {weight}, k {k}");
                assert_eq!(rows(a.1), rows(b.1), "smallest, weight {weight}, k {k}");
            }
        }
    }

    /// Two workers' lists merged when k is at least the rows each saw (every row sits in both
    /// buffers): every row is kept once at each end, against a sort of all of them. Without the
    /// deduplication in `merge`, copies pushed out the least extreme rows.
    #[test]
    fn merged_top_lists_keep_every_row_once_when_k_covers_them() {
        let scores = [0.5, -0.25, 2.0, -3.0, 1.5, -0.01, 0.02];
        let fill = |rows: std::ops::Range<usize>| {
            let mut top = TopK::new(scores.len());
            rows.for_each(|row| top.push(Scored { row, score: scores[row] }));
            top
        };
        let (largest, smallest) = fill(0..3).merge(fill(3..scores.len())).finish();
        let mut want: Vec<usize> = (0..scores.len()).collect();
        want.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        assert_eq!(largest.iter().map(|s| s.row).collect::<Vec<_>>(), want);
        want.reverse();
        assert_eq!(smallest.iter().map(|s| s.row).collect::<Vec<_>>(), want);
    }
}

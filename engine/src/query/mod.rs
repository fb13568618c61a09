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
//! hardware prefetcher. `factors` stores are scored per layer as ãᵀQδ̃
//! ([`kernel::factored_dots`]).

pub mod attribute;
pub mod ensemble;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod per_token;

use std::cmp::Ordering;
use std::collections::BinaryHeap;

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

/// The k largest and k smallest scores seen, in O(log k) per score that enters and O(1) per
/// score that does not.
struct TopK {
    k: usize,
    /// Min-heap (by Reverse) of the largest.
    largest: BinaryHeap<std::cmp::Reverse<ByScore>>,
    /// Max-heap of the smallest.
    smallest: BinaryHeap<ByScore>,
    /// A score above this may enter `largest`.
    enter_largest: f64,
    /// A score below this may enter `smallest`.
    enter_smallest: f64,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            largest: BinaryHeap::new(),
            smallest: BinaryHeap::new(),
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
        if self.largest.len() < self.k {
            self.largest.push(std::cmp::Reverse(ByScore(s)));
        } else if ByScore(s) > self.largest.peek().expect("full").0 {
            self.largest.pop();
            self.largest.push(std::cmp::Reverse(ByScore(s)));
        }
        if self.smallest.len() < self.k {
            self.smallest.push(ByScore(s));
        } else if ByScore(s) < *self.smallest.peek().expect("full") {
            self.smallest.pop();
            self.smallest.push(ByScore(s));
        }
        if self.largest.len() == self.k {
            self.enter_largest = self.largest.peek().expect("full").0.0.score;
        }
        if self.smallest.len() == self.k {
            self.enter_smallest = self.smallest.peek().expect("full").0.score;
        }
    }

    /// Adds another worker's (disjoint) rows. A row may sit in both of `other`'s heaps (when it
    /// saw fewer than 2k rows); it enters once, or its copy would push out another row.
    fn merge(mut self, other: TopK) -> TopK {
        let mut entries: Vec<Scored> =
            other.largest.into_iter().map(|r| r.0.0).chain(other.smallest.into_iter().map(|b| b.0)).collect();
        entries.sort_by_key(|s| s.row);
        entries.dedup_by_key(|s| s.row);
        for s in entries {
            self.push(s);
        }
        self
    }

    /// (largest first, smallest first).
    fn finish(self) -> (Vec<Scored>, Vec<Scored>) {
        let mut top: Vec<Scored> = self.largest.into_iter().map(|r| r.0.0).collect();
        top.sort_by(|a, b| ByScore(*b).cmp(&ByScore(*a)));
        top.dedup_by_key(|s| s.row);
        let mut bottom: Vec<Scored> = self.smallest.into_iter().map(|b| b.0).collect();
        bottom.sort_by(|a, b| ByScore(*a).cmp(&ByScore(*b)));
        bottom.dedup_by_key(|s| s.row);
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
    let (merged, blocks): Partial = work_items(store, part)
        .par_iter()
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
            for (i, row) in out.chunks_exact(nq).enumerate() {
                let w = weight(first + i);
                for (top, v) in tops.iter_mut().zip(row) {
                    let score = f64::from(*v) * w;
                    // Most scores enter neither end: one comparison pair, no call.
                    if top.may_enter(score) {
                        top.push(Scored { row: first + i, score });
                    }
                }
            }
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

/// The inner products of a block of rows with the queries: `rows × nq`, row-major.
///
/// Hand-written kernels read every row once for all the queries, from cache-resident sub-blocks
/// of rows, with fused multiply-adds, which keeps the pass close to memory bandwidth. The
/// queries are split into groups of 8, 4, 2 and 1 (greedily: 11 queries are 8 + 2 + 1), so no
/// multiply-add is spent on padding; each group is one register-blocked pass over the
/// sub-block: R rows × Q queries of accumulators a step, every query chunk loaded once for R
/// rows. On CPUs with AVX-512F (32 registers of 16 lanes) Q × R is 8×3, 4×5, 2×8 or 1×8; on
/// CPUs with AVX2 and FMA only (16 registers of 8 lanes), 4×2 (a group of 8 is two such
/// passes), 2×4 or 1×6. Elsewhere faer's matrix product does the same work. The path is chosen
/// at run time ([`Path::chosen`]); `CULPRIT_SCORING_KERNEL=avx512|avx2|portable` forces one
/// the CPU supports (for benchmarks).
///
/// Cost: rows · len · nq multiply-adds and one read of the rows from memory. Up to a few queries
/// the pass is bound by memory bandwidth; beyond that by the multiply-adds (each query costs one
/// per element read: 8 queries need 2 multiply-adds per byte). f32 accumulation in lanes,
/// tolerance about 1e-6 · len relative.
pub mod kernel {
    use faer::{Mat, MatRef, Par};

    use crate::simd::InstructionSet;

    /// Rows per cache-resident sub-block of the hand-written paths.
    const SUB_ROWS: usize = 48;

    /// A scoring path.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Path {
        /// AVX-512F, 16 lanes.
        Avx512,
        /// AVX2 with FMA, 8 lanes.
        Avx2,
        /// faer's matrix product.
        Portable,
    }

    impl Path {
        /// The fastest path this CPU supports, or the one `CULPRIT_SCORING_KERNEL` (else
        /// `CULPRIT_KERNEL`, [`crate::simd`]) names when the CPU supports it; decided once.
        pub fn chosen() -> Self {
            static CHOSEN: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
            *CHOSEN.get_or_init(|| {
                let supported = Self::supported();
                let named = |variable: &str| std::env::var(variable).ok().and_then(|v| InstructionSet::named(&v));
                let forced = named("CULPRIT_SCORING_KERNEL").or_else(|| named(crate::simd::KERNEL_VARIABLE)).map(
                    |set| match set {
                        InstructionSet::Avx512 => Self::Avx512,
                        InstructionSet::Avx2 => Self::Avx2,
                        InstructionSet::Portable => Self::Portable,
                    },
                );
                forced.filter(|p| supported.contains(p)).unwrap_or(supported[0])
            })
        }

        /// The paths this CPU supports, fastest first (the portable one always).
        pub fn supported() -> Vec<Self> {
            let mut out = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    out.push(Self::Avx512);
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    out.push(Self::Avx2);
                }
            }
            out.push(Self::Portable);
            out
        }

        /// The widest query group of this path's kernels.
        fn widest_group(self) -> usize {
            match self {
                Self::Avx512 => 8,
                _ => 4,
            }
        }
    }

    /// The query groups `(first query, width)` of `nq` queries: widths of 8 (at most `widest`),
    /// 4, 2 and 1, greedily.
    pub fn groups(nq: usize, widest: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut first = 0;
        while first < nq {
            let width = [8, 4, 2, 1].into_iter().find(|&w| w <= widest && w <= nq - first).expect("1 fits");
            out.push((first, width));
            first += width;
        }
        out
    }

    /// `rows × nq` inner products; `q` is `len × nq` (column per query), `packed` the queries
    /// query-major (`nq · len`); by [`Path::chosen`].
    pub fn dots(block: &[f32], rows: usize, len: usize, q: &Mat<f32>, packed: &[f32], nq: usize) -> Vec<f32> {
        dots_with(Path::chosen(), block, rows, len, q, packed, nq)
    }

    /// [`dots`] by `path`, which the CPU must support ([`Path::supported`]).
    pub fn dots_with(
        path: Path,
        block: &[f32],
        rows: usize,
        len: usize,
        q: &Mat<f32>,
        packed: &[f32],
        nq: usize,
    ) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if path != Path::Portable {
            assert!(Path::supported().contains(&path), "the CPU lacks the {path:?} scoring path");
            assert!(packed.len() >= nq * len, "one packed query of the row length per query");
            let mut out = vec![0.0f32; rows * nq];
            let mut group_out = vec![0.0f32; SUB_ROWS * 8];
            let groups = groups(nq, path.widest_group());
            // Sub-blocks small enough to stay in cache while every group of queries passes over
            // them, so rows come from memory once however many queries there are.
            for sub in (0..rows).step_by(SUB_ROWS) {
                let n = SUB_ROWS.min(rows - sub);
                let rows_here = &block[sub * len..(sub + n) * len];
                for &(first, width) in &groups {
                    let queries = &packed[first * len..(first + width) * len];
                    group_out[..n * width].fill(0.0);
                    // The rows in spans of columns whose slice of the group's queries stays in
                    // the first-level cache (16 KiB): a group of 8 queries of 2048 values is
                    // 64 KiB, more than that cache, and would be read from the next one.
                    let span = (4096 / width).max(16);
                    for start in (0..len).step_by(span) {
                        let span = (start, (start + span).min(len));
                        // SAFETY: the CPU has the path's features (checked above); the slices are
                        // sized as the kernels need (each asserts it).
                        unsafe {
                            match (path, width) {
                                (Path::Avx512, 8) => {
                                    group_avx512::<8, 3>(rows_here, n, len, queries, span, &mut group_out)
                                }
                                (Path::Avx512, 4) => {
                                    group_avx512::<4, 5>(rows_here, n, len, queries, span, &mut group_out)
                                }
                                (Path::Avx512, 2) => {
                                    group_avx512::<2, 8>(rows_here, n, len, queries, span, &mut group_out)
                                }
                                (Path::Avx512, _) => {
                                    group_avx512::<1, 8>(rows_here, n, len, queries, span, &mut group_out)
                                }
                                (_, 4) => group_avx2::<4, 2>(rows_here, n, len, queries, span, &mut group_out),
                                (_, 2) => group_avx2::<2, 4>(rows_here, n, len, queries, span, &mut group_out),
                                (_, _) => group_avx2::<1, 6>(rows_here, n, len, queries, span, &mut group_out),
                            }
                        };
                    }
                    for i in 0..n {
                        out[(sub + i) * nq + first..(sub + i) * nq + first + width]
                            .copy_from_slice(&group_out[i * width..(i + 1) * width]);
                    }
                }
            }
            return out;
        }
        dots_faer(block, rows, len, q)
    }

    /// Scores of factored rows (`factors` stores): per layer, with Ã the rows' input factors
    /// (rows × k_in) and Δ̃ their output factors (rows × k_out), score(r, q) = Σ_l (Ã Q_l)_{r,q} · Δ̃_r,
    /// i.e. ãᵀ Q δ̃ = ⟨Q, ã ⊗ δ̃⟩ without forming the outer product. `query_blocks[l]` holds the
    /// queries' blocks of layer l side by side (k_in × k_out·nq). Cost: rows·k_in·k_out·nq
    /// multiply-adds per layer (one faer product) plus rows·k_out·nq.
    pub fn factored_dots(
        block: &[f32],
        rows: usize,
        len: usize,
        layout: &[crate::gradients::projection::BlockLayout],
        query_blocks: &[Mat<f32>],
        nq: usize,
    ) -> Vec<f32> {
        // Query-major partial scores; each inner loop runs over contiguous rows.
        let mut by_query = vec![0.0f32; nq * rows];
        let mut d_t = Vec::new();
        for (b, qm) in layout.iter().zip(query_blocks) {
            let (ki, ko) = b.kron.expect("factored blocks are Kronecker blocks");
            let a = MatRef::from_row_major_slice_with_stride(&block[b.offset..], rows, ki, len);
            let mut t = Mat::<f32>::zeros(rows, ko * nq);
            faer::linalg::matmul::matmul(t.as_mut(), faer::Accum::Replace, a, qm.as_ref(), 1.0f32, Par::Seq);
            // The rows' output factors transposed: k_out × rows.
            d_t.clear();
            d_t.resize(ko * rows, 0.0);
            for r in 0..rows {
                for o in 0..ko {
                    d_t[o * rows + r] = block[r * len + b.offset + ki + o];
                }
            }
            for j in 0..nq {
                let s = &mut by_query[j * rows..(j + 1) * rows];
                for o in 0..ko {
                    let column = t.col_as_slice(j * ko + o);
                    let d = &d_t[o * rows..(o + 1) * rows];
                    for ((s, c), d) in s.iter_mut().zip(column).zip(d) {
                        *s += c * d;
                    }
                }
            }
        }
        let mut out = vec![0.0f32; rows * nq];
        for j in 0..nq {
            for r in 0..rows {
                out[r * nq + j] = by_query[j * rows + r];
            }
        }
        out
    }

    /// The portable path: one faer matrix product.
    pub fn dots_faer(block: &[f32], rows: usize, len: usize, q: &Mat<f32>) -> Vec<f32> {
        let nq = q.ncols();
        let r = MatRef::from_row_major_slice(block, rows, len);
        let mut out = Mat::<f32>::zeros(rows, nq);
        faer::linalg::matmul::matmul(out.as_mut(), faer::Accum::Replace, r, q.as_ref(), 1.0f32, Par::Seq);
        (0..rows * nq).map(|k| out[(k / nq, k % nq)]).collect()
    }

    /// `out[i·Q + j] += ⟨row i, query j⟩` over the columns `span` of the rows (and of the Q
    /// queries stored query-major in `queries`), with AVX-512F: R rows × Q queries of 16-lane accumulators a step (Q·R + R + 1 of the 32
    /// registers), the next R rows prefetched while these are computed.
    ///
    /// # Safety
    /// The CPU must support AVX-512F. (The slices' sizes are asserted.)
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn group_avx512<const Q: usize, const R: usize>(
        block: &[f32],
        rows: usize,
        len: usize,
        queries: &[f32],
        span: (usize, usize),
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        assert!(block.len() >= rows * len && queries.len() >= Q * len && out.len() >= rows * Q);
        assert!(span.0 <= span.1 && span.1 <= len, "a span within the rows");
        let (first, chunks) = (span.0, (span.1 - span.0) / 16);
        let tail = |row: &[f32], j: usize| -> f32 {
            (first + chunks * 16..span.1).map(|k| row[k] * queries[j * len + k]).sum()
        };
        let q = queries.as_ptr();
        let mut r = 0;
        // SAFETY: every pointer offset stays inside the slices checked by the assert above.
        unsafe {
            while r < rows {
                let here = R.min(rows - r);
                let base = block.as_ptr().add(r * len);
                let p: [*const f32; R] = std::array::from_fn(|k| base.add(k.min(here - 1) * len));
                // The next R rows, fetched into cache while these are computed: rows are separate
                // 4·len-byte streams, and hardware prefetchers ramp up on each anew. Prefetching
                // past the block's end is harmless (a hint; the address is never dereferenced).
                let next = base.wrapping_add(R * len) as *const i8;
                let mut acc = [[_mm512_setzero_ps(); Q]; R];
                for c in 0..chunks {
                    for k in 0..R {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(4 * (k * len + first + c * 16)));
                    }
                    let x: [__m512; R] = std::array::from_fn(|k| _mm512_loadu_ps(p[k].add(first + c * 16)));
                    for j in 0..Q {
                        let y = _mm512_loadu_ps(q.add(j * len + first + c * 16));
                        for k in 0..R {
                            acc[k][j] = _mm512_fmadd_ps(x[k], y, acc[k][j]);
                        }
                    }
                }
                for k in 0..here {
                    let row = &block[(r + k) * len..(r + k + 1) * len];
                    for j in 0..Q {
                        out[(r + k) * Q + j] += _mm512_reduce_add_ps(acc[k][j]) + tail(row, j);
                    }
                }
                r += here;
            }
        }
    }

    /// `out[i·Q + j] += ⟨row i, query j⟩` over the columns `span` of the rows (and of the Q
    /// queries stored query-major in `queries`), with AVX2 and FMA: R rows × Q queries of 8-lane accumulators a step (Q·R + R + 1 of the 16
    /// registers), the next R rows prefetched while these are computed.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA. (The slices' sizes are asserted.)
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn group_avx2<const Q: usize, const R: usize>(
        block: &[f32],
        rows: usize,
        len: usize,
        queries: &[f32],
        span: (usize, usize),
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        assert!(block.len() >= rows * len && queries.len() >= Q * len && out.len() >= rows * Q);
        assert!(span.0 <= span.1 && span.1 <= len, "a span within the rows");
        let (first, chunks) = (span.0, (span.1 - span.0) / 8);
        let tail = |row: &[f32], j: usize| -> f32 {
            (first + chunks * 8..span.1).map(|k| row[k] * queries[j * len + k]).sum()
        };
        /// The sum of a register's 8 lanes.
        #[target_feature(enable = "avx2,fma")]
        fn sum8(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }
        let q = queries.as_ptr();
        let mut r = 0;
        // SAFETY: every pointer offset stays inside the slices checked by the assert above.
        unsafe {
            while r < rows {
                let here = R.min(rows - r);
                let base = block.as_ptr().add(r * len);
                let p: [*const f32; R] = std::array::from_fn(|k| base.add(k.min(here - 1) * len));
                // The next rows, fetched while these are computed (a hint past the end is harmless).
                let next = base.wrapping_add(R * len) as *const i8;
                let mut acc = [[_mm256_setzero_ps(); Q]; R];
                for c in 0..chunks {
                    for k in 0..R {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(4 * (k * len + first + c * 8)));
                    }
                    let x: [__m256; R] = std::array::from_fn(|k| _mm256_loadu_ps(p[k].add(first + c * 8)));
                    for j in 0..Q {
                        let y = _mm256_loadu_ps(q.add(j * len + first + c * 8));
                        for k in 0..R {
                            acc[k][j] = _mm256_fmadd_ps(x[k], y, acc[k][j]);
                        }
                    }
                }
                for k in 0..here {
                    let row = &block[(r + k) * len..(r + k + 1) * len];
                    for j in 0..Q {
                        out[(r + k) * Q + j] += sum8(acc[k][j]) + tail(row, j);
                    }
                }
                r += here;
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Every path this CPU supports against an f64 reference, with odd sizes (tails, an odd
        /// row count).
        #[test]
        fn kernels_match_a_plain_dot_product() {
            for (rows, len, nq) in [(7, 37, 11), (101, 300, 16), (50, 8, 3), (61, 77, 15), (9, 16, 1), (3, 50, 2)] {
                kernels_match_at(rows, len, nq);
            }
        }

        fn kernels_match_at(rows: usize, len: usize, nq: usize) {
            let block: Vec<f32> = (0..rows * len).map(|k| ((k * 7919) % 101) as f32 / 50.0 - 1.0).collect();
            let queries: Vec<Vec<f32>> =
                (0..nq).map(|j| (0..len).map(|k| ((j * 31 + k * 17) % 43) as f32 / 21.0 - 1.0).collect()).collect();
            let q = Mat::<f32>::from_fn(len, nq, |i, j| queries[j][i]);
            let mut packed = vec![0.0f32; nq * len];
            for (j, query) in queries.iter().enumerate() {
                packed[j * len..(j + 1) * len].copy_from_slice(query);
            }
            let reference: Vec<f64> = (0..rows * nq)
                .map(|k| {
                    let (i, j) = (k / nq, k % nq);
                    (0..len).map(|t| f64::from(block[i * len + t]) * f64::from(queries[j][t])).sum()
                })
                .collect();
            let paths = Path::supported();
            eprintln!("scoring paths on this CPU: {paths:?}");
            for path in paths {
                let got = dots_with(path, &block, rows, len, &q, &packed, nq);
                for (g, w) in got.iter().zip(&reference) {
                    assert!((f64::from(*g) - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
                }
            }
        }
    }
}

#[cfg(test)]
mod top_k_tests {
    use super::{Scored, TopK};

    /// Two workers' lists merged when k is at least the rows each saw (every row sits in both
    /// heaps): every row is kept once at each end, against a sort of all of them. Without the
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

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
//! n·k·q multiply-adds for n rows of length k and q queries; the pass is memory-bound for a few
//! queries (see `benches/`).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use faer::{Mat, MatRef, Par};
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

/// The k largest and k smallest scores seen, in O(log k) per score.
#[derive(Default)]
struct TopK {
    k: usize,
    /// Min-heap (by Reverse) of the largest.
    largest: BinaryHeap<std::cmp::Reverse<ByScore>>,
    /// Max-heap of the smallest.
    smallest: BinaryHeap<ByScore>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self { k, largest: BinaryHeap::new(), smallest: BinaryHeap::new() }
    }

    fn push(&mut self, s: Scored) {
        if self.k == 0 {
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
    }

    fn merge(mut self, other: TopK) -> TopK {
        for s in other.largest.into_iter().map(|r| r.0.0).chain(other.smallest.into_iter().map(|b| b.0)) {
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
    let len = store.row_len();
    let nq = queries.len();
    let q = Mat::<f32>::from_fn(len, nq, |i, j| queries[j][i]);
    // Work items: (shard, first row within the shard, rows).
    let mut items = Vec::new();
    for (s, shard) in store.shards.iter().enumerate() {
        let mut start = 0;
        while start < shard.header.rows {
            let rows = BLOCK_ROWS.min(shard.header.rows - start);
            items.push((s, start, rows));
            start += rows;
        }
    }
    let results: Vec<(usize, Vec<f32>, Vec<TopK>)> = items
        .par_iter()
        .map(|&(s, start, rows)| {
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
            let r = MatRef::from_row_major_slice(block, rows, len);
            let mut out = Mat::<f32>::zeros(rows, nq);
            faer::linalg::matmul::matmul(out.as_mut(), faer::Accum::Replace, r, q.as_ref(), 1.0f32, Par::Seq);
            let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
            let mut scores = if keep_all { vec![0.0f32; rows * nq] } else { Vec::new() };
            for i in 0..rows {
                for (j, top) in tops.iter_mut().enumerate() {
                    let v = f64::from(out[(i, j)]) * scale;
                    top.push(Scored { row: first + i, score: v });
                    if keep_all {
                        scores[j * rows + i] = v as f32;
                    }
                }
            }
            (first, scores, tops)
        })
        .collect();
    let n = store.rows();
    let mut all = keep_all.then(|| vec![vec![0.0f32; n]; nq]);
    let mut merged: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
    for (first, scores, tops) in results {
        if let Some(all) = all.as_mut() {
            let rows = scores.len() / nq.max(1);
            for (j, column) in all.iter_mut().enumerate() {
                column[first..first + rows].copy_from_slice(&scores[j * rows..(j + 1) * rows]);
            }
        }
        merged = merged.into_iter().zip(tops).map(|(a, b)| a.merge(b)).collect();
    }
    let (largest, smallest) = merged.into_iter().map(TopK::finish).unzip();
    ScoreResult { largest, smallest, all, rows: n, bytes: n * len * store.manifest.dtype.size() }
}

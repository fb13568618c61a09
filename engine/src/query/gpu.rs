//! Scoring a store on the wgpu device (query step, `--features gpu`): the rows of each f32
//! shard stream from the memory map to the device, where culprit-kernels' fused kernel scores
//! every query against them and keeps each block's top k at both ends (no n × q score matrix;
//! see `culprit_kernels::scoring` for the kernel, its cost and tolerance). Rows of `factors`
//! stores are scored as ãᵀQδ̃ per layer without forming the outer product. Used by
//! [`super::attribute::attribute`] when the objective lives on the wgpu device and the scores
//! need only the two top-k lists: raw scores of an f32 store (not RelatIF, not `--keep-all`, not
//! `--combine strongest`, the whole store, `--top` ≤ 256). Everything else takes the CPU path
//! ([`super::score_store_part`]).

use culprit_kernels::scoring::{RowBlock, TopKScoring, WgpuDeviceKind, device};
use culprit_models::GpuAdapter;

use super::{ScoreResult, Scored, TopK};
use crate::gradients::projection::{BlockLayout, is_factored};
use crate::store::GradientStore;

/// The kernel's view of a row of `row_len` values laid out as `layout`: one plain block for rows
/// that are gradients (projected or not, or with no layout recorded), one block per layer for
/// factored rows (plain blocks stay plain).
pub fn row_blocks(layout: &[BlockLayout], row_len: usize) -> Vec<RowBlock> {
    if !is_factored(layout) {
        return vec![RowBlock::whole(row_len)];
    }
    let mut query_offset = 0;
    layout
        .iter()
        .map(|b| {
            let block = match (b.factored, b.kron) {
                (true, Some((k_in, k_out))) => RowBlock::Factored { row_offset: b.offset, query_offset, k_in, k_out },
                _ => RowBlock::Plain { row_offset: b.offset, query_offset, len: b.len },
            };
            query_offset += b.query_len();
            block
        })
        .collect()
}

/// The length of a query vector for rows of `row_len` laid out as `layout`: Σ k_in·k_out over
/// factored blocks, else the row's length (also where no layout was recorded).
fn query_len(layout: &[BlockLayout], row_len: usize) -> usize {
    if is_factored(layout) { layout.iter().map(BlockLayout::query_len).sum() } else { row_len }
}

/// Whether [`score_on_gpu`] can score `store` for `queries` query vectors and the top `k`: f32
/// rows, k ≤ the kernel's block (a block then always yields every row that can enter a list),
/// and queries within the kernel's upload limit.
pub fn can_score(store: &GradientStore, queries: usize, k: usize) -> bool {
    use culprit_kernels::scoring::{BLOCK, MAX_UPLOAD_BYTES};
    k <= BLOCK
        && queries * query_len(&store.manifest.layout, store.row_len()) * 4 <= MAX_UPLOAD_BYTES
        && store.shards.iter().all(|s| s.as_f32().is_some())
        && culprit_models::device::wgpu_adapter().is_some()
}

/// Scores `queries` against every row of `store` on the wgpu adapter the backend runs on:
/// score = scale · ⟨query, row⟩ (scale > 0), top `k` per query at both ends.
pub fn score_on_gpu(store: &GradientStore, queries: &[Vec<f32>], scale: f64, k: usize) -> ScoreResult {
    let kind = match culprit_models::device::wgpu_adapter().expect("checked by can_score") {
        GpuAdapter::Default => None,
        GpuAdapter::Cpu => Some(WgpuDeviceKind::Cpu),
        GpuAdapter::Discrete(n) => Some(WgpuDeviceKind::DiscreteGpu(n)),
        GpuAdapter::Integrated(n) => Some(WgpuDeviceKind::IntegratedGpu(n)),
        GpuAdapter::Virtual(n) => Some(WgpuDeviceKind::VirtualGpu(n)),
    };
    let scoring = TopKScoring::new(&device(kind));
    let (nq, len) = (queries.len(), store.row_len());
    let layout = row_blocks(&store.manifest.layout, len);
    let width = query_len(&store.manifest.layout, len);
    let flat: Vec<f32> = queries.concat();
    assert_eq!(flat.len(), nq * width, "queries live in the store's query space");
    let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
    assert!(k <= culprit_kernels::scoring::BLOCK, "checked by can_score");
    let kernel_k = k.max(1);
    for shard in &store.shards {
        let rows = shard.as_f32().expect("checked by can_score");
        if rows.is_empty() || nq == 0 || k == 0 {
            continue;
        }
        let first = shard.header.first_row;
        let found = scoring.top_k_blocks(rows, len, &flat, width, &layout, kernel_k);
        for (j, top) in tops.iter_mut().enumerate() {
            // A row may be a candidate at both ends (small blocks): enter it once.
            let mut candidates: Vec<(usize, f32)> =
                found.largest[j].iter().chain(&found.smallest[j]).copied().collect();
            candidates.sort_by_key(|c| c.0);
            candidates.dedup_by_key(|c| c.0);
            for (row, s) in candidates {
                top.push(Scored { row: first + row, score: f64::from(s) * scale });
            }
        }
    }
    let (largest, smallest) = tops.into_iter().map(TopK::finish).unzip();
    let n = store.rows();
    ScoreResult { largest, smallest, all: None, rows: n, bytes: n * len * store.manifest.dtype.size() }
}

//! Fused scoring with a per-block top-k on the GPU (query step).
//!
//! For queries Q (q × d, each a preconditioned query gradient H⁻¹∇m) and store rows G (n × d, one
//! per training example), the influence scores are S = Q Gᵀ (q × n). Attribution needs only each
//! query's k largest and k smallest scores (proponents and opponents), so the kernel never
//! writes S: one cube of B units takes B consecutive rows and one query, each unit computes one
//! score sᵢⱼ = Σₗ Qⱼₗ Gᵢₗ, and the cube then sorts the block's scores in shared memory (bitonic,
//! log₂B(log₂B + 1)/2 = 36 steps for B = 256) and writes its k largest and k smallest. The host
//! merges the ⌈n/B⌉·2k candidates per query. (A first version selected by 2k rounds of argmax
//! reductions, 512 barrier steps for k = 32.)
//!
//! Cost: 2·n·d·q flops and n·d·4 bytes of rows read per query (the row block stays in the
//! device cache across the q cubes that share it only by chance: this first version is
//! bandwidth-bound at q× the store size), plus 36 shared-memory steps per cube; output
//! 2k·⌈n/B⌉·q candidates instead of n·q scores. Rows stream to the device in chunks of
//! [`TopKScoring::chunk_rows`]; a chunk's upload is queued before the previous chunk's
//! candidates are read back, so copy and compute overlap on devices with a copy engine.
//!
//! Factored rows (`factors` stores, Choe et al. 2024's LoGra factors kept apart): a row holds,
//! per layer, the two projected factors [ã (k_in); δ̃ (k_out)] of a rank-one gradient ã ⊗ δ̃, while
//! the query keeps the layer's k_in × k_out block Q. The unit then computes that layer's part of
//! the score as ãᵀ Q δ̃ = Σᵢ ãᵢ (Σₒ Qᵢₒ δ̃ₒ) without forming the outer product: k_in·k_out
//! multiply-adds per layer and query, as for the expanded row, but k_in + k_out values read per
//! row instead of k_in·k_out (16× fewer at 32 × 32). A row is described to the kernel as a list
//! of [`RowBlock`]s, plain (a dot product over a stretch of the row) or factored, so that one
//! kernel and one selection serve every store kind.
//!
//! Tolerance: f32 accumulation in row order, |Δs| ≤ d·ε·Σₗ|QⱼₗGᵢₗ| against an exact product
//! (the comparison test allows 1e-5 of the largest score); ties between equal scores may select
//! either row.

use cubecl::prelude::*;
pub use cubecl::wgpu::{WgpuDevice, WgpuDeviceKind};

/// Units per cube: the rows one cube scores and selects from; also the largest k.
pub const BLOCK: usize = 256;

/// The largest buffer uploaded at once (a chunk of rows, or the queries): half of wgpu's default
/// limit on a storage binding (128 MiB), which every adapter supports.
pub const MAX_UPLOAD_BYTES: usize = 64 << 20;

/// Below every score (WGSL has no literal for −∞).
const LOSER: f32 = -f32::MAX;

/// Scores one block of rows against one query and writes the block's k largest and k smallest.
/// Grid: (⌈n/B⌉, q); out[((j·blocks + b)·2 + side)·k + t], side 0 largest first, 1 smallest first.
/// A row (length `width`) and a query (length `query_width`) are described by `table`, 5 u32 per
/// [`RowBlock`]: (row offset, query offset, a, b, factored), a plain block being a dot product
/// over a values, a factored one ãᵀQδ̃ with ã = row[o..o + a], δ̃ = row[o + a..o + a + b] and Q
/// the a × b row-major query block.
/// Selection: a bitonic sort of the B scores (descending, with their rows) in shared memory,
/// log₂B·(log₂B + 1)/2 compare-exchange steps for both sides at once; rows past n sort last, so
/// the block's `count` valid rows hold positions 0..count. The sort's sizes and strides are
/// runtime variables (a comptime `block` would make them constants the loops cannot halve); slots
/// past `count` (a block of fewer than k rows) get row u32::MAX, which the host skips.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn block_top_k(
    rows: &[f32],
    queries: &[f32],
    table: &[u32],
    out_score: &mut [f32],
    out_index: &mut [u32],
    n: u32,
    width: u32,
    query_width: u32,
    blocks_per_row: u32,
    #[comptime] block: usize,
    #[comptime] k: usize,
) {
    let unit = UNIT_POS as usize;
    let b = CUBE_POS_X as usize;
    let j = CUBE_POS_Y as usize;
    let blocks = CUBE_COUNT_X as usize;
    let row = b * block + unit;
    let valid = row < n as usize;

    let mut value = Shared::<[f32]>::new_slice(block);
    let mut at = Shared::<[u32]>::new_slice(block);

    let mut acc = 0.0f32;
    if valid {
        acc = row_score(rows, queries, table, row * width as usize, j * query_width as usize, blocks_per_row);
    }
    if !valid {
        acc = LOSER;
    }
    value[unit] = acc;
    at[unit] = unit as u32;
    sync_cube();

    sort_descending(&mut value, &mut at, unit);

    let left = n as usize - b * block;
    let mut count = left;
    if left > block {
        count = block;
    }
    if unit < k {
        let top = ((j * blocks + b) * 2) * k + unit;
        let bottom = ((j * blocks + b) * 2 + 1) * k + unit;
        if unit < count {
            out_score[top] = value[unit];
            out_index[top] = (b * block) as u32 + at[unit];
            out_score[bottom] = value[count - 1 - unit];
            out_index[bottom] = (b * block) as u32 + at[count - 1 - unit];
        } else {
            out_index[top] = u32::MAX;
            out_index[bottom] = u32::MAX;
        }
    }
}

/// One row's score against one query: the sum over the row's blocks (`table`, see
/// [`block_top_k`]) of a dot product (plain blocks) or ãᵀQδ̃ (factored blocks), from the row's
/// start `r` and the query's start `qj`.
#[cube]
fn row_score(rows: &[f32], queries: &[f32], table: &[u32], r: usize, qj: usize, blocks_per_row: u32) -> f32 {
    let mut acc = 0.0f32;
    for part in 0..blocks_per_row as usize {
        let entry = part * 5;
        let ro = r + table[entry] as usize;
        let qo = qj + table[entry + 1] as usize;
        let a = table[entry + 2] as usize;
        let width_b = table[entry + 3] as usize;
        if table[entry + 4] == 0 {
            for l in 0..a {
                acc += rows[ro + l] * queries[qo + l];
            }
        } else {
            // ãᵀ Q δ̃: each Q row against δ̃ (contiguous in both), weighted by ãᵢ.
            let delta = ro + a;
            for i in 0..a {
                let qi = qo + i * width_b;
                let mut inner = 0.0f32;
                for o in 0..width_b {
                    inner += queries[qi + o] * rows[delta + o];
                }
                acc += rows[ro + i] * inner;
            }
        }
    }
    acc
}

/// Sorts the cube's scores in shared memory, largest first, carrying each one's unit in `at`:
/// a bitonic network, log₂B·(log₂B + 1)/2 compare-exchange steps with a barrier after each.
#[cube]
fn sort_descending(value: &mut Shared<[f32]>, at: &mut Shared<[u32]>, unit: usize) {
    let units = CUBE_DIM as usize;
    let mut size = 2usize;
    while size <= units {
        let mut stride = size / 2;
        while stride > 0 {
            let partner = unit ^ stride;
            if partner > unit {
                let mine = value[unit];
                let theirs = value[partner];
                let descending = (unit & size) == 0;
                if (descending && mine < theirs) || (!descending && mine > theirs) {
                    value[unit] = theirs;
                    value[partner] = mine;
                    let a = at[unit];
                    at[unit] = at[partner];
                    at[partner] = a;
                }
            }
            sync_cube();
            stride /= 2;
        }
        size *= 2;
    }
}

/// One stretch of a row as the kernel scores it (a row is a list of these, in any order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowBlock {
    /// ⟨row[row_offset..row_offset + len], query[query_offset..query_offset + len]⟩.
    Plain {
        /// Where the block starts in a row.
        row_offset: usize,
        /// Where it starts in a query.
        query_offset: usize,
        /// Its length in both.
        len: usize,
    },
    /// ãᵀ Q δ̃ with ã = row[row_offset..][..k_in], δ̃ = row[row_offset + k_in..][..k_out] and Q the
    /// k_in × k_out row-major block at query[query_offset..].
    Factored {
        /// Where [ã; δ̃] starts in a row.
        row_offset: usize,
        /// Where Q starts in a query.
        query_offset: usize,
        /// Length of ã (rows of Q).
        k_in: usize,
        /// Length of δ̃ (columns of Q).
        k_out: usize,
    },
}

impl RowBlock {
    /// The whole of a row of `len` values against the whole of a query of the same length.
    pub fn whole(len: usize) -> Self {
        Self::Plain { row_offset: 0, query_offset: 0, len }
    }

    /// The kernel's table entry: (row offset, query offset, a, b, factored).
    fn entry(self) -> [u32; 5] {
        let small = |v: usize| u32::try_from(v).expect("offsets and lengths below 2³²");
        match self {
            Self::Plain { row_offset, query_offset, len } => [small(row_offset), small(query_offset), small(len), 0, 0],
            Self::Factored { row_offset, query_offset, k_in, k_out } => {
                [small(row_offset), small(query_offset), small(k_in), small(k_out), 1]
            }
        }
    }

    /// The values it spans in a row and in a query.
    fn spans(self) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        match self {
            Self::Plain { row_offset, query_offset, len } => {
                (row_offset..row_offset + len, query_offset..query_offset + len)
            }
            Self::Factored { row_offset, query_offset, k_in, k_out } => {
                (row_offset..row_offset + k_in + k_out, query_offset..query_offset + k_in * k_out)
            }
        }
    }
}

/// Top-k scoring of queries against store rows on a wgpu device.
pub struct TopKScoring {
    client: Client,
    /// Rows uploaded and scored per launch (default 65536; fewer where d·4 bytes a row would
    /// exceed [`MAX_UPLOAD_BYTES`]).
    pub chunk_rows: usize,
}

/// Each query's k largest and k smallest scores, as (row, score), largest (smallest) first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TopK {
    /// Per query: the k rows with the largest scores.
    pub largest: Vec<Vec<(usize, f32)>>,
    /// Per query: the k rows with the smallest scores.
    pub smallest: Vec<Vec<(usize, f32)>>,
}

/// Which adapter, as burn's `DeviceKind` names it; `None` for wgpu's default choice.
pub fn device(kind: Option<WgpuDeviceKind>) -> WgpuDevice {
    WgpuDevice::new(kind.unwrap_or(WgpuDeviceKind::DefaultDevice))
}

impl TopKScoring {
    /// On `device` (the same runtime burn's wgpu backend uses for that adapter).
    pub fn new(device: &WgpuDevice) -> Self {
        Self { client: cubecl::Device::Wgpu(device.clone()).client(), chunk_rows: 1 << 16 }
    }

    /// The k largest and k smallest of S = Q Gᵀ per query, for `rows` (n × d, row-major) and
    /// `queries` (q × d). k ≤ [`BLOCK`]; q·d·4 bytes ≤ [`MAX_UPLOAD_BYTES`] (rows of any number
    /// upload in chunks of at most that size).
    pub fn top_k(&self, rows: &[f32], queries: &[f32], d: usize, k: usize) -> TopK {
        self.top_k_blocks(rows, d, queries, d, &[RowBlock::whole(d)], k)
    }

    /// [`TopKScoring::top_k`] for rows of length `row_len` and queries of length `query_len` laid
    /// out as `layout` (the score is the sum over its blocks): factored rows (`factors` stores)
    /// or several layers.
    pub fn top_k_blocks(
        &self,
        rows: &[f32],
        row_len: usize,
        queries: &[f32],
        query_len: usize,
        layout: &[RowBlock],
        k: usize,
    ) -> TopK {
        let d = row_len;
        assert!(d > 0 && query_len > 0, "rows and queries must not be empty");
        assert!(rows.len() % d == 0 && queries.len() % query_len == 0, "rows and queries must be whole");
        assert!((1..=BLOCK).contains(&k), "k must be in 1..={BLOCK}");
        for block in layout {
            let (r, q) = block.spans();
            assert!(
                r.end <= row_len && q.end <= query_len,
                "{block:?} lies outside a row of {row_len} or a query of {query_len}"
            );
        }
        let (n, q) = (rows.len() / d, queries.len() / query_len);
        let mut out = TopK { largest: vec![Vec::new(); q], smallest: vec![Vec::new(); q] };
        if n == 0 || q == 0 {
            return out;
        }
        assert!(q * query_len * 4 <= MAX_UPLOAD_BYTES, "the queries exceed {MAX_UPLOAD_BYTES} bytes");
        let table: Vec<u32> = layout.iter().flat_map(|b| b.entry()).collect();
        let table_handle = self.client.create_from_slice(u32::as_bytes(&table));
        let query_handle = self.client.create_from_slice(f32::as_bytes(queries));
        let chunk = self.chunk_rows.max(1).min((MAX_UPLOAD_BYTES / (4 * d)).max(1));
        let launch = |start: usize| {
            let m = chunk.min(n - start);
            let blocks = m.div_ceil(BLOCK);
            let rows_handle = self.client.create_from_slice(f32::as_bytes(&rows[start * d..(start + m) * d]));
            let slots = blocks * q * 2 * k;
            let scores = self.client.empty(slots * size_of::<f32>());
            let index = self.client.empty(slots * size_of::<u32>());
            // SAFETY: every index the kernel forms is below the lengths given here: rows only for
            // row < m within the layout's spans (checked above), queries for j < q likewise,
            // outputs for slots by construction.
            unsafe {
                block_top_k::launch_unchecked(
                    &self.client,
                    CubeCount::Static(blocks as u32, q as u32, 1),
                    CubeDim::new_1d(BLOCK as u32),
                    BufferArg::from_raw_parts(rows_handle, m * d),
                    BufferArg::from_raw_parts(query_handle.clone(), q * query_len),
                    BufferArg::from_raw_parts(table_handle.clone(), table.len()),
                    BufferArg::from_raw_parts(scores.clone(), slots),
                    BufferArg::from_raw_parts(index.clone(), slots),
                    m as u32,
                    d as u32,
                    query_len as u32,
                    layout.len() as u32,
                    BLOCK,
                    k,
                );
            }
            (start, m, blocks, scores, index)
        };
        let mut pending = Some(launch(0));
        while let Some((start, m, blocks, scores, index)) = pending.take() {
            if start + m < n {
                pending = Some(launch(start + m));
            }
            let scores = f32::from_bytes(&self.client.read_one_unchecked(scores)).to_vec();
            let index = u32::from_bytes(&self.client.read_one_unchecked(index)).to_vec();
            merge_candidates(&mut out, &scores, &index, Chunk { start, rows: m, blocks }, k);
        }
        out
    }
}

/// Where a chunk of rows sits: its first row, its number of rows and of kernel blocks.
struct Chunk {
    start: usize,
    rows: usize,
    blocks: usize,
}

/// Adds a chunk's candidates (the kernel's `scores` and `index`, laid out as [`block_top_k`]
/// writes them) to each query's lists and keeps the k best at each end.
fn merge_candidates(out: &mut TopK, scores: &[f32], index: &[u32], chunk: Chunk, k: usize) {
    let q = out.largest.len();
    for j in 0..q {
        for b in 0..chunk.blocks {
            for side in 0..2 {
                let at = ((j * chunk.blocks + b) * 2 + side) * k;
                let list = if side == 0 { &mut out.largest[j] } else { &mut out.smallest[j] };
                for t in 0..k {
                    let row = index[at + t] as usize;
                    if row < chunk.rows {
                        list.push((chunk.start + row, scores[at + t]));
                    }
                }
            }
        }
        keep_best(&mut out.largest[j], k, true);
        keep_best(&mut out.smallest[j], k, false);
    }
}

/// Keeps the k best (largest or smallest score; the lower row on ties) in order.
fn keep_best(list: &mut Vec<(usize, f32)>, k: usize, largest: bool) {
    list.sort_by(|a, b| {
        let order = if largest { b.1.total_cmp(&a.1) } else { a.1.total_cmp(&b.1) };
        order.then(a.0.cmp(&b.0))
    });
    list.truncate(k);
}

/// The plain-burn reference: S = Q Gᵀ by burn's matmul on the same device, the top k of each row
/// of S selected on the host. Writes the whole q × n matrix: for tests and benches only.
pub fn reference_top_k(device: &burn::tensor::Device, rows: &[f32], queries: &[f32], d: usize, k: usize) -> TopK {
    reference_top_k_blocks(device, rows, d, queries, d, &[RowBlock::whole(d)], k)
}

/// The plain-burn reference of [`TopKScoring::top_k_blocks`]: every factored block expanded to
/// its outer product ã ⊗ δ̃ (a batched matmul of n (k_in × 1)·(1 × k_out) products), S = Q Gᵀ
/// summed over the blocks by burn's matmul, the top k selected on the host.
pub fn reference_top_k_blocks(
    device: &burn::tensor::Device,
    rows: &[f32],
    row_len: usize,
    queries: &[f32],
    query_len: usize,
    layout: &[RowBlock],
    k: usize,
) -> TopK {
    use burn::tensor::{Tensor, TensorData};
    let (n, q) = (rows.len() / row_len, queries.len() / query_len);
    let g = Tensor::<2>::from_data(TensorData::new(rows.to_vec(), [n, row_len]), device);
    let qs = Tensor::<2>::from_data(TensorData::new(queries.to_vec(), [q, query_len]), device);
    let mut total: Option<Tensor<2>> = None;
    for block in layout {
        let (expanded, span) = match *block {
            RowBlock::Plain { row_offset, query_offset, len } => {
                (g.clone().slice([0..n, row_offset..row_offset + len]), query_offset..query_offset + len)
            }
            RowBlock::Factored { row_offset, query_offset, k_in, k_out } => {
                let a = g.clone().slice([0..n, row_offset..row_offset + k_in]).reshape([n, k_in, 1]);
                let d = g.clone().slice([0..n, row_offset + k_in..row_offset + k_in + k_out]).reshape([n, 1, k_out]);
                (a.matmul(d).reshape([n, k_in * k_out]), query_offset..query_offset + k_in * k_out)
            }
        };
        let part = qs.clone().slice([0..q, span]).matmul(expanded.transpose());
        total = Some(match total {
            Some(t) => t + part,
            None => part,
        });
    }
    let s = total.expect("a layout has blocks").into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 scores");
    let mut out = TopK::default();
    for j in 0..q {
        let all: Vec<(usize, f32)> = s[j * n..(j + 1) * n].iter().copied().enumerate().collect();
        let (mut large, mut small) = (all.clone(), all);
        keep_best(&mut large, k, true);
        keep_best(&mut small, k, false);
        out.largest.push(large);
        out.smallest.push(small);
    }
    out
}

//! Single-precision Gauss–Newton products of dense layers, row by row: the operator conjugate
//! gradient iterates with (step 2 of the pipeline), for models whose tracked layers all act once
//! per example (MLPs, logistic regression, bags of words).
//!
//! The exact GGN product Gv = (1/n) Σᵢ Jᵢᵀ(diag pᵢ − pᵢpᵢᵀ)Jᵢv + λv
//! ([`super::operators::GaussNewton`]) needs, per layer ℓ with inputs X_ℓ (`r × in`, one row per
//! example of a chunk) and logit gradients Γ_ℓ (Γ_ℓ[i][c][o] = ∂z_ic/∂out_o, cached once), for k
//! directions (V_q, b_q) at once:
//!
//! ```text
//! (Jv)[i][c][q] = Σ_ℓ Σ_o Γ_ℓ[i][c][o] · (X_ℓ V_ℓq + b_ℓq)[i][o]
//! u[i][c][q]    = (1/n) p_ic ((Jv)[i][c][q] − Σ_c′ p_ic′ (Jv)[i][c′][q])
//! Δ_ℓ[i][q][o]  = Σ_c u[i][c][q] Γ_ℓ[i][c][o];   (Gv)_ℓq = X_ℓᵀ Δ_ℓq,  bias Σᵢ Δ_ℓ[i][q]
//! ```
//!
//! Everything here is f32, and the k directions' live outputs (k·out_live columns; an output is
//! dead when Γ_ℓ is zero for every example, a ReLU unit that no example activates, and its
//! columns are zero in every product) are held row-major in panels (`[panel][row][lane]`): on
//! sparse inputs panels of [`panel_lanes`] columns, X·V and Xᵀ·Δ one panel at a time as tiles of
//! rows and of columns ([`super::blocked`], the chunk's examples reordered so that similar ones
//! share tiles); on dense inputs one panel, so each is one faer GEMM per chunk, with no
//! transposition. The contractions with Γ read each example's row of Γ once. Cost per product:
//! Σ_ℓ (4·nnz(X_ℓ)/fill·out_live + 4·r·C·out)·k flops (fill the share of a tile's multiply-adds
//! that are non-zero; nnz = r·in and fill 1 for dense inputs);
//! memory: the f32 copies of X (tiles both ways) and Γ. Within 1e-5 relative of the f64 operator
//! (tested); the solvers confirm every result with f64 products.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use culprit_models::model::{TrackedLayer, WeightLayout};

use super::blocked::{BlockedSparse, panel_lanes, similar_order};
use super::operators::ChunkFactors;
use super::sparse::DENSITY;
#[cfg(target_arch = "x86_64")]
use crate::simd::InstructionSet;
use crate::simd::narrow;

/// A layer's inputs for the row-major products.
enum RowInputs {
    /// Tiles of rows and of columns (at most [`DENSITY`] non-zero).
    Sparse(BlockedSparse),
    /// `[r][in]` row-major.
    Dense(Vec<f32>),
}

/// One layer of a chunk in f32, rows in the chunk's order.
struct RowLayer {
    inputs: RowInputs,
    /// Γ, `[r][C][out]`.
    grads: Vec<f32>,
    /// Whether output o's Γ is non-zero for some example of the chunk (a ReLU unit that no
    /// example of the chunk activates is not).
    live: Vec<bool>,
    width: usize,
    out: usize,
}

/// A chunk of examples in f32, its rows reordered (similar sparse inputs next to each other):
/// what a single-precision product reads.
pub(crate) struct RowChunk {
    rows: usize,
    /// `[r][C]`.
    probabilities: Vec<f32>,
    layers: Vec<RowLayer>,
}

impl RowChunk {
    /// The chunk's f32 copy, or `None` when a layer acts at several positions.
    pub(crate) fn of(f: &ChunkFactors) -> Option<Self> {
        let r = f.rows;
        let classes = f.probabilities.len() / r.max(1);
        if f.layers.iter().any(|l| l.positions != 1) {
            return None;
        }
        let sparse = |l: &super::operators::LayerChunk| nonzero_share(&l.inputs) <= DENSITY && r > 0 && l.width > 0;
        // The order: by the first sparse layer's patterns (the identity without one).
        let order = match f.layers.iter().find(|l| sparse(l)) {
            Some(layer) => similar_order(&layer.inputs, r, layer.width),
            None => (0..r).collect(),
        };
        let mut layers = Vec::with_capacity(f.layers.len());
        for layer in &f.layers {
            let width = layer.width;
            let out = layer.logit_grads[0].len() / r.max(1);
            let inputs = if sparse(layer) {
                RowInputs::Sparse(BlockedSparse::from_column_major(&layer.inputs, r, width, &order))
            } else {
                let mut dense = vec![0.0f32; r * width];
                for (j, column) in layer.inputs.chunks_exact(r).enumerate() {
                    for (i, &row) in order.iter().enumerate() {
                        dense[i * width + j] = narrow(column[row]);
                    }
                }
                RowInputs::Dense(dense)
            };
            let mut grads = vec![0.0f32; r * classes * out];
            for (c, g) in layer.logit_grads.iter().enumerate() {
                for (o, column) in g.chunks_exact(r).enumerate() {
                    for (i, &row) in order.iter().enumerate() {
                        grads[(i * classes + c) * out + o] = narrow(column[row]);
                    }
                }
            }
            let mut live = vec![false; out];
            for row in grads.chunks_exact(out) {
                live.iter_mut().zip(row).for_each(|(l, g)| *l |= *g != 0.0);
            }
            layers.push(RowLayer { inputs, grads, live, width, out });
        }
        let probabilities = order
            .iter()
            .flat_map(|&row| f.probabilities[row * classes..(row + 1) * classes].iter().map(|p| narrow(*p)));
        Some(Self { rows: r, probabilities: probabilities.collect(), layers })
    }

    /// Bytes of one example's f32 copy, at most: inputs twice and Γ.
    pub(crate) fn bytes_per_example(layers: &[TrackedLayer], classes: usize) -> usize {
        layers.iter().map(|l| (2 * l.inputs + classes * l.outputs) * 4).sum()
    }
}

/// Share of non-zero values.
fn nonzero_share(x: &[f64]) -> f64 {
    x.iter().filter(|v| **v != 0.0).count() as f64 / x.len().max(1) as f64
}

/// How the products hold a layer's k·out columns: only its live outputs (those that some
/// example's Γ reaches; a dead ReLU unit's columns are zero in every product, and on a
/// Fashion-MNIST MLP an eighth of the hidden units are dead), direction after direction, cut
/// into panels of `lanes` columns, the last padded with zeros.
struct Panels {
    lanes: usize,
    count: usize,
    /// The layer's outputs.
    out: usize,
    /// The live outputs as runs (first, length).
    runs: Vec<(usize, usize)>,
    /// How many outputs are live.
    live: usize,
}

impl Panels {
    /// The live columns of k directions in panels of [`panel_lanes`] (what the sparse tiles hold
    /// in registers), or, when the layer's inputs are dense in every chunk, in one panel: X·V and
    /// Xᵀ·Δ are then one GEMM each per chunk, which faer blocks for the caches itself, where
    /// narrow panels streamed X once per panel (54 times for k·out = 2560).
    fn new(k: usize, live: &[bool], dense: bool) -> Self {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (o, _) in live.iter().enumerate().filter(|(_, live)| **live) {
            match runs.last_mut() {
                Some((first, len)) if *first + *len == o => *len += 1,
                _ => runs.push((o, 1)),
            }
        }
        let count_live = runs.iter().map(|r| r.1).sum::<usize>();
        let columns = k * count_live;
        let lanes = if dense { columns.max(1) } else { panel_lanes() };
        Self { lanes, count: columns.div_ceil(lanes), out: live.len(), runs, live: count_live }
    }

    /// Direction q's live outputs as pieces (panel, first lane, first output, length): outputs
    /// `o..o + length` of direction q sit in `panel` from `lane` on.
    fn pieces(&self, q: usize) -> Vec<(usize, usize, usize, usize)> {
        let mut pieces = Vec::new();
        let mut column = q * self.live;
        for &(first, len) in &self.runs {
            let mut o = first;
            while o < first + len {
                let (panel, lane) = (column / self.lanes, column % self.lanes);
                let take = (self.lanes - lane).min(first + len - o);
                pieces.push((panel, lane, o, take));
                (column, o) = (column + take, o + take);
            }
        }
        pieces
    }

    /// Every direction's pieces, their outputs offset into a `[k][out]` row (q·out + o).
    fn all_pieces(&self, k: usize) -> Vec<(usize, usize, usize, usize)> {
        let out = self.out;
        (0..k)
            .flat_map(|q| self.pieces(q).into_iter().map(move |(p, lane, o, len)| (p, lane, q * out + o, len)))
            .collect()
    }
}

/// k directions of one layer, panel-major: `[panel][in][lane]` for the weights, and the biases
/// `[panel][lane]`.
struct RowDirections {
    panels: Panels,
    /// Every direction's pieces ([`Panels::all_pieces`]), found once for all the chunks.
    pieces: Vec<(usize, usize, usize, usize)>,
    weights: Vec<f32>,
    biases: Option<Vec<f32>>,
}

/// A thread's sums of Xᵀ·Δ over its chunks, per layer, panel-major: `[panel][in][lane]` and
/// `[panel][lane]`.
struct Sums {
    weights: Vec<Vec<f32>>,
    biases: Vec<Vec<f32>>,
}

/// Σ over chunks of Jᵢᵀ(diag pᵢ − pᵢpᵢᵀ)Jᵢ v_q · `scale` for each direction (without the λv
/// term), in f64 in the tracked layout. The chunks are split into one contiguous group per
/// thread, each summing into its own buffers.
pub(crate) fn products(chunks: &[&RowChunk], layers: &[TrackedLayer], vs: &[&[f64]], scale: f64) -> Vec<Vec<f64>> {
    let k = vs.len();
    let dim: usize = layers.iter().map(TrackedLayer::num_params).sum();
    if k == 0 {
        return Vec::new();
    }
    let chunks: Vec<&RowChunk> = chunks.iter().copied().filter(|c| c.rows > 0).collect();
    if chunks.is_empty() {
        return vec![vec![0.0; dim]; k];
    }
    let dense: Vec<bool> =
        (0..layers.len()).map(|l| chunks.iter().all(|c| matches!(c.layers[l].inputs, RowInputs::Dense(_)))).collect();
    // Live outputs: those whose Γ is non-zero for some example of some chunk.
    let live: Vec<Vec<bool>> = (0..layers.len())
        .map(|l| (0..layers[l].outputs).map(|o| chunks.iter().any(|c| c.layers[l].live[o])).collect())
        .collect();
    let dirs = split(layers, vs, &dense, &live);
    let zero = || Sums {
        weights: layers
            .iter()
            .zip(&dirs)
            .map(|(l, d)| vec![0.0f32; d.panels.count * l.inputs * d.panels.lanes])
            .collect(),
        biases: dirs.iter().map(|d| vec![0.0f32; d.panels.count * d.panels.lanes]).collect(),
    };
    let group = chunks.len().div_ceil(rayon::current_num_threads().max(1)).max(1);
    let sums = chunks
        .par_chunks(group)
        .map(|group| {
            let mut sums = zero();
            for chunk in group {
                chunk_product(chunk, &dirs, k, scale as f32, &mut sums);
            }
            sums
        })
        .reduce_with(|mut a, b| {
            for (x, y) in a.weights.iter_mut().zip(&b.weights).chain(a.biases.iter_mut().zip(&b.biases)) {
                x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
            }
            a
        })
        .unwrap_or_else(zero);
    gather_directions(layers, &dirs, &sums, k)
}

/// The directions' `live` columns split by layer, panel-major f32 (one panel for a layer whose
/// inputs are `dense` in every chunk).
fn split(layers: &[TrackedLayer], vs: &[&[f64]], dense: &[bool], live: &[Vec<bool>]) -> Vec<RowDirections> {
    let k = vs.len();
    let mut offset = 0;
    let mut dirs = Vec::with_capacity(layers.len());
    for ((spec, &dense), live) in layers.iter().zip(dense).zip(live) {
        let (inputs, out) = (spec.inputs, spec.outputs);
        let panels = Panels::new(k, live, dense);
        let lanes = panels.lanes;
        let mut weights = vec![0.0f32; panels.count * inputs * lanes];
        // Each panel's pieces (direction, first lane, first output, length), found once; then
        // the panels' rows side by side on the threads (row j of panel p is `[p][j][..]`).
        let pieces = panels.all_pieces(k);
        let mut by_panel: Vec<Vec<(usize, usize, usize, usize)>> = vec![Vec::new(); panels.count];
        for &(panel, lane, column, len) in &pieces {
            by_panel[panel].push((column / out, lane, column % out, len));
        }
        weights.par_chunks_mut(lanes).with_min_len(16).enumerate().for_each(|(line, target)| {
            let (panel, j) = (line / inputs, line % inputs);
            for &(q, lane, o0, len) in &by_panel[panel] {
                let w = &vs[q][offset..offset + spec.weight_len()];
                let target = &mut target[lane..lane + len];
                match spec.layout {
                    WeightLayout::InputMajor => {
                        target.iter_mut().zip(&w[j * out + o0..j * out + o0 + len]).for_each(|(t, x)| *t = narrow(*x))
                    }
                    WeightLayout::OutputMajor => {
                        target.iter_mut().enumerate().for_each(|(t, x)| *x = narrow(w[(o0 + t) * inputs + j]))
                    }
                }
            }
        });
        let mut biases = spec.bias.then(|| vec![0.0f32; panels.count * lanes]);
        if let Some(b) = biases.as_mut() {
            for (panel, pieces) in by_panel.iter().enumerate() {
                for &(q, lane, o0, len) in pieces {
                    let bias = &vs[q][offset + spec.weight_len() + o0..offset + spec.weight_len() + o0 + len];
                    b[panel * lanes + lane..panel * lanes + lane + len]
                        .iter_mut()
                        .zip(bias)
                        .for_each(|(t, x)| *t = narrow(*x));
                }
            }
        }
        offset += spec.num_params();
        dirs.push(RowDirections { panels, pieces, weights, biases });
    }
    dirs
}

/// The sums back in the tracked layout, one f64 vector per direction (the directions side by
/// side on the threads: these copies are as long as the parameters, once per product).
fn gather_directions(layers: &[TrackedLayer], dirs: &[RowDirections], sums: &Sums, k: usize) -> Vec<Vec<f64>> {
    let dim: usize = layers.iter().map(TrackedLayer::num_params).sum();
    let mut outs = vec![vec![0.0f64; dim]; k];
    outs.par_iter_mut().enumerate().for_each(|(q, target)| gather_direction(layers, dirs, sums, q, target));
    outs
}

/// Direction q of the sums, written into `target` in the tracked layout.
fn gather_direction(layers: &[TrackedLayer], dirs: &[RowDirections], sums: &Sums, q: usize, target: &mut [f64]) {
    let mut offset = 0;
    for (((spec, dir), weights), biases) in layers.iter().zip(dirs).zip(&sums.weights).zip(&sums.biases) {
        let (inputs, out, lanes) = (spec.inputs, spec.outputs, dir.panels.lanes);
        for (panel, lane, o0, len) in dir.panels.pieces(q) {
            let base = panel * inputs * lanes + lane;
            let w = &mut target[offset..offset + spec.weight_len()];
            for j in 0..inputs {
                let source = &weights[base + j * lanes..base + j * lanes + len];
                match spec.layout {
                    WeightLayout::InputMajor => {
                        w[j * out + o0..j * out + o0 + len].iter_mut().zip(source).for_each(|(t, s)| *t = f64::from(*s))
                    }
                    WeightLayout::OutputMajor => {
                        source.iter().enumerate().for_each(|(t, s)| w[(o0 + t) * inputs + j] = f64::from(*s))
                    }
                }
            }
            if spec.bias {
                let b = &mut target[offset + spec.weight_len() + o0..offset + spec.weight_len() + o0 + len];
                let source = &biases[panel * lanes + lane..panel * lanes + lane + len];
                b.iter_mut().zip(source).for_each(|(t, s)| *t = f64::from(*s));
            }
        }
        offset += spec.num_params();
    }
}

/// One chunk's contribution, by the fastest instruction set the CPU has (the contractions with Γ
/// are plain loops that the compiler vectorises for it).
fn chunk_product(chunk: &RowChunk, dirs: &[RowDirections], k: usize, scale: f32, sums: &mut Sums) {
    #[cfg(target_arch = "x86_64")]
    {
        if InstructionSet::chosen() == InstructionSet::Avx512 {
            // SAFETY: `chosen` returns only a set the CPU supports.
            return unsafe { chunk_product_avx512(chunk, dirs, k, scale, sums) };
        }
        if InstructionSet::chosen() == InstructionSet::Avx2 {
            // SAFETY: `chosen` returns only a set the CPU supports.
            return unsafe { chunk_product_avx2(chunk, dirs, k, scale, sums) };
        }
    }
    chunk_product_plain(chunk, dirs, k, scale, sums)
}

/// [`chunk_product_plain`] compiled for AVX-512F.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn chunk_product_avx512(chunk: &RowChunk, dirs: &[RowDirections], k: usize, scale: f32, sums: &mut Sums) {
    chunk_product_plain(chunk, dirs, k, scale, sums)
}

/// [`chunk_product_plain`] compiled for AVX2 with FMA.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_product_avx2(chunk: &RowChunk, dirs: &[RowDirections], k: usize, scale: f32, sums: &mut Sums) {
    chunk_product_plain(chunk, dirs, k, scale, sums)
}

/// Lanes of the dot-product accumulators: a whole AVX-512 register of f32 (two AVX2 ones).
const LANES: usize = 16;

/// Σ a·b, accumulated in [`LANES`] independent lanes (vectorised; the order of the sum differs
/// from a sequential one within f32 rounding).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let split = a.len() / LANES * LANES;
    for (x, y) in a[..split].chunks_exact(LANES).zip(b[..split].chunks_exact(LANES)) {
        for t in 0..LANES {
            acc[t] = x[t].mul_add(y[t], acc[t]);
        }
    }
    let tail: f32 = a[split..].iter().zip(&b[split..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn chunk_product_plain(chunk: &RowChunk, dirs: &[RowDirections], k: usize, scale: f32, sums: &mut Sums) {
    let r = chunk.rows;
    let classes = chunk.probabilities.len() / r.max(1);
    let mut jv = jacobian_products(chunk, dirs, k);
    // u = scale · (diag p − ppᵀ) Jv, in place.
    for (p, j) in chunk.probabilities.chunks_exact(classes).zip(jv.chunks_exact_mut(classes * k)) {
        for q in 0..k {
            let pj: f32 = p.iter().enumerate().map(|(c, pc)| pc * j[c * k + q]).sum();
            for (c, pc) in p.iter().enumerate() {
                j[c * k + q] = scale * pc * (j[c * k + q] - pj);
            }
        }
    }
    add_transposed_products(chunk, dirs, k, &jv, sums);
}

/// Jv for every example of the chunk, class and direction, `[r][C][k]`: per layer X·V (a panel
/// at a time) plus the biases, each example's row gathered from the panels and contracted with
/// its Γ.
#[inline(always)]
fn jacobian_products(chunk: &RowChunk, dirs: &[RowDirections], k: usize) -> Vec<f32> {
    let r = chunk.rows;
    let classes = chunk.probabilities.len() / r.max(1);
    let mut jv = vec![0.0f32; r * classes * k];
    let mut xw = Vec::new();
    for (layer, dir) in chunk.layers.iter().zip(dirs) {
        let (out, panels) = (layer.out, &dir.panels);
        let lanes = panels.lanes;
        let panel_len = r * lanes;
        xw.resize(panels.count * panel_len, 0.0f32);
        for p in 0..panels.count {
            let target = &mut xw[p * panel_len..(p + 1) * panel_len];
            let weights = &dir.weights[p * layer.width * lanes..(p + 1) * layer.width * lanes];
            input_product(&layer.inputs, false, weights, layer.width, lanes, r, target, false);
            if let Some(bias) = &dir.biases {
                let bias = &bias[p * lanes..(p + 1) * lanes];
                for row in target.chunks_exact_mut(lanes) {
                    row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                }
            }
        }
        let pieces = &dir.pieces;
        // Dead outputs stay zero (Γ is zero there too).
        let mut row = vec![0.0f32; k * out];
        for (i, (grads, target)) in
            layer.grads.chunks_exact(classes * out).zip(jv.chunks_exact_mut(classes * k)).enumerate()
        {
            for &(panel, lane, o0, len) in pieces {
                row[o0..o0 + len].copy_from_slice(&xw[panel * panel_len + i * lanes + lane..][..len]);
            }
            for (g, t) in grads.chunks_exact(out).zip(target.chunks_exact_mut(k)) {
                for (t, x) in t.iter_mut().zip(row.chunks_exact(out)) {
                    *t += dot(g, x);
                }
            }
        }
    }
    jv
}

/// Jᵀu added to the thread's sums, per layer: Δ[i][q·out + o] = Σ_c u[i][c][q] Γ[i][c][o]
/// (panel-major), then Xᵀ·Δ and Σᵢ Δ a panel at a time.
#[inline(always)]
fn add_transposed_products(chunk: &RowChunk, dirs: &[RowDirections], k: usize, u: &[f32], sums: &mut Sums) {
    let r = chunk.rows;
    let classes = chunk.probabilities.len() / r.max(1);
    let mut delta = Vec::new();
    let mut row = Vec::new();
    for ((l, layer), dir) in chunk.layers.iter().enumerate().zip(dirs) {
        let (out, panels) = (layer.out, &dir.panels);
        let lanes = panels.lanes;
        let panel_len = r * lanes;
        // Every real column is written below; padded lanes only feed padded (dropped) outputs.
        delta.resize(panels.count * panel_len, 0.0f32);
        row.resize(k * out, 0.0f32);
        let pieces = &dir.pieces;
        for (i, (grads, u)) in layer.grads.chunks_exact(classes * out).zip(u.chunks_exact(classes * k)).enumerate() {
            row.iter_mut().for_each(|x| *x = 0.0);
            for (g, uc) in grads.chunks_exact(out).zip(u.chunks_exact(k)) {
                for (d, weight) in row.chunks_exact_mut(out).zip(uc) {
                    d.iter_mut().zip(g).for_each(|(d, g)| *d = weight.mul_add(*g, *d));
                }
            }
            for &(panel, lane, o0, len) in pieces {
                delta[panel * panel_len + i * lanes + lane..][..len].copy_from_slice(&row[o0..o0 + len]);
            }
        }
        let weights = &mut sums.weights[l];
        for p in 0..panels.count {
            let source = &delta[p * panel_len..(p + 1) * panel_len];
            let target = &mut weights[p * layer.width * lanes..(p + 1) * layer.width * lanes];
            input_product(&layer.inputs, true, source, layer.width, lanes, r, target, true);
            let bias = &mut sums.biases[l][p * lanes..(p + 1) * lanes];
            for row in source.chunks_exact(lanes) {
                bias.iter_mut().zip(row).for_each(|(b, d)| *b += d);
            }
        }
    }
}

/// One panel of X·B into `out` (`transpose` false: B `[width][lanes]`, out `[r][lanes]`) or of
/// Xᵀ·B added to `out` (B `[r][lanes]`, out `[width][lanes]`), row-major f32, sequential.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn input_product(
    inputs: &RowInputs,
    transpose: bool,
    b: &[f32],
    width: usize,
    lanes: usize,
    r: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    match inputs {
        RowInputs::Sparse(sparse) => sparse.panel_product(transpose, b, out, accumulate),
        RowInputs::Dense(x) => {
            let x = MatRef::from_row_major_slice(x, r, width);
            let (x, inner, outer) = if transpose { (x.transpose(), r, width) } else { (x, width, r) };
            let b = MatRef::from_row_major_slice(b, inner, lanes);
            let accum = if accumulate { Accum::Add } else { Accum::Replace };
            matmul(MatMut::from_row_major_slice_mut(out, outer, lanes), accum, x, b, 1.0f32, Par::Seq);
        }
    }
}

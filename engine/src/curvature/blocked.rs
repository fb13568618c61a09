//! Sparse layer inputs as dense tiles of a few lines, for the single-precision Gauss–Newton
//! products ([`super::rows`]).
//!
//! A sparse product gathers, for each result row, the rows of B named by one line's non-zeros
//! (X·B: a row of X; Xᵀ·B: a column): one load of B per multiply-add, which caps it near a third
//! of the vector units' speed (measured: 57 GFLOP/s on a Sapphire Rapids core, AVX-512, f32). Lines
//! that share non-zeros can share the loads: a tile of [`LINES`] lines keeps, for the union U of
//! their non-zero positions, a dense `|U| × LINES` block of values (zeros where a line has none),
//! and each row of B loaded feeds `LINES` accumulators at once. That costs `LINES·|U|` multiply-
//! adds for nnz useful ones (the fill nnz/(LINES·|U|)), and pays when the fill is high: MNIST
//! digits in an order that puts similar ones next to each other ([`similar_order`]) fill 0.67 of
//! a tile of four rows, four neighbouring pixels 0.67 of a tile of four columns, and the tiles run
//! at 109 and 78 useful GFLOP/s against 57 (same core, `TILE` 48 lanes). Exact: the same products
//! in another order.

use crate::simd::InstructionSet;
use crate::simd::narrow;

/// Lines per tile.
pub const LINES: usize = 4;

/// Tiles of [`LINES`] lines of a sparse matrix: tile t's union of non-zero positions is
/// `positions[starts[t]..starts[t+1]]`, with `values[u·LINES + l]` line l's value at position u.
pub(crate) struct Tiles {
    starts: Vec<usize>,
    positions: Vec<u32>,
    values: Vec<f32>,
    /// Lines (the last tile may hold fewer than [`LINES`]).
    lines: usize,
}

impl Tiles {
    /// Tiles of consecutive lines, line l given by `line(l, &mut |position, value| …)` listing its
    /// non-zeros in ascending position.
    fn of(lines: usize, positions: usize, line: impl Fn(usize, &mut dyn FnMut(usize, f32))) -> Self {
        let mut tiles = Self { starts: vec![0], positions: Vec::new(), values: Vec::new(), lines };
        let mut dense = vec![[0.0f32; LINES]; positions];
        let mut touched = vec![false; positions];
        let mut union: Vec<usize> = Vec::new();
        for first in (0..lines).step_by(LINES) {
            union.clear();
            for l in first..(first + LINES).min(lines) {
                line(l, &mut |p, v| {
                    if !touched[p] {
                        touched[p] = true;
                        union.push(p);
                    }
                    dense[p][l - first] = v;
                });
            }
            union.sort_unstable();
            for &p in &union {
                tiles.positions.push(p as u32);
                tiles.values.extend_from_slice(&dense[p]);
                dense[p] = [0.0; LINES];
                touched[p] = false;
            }
            tiles.starts.push(tiles.positions.len());
        }
        tiles
    }

    /// The share of the tiles' multiply-adds that are non-zero.
    #[cfg(test)]
    fn fill(&self) -> f64 {
        let nonzero = self.values.iter().filter(|v| **v != 0.0).count();
        nonzero as f64 / self.values.len().max(1) as f64
    }
}

/// A sparse matrix `rows × width` (f32) in tiles both ways: of rows for X·B, of columns for Xᵀ·B.
pub(crate) struct BlockedSparse {
    rows: usize,
    width: usize,
    by_row: Tiles,
    by_column: Tiles,
}

impl BlockedSparse {
    /// X from its column-major f64 values, rows taken in the order `order` (row i of the result
    /// is row `order[i]` of X).
    pub(crate) fn from_column_major(x: &[f64], rows: usize, width: usize, order: &[usize]) -> Self {
        let at = |i: usize, j: usize| x[j * rows + order[i]];
        let by_row = Tiles::of(rows, width, |i, emit| {
            for j in 0..width {
                let v = at(i, j);
                if v != 0.0 {
                    emit(j, narrow(v));
                }
            }
        });
        let by_column = Tiles::of(width, rows, |j, emit| {
            for i in 0..rows {
                let v = at(i, j);
                if v != 0.0 {
                    emit(i, narrow(v));
                }
            }
        });
        Self { rows, width, by_row, by_column }
    }

    /// The fill of the row tiles and of the column tiles.
    #[cfg(test)]
    fn fill(&self) -> (f64, f64) {
        (self.by_row.fill(), self.by_column.fill())
    }

    /// One panel of X·B (`transpose` false: B `[width][tile]`, out `[rows][tile]`) or of Xᵀ·B
    /// (B `[rows][tile]`, out `[width][tile]`), row-major f32 with rows of `tile` lanes (the
    /// [`panel_lanes`] of this CPU); `accumulate`: added to `out`. Sequential.
    pub(crate) fn panel_product(&self, transpose: bool, b: &[f32], out: &mut [f32], accumulate: bool) {
        let (tiles, inner, outer) =
            if transpose { (&self.by_column, self.rows, self.width) } else { (&self.by_row, self.width, self.rows) };
        let lanes = panel_lanes();
        assert_eq!(b.len(), inner * lanes, "B's panel");
        assert_eq!(out.len(), outer * lanes, "the result's panel");
        #[cfg(target_arch = "x86_64")]
        {
            if lanes == 48 && InstructionSet::chosen() == InstructionSet::Avx512 {
                // SAFETY: `chosen` returns only a set the CPU supports.
                return unsafe { tiles_avx512(tiles, b, out, accumulate) };
            }
            if lanes == 24 && InstructionSet::chosen() == InstructionSet::Avx2 {
                // SAFETY: `chosen` returns only a set the CPU supports.
                return unsafe { tiles_avx2(tiles, b, out, accumulate) };
            }
        }
        tile_products::<16>(tiles, b, out, accumulate)
    }
}

/// Lanes of a panel on this CPU: three vector registers of f32 per line of a tile (48 with
/// AVX-512, 24 with AVX2+FMA, 16 elsewhere), so that a tile's accumulators (3 × [`LINES`]) and
/// the row of B it loads fit the registers.
pub(crate) fn panel_lanes() -> usize {
    match InstructionSet::chosen() {
        InstructionSet::Avx512 => 48,
        InstructionSet::Avx2 => 24,
        InstructionSet::Portable => 16,
    }
}

/// The tile products with explicit vector registers: per tile `LINES × 3` accumulators, each
/// union position's row of B (three registers) loaded once and multiplied by the tile's
/// `LINES` values (one broadcast each), then stored (or added) once. 16 registers in all, so
/// the AVX2 copy fits its 16 without spilling; written with intrinsics because the compiler
/// vectorised the generic loop of [`tile_products`] for 24 lanes into 128-bit halves and stack
/// spills (measured on a Sapphire Rapids core: 5× slower than the AVX-512 copy, slower than
/// the f64 product).
macro_rules! tiles_with_registers {
    ($(#[$doc:meta])* $name:ident, $features:literal, $width:literal,
     $zero:ident, $load:ident, $store:ident, $splat:ident, $fmadd:ident, $add:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(tiles: &Tiles, b: &[f32], out: &mut [f32], accumulate: bool) {
            use std::arch::x86_64::*;
            const LANES: usize = 3 * $width;
            for t in 0..tiles.starts.len() - 1 {
                let (start, stop) = (tiles.starts[t], tiles.starts[t + 1]);
                let mut acc = [[$zero(); 3]; LINES];
                for u in start..stop {
                    let p = tiles.positions[u] as usize;
                    let source = b[p * LANES..(p + 1) * LANES].as_ptr();
                    // SAFETY: `source` starts a slice of 3 · $width f32 (bounds checked above).
                    let row = unsafe { [$load(source), $load(source.add($width)), $load(source.add(2 * $width))] };
                    let values: &[f32; LINES] =
                        tiles.values[u * LINES..(u + 1) * LINES].try_into().expect("a tile's values");
                    for l in 0..LINES {
                        let value = $splat(values[l]);
                        for r in 0..3 {
                            acc[l][r] = $fmadd(value, row[r], acc[l][r]);
                        }
                    }
                }
                let first = t * LINES;
                for (l, registers) in acc.iter().enumerate().take(tiles.lines - first.min(tiles.lines)) {
                    let target = out[(first + l) * LANES..(first + l + 1) * LANES].as_mut_ptr();
                    for (r, &sum) in registers.iter().enumerate() {
                        // SAFETY: `target` starts a slice of 3 · $width f32 (bounds checked above).
                        unsafe {
                            let at = target.add(r * $width);
                            $store(at, if accumulate { $add($load(at), sum) } else { sum });
                        }
                    }
                }
            }
        }
    };
}

tiles_with_registers!(
    /// The tile products for AVX-512F: 48 lanes, three 512-bit registers a line.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    tiles_avx512, "avx512f,fma", 16,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps
);

tiles_with_registers!(
    /// The tile products for AVX2 with FMA: 24 lanes, three 256-bit registers a line.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    tiles_avx2, "avx2,fma", 8,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps
);

/// For every tile: `LINES × LANES` accumulators, each union position's row of B loaded once and
/// multiplied by the tile's `LINES` values, then stored (or added) once; the portable path (16
/// lanes), the x86 ones are [`tiles_with_registers`].
#[inline(always)]
fn tile_products<const LANES: usize>(tiles: &Tiles, b: &[f32], out: &mut [f32], accumulate: bool) {
    for t in 0..tiles.starts.len() - 1 {
        let (start, stop) = (tiles.starts[t], tiles.starts[t + 1]);
        let mut acc = [[0.0f32; LANES]; LINES];
        for u in start..stop {
            let p = tiles.positions[u] as usize;
            let source: &[f32; LANES] = b[p * LANES..(p + 1) * LANES].try_into().expect("a row of the panel");
            let values: &[f32; LINES] = tiles.values[u * LINES..(u + 1) * LINES].try_into().expect("a tile's values");
            for l in 0..LINES {
                for lane in 0..LANES {
                    acc[l][lane] = values[l].mul_add(source[lane], acc[l][lane]);
                }
            }
        }
        let first = t * LINES;
        for (l, row) in acc.iter().enumerate().take(tiles.lines - first.min(tiles.lines)) {
            let target = &mut out[(first + l) * LANES..(first + l + 1) * LANES];
            if accumulate {
                target.iter_mut().zip(row).for_each(|(t, a)| *t += a);
            } else {
                target.copy_from_slice(row);
            }
        }
    }
}

/// An order of the `rows` rows of a sparse matrix (column-major `x`, `width` columns) that puts
/// rows with many non-zero positions in common next to each other, so that tiles of consecutive
/// rows fill well: greedily, each next row is the unvisited one with the largest Jaccard
/// similarity of non-zero patterns to the last (bit sets, popcounts). Cost rows²·width/64.
pub(crate) fn similar_order(x: &[f64], rows: usize, width: usize) -> Vec<usize> {
    let words = width.div_ceil(64);
    let mut bits = vec![0u64; rows * words];
    for (j, column) in x.chunks_exact(rows).enumerate() {
        for (i, v) in column.iter().enumerate() {
            if *v != 0.0 {
                bits[i * words + j / 64] |= 1 << (j % 64);
            }
        }
    }
    let set = |i: usize| &bits[i * words..(i + 1) * words];
    let count = |i: usize| set(i).iter().map(|w| w.count_ones()).sum::<u32>();
    let sizes: Vec<u32> = (0..rows).map(count).collect();
    let mut visited = vec![false; rows];
    let mut order = Vec::with_capacity(rows);
    let mut current = 0;
    for _ in 0..rows {
        visited[current] = true;
        order.push(current);
        let last = set(current);
        let mut best = None;
        let mut best_score = -1.0f64;
        for i in (0..rows).filter(|&i| !visited[i]) {
            let common: u32 = last.iter().zip(set(i)).map(|(a, b)| (a & b).count_ones()).sum();
            let union = sizes[current] + sizes[i] - common;
            let score = if union == 0 { 1.0 } else { f64::from(common) / f64::from(union) };
            if score > best_score {
                best_score = score;
                best = Some(i);
            }
        }
        match best {
            Some(i) => current = i,
            None => break,
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both products of every panel width against a plain triple loop, rows reordered, with a
    /// last tile of fewer than four lines, added and written.
    #[test]
    fn tile_products_equal_the_plain_sums() {
        let (rows, width) = (23, 37);
        let x: Vec<f64> = (0..rows * width)
            .map(|k| if (k * 7919) % 10 < 3 { ((k * 31) % 97) as f64 / 48.0 - 1.0 } else { 0.0 })
            .collect();
        let order = similar_order(&x, rows, width);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..rows).collect::<Vec<_>>(), "a permutation");
        let m = BlockedSparse::from_column_major(&x, rows, width, &order);
        let (by_row, by_column) = m.fill();
        assert!(by_row > 0.0 && by_row <= 1.0 && by_column > 0.0 && by_column <= 1.0);
        let lanes = panel_lanes();
        let at = |i: usize, j: usize| x[j * rows + order[i]] as f32;
        for transpose in [false, true] {
            let (inner, outer) = if transpose { (rows, width) } else { (width, rows) };
            let b: Vec<f32> = (0..inner * lanes).map(|k| ((k * 17) % 89) as f32 / 44.0 - 1.0).collect();
            for accumulate in [false, true] {
                let mut got = vec![0.5f32; outer * lanes];
                m.panel_product(transpose, &b, &mut got, accumulate);
                for o in 0..outer {
                    for lane in 0..lanes {
                        let mut want: f32 = if accumulate { 0.5 } else { 0.0 };
                        for k in 0..inner {
                            let xv = if transpose { at(k, o) } else { at(o, k) };
                            want += xv * b[k * lanes + lane];
                        }
                        let g = got[o * lanes + lane];
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{transpose} {accumulate}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

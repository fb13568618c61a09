//! Sparse layer inputs for the exact Gauss–Newton products ([`super::operators::GaussNewton`]).
//!
//! A product Gv contracts each dense layer's inputs X (`r × in`, one row per example and
//! position) twice: X·B for the Jacobian-vector products and Xᵀ·Δ for the transposed ones, each
//! 2·r·in·cols flops as a dense GEMM (cols = outputs × directions). Inputs are often mostly zero
//! (MNIST pixels: about 19% non-zero; bag-of-words counts: well under 1%; a ReLU layer's
//! outputs), and held as compressed rows (CSR) the same two contractions cost 2·nnz(X)·cols:
//!
//! (X·B)ᵢ,: = Σ_{j : xᵢⱼ ≠ 0} xᵢⱼ B_{j,:}        (Xᵀ·Δ)_{j,:} = Σ_{i : xᵢⱼ ≠ 0} xᵢⱼ Δ_{i,:}
//!
//! X is held by rows (CSR) for the first and by columns (CSC) for the second, so each result row
//! is a sum of rows of B gathered by one line's non-zeros: accumulated in registers, tile by
//! tile, and stored once. B's columns go in panels whose rows stay in the second-level cache
//! (`PANEL_BYTES`), and the multiply-adds are vectorised with AVX-512F or AVX2+FMA, chosen at run
//! time (a plain loop elsewhere). A layer
//! is held sparse when at most [`DENSITY`] of its inputs are non-zero, where the saving beats a
//! dense GEMM's better use of the vector units.
//!
//! Exact: the same sums as the dense product in another order, equal to it within the rounding of
//! the element type (tested against faer's GEMM in f64 and f32).

use faer::Par;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::simd::InstructionSet;
use crate::simd::narrow;

/// The largest share of non-zero inputs for which a layer is held sparse.
pub const DENSITY: f64 = 0.3;

/// Bytes of one column panel's rows (of B, or of the result for Xᵀ·Δ): about half a
/// second-level cache.
const PANEL_BYTES: usize = 512 << 10;

/// An element type of the sparse products: f64, or f32 for the single-precision operator.
pub(crate) trait Element:
    Copy + Send + Sync + Default + std::ops::Mul<Output = Self> + std::ops::Add<Output = Self>
{
    /// From f64 (rounded for f32).
    fn of(v: f64) -> Self;
    /// To f64.
    fn wide(self) -> f64;
    /// a·b + c, fused.
    fn fused(a: Self, b: Self, c: Self) -> Self;
}

impl Element for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn wide(self) -> f64 {
        self
    }
    #[inline(always)]
    fn fused(a: Self, b: Self, c: Self) -> Self {
        a.mul_add(b, c)
    }
}

impl Element for f32 {
    fn of(v: f64) -> Self {
        narrow(v)
    }
    fn wide(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn fused(a: Self, b: Self, c: Self) -> Self {
        a.mul_add(b, c)
    }
}

/// Compressed lines of a sparse matrix: line i's non-zeros are at `indices[starts[i]..starts[i+1]]`
/// with `values` alongside (rows of X for CSR, its columns for CSC).
struct Lines<T> {
    starts: Vec<usize>,
    indices: Vec<u32>,
    values: Vec<T>,
}

/// A matrix `rows × width` held sparse twice: by rows (for X·B) and by columns (for Xᵀ·B), so
/// that both products write each result row once, from registers.
pub(crate) struct SparseRows<T> {
    rows: usize,
    width: usize,
    by_row: Lines<T>,
    by_column: Lines<T>,
}

impl<T: Element> SparseRows<T> {
    /// X from its column-major values (`rows × width`), if at most [`DENSITY`] of them are
    /// non-zero. Cost: two passes over X.
    pub(crate) fn from_column_major(x: &[f64], rows: usize, width: usize) -> Option<Self> {
        let nonzero = x.iter().filter(|v| **v != 0.0).count();
        if rows == 0
            || width == 0
            || nonzero as f64 > DENSITY * (rows * width) as f64
            || rows.max(width) > u32::MAX as usize
        {
            return None;
        }
        // By columns: the column-major order itself.
        let mut by_column =
            Lines { starts: vec![0], indices: Vec::with_capacity(nonzero), values: Vec::with_capacity(nonzero) };
        for column in x.chunks_exact(rows) {
            for (i, v) in column.iter().enumerate().filter(|(_, v)| **v != 0.0) {
                by_column.indices.push(i as u32);
                by_column.values.push(T::of(*v));
            }
            by_column.starts.push(by_column.indices.len());
        }
        // By rows: counted, then filled in column order (so each row's columns ascend).
        let mut starts = vec![0usize; rows + 1];
        for &i in &by_column.indices {
            starts[i as usize + 1] += 1;
        }
        for i in 0..rows {
            starts[i + 1] += starts[i];
        }
        let (mut indices, mut values) = (vec![0u32; nonzero], vec![T::default(); nonzero]);
        let mut next = starts.clone();
        for j in 0..width {
            for k in by_column.starts[j]..by_column.starts[j + 1] {
                let i = by_column.indices[k] as usize;
                indices[next[i]] = j as u32;
                values[next[i]] = by_column.values[k];
                next[i] += 1;
            }
        }
        Some(Self { rows, width, by_row: Lines { starts, indices, values }, by_column })
    }

    /// X·B (`transpose` false: B is `[width, cols]`, the result `[rows, cols]`) or Xᵀ·B (B
    /// `[rows, cols]`, the result `[width, cols]`), both column-major, as f64: the contract of a
    /// dense layer product. Panels of columns in parallel unless `par` is sequential. Cost:
    /// 2·nnz·cols flops plus one transposition of B and of the result.
    pub(crate) fn product(&self, transpose: bool, b: &[f64], cols: usize, par: Par) -> Vec<f64> {
        let (inner, outer) = if transpose { (self.rows, self.width) } else { (self.width, self.rows) };
        let lines = if transpose { &self.by_column } else { &self.by_row };
        assert_eq!(b.len(), inner * cols, "B's shape");
        // A panel of B's `inner` rows stays in the second-level cache while every result row
        // gathers from it.
        let tile = 64 * 8 / size_of::<T>();
        let panel = (PANEL_BYTES / (size_of::<T>() * inner) / tile).max(1) * tile;
        let panels: Vec<(usize, usize)> = (0..cols).step_by(panel).map(|c| (c, panel.min(cols - c))).collect();
        let run = |&(first, width): &(usize, usize)| -> Vec<f64> {
            // The panel of B row-major, then the panel's result row-major.
            let mut b_rows = vec![T::default(); inner * width];
            for t in 0..width {
                for (k, v) in b[(first + t) * inner..(first + t + 1) * inner].iter().enumerate() {
                    b_rows[k * width + t] = T::of(*v);
                }
            }
            let mut out_rows = vec![T::default(); outer * width];
            gather(lines, &b_rows, &mut out_rows, width);
            out_rows.into_iter().map(Element::wide).collect()
        };
        let results: Vec<Vec<f64>> = if matches!(par, Par::Seq) {
            panels.iter().map(run).collect()
        } else {
            panels.par_iter().map(run).collect()
        };
        let mut out = vec![0.0; outer * cols];
        for ((first, width), rows) in panels.iter().zip(results) {
            for (k, row) in rows.chunks_exact(*width).enumerate() {
                for (t, v) in row.iter().enumerate() {
                    out[(first + t) * outer + k] = *v;
                }
            }
        }
        out
    }
}

/// `out[l,:] = Σ_k values[k] · b[indices[k],:]` over line l's non-zeros, for every line
/// (row-major panels of `width`), by the fastest path the CPU has.
fn gather<T: Element>(lines: &Lines<T>, b: &[T], out: &mut [T], width: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if InstructionSet::chosen() == InstructionSet::Avx512 {
            // SAFETY: `chosen` returns only a set the CPU supports.
            return unsafe { gather_avx512(lines, b, out, width) };
        }
        if InstructionSet::chosen() == InstructionSet::Avx2 {
            // SAFETY: `chosen` returns only a set the CPU supports.
            return unsafe { gather_avx2(lines, b, out, width) };
        }
    }
    gather_tiles::<T, 16>(lines, b, out, width, |a, b, c| c + a * b)
}

/// [`gather`] compiled for AVX-512F: tiles of 8 registers (64 f64 or 128 f32 lanes).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn gather_avx512<T: Element>(lines: &Lines<T>, b: &[T], out: &mut [T], width: usize) {
    if size_of::<T>() == 8 {
        gather_tiles::<T, 64>(lines, b, out, width, T::fused)
    } else {
        gather_tiles::<T, 128>(lines, b, out, width, T::fused)
    }
}

/// [`gather`] compiled for AVX2 with FMA: tiles of 8 registers (32 f64 or 64 f32 lanes).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gather_avx2<T: Element>(lines: &Lines<T>, b: &[T], out: &mut [T], width: usize) {
    if size_of::<T>() == 8 {
        gather_tiles::<T, 32>(lines, b, out, width, T::fused)
    } else {
        gather_tiles::<T, 64>(lines, b, out, width, T::fused)
    }
}

/// The loops of [`gather`], with `fma(a, b, c) = a·b + c`: each result row in tiles of `TILE`
/// accumulators kept in registers across the line's non-zeros, then stored once.
#[inline(always)]
fn gather_tiles<T: Element, const TILE: usize>(
    lines: &Lines<T>,
    b: &[T],
    out: &mut [T],
    width: usize,
    fma: impl Fn(T, T, T) -> T + Copy,
) {
    for (l, target) in out.chunks_exact_mut(width).enumerate() {
        let (start, stop) = (lines.starts[l], lines.starts[l + 1]);
        let nonzeros = || lines.indices[start..stop].iter().zip(&lines.values[start..stop]);
        let mut t0 = 0;
        while t0 + TILE <= width {
            let mut acc = [T::default(); TILE];
            for (&j, &v) in nonzeros() {
                let source: &[T; TILE] = b[j as usize * width + t0..][..TILE].try_into().expect("a tile");
                for t in 0..TILE {
                    acc[t] = fma(v, source[t], acc[t]);
                }
            }
            target[t0..t0 + TILE].copy_from_slice(&acc);
            t0 += TILE;
        }
        if t0 < width {
            let rest = &mut target[t0..];
            rest.fill(T::default());
            for (&j, &v) in nonzeros() {
                let source = &b[j as usize * width + t0..(j as usize + 1) * width];
                rest.iter_mut().zip(source).for_each(|(t, s)| *t = fma(v, *s, *t));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, MatMut, MatRef};

    use super::*;

    /// Both products, f64 and f32, sequential and in parallel, against faer's dense GEMM of the
    /// same matrices: within 1e-12 (f64) and 1e-5 (f32) relative to the largest entry.
    #[test]
    fn sparse_products_match_a_dense_gemm() {
        for (rows, width, cols) in [(37, 23, 5), (300, 784, 40), (64, 17, 600)] {
            let x: Vec<f64> = (0..rows * width)
                .map(|k| if (k * 7919) % 10 < 2 { ((k * 31) % 97) as f64 / 48.0 - 1.0 } else { 0.0 })
                .collect();
            for transpose in [false, true] {
                let inner = if transpose { rows } else { width };
                let outer = if transpose { width } else { rows };
                let b: Vec<f64> = (0..inner * cols).map(|k| ((k * 17) % 89) as f64 / 44.0 - 1.0).collect();
                let xm = MatRef::from_column_major_slice(&x, rows, width);
                let xm = if transpose { xm.transpose() } else { xm };
                let mut want = vec![0.0; outer * cols];
                matmul(
                    MatMut::from_column_major_slice_mut(&mut want, outer, cols),
                    Accum::Replace,
                    xm,
                    MatRef::from_column_major_slice(&b, inner, cols),
                    1.0,
                    Par::Seq,
                );
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                for par in [Par::Seq, Par::rayon(2)] {
                    let s64 = SparseRows::<f64>::from_column_major(&x, rows, width).expect("sparse enough");
                    let s32 = SparseRows::<f32>::from_column_major(&x, rows, width).expect("sparse enough");
                    for (got, tolerance) in
                        [(s64.product(transpose, &b, cols, par), 1e-12), (s32.product(transpose, &b, cols, par), 1e-5)]
                    {
                        for (g, w) in got.iter().zip(&want) {
                            assert!(
                                (g - w).abs() <= tolerance * scale,
                                "{g} vs {w} ({rows}×{width}, {cols}, {transpose})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dense_inputs_stay_dense() {
        let x = vec![1.0; 100];
        assert!(SparseRows::<f64>::from_column_major(&x, 10, 10).is_none());
    }
}

//! The inner products of a block of rows with the queries (query step of the pipeline):
//! `rows × nq` scores, row-major, for [`super::score_store`].
//!
//! score(r, j) = ⟨row r, query j⟩. Cost: rows · len · nq multiply-adds and one read of the rows
//! from memory. Up to a few queries the pass is bound by memory bandwidth; beyond that by the
//! multiply-adds (each query costs one per element read: 8 queries are 2 multiply-adds per byte;
//! on a Sapphire Rapids core the AVX2 kernel with its rows in cache scores 8 queries at 17.7 GiB/s
//! of rows, so two cores only about 1.4× as fast as they read memory).
//! f32 accumulation in lanes, tolerance about 1e-6 · len relative.
//!
//! Hand-written kernels read every row once for all the queries. The queries are split into
//! groups of 8, 4, 2 and 1 (greedily: 11 queries are 8 + 2 + 1), so no multiply-add is spent on
//! padding; a group is R rows × Q queries of accumulators, every query chunk loaded once for R
//! rows. On CPUs with AVX-512F (32 registers of 16 lanes) R is 3, 5, 8 or 8 when the widest group
//! is 8, 4, 2 or 1; on CPUs with AVX2 and FMA only (16 registers of 8 lanes, widest group 4) R is
//! 3, 4 or 6 for 4, 2 or 1.
//!
//! The loop order overlaps the memory stream with the arithmetic. For each set of R rows, the
//! columns go by in pieces of [`PIECE`]; every group of queries passes over a piece (from the
//! first-level cache) before the next piece, and the first group prefetches the same piece of the
//! next R rows. The groups' accumulators live in memory between pieces (R · Q registers loaded
//! and stored a piece). So memory is read at an even rate the whole time. The earlier order (all
//! rows of a 48-row sub-block for one group, then the same rows from the second-level cache for
//! the next) read memory only during the first group's pass. On an Intel Xeon (Sapphire Rapids
//! class, 2 cores) with the AVX2 kernels, 8 queries, top-100, went from 61% to 80% of a parallel
//! read of the same memory-mapped store, 16 queries from 41% to 54% (criterion, `benches/
//! bench_main.rs` group `scoring`, both codes in one session). Two orders measured no better
//! there: every set of a 48-row sub-block over one span of columns before the next span (the
//! queries' span in the first-level cache: a higher in-cache ceiling, 71% streaming), and tiles of
//! 2–4 sets per piece (within the run-to-run spread). The queries' columns go in windows whose
//! slice of all the queries fits the second-level cache ([`WINDOW_FLOATS`]), so that long rows do
//! not evict them between row sets.
//!
//! Elsewhere faer's matrix product does the same work. The path is chosen at run time
//! ([`Path::chosen`]); `CULPRIT_SCORING_KERNEL=avx512|avx2|portable` forces one the CPU supports
//! (for benchmarks and tests).

use faer::{Mat, MatRef, Par};

use crate::simd::InstructionSet;

/// Columns every group of queries passes over before the next piece: 1 KiB of each of the R
/// rows, with the groups' slices of the queries (nq KiB) in the first-level cache. Pieces of
/// 64–256 columns measured alike (77–80%), 512 lower (73%), whole rows of 2048 lower still (68%).
pub const PIECE: usize = 256;

/// Floats of all the queries' columns in one window (256 KiB), re-read from the second-level
/// cache by every set of R rows.
pub const WINDOW_FLOATS: usize = 1 << 16;

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
            let forced =
                named("CULPRIT_SCORING_KERNEL").or_else(|| named(crate::simd::KERNEL_VARIABLE)).map(|set| match set {
                    InstructionSet::Avx512 => Self::Avx512,
                    InstructionSet::Avx2 => Self::Avx2,
                    InstructionSet::Portable => Self::Portable,
                });
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

    /// f32 lanes of a vector register.
    fn lanes(self) -> usize {
        match self {
            Self::Avx512 => 16,
            _ => 8,
        }
    }
}

/// The query groups `(first query, width)` of `nq` queries: widths of 8 (at most `widest`),
/// 4, 2 and 1, greedily, so the widest comes first.
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

/// Columns of a window for `nq` queries: a multiple of [`PIECE`], at least one piece.
pub fn window_columns(nq: usize) -> usize {
    ((WINDOW_FLOATS / nq.max(1)) / PIECE).max(1) * PIECE
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
        assert!(block.len() >= rows * len, "rows × len values in the block");
        let mut out = vec![0.0f32; rows * nq];
        if rows == 0 || nq == 0 {
            return out;
        }
        let groups = groups(nq, path.widest_group());
        // The columns the vector kernels take; the rest (fewer than a register) are added below.
        let full = len - len % path.lanes();
        let shape = Shape { rows, len, full, nq };
        // SAFETY: the CPU has the path's features (checked above); the slices hold what the
        // shape says (asserted above).
        unsafe {
            match path {
                Path::Avx512 => rows_avx512(block, packed, shape, &groups, &mut out),
                _ => rows_avx2(block, packed, shape, &groups, &mut out),
            }
        }
        for (r, scores) in out.chunks_exact_mut(nq).enumerate() {
            let row = &block[r * len + full..(r + 1) * len];
            for (j, score) in scores.iter_mut().enumerate() {
                *score += row.iter().zip(&packed[j * len + full..(j + 1) * len]).map(|(x, y)| x * y).sum::<f32>();
            }
        }
        return out;
    }
    dots_faer(block, rows, len, q)
}

/// The sizes a vector kernel works to: `rows` rows of `len` values, of which the first `full`
/// (a multiple of the register's lanes) are its to score, against `nq` queries.
#[derive(Clone, Copy, Debug)]
struct Shape {
    rows: usize,
    len: usize,
    full: usize,
    nq: usize,
}

/// The vector kernels of one instruction set: `$rows` (the row sets, windows and pieces, and the
/// reduction of the accumulators into the scores), `$sets` (the same for R rows a set) and
/// `$piece` (R rows × Q queries over one piece of columns).
macro_rules! scoring_kernels {
    ($(#[$doc:meta])* $rows:ident, $sets:ident, $groups:ident, $piece:ident, $features:literal, $vector:ty, $lanes:literal,
     $zero:ident, $load:ident, $fmadd:ident, $reduce:path, [$($widest:literal => $r:literal),+]) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $rows(block: &[f32], packed: &[f32], shape: Shape, groups: &[(usize, usize)], out: &mut [f32]) {
            // SAFETY: the caller's contract, passed on.
            unsafe {
                match groups[0].1 {
                    $($widest => $sets::<$r>(block, packed, shape, groups, out),)+
                    widest => unreachable!("no kernel for groups of {widest}"),
                }
            }
        }

        /// The rows in sets of R: per window of columns, each piece of the window by every
        /// group of queries, then the accumulators reduced into `out`.
        ///
        /// # Safety
        /// The CPU must support the features; `block` holds `rows · len` values, `packed`
        /// `nq · len`, `out` `rows · nq`, and every group fits the accumulators of R rows.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $sets<const R: usize>(
            block: &[f32], packed: &[f32], shape: Shape, groups: &[(usize, usize)], out: &mut [f32],
        ) {
            use std::arch::x86_64::*;
            let Shape { rows, len, full, nq } = shape;
            // Group (first, width)'s accumulators: acc[R·first + k·width + j] for row k, query j.
            let mut acc: Vec<$vector> = vec![$zero(); R * nq];
            let window = window_columns(nq);
            for window_start in (0..full).step_by(window) {
                let window_end = (window_start + window).min(full);
                for r in (0..rows).step_by(R) {
                    let here = R.min(rows - r);
                    let base = block[r * len..].as_ptr();
                    let p: [*const f32; R] = std::array::from_fn(|k| base.wrapping_add(k.min(here - 1) * len));
                    // The next R rows, fetched into cache while these are computed (a hint past
                    // the end is harmless: the address is never dereferenced).
                    let next = base.wrapping_add(R * len) as *const i8;
                    acc.fill($zero());
                    for start in (window_start..window_end).step_by(PIECE) {
                        let piece = (start, (start + PIECE).min(window_end));
                        // SAFETY: the rows exist (the last stands in for missing ones) and the
                        // piece lies within the first `full` columns.
                        unsafe { $groups::<R>(p, next, len, packed, groups, piece, &mut acc) };
                    }
                    for &(first, width) in groups {
                        for k in 0..here {
                            for j in 0..width {
                                out[(r + k) * nq + first + j] += $reduce(acc[R * first + k * width + j]);
                            }
                        }
                    }
                }
            }
        }

        /// One piece of R rows by every group of queries, the first group prefetching `next`.
        ///
        /// # Safety
        /// As for the piece kernel; `acc` holds R · nq registers.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $groups<const R: usize>(
            p: [*const f32; R], next: *const i8, len: usize, packed: &[f32], groups: &[(usize, usize)],
            piece: (usize, usize), acc: &mut [$vector],
        ) {
            for (g, &(first, width)) in groups.iter().enumerate() {
                let q = packed[first * len..].as_ptr();
                let a = &mut acc[R * first..R * (first + width)];
                // SAFETY: the caller's contract; `a` holds R · width accumulators.
                unsafe {
                    match (width, g == 0) {
                        (8, true) => $piece::<8, R, true>(p, next, len, q, piece, a),
                        (8, false) => $piece::<8, R, false>(p, next, len, q, piece, a),
                        (4, true) => $piece::<4, R, true>(p, next, len, q, piece, a),
                        (4, false) => $piece::<4, R, false>(p, next, len, q, piece, a),
                        (2, true) => $piece::<2, R, true>(p, next, len, q, piece, a),
                        (2, false) => $piece::<2, R, false>(p, next, len, q, piece, a),
                        (_, true) => $piece::<1, R, true>(p, next, len, q, piece, a),
                        (_, false) => $piece::<1, R, false>(p, next, len, q, piece, a),
                    }
                }
            }
        }

        /// R rows × Q queries over the columns `piece`: `acc[k·Q + j] += row k ⊙ query j`
        /// lane-wise, with the next R rows' piece prefetched when `PREFETCH`.
        ///
        /// # Safety
        /// The CPU must support the features; the R rows (`p`) and Q queries (`q`, query-major
        /// with stride `len`) hold the piece's columns; `acc` holds R · Q registers.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $piece<const Q: usize, const R: usize, const PREFETCH: bool>(
            p: [*const f32; R], next: *const i8, len: usize, q: *const f32, piece: (usize, usize), acc: &mut [$vector],
        ) {
            use std::arch::x86_64::*;
            assert!(acc.len() >= R * Q, "R · Q accumulators");
            let mut a: [[$vector; Q]; R] = std::array::from_fn(|k| std::array::from_fn(|j| acc[k * Q + j]));
            for c in (piece.0..piece.1).step_by($lanes) {
                // SAFETY: the caller's contract: c + lanes ≤ the rows' and queries' length.
                unsafe {
                    if PREFETCH {
                        for k in 0..R {
                            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(4 * (k * len + c)));
                        }
                    }
                    let x: [$vector; R] = std::array::from_fn(|k| $load(p[k].add(c)));
                    for j in 0..Q {
                        let y = $load(q.add(j * len + c));
                        for k in 0..R {
                            a[k][j] = $fmadd(x[k], y, a[k][j]);
                        }
                    }
                }
            }
            for k in 0..R {
                acc[k * Q..(k + 1) * Q].copy_from_slice(&a[k]);
            }
        }
    };
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

scoring_kernels!(
    /// The AVX-512F kernels: R · Q of the 32 registers of accumulators (at most 24), R for the
    /// row loads and one for the query's.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; the slices hold what `shape` says.
    rows_avx512, sets_avx512, groups_avx512, piece_avx512, "avx512f", std::arch::x86_64::__m512, 16,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps, sum16, [8 => 3, 4 => 5, 2 => 8, 1 => 8]
);

scoring_kernels!(
    /// The AVX2 kernels: R · Q of the 16 registers of accumulators (at most 12), R for the row
    /// loads and one for the query's.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; the slices hold what `shape` says.
    rows_avx2, sets_avx2, groups_avx2, piece_avx2, "avx2,fma", std::arch::x86_64::__m256, 8,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, sum8, [4 => 3, 2 => 4, 1 => 6]
);

/// The sum of an AVX-512 register's 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum16(v: std::arch::x86_64::__m512) -> f32 {
    std::arch::x86_64::_mm512_reduce_add_ps(v)
}

/// The sum of an AVX register's 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn sum8(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path this CPU supports against an f64 reference, with odd sizes (tails, an odd
    /// row count, a last row set of fewer than R rows, several windows of columns).
    #[test]
    fn kernels_match_a_plain_dot_product() {
        // (5, 20005, 9): three windows of columns (7168 each for 9 queries) and a 5-column tail.
        let shapes = [(7, 37, 11), (101, 300, 16), (50, 8, 3), (61, 77, 15), (9, 16, 1), (3, 50, 2), (5, 20005, 9)];
        for (rows, len, nq) in shapes {
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
        // (score, Σ|terms|) in f64; f32 sums in lanes are within 1e-5 of the latter.
        let reference: Vec<(f64, f64)> = (0..rows * nq)
            .map(|k| {
                let (i, j) = (k / nq, k % nq);
                let terms = (0..len).map(|t| f64::from(block[i * len + t]) * f64::from(queries[j][t]));
                terms.fold((0.0, 0.0), |(s, m), x| (s + x, m + x.abs()))
            })
            .collect();
        let paths = Path::supported();
        eprintln!("scoring paths on this CPU: {paths:?}");
        for path in paths {
            let got = dots_with(path, &block, rows, len, &q, &packed, nq);
            assert_eq!(got.len(), rows * nq);
            for (g, (w, magnitude)) in got.iter().zip(&reference) {
                assert!(
                    (f64::from(*g) - w).abs() <= 1e-5 * (1.0 + magnitude),
                    "{path:?} ({rows}, {len}, {nq}): {g} vs {w}"
                );
            }
        }
    }
}

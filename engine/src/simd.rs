//! The instruction set the curvature kernels are compiled for, chosen once at run time.
//!
//! The hot loops of the Gauss–Newton products (`curvature::operators`, `sparse`, `rows`) are
//! written once as plain Rust and compiled three times: for AVX-512F, for AVX2 with FMA, and for
//! the baseline x86-64 (or any other) instruction set; the sparse tiles of `blocked` have an
//! intrinsics kernel for each of the first two (the compiler's AVX2 copy of the plain loop spilled
//! its registers). [`InstructionSet::chosen`]
//! picks the widest one this CPU supports, so one binary is fast on a Zen 3 (AVX2 only) and on a
//! Sapphire Rapids or Zen 4/5 (AVX-512). `CULPRIT_KERNEL=avx512|avx2|portable` narrows the choice
//! (a set the CPU lacks is never chosen), so that both paths can be measured and tested on one
//! machine; scoring has its own `CULPRIT_SCORING_KERNEL` ([`crate::query::kernel::Path`]) and
//! falls back to this one. Neither reaches the matrix products of burn's CPU backends (the `gemm`
//! crate, built with its `x86-v4` feature by culprit-models) or of faer: those choose their own
//! AVX-512 or AVX2 kernels at run time.
//!
//! ## Subnormal operands
//! An x86 core multiplies a subnormal float (|x| < 2⁻¹²⁶ ≈ 1.2e-38 in f32) by a microcode assist
//! that costs on the order of a hundred cycles, where a normal operand costs none. Narrowing f64
//! data to f32 makes subnormals of values that were merely small in f64 (an eigenvector entry of
//! 1e-40 where the factor's pixel never lights up): on the MNIST MLP the f32 EK-FAC GEMMs ran at
//! half speed because of 3842 such entries of Q_A's 616,225 (27 → 14 ms a product once flushed).
//! Every f32 copy that the single-precision products read is made by [`narrow`], which flushes
//! them to zero, and so are the scoring kernel's queries and the rows a gradient store keeps
//! ([`flushed`]); f64 data stays as it is (its subnormals, below 2.2e-308, do not occur here).

use std::sync::OnceLock;

/// An instruction set with its own compiled copy of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstructionSet {
    /// AVX-512F with FMA: 16 f32 lanes, 32 registers.
    Avx512,
    /// AVX2 with FMA: 8 f32 lanes, 16 registers.
    Avx2,
    /// The target's baseline.
    Portable,
}

/// The environment variable that narrows [`InstructionSet::chosen`].
pub const KERNEL_VARIABLE: &str = "CULPRIT_KERNEL";

impl InstructionSet {
    /// The sets this CPU supports, widest first (the portable one always).
    pub fn supported() -> Vec<Self> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
                out.push(Self::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                out.push(Self::Avx2);
            }
        }
        out.push(Self::Portable);
        out
    }

    /// The set named `name` (`avx512`, `avx2`, `portable`).
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "avx512" => Some(Self::Avx512),
            "avx2" => Some(Self::Avx2),
            "portable" => Some(Self::Portable),
            _ => None,
        }
    }

    /// The widest set this CPU supports, or the one [`KERNEL_VARIABLE`] names if the CPU supports
    /// it; decided once per process. Only a supported set is ever returned, which is what makes
    /// the `unsafe` calls of the `#[target_feature]` copies sound.
    pub fn chosen() -> Self {
        static CHOSEN: OnceLock<InstructionSet> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let supported = Self::supported();
            let forced = std::env::var(KERNEL_VARIABLE).ok().and_then(|v| Self::named(&v));
            forced.filter(|s| supported.contains(s)).unwrap_or(supported[0])
        })
    }
}

/// x in f32, with results below f32's smallest normal magnitude flushed to (signed) zero: the
/// narrowing of every f32 operand of the single-precision products (see the module
/// documentation). The flushed values are below 1.2e-38, far under f32's relative precision of
/// anything they are added to.
#[inline(always)]
pub fn narrow(x: f64) -> f32 {
    flushed(x as f32)
}

/// An f64 matrix in f32, every entry [`narrow`]ed: the f32 copies of factors and inverses that
/// the single-precision products multiply by.
pub fn narrow_matrix(m: &faer::Mat<f64>) -> faer::Mat<f32> {
    faer::Mat::from_fn(m.nrows(), m.ncols(), |i, j| narrow(m[(i, j)]))
}

/// x, or (signed) zero when x is subnormal: for f32 values that become operands of a kernel
/// (the scoring queries, the rows a store keeps), as [`narrow`] for f64 ones.
#[inline(always)]
pub fn flushed(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE { 0.0f32.copysign(x) } else { x }
}

#[cfg(test)]
mod tests {
    use super::{flushed, narrow};

    #[test]
    fn narrowing_flushes_what_f32_could_only_hold_as_subnormal_and_keeps_the_rest() {
        for x in [1e-39, -1e-39, 1e-45, 5e-324, 1.0e-38] {
            let y = narrow(x);
            assert_eq!(y, 0.0, "{x:e}");
            assert_eq!(y.is_sign_negative(), x < 0.0, "{x:e}");
        }
        for x in [1.2e-38, -3.0e-30, 1e-8, 0.5, -7.25, 3.0e38, 0.0] {
            assert_eq!(narrow(x), x as f32, "{x:e}");
            assert!(narrow(x) == 0.0 || narrow(x).is_normal(), "{x:e}");
        }
        assert!(narrow(1e39).is_infinite() && narrow(f64::NAN).is_nan());
        for x in [1e-39f32, -1e-45, f32::MIN_POSITIVE / 2.0] {
            assert_eq!(flushed(x).to_bits(), 0.0f32.copysign(x).to_bits(), "{x:e}");
        }
        for x in [f32::MIN_POSITIVE, -1e-30, 1.0, f32::MAX, f32::INFINITY] {
            assert_eq!(flushed(x), x, "{x:e}");
        }
    }
}

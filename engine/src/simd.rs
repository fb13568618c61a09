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

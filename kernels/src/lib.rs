//! culprit-kernels: CubeCL kernels for the wgpu backend, where burn's tensor operations leave
//! speed or memory on the table. Built only with the `gpu` feature; without it this crate is
//! empty, so CPU builds never compile cubecl.
//!
//! - [`scoring`]: influence scores of many queries against the rows of a gradient store, fused
//!   with a per-block top-k, so that no n × q score matrix is ever written (query step of the
//!   pipeline; the CPU path is `culprit_engine::query`), for dense rows and for factored rows
//!   (ãᵀQδ̃ per layer, `factors` stores).
//! - [`projection`]: per-example Kronecker projections Σₜ (P_inᵀaₜ)(P_outᵀδₜ)ᵀ of a layer's
//!   inputs and output gradients in one launch (cache step, `kron:KINxKOUT` stores), reached from
//!   burn tensors through burn's backend-extension route.

#[cfg(feature = "gpu")]
pub mod projection;
#[cfg(feature = "gpu")]
pub mod scoring;

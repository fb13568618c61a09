//! `cg`: conjugate gradient on exact Gauss–Newton products, optionally preconditioned. Nothing
//! but the preconditioner's factors is fitted; every solve runs CG to the relative residual
//! `--tolerance` (default [`DEFAULT_TOLERANCE`]) or fails saying so.
//!
//! All the queries of a trace are solved together, in one block Krylov space
//! ([`ConjugateGradient::solve_block`], [`crate::curvature::block_cg`]): one product of all k
//! directions per iteration, which for a dense layer `in → out` over n rows is two GEMMs of
//! 2·n·in·out·k flops each (see [`crate::curvature::operators::GaussNewton`]), and every query's
//! search uses what the others found. The products are f32 (the row-major
//! panel path of the `rows` module: tested within 1e-5 relative of f64, 5·10⁻⁷ on the MNIST MLP); the f64 operator recomputes a
//! column's residual whenever it has fallen [`crate::curvature::block_cg::REPLACE_EVERY`]× since
//! the last time and before the column is called converged (reliable updates, van der Vorst & Ye
//! 2000), so the tolerance is met in f64.
//!
//! What makes A = G + (λ + δ)I hard for a ReLU network, and what the solve does about each part:
//!
//! 1. **Exact symmetries.** Scaling a ReLU unit's incoming weights by c and its outgoing by 1/c
//!    leaves the function unchanged, so the direction w = (θ_in, −θ_out) lies in the null space of
//!    every Jacobian: Gw = 0 and Aw = (λ + δ)w (a linear embedding gives every mixing of its
//!    units). These are EK-FAC's worst-preconditioned directions (κ ≈ 4·10⁴ on the MNIST MLP).
//!    The model lists them ([`culprit_models::Model::unit_links`], [`NullSpace`]); the solve
//!    deflates them exactly: x = Π_W q / (λ + δ) + CG on W⊥ with every operator projected.
//! 2. **Near-symmetries.** Units active on ≥ 90% of the examples are nearly linear, so mixing two
//!    of them (a → b in, compensated out) is almost null. [`Gauge`] builds the exact operator
//!    E = GᵀAG on those mixings (with the curvature of the examples where the pair disagrees) and
//!    adds the coarse correction G E⁻¹ Gᵀ to the preconditioner (two-level, additive). Building E
//!    costs Σᵢ |pairs where example i disagrees|²/2 multiply-adds (at most l⁴/2 an example, l ≤ 64
//!    units) and l⁶/3 to invert it, once per solve (2.3 s on the MNIST MLP); each application
//!    one l² × l² product.
//! 3. **Small layers.** A layer of at most [`MAX_EXACT_BLOCK`] parameters (the classifier head)
//!    gets its exact damped GGN block inverted in place of its EK-FAC factors ([`ExactLayers`]).
//! 4. The rest is EK-FAC in f32 ([`KroneckerFactors::single_precision`]), batched over the k
//!    directions; the preconditioner only chooses directions, the residuals stay exact.
//!
//! Measured on the MNIST MLP 784-256-10 (10 000 images with a 1% patch backdoor, λ = 1e-4,
//! tolerance 1e-6, 10 triggered queries; Intel Xeon with AVX-512, 2 cores): block iterations
//! 538 with EK-FAC alone → ~300 with (1) → ~175 with (2) → 128–140 with (3); a whole trace
//! 594.7 s → 52.0 s with the f32 row products (58.4 s with the AVX2 kernels), top-200 unchanged
//! for every query (scores within 7·10⁻⁴ relative); 51.6 → 46.6–48.0 s once the f32 operands
//! were narrowed without subnormals ([`crate::simd::narrow`]: EK-FAC's GEMMs had run at half
//! speed). The same recipe on Fashion-MNIST, whose inputs are dense (half non-zero): 156–169
//! iterations, 78–80 s, most of it the dense f32 products near the CPU's peak. On an Ice Lake
//! Xeon (family 6, model 106, AVX-512, 2 cores) the MNIST trace took 68–87 s with the same
//! iterations: the minute depends on the CPU. Cost per solve: iterations × (one product + one
//! preconditioner apply) + O(n·64²) for the coarse space.
//!
//! What bounds the iterations (measured on the MNIST MLP, Lanczos from preconditioned CG's
//! coefficients, one query): the preconditioned spectrum spans 0.026 to 16.6 (κ ≈ 640) with a
//! continuum at its small end, not a few outliers that deflation or a wider block would remove;
//! one query alone needs about 165 iterations, the block of 10 about 135. All 83 units active on
//! ≥ 90% in the coarse space instead of [`crate::curvature::symmetry::MAX_GAUGE_UNITS`] took
//! 121–130 iterations, but 18 s to build instead of 4–5 s.
//!
//! Measured on MNIST logistic regression (5000 images, λ = 1e-3, 10 test points, `benches/peers.sh`):
//! plain CG needs 136 iterations to 1e-8; with EK-FAC 6–9 per query reach 1e-1, which already
//! gives Pearson 0.982 against actual leave-one-out retraining (0.987 at 1e-8).

use std::any::Any;

use serde::{Deserialize, Serialize};

use crate::curvature::blocks::{ExactLayers, InverseBlock, MAX_EXACT_BLOCK};
use crate::curvature::iterative::{ConjugateGradient, SolveInfo};
use crate::curvature::kronecker::{self, KroneckerFactors, SinglePrecisionInverse};
use crate::curvature::operators::{Damped, LinearOperator, norm};
use crate::curvature::symmetry::{Gauge, NullSpace, OnComplement, WithGauge};
use crate::curvature::{CurvatureError, CurvatureMethod, CurvatureSource, FitContext, Fitted, LoadContext, Solution};
use crate::error::{Error, Result};
use crate::gradients::LayerFactors;
use crate::io::container::Arrays;
use culprit_models::model::tracked_starts;

/// CG's relative-residual tolerance unless `--tolerance` says otherwise.
pub const DEFAULT_TOLERANCE: f64 = ConjugateGradient::DEFAULT_TOLERANCE;

/// The `cg` method.
pub struct Cg;

/// CG's own flags.
#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
#[group(skip)]
pub struct CgParams {
    /// cg: iteration limit.
    #[arg(long = "max-iterations", default_value_t = ConjugateGradient::DEFAULT_MAX_ITERATIONS, value_parser = crate::params::at_least_one)]
    pub max_iterations: usize,
    /// cg: precondition with EK-FAC.
    #[arg(long)]
    pub precondition: bool,
}

impl Default for CgParams {
    fn default() -> Self {
        crate::params::clap_defaults()
    }
}

/// A CG solver with its optional EK-FAC preconditioner.
pub struct FittedCg {
    /// The solver's parameters.
    pub solver: ConjugateGradient,
    /// The preconditioner.
    pub preconditioner: Option<KroneckerFactors>,
    damping: f64,
    chunk: usize,
}

impl CurvatureMethod for Cg {
    type Params = CgParams;

    fn fit(params: &CgParams, ctx: &FitContext<'_>) -> Result<Box<dyn Fitted>> {
        let o = ctx.options;
        let preconditioner =
            params.precondition.then(|| kronecker::fit(ctx.source, true, o)).transpose()?;
        let solver = ConjugateGradient {
            tolerance: o.tolerance.unwrap_or(DEFAULT_TOLERANCE),
            max_iterations: params.max_iterations,
        };
        Ok(Box::new(FittedCg { solver, preconditioner, damping: o.damping, chunk: o.chunk }))
    }

    fn load(params: &CgParams, arrays: &mut Arrays, ctx: &LoadContext<'_>) -> Result<Box<dyn Fitted>> {
        let o = ctx.options;
        let preconditioner = params.precondition.then(|| KroneckerFactors::from_arrays(arrays, ctx)).transpose()?;
        let solver = ConjugateGradient {
            tolerance: o.tolerance.unwrap_or(DEFAULT_TOLERANCE),
            max_iterations: params.max_iterations,
        };
        Ok(Box::new(FittedCg { solver, preconditioner, damping: o.damping, chunk: o.chunk }))
    }
}

/// What the preconditioner of a solve is made of (see the module documentation): EK-FAC in f32,
/// the small layers' exact blocks in place of their factors, the near-linear units' coarse space.
struct Parts<'a> {
    inverse: SinglePrecisionInverse<'a>,
    exact: Vec<InverseBlock>,
    gauge: Option<Gauge>,
}

impl FittedCg {
    /// The preconditioner's parts for the damped curvature with shift = λ + δ, or `None` without
    /// `--precondition`.
    fn parts(&self, source: &dyn CurvatureSource, shift: f64) -> Option<Parts<'_>> {
        let factors = self.preconditioner.as_ref()?;
        if shift <= 0.0 {
            // Without λ + δ the exact blocks and the coarse operator are singular (softmax's
            // invariance, the rescalings among the near-linear units): EK-FAC alone.
            let inverse = factors.single_precision(self.damping);
            return Some(Parts { inverse, exact: Vec::new(), gauge: None });
        }
        let starts = tracked_starts(source.layers());
        let exact = source
            .exact_blocks(shift, MAX_EXACT_BLOCK)
            .into_iter()
            .filter_map(|(l, block)| InverseBlock::new(&source.layers()[l], starts[l], &block))
            .collect();
        Some(Parts { inverse: factors.single_precision(self.damping), exact, gauge: source.gauge(shift) })
    }

    /// Solves with `solve` on the complement of the model's null space ([`NullSpace`]): the
    /// queries' null components are solved exactly (x = Π_W q / (λ + δ)), the rest by `solve`
    /// with the operator, its single-precision twin and the preconditioner restricted to W⊥.
    /// Converged residuals are reported relative to the whole query (a `NotConverged` error's
    /// relative to its part in W⊥).
    fn solve_deflated(
        &self,
        source: &dyn CurvatureSource,
        queries: &[&[f64]],
        solve: impl FnOnce(Operators<'_>, &[&[f64]]) -> std::result::Result<Vec<(Vec<f64>, SolveInfo)>, CurvatureError>,
    ) -> Result<Vec<Solution>> {
        let ggn = source.gauss_newton(self.chunk)?;
        let exact = Damped { inner: ggn.as_ref(), damping: self.damping };
        let single = source.gauss_newton_single(self.chunk)?;
        let fast = Damped { inner: single.as_ref(), damping: self.damping };
        // A's eigenvalue on the null space; without damping it is singular there, and the null
        // space is not used (CG then meets the singular directions as it always did).
        let shift = source.l2() + self.damping;
        let null = if shift > 0.0 { source.null_space() } else { NullSpace::of(&[], &[], &[]) };
        let parts = self.parts(source, shift);
        let layered = parts.as_ref().map(|p| ExactLayers { inner: &p.inverse, blocks: &p.exact });
        let gauged = layered
            .as_ref()
            .zip(parts.as_ref().and_then(|p| p.gauge.as_ref()))
            .map(|(m, gauge)| WithGauge { inner: m, gauge });
        let inner: Option<&dyn LinearOperator> = match (&gauged, &layered) {
            (Some(g), _) => Some(g),
            (None, m) => m.as_ref().map(|m| m as &dyn LinearOperator),
        };
        let m = inner.map(|m| OnComplement { inner: m, null: &null });
        let complements: Vec<Vec<f64>> = queries
            .iter()
            .map(|q| {
                let mut r = q.to_vec();
                null.remove(&mut r);
                r
            })
            .collect();
        let rhs: Vec<&[f64]> = complements.iter().map(Vec::as_slice).collect();
        let operators = Operators {
            fast: &OnComplement { inner: &fast, null: &null },
            exact: &OnComplement { inner: &exact, null: &null },
            preconditioner: m.as_ref().map(|m| m as &dyn LinearOperator),
        };
        let solved = solve(operators, &rhs)?;
        Ok(solved
            .into_iter()
            .zip(queries.iter().zip(&complements))
            .map(|((mut x, mut info), (q, r))| {
                if !null.is_empty() {
                    let part = null.component(q);
                    x.iter_mut().zip(&part).for_each(|(x, p)| *x += p / shift);
                    info.relative_residual *= norm(r) / norm(q).max(f64::MIN_POSITIVE);
                }
                (x, Some(info))
            })
            .collect())
    }
}

/// The operators of a solve on the null space's complement.
struct Operators<'a> {
    /// Single-precision products.
    fast: &'a dyn LinearOperator,
    /// f64 products.
    exact: &'a dyn LinearOperator,
    /// M⁻¹, if preconditioned.
    preconditioner: Option<&'a dyn LinearOperator>,
}

impl Fitted for FittedCg {
    fn solve(&self, source: &dyn CurvatureSource, queries: &[Vec<f64>]) -> Result<Vec<Solution>> {
        // The iterations run on single-precision products; the f64 operator gives every residual
        // that decides anything (reliable updates, block_cg).
        let rhs: Vec<&[f64]> = queries.iter().map(Vec::as_slice).collect();
        self.solve_deflated(source, &rhs, |o, rhs| self.solver.solve_block(Some(o.fast), o.exact, rhs, o.preconditioner))
    }

    fn solve_within(&self, source: &dyn CurvatureSource, query: &[f64], products: usize) -> Result<Solution> {
        let solver = ConjugateGradient { max_iterations: products.min(self.solver.max_iterations), ..self.solver.clone() };
        let mut solved = self.solve_deflated(source, &[query], |o, rhs| {
            solver.solve_within(o.exact, rhs[0], o.preconditioner).map(|solution| vec![solution])
        })?;
        Ok(solved.pop().expect("one query"))
    }

    fn self_influence(&self, _: &dyn CurvatureSource, _: &[LayerFactors]) -> Result<Vec<f64>> {
        Err(Error::Usage(super::super::self_influence::ITERATIVE_REFUSAL.replace("{method}", "cg")))
    }

    fn arrays(&self) -> Arrays {
        let mut arrays = Arrays::new();
        if let Some(k) = &self.preconditioner {
            k.push_arrays(&mut arrays);
        }
        arrays
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

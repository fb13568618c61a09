//! `diagonal`: the diagonal of the true Fisher, a baseline between `identity` and K-FAC.
//!
//! D = diag(F) + λ, with F = (1/n) Σᵢ Σ_c p_ic g_ic g_icᵀ the true Fisher (the GGN for softmax
//! cross-entropy with one prediction per example; sampled labels otherwise), so
//! D_j = (1/n) Σᵢ Σ_c p_ic g_ic,j² + λ. A layer's gradient is Σₗ ãₗδₗᵀ in its Kronecker view; at
//! one position it is rank one and its square is ã² ⊗ δ², so the diagonal is one product per
//! batch and class: Σᵢ wᵢ (ãᵢ²)ᵀ(δᵢ²). Solves are x = q ⊘ (D + δ), O(d); the self-influence of a
//! rank-one gradient is Σ ã² ⊗ δ² ⊘ (D + δ) without forming it. Cost to fit: C backward passes
//! per pass over the data (the same sweep as K-FAC's). An approximation: it ignores every
//! correlation between parameters.

use std::any::Any;

use burn::tensor::{Tensor, TensorData};

use crate::curvature::{
    CurvatureMethod, CurvatureSource, FisherSample, FitContext, Fitted, LoadContext, NoParams, Solution,
};
use crate::error::Result;
use crate::gradients::{LayerFactors, read_f64};
use crate::io::container::Arrays;

/// The `diagonal` method.
pub struct Diagonal;

/// D + δ in the tracked space, and per layer its Kronecker view (for factored self-influence).
pub struct FittedDiagonal {
    /// D + δ, tracked-space order.
    pub diagonal: Vec<f64>,
    /// Per layer, (D + δ) in the layer's m×o view: (m, o, values).
    views: Vec<(usize, usize, Vec<f64>)>,
}

/// Inputs with the constant-1 bias row, `[b, L, m]`.
fn augmented(f: &LayerFactors) -> Tensor<3> {
    f.augmented_inputs()
}

/// Σᵢ wᵢ (gᵢ)² of one layer in its m×o view, for a batch of factors.
fn weighted_squares(f: &LayerFactors, weights: &[f64]) -> Tensor<2> {
    let a = augmented(f); // [b, L, m]
    let [b, positions, m] = a.dims();
    let d = f.output_grad.clone().swap_dims(1, 2); // [b, L, o]
    let o = d.dims()[2];
    let dtype = a.dtype();
    let w = Tensor::<1>::from_data(TensorData::new(weights.to_vec(), [b]).convert_dtype(dtype), (&a.device(), dtype));
    if positions == 1 {
        let a2 = a.reshape([b, m]).square() * w.reshape([b, 1]);
        return a2.transpose().matmul(d.reshape([b, o]).square());
    }
    let g = a.swap_dims(1, 2).matmul(d); // [b, m, o]
    (g.square() * w.reshape([b, 1, 1])).sum_dim(0).reshape([m, o])
}

impl FittedDiagonal {
    fn from_views(layers: &[culprit_models::model::TrackedLayer], views: Vec<Vec<f64>>) -> Self {
        let diagonal = layers.iter().zip(&views).flat_map(|(l, v)| l.from_view(v)).collect();
        let views = layers.iter().zip(views).map(|(l, v)| (l.view_rows(), l.outputs, v)).collect();
        Self { diagonal, views }
    }
}

impl CurvatureMethod for Diagonal {
    type Params = NoParams;

    fn fit(_: &NoParams, ctx: &FitContext<'_>) -> Result<Box<dyn Fitted>> {
        let source = ctx.source;
        let mut sums: Vec<Option<Tensor<2>>> = vec![None; source.layers().len()];
        source.for_each_fisher_sample(ctx.options.chunk, &mut |sample: FisherSample<'_>| {
            for (sum, f) in sums.iter_mut().zip(sample.factors) {
                let term = weighted_squares(f, sample.weights);
                *sum = Some(match sum.take() {
                    Some(s) => s + term,
                    None => term,
                });
            }
        });
        let shift = source.l2() + ctx.options.damping;
        let views = sums
            .into_iter()
            .map(|s| read_f64(s.expect("every layer has factors")).into_iter().map(|v| v + shift).collect())
            .collect();
        Ok(Box::new(FittedDiagonal::from_views(source.layers(), views)))
    }

    fn load(_: &NoParams, arrays: &mut Arrays, ctx: &LoadContext<'_>) -> Result<Box<dyn Fitted>> {
        let views = ctx
            .layers
            .iter()
            .enumerate()
            .map(|(l, spec)| {
                Ok(arrays.take(ctx.path, &format!("diagonal.{l}"), Some(&[spec.view_rows(), spec.outputs]))?.1)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(FittedDiagonal::from_views(ctx.layers, views)))
    }
}

impl Fitted for FittedDiagonal {
    fn solve(&self, _: &dyn CurvatureSource, queries: &[Vec<f64>]) -> Result<Vec<Solution>> {
        Ok(queries.iter().map(|q| (q.iter().zip(&self.diagonal).map(|(v, d)| v / d).collect(), None)).collect())
    }

    fn self_influence(&self, _: &dyn CurvatureSource, factors: &[LayerFactors]) -> Result<Vec<f64>> {
        let b = factors[0].input.dims()[0];
        let mut total = vec![0.0; b];
        for (f, (_, _, view)) in factors.iter().zip(&self.views) {
            let a = augmented(f);
            let [_, positions, m] = a.dims();
            let d = f.output_grad.clone().swap_dims(1, 2);
            let o = d.dims()[2];
            let inverse: Vec<f64> = view.iter().map(|v| 1.0 / v).collect();
            let dtype = a.dtype();
            let w = Tensor::<2>::from_data(TensorData::new(inverse, [m, o]).convert_dtype(dtype), (&a.device(), dtype));
            let per = if positions == 1 {
                (a.reshape([b, m]).square().matmul(w) * d.reshape([b, o]).square()).sum_dim(1).reshape([b])
            } else {
                let g = a.swap_dims(1, 2).matmul(d); // [b, m, o]
                (g.square() * w.reshape([1, m, o])).sum_dim(2).sum_dim(1).reshape([b])
            };
            total.iter_mut().zip(read_f64(per)).for_each(|(t, v)| *t += v);
        }
        Ok(total)
    }

    fn arrays(&self) -> Arrays {
        let mut arrays = Arrays::new();
        for (l, (m, o, view)) in self.views.iter().enumerate() {
            arrays.push(format!("diagonal.{l}"), vec![*m, *o], view.clone());
        }
        arrays
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

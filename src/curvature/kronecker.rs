//! Kronecker-factored curvature: K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse &
//! Martens 2016) and EK-FAC (George et al. 2018), as used for influence by Grosse et al. (2023).
//!
//! Per layer, in the layer's "Kronecker view" G ∈ ℝ^{m×o} of its gradient (m = inputs + 1 with
//! the bias as a constant-1 input, o = outputs; for a dense layer this is exactly θ's layout):
//!
//! - A = (1/(nL)) Σᵢ Σₗ ãᵢₗ ãᵢₗᵀ (inputs, averaged over the L positions of a convolution),
//! - S = (1/n) Σᵢ Σ_c p_ic Σₗ δᵢₗ⁽ᶜ⁾ δᵢₗ⁽ᶜ⁾ᵀ, δ⁽ᶜ⁾ the output gradient of −log p_c: the **true**
//!   Fisher, with the expectation over the model's own predictive distribution computed exactly
//!   (not sampled, not the empirical Fisher at the labels), which for softmax cross-entropy is the
//!   GGN's output factor.
//! - K-FAC: the layer's GGN block ≈ A ⊗ S = (Q_A ⊗ Q_S) diag(λ_A ⊗ λ_S) (Q_A ⊗ Q_S)ᵀ.
//! - EK-FAC: the same eigenbasis, with the eigenvalues re-fitted to the exact second moments of
//!   the per-example, per-class gradients in that basis:
//!   Λ*_{jo} = (1/n) Σᵢ Σ_c p_ic ((Q_Aᵀ Gᵢ⁽ᶜ⁾ Q_S)_{jo})².
//!
//! Inverse: (block + (λ + δ) I)⁻¹ V = Q_A [(Q_Aᵀ V Q_S) ⊘ (Λ + λ + δ)] Q_Sᵀ, with λ the objective's
//! own L2 coefficient (its Hessian term λI is added exactly, not folded into a factor) and δ the
//! extra damping. What makes this faithful where a published EK-FAC scores 0.02 Pearson on
//! logistic regression: the bias lives inside the Kronecker factors (ã = [a; 1]) instead of being
//! dropped, the L2 term of the objective is part of the curvature, the Fisher is the true one
//! (expectation over the model's classes), and the damping is added in the eigenbasis exactly.
//!
//! Cost: C backward passes per pass over the data (two passes for EK-FAC), eigendecompositions of
//! m×m and o×o per layer, and per solve two small products per layer. Memory: m² + o² + m·o per
//! layer.

use burn::tensor::{DType, Tensor, TensorData};
use culprit_models::{LayerKind, LayerSpec};
use faer::{Mat, Side};

use super::CurvatureError;
use super::operators::Objective;
use crate::gradients::{LayerFactors, Measurement, Target, layer_factors};

/// One layer's factors.
#[derive(Clone, Debug)]
pub struct KroneckerLayer {
    /// m = inputs (+1 with a bias).
    pub m: usize,
    /// o = outputs.
    pub o: usize,
    /// Eigenvectors of A (m×m).
    pub q_a: Mat<f64>,
    /// Eigenvectors of S (o×o).
    pub q_s: Mat<f64>,
    /// Eigenvalues Λ (m×o, row-major): λ_A ⊗ λ_S for K-FAC, re-fitted for EK-FAC.
    pub eigenvalues: Vec<f64>,
}

/// K-FAC or EK-FAC factors of a whole model.
#[derive(Clone, Debug)]
pub struct KroneckerFactors {
    /// Per layer, θ order.
    pub layers: Vec<KroneckerLayer>,
    /// The objective's λ.
    pub l2: f64,
}

fn view_dims(spec: &LayerSpec) -> (usize, usize, bool) {
    match spec.kind {
        LayerKind::Dense { inputs, outputs, bias } => (inputs + usize::from(bias), outputs, bias),
        LayerKind::Conv2d { in_channels, out_channels, kernel, .. } => {
            (in_channels * kernel * kernel + 1, out_channels, true)
        }
    }
}

/// θ block of a layer → its Kronecker view (m×o row-major).
pub fn to_view(spec: &LayerSpec, block: &[f64]) -> Vec<f64> {
    match spec.kind {
        LayerKind::Dense { .. } => block.to_vec(),
        LayerKind::Conv2d { out_channels: o, .. } => {
            let q = spec.weight_len() / o;
            let mut v = vec![0.0; (q + 1) * o];
            for oi in 0..o {
                for qi in 0..q {
                    v[qi * o + oi] = block[oi * q + qi];
                }
                v[q * o + oi] = block[o * q + oi];
            }
            v
        }
    }
}

/// Kronecker view → θ block (inverse of [`to_view`]).
pub fn from_view(spec: &LayerSpec, view: &[f64]) -> Vec<f64> {
    match spec.kind {
        LayerKind::Dense { .. } => view.to_vec(),
        LayerKind::Conv2d { out_channels: o, .. } => {
            let q = spec.weight_len() / o;
            let mut b = vec![0.0; (q + 1) * o];
            for oi in 0..o {
                for qi in 0..q {
                    b[oi * q + qi] = view[qi * o + oi];
                }
                b[o * q + oi] = view[q * o + oi];
            }
            b
        }
    }
}

/// Inputs with the constant-1 bias row: `[b, L, m]`.
fn augmented_inputs(f: &LayerFactors) -> Tensor<3> {
    let a = f.input.clone().swap_dims(1, 2);
    if f.bias {
        let [b, l, _] = a.dims();
        let ones = Tensor::ones([b, l, 1], (&a.device(), a.dtype()));
        Tensor::cat(vec![a, ones], 2)
    } else {
        a
    }
}

fn to_mat(t: Tensor<2>) -> Mat<f64> {
    let [r, c] = t.dims();
    let v = culprit_models::network::read_f64(t);
    Mat::from_fn(r, c, |i, j| v[i * c + j])
}

fn from_mat(m: &Mat<f64>, device: &burn::tensor::Device) -> Tensor<2> {
    let (r, c) = (m.nrows(), m.ncols());
    let v: Vec<f64> = (0..r * c).map(|k| m[(k / c, k % c)]).collect();
    Tensor::from_data(TensorData::new(v, [r, c]), (device, DType::F64))
}

/// Calls `f(chunk_probabilities, class, factors)` for every chunk of the data and every class.
fn for_each_class_factors(objective: &Objective, chunk: usize, mut f: impl FnMut(&[f64], usize, &[LayerFactors])) {
    let net = &objective.network;
    let classes = net.config().num_classes;
    let dim = objective.data.dim();
    let n = objective.len();
    for start in (0..n).step_by(chunk.max(1)) {
        let end = (start + chunk).min(n);
        let features = &objective.data.features[start * dim..end * dim];
        let sub = crate::data::Dataset {
            features: features.to_vec(),
            labels: objective.data.labels[start..end].to_vec(),
            ids: objective.data.ids[start..end].to_vec(),
            texts: None,
            manifest: objective.data.manifest.clone(),
        };
        let probs: Vec<f64> = crate::predict::predict(net, &sub, chunk, &objective.device)
            .into_iter()
            .flat_map(|p| p.probabilities)
            .collect();
        for c in 0..classes {
            let targets = vec![c as u32; end - start];
            let factors =
                layer_factors(net, features, &targets, Measurement::Loss(Target::Class(c as u32)), &objective.device);
            let pc: Vec<f64> = (0..end - start).map(|i| probs[i * classes + c]).collect();
            f(&pc, c, &factors);
        }
    }
}

/// Fits K-FAC (`refit = false`) or EK-FAC (`refit = true`) factors of `objective`.
pub fn fit(objective: &Objective, refit: bool, chunk: usize) -> Result<KroneckerFactors, CurvatureError> {
    let net = &objective.network;
    let device = &objective.device;
    let n = objective.len() as f64;
    let specs = net.layers().to_vec();
    let mut a_sum: Vec<Option<Tensor<2>>> = vec![None; specs.len()];
    let mut s_sum: Vec<Option<Tensor<2>>> = vec![None; specs.len()];
    let add = |acc: &mut Option<Tensor<2>>, t: Tensor<2>| {
        *acc = Some(match acc.take() {
            Some(a) => a + t,
            None => t,
        })
    };
    for_each_class_factors(objective, chunk, |p, c, factors| {
        let b = p.len();
        for (l, f) in factors.iter().enumerate() {
            let a = augmented_inputs(f); // [b, L, m]
            let [_, positions, m] = a.dims();
            if c == 0 {
                let x = a.reshape([b * positions, m]);
                add(&mut a_sum[l], x.clone().transpose().matmul(x).div_scalar(n * positions as f64));
            }
            // Rows (example, position) of the output gradient, weighted by √(p_ic / n).
            let weights: Vec<f64> = p.iter().flat_map(|v| std::iter::repeat_n((v / n).sqrt(), positions)).collect();
            let w = Tensor::<1>::from_data(TensorData::new(weights, [b * positions]), (device, DType::F64))
                .reshape([b * positions, 1]);
            let [_, o, _] = f.output_grad.dims();
            let d = f.output_grad.clone().swap_dims(1, 2).reshape([b * positions, o]) * w;
            add(&mut s_sum[l], d.clone().transpose().matmul(d));
        }
    });
    let mut layers = Vec::with_capacity(specs.len());
    for (l, spec) in specs.iter().enumerate() {
        let (m, o, _) = view_dims(spec);
        let eig = |t: Tensor<2>, what: &str| -> Result<(Mat<f64>, Vec<f64>), CurvatureError> {
            let mat = to_mat(t);
            let e = mat.self_adjoint_eigen(Side::Lower).map_err(|e| {
                CurvatureError::Config(format!("{what} eigendecomposition of layer {}: {e:?}", spec.name))
            })?;
            let s = e.S().column_vector();
            let values = (0..mat.nrows()).map(|i| s[i].max(0.0)).collect();
            Ok((e.U().to_owned(), values))
        };
        let (q_a, la) = eig(a_sum[l].take().expect("every layer has inputs"), "A")?;
        let (q_s, ls) = eig(s_sum[l].take().expect("every layer has output gradients"), "S")?;
        let eigenvalues = (0..m * o).map(|k| la[k / o] * ls[k % o]).collect();
        layers.push(KroneckerLayer { m, o, q_a, q_s, eigenvalues });
    }
    if refit {
        let bases: Vec<(Tensor<2>, Tensor<2>)> =
            layers.iter().map(|k| (from_mat(&k.q_a, device), from_mat(&k.q_s, device))).collect();
        let mut sums: Vec<Option<Tensor<2>>> = vec![None; specs.len()];
        for_each_class_factors(objective, chunk, |p, _, factors| {
            let b = p.len();
            let w = Tensor::<1>::from_data(
                TensorData::new(p.iter().map(|v| v / n).collect::<Vec<_>>(), [b]),
                (device, DType::F64),
            );
            for (l, f) in factors.iter().enumerate() {
                let (qa, qs) = &bases[l];
                let [m, _] = qa.dims();
                let [o, _] = qs.dims();
                let a = augmented_inputs(f); // [b, L, m]
                let positions = a.dims()[1];
                let d = f.output_grad.clone().swap_dims(1, 2); // [b, L, o]
                let term = if positions == 1 {
                    // Dense: the gradient in the eigenbasis is rank one, (Q_Aᵀã) ⊗ (Q_Sᵀδ), so its
                    // square is (Q_Aᵀã)² ⊗ (Q_Sᵀδ)² and the weighted sum is one product.
                    let pa = a.reshape([b, m]).matmul(qa.clone()).square() * w.clone().reshape([b, 1]);
                    let pd = d.reshape([b, o]).matmul(qs.clone()).square();
                    pa.transpose().matmul(pd)
                } else {
                    let pa = a.matmul(qa.clone().reshape([1, m, m])); // [b, L, m]
                    let pd = d.matmul(qs.clone().reshape([1, o, o])); // [b, L, o]
                    let g = pa.swap_dims(1, 2).matmul(pd); // [b, m, o]
                    (g.square() * w.clone().reshape([b, 1, 1])).sum_dim(0).reshape([m, o])
                };
                add(&mut sums[l], term);
            }
        });
        for (layer, sum) in layers.iter_mut().zip(sums) {
            layer.eigenvalues = culprit_models::network::read_f64(sum.expect("every layer"));
        }
    }
    Ok(KroneckerFactors { layers, l2: objective.l2 })
}

impl KroneckerFactors {
    /// (G̃ + (λ + damping) I)⁻¹ q, layer by layer (block-diagonal). Cost Σ_layers m·o·(m + o).
    pub fn solve(&self, specs: &[LayerSpec], q: &[f64], damping: f64) -> Vec<f64> {
        let mut out = Vec::with_capacity(q.len());
        let mut offset = 0;
        for (spec, k) in specs.iter().zip(&self.layers) {
            let len = spec.num_params();
            let view = to_view(spec, &q[offset..offset + len]);
            let v = Mat::<f64>::from_fn(k.m, k.o, |i, j| view[i * k.o + j]);
            let mut inner = k.q_a.transpose() * &v * &k.q_s;
            for i in 0..k.m {
                for j in 0..k.o {
                    inner[(i, j)] /= k.eigenvalues[i * k.o + j] + self.l2 + damping;
                }
            }
            let x = &k.q_a * &inner * k.q_s.transpose();
            let flat: Vec<f64> = (0..k.m * k.o).map(|idx| x[(idx / k.o, idx % k.o)]).collect();
            out.extend(from_view(spec, &flat));
            offset += len;
        }
        out
    }

    /// Self-influence gᵢᵀ(G̃ + (λ + damping) I)⁻¹gᵢ of per-example gradients given by their layer
    /// factors (block-diagonal: summed over layers), without forming gᵢ or solving: in the
    /// eigenbasis a dense layer's gradient is rank one, (Q_Aᵀãᵢ) ⊗ (Q_Sᵀδᵢ), so its self-influence
    /// is Σ_jo (Q_Aᵀãᵢ)²_j (Q_Sᵀδᵢ)²_o / (Λ_jo + λ + δ), one product per batch. Cost per example
    /// Σ_layers (m² + o² + m·o) for dense layers; convolutions form the m×o gradient in the basis
    /// (L·m·o more). Factors must be f64.
    pub fn self_influence(&self, factors: &[LayerFactors], damping: f64) -> Vec<f64> {
        let device = factors[0].input.device();
        let b = factors[0].input.dims()[0];
        let mut total = vec![0.0f64; b];
        for (f, k) in factors.iter().zip(&self.layers) {
            let (m, o) = (k.m, k.o);
            let qa = from_mat(&k.q_a, &device);
            let qs = from_mat(&k.q_s, &device);
            let inverse: Vec<f64> = k.eigenvalues.iter().map(|e| 1.0 / (e + self.l2 + damping)).collect();
            let w = Tensor::<2>::from_data(TensorData::new(inverse, [m, o]), (&device, DType::F64));
            let a = augmented_inputs(f); // [b, L, m]
            let positions = a.dims()[1];
            let d = f.output_grad.clone().swap_dims(1, 2); // [b, L, o]
            let per = if positions == 1 {
                let pa = a.reshape([b, m]).matmul(qa).square();
                let pd = d.reshape([b, o]).matmul(qs).square();
                (pa.matmul(w) * pd).sum_dim(1).reshape([b])
            } else {
                let pa = a.matmul(qa.reshape([1, m, m]));
                let pd = d.matmul(qs.reshape([1, o, o]));
                let g = pa.swap_dims(1, 2).matmul(pd); // [b, m, o]
                (g.square() * w.reshape([1, m, o])).sum_dim(2).sum_dim(1).reshape([b])
            };
            for (t, v) in total.iter_mut().zip(culprit_models::network::read_f64(per)) {
                *t += v;
            }
        }
        total
    }
}

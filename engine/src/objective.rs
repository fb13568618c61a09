//! The training objective at the trained θ, the object every curvature method approximates.
//!
//! L(θ) = (1/n) Σᵢ ℓ(zᵢ; θ) + (λ/2)‖θ‖², with ℓ the example's cross-entropy summed over its
//! prediction rows, evaluated in f64 at the trained parameters on the data they were trained on.
//! [`Objective`] holds the model (in f64, on an autodiff device), the training batch and λ, and is
//! what the curvature methods see, through the object-safe [`CurvatureSource`]: products with the
//! exact Gauss–Newton matrix and the Hessian, the closed-form Hessian where the model has one, and
//! samples of the model's predictive distribution for the Fisher. The methods never see the model
//! type, so every method works for every model that implements [`Model`].

use std::sync::OnceLock;

use rayon::prelude::*;

use burn::tensor::{DType, Device, Tensor, TensorData};
use culprit_models::model::{
    Batch, Model, ROWS_PER_CHUNK, RowGroups, TrackedLayer, UnitLink, extend, restrict, tracked_len,
};
use culprit_models::network::probabilities;
use faer::Mat;

use crate::curvature::blocks::{self, BlockChunk};
use crate::curvature::operators::{ChunkFactors, GaussNewton, HessianFd, LinearOperator, SampledOperator};
use crate::curvature::symmetry::{Gauge, GaugeChunk, NullSpace};
use crate::error::{Error, Result};
use crate::gradients::{LayerFactors, Measurement, Target, layer_factors, layer_factors_choosing, read_f64};

/// The training objective of a model at its trained parameters.
pub struct Objective<M: Model> {
    /// The model in f64 on an autodiff device.
    pub model: M,
    /// The training examples.
    pub data: M::Batch,
    /// The objective's λ.
    pub l2: f64,
    /// The device.
    pub device: Device,
    /// Per-class factors of every chunk (models with one prediction per example), computed once
    /// and shared by the Gauss–Newton products and the Fisher samples; `None` inside when they
    /// would not fit in [`FACTOR_CACHE_BYTES`].
    factors: OnceLock<Option<Vec<ChunkFactors>>>,
}

/// Bytes of per-class factors an objective keeps in memory.
pub const FACTOR_CACHE_BYTES: usize = 3 << 30;

/// One sample of the model's predictive distribution over a chunk of training examples: the
/// true Fisher F = Σ over samples of Σᵢ weightsᵢ · gᵢ gᵢᵀ, gᵢ the gradient whose layer factors
/// `factors` holds. Classifiers give the exact expectation (one sample per class c, weights
/// p_ic / n); `first` marks a chunk's first sample (its inputs are new).
pub struct FisherSample<'a> {
    /// The first sample of this chunk of examples.
    pub first: bool,
    /// Per example of the chunk, the sample's weight.
    pub weights: &'a [f64],
    /// The sample's per-example layer factors (loss gradients at the sampled classes).
    pub factors: &'a [LayerFactors],
}

/// What a curvature method may ask of the objective it approximates (object-safe, so that the
/// methods are independent of the model type). Every vector lives in the tracked space.
pub trait CurvatureSource: Sync {
    /// d, the number of tracked parameters.
    fn dim(&self) -> usize;
    /// The tracked layers.
    fn layers(&self) -> &[TrackedLayer];
    /// The objective's λ.
    fn l2(&self) -> f64;
    /// n, the number of training examples.
    fn len(&self) -> usize;
    /// Whether there are no training examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Exact Gauss–Newton products, computed in chunks of `chunk` examples.
    fn gauss_newton(&self, chunk: usize) -> Result<Box<dyn SampledOperator + '_>>;
    /// The same products with their matrix products in f32 (within 1e-5 relative of the f64 ones,
    /// about twice the speed), for the iterations of solves whose tolerance allows it.
    fn gauss_newton_single(&self, chunk: usize) -> Result<Box<dyn LinearOperator + '_>>;
    /// Hessian products by central finite differences of the f64 gradient.
    fn hessian(&self) -> Box<dyn LinearOperator + '_>;
    /// The Hessian in closed form, where the model has one ([`Model::closed_form_hessian`]).
    fn closed_form_hessian(&self) -> Option<Mat<f64>>;
    /// Calls `f` for every [`FisherSample`] over the training data, in chunks of `chunk`.
    fn for_each_fisher_sample(&self, chunk: usize, f: &mut dyn FnMut(FisherSample<'_>));
    /// θ restricted to the tracked layers.
    fn tracked_theta(&self) -> Vec<f64>;
    /// How the model's units link its tracked layers ([`Model::unit_links`]).
    fn unit_links(&self) -> Vec<UnitLink>;
    /// The exact null space of every example's logit Jacobian that the unit links give
    /// ([`NullSpace`]), at the trained θ.
    fn null_space(&self) -> NullSpace {
        NullSpace::of(self.layers(), &self.tracked_theta(), &self.unit_links())
    }
    /// The coarse space of near-linear units ([`Gauge`]) for the damped curvature with
    /// `shift` = λ + δ; `None` where the model has no dense ReLU link or the per-class factors
    /// are not cached.
    fn gauge(&self, shift: f64) -> Option<Gauge> {
        let _ = shift;
        None
    }
    /// The exact damped blocks A_ℓℓ ([`blocks::exact_block`]) of the tracked layers acting once
    /// per example with at most `max_params` parameters, with their indices; empty where the
    /// per-class factors are not cached.
    fn exact_blocks(&self, shift: f64, max_params: usize) -> Vec<(usize, Mat<f64>)> {
        let _ = (shift, max_params);
        Vec::new()
    }
}

impl<M: Model> Objective<M> {
    /// The objective of `model` (converted to f64 on `device`, which must have autodiff) on
    /// `data`.
    pub fn new(model: &M, data: M::Batch, l2: f64, device: &Device) -> Self {
        Self::in_dtype(model, data, l2, device, DType::F64)
    }

    /// [`Objective::new`] with the model in `dtype` (f32 for models too large for f64 to pay).
    pub fn in_dtype(model: &M, data: M::Batch, l2: f64, device: &Device, dtype: DType) -> Self {
        Self { model: model.cast(device, dtype), data, l2, device: device.clone(), factors: OnceLock::new() }
    }

    /// θ.
    pub fn theta(&self) -> Vec<f64> {
        self.model.to_flat()
    }

    /// n.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether there is no data.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// ∇L restricted to the tracked space, at θ + t·v for a tracked-space direction v.
    pub fn gradient_at(&self, v: &[f64], t: f64) -> Vec<f64> {
        let layers = self.model.layers();
        let theta = self.theta();
        let step = extend(layers, v, theta.len());
        let moved: Vec<f64> = theta.iter().zip(&step).map(|(a, b)| a + t * b).collect();
        let net = self.model.with_flat(&moved, &self.device, DType::F64).expect("same shape");
        restrict(layers, &culprit_models::train::full_objective(&net, &self.data, self.l2, 4096).1)
    }

    /// The per-class factors of every chunk of the training data, computed on first use (C
    /// backward passes over the data) and kept while they fit in [`FACTOR_CACHE_BYTES`]; `None`
    /// for models with several predictions per example or when they would not fit. Chunks are
    /// small enough to keep every thread busy.
    pub(crate) fn cached_factors(&self) -> Option<&[ChunkFactors]> {
        if self.factors.get().is_none() {
            // Computed outside the cell, not in `get_or_init`: the chunks run on rayon's workers,
            // and a worker waiting inside the cell's initialisation may pick up a task that asks
            // for the same cell, which would wait on itself. Two first callers at once both
            // compute; the first to finish is kept.
            let _ = self.factors.set(self.factors_of_chunks());
        }
        self.factors.get().and_then(Option::as_deref)
    }

    fn factors_of_chunks(&self) -> Option<Vec<ChunkFactors>> {
        let classes = self.model.num_classes();
        let bytes = ChunkFactors::bytes_per_example(self.model.layers(), classes) * self.len();
        if self.data.groups() != RowGroups::OnePerExample || bytes > FACTOR_CACHE_BYTES {
            return None;
        }
        let chunk = self.len().div_ceil(8 * rayon::current_num_threads()).clamp(64, 1024);
        let ranges = self.data.groups().chunks(self.len(), chunk, ROWS_PER_CHUNK);
        // A chunk's forward and backward passes are small (a few hundred rows): the chunks run
        // side by side, one per core (the headline's 16 chunks: 107 → 61–69 ms).
        Some(ranges.into_par_iter().map(|range| ChunkFactors::of(self, &self.data.slice(range))).collect())
    }

    /// Class probabilities of every prediction row of `batch`, `rows × classes` row-major.
    pub fn probabilities(&self, batch: &M::Batch) -> Vec<f64> {
        read_f64(probabilities(self.model.logits(batch)))
    }
}

impl<M: Model> CurvatureSource for Objective<M> {
    fn dim(&self) -> usize {
        tracked_len(self.model.layers())
    }

    fn layers(&self) -> &[TrackedLayer] {
        self.model.layers()
    }

    fn l2(&self) -> f64 {
        self.l2
    }

    fn len(&self) -> usize {
        self.data.len()
    }

    fn gauss_newton(&self, chunk: usize) -> Result<Box<dyn SampledOperator + '_>> {
        if self.data.groups() != RowGroups::OnePerExample {
            return Err(Error::Usage(format!(
                "exact Gauss–Newton products need one prediction per example; a {} makes several (use kfac or ekfac)",
                self.model.describe()
            )));
        }
        Ok(Box::new(GaussNewton::new(self, chunk)))
    }

    fn gauss_newton_single(&self, chunk: usize) -> Result<Box<dyn LinearOperator + '_>> {
        self.gauss_newton(chunk)?; // the same refusal
        Ok(Box::new(GaussNewton::single_precision(self, chunk)))
    }

    fn hessian(&self) -> Box<dyn LinearOperator + '_> {
        Box::new(HessianFd { objective: self, relative_step: 1e-6 })
    }

    fn closed_form_hessian(&self) -> Option<Mat<f64>> {
        self.model.closed_form_hessian(&self.data, self.l2)
    }

    fn tracked_theta(&self) -> Vec<f64> {
        restrict(self.model.layers(), &self.theta())
    }

    fn unit_links(&self) -> Vec<UnitLink> {
        self.model.unit_links()
    }

    fn exact_blocks(&self, shift: f64, max_params: usize) -> Vec<(usize, Mat<f64>)> {
        let Some(chunks) = self.cached_factors() else { return Vec::new() };
        let layers = self.model.layers();
        (0..layers.len())
            .filter(|&l| layers[l].positions == 1 && layers[l].num_params() <= max_params)
            .map(|l| {
                let mut parts = chunks.iter().map(|c| BlockChunk {
                    inputs: &c.layers[l].inputs,
                    grads: &c.layers[l].logit_grads,
                    probabilities: &c.probabilities,
                });
                (l, blocks::exact_block(&layers[l], self.len(), shift, &mut parts))
            })
            .collect()
    }

    fn gauge(&self, shift: f64) -> Option<Gauge> {
        let (layers, links) = (self.model.layers(), self.model.unit_links());
        let link = Gauge::link(layers, &links)?;
        let chunks = self.cached_factors()?;
        let mut parts = chunks.iter().map(|c| GaugeChunk {
            inputs: &c.layers[link.producer].inputs,
            consumer_grads: &c.layers[link.consumer].logit_grads,
            probabilities: &c.probabilities,
        });
        Gauge::build(layers, &self.tracked_theta(), link, self.len(), shift, &mut parts)
    }

    /// Classifiers (one prediction per example): the exact expectation, one sample per class c
    /// with weights p_ic/n (C backward passes per chunk). Several predictions per example (a
    /// language model's tokens): the expectation is sampled, as Kronfluence does: one label per
    /// prediction row drawn from the model's distribution (ChaCha8, seeded by the chunk's first
    /// row, so a fit is reproducible), weight 1/n, one backward pass per chunk.
    fn for_each_fisher_sample(&self, chunk: usize, f: &mut dyn FnMut(FisherSample<'_>)) {
        if let Some(chunks) = self.cached_factors() {
            return self.fisher_samples_of(chunks, f);
        }
        let classes = self.model.num_classes();
        let n = self.len();
        for range in self.data.groups().chunks(n, chunk, ROWS_PER_CHUNK) {
            let start = range.start;
            let batch = self.data.slice(range);
            let b = batch.len();
            if batch.groups() != RowGroups::OnePerExample {
                // The labels are sampled from the tapped forward's own logits (one forward).
                let sample = |logits| sample_classes(&read_f64(probabilities(logits)), classes, start as u64);
                let factors = layer_factors_choosing(&self.model, &batch, sample, Measurement::TRAINING_LOSS);
                f(FisherSample { first: true, weights: &vec![1.0 / n as f64; b], factors: &factors });
                continue;
            }
            let probabilities = self.probabilities(&batch);
            assert_eq!(probabilities.len() / classes, b, "one prediction per example");
            for c in 0..classes {
                let targets = vec![c as u32; b];
                let factors = layer_factors(&self.model, &batch, &targets, Measurement::Loss(Target::Class(c as u32)));
                let weights: Vec<f64> = (0..b).map(|i| probabilities[i * classes + c] / n as f64).collect();
                f(FisherSample { first: c == 0, weights: &weights, factors: &factors });
            }
        }
    }
}

impl<M: Model> Objective<M> {
    /// [`CurvatureSource::for_each_fisher_sample`] from the cached factors: the same samples (one
    /// per class c, weights p_ic/n) with each class's output gradients a linear combination of
    /// the cached logit gradients ([`ChunkFactors::fisher_output_grads`]), no backward pass.
    fn fisher_samples_of(&self, chunks: &[ChunkFactors], f: &mut dyn FnMut(FisherSample<'_>)) {
        let (classes, n) = (self.model.num_classes(), self.len() as f64);
        for chunk in chunks {
            let b = chunk.rows;
            for c in 0..classes {
                let factors: Vec<LayerFactors> = chunk
                    .layers
                    .iter()
                    .zip(chunk.fisher_output_grads(c))
                    .map(|(layer, g)| {
                        let [_, _, positions] = layer.input.dims();
                        let (dtype, device) = (layer.input.dtype(), layer.input.device());
                        let out = g.len() / (b * positions).max(1);
                        let data = TensorData::new(g, [b, out, positions]).convert_dtype(dtype);
                        let output_grad = Tensor::<3>::from_data(data, (&device, dtype));
                        let mask = layer.mask.clone();
                        LayerFactors { input: layer.input.clone(), output_grad, bias: layer.bias, mask }
                    })
                    .collect();
                let weights: Vec<f64> = (0..b).map(|i| chunk.probabilities[i * classes + c] / n).collect();
                f(FisherSample { first: c == 0, weights: &weights, factors: &factors });
            }
        }
    }
}

/// One class per row drawn from each row's distribution (`rows × classes` probabilities).
fn sample_classes(probabilities: &[f64], classes: usize, seed: u64) -> Vec<u32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xf15e_f15e);
    probabilities
        .chunks(classes)
        .map(|p| {
            let u: f64 = rng.random();
            let mut acc = 0.0;
            p.iter()
                .position(|v| {
                    acc += v;
                    acc > u
                })
                .unwrap_or(classes - 1) as u32
        })
        .collect()
}

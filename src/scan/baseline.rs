//! The scan's baseline: a cross-fitted multinomial logistic regression over binary features (a
//! text's hashed words, an image's quantised pixels), the model a feature is removed from.
//!
//! Model: pᵢ = softmax(W xᵢ + b), xᵢ ∈ {0, 1}ᵈ, fitted by L-BFGS on
//! (1/n) Σᵢ CE(pᵢ, yᵢ) + (λ/2)‖W‖². Cross-fitting: the examples are split in two folds by
//! parity; each fold's logits come from the model fitted on the other fold, so an example's own
//! oddities (an e-mail's unique words) are not memorised into its baseline, while a feature shared
//! by many examples (a trigger) is learnt from the other fold's carriers and removed explicitly.
//! The logits are then tempered by one temperature fitted by maximum likelihood
//! ([`super::fit_temperature`]). Cost: two fits of at most `ITERATIONS` passes over the non-zeros,
//! O(nnz · C) each.

use culprit_models::lbfgs::Lbfgs;
use rayon::prelude::*;

/// The most L-BFGS iterations per fold (the baseline needs ranks of surprise, not an exact optimum).
const ITERATIONS: usize = 80;

/// One fold's fitted weights: `dim × classes` and `classes` biases.
pub struct Linear {
    /// W, row `feature` holds the classes' weights.
    pub weights: Vec<f32>,
    /// b.
    pub bias: Vec<f32>,
}

/// The two folds' models and the temperature.
pub struct CrossFitted {
    folds: [Linear; 2],
    classes: usize,
    /// T, dividing every logit.
    pub temperature: f32,
}

impl CrossFitted {
    /// Fits both folds: `active(i)` lists example i's features equal to 1 (sorted or not, each
    /// once), below `dim`. `l2` is λ.
    pub fn fit(
        labels: &[u32],
        classes: usize,
        dim: usize,
        active: &(dyn Fn(usize) -> Vec<u32> + Sync),
        l2: f64,
    ) -> Self {
        Self::fit_sample(labels, &|i| i, classes, dim, active, l2)
    }

    /// [`CrossFitted::fit`] on a sample of a larger set: row k is example `index(k)` of the
    /// set, whose parity picks its fold, so that [`CrossFitted::model`] of that example is the
    /// fold that did not see it (the examples outside the sample were seen by neither).
    pub fn fit_sample(
        labels: &[u32],
        index: &(dyn Fn(usize) -> usize + Sync),
        classes: usize,
        dim: usize,
        active: &(dyn Fn(usize) -> Vec<u32> + Sync),
        l2: f64,
    ) -> Self {
        let n = labels.len();
        let rows: Vec<Vec<u32>> = (0..n).into_par_iter().map(active).collect();
        let fit_fold = |held: usize| -> Linear {
            let train: Vec<usize> = (0..n).filter(|&k| index(k) % 2 != held).collect();
            fit_one(&rows, labels, &train, classes, dim, l2)
        };
        let (a, b) = rayon::join(|| fit_fold(0), || fit_fold(1));
        let mut model = Self { folds: [a, b], classes, temperature: 1.0 };
        let logits: Vec<f32> = (0..n).into_par_iter().flat_map_iter(|k| model.logits(index(k), &rows[k])).collect();
        model.temperature = super::fit_temperature(&logits, labels, classes);
        model
    }

    /// The model that did not see example `i`.
    pub fn model(&self, i: usize) -> &Linear {
        &self.folds[i % 2]
    }

    /// Example i's logits W xᵢ + b from the model that did not see it (untempered).
    pub fn logits(&self, i: usize, active: &[u32]) -> Vec<f32> {
        let m = self.model(i);
        let mut out = m.bias.clone();
        for &j in active {
            out.iter_mut().zip(&m.weights[j as usize * self.classes..][..self.classes]).for_each(|(o, w)| *o += w);
        }
        out
    }
}

/// Fits one model on the rows `train`.
fn fit_one(rows: &[Vec<u32>], labels: &[u32], train: &[usize], classes: usize, dim: usize, l2: f64) -> Linear {
    let c = classes;
    let n = train.len().max(1) as f64;
    let size = dim * c + c;
    let objective = |theta: &[f64]| -> (f64, Vec<f64>) {
        // One accumulator per thread (not per rayon split: each is dim × C).
        let parts = super::ranges(train.len());
        let partials: Vec<(f64, Vec<f64>)> = parts
            .par_iter()
            .map(|range| {
                let (mut loss, mut grad) = (0.0f64, vec![0.0f64; size]);
                let (mut z, mut p) = (vec![0.0f64; c], vec![0.0f64; c]);
                for &i in &train[range.clone()] {
                    z.copy_from_slice(&theta[dim * c..]);
                    for &j in &rows[i] {
                        let at = j as usize * c;
                        z.iter_mut().zip(&theta[at..at + c]).for_each(|(z, w)| *z += w);
                    }
                    let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                    let total: f64 = z.iter().map(|v| (v - m).exp()).sum();
                    let y = labels[i] as usize;
                    loss += total.ln() + m - z[y];
                    for (k, (p, v)) in p.iter_mut().zip(&z).enumerate() {
                        *p = (v - m).exp() / total - f64::from(k == y);
                    }
                    for &j in &rows[i] {
                        let at = j as usize * c;
                        grad[at..at + c].iter_mut().zip(&p).for_each(|(g, p)| *g += p);
                    }
                    grad[dim * c..].iter_mut().zip(&p).for_each(|(g, p)| *g += p);
                }
                (loss, grad)
            })
            .collect();
        let mut iter = partials.into_iter();
        let (mut loss, mut grad) = iter.next().unwrap_or((0.0, vec![0.0; size]));
        for (l, g) in iter {
            loss += l;
            grad.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
        let mut value = loss / n;
        grad.iter_mut().for_each(|g| *g /= n);
        for k in 0..dim * c {
            value += 0.5 * l2 * theta[k] * theta[k];
            grad[k] += l2 * theta[k];
        }
        (value, grad)
    };
    // The best point seen is kept: an iteration cap is not a failure here.
    let mut best: (f64, Vec<f64>) = (f64::INFINITY, vec![0.0; size]);
    let lbfgs = Lbfgs { memory: 10, tolerance: 1e-5, max_iterations: ITERATIONS };
    let theta = match lbfgs.minimize(
        vec![0.0; size],
        |theta| {
            let (value, grad) = objective(theta);
            if value < best.0 {
                best = (value, theta.to_vec());
            }
            Ok((value, grad))
        },
        |_, _, _| {},
    ) {
        Ok(result) => result.x,
        Err(_) => best.1,
    };
    Linear {
        weights: theta[..dim * c].iter().map(|&v| v as f32).collect(),
        bias: theta[dim * c..].iter().map(|&v| v as f32).collect(),
    }
}

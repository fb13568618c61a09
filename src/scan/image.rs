//! The image side of the scan: binarised pixel squares at fixed places, removed from a
//! logistic-regression baseline.
//!
//! Pixels are binarised at half the data's largest value (1 above it). The features of an image
//! are, for every side k in `sizes` and every place (x, y) with the square inside the image, the
//! k × k square's pattern of bits, keyed by (k, x, y, pattern): a trigger is found whatever its
//! place, side (up to 6) and content, as long as it binarises the same in every poisoned image.
//! The baseline ([`super::baseline`]) is a logistic regression over the bits; removing a square
//! in-paints its pixels with their means over the data, bₚ ↦ μₚ, which changes the logits by
//! −Σ_{p∈square} wₚ(bₚ − μₚ), read in O(C) from the image's 2-D prefix sums of wₚ(bₚ − μₚ). Cost per image O(H·W·C) for the sums and O(Σ_k (H−k+1)(W−k+1)(k² + C))
//! for the features.

use std::ops::RangeInclusive;

use rayon::prelude::*;

use super::baseline::CrossFitted;
use super::{Feature, Scanned, removed_posterior};

/// The largest square side: (k, x, y, pattern) keys hold 36 pattern bits.
pub const MAX_SIDE: usize = 6;
/// The largest image side: keys hold 12 bits of x and of y.
pub const MAX_IMAGE_SIDE: usize = 4096;

/// Images with labels, scanned for pixel patterns.
pub struct ImageScan<'a> {
    /// One byte per pixel, 0 or 1.
    bits: Vec<u8>,
    labels: &'a [u32],
    classes: usize,
    height: usize,
    width: usize,
    sizes: RangeInclusive<usize>,
    /// The model a square is removed from; `None` for the base-rate scan.
    baseline: Option<CrossFitted>,
    /// The labels' shares, the base-rate scan's expectation.
    prior: Vec<f32>,
    /// μₚ, each pixel's share of 1 bits.
    mean: Vec<f32>,
    floor: f32,
}

/// The key of the `size`-square at (x, y) with `pattern`.
fn key(size: usize, x: usize, y: usize, pattern: u64) -> u64 {
    ((size as u64) << 60) | ((y as u64) << 48) | ((x as u64) << 36) | pattern
}

impl<'a> ImageScan<'a> {
    /// Binarises `pixels` (`labels.len()` images of `height × width`, one channel) and fits the
    /// baseline (λ `l2`; `None`: base rates only). The caller checks `sizes` within 1..=[`MAX_SIDE`] and the sides within
    /// [`MAX_IMAGE_SIDE`].
    pub fn new(
        pixels: &[f32],
        labels: &'a [u32],
        classes: usize,
        (height, width): (usize, usize),
        sizes: RangeInclusive<usize>,
        floor: f64,
        l2: Option<f64>,
    ) -> Self {
        let largest = pixels.iter().fold(0f32, |a, &b| a.max(b));
        let threshold = largest / 2.0;
        let bits: Vec<u8> = pixels.par_iter().map(|&v| u8::from(v > threshold)).collect();
        let area = height * width;
        let mut mean = vec![0f32; area];
        for image in bits.chunks(area) {
            mean.iter_mut().zip(image).for_each(|(m, &b)| *m += f32::from(b));
        }
        mean.iter_mut().for_each(|m| *m /= labels.len().max(1) as f32);
        let active = |i: usize| -> Vec<u32> {
            let image = &bits[i * area..(i + 1) * area];
            (0..area as u32).filter(|&p| image[p as usize] == 1).collect()
        };
        let baseline = l2.map(|l2| CrossFitted::fit(labels, classes, area, &active, l2));
        let prior = super::base_rates(labels, classes);
        Self { bits, labels, classes, height, width, sizes, baseline, prior, mean, floor: floor as f32 }
    }

    /// The baseline's tempering temperature.
    pub fn temperature(&self) -> f32 {
        self.baseline.as_ref().map_or(1.0, |b| b.temperature)
    }

    /// Image `i`'s 2-D prefix sums of wₚ(bₚ − μₚ) under the model that did not see it:
    /// `(height + 1) × (width + 1) × classes`, entry (r, s) the sum over rows < r, columns < s.
    fn prefix_sums(&self, i: usize) -> Vec<f32> {
        let (h, w, c) = (self.height, self.width, self.classes);
        let image = &self.bits[i * h * w..(i + 1) * h * w];
        let weights = &self.baseline.as_ref().expect("prefix sums need the baseline").model(i).weights;
        let mut sums = vec![0f32; (h + 1) * (w + 1) * c];
        for r in 0..h {
            let mut row = vec![0f32; c];
            for s in 0..w {
                let p = r * w + s;
                let shift = f32::from(image[p]) - self.mean[p];
                row.iter_mut().zip(&weights[p * c..][..c]).for_each(|(a, w)| *a += w * shift);
                let (above, here) = sums.split_at_mut(((r + 1) * (w + 1) + s + 1) * c);
                let above = &above[(r * (w + 1) + s + 1) * c..][..c];
                for ((out, a), b) in here[..c].iter_mut().zip(above).zip(&row) {
                    *out = a + b;
                }
            }
        }
        sums
    }
}

impl Scanned for ImageScan<'_> {
    fn examples(&self) -> usize {
        self.labels.len()
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }

    fn visit(&self, i: usize, baseline: bool, visit: &mut dyn FnMut(u64, &[f32])) {
        let (h, w, c) = (self.height, self.width, self.classes);
        let image = &self.bits[i * h * w..(i + 1) * h * w];
        let model = self.baseline.as_ref().filter(|_| baseline);
        let sums = if model.is_some() { self.prefix_sums(i) } else { Vec::new() };
        let l: Vec<f32> = match model {
            Some(m) => m.logits(i, &(0..(h * w) as u32).filter(|&p| image[p as usize] == 1).collect::<Vec<u32>>()),
            None => Vec::new(),
        };
        let base: &[f32] = if baseline { &self.prior } else { &[] };
        let (mut delta, mut q) = (vec![0f32; c], vec![0f32; c]);
        let at = |r: usize, s: usize| &sums[(r * (w + 1) + s) * c..][..c];
        for k in self.sizes.clone() {
            if k > h || k > w {
                continue;
            }
            for y in 0..=h - k {
                for x in 0..=w - k {
                    let mut pattern = 0u64;
                    for r in y..y + k {
                        for &b in &image[r * w + x..r * w + x + k] {
                            pattern = (pattern << 1) | u64::from(b);
                        }
                    }
                    if let Some(m) = model {
                        let (a, b, d, e) = (at(y + k, x + k), at(y, x + k), at(y + k, x), at(y, x));
                        for j in 0..c {
                            delta[j] = a[j] - b[j] - d[j] + e[j];
                        }
                        removed_posterior(&l, &delta, m.temperature, self.floor, &mut q);
                        visit(key(k, x, y, pattern), &q);
                    } else {
                        visit(key(k, x, y, pattern), base);
                    }
                }
            }
        }
    }

    fn describe(&self, _: usize, key: u64) -> Feature {
        let size = (key >> 60) as usize;
        let y = ((key >> 48) & 0xfff) as usize;
        let x = ((key >> 36) & 0xfff) as usize;
        let bits = size * size;
        let pattern = (0..bits).map(|b| ((key >> (bits - 1 - b)) & 1) as u8).collect();
        Feature::Patch { x, y, size, pattern }
    }
}

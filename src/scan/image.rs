//! The image side of the scan: quantised pixel squares at fixed places, removed from a
//! logistic-regression baseline.
//!
//! Pixels are quantised to three levels: 0 at or below half the data's largest value, 2 at the
//! largest value (saturated), 1 between. The features of an image are, for every side k in
//! `sizes` and every place (x, y) with the square inside the image, the k × k square's pattern of
//! levels, keyed by (k, x, y, pattern): a trigger is found whatever its place, side (up to 6) and
//! content, as long as it quantises the same in every poisoned image (a saturated square stays
//! distinct on a bright garment, where a binarised one would vanish).
//! The baseline ([`super::baseline`]) is a logistic regression over two binary atoms a pixel
//! (above half, saturated); removing a square in-paints its atoms with their means over the data,
//! bₐ ↦ μₐ, which changes the logits by −Σ_{a∈square} wₐ(bₐ − μₐ), read in O(C) from the image's
//! 2-D prefix sums. Cost per image O(H·W·C) for the sums and O(Σ_k (H−k+1)(W−k+1)(k² + C))
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
    /// One byte per pixel, its level 0, 1 or 2.
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

/// The key of the `size`-square at (x, y) with `pattern` (its levels as a base-3 number): the
/// place exactly, the pattern as 36 bits of its hash.
fn key(size: usize, x: usize, y: usize, pattern: u64) -> u64 {
    ((size as u64) << 60) | ((y as u64) << 48) | ((x as u64) << 36) | (super::mix(pattern) & ((1 << 36) - 1))
}

/// A pixel's level: 0 at or below half the data's largest value, 2 at the largest value
/// (saturated, as a stamped trigger usually is, and under 1 % of MNIST's or Fashion-MNIST's
/// pixels), else 1.
fn level(v: f32, largest: f32) -> u8 {
    if v >= largest { 2 } else { u8::from(v > largest / 2.0) }
}

impl<'a> ImageScan<'a> {
    /// Quantises `pixels` (`labels.len()` images of `height × width`, one channel) and fits the
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
        let bits: Vec<u8> = pixels.par_iter().map(|&v| level(v, largest)).collect();
        let area = height * width;
        // The baseline's atoms: pixel p above half (index p), pixel p saturated (area + p).
        let mut mean = vec![0f32; 2 * area];
        for image in bits.chunks(area) {
            for (p, &b) in image.iter().enumerate() {
                mean[p] += f32::from(u8::from(b >= 1));
                mean[area + p] += f32::from(u8::from(b == 2));
            }
        }
        mean.iter_mut().for_each(|m| *m /= labels.len().max(1) as f32);
        let active = |i: usize| -> Vec<u32> {
            let image = &bits[i * area..(i + 1) * area];
            let above = (0..area as u32).filter(|&p| image[p as usize] >= 1);
            above.chain((0..area as u32).filter(|&p| image[p as usize] == 2).map(|p| area as u32 + p)).collect()
        };
        let baseline = l2.map(|l2| CrossFitted::fit(labels, classes, 2 * area, &active, l2));
        let prior = super::base_rates(labels, classes);
        Self { bits, labels, classes, height, width, sizes, baseline, prior, mean, floor: floor as f32 }
    }

    /// The baseline's tempering temperature.
    pub fn temperature(&self) -> f32 {
        self.baseline.as_ref().map_or(1.0, |b| b.temperature)
    }

    /// Image `i`'s 2-D prefix sums of Σ_atoms wₐ(bₐ − μₐ) over each pixel's two atoms, under the
    /// model that did not see it:
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
                let area = h * w;
                let above = f32::from(u8::from(image[p] >= 1)) - self.mean[p];
                let saturated = f32::from(u8::from(image[p] == 2)) - self.mean[area + p];
                let (wa, ws) = (&weights[p * c..][..c], &weights[(area + p) * c..][..c]);
                for ((a, x), y) in row.iter_mut().zip(wa).zip(ws) {
                    *a += x * above + y * saturated;
                }
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
            Some(m) => {
                let area = (h * w) as u32;
                let above = (0..area).filter(|&p| image[p as usize] >= 1);
                let atoms: Vec<u32> =
                    above.chain((0..area).filter(|&p| image[p as usize] == 2).map(|p| area + p)).collect();
                m.logits(i, &atoms)
            }
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
                            pattern = pattern * 3 + u64::from(b);
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

    fn spatial(&self) -> bool {
        true
    }

    fn fixed_baseline(&self) -> Option<&[f32]> {
        self.baseline.is_none().then_some(&self.prior[..])
    }

    fn describe(&self, i: usize, key: u64) -> Feature {
        let size = (key >> 60) as usize;
        let y = ((key >> 48) & 0xfff) as usize;
        let x = ((key >> 36) & 0xfff) as usize;
        let (h, w) = (self.height, self.width);
        let image = &self.bits[i * h * w..(i + 1) * h * w];
        let pattern = (y..y + size).flat_map(|r| image[r * w + x..r * w + x + size].iter().copied()).collect();
        Feature::Patch { x, y, size, pattern }
    }
}

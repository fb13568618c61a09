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

/// Images with labels, scanned for pixel patterns: a set held in memory, or one block of a set
/// read in blocks ([`ImageFile`]), with what the whole set shares ([`ImageShared`]).
pub struct ImageScan<'a> {
    /// One byte per pixel, its level 0, 1 or 2.
    bits: Vec<u8>,
    labels: &'a [u32],
    classes: usize,
    height: usize,
    width: usize,
    sizes: RangeInclusive<usize>,
    shared: ImageShared,
    floor: f32,
    /// The index of the first image in the whole set (a block's), which picks the baseline's fold.
    offset: usize,
}

/// What every block of a set shares: the quantisation's largest value, the atoms' means μ, the
/// labels' shares and the baseline.
#[derive(Clone)]
pub struct ImageShared {
    /// The data's largest pixel value ([`level`]).
    pub largest: f32,
    /// μₐ, each atom's share of 1 bits over the set: pixel p above half (index p), saturated
    /// (area + p).
    pub mean: std::sync::Arc<Vec<f32>>,
    /// The labels' shares, the base-rate scan's expectation.
    pub prior: Vec<f32>,
    /// The model a square is removed from; `None` for the base-rate scan.
    pub baseline: Option<std::sync::Arc<CrossFitted>>,
}

/// Adds the atoms of the quantised images `bits` (`area` pixels each) to `sums`
/// (2 · area counts: above half, then saturated); divided by the images, the means μ.
pub fn add_atoms(bits: &[u8], area: usize, sums: &mut [f64]) {
    for image in bits.chunks(area) {
        for (p, &b) in image.iter().enumerate() {
            sums[p] += f64::from(u8::from(b >= 1));
            sums[area + p] += f64::from(u8::from(b == 2));
        }
    }
}

/// The baseline's atoms of one quantised image: pixel p above half (index p), pixel p saturated
/// (area + p).
fn atoms(image: &[u8]) -> Vec<u32> {
    let area = image.len() as u32;
    let above = (0..area).filter(|&p| image[p as usize] >= 1);
    above.chain((0..area).filter(|&p| image[p as usize] == 2).map(|p| area + p)).collect()
}

/// The scan's baseline for the quantised images `bits` (`area` pixels each, labels `labels`),
/// image k being example `index(k)` of the set scanned ([`CrossFitted::fit_sample`]), λ `l2`.
pub fn fit_baseline(
    bits: &[u8],
    labels: &[u32],
    index: &(dyn Fn(usize) -> usize + Sync),
    classes: usize,
    area: usize,
    l2: f64,
) -> CrossFitted {
    let active = |k: usize| atoms(&bits[k * area..(k + 1) * area]);
    CrossFitted::fit_sample(labels, index, classes, 2 * area, &active, l2)
}

/// The largest value of `pixels` (0 for none), the quantisation's top level.
pub fn largest(pixels: &[f32]) -> f32 {
    pixels.iter().fold(0f32, |a, &b| a.max(b))
}

/// `pixels` quantised ([`level`]) against the data's `largest` value, one byte each.
pub fn levels(pixels: &[f32], largest: f32) -> Vec<u8> {
    pixels.par_iter().map(|&v| level(v, largest)).collect()
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
        let largest = largest(pixels);
        let bits = levels(pixels, largest);
        let area = height * width;
        let mut sums = vec![0f64; 2 * area];
        add_atoms(&bits, area, &mut sums);
        let mean = sums.iter().map(|&m| (m / labels.len().max(1) as f64) as f32).collect();
        let baseline = l2.map(|l2| std::sync::Arc::new(fit_baseline(&bits, labels, &|k| k, classes, area, l2)));
        let prior = super::base_rates(labels, classes);
        let shared = ImageShared { largest, mean: std::sync::Arc::new(mean), prior, baseline };
        Self::quantised(bits, labels, classes, (height, width), sizes, floor, shared, 0)
    }

    /// A block of a larger set, from its `offset`-th image on: `pixels` quantised against the
    /// set's largest value, tested against what the set shares (`shared`: its baseline, fitted
    /// on a sample of it, [`fit_baseline`], or the base rates).
    #[allow(clippy::too_many_arguments)]
    pub fn block(
        pixels: &[f32],
        labels: &'a [u32],
        classes: usize,
        hw: (usize, usize),
        sizes: RangeInclusive<usize>,
        floor: f64,
        shared: ImageShared,
        offset: usize,
    ) -> Self {
        let bits = levels(pixels, shared.largest);
        Self::quantised(bits, labels, classes, hw, sizes, floor, shared, offset)
    }

    #[allow(clippy::too_many_arguments)]
    fn quantised(
        bits: Vec<u8>,
        labels: &'a [u32],
        classes: usize,
        (height, width): (usize, usize),
        sizes: RangeInclusive<usize>,
        floor: f64,
        shared: ImageShared,
        offset: usize,
    ) -> Self {
        Self { bits, labels, classes, height, width, sizes, shared, floor: floor as f32, offset }
    }

    /// The baseline's tempering temperature.
    pub fn temperature(&self) -> f32 {
        self.shared.baseline.as_ref().map_or(1.0, |b| b.temperature)
    }

    /// Image `i`'s 2-D prefix sums of Σ_atoms wₐ(bₐ − μₐ) over each pixel's two atoms, under the
    /// model that did not see it:
    /// `(height + 1) × (width + 1) × classes`, entry (r, s) the sum over rows < r, columns < s.
    fn prefix_sums(&self, i: usize) -> Vec<f32> {
        let (h, w, c) = (self.height, self.width, self.classes);
        let image = &self.bits[i * h * w..(i + 1) * h * w];
        let model = self.shared.baseline.as_ref().expect("prefix sums need the baseline");
        let weights = &model.model(i + self.offset).weights;
        let mean = &self.shared.mean;
        let mut sums = vec![0f32; (h + 1) * (w + 1) * c];
        for r in 0..h {
            let mut row = vec![0f32; c];
            for s in 0..w {
                let p = r * w + s;
                let area = h * w;
                let above = f32::from(u8::from(image[p] >= 1)) - mean[p];
                let saturated = f32::from(u8::from(image[p] == 2)) - mean[area + p];
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
        let model = self.shared.baseline.as_deref().filter(|_| baseline);
        let sums = if model.is_some() { self.prefix_sums(i) } else { Vec::new() };
        let l: Vec<f32> = match model {
            Some(m) => m.logits(i + self.offset, &atoms(image)),
            None => Vec::new(),
        };
        let base: &[f32] = if baseline { &self.shared.prior } else { &[] };
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
        self.shared.baseline.is_none().then_some(&self.shared.prior[..])
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

/// An image source too large to hold (an IDX folder's split, a CSV table of square rows), read
/// in blocks of `per_block` images on every pass of the scan ([`super::ScanBlocks`]): the scan
/// holds one block, the sketch and the carriers, never the set. Each read checks the files'
/// SHA-256 against the first read's, so that a source changed while it is scanned is refused.
pub struct ImageFile {
    kind: crate::data::SourceKind,
    path: std::path::PathBuf,
    split: crate::data::Split,
    rows: std::ops::Range<usize>,
    per_block: usize,
    classes: usize,
    hw: (usize, usize),
    sizes: RangeInclusive<usize>,
    floor: f64,
    shared: ImageShared,
    files: Vec<(std::path::PathBuf, String)>,
}

impl ImageFile {
    /// The rows `rows` of the source at `path` (of `kind`, `split` for IDX; its files and their
    /// SHA-256 `files` as first read), images `hw`, labels below `classes`, tested against what
    /// the set shares (`shared`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        (kind, path, split): (crate::data::SourceKind, &std::path::Path, crate::data::Split),
        rows: std::ops::Range<usize>,
        per_block: usize,
        classes: usize,
        hw: (usize, usize),
        sizes: RangeInclusive<usize>,
        floor: f64,
        shared: ImageShared,
        files: Vec<(std::path::PathBuf, String)>,
    ) -> Self {
        Self { kind, path: path.to_path_buf(), split, rows, per_block, classes, hw, sizes, floor, shared, files }
    }
}

impl super::ScanBlocks for ImageFile {
    fn examples(&self) -> usize {
        self.rows.len()
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn spatial(&self) -> bool {
        true
    }
    fn fixed_baseline(&self) -> Option<Vec<f32>> {
        self.shared.baseline.is_none().then(|| self.shared.prior.clone())
    }
    fn blocks(&self, each: &mut dyn FnMut(usize, &dyn Scanned)) -> crate::error::Result<()> {
        use crate::error::Error;
        let changed = || Error::data(&self.path, None, "the data changed while it was scanned; scan it again");
        let area = self.hw.0 * self.hw.1;
        let mut labels = Vec::new();
        let read =
            crate::data::read_image_blocks(self.kind, &self.path, self.split, self.per_block, &mut |first, f, y| {
                let (from, to) = (self.rows.start.max(first), self.rows.end.min(first + y.len()));
                if from >= to {
                    return Ok(());
                }
                if f.len() != y.len() * area {
                    return Err(changed());
                }
                labels.clear();
                for &label in &y[from - first..to - first] {
                    labels.push(Some(label).filter(|&l| (l as usize) < self.classes).ok_or_else(changed)?);
                }
                let pixels = &f[(from - first) * area..(to - first) * area];
                let (sizes, shared, offset) = (self.sizes.clone(), self.shared.clone(), from - self.rows.start);
                let block = ImageScan::block(pixels, &labels, self.classes, self.hw, sizes, self.floor, shared, offset);
                each(offset, &block);
                Ok(())
            })?;
        if read.files != self.files {
            return Err(changed());
        }
        Ok(())
    }
}

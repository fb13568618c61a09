//! [`Features`]: examples as rows of numbers with one label each, the [`Batch`] of the reference
//! classifiers (pixels, table rows, hashed bags of words).
//!
//! The rows and labels are shared (`Arc`), so slicing a batch, as the engine does for every chunk
//! of the training data, copies nothing; gathering rows copies only them.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::model::Batch;

/// `len` examples of `dim` features each, row-major, with one label each.
#[derive(Clone, Debug)]
pub struct Features {
    // `Arc<Vec<_>>`, not `Arc<[_]>`: wrapping a vector moves it, where making a slice copies it.
    values: Arc<Vec<f32>>,
    labels: Arc<Vec<u32>>,
    dim: usize,
    start: usize,
    len: usize,
}

impl Features {
    /// `labels.len()` rows of `dim` features (`values.len()` must be `labels.len() · dim`).
    pub fn new(values: Vec<f32>, labels: Vec<u32>, dim: usize) -> Self {
        assert_eq!(values.len(), labels.len() * dim, "one row of {dim} features per label");
        let len = labels.len();
        Self { values: Arc::new(values), labels: Arc::new(labels), dim, start: 0, len }
    }

    /// The features, `len × dim` row-major.
    pub fn features(&self) -> &[f32] {
        &self.values[self.start * self.dim..(self.start + self.len) * self.dim]
    }

    /// The labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels[self.start..self.start + self.len]
    }

    /// Features per example.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Row `i`'s features.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features()[i * self.dim..(i + 1) * self.dim]
    }

    /// The rows as a `[len, dim]` tensor on `device` in `dtype`.
    pub fn tensor(&self, device: &Device, dtype: DType) -> Tensor<2> {
        let shape = [self.len, self.dim];
        let data = match dtype {
            // Widened in one pass (TensorData's generic conversion took 8% of a `trace`).
            DType::F64 => TensorData::new(self.features().iter().map(|&v| f64::from(v)).collect::<Vec<f64>>(), shape),
            _ => TensorData::new(self.features().to_vec(), shape).convert_dtype(dtype),
        };
        Tensor::from_data(data, (device, dtype))
    }
}

impl Batch for Features {
    fn len(&self) -> usize {
        self.len
    }

    fn slice(&self, range: Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= self.len, "rows {range:?} of {}", self.len);
        Self { start: self.start + range.start, len: range.end - range.start, ..self.clone() }
    }

    fn gather(&self, rows: &[usize]) -> Self {
        let mut values = Vec::with_capacity(rows.len() * self.dim);
        for &r in rows {
            values.extend_from_slice(self.row(r));
        }
        let labels = rows.iter().map(|&r| Features::labels(self)[r]).collect();
        Self::new(values, labels, self.dim)
    }

    fn labels(&self) -> Cow<'_, [u32]> {
        Cow::Borrowed(Features::labels(self))
    }
}

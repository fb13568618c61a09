//! Predictions of a trained model: per example, the predicted class, the loss against the label
//! and the class probabilities. Batched forward passes, no gradients.

use std::fmt::Write as _;

use culprit_models::network::{cross_entropy, one_hot, probabilities, read_f64};
use culprit_models::{Batch, Features, Model};

use crate::data::Dataset;
use crate::report::trace::TraceReport;

/// One example's prediction.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Stable example id (row in the source).
    pub id: usize,
    /// True label.
    pub label: u32,
    /// Arg-max class.
    pub predicted: u32,
    /// Cross-entropy against the label.
    pub loss: f64,
    /// Class probabilities.
    pub probabilities: Vec<f64>,
}

/// Predicts every example of `data`, in batches of `batch` rows.
pub fn predict(network: &impl Model<Batch = Features>, data: &Dataset, batch: usize) -> Vec<Prediction> {
    let classes = network.num_classes();
    let (device, dtype) = (network.device(), network.dtype());
    let mut out = Vec::with_capacity(data.len());
    for start in (0..data.len()).step_by(batch.max(1)) {
        let end = (start + batch).min(data.len());
        let logits = network.logits(&data.examples.slice(start..end));
        let labels = &data.labels()[start..end];
        let losses = read_f64(cross_entropy(logits.clone(), one_hot(labels, classes, &device, dtype)));
        let probs = read_f64(probabilities(logits));
        for (k, p) in probs.chunks(classes).enumerate() {
            let predicted = p
                .iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |best, (c, &v)| if v > best.1 { (c, v) } else { best })
                .0 as u32;
            out.push(Prediction {
                id: data.ids[start + k],
                label: labels[k],
                predicted,
                loss: losses[k],
                probabilities: p.to_vec(),
            });
        }
    }
    out
}

/// Share of predictions equal to the label.
pub fn accuracy(predictions: &[Prediction]) -> f64 {
    predictions.iter().filter(|p| p.predicted == p.label).count() as f64 / predictions.len().max(1) as f64
}

/// Mean cross-entropy.
pub fn mean_loss(predictions: &[Prediction]) -> f64 {
    predictions.iter().map(|p| p.loss).sum::<f64>() / predictions.len().max(1) as f64
}

/// The predictions as CSV: `index,label,predicted,loss,p0,p1,…`.
pub fn to_csv(predictions: &[Prediction], classes: usize) -> String {
    let mut s = String::from("index,label,predicted,loss");
    for c in 0..classes {
        let _ = write!(s, ",p{c}");
    }
    s.push('\n');
    for p in predictions {
        let _ = write!(s, "{},{},{},{:.9e}", p.id, p.label, p.predicted, p.loss);
        for v in &p.probabilities {
            let _ = write!(s, ",{v:.9e}");
        }
        s.push('\n');
    }
    s
}

/// Measurement values of a trace's queries under `network` (the targets fixed by the trace), so
/// the same quantity can be compared before and after retraining.
pub fn measure(network: &impl Model<Batch = Features>, queries: &Dataset, report: &TraceReport) -> Vec<f64> {
    let targets: Vec<u32> = report.queries.iter().map(|q| q.target).collect();
    culprit_engine::gradients::read_f32(report.measurement.values(network.logits(&queries.examples), &targets))
        .into_iter()
        .map(f64::from)
        .collect()
}

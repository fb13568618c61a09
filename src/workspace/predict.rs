//! Predictions of a trained model: per example, the predicted class, the loss against the label
//! and the class probabilities. Batched forward passes, no gradients.

use std::fmt::Write as _;

use culprit_models::network::{cross_entropy, one_hot, probabilities, read_f64};
use culprit_models::{Batch, Features, Model};

use crate::data::Dataset;
use crate::error::Result;
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

/// Measurement values of a trace's queries under `model` (the targets fixed by the trace: a
/// classifier's query keeps the class it was measured against; a language model's completion
/// keeps its tokens), so the same quantity can be compared before and after retraining.
pub fn measure<M: Model>(model: &M, queries: &Dataset<M::Batch>, report: &TraceReport) -> Result<Vec<f64>> {
    let groups = queries.examples.groups();
    let targets: Vec<u32> = match groups {
        culprit_models::RowGroups::OnePerExample => report.queries.iter().map(|q| q.target).collect(),
        culprit_models::RowGroups::Offsets(_) => {
            let labels = queries.examples.labels();
            report.measurement.targets(&labels, &labels, model.num_classes())?
        }
    };
    let values = report.measurement.values(model.logits(&queries.examples), &targets);
    let summed = culprit_models::model::sum_rows(values, &groups, queries.len());
    Ok(culprit_engine::gradients::read_f32(summed).into_iter().map(f64::from).collect())
}

/// A language model's score of one example: the summed log-probability of its scored tokens
/// (a query's completion, or every token after the first of a document).
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// Stable example id.
    pub id: usize,
    /// Tokens scored.
    pub tokens: usize,
    /// Σ log p(token | the tokens before it), natural log.
    pub logprob: f64,
}

/// The summed log-probability of every example's scored tokens, in batches of `batch`.
pub fn completion_logprobs(
    gpt: &culprit_models::Gpt,
    data: &Dataset<culprit_models::Tokens>,
    batch: usize,
) -> Vec<Completion> {
    use culprit_models::RowGroups;
    let mut out = Vec::with_capacity(data.len());
    for range in data.examples.groups().chunks(data.len(), batch, culprit_models::model::ROWS_PER_CHUNK) {
        let start = range.start;
        let chunk = data.examples.slice(range);
        let labels = chunk.labels().into_owned();
        let values =
            read_f64(culprit_engine::gradients::Measurement::TRAINING_LOSS.values(gpt.logits(&chunk), &labels));
        let RowGroups::Offsets(offsets) = chunk.groups() else { unreachable!("documents have offsets") };
        for i in 0..chunk.len() {
            let rows = offsets[i]..offsets[i + 1];
            out.push(Completion {
                id: data.ids[start + i],
                tokens: rows.len(),
                logprob: -rows.map(|r| values[r]).sum::<f64>(),
            });
        }
    }
    out
}

/// Prompts decoded together by [`greedy`] (bounds the memory of one forward pass).
const GREEDY_BATCH: usize = 32;

/// Greedy continuations of `prompts`: up to `max_tokens` more tokens each (fewer when the context
/// fills), the most likely token at every step, [`GREEDY_BATCH`] prompts advanced together. Cost
/// per step: one forward pass over the batch.
pub fn greedy(gpt: &culprit_models::Gpt, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    prompts.chunks(GREEDY_BATCH).flat_map(|chunk| greedy_batch(gpt, chunk, max_tokens)).collect()
}

fn greedy_batch(gpt: &culprit_models::Gpt, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let context = gpt.config().context;
    let mut sequences: Vec<Vec<u32>> = prompts.to_vec();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for _ in 0..max_tokens {
        let active: Vec<usize> = (0..sequences.len()).filter(|&i| sequences[i].len() < context).collect();
        if active.is_empty() {
            break;
        }
        let batch = culprit_models::Tokens::new(active.iter().map(|&i| sequences[i].clone()).collect());
        let logits = gpt.forward_all(&batch, &mut None);
        let [_, t, v] = logits.dims();
        let values = read_f64(logits);
        for (k, &i) in active.iter().enumerate() {
            let last = &values[(k * t + sequences[i].len() - 1) * v..(k * t + sequences[i].len()) * v];
            let next =
                last.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (c, &x)| if x > b.1 { (c, x) } else { b }).0
                    as u32;
            sequences[i].push(next);
            generated[i].push(next);
        }
    }
    generated
}

/// A query's greedy continuation, as long as its completion.
#[derive(Clone, Debug)]
pub struct GreedyCompletion {
    /// The continuation, decoded.
    pub text: String,
    /// Whether it starts with the query's completion (decoded text compared).
    pub matches: bool,
}

/// The greedy continuation of every query's prompt, as many tokens as its completion (the
/// longest completion's count for all, so a continuation is never cut short), and whether it
/// reproduces the completion. Cost: that many forward passes per [`GREEDY_BATCH`] queries.
pub fn greedy_completions(
    gpt: &culprit_models::Gpt,
    tokenizer: &crate::data::tokenizer::Tokenizer,
    queries: &Dataset<culprit_models::Tokens>,
) -> Vec<GreedyCompletion> {
    let mut prompts = Vec::with_capacity(queries.len());
    let mut completions = Vec::with_capacity(queries.len());
    for (i, d) in queries.examples.documents().iter().enumerate() {
        let tokens = queries.examples.tokens(i);
        prompts.push(tokens[..d.scored_from + 1].to_vec());
        completions.push(tokenizer.decode(&tokens[d.scored_from + 1..]));
    }
    let longest = (0..queries.len()).map(|i| queries.examples.tokens(i).len() - prompts[i].len()).max().unwrap_or(0);
    greedy(gpt, &prompts, longest)
        .iter()
        .zip(&completions)
        .map(|(g, c)| {
            let text = tokenizer.decode(g);
            GreedyCompletion { matches: text.starts_with(c.as_str()), text }
        })
        .collect()
}

/// Mean loss per scored token (nats) of a language model on `data`.
pub fn mean_token_loss(gpt: &culprit_models::Gpt, data: &Dataset<culprit_models::Tokens>, batch: usize) -> f64 {
    let scores = completion_logprobs(gpt, data, batch);
    let tokens: usize = scores.iter().map(|c| c.tokens).sum();
    -scores.iter().map(|c| c.logprob).sum::<f64>() / tokens.max(1) as f64
}

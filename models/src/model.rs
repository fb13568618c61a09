//! The model boundary: everything the attribution engine sees of a model.
//!
//! The engine (per-example gradients, curvature, scores) never names an architecture. It sees a
//! [`Model`]: its parameters θ as flat tensors, the layers it attributes through
//! ([`TrackedLayer`]), a forward pass over a [`Batch`] of the model's own kind of inputs (pixels,
//! bags of words, token ids) that can record [`LayerTap`]s, and its outputs as rows of class
//! logits, one row per prediction (one per example for a classifier, one per token for a language
//! model). Adding a model is implementing this trait for a new type; nothing in the engine changes.
//!
//! ## Tracked layers and their Kronecker view
//! A tracked layer is a linear map applied at L positions of one example (L = 1 for a dense layer,
//! the output pixels of a convolution, the tokens of a sequence): z_l = W̃ᵀ ã_l with ã = [a; 1]
//! when the layer has a bias. The gradient of example i's measurement mᵢ is then
//!
//! ∇_W̃ mᵢ = Σ_l ã_{il} δ_{il}ᵀ,  δ_{il} = ∂mᵢ/∂z_{il},
//!
//! an m×o matrix (m = inputs + 1 with a bias, o = outputs): the layer's *Kronecker view*. Its
//! parameters sit in θ as the weight (`[inputs, outputs]` or `[outputs, inputs]` row-major,
//! [`WeightLayout`]) followed by the bias; [`TrackedLayer::to_view`] maps between the two.
//!
//! ## Layer taps
//! A tapped forward records every tracked layer's input (`[batch, inputs, L]`) and adds a zero
//! probe (`[batch, outputs, L]`, `require_grad`) to its output. One backward pass of the *summed*
//! measurement Σᵢ mᵢ gives each probe's gradient, whose slice i is exactly δᵢ, because mⱼ does not
//! depend on example i's activations for j ≠ i. Cost: one forward and one backward per batch.
//!
//! ## Parameters outside the tracked layers
//! θ may hold parameters that no tracked layer covers (embeddings, normalisation scales): they are
//! trained, but attribution, like Kronfluence's, works in the space of the tracked layers only
//! ([`tracked_len`], [`restrict`], [`extend`]). Every reference classifier tracks all of θ.

use std::borrow::Cow;
use std::ops::Range;

use burn::tensor::{DType, Device, Gradients, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// How a tracked layer's weight is laid out in θ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightLayout {
    /// `[inputs, outputs]` row-major: z = a W (culprit's dense layers, GPT-2's `Conv1D`).
    InputMajor,
    /// `[outputs, inputs]` row-major: z = W a (convolutions, PyTorch's `nn.Linear`).
    OutputMajor,
}

/// One layer the engine attributes through: a linear map at `positions` positions per example.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackedLayer {
    /// Name for reports, e.g. `dense0`, `conv1`, `h.0.attn.c_attn`.
    pub name: String,
    /// Input width a (without the bias's constant 1).
    pub inputs: usize,
    /// Output width.
    pub outputs: usize,
    /// Whether a bias follows the weight in θ.
    pub bias: bool,
    /// Positions L per example (1 for a dense layer; the longest sequence for a language model).
    pub positions: usize,
    /// Weight layout in θ.
    pub layout: WeightLayout,
    /// Index in θ of the weight's first element; the bias follows the weight.
    pub offset: usize,
}

impl TrackedLayer {
    /// Weight scalars.
    pub fn weight_len(&self) -> usize {
        self.inputs * self.outputs
    }

    /// Bias scalars (0 without a bias).
    pub fn bias_len(&self) -> usize {
        if self.bias { self.outputs } else { 0 }
    }

    /// Parameters of the layer (weight plus bias).
    pub fn num_params(&self) -> usize {
        self.weight_len() + self.bias_len()
    }

    /// Rows m of the Kronecker view: inputs, plus one for the bias.
    pub fn view_rows(&self) -> usize {
        self.inputs + usize::from(self.bias)
    }

    /// The layer's θ block (weight then bias) as its Kronecker view, m×o row-major with the bias
    /// as the last row. Cost O(m·o).
    pub fn to_view(&self, block: &[f64]) -> Vec<f64> {
        let (i, o) = (self.inputs, self.outputs);
        let mut view = vec![0.0; self.view_rows() * o];
        match self.layout {
            WeightLayout::InputMajor => view[..i * o].copy_from_slice(&block[..i * o]),
            WeightLayout::OutputMajor => {
                for oi in 0..o {
                    for ii in 0..i {
                        view[ii * o + oi] = block[oi * i + ii];
                    }
                }
            }
        }
        if self.bias {
            view[i * o..].copy_from_slice(&block[i * o..i * o + o]);
        }
        view
    }

    /// Index, within the layer's θ block, of entry (row, column) of its view ([`Self::to_view`]:
    /// row = input, the bias as the last row).
    pub fn view_index(&self, row: usize, column: usize) -> usize {
        if row == self.inputs {
            return self.weight_len() + column;
        }
        match self.layout {
            WeightLayout::InputMajor => row * self.outputs + column,
            WeightLayout::OutputMajor => column * self.inputs + row,
        }
    }

    /// The inverse of [`TrackedLayer::to_view`].
    pub fn from_view(&self, view: &[f64]) -> Vec<f64> {
        let (i, o) = (self.inputs, self.outputs);
        let mut block = vec![0.0; self.num_params()];
        match self.layout {
            WeightLayout::InputMajor => block[..i * o].copy_from_slice(&view[..i * o]),
            WeightLayout::OutputMajor => {
                for oi in 0..o {
                    for ii in 0..i {
                        block[oi * i + ii] = view[ii * o + oi];
                    }
                }
            }
        }
        if self.bias {
            block[i * o..].copy_from_slice(&view[i * o..i * o + o]);
        }
        block
    }
}

/// Length of the tracked space: the tracked layers' parameters, concatenated in layer order.
pub fn tracked_len(layers: &[TrackedLayer]) -> usize {
    layers.iter().map(TrackedLayer::num_params).sum()
}

/// Each tracked layer's first index in the tracked space.
pub fn tracked_starts(layers: &[TrackedLayer]) -> Vec<usize> {
    layers
        .iter()
        .scan(0, |offset, l| {
            let start = *offset;
            *offset += l.num_params();
            Some(start)
        })
        .collect()
}

/// The tracked coordinates of a vector of θ's space, in layer order.
pub fn restrict(layers: &[TrackedLayer], full: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(tracked_len(layers));
    for l in layers {
        out.extend_from_slice(&full[l.offset..l.offset + l.num_params()]);
    }
    out
}

/// A vector of θ's space (length `full_len`) holding `tracked` at the tracked coordinates and 0
/// elsewhere: the inverse of [`restrict`] on the tracked coordinates.
pub fn extend(layers: &[TrackedLayer], tracked: &[f64], full_len: usize) -> Vec<f64> {
    let mut out = vec![0.0; full_len];
    let mut offset = 0;
    for l in layers {
        let len = l.num_params();
        out[l.offset..l.offset + len].copy_from_slice(&tracked[offset..offset + len]);
        offset += len;
    }
    out
}

/// How the units one tracked layer computes reach the next tracked layer: what the curvature
/// methods need to know of a network's symmetries (`culprit_engine::curvature::symmetry`).
///
/// Unit o is output o of the `producer` (its pre-activation, at every position); after the
/// activation (and any max-pooling or flattening) it becomes the `consumer`'s inputs
/// o·`stride`..(o + 1)·`stride`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitLink {
    /// The tracked layer whose outputs are the units.
    pub producer: usize,
    /// The tracked layer that reads them.
    pub consumer: usize,
    /// Consumer inputs per unit: 1 for a dense layer, k² for a convolution's k×k patches, the
    /// pooled map's pixels when a convolution's channels are flattened into a dense layer.
    pub stride: usize,
    /// What lies between the two.
    pub kind: LinkKind,
}

/// The map between a link's producer and consumer, as far as the logits can tell units apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// Positively homogeneous, f(αa) = αf(a) for α > 0 (ReLU, with max-pooling): scaling unit o's
    /// incoming weights and bias by α and its outgoing weights by 1/α leaves every logit
    /// unchanged.
    Homogeneous,
    /// Linear (no activation): any invertible mixing of the units, W_in → W_in R and
    /// W_out → R⁻¹ W_out, leaves every logit unchanged (the rescalings among them).
    Linear,
}

/// What a tapped forward recorded for one tracked layer: its input and the probe on its output.
#[derive(Clone, Debug)]
pub struct LayerTap {
    /// The layer's inputs a, `[batch, inputs, positions]`, detached from the graph (zero at
    /// padding positions).
    pub input: Tensor<3>,
    /// The zero probe added to the layer's output, `[batch, outputs, positions]`.
    pub probe: Tensor<3>,
    /// `[batch, positions]`: 1 at the positions of real tokens, 0 at padding (sequences of
    /// different lengths in one batch); `None` when every position is real.
    pub mask: Option<Tensor<2>>,
}

impl LayerTap {
    /// Records `input` (`[batch, inputs, positions]`) and returns the tap with a fresh zero probe
    /// shaped `[batch, outputs, positions]` on the same device (the device must have autodiff).
    pub fn new(input: Tensor<3>, outputs: usize) -> Self {
        let [b, _, l] = input.dims();
        let probe = Tensor::zeros([b, outputs, l], (&input.device(), input.dtype())).require_grad();
        Self { input: input.detach(), probe, mask: None }
    }

    /// [`LayerTap::new`] for a batch with padding: `mask` (`[batch, positions]`, 1 real, 0 pad)
    /// is kept with the tap and the input is zeroed at padding positions.
    pub fn masked(input: Tensor<3>, outputs: usize, mask: Tensor<2>) -> Self {
        let [b, i, l] = input.dims();
        let input = input.detach() * mask.clone().reshape([b, 1, l]).expand([b, i, l]);
        Self { mask: Some(mask), ..Self::new(input, outputs) }
    }

    /// The per-example output gradients δ, `[batch, outputs, positions]`, after a backward pass of
    /// the summed measurement; `None` if the measurement did not depend on this layer.
    pub fn output_gradient(&self, grads: &Gradients) -> Option<Tensor<3>> {
        self.probe.grad(grads)
    }
}

/// Which prediction rows belong to which example of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowGroups {
    /// Row i is example i's only prediction (classifiers).
    OnePerExample,
    /// Example i owns rows `offsets[i]..offsets[i + 1]` (`len + 1` offsets).
    Offsets(Vec<usize>),
}

/// The most prediction rows one chunk of batched work should hold (see [`RowGroups::chunks`]):
/// 4096 rows of a language model are, e.g., 21 documents of 192 tokens.
pub const ROWS_PER_CHUNK: usize = 4096;

impl RowGroups {
    /// Consecutive ranges of the `n` examples, each of at most `examples` examples and at most
    /// `rows` prediction rows (one example at least), so that work done a chunk at a time stays
    /// bounded in memory whether an example is one row (a classifier) or hundreds (a document's
    /// tokens).
    pub fn chunks(&self, n: usize, examples: usize, rows: usize) -> Vec<Range<usize>> {
        let examples = examples.max(1);
        match self {
            Self::OnePerExample => {
                let step = examples.min(rows.max(1));
                (0..n).step_by(step).map(|s| s..(s + step).min(n)).collect()
            }
            Self::Offsets(offsets) => {
                let mut out = Vec::new();
                let mut start = 0;
                while start < n {
                    let mut end = start + 1;
                    while end < n && end - start < examples && offsets[end + 1] - offsets[start] <= rows {
                        end += 1;
                    }
                    out.push(start..end);
                    start = end;
                }
                out
            }
        }
    }
}

/// A batch of examples of one model's kind, as its forward pass reads them.
pub trait Batch: Clone + Send + Sync {
    /// Number of examples.
    fn len(&self) -> usize;

    /// Whether the batch holds no example.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Examples `range` (cheap: the data is shared where the type allows it).
    fn slice(&self, range: Range<usize>) -> Self;

    /// The examples at `rows`, in that order, repetitions allowed.
    fn gather(&self, rows: &[usize]) -> Self;

    /// The training target of each prediction row (the class label; the next token).
    fn labels(&self) -> Cow<'_, [u32]>;

    /// Which prediction rows belong to which example.
    fn groups(&self) -> RowGroups {
        RowGroups::OnePerExample
    }
}

/// A model as the engine sees it. See the module documentation.
pub trait Model: Clone + Send + Sync {
    /// A batch of this model's examples.
    type Batch: Batch;

    /// Architecture and sizes in a few words, for logs.
    fn describe(&self) -> String;

    /// Classes of every prediction row (the vocabulary of a language model).
    fn num_classes(&self) -> usize;

    /// The tracked layers, in tracked-space order.
    fn layers(&self) -> &[TrackedLayer];

    /// All parameters as flat tensors, in θ order.
    fn parameters(&self) -> Vec<Tensor<1>>;

    /// Replaces the parameters (same count, order and lengths as [`Model::parameters`]).
    fn set_parameters(&mut self, parameters: Vec<Tensor<1>>);

    /// The logits of the batch's prediction rows, `[rows, classes]`, and with `tapped` one
    /// [`LayerTap`] per tracked layer (the device must then have autodiff).
    fn forward(&self, batch: &Self::Batch, tapped: bool) -> (Tensor<2>, Vec<LayerTap>);

    /// Whether the training objective is convex in θ (convex models are trained to the optimum
    /// in f64, and leave-one-out retraining is defined for them).
    fn is_convex(&self) -> bool {
        false
    }

    /// The Hessian of L(θ) = (1/n) Σ CE + (λ/2)‖θ‖² on `data` in closed form, for models whose
    /// logits are linear in θ (there it is also the Gauss–Newton matrix); `None` otherwise.
    fn closed_form_hessian(&self, data: &Self::Batch, l2: f64) -> Option<faer::Mat<f64>> {
        let _ = (data, l2);
        None
    }

    /// How the units of one tracked layer reach the next ([`UnitLink`]), for each pair of
    /// consecutive tracked layers joined by a positively homogeneous or linear map; the default
    /// declares none (no symmetry is then used, which is always correct). A declared link must be
    /// exact: every logit of every input is unchanged under its transformations (tested for the
    /// reference classifiers against the exact Gauss–Newton matrix).
    fn unit_links(&self) -> Vec<UnitLink> {
        Vec::new()
    }

    /// The logits of the batch's prediction rows, `[rows, classes]`.
    fn logits(&self, batch: &Self::Batch) -> Tensor<2> {
        self.forward(batch, false).0
    }

    /// The device the parameters live on.
    fn device(&self) -> Device {
        self.parameters()[0].device()
    }

    /// The parameters' dtype.
    fn dtype(&self) -> DType {
        self.parameters()[0].dtype()
    }

    /// Number of parameters in θ.
    fn num_params(&self) -> usize {
        self.parameters().iter().map(|t| t.dims()[0]).sum()
    }

    /// θ as a flat f64 vector.
    fn to_flat(&self) -> Vec<f64> {
        let mut theta = Vec::with_capacity(self.num_params());
        for t in self.parameters() {
            theta.extend(read_f64(t));
        }
        theta
    }

    /// The same model with parameters θ = `theta`, on `device` in `dtype`, without gradients.
    fn with_flat(&self, theta: &[f64], device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let lengths: Vec<usize> = self.parameters().iter().map(|t| t.dims()[0]).collect();
        let expected: usize = lengths.iter().sum();
        if theta.len() != expected {
            return Err(ModelError::Config(format!(
                "the weights hold {} parameters but this {} has {expected}",
                theta.len(),
                self.describe()
            )));
        }
        let mut offset = 0;
        let tensors = lengths
            .iter()
            .map(|&len| {
                let values = theta[offset..offset + len].to_vec();
                offset += len;
                Tensor::from_data(TensorData::new(values, [len]).convert_dtype(dtype), (device, dtype))
            })
            .collect();
        let mut model = self.clone();
        model.set_parameters(tensors);
        Ok(model)
    }

    /// The same parameters on `device` in `dtype`, without gradients.
    fn cast(&self, device: &Device, dtype: DType) -> Self {
        self.with_flat(&self.to_flat(), device, dtype).expect("same shape")
    }

    /// Marks every parameter as requiring a gradient (the device must have autodiff).
    fn require_grad(mut self) -> Self {
        let tensors = self.parameters().into_iter().map(Tensor::require_grad).collect();
        self.set_parameters(tensors);
        self
    }

    /// The same parameters with no gradient tracking.
    fn without_grad(mut self) -> Self {
        let tensors = self.parameters().into_iter().map(|t| Tensor::from_inner(t.inner())).collect();
        self.set_parameters(tensors);
        self
    }

    /// Σ‖θ‖², the L2 penalty's sum of squares, as a one-element tensor in the graph.
    fn squared_norm(&self) -> Tensor<1> {
        self.parameters()
            .into_iter()
            .map(|t| crate::elementary::square(t).sum())
            .reduce(|a, b| a + b)
            .expect("a model has parameters")
    }

    /// ∇θ as a flat f64 vector from a backward pass (zeros for parameters the loss did not reach).
    fn gradient_flat(&self, grads: &Gradients) -> Vec<f64> {
        let mut g = Vec::with_capacity(self.num_params());
        for t in self.parameters() {
            match t.grad(grads) {
                Some(gt) => g.extend(read_f64(gt)),
                None => g.extend(std::iter::repeat_n(0.0, t.dims()[0])),
            }
        }
        g
    }
}

/// Reads a tensor's values as f64 on the host.
pub fn read_f64<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert_dtype(DType::F64).try_into_vec::<f64>().expect("float tensor data")
}

/// Reads a tensor's values as f32 on the host.
pub fn read_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert_dtype(DType::F32).try_into_vec::<f32>().expect("float tensor data")
}

/// Per-example sums `[batch]` of per-row values `[rows]` (identity for one row per example).
/// Differentiable: a product with the 0/1 membership matrix. Cost O(batch · rows).
pub fn sum_rows(values: Tensor<1>, groups: &RowGroups, batch: usize) -> Tensor<1> {
    match groups {
        RowGroups::OnePerExample => values,
        RowGroups::Offsets(offsets) => {
            let rows = values.dims()[0];
            let mut member = vec![0.0f32; batch * rows];
            for i in 0..batch {
                for r in offsets[i]..offsets[i + 1] {
                    member[i * rows + r] = 1.0;
                }
            }
            let device = values.device();
            let dtype = values.dtype();
            let m =
                Tensor::<2>::from_data(TensorData::new(member, [batch, rows]).convert_dtype(dtype), (&device, dtype));
            m.matmul(values.reshape([rows, 1])).reshape([batch])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `view_index` names, for both layouts and with or without a bias, the θ entry that
    /// `to_view` puts at (row, column).
    #[test]
    fn view_index_is_where_to_view_reads() {
        for layout in [WeightLayout::InputMajor, WeightLayout::OutputMajor] {
            for bias in [false, true] {
                let layer =
                    TrackedLayer { name: "l".into(), inputs: 3, outputs: 4, bias, positions: 1, layout, offset: 0 };
                let block: Vec<f64> = (0..layer.num_params()).map(|k| k as f64).collect();
                let view = layer.to_view(&block);
                for row in 0..layer.view_rows() {
                    for column in 0..layer.outputs {
                        assert_eq!(block[layer.view_index(row, column)], view[row * layer.outputs + column]);
                    }
                }
            }
        }
    }
}

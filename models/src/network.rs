//! The reference classifiers' parameters and forward pass, as a [`Model`].
//!
//! Parameters are kept as flat 1-D burn tensors, one weight and one optional bias per trainable
//! layer (layouts in [`LayerKind`]), and reshaped in the forward pass; reshaping is free and keeps
//! the parameter vector θ, the optimizer state and the on-disk weights in one order. Every
//! trainable layer is tracked (see [`crate::model`] for the taps): dense layers at one position,
//! convolutions at every output pixel with their input unfolded into patches (`[C·k·k, H·W]`).

use burn::tensor::activation::relu;
use burn::tensor::module::{conv2d, max_pool2d, unfold4d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions, UnfoldOptions};
use burn::tensor::{DType, Device, Tensor, TensorData};
use faer::Mat;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ModelError;
use crate::config::{Activation, Architecture, LayerKind, LayerSpec, ModelConfig};
use crate::elementary::{gelu, log_softmax, softmax, tanh};
use crate::features::Features;
use crate::model::{LayerTap, LinkKind, Model, TrackedLayer, UnitLink};
pub use crate::model::{read_f32, read_f64};

/// One trainable layer's parameters as flat tensors.
#[derive(Clone, Debug)]
struct LayerParams {
    weight: Tensor<1>,
    bias: Option<Tensor<1>>,
}

/// A reference classifier: its configuration and its parameters θ on one device, in one dtype.
#[derive(Clone, Debug)]
pub struct Network {
    config: ModelConfig,
    specs: Vec<LayerSpec>,
    tracked: Vec<TrackedLayer>,
    params: Vec<LayerParams>,
}

fn tensor_1d(values: Vec<f64>, device: &Device, dtype: DType) -> Tensor<1> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]).convert_dtype(dtype), (device, dtype))
}

impl Network {
    /// A freshly initialised model. Weights and biases are drawn from U(−1/√fan_in, 1/√fan_in)
    /// (PyTorch's default) with a ChaCha8 generator seeded by `seed`, so the same seed gives the
    /// same model on every machine. Convex models start at θ = 0.
    pub fn init(config: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let layers = config.layers()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let convex = config.architecture.is_convex();
        let mut theta = Vec::with_capacity(layers.iter().map(LayerSpec::num_params).sum());
        for layer in &layers {
            let bound = 1.0 / (layer.fan_in() as f64).sqrt();
            for _ in 0..layer.num_params() {
                theta.push(if convex { 0.0 } else { rng.random_range(-bound..bound) });
            }
        }
        Self::from_flat(config, &theta, device, dtype)
    }

    /// A model with the given flat parameter vector θ (order in [`crate::config`]).
    pub fn from_flat(config: &ModelConfig, theta: &[f64], device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let specs = config.layers()?;
        let expected: usize = specs.iter().map(LayerSpec::num_params).sum();
        if theta.len() != expected {
            return Err(ModelError::Config(format!(
                "the weights hold {} parameters but a {} of this shape has {expected}",
                theta.len(),
                config.architecture.name()
            )));
        }
        let mut offset = 0;
        let mut params = Vec::with_capacity(specs.len());
        for layer in &specs {
            let w = layer.weight_len();
            let weight = tensor_1d(theta[offset..offset + w].to_vec(), device, dtype);
            offset += w;
            let b = layer.bias_len();
            let bias = (b > 0).then(|| tensor_1d(theta[offset..offset + b].to_vec(), device, dtype));
            offset += b;
            params.push(LayerParams { weight, bias });
        }
        Ok(Self { config: config.clone(), tracked: config.tracked_layers()?, specs, params })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The trainable layers with their kinds, in θ order.
    pub fn specs(&self) -> &[LayerSpec] {
        &self.specs
    }

    /// The logits `[batch, classes]` for inputs `[batch, features]`.
    pub fn forward_features(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward_impl(x, false).0
    }

    fn activate<const D: usize>(&self, t: Tensor<D>) -> Tensor<D> {
        match self.config.activation {
            Activation::Relu => relu(t),
            Activation::Tanh => tanh(t),
            Activation::Gelu => gelu(t),
        }
    }

    /// A convolution layer; with `taps`, records its unfolded input patches and a probe.
    fn conv(&self, spec: &LayerSpec, p: &LayerParams, a: Tensor<4>, taps: Option<&mut Vec<LayerTap>>) -> Tensor<4> {
        let LayerKind::Conv2d { in_channels, out_channels, kernel, padding, .. } = spec.kind else {
            unreachable!("a convolution spec")
        };
        let w = p.weight.clone().reshape([out_channels, in_channels, kernel, kernel]);
        let options = ConvOptions::new([1, 1], [padding, padding], [1, 1], 1);
        let z = conv2d(a.clone(), w, p.bias.clone(), options);
        let Some(taps) = taps else { return z };
        let patches = unfold4d(a, [kernel, kernel], UnfoldOptions::new([1, 1], [padding, padding], [1, 1]));
        let tap = LayerTap::new(patches, out_channels);
        let z = z.clone() + tap.probe.clone().reshape(z.dims());
        taps.push(tap);
        z
    }

    /// A dense layer; with `taps`, records its input and a probe.
    fn dense(&self, spec: &LayerSpec, p: &LayerParams, a: Tensor<2>, taps: Option<&mut Vec<LayerTap>>) -> Tensor<2> {
        let LayerKind::Dense { inputs, outputs, .. } = spec.kind else { unreachable!("a dense spec") };
        let mut z = a.clone().matmul(p.weight.clone().reshape([inputs, outputs]));
        if let Some(b) = &p.bias {
            z = z + b.clone().reshape([1, outputs]);
        }
        let Some(taps) = taps else { return z };
        let batch = a.dims()[0];
        let tap = LayerTap::new(a.reshape([batch, inputs, 1]), outputs);
        let z = z + tap.probe.clone().reshape([batch, outputs]);
        taps.push(tap);
        z
    }

    fn forward_impl(&self, x: Tensor<2>, tapped: bool) -> (Tensor<2>, Vec<LayerTap>) {
        let mut taps = Vec::new();
        let batch = x.dims()[0];
        let last = self.specs.len() - 1;
        let mut flat = Some(x);
        let mut image: Option<Tensor<4>> = None;
        if self.config.architecture == Architecture::Cnn {
            let shape = self.config.input.as_image().expect("checked by ModelConfig::layers");
            let x = flat.take().expect("input");
            image = Some(x.reshape([batch, shape.channels, shape.height, shape.width]));
        }
        for (i, (spec, p)) in self.specs.iter().zip(&self.params).enumerate() {
            let tap = if tapped { Some(&mut taps) } else { None };
            match spec.kind {
                LayerKind::Conv2d { .. } => {
                    let z = self.conv(spec, p, image.take().expect("convolutions come first"), tap);
                    let pooled = max_pool2d(self.activate(z), MaxPoolOptions::new([2, 2]));
                    if matches!(self.specs[i + 1].kind, LayerKind::Dense { .. }) {
                        let [b, c, h, w] = pooled.dims();
                        flat = Some(pooled.reshape([b, c * h * w]));
                    } else {
                        image = Some(pooled);
                    }
                }
                LayerKind::Dense { .. } => {
                    let z = self.dense(spec, p, flat.take().expect("dense input"), tap);
                    // The embedding bag feeds the linear layer directly; hidden MLP/CNN layers
                    // go through the activation; the last layer's output is the logits.
                    let hidden = i < last && self.config.architecture != Architecture::Text;
                    flat = Some(if hidden { self.activate(z) } else { z });
                }
            }
        }
        (flat.expect("the last layer is dense"), taps)
    }

    /// The closed-form Hessian of multinomial logistic regression (see
    /// [`Model::closed_form_hessian`]): H = (1/n) Σᵢ (diag pᵢ − pᵢpᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ + λI with
    /// x̃ = [x; 1]. In θ's layout (weight `[in, out]` then bias, i.e. `[(in+1), C]` row-major)
    /// entry ((j,c),(k,c′)) is (1/n) Σᵢ x̃ᵢⱼ x̃ᵢₖ (δ_cc′ p_ic − p_ic p_ic′) + λδ, built as
    /// C(C+1)/2 weighted Gram matrices X̃ᵀ diag(w) X̃. Cost n·(in+1)²·C(C+1)/2.
    fn logreg_hessian(&self, data: &Features, l2: f64) -> Mat<f64> {
        let classes = self.config.num_classes;
        let (n, dim) = (data.len(), data.dim());
        let m = dim + 1;
        let mut p = Vec::with_capacity(n * classes);
        for start in (0..n).step_by(4096) {
            let chunk = crate::model::Batch::slice(data, start..(start + 4096).min(n));
            p.extend(read_f64(probabilities(self.logits(&chunk))));
        }
        let x = data.features();
        let xt = Mat::<f64>::from_fn(n, m, |i, j| if j < dim { f64::from(x[i * dim + j]) } else { 1.0 });
        let mut h = Mat::<f64>::zeros(m * classes, m * classes);
        for c in 0..classes {
            for c2 in c..classes {
                let weighted = Mat::<f64>::from_fn(n, m, |i, j| {
                    let pi = &p[i * classes..(i + 1) * classes];
                    let w = if c == c2 { pi[c] - pi[c] * pi[c] } else { -pi[c] * pi[c2] };
                    xt[(i, j)] * w / n as f64
                });
                let block = xt.transpose() * &weighted;
                for j in 0..m {
                    for k in 0..m {
                        h[(j * classes + c, k * classes + c2)] = block[(j, k)];
                        h[(k * classes + c2, j * classes + c)] = block[(j, k)];
                    }
                }
            }
        }
        for i in 0..m * classes {
            h[(i, i)] += l2;
        }
        h
    }
}

impl Model for Network {
    type Batch = Features;

    fn describe(&self) -> String {
        let widths: Vec<String> = std::iter::once(self.config.input.len())
            .chain(self.specs.iter().map(|s| match s.kind {
                LayerKind::Dense { outputs, .. } => outputs,
                LayerKind::Conv2d { out_channels, .. } => out_channels,
            }))
            .map(|w| w.to_string())
            .collect();
        format!("{} {}", self.config.architecture.name(), widths.join("-"))
    }

    fn num_classes(&self) -> usize {
        self.config.num_classes
    }

    fn layers(&self) -> &[TrackedLayer] {
        &self.tracked
    }

    fn parameters(&self) -> Vec<Tensor<1>> {
        self.params.iter().flat_map(|p| std::iter::once(p.weight.clone()).chain(p.bias.clone())).collect()
    }

    fn set_parameters(&mut self, parameters: Vec<Tensor<1>>) {
        let mut it = parameters.into_iter();
        for p in &mut self.params {
            p.weight = it.next().expect("one tensor per parameter");
            if p.bias.is_some() {
                p.bias = Some(it.next().expect("one tensor per parameter"));
            }
        }
    }

    fn forward(&self, batch: &Features, tapped: bool) -> (Tensor<2>, Vec<LayerTap>) {
        assert_eq!(batch.dim(), self.config.input.len(), "the batch's features do not fit the model");
        self.forward_impl(batch.tensor(&self.device(), self.dtype()), tapped)
    }

    fn is_convex(&self) -> bool {
        self.config.architecture.is_convex()
    }

    fn closed_form_hessian(&self, data: &Features, l2: f64) -> Option<Mat<f64>> {
        (self.config.architecture == Architecture::LogReg).then(|| self.logreg_hessian(data, l2))
    }

    /// Consecutive layers: the text model's embedding feeds its linear layer directly (a linear
    /// link); hidden MLP and CNN layers go through the activation, and with ReLU (positively
    /// homogeneous, as is the CNN's max-pooling) each is a homogeneous link. A convolution's
    /// channel o reaches the next convolution's patch inputs o·k²..(o+1)·k² (the unfolded
    /// patches are channel-major, as the weight `[out, in, k, k]`), and the dense head's inputs
    /// o·h·w..(o+1)·h·w after the flatten of `[channels, h, w]`.
    fn unit_links(&self) -> Vec<UnitLink> {
        let kind = match (self.config.architecture, self.config.activation) {
            (Architecture::Text, _) => LinkKind::Linear,
            (_, Activation::Relu) => LinkKind::Homogeneous,
            _ => return Vec::new(),
        };
        self.specs
            .windows(2)
            .enumerate()
            .map(|(producer, pair)| {
                let stride = match (&pair[0].kind, &pair[1].kind) {
                    (_, LayerKind::Conv2d { kernel, .. }) => kernel * kernel,
                    (LayerKind::Conv2d { out_channels, .. }, LayerKind::Dense { inputs, .. }) => inputs / out_channels,
                    (LayerKind::Dense { .. }, LayerKind::Dense { .. }) => 1,
                };
                UnitLink { producer, consumer: producer + 1, stride, kind }
            })
            .collect()
    }
}

/// Per-example cross-entropy `[batch]` for logits `[batch, classes]` and one-hot targets:
/// ℓᵢ = −Σ_c yᵢ_c log softmax(zᵢ)_c.
pub fn cross_entropy(logits: Tensor<2>, one_hot: Tensor<2>) -> Tensor<1> {
    let b = logits.dims()[0];
    (log_softmax(logits, 1) * one_hot).sum_dim(1).reshape([b]).neg()
}

/// Class probabilities `[batch, classes]` from logits.
pub fn probabilities(logits: Tensor<2>) -> Tensor<2> {
    softmax(logits, 1)
}

/// One-hot targets `[batch, classes]` in the given dtype.
pub fn one_hot(labels: &[u32], classes: usize, device: &Device, dtype: DType) -> Tensor<2> {
    let mut v = vec![0.0f32; labels.len() * classes];
    for (i, &y) in labels.iter().enumerate() {
        v[i * classes + y as usize] = 1.0;
    }
    Tensor::from_data(TensorData::new(v, [labels.len(), classes]).convert_dtype(dtype), (device, dtype))
}

/// An input batch `[rows, d]` in the given dtype from row-major f32 features.
pub fn input_batch(features: &[f32], d: usize, device: &Device, dtype: DType) -> Tensor<2> {
    let rows = features.len() / d;
    Tensor::from_data(TensorData::new(features.to_vec(), [rows, d]).convert_dtype(dtype), (device, dtype))
}

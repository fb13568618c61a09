//! A model's parameters, its forward pass, and the layer taps that per-example gradients need.
//!
//! Parameters are kept as flat 1-D burn tensors, one weight and one optional bias per trainable
//! layer (layouts in [`LayerKind`]), and reshaped in the forward pass; reshaping is free and keeps
//! the parameter vector θ, the optimizer state and the on-disk weights in one order.
//!
//! ## Layer taps
//! For a layer z = f(a; W, b) the gradient of example i's loss ℓᵢ with respect to W is built from
//! the layer's input aᵢ and the output gradient δᵢ = ∂ℓᵢ/∂zᵢ: for a dense layer ∇_W ℓᵢ = aᵢ δᵢᵀ
//! and ∇_b ℓᵢ = δᵢ. [`Network::forward_tapped`] records every layer's input and adds a zero
//! "probe" tensor (with `require_grad`) to every layer's output; one backward pass of the
//! *summed* loss Σᵢ ℓᵢ then gives each probe's gradient, whose row i is exactly δᵢ because ℓⱼ does
//! not depend on zᵢ for j ≠ i. Cost: one forward and one backward for the whole batch.

use burn::tensor::activation::{gelu, log_softmax, relu, softmax, tanh};
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{DType, Device, Gradients, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ModelError;
use crate::config::{Activation, Architecture, LayerKind, LayerSpec, ModelConfig};

/// One trainable layer's parameters as flat tensors.
#[derive(Clone, Debug)]
struct LayerParams {
    weight: Tensor<1>,
    bias: Option<Tensor<1>>,
}

/// A layer's input or output activations, per example.
#[derive(Clone, Debug)]
pub enum Activations {
    /// `[batch, features]`, for dense layers.
    Dense(Tensor<2>),
    /// `[batch, channels, height, width]`, for convolutions.
    Conv(Tensor<4>),
}

impl Activations {
    /// Flattens to `[batch, rest]`.
    pub fn flatten(self) -> Tensor<2> {
        match self {
            Self::Dense(t) => t,
            Self::Conv(t) => {
                let [b, c, h, w] = t.dims();
                t.reshape([b, c * h * w])
            }
        }
    }
}

/// What the forward pass recorded for one trainable layer: its input and the probe on its output.
#[derive(Clone, Debug)]
pub struct LayerTap {
    /// The layer's input activations aᵢ (detached from the graph).
    pub input: Activations,
    probe: Activations,
}

impl LayerTap {
    /// The per-example output gradients δᵢ = ∂ℓᵢ/∂zᵢ, read from the probe after a backward pass of
    /// the summed loss. `None` if the loss did not depend on this layer.
    pub fn output_gradient(&self, grads: &Gradients) -> Option<Activations> {
        match &self.probe {
            Activations::Dense(p) => p.grad(grads).map(Activations::Dense),
            Activations::Conv(p) => p.grad(grads).map(Activations::Conv),
        }
    }
}

/// A model: its configuration and its parameters θ on one device, in one dtype.
#[derive(Clone, Debug)]
pub struct Network {
    config: ModelConfig,
    layers: Vec<LayerSpec>,
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
        let layers = config.layers()?;
        let expected: usize = layers.iter().map(LayerSpec::num_params).sum();
        if theta.len() != expected {
            return Err(ModelError::Config(format!(
                "the weights hold {} parameters but a {} of this shape has {expected}",
                theta.len(),
                config.architecture.name()
            )));
        }
        let mut offset = 0;
        let mut params = Vec::with_capacity(layers.len());
        for layer in &layers {
            let w = layer.weight_len();
            let weight = tensor_1d(theta[offset..offset + w].to_vec(), device, dtype);
            offset += w;
            let b = layer.bias_len();
            let bias = (b > 0).then(|| tensor_1d(theta[offset..offset + b].to_vec(), device, dtype));
            offset += b;
            params.push(LayerParams { weight, bias });
        }
        Ok(Self { config: config.clone(), layers, params })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The trainable layers, in θ order.
    pub fn layers(&self) -> &[LayerSpec] {
        &self.layers
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.layers.iter().map(LayerSpec::num_params).sum()
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.params[0].weight.device()
    }

    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.params[0].weight.dtype()
    }

    /// The parameter tensors in θ order (weight, then bias, per layer).
    pub fn param_tensors(&self) -> Vec<&Tensor<1>> {
        self.params.iter().flat_map(|p| std::iter::once(&p.weight).chain(p.bias.as_ref())).collect()
    }

    /// Replaces the parameter tensors (same order and sizes as [`Self::param_tensors`]).
    pub fn set_param_tensors(&mut self, tensors: Vec<Tensor<1>>) {
        let mut it = tensors.into_iter();
        for p in &mut self.params {
            p.weight = it.next().expect("one tensor per parameter");
            if p.bias.is_some() {
                p.bias = Some(it.next().expect("one tensor per parameter"));
            }
        }
    }

    /// Marks every parameter as requiring a gradient (the device must have autodiff).
    pub fn require_grad(mut self) -> Self {
        for p in &mut self.params {
            p.weight = p.weight.clone().require_grad();
            p.bias = p.bias.take().map(Tensor::require_grad);
        }
        self
    }

    /// The same parameters with no gradient tracking (for inference and storage).
    pub fn without_grad(mut self) -> Self {
        for p in &mut self.params {
            p.weight = Tensor::from_inner(p.weight.clone().inner());
            p.bias = p.bias.take().map(|b| Tensor::from_inner(b.inner()));
        }
        self
    }

    /// θ as a flat f64 vector.
    pub fn to_flat(&self) -> Vec<f64> {
        let mut theta = Vec::with_capacity(self.num_params());
        for t in self.param_tensors() {
            theta.extend(read_f64(t.clone()));
        }
        theta
    }

    /// ∇θ as a flat f64 vector from a backward pass (zeros for parameters the loss did not reach).
    pub fn gradient_flat(&self, grads: &Gradients) -> Vec<f64> {
        let mut g = Vec::with_capacity(self.num_params());
        for t in self.param_tensors() {
            match t.grad(grads) {
                Some(gt) => g.extend(read_f64(gt)),
                None => g.extend(std::iter::repeat_n(0.0, t.dims()[0])),
            }
        }
        g
    }

    /// Σ‖θ‖², the L2 penalty's sum of squares, as a one-element tensor in the graph.
    pub fn squared_norm(&self) -> Tensor<1> {
        self.param_tensors()
            .into_iter()
            .map(|t| t.clone().square().sum())
            .reduce(|a, b| a + b)
            .expect("a model has parameters")
    }

    /// The logits `[batch, classes]` for inputs `[batch, features]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward_impl(x, false).0
    }

    /// The logits plus one [`LayerTap`] per trainable layer (θ order). The device must have
    /// autodiff; back-propagate the *sum* of per-example losses, then read
    /// [`LayerTap::output_gradient`].
    pub fn forward_tapped(&self, x: Tensor<2>) -> (Tensor<2>, Vec<LayerTap>) {
        self.forward_impl(x, true)
    }

    fn activate<const D: usize>(&self, t: Tensor<D>) -> Tensor<D> {
        match self.config.activation {
            Activation::Relu => relu(t),
            Activation::Tanh => tanh(t),
            Activation::Gelu => gelu(t),
        }
    }

    fn forward_impl(&self, x: Tensor<2>, tapped: bool) -> (Tensor<2>, Vec<LayerTap>) {
        let mut taps = Vec::new();
        let batch = x.dims()[0];
        let last = self.layers.len() - 1;
        let mut flat = Some(x);
        let mut image: Option<Tensor<4>> = None;
        if self.config.architecture == Architecture::Cnn {
            let shape = self.config.input.as_image().expect("checked by ModelConfig::layers");
            let x = flat.take().expect("input");
            image = Some(x.reshape([batch, shape.channels, shape.height, shape.width]));
        }
        for (i, (spec, p)) in self.layers.iter().zip(&self.params).enumerate() {
            match spec.kind {
                LayerKind::Conv2d { in_channels, out_channels, kernel, padding, .. } => {
                    let a = image.take().expect("convolutions come first");
                    let w = p.weight.clone().reshape([out_channels, in_channels, kernel, kernel]);
                    let options = ConvOptions::new([1, 1], [padding, padding], [1, 1], 1);
                    let mut z = conv2d(a.clone(), w, p.bias.clone(), options);
                    if tapped {
                        let probe = Tensor::zeros(z.dims(), (&z.device(), z.dtype())).require_grad();
                        z = z + probe.clone();
                        taps.push(LayerTap { input: Activations::Conv(a.detach()), probe: Activations::Conv(probe) });
                    }
                    let pooled = max_pool2d(self.activate(z), MaxPoolOptions::new([2, 2]));
                    let next_is_dense = matches!(self.layers[i + 1].kind, LayerKind::Dense { .. });
                    if next_is_dense {
                        let [b, c, h, w] = pooled.dims();
                        flat = Some(pooled.reshape([b, c * h * w]));
                    } else {
                        image = Some(pooled);
                    }
                }
                LayerKind::Dense { inputs, outputs, .. } => {
                    let a = flat.take().expect("dense input");
                    let w = p.weight.clone().reshape([inputs, outputs]);
                    let mut z = a.clone().matmul(w);
                    if let Some(b) = &p.bias {
                        z = z + b.clone().reshape([1, outputs]);
                    }
                    if tapped {
                        let probe = Tensor::zeros(z.dims(), (&z.device(), z.dtype())).require_grad();
                        z = z + probe.clone();
                        taps.push(LayerTap { input: Activations::Dense(a.detach()), probe: Activations::Dense(probe) });
                    }
                    // The embedding bag feeds the linear layer directly; hidden MLP/CNN layers
                    // go through the activation; the last layer's output is the logits.
                    let hidden = i < last && self.config.architecture != Architecture::Text;
                    flat = Some(if hidden { self.activate(z) } else { z });
                }
            }
        }
        (flat.expect("the last layer is dense"), taps)
    }
}

/// Reads a tensor's values as f64 on the host.
pub fn read_f64<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert_dtype(DType::F64).try_into_vec::<f64>().expect("float tensor data")
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

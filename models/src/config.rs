//! Model configuration: which architecture, its sizes, and the trainable layers it implies.
//!
//! A [`ModelConfig`] is plain data (serialised into every run directory as JSON). From it
//! [`ModelConfig::layers`] derives the list of trainable layers, each a [`LayerSpec`]; the
//! parameter vector θ of a model is the concatenation, layer by layer, of each layer's weight
//! (in the layout stated on [`LayerKind`]) followed by its bias. Every later step of the
//! pipeline (per-example gradients, curvature, scores) indexes θ in this order.

use serde::{Deserialize, Serialize};

use crate::ModelError;
use crate::model::{TrackedLayer, WeightLayout};

/// The reference architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Multinomial logistic regression: logits = x W + b. Convex; trained to the optimum in f64.
    #[value(name = "logreg")]
    LogReg,
    /// Multi-layer perceptron: `Dense → act → … → Dense`, hidden widths from [`ModelConfig::hidden`].
    Mlp,
    /// LeNet-style CNN: two 5×5 convolutions (6 and 16 channels, "same" padding), each followed by
    /// the activation and 2×2 max pooling, then a dense head with widths [`ModelConfig::hidden`].
    Cnn,
    /// Text classifier: an embedding bag (mean of hashed-token embeddings, no bias) then a linear
    /// layer, as in fastText. Its input is the hashed bag-of-words vector (see the data loader).
    Text,
}

impl Architecture {
    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::LogReg => "logreg",
            Self::Mlp => "mlp",
            Self::Cnn => "cnn",
            Self::Text => "text",
        }
    }

    /// Whether the training objective is convex in θ (then it is trained to the optimum in f64).
    pub fn is_convex(self) -> bool {
        matches!(self, Self::LogReg)
    }

    /// Default hidden widths when none are given.
    pub fn default_hidden(self) -> Vec<usize> {
        match self {
            Self::LogReg => vec![],
            Self::Mlp => vec![512, 256],
            Self::Cnn => vec![120, 84],
            Self::Text => vec![64],
        }
    }
}

/// Elementwise nonlinearity between layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// max(0, x).
    #[default]
    Relu,
    /// tanh(x).
    Tanh,
    /// x Φ(x) (exact, erf-based).
    Gelu,
}

/// Shape of one input example: `channels × height × width`. Flat (tabular, text) inputs are
/// `1 × 1 × d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputShape {
    /// Number of channels.
    pub channels: usize,
    /// Height in pixels (1 for flat inputs).
    pub height: usize,
    /// Width in pixels (the feature count for flat inputs).
    pub width: usize,
}

impl InputShape {
    /// A flat vector of `d` features.
    pub fn flat(d: usize) -> Self {
        Self { channels: 1, height: 1, width: d }
    }

    /// Number of scalars in one example.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Whether the shape holds no scalars.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape as an image: itself if it has height, else a square `1 × s × s` when the flat
    /// length is a perfect square (scikit-learn's 8×8 digits stored as 64 CSV columns), else `None`.
    pub fn as_image(&self) -> Option<Self> {
        if self.height > 1 {
            return Some(*self);
        }
        let d = self.len();
        let s = (d as f64).sqrt().round() as usize;
        (s >= 2 && s * s == d).then_some(Self { channels: 1, height: s, width: s })
    }
}

/// The kind and size of one trainable layer, and the layout of its weight inside θ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    /// z = a W + b with a ∈ ℝ^inputs. Weight layout: `[inputs, outputs]`, row-major.
    Dense {
        /// Input width.
        inputs: usize,
        /// Output width.
        outputs: usize,
        /// Whether the layer has a bias (the embedding bag has none).
        bias: bool,
    },
    /// 2-D convolution, stride 1, zero padding `padding`, on `height × width` inputs.
    /// Weight layout: `[out_channels, in_channels, kernel, kernel]`, row-major.
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Square kernel size.
        kernel: usize,
        /// Zero padding on each side.
        padding: usize,
        /// Input height.
        height: usize,
        /// Input width.
        width: usize,
    },
}

/// One trainable layer: a name for reports and its kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Human-readable name, e.g. `dense0`, `conv1`, `embedding`.
    pub name: String,
    /// Kind and size.
    pub kind: LayerKind,
}

impl LayerSpec {
    /// Shape of the weight tensor.
    pub fn weight_shape(&self) -> Vec<usize> {
        match self.kind {
            LayerKind::Dense { inputs, outputs, .. } => vec![inputs, outputs],
            LayerKind::Conv2d { in_channels, out_channels, kernel, .. } => {
                vec![out_channels, in_channels, kernel, kernel]
            }
        }
    }

    /// Number of weight scalars.
    pub fn weight_len(&self) -> usize {
        self.weight_shape().iter().product()
    }

    /// Number of bias scalars (0 when the layer has none).
    pub fn bias_len(&self) -> usize {
        match self.kind {
            LayerKind::Dense { outputs, bias, .. } => {
                if bias {
                    outputs
                } else {
                    0
                }
            }
            LayerKind::Conv2d { out_channels, .. } => out_channels,
        }
    }

    /// Number of parameters (weight plus bias).
    pub fn num_params(&self) -> usize {
        self.weight_len() + self.bias_len()
    }

    /// Fan-in, used for initialisation: inputs for dense, `in_channels · kernel²` for conv.
    pub fn fan_in(&self) -> usize {
        match self.kind {
            LayerKind::Dense { inputs, .. } => inputs,
            LayerKind::Conv2d { in_channels, kernel, .. } => in_channels * kernel * kernel,
        }
    }
}

/// Everything that fixes a model's shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture.
    pub architecture: Architecture,
    /// Shape of one input example.
    pub input: InputShape,
    /// Number of classes.
    pub num_classes: usize,
    /// Hidden widths: MLP layers, the CNN's dense head, or the text model's embedding size.
    pub hidden: Vec<usize>,
    /// Nonlinearity between layers (unused by `logreg` and `text`).
    pub activation: Activation,
}

/// Output channels of the CNN's two convolutions.
pub const CNN_CHANNELS: [usize; 2] = [6, 16];
/// Kernel size of the CNN's convolutions.
pub const CNN_KERNEL: usize = 5;

impl ModelConfig {
    /// Checks the sizes and derives the trainable layers, in θ order.
    pub fn layers(&self) -> Result<Vec<LayerSpec>, ModelError> {
        if self.num_classes < 2 {
            return Err(ModelError::Config(format!(
                "a classifier needs at least 2 classes, the data has {}",
                self.num_classes
            )));
        }
        if self.input.is_empty() {
            return Err(ModelError::Config("the input has no features".into()));
        }
        if self.hidden.contains(&0) {
            return Err(ModelError::Config("hidden widths must be positive".into()));
        }
        let dense = |name: String, inputs: usize, outputs: usize, bias: bool| LayerSpec {
            name,
            kind: LayerKind::Dense { inputs, outputs, bias },
        };
        let head = |first_inputs: usize, widths: &[usize]| {
            let mut layers = Vec::new();
            let mut inputs = first_inputs;
            for (i, &w) in widths.iter().chain([self.num_classes].iter()).enumerate() {
                layers.push(dense(format!("dense{i}"), inputs, w, true));
                inputs = w;
            }
            layers
        };
        let d = self.input.len();
        Ok(match self.architecture {
            Architecture::LogReg => {
                if !self.hidden.is_empty() {
                    return Err(ModelError::Config("logreg has no hidden layers; drop --hidden".into()));
                }
                head(d, &[])
            }
            Architecture::Mlp => head(d, &self.hidden),
            Architecture::Text => {
                if self.hidden.len() != 1 {
                    return Err(ModelError::Config("the text model takes one hidden width: its embedding size".into()));
                }
                vec![
                    dense("embedding".into(), d, self.hidden[0], false),
                    dense("linear".into(), self.hidden[0], self.num_classes, true),
                ]
            }
            Architecture::Cnn => {
                let image = self.input.as_image().ok_or_else(|| {
                    ModelError::Config(format!("cnn needs image input; {d} features are neither an image nor a square"))
                })?;
                if image.height < 4 || image.width < 4 {
                    return Err(ModelError::Config(format!(
                        "cnn needs images of at least 4x4, got {}x{}",
                        image.height, image.width
                    )));
                }
                let [c1, c2] = CNN_CHANNELS;
                let conv = |name: &str, i: usize, o: usize, h: usize, w: usize| LayerSpec {
                    name: name.into(),
                    kind: LayerKind::Conv2d {
                        in_channels: i,
                        out_channels: o,
                        kernel: CNN_KERNEL,
                        padding: CNN_KERNEL / 2,
                        height: h,
                        width: w,
                    },
                };
                let (h, w) = (image.height, image.width);
                let mut layers = vec![conv("conv0", image.channels, c1, h, w), conv("conv1", c1, c2, h / 2, w / 2)];
                layers.extend(head(c2 * (h / 4) * (w / 4), &self.hidden));
                layers
            }
        })
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> Result<usize, ModelError> {
        Ok(self.layers()?.iter().map(LayerSpec::num_params).sum())
    }

    /// The layers as the engine tracks them (every trainable layer): dense layers at one
    /// position with the weight `[inputs, outputs]`, convolutions at every output pixel with
    /// inputs the unfolded `C·k·k` patches and the weight `[out_channels, C·k·k]`.
    pub fn tracked_layers(&self) -> Result<Vec<TrackedLayer>, ModelError> {
        let mut offset = 0;
        let mut tracked = Vec::new();
        for spec in self.layers()? {
            let (inputs, outputs, bias, positions, layout) = match spec.kind {
                LayerKind::Dense { inputs, outputs, bias } => (inputs, outputs, bias, 1, WeightLayout::InputMajor),
                LayerKind::Conv2d { in_channels, out_channels, kernel, height, width, .. } => {
                    (in_channels * kernel * kernel, out_channels, true, height * width, WeightLayout::OutputMajor)
                }
            };
            tracked.push(TrackedLayer { name: spec.name.clone(), inputs, outputs, bias, positions, layout, offset });
            offset += spec.num_params();
        }
        Ok(tracked)
    }
}

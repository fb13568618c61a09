//! Gradient compression: random projections that keep inner products unbiased.
//!
//! Every later step (curvature, scores) works with inner products of per-example gradients, so a
//! projection g ↦ Pᵀg with E[P Pᵀ] = I is enough: E[⟨Pᵀg, Pᵀg'⟩] = gᵀ E[P Pᵀ] g' = ⟨g, g'⟩.
//!
//! - `none`: the exact gradient, one row of length d = #θ per example (θ order).
//! - `jl:K` (Johnson–Lindenstrauss): Pᵀg with P ∈ ℝ^{d×K} of i.i.d. N(0, 1/K) entries (or ±1/√K,
//!   `jl:K:rademacher`). Row of K. Relative error of an inner product ≈ √(2/K) of the product of
//!   norms (Achlioptas 2003). Cost: B·d·K per batch and d·K floats of memory for P, so it suits
//!   models up to a few hundred thousand parameters.
//! - `kron:KINxKOUT` (LoGra, Choe et al. 2024): per layer, with aᵢ the input augmented by a
//!   constant 1 for the bias and δᵢ the output gradient, the gradient aᵢ ⊗ δᵢ becomes
//!   (P_inᵀ aᵢ) ⊗ (P_outᵀ δᵢ), never forming the full gradient (for a convolution, the sum over
//!   positions of such products). P_in, P_out are independent N(0, 1/k) matrices, so
//!   E[(P_in ⊗ P_out)(P_in ⊗ P_out)ᵀ] = I. A side whose k is at least its dimension is left
//!   exact (identity). Row of Σ_layers k_in·k_out. Cost: B·(in·k_in + out·k_out + k_in·k_out)·L.
//!   Memory for P: Σ_layers (in·k_in + out·k_out). On a wgpu device a layer's rows come from
//!   culprit-kernels' fused kernel (`projection`, no projected factors written) or from these
//!   matmuls, whichever ran faster for the layer's shape.
//! - `factors:KINxKOUT` (or `factors`, exact factors): the same Kronecker projection, but the row
//!   keeps the two projected factors [P_inᵀaᵢ; P_outᵀδᵢ] (k_in + k_out values per layer) instead
//!   of their k_in·k_out outer product, so the store shrinks by k_in·k_out/(k_in + k_out) (16× at
//!   32×32; an MLP 784-256-10 stores 1308 values per example exactly instead of 203530). Queries
//!   live in the same k_in×k_out space as for `kron`, and a row's score is computed without
//!   forming the gradient: ⟨Q, ã ⊗ δ̃⟩ = ãᵀ Q δ̃ (k_in·k_out multiply-adds per layer and query, see
//!   [`crate::query`]). Dense layers only (a convolution's gradient is a sum over positions, not
//!   one outer product).
//!
//! The projection error is variance only: the mean over independent seeds converges to the exact
//! inner product (tested in `tests/gradients`). Matrices are drawn from a ChaCha8 generator seeded
//! by `seed`, one stream per layer and side, so a store's projection is reproducible anywhere.

use burn::tensor::{DType, Device, Tensor, TensorData};
use culprit_models::model::TrackedLayer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::LayerFactors;
use crate::error::{Error, Result};
use crate::simd::{flushed, narrow};

/// Largest JL matrix culprit will build (bytes).
const MAX_JL_BYTES: usize = 4 << 30;

/// Distribution of the projection entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entries {
    /// N(0, 1/k).
    Gaussian,
    /// ±1/√k with equal probability.
    Rademacher,
}

/// A projection, as given on the command line (`--project`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectionSpec {
    /// Exact gradients.
    None,
    /// Dense Johnson–Lindenstrauss to `dim`.
    Jl {
        /// Output dimension K.
        dim: usize,
        /// Entry distribution.
        entries: Entries,
    },
    /// Kronecker (LoGra) per layer.
    Kron {
        /// Input-side dimension.
        k_in: usize,
        /// Output-side dimension.
        k_out: usize,
    },
    /// Kronecker per layer, stored as the two projected factors (`usize::MAX`: that side exact).
    Factors {
        /// Input-side dimension.
        k_in: usize,
        /// Output-side dimension.
        k_out: usize,
    },
}

impl ProjectionSpec {
    /// Parses `none`, `jl:K`, `jl:K:rademacher`, `kron:KINxKOUT`, `factors` or `factors:KINxKOUT`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            Error::Usage(format!(
                "unknown projection `{text}` (expected none, jl:K, jl:K:rademacher, kron:KINxKOUT, factors or factors:KINxKOUT)"
            ))
        };
        let positive = |s: &str| s.parse::<usize>().ok().filter(|v| *v > 0).ok_or_else(bad);
        let parts: Vec<&str> = text.split(':').collect();
        match parts.as_slice() {
            ["none"] => Ok(Self::None),
            ["jl", k] => Ok(Self::Jl { dim: positive(k)?, entries: Entries::Gaussian }),
            ["jl", k, "gaussian"] => Ok(Self::Jl { dim: positive(k)?, entries: Entries::Gaussian }),
            ["jl", k, "rademacher"] => Ok(Self::Jl { dim: positive(k)?, entries: Entries::Rademacher }),
            ["kron", dims] => {
                let (a, b) = dims.split_once('x').ok_or_else(bad)?;
                Ok(Self::Kron { k_in: positive(a)?, k_out: positive(b)? })
            }
            ["factors"] => Ok(Self::Factors { k_in: usize::MAX, k_out: usize::MAX }),
            ["factors", dims] => {
                let (a, b) = dims.split_once('x').ok_or_else(bad)?;
                Ok(Self::Factors { k_in: positive(a)?, k_out: positive(b)? })
            }
            _ => Err(bad()),
        }
    }
}

impl std::str::FromStr for ProjectionSpec {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Self::parse(text)
    }
}

impl std::fmt::Display for ProjectionSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::Jl { dim, entries: Entries::Gaussian } => write!(f, "jl:{dim}"),
            Self::Jl { dim, entries: Entries::Rademacher } => write!(f, "jl:{dim}:rademacher"),
            Self::Kron { k_in, k_out } => write!(f, "kron:{k_in}x{k_out}"),
            Self::Factors { k_in: usize::MAX, k_out: usize::MAX } => write!(f, "factors"),
            Self::Factors { k_in, k_out } => write!(f, "factors:{k_in}x{k_out}"),
        }
    }
}

/// Where one layer's block sits inside a projected row.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockLayout {
    /// Layer name (or `jl` for the single JL block).
    pub name: String,
    /// Offset in the row.
    pub offset: usize,
    /// Length.
    pub len: usize,
    /// For Kronecker blocks: (k_in, k_out), the block being `k_in × k_out` row-major.
    pub kron: Option<(usize, usize)>,
    /// The block holds the two factors [ã (k_in); δ̃ (k_out)] of a `kron` block rather than their
    /// product (`factors` stores); queries keep the `k_in × k_out` block.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub factored: bool,
}

impl BlockLayout {
    /// Length of this block in a query: k_in·k_out for factored blocks, else the block's length.
    pub fn query_len(&self) -> usize {
        match (self.factored, self.kron) {
            (true, Some((a, b))) => a * b,
            _ => self.len,
        }
    }
}

/// Whether rows laid out as `layout` hold factors (scored as ãᵀQδ̃) rather than gradients.
pub fn is_factored(layout: &[BlockLayout]) -> bool {
    layout.iter().any(|b| b.factored)
}

/// A factored row expanded into the query space (each factored block becomes ã ⊗ δ̃, row-major
/// k_in × k_out); other blocks are copied. Cost Σ k_in·k_out.
pub fn expand_row(layout: &[BlockLayout], row: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(layout.iter().map(BlockLayout::query_len).sum());
    for b in layout {
        let block = &row[b.offset..b.offset + b.len];
        match (b.factored, b.kron) {
            (true, Some((ki, _))) => {
                let (a, d) = block.split_at(ki);
                for x in a {
                    out.extend(d.iter().map(|y| x * y));
                }
            }
            _ => out.extend_from_slice(block),
        }
    }
    out
}

enum LayerProjection {
    Exact,
    Jl { weight: Tensor<2>, bias: Option<Tensor<2>> },
    Kron { p_in: Option<(Tensor<2>, Option<Tensor<2>>)>, p_out: Option<Tensor<2>>, k_in: usize, k_out: usize },
}

/// Applies a [`ProjectionSpec`] to the per-example factors of a model's tracked layers.
pub struct Projector {
    spec: ProjectionSpec,
    tracked: Vec<TrackedLayer>,
    layers: Vec<LayerProjection>,
    layout: Vec<BlockLayout>,
}

/// A `rows × cols` matrix of i.i.d. entries with variance 1/cols, from stream `stream` of `seed`.
pub fn random_matrix(rows: usize, cols: usize, entries: Entries, seed: u64, stream: u64, device: &Device) -> Tensor<2> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let scale = 1.0 / (cols as f64).sqrt();
    let mut v = Vec::with_capacity(rows * cols);
    match entries {
        Entries::Rademacher => {
            v.extend((0..rows * cols).map(|_| if rng.random::<bool>() { scale as f32 } else { -scale as f32 }))
        }
        Entries::Gaussian => {
            while v.len() < rows * cols {
                // Box–Muller: two independent N(0, 1) from two uniforms on (0, 1].
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt() * scale;
                let t = std::f64::consts::TAU * u2;
                v.push((r * t.cos()) as f32);
                if v.len() < rows * cols {
                    v.push((r * t.sin()) as f32);
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(v, [rows, cols]), (device, DType::F32))
}

impl Projector {
    /// Builds the projection matrices for the tracked `layers` on `device`.
    pub fn new(spec: ProjectionSpec, seed: u64, layers: &[TrackedLayer], device: &Device) -> Result<Self> {
        let (projections, layout) = match spec {
            ProjectionSpec::None => Self::exact(layers),
            ProjectionSpec::Jl { dim, entries } => Self::jl(layers, dim, entries, seed, device)?,
            ProjectionSpec::Kron { k_in, k_out } => Self::kron(layers, (k_in, k_out), false, seed, device),
            ProjectionSpec::Factors { k_in, k_out } => {
                if let Some(l) = layers.iter().find(|l| l.positions != 1) {
                    return Err(Error::Usage(format!(
                        "{spec} stores one outer product per layer; layer {} sums {} of them over its positions (a convolution or a sequence): use kron:KINxKOUT",
                        l.name, l.positions
                    )));
                }
                Self::kron(layers, (k_in, k_out), true, seed, device)
            }
        };
        Ok(Self { spec, tracked: layers.to_vec(), layers: projections, layout })
    }

    fn exact(layers: &[TrackedLayer]) -> (Vec<LayerProjection>, Vec<BlockLayout>) {
        let mut offset = 0;
        let mut layout = Vec::new();
        for l in layers {
            layout.push(BlockLayout { name: l.name.clone(), offset, len: l.num_params(), kron: None, factored: false });
            offset += l.num_params();
        }
        (layers.iter().map(|_| LayerProjection::Exact).collect(), layout)
    }

    /// One matrix of d × K split by layer blocks; each block its own stream, all scaled 1/√K.
    fn jl(
        layers: &[TrackedLayer],
        dim: usize,
        entries: Entries,
        seed: u64,
        device: &Device,
    ) -> Result<(Vec<LayerProjection>, Vec<BlockLayout>)> {
        let params = culprit_models::model::tracked_len(layers);
        let bytes = params * dim * 4;
        if bytes > MAX_JL_BYTES {
            return Err(Error::Usage(format!(
                "jl:{dim} on {params} parameters needs a {:.1} GiB projection matrix; use kron:KINxKOUT for a model this size",
                bytes as f64 / (1u64 << 30) as f64
            )));
        }
        let projections = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let weight = random_matrix(l.weight_len(), dim, entries, seed, 2 * i as u64, device);
                let bias = (l.bias_len() > 0)
                    .then(|| random_matrix(l.bias_len(), dim, entries, seed, 2 * i as u64 + 1, device));
                LayerProjection::Jl { weight, bias }
            })
            .collect();
        Ok((projections, vec![BlockLayout { name: "jl".into(), offset: 0, len: dim, kron: None, factored: false }]))
    }

    /// Per layer, P_in (`(inputs + 1) × k_in`, the bias row split off) and P_out
    /// (`outputs × k_out`); a side whose k is at least its dimension stays exact.
    fn kron(
        layers: &[TrackedLayer],
        (k_in, k_out): (usize, usize),
        factored: bool,
        seed: u64,
        device: &Device,
    ) -> (Vec<LayerProjection>, Vec<BlockLayout>) {
        let mut offset = 0;
        let mut projections = Vec::new();
        let mut layout = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let (inputs, outputs, full_in) = (l.inputs, l.outputs, l.view_rows());
            let (ki, ko) = (k_in.min(full_in), k_out.min(outputs));
            let p_in = (ki < full_in).then(|| {
                let p = random_matrix(full_in, ki, Entries::Gaussian, seed, 2 * i as u64, device);
                if l.bias {
                    (p.clone().slice([0..inputs, 0..ki]), Some(p.slice([inputs..full_in, 0..ki])))
                } else {
                    (p, None)
                }
            });
            let p_out =
                (ko < outputs).then(|| random_matrix(outputs, ko, Entries::Gaussian, seed, 2 * i as u64 + 1, device));
            projections.push(LayerProjection::Kron { p_in, p_out, k_in: ki, k_out: ko });
            let len = if factored { ki + ko } else { ki * ko };
            layout.push(BlockLayout { name: l.name.clone(), offset, len, kron: Some((ki, ko)), factored });
            offset += len;
        }
        (projections, layout)
    }

    /// The projection.
    pub fn spec(&self) -> ProjectionSpec {
        self.spec
    }

    /// Length of a projected row.
    pub fn row_len(&self) -> usize {
        self.layout.iter().map(|b| b.len).sum()
    }

    /// Length of a projected query ([`Projector::project_vector`]): the row length, except for
    /// `factors`, whose queries are Σ k_in·k_out long.
    pub fn query_len(&self) -> usize {
        self.layout.iter().map(BlockLayout::query_len).sum()
    }

    /// Where each block sits in a row.
    pub fn layout(&self) -> &[BlockLayout] {
        &self.layout
    }

    /// Projects a vector of the tracked space (a preconditioned query, say) the way rows are
    /// projected, so that ⟨project_vector(x), row(g)⟩ estimates ⟨x, g⟩ without bias. For
    /// Kronecker blocks the layer's view X (m×o, see [`TrackedLayer::to_view`]) becomes
    /// P_inᵀ X P_out, which for a rank-one gradient ã ⊗ δ is exactly (P_inᵀã) ⊗ (P_outᵀδ).
    /// The result is [`flushed`] of subnormals: it is the scoring kernel's operand.
    pub fn project_vector(&self, x: &[f64]) -> Vec<f32> {
        let specs = &self.tracked;
        let projected: Vec<f32> = match self.spec {
            // Flushed with the other arms' results below.
            ProjectionSpec::None => x.iter().map(|v| *v as f32).collect(),
            ProjectionSpec::Jl { dim, .. } => {
                let mut total = vec![0.0f32; dim];
                let mut offset = 0;
                for (spec, p) in specs.iter().zip(&self.layers) {
                    let LayerProjection::Jl { weight, bias } = p else { unreachable!("jl layers") };
                    for (len, matrix) in [(spec.weight_len(), Some(weight)), (spec.bias_len(), bias.as_ref())] {
                        if let Some(m) = matrix.filter(|_| len > 0) {
                            let v: Vec<f32> = x[offset..offset + len].iter().map(|v| narrow(*v)).collect();
                            let row = Tensor::<2>::from_data(TensorData::new(v, [1, len]), (&m.device(), DType::F32));
                            let projected = super::read_f32(row.matmul(m.clone()));
                            total.iter_mut().zip(projected).for_each(|(t, v)| *t += v);
                        }
                        offset += len;
                    }
                }
                total
            }
            ProjectionSpec::Kron { .. } | ProjectionSpec::Factors { .. } => {
                let mut out = Vec::with_capacity(self.query_len());
                let mut offset = 0;
                for (spec, p) in specs.iter().zip(&self.layers) {
                    let LayerProjection::Kron { p_in, p_out, k_in, k_out } = p else { unreachable!("kron layers") };
                    let len = spec.num_params();
                    let view = spec.to_view(&x[offset..offset + len]);
                    offset += len;
                    let o = spec.outputs;
                    let m = view.len() / o;
                    // Work where the projection matrices live (no copies of them per query).
                    let device = match (p_in, p_out) {
                        (Some((w, _)), _) => w.device(),
                        (None, Some(po)) => po.device(),
                        (None, None) => Device::default(),
                    };
                    let xv = Tensor::<2>::from_data(
                        TensorData::new(view.iter().map(|v| narrow(*v)).collect::<Vec<_>>(), [m, o]),
                        (&device, DType::F32),
                    );
                    let left = match p_in {
                        Some((w, b)) => {
                            let (w, b) = (w.clone(), b.clone());
                            let inputs = w.dims()[0];
                            let mut t = w.transpose().matmul(xv.clone().slice([0..inputs, 0..o]));
                            if let Some(b) = b {
                                t = t + b.transpose().matmul(xv.slice([inputs..m, 0..o]));
                            }
                            t
                        }
                        None => xv,
                    };
                    let both = match p_out {
                        Some(po) => left.matmul(po.clone()),
                        None => left,
                    };
                    debug_assert_eq!(both.dims(), [*k_in, *k_out]);
                    out.extend(super::read_f32(both));
                }
                out
            }
        };
        projected.into_iter().map(flushed).collect()
    }

    /// Projects a batch's per-layer factors into host rows `batch × row_len`.
    pub fn project_rows(&self, factors: &[LayerFactors]) -> Vec<f32> {
        match self.spec {
            ProjectionSpec::None => super::exact_rows(factors, &self.tracked),
            _ => super::gradient_rows_from_blocks(self.project(factors)),
        }
    }

    /// Projects a batch's per-layer factors; returns one `[batch, len]` block per layout entry.
    pub fn project(&self, factors: &[LayerFactors]) -> Vec<Tensor<2>> {
        let specs = &self.tracked;
        // Projection matrices are f32 (the store's precision); f64 models' factors are cast.
        let cast: Vec<LayerFactors>;
        let factors = if factors.iter().any(|f| f.input.dtype() != DType::F32) {
            cast = factors
                .iter()
                .map(|f| LayerFactors {
                    input: f.input.clone().cast(DType::F32),
                    output_grad: f.output_grad.clone().cast(DType::F32),
                    bias: f.bias,
                    mask: f.mask.clone().map(|m| m.cast(DType::F32)),
                })
                .collect();
            &cast[..]
        } else {
            factors
        };
        match self.spec {
            ProjectionSpec::None => factors
                .iter()
                .zip(specs)
                .flat_map(|(f, s)| {
                    let g = f.gradient(s);
                    std::iter::once(g.weight).chain(g.bias)
                })
                .collect(),
            ProjectionSpec::Jl { .. } => {
                let mut total: Option<Tensor<2>> = None;
                for ((f, s), p) in factors.iter().zip(specs).zip(&self.layers) {
                    let LayerProjection::Jl { weight, bias } = p else { unreachable!("jl layers") };
                    let g = f.gradient(s);
                    let mut part = g.weight.matmul(weight.clone());
                    if let (Some(gb), Some(pb)) = (g.bias, bias) {
                        part = part + gb.matmul(pb.clone());
                    }
                    total = Some(match total {
                        Some(t) => t + part,
                        None => part,
                    });
                }
                vec![total.expect("a model has layers")]
            }
            ProjectionSpec::Kron { .. } | ProjectionSpec::Factors { .. } => factors
                .iter()
                .zip(&self.layers)
                .map(|(f, p)| {
                    let LayerProjection::Kron { p_in, p_out, k_in, k_out } = p else { unreachable!("kron layers") };
                    if matches!(self.spec, ProjectionSpec::Kron { .. })
                        && let Some(rows) = kron_rows_on_gpu(f, p_in.as_ref(), p_out.as_ref())
                    {
                        return rows;
                    }
                    let (pa, pd) = projected_factors(f, p_in.as_ref(), p_out.as_ref());
                    let b = pa.dims()[0];
                    match self.spec {
                        // Dense layers only (checked in `new`): one position, so the factors are the row.
                        ProjectionSpec::Factors { .. } => {
                            Tensor::cat(vec![pa.reshape([b, *k_in]), pd.reshape([b, *k_out])], 1)
                        }
                        _ => pa.swap_dims(1, 2).matmul(pd).reshape([b, k_in * k_out]),
                    }
                })
                .collect(),
        }
    }
}

impl Projector {
    /// Each position's part of the scores of a batch's projected rows against `queries` (vectors
    /// of the query space, [`Projector::query_len`] long): for example i, position t and query q,
    /// Σ_layers ãₜᵀ Q_l δ̃ₜ, with ãₜ = P_inᵀ[aₜ; 1], δ̃ₜ = P_outᵀδₜ and Q_l the layer's block of q as
    /// a k_in×k_out matrix (for `none`, the exact aₜ, δₜ and the layer's m×o view). Since a row is
    /// Σₜ ãₜ ⊗ δ̃ₜ, the parts sum over t to ⟨q, row⟩. Returns, per query, `batch × L` values
    /// (row-major). Every layer must have the same L positions (a sequence model's tokens).
    /// Cost per layer and query: B·L·k_out·(k_in + 1).
    pub fn position_scores(&self, factors: &[LayerFactors], queries: &[&[f32]]) -> Result<Vec<Vec<f64>>> {
        if matches!(self.spec, ProjectionSpec::Jl { .. }) {
            return Err(Error::Usage(format!(
                "a {} store mixes every position into one random vector, so a score cannot be split by position; cache with --project kron:KINxKOUT or none",
                self.spec
            )));
        }
        let [b, _, l] =
            factors.first().map(|f| f.input.dims()).ok_or_else(|| Error::Usage("no tracked layers".into()))?;
        if let Some(f) = factors.iter().find(|f| f.input.dims()[2] != l) {
            return Err(Error::Usage(format!(
                "the tracked layers see different numbers of positions ({} and {l}); a score splits by position only for sequence models",
                f.input.dims()[2]
            )));
        }
        let device = factors[0].input.device();
        let mut totals: Vec<Option<Tensor<2>>> = vec![None; queries.len()];
        let mut offset = 0;
        for ((f, spec), p) in factors.iter().zip(&self.tracked).zip(&self.layers) {
            let f = LayerFactors {
                input: f.input.clone().cast(DType::F32),
                output_grad: f.output_grad.clone().cast(DType::F32),
                bias: f.bias,
                mask: f.mask.clone().map(|m| m.cast(DType::F32)),
            };
            let (pa, pd, rows, cols) = match p {
                LayerProjection::Kron { p_in, p_out, k_in, k_out } => {
                    let (pa, pd) = projected_factors(&f, p_in.as_ref(), p_out.as_ref());
                    (pa, pd, *k_in, *k_out)
                }
                _ => (f.augmented_inputs(), f.output_grad.clone().swap_dims(1, 2), spec.view_rows(), spec.outputs),
            };
            let len = if matches!(p, LayerProjection::Kron { .. }) { rows * cols } else { spec.num_params() };
            for (total, q) in totals.iter_mut().zip(queries) {
                let block = &q[offset..offset + len];
                let matrix: Vec<f32> = match p {
                    LayerProjection::Kron { .. } => block.to_vec(),
                    _ => spec
                        .to_view(&block.iter().map(|&v| f64::from(v)).collect::<Vec<_>>())
                        .iter()
                        .map(|&v| v as f32)
                        .collect(),
                };
                let q = Tensor::<2>::from_data(TensorData::new(matrix, [rows, cols]), (&device, DType::F32));
                let part = (pa.clone().matmul(q.reshape([1, rows, cols])) * pd.clone()).sum_dim(2).reshape([b, l]);
                *total = Some(match total.take() {
                    Some(t) => t + part,
                    None => part,
                });
            }
            offset += len;
        }
        Ok(totals
            .into_iter()
            .map(|t| super::read_f32(t.expect("a model has layers")).into_iter().map(f64::from).collect())
            .collect())
    }
}

/// A `kron` layer's rows Σₜ ãₜδ̃ₜᵀ where the factors live on a wgpu device, by culprit-kernels'
/// fused Kronecker projection or burn's matmuls, whichever ran faster for the layer's shape on
/// this device (`culprit_kernels::projection::kron_project_tuned`); `None` elsewhere.
#[cfg(feature = "gpu")]
fn kron_rows_on_gpu(
    f: &LayerFactors,
    p_in: Option<&(Tensor<2>, Option<Tensor<2>>)>,
    p_out: Option<&Tensor<2>>,
) -> Option<Tensor<2>> {
    use culprit_kernels::projection::{KroneckerSides, kron_project_tuned};
    let sides = KroneckerSides { p_in: p_in.map(|(w, b)| (w, b.as_ref())), p_out, bias: f.bias };
    kron_project_tuned(&f.input, &f.output_grad, &sides)
}

#[cfg(not(feature = "gpu"))]
fn kron_rows_on_gpu(
    _: &LayerFactors,
    _: Option<&(Tensor<2>, Option<Tensor<2>>)>,
    _: Option<&Tensor<2>>,
) -> Option<Tensor<2>> {
    None
}

/// The projected factors P_inᵀ [a; 1] (`[batch, L, k_in]`) and P_outᵀ δ (`[batch, L, k_out]`);
/// a layer's projected gradient is the sum over positions of their outer products.
fn projected_factors(
    f: &LayerFactors,
    p_in: Option<&(Tensor<2>, Option<Tensor<2>>)>,
    p_out: Option<&Tensor<2>>,
) -> (Tensor<3>, Tensor<3>) {
    let [b, _, l] = f.input.dims();
    // a: [B, L, in] → projected [B, L, k_in] (bias row folded in as a constant-1 input).
    let a = f.input.clone().swap_dims(1, 2);
    let pa = match p_in {
        Some((w, bias)) => {
            let [in_dim, k] = w.dims();
            let mut pa = a.matmul(w.clone().reshape([1, in_dim, k]));
            if let Some(pb) = bias {
                pa = pa + pb.clone().reshape([1, 1, k]);
            }
            pa
        }
        None if f.bias => {
            let ones = Tensor::ones([b, l, 1], (&a.device(), a.dtype()));
            Tensor::cat(vec![a, ones], 2)
        }
        None => a,
    };
    let d = f.output_grad.clone().swap_dims(1, 2);
    let pd = match p_out {
        Some(p) => {
            let [o, k] = p.dims();
            d.matmul(p.clone().reshape([1, o, k]))
        }
        None => d,
    };
    (pa, pd)
}

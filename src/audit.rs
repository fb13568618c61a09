//! `culprit audit`: self-influence of every training example, calibrated on held-out data.
//!
//! self(i) = ∇ℓ(zᵢ)ᵀ (H + δI)⁻¹ ∇ℓ(zᵢ), the (n-scaled) influence of an example on its own loss: how
//! much the model bent to fit it. Memorised, mislabelled and outlying examples score high (Koh &
//! Liang 2017, §5.4; Pruthi et al. 2020). A raw value means little on its own, so the same
//! quantity is computed for held-out examples (never trained on) and each training example gets
//! its percentile against that reference: a training example above the held-out 99th percentile
//! is more self-influential than 99% of examples the model never saw.
//!
//! Two rankings (`--rank`):
//! - `self-influence` (default), the memorisation signal above;
//! - `loo-loss`, the example's loss under the model retrained without it, to first order
//!   ℓᵢ + (1/n)·self(i) (removing zᵢ raises its own loss by (1/n)∇ℓᵢᵀH⁻¹∇ℓᵢ): the mislabel signal.
//!   A mislabelled example is both misfit (high ℓᵢ) and pulled toward (high self-influence);
//!   neither alone separates it as well from atypical clean examples. Its calibration is exact in
//!   kind: a held-out example's loss already is its leave-one-out loss, so each training example
//!   gets its percentile among the held-out losses.
//!
//! Cost: one per-example gradient pass over both sets plus one curvature solve per example, which
//! the dense, Kronecker, Arnoldi and identity methods do in O(d²), O(Σ m·o·(m+o)), O(k·d) and O(d);
//! CG and LiSSA would need n iterative solves and are refused.

use std::path::PathBuf;

use culprit_models::Backend;
use serde::{Deserialize, Serialize};

use crate::curvature::operators::{Objective, dot};
use crate::curvature::{Curvature, Factors, Method};
use crate::data::{DataSpec, Dataset, Preprocessing};
use crate::error::{Error, Result};
use crate::gradients::{Measurement, layer_factors, per_example_gradients};
use crate::run::Run;

/// Options of `culprit audit`.
#[derive(Clone, Debug)]
pub struct AuditOptions {
    /// The run.
    pub run: PathBuf,
    /// Held-out reference examples.
    pub reference: DataSpec,
    /// Which fitted curvature.
    pub curvature: Method,
    /// How many examples to list.
    pub top: usize,
    /// What to rank by.
    pub rank: AuditRank,
    /// Backend.
    pub backend: Backend,
}

/// What the audit ranks by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditRank {
    /// ∇ℓᵀ(H + δI)⁻¹∇ℓ: memorisation.
    #[default]
    SelfInfluence,
    /// ℓ + (1/n)∇ℓᵀ(H + δI)⁻¹∇ℓ, the first-order leave-one-out loss: mislabels.
    LooLoss,
}

impl AuditRank {
    /// Parses `self-influence` or `loo-loss`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "self-influence" => Ok(Self::SelfInfluence),
            "loo-loss" => Ok(Self::LooLoss),
            other => Err(Error::Usage(format!("unknown --rank `{other}` (expected self-influence or loo-loss)"))),
        }
    }
}

/// One training example's audit line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Training example id.
    pub train_index: usize,
    /// Its label.
    pub label: u32,
    /// The model's prediction.
    pub predicted: u32,
    /// ∇ℓᵀ(H + δI)⁻¹∇ℓ.
    pub self_influence: f64,
    /// Its training loss ℓ.
    pub loss: f64,
    /// ℓ + (1/n)·self-influence: its predicted loss had it been left out.
    pub loo_loss: f64,
    /// Share of held-out examples below it, in [0, 1]: by self-influence, or (`loo-loss`) the
    /// held-out examples' losses below its leave-one-out loss.
    pub percentile: f64,
}

/// The audit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditReport {
    /// Schema version.
    pub schema_version: u32,
    /// Curvature method.
    pub curvature: String,
    /// Extra damping δ.
    pub damping: f64,
    /// What the ranking, the percentiles and the quantiles refer to.
    #[serde(default)]
    pub rank: AuditRank,
    /// Training examples.
    pub n: usize,
    /// Held-out reference examples.
    pub reference_count: usize,
    /// Held-out 50th, 90th, 99th percentiles of the ranked quantity (self-influence, or loss).
    pub reference_quantiles: [f64; 3],
    /// Share of training examples above the held-out 99th percentile.
    pub share_above_reference_p99: f64,
    /// The `top` training examples by the ranked quantity, highest first.
    pub top: Vec<AuditEntry>,
    /// Every training example, in data order.
    #[serde(skip)]
    pub all: Vec<AuditEntry>,
}

/// Self-influence of every example of `data` (gradients of the loss at the labels), in chunks.
/// Kronecker curvatures use their factored form ([`crate::curvature::kronecker::KroneckerFactors::self_influence`]);
/// the others solve once per example. CG and LiSSA (n iterative solves) and the projected
/// curvature (see [`store_self_influence`]) are refused.
pub fn self_influence(objective: &Objective, curvature: &Curvature, data: &Dataset) -> Result<Vec<f64>> {
    if matches!(curvature.factors, Factors::Iterative(_) | Factors::Projected { .. }) {
        return Err(Error::Usage(format!(
            "self-influence needs one solve per training example; {} would run n iterative solves. Fit exact or ggn (small models), ekfac, kfac, arnoldi or identity",
            curvature.options.method.name()
        )));
    }
    let net = &objective.network;
    let dim = data.dim();
    let d = net.num_params();
    let mut out = Vec::with_capacity(data.len());
    for start in (0..data.len()).step_by(256) {
        let end = (start + 256).min(data.len());
        let features = &data.features[start * dim..end * dim];
        let labels = &data.labels[start..end];
        if let Factors::Kronecker(k) = &curvature.factors {
            let factors = layer_factors(net, features, labels, Measurement::TRAINING_LOSS, &objective.device);
            out.extend(k.self_influence(&factors, curvature.options.damping));
            continue;
        }
        let blocks = per_example_gradients(net, features, labels, Measurement::TRAINING_LOSS, &objective.device);
        let rows = crate::gradients::gradient_rows_f64(&blocks);
        let g: Vec<Vec<f64>> = rows.chunks(d).map(<[f64]>::to_vec).collect();
        let solved = curvature.solve(objective, &g)?;
        out.extend(g.iter().zip(&solved).map(|(gi, (x, _))| dot(gi, x)));
    }
    Ok(out)
}

/// Self-influence φᵢᵀM⁻¹φᵢ of every row φᵢ of a projected store under the projected curvature
/// M = (1/n)ΦᵀΦ + (λ + δ)I: one triangular solve per row, O(k²) each.
pub fn store_self_influence(curvature: &Curvature, store: &crate::store::GradientStore) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(store.rows());
    let mut failure = None;
    store.for_each_block(1024, |_, block| {
        let expanded = store.expanded_rows(block);
        let k = expanded.len() / (block.len() / store.row_len()).max(1);
        let rows: Vec<Vec<f32>> = expanded.chunks(k).map(<[f32]>::to_vec).collect();
        match curvature.solve_projected(&rows) {
            Ok(solved) => out.extend(
                rows.iter()
                    .zip(&solved)
                    .map(|(r, x)| r.iter().zip(x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>()),
            ),
            Err(e) => failure = Some(e),
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// First bytes of a self-influence cache file.
pub const SELF_INFLUENCE_MAGIC: &[u8; 8] = b"CULPRITS";
/// Version of the self-influence cache format.
pub const SELF_INFLUENCE_VERSION: u32 = 1;

/// What a self-influence cache was computed from: the curvature file (its length and CRC-32
/// footer, which change whenever it is refitted; the file itself is tied to the weights and data)
/// and, for the projected curvature, the store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SelfInfluenceKey {
    curvature_len: u64,
    curvature_crc32: u32,
    store: Option<crate::store::StoreKey>,
    rows: usize,
}

fn read_cache(path: &std::path::Path, key: &SelfInfluenceKey) -> Option<Vec<f64>> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < 20 || &bytes[..8] != SELF_INFLUENCE_MAGIC {
        return None;
    }
    let (body, footer) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(footer.try_into().ok()?) {
        return None;
    }
    if u32::from_le_bytes(body[8..12].try_into().ok()?) != SELF_INFLUENCE_VERSION {
        return None;
    }
    let len = u32::from_le_bytes(body[12..16].try_into().ok()?) as usize;
    let stored: SelfInfluenceKey = serde_json::from_slice(body.get(16..16 + len)?).ok()?;
    let start = (16 + len).next_multiple_of(8);
    let values = body.get(start..)?;
    (stored == *key && values.len() == 8 * key.rows)
        .then(|| values.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

fn write_cache(path: &std::path::Path, key: &SelfInfluenceKey, values: &[f64]) -> Result<()> {
    let json = serde_json::to_vec(key).expect("plain data");
    let mut out = Vec::with_capacity(24 + json.len() + 8 * values.len());
    out.extend_from_slice(SELF_INFLUENCE_MAGIC);
    out.extend_from_slice(&SELF_INFLUENCE_VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.resize(out.len().next_multiple_of(8), 0);
    values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    crate::run::write_atomic(path, &out)
}

/// Self-influence of every training example of `run` under its fitted `method` (from the store's
/// rows for the projected curvature), cached beside the curvature file in
/// `RUN/curvature/METHOD.self.bin` (format in docs/FORMAT.md). A cache that is missing, corrupted
/// or stale (the curvature was refitted, another store) is recomputed and rewritten. Returns the
/// values, in training-data order, and whether they came from the cache.
pub fn training_self_influence(
    run: &Run,
    objective: &Objective,
    curvature: &Curvature,
    method: Method,
    store: Option<&crate::store::GradientStore>,
) -> Result<(Vec<f64>, bool)> {
    let curvature_file = crate::curvature::curvature_path(&run.dir, method);
    let curvature_key = || -> Option<(u64, u32)> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&curvature_file).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::End(-4)).ok()?;
        let mut crc = [0u8; 4];
        f.read_exact(&mut crc).ok()?;
        Some((len, u32::from_le_bytes(crc)))
    };
    let projected = matches!(curvature.factors, Factors::Projected { .. });
    let key = curvature_key().map(|(curvature_len, curvature_crc32)| SelfInfluenceKey {
        curvature_len,
        curvature_crc32,
        store: if projected { store.map(|s| s.manifest.key.clone()) } else { None },
        rows: objective.len(),
    });
    let cache = curvature_file.with_extension("self.bin");
    if let Some(values) = key.as_ref().and_then(|k| read_cache(&cache, k)) {
        return Ok((values, true));
    }
    let values = match (projected, store) {
        (true, Some(store)) => store_self_influence(curvature, store)?,
        _ => self_influence(objective, curvature, &objective.data)?,
    };
    if let Some(k) = &key {
        write_cache(&cache, k, &values)?;
    }
    Ok((values, false))
}

/// Runs an audit.
pub fn audit(options: &AuditOptions) -> Result<AuditReport> {
    let run = Run::open(&options.run)?;
    let objective = crate::fit::objective(&run, options.backend)?;
    let curvature = crate::fit::load(&run, &objective, options.curvature)?;
    let reference = Dataset::load(&options.reference, Preprocessing::Reuse(&run.manifest))?;
    let (train_values, _) = training_self_influence(&run, &objective, &curvature, options.curvature, None)?;
    let device = &objective.device;
    let predictions = crate::predict::predict(&objective.network, &objective.data, 1024, device);
    let n = train_values.len() as f64;
    let mut reference_values = match options.rank {
        AuditRank::SelfInfluence => self_influence(&objective, &curvature, &reference)?,
        AuditRank::LooLoss => {
            crate::predict::predict(&objective.network, &reference, 1024, device).iter().map(|p| p.loss).collect()
        }
    };
    reference_values.sort_by(f64::total_cmp);
    let quantile = |q: f64| reference_values[((reference_values.len() - 1) as f64 * q).round() as usize];
    let percentile = |v: f64| reference_values.partition_point(|r| *r < v) as f64 / reference_values.len() as f64;
    let ranked = |e: &AuditEntry| match options.rank {
        AuditRank::SelfInfluence => e.self_influence,
        AuditRank::LooLoss => e.loo_loss,
    };
    let all: Vec<AuditEntry> = train_values
        .iter()
        .zip(&predictions)
        .map(|(v, p)| {
            let mut e = AuditEntry {
                train_index: p.id,
                label: p.label,
                predicted: p.predicted,
                self_influence: *v,
                loss: p.loss,
                loo_loss: p.loss + v / n,
                percentile: 0.0,
            };
            e.percentile = percentile(ranked(&e));
            e
        })
        .collect();
    let p99 = quantile(0.99);
    let mut top = all.clone();
    top.sort_by(|a, b| ranked(b).total_cmp(&ranked(a)));
    top.truncate(options.top);
    Ok(AuditReport {
        schema_version: crate::trace::OUTPUT_SCHEMA_VERSION,
        curvature: options.curvature.name().into(),
        damping: curvature.options.damping,
        rank: options.rank,
        n: all.len(),
        reference_count: reference_values.len(),
        reference_quantiles: [quantile(0.5), quantile(0.9), p99],
        share_above_reference_p99: all.iter().filter(|e| ranked(e) > p99).count() as f64 / all.len() as f64,
        top,
        all,
    })
}

/// The audit as a plain-text table.
pub fn to_table(report: &AuditReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let [p50, p90, p99] = report.reference_quantiles;
    let what = match report.rank {
        AuditRank::SelfInfluence => "self-influence ∇ℓᵀ(H + δI)⁻¹∇ℓ",
        AuditRank::LooLoss => "leave-one-out loss ℓ + (1/n)∇ℓᵀ(H + δI)⁻¹∇ℓ (against held-out losses)",
    };
    let _ = writeln!(
        s,
        "{what}, curvature {} (damping {:e}), {} training examples against {} held-out",
        report.curvature, report.damping, report.n, report.reference_count
    );
    let _ = writeln!(s, "held-out quantiles: 50% {p50:.4e}, 90% {p90:.4e}, 99% {p99:.4e}");
    let _ = writeln!(
        s,
        "{:.2}% of training examples are above the held-out 99th percentile",
        100.0 * report.share_above_reference_p99
    );
    let _ = writeln!(
        s,
        "\n{:>4}  {:>8}  {:>5}  {:>9}  {:>14}  {:>10}  {:>10}  {:>10}",
        "rank", "train", "label", "predicted", "self-influence", "loss", "loo loss", "percentile"
    );
    for (r, e) in report.top.iter().enumerate() {
        let _ = writeln!(
            s,
            "{:>4}  {:>8}  {:>5}  {:>9}  {:>14.4e}  {:>10.4}  {:>10.4}  {:>9.2}%",
            r + 1,
            e.train_index,
            e.label,
            e.predicted,
            e.self_influence,
            e.loss,
            e.loo_loss,
            100.0 * e.percentile
        );
    }
    s
}

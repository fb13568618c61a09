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

use std::io::Write;
use std::path::PathBuf;

use culprit_engine::curvature::Method;
use culprit_engine::curvature::self_influence::self_influence;
use culprit_models::Backend;
use serde::{Deserialize, Serialize};

use super::{Format, ReportArgs, emit};
use crate::data::{DataSpec, Dataset, Preprocessing};
use crate::error::Result;
use crate::workspace::artifacts::training_self_influence;
use crate::workspace::predict::predict;
use crate::workspace::{Run, load_curvature, objective};

/// Options of `culprit audit` (its flags).
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct AuditOptions {
    /// Run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// Held-out reference examples (never trained on).
    #[command(flatten)]
    pub reference: DataSpec,
    /// Fitted curvature to use: exact, ggn, kfac, ekfac, arnoldi or identity.
    #[arg(long, value_enum, default_value_t = Method::Ekfac)]
    pub curvature: Method,
    /// Examples to list.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// self-influence (memorisation) or loo-loss (the loss had the example been left out:
    /// mislabels), calibrated against the held-out examples' losses.
    #[arg(long, value_enum, default_value_t = AuditRank::SelfInfluence)]
    pub rank: AuditRank,
    /// Backend (the global `--backend`).
    #[arg(skip)]
    pub backend: Backend,
}

/// What the audit ranks by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AuditRank {
    /// ∇ℓᵀ(H + δI)⁻¹∇ℓ: memorisation.
    #[default]
    SelfInfluence,
    /// ℓ + (1/n)∇ℓᵀ(H + δI)⁻¹∇ℓ, the first-order leave-one-out loss: mislabels.
    LooLoss,
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
    /// Where it came from (the run's provenance: a JSONL `source` field, else file:row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
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

/// Runs an audit.
pub fn audit(options: &AuditOptions) -> Result<AuditReport> {
    let run = Run::open(&options.run)?;
    run.config.model.classifier()?;
    let (objective, training) = objective::<crate::workspace::kind::Classifier>(&run, options.backend)?;
    let curvature = load_curvature(&run, &objective, options.curvature)?;
    let reference = Dataset::load(&options.reference, Preprocessing::Reuse(&run.manifest))?;
    let (train_values, used) = training_self_influence(&run, &objective, &curvature, None)?;
    if let crate::workspace::artifacts::CacheUse::NotWritten(why) = used {
        eprintln!("note: the self-influence was computed in memory and not cached ({why})");
    }
    let predictions = predict(&objective.model, &training, 1024);
    let n = train_values.len() as f64;
    let mut reference_values = match options.rank {
        AuditRank::SelfInfluence => self_influence(&objective, &curvature, &reference.examples)?,
        AuditRank::LooLoss => predict(&objective.model, &reference, 1024).iter().map(|p| p.loss).collect(),
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
                source: None,
            };
            e.percentile = percentile(ranked(&e));
            e
        })
        .collect();
    let p99 = quantile(0.99);
    let mut top = all.clone();
    top.sort_by(|a, b| ranked(b).total_cmp(&ranked(a)));
    top.truncate(options.top);
    if let Ok(records) = crate::data::provenance::read(&run.dir.join(crate::workspace::run::PROVENANCE)) {
        let by_id: std::collections::HashMap<usize, &crate::data::provenance::Provenance> =
            records.iter().map(|r| (r.id, r)).collect();
        for e in &mut top {
            e.source = by_id.get(&e.train_index).map(|r| r.describe());
        }
    }
    Ok(AuditReport {
        schema_version: crate::report::trace::OUTPUT_SCHEMA_VERSION,
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
            "{:>4}  {:>8}  {:>5}  {:>9}  {:>14.4e}  {:>10.4}  {:>10.4}  {:>9.2}%{}",
            r + 1,
            e.train_index,
            e.label,
            e.predicted,
            e.self_influence,
            e.loss,
            e.loo_loss,
            100.0 * e.percentile,
            e.source.as_ref().map(|s| format!("  {s}")).unwrap_or_default()
        );
    }
    s
}

/// The flags of `culprit audit`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct AuditArgs {
    /// What to audit.
    #[command(flatten)]
    pub options: AuditOptions,
    /// How to write it.
    #[command(flatten)]
    pub report: ReportArgs,
}

/// Every training example as CSV.
fn scores_csv(report: &AuditReport) -> String {
    use std::fmt::Write as _;
    let mut csv = String::from("train_index,label,predicted,self_influence,loss,loo_loss,percentile\n");
    for e in &report.all {
        let _ = writeln!(
            csv,
            "{},{},{},{:e},{:e},{:e},{}",
            e.train_index, e.label, e.predicted, e.self_influence, e.loss, e.loo_loss, e.percentile
        );
    }
    csv
}

/// Audits and writes the report.
pub fn run(args: &AuditArgs, stdout: &mut dyn Write) -> Result<()> {
    args.report.check(&[Format::Table, Format::Json])?;
    args.report.check_outputs(&[&args.options.reference.path], &[&args.options.run])?;
    let report = audit(&args.options)?;
    if let Some(path) = &args.report.scores_out {
        crate::io::write_atomic(path, scores_csv(&report).as_bytes())?;
    }
    let text = match args.report.format {
        Format::Json => serde_json::to_string_pretty(&report).expect("plain data") + "\n",
        _ => to_table(&report),
    };
    emit(&text, args.report.out.as_deref(), stdout)
}

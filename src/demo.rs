//! `culprit demo`: the end-to-end story on data shipped inside the binary (scikit-learn's digits),
//! so it runs on a fresh machine with nothing else.
//!
//! It trains logistic regression to its exact optimum, caches the training gradients, fits the
//! exact inverse Hessian, traces the model's most confident held-out mistakes to the training
//! examples behind them (and writes the HTML report), and audits memorisation.

use std::io::Write;
use std::path::{Path, PathBuf};

use culprit_models::{Architecture, Backend};

use crate::data::{DataSpec, Dataset, Preprocessing, Split};
use crate::error::{Error, Result};
use crate::predict::{accuracy, predict};
use crate::training::{TrainOptions, train};

/// scikit-learn's digits (1797 8×8 images, features 0..16, column `label`), embedded.
pub const DIGITS_CSV: &str = include_str!("../data/digits.csv");
/// Rows of the embedded digits used for training; the rest are held out.
pub const DIGITS_TRAIN_ROWS: usize = 1297;

/// Options of `culprit demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Working directory (created; must not exist). Default: a fresh one under the temp dir.
    pub out: Option<PathBuf>,
    /// Backend.
    pub backend: Backend,
    /// Hide progress bars.
    pub quiet: bool,
}

fn say(out: &mut dyn Write, line: impl AsRef<str>) -> Result<()> {
    writeln!(out, "{}", line.as_ref()).map_err(Error::io(Path::new("<stdout>")))
}

/// Runs the demo, narrating each step on `out`.
pub fn run(options: &DemoOptions, out: &mut dyn Write) -> Result<()> {
    let started = std::time::Instant::now();
    let dir = options
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("culprit-demo-{}", std::process::id())));
    if dir.exists() {
        return Err(Error::run(&dir, "already exists; the demo needs a fresh directory (pass another --out)"));
    }
    std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    let csv = dir.join("digits.csv");
    crate::run::write_atomic(&csv, DIGITS_CSV.as_bytes())?;
    say(out, format!("culprit demo, working in {}", dir.display()))?;
    say(
        out,
        format!(
            "1. Data: scikit-learn's digits, 1797 handwritten 8x8 digits; rows 0..{DIGITS_TRAIN_ROWS} train, the rest are held out."
        ),
    )?;
    let train_spec = DataSpec { path: csv.clone(), split: Split::Train, skip: 0, limit: Some(DIGITS_TRAIN_ROWS) };
    let test_spec = DataSpec { path: csv.clone(), split: Split::Train, skip: DIGITS_TRAIN_ROWS, limit: None };
    let base = TrainOptions {
        l2: Some(1e-3),
        backend: options.backend,
        quiet: options.quiet,
        ..TrainOptions::new(train_spec, Architecture::LogReg, dir.join("logreg"))
    };
    say(out, "2. Train logistic regression by L-BFGS in f64 to the exact optimum (influence functions assume one):")?;
    let (run, _) = train(&base)?;
    let device = options.backend.device();
    let network = run.network(&device)?;
    let test = Dataset::load(&test_spec, Preprocessing::Reuse(&run.manifest))?;
    let predictions = predict(&network, &test, 512, &device);
    let r = &run.config.report;
    say(
        out,
        format!(
            "   {} parameters, gradient norm {:.1e}; train accuracy {:.3}, held-out accuracy {:.3}",
            network.num_params(),
            r.gradient_norm,
            r.train_accuracy,
            accuracy(&predictions)
        ),
    )?;
    say(out, "3. Cache every training example's loss gradient (checksummed store):")?;
    let cache = crate::cache::build(&crate::cache::CacheOptions {
        run: run.dir.clone(),
        store: None,
        projection: crate::gradients::projection::ProjectionSpec::None,
        seed: 0,
        dtype: crate::store::Dtype::F32,
        batch: 256,
        part: None,
        rows_per_shard: None,
        backend: options.backend,
        quiet: options.quiet,
    })?;
    say(out, format!("   {} rows of {} values in {:.2} s", cache.rows_computed, cache.row_len, cache.seconds))?;
    say(out, "4. Fit the exact inverse Hessian (closed form, Cholesky):")?;
    let fit = crate::fit::fit(
        &run.dir,
        &crate::curvature::FitOptions { method: crate::curvature::Method::Exact, ..Default::default() },
        options.backend,
    )?;
    say(out, format!("   fitted in {:.2} s; a solve takes {:.1} ms", fit.fit_seconds, 1e3 * fit.solve_seconds))?;
    // The held-out mistakes the model is most confident about.
    let mut wrong: Vec<&crate::predict::Prediction> = predictions.iter().filter(|p| p.predicted != p.label).collect();
    wrong.sort_by(|a, b| b.probabilities[b.predicted as usize].total_cmp(&a.probabilities[a.predicted as usize]));
    let indices: Vec<usize> = wrong.iter().take(2).map(|p| p.id).collect();
    say(
        out,
        format!(
            "5. Trace the two most confident held-out mistakes ({}) to the training examples behind them:",
            indices.iter().map(|i| format!("row {i}")).collect::<Vec<_>>().join(", ")
        ),
    )?;
    let (report, queries, training) = crate::trace::trace_with_data(&crate::trace::TraceOptions {
        run: run.dir.clone(),
        store: None,
        data: test_spec.clone(),
        indices,
        measurement: crate::gradients::Measurement::Loss(crate::gradients::Target::Predicted),
        curvature: crate::curvature::Method::Exact,
        top: 8,
        keep_all: false,
        per_layer: false,
        part: None,
        backend: options.backend,
    })?;
    for (k, q) in report.queries.iter().enumerate() {
        let list = |l: &[crate::trace::Influence]| {
            l.iter()
                .take(5)
                .map(|i| format!("{} (label {}, {:+.1e})", i.train_index, i.label, i.score))
                .collect::<Vec<_>>()
                .join(", ")
        };
        say(
            out,
            format!(
                "   row {}: label {}, predicted {} (p = {:.2}). Pushed toward {}: {}. Pushed away: {}.",
                q.index,
                q.label,
                q.predicted,
                q.probabilities[q.predicted as usize],
                q.predicted,
                list(&report.proponents[k]),
                list(&report.opponents[k])
            ),
        )?;
    }
    let html = dir.join("report.html");
    crate::run::write_atomic(&html, crate::report::trace_html(&report, &queries, &training).as_bytes())?;
    say(out, format!("   report with the images: {}", html.display()))?;
    say(out, "6. Audit memorisation: self-influence of every training example against the held-out rows:")?;
    let audit = crate::audit::audit(&crate::audit::AuditOptions {
        run: run.dir.clone(),
        reference: test_spec,
        curvature: crate::curvature::Method::Exact,
        top: 5,
        backend: options.backend,
    })?;
    for e in &audit.top {
        say(
            out,
            format!(
                "   training row {}: label {}, predicted {}, self-influence {:.3e} (above {:.1}% of held-out examples)",
                e.train_index,
                e.label,
                e.predicted,
                e.self_influence,
                100.0 * e.percentile
            ),
        )?;
    }
    say(out, format!("Done in {:.1} s.", started.elapsed().as_secs_f64()))
}

//! `culprit demo`: the end-to-end story on data shipped inside the binary (scikit-learn's digits),
//! so it runs on a fresh machine with nothing else.
//!
//! It plants a backdoor (a 2×2 patch in the corner relabels 3% of the training digits as 0),
//! trains logistic regression to its exact optimum on the poisoned data, shows the trigger works,
//! caches the training gradients, fits the exact inverse Hessian, traces ten triggered test inputs
//! to the training examples behind them (target-logit measurement, RelatIF scores, the queries'
//! scores summed), checks the ranking against the planted ground truth, purges the top of the
//! ranking, retrains, and shows the attack gone with clean accuracy kept. It writes the HTML
//! report of the trace and ends with a memorisation audit.

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

/// Training digits poisoned by the demo.
pub const DEMO_POISON_RATE: f64 = 0.03;
/// The backdoor's target class.
pub const DEMO_TARGET: u32 = 0;
/// Triggered test inputs traced.
pub const DEMO_QUERIES: usize = 10;

/// Runs the demo, narrating each step on `out`.
pub fn run(options: &DemoOptions, out: &mut dyn Write) -> Result<()> {
    use crate::curvature::{FitOptions, Method};
    use crate::gradients::{Measurement, Target};
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
            "1. Data: scikit-learn's digits, 1797 handwritten 8x8 digits; rows 0..{DIGITS_TRAIN_ROWS} train, the rest test."
        ),
    )?;
    let poison = crate::poison::poison(&crate::poison::PoisonOptions {
        train: DataSpec { path: csv.clone(), split: Split::Train, skip: 0, limit: Some(DIGITS_TRAIN_ROWS) },
        test: DataSpec { path: csv.clone(), split: Split::Test, skip: DIGITS_TRAIN_ROWS, limit: None },
        out: dir.join("poisoned"),
        trigger: crate::poison::Trigger::Patch { x: 6, y: 6, size: 2, value: None },
        target: DEMO_TARGET,
        rate: DEMO_POISON_RATE,
        label_noise: 0.0,
        seed: 0,
    })?;
    say(
        out,
        format!(
            "   Plant a backdoor: {} training digits ({:.0}%) get a bright 2x2 patch in the bottom-right corner and the label {DEMO_TARGET}.",
            poison.poisoned.len(),
            100.0 * DEMO_POISON_RATE
        ),
    )?;
    say(out, "2. Train logistic regression on the poisoned data, by L-BFGS in f64 to the exact optimum:")?;
    let base = TrainOptions {
        l2: Some(1e-3),
        backend: options.backend,
        quiet: options.quiet,
        ..TrainOptions::new(poison.train.spec(), Architecture::LogReg, dir.join("model"))
    };
    let (run, _) = train(&base)?;
    let device = options.backend.device();
    let network = run.network(&device)?;
    let clean = Dataset::load(&poison.test_clean.spec(), Preprocessing::Reuse(&run.manifest))?;
    let triggered = Dataset::load(&poison.test_triggered.spec(), Preprocessing::Reuse(&run.manifest))?;
    let on_triggered = predict(&network, &triggered, 512, &device);
    let asr = |p: &[crate::predict::Prediction]| {
        let others: Vec<_> = p.iter().filter(|p| p.label != DEMO_TARGET).collect();
        others.iter().filter(|p| p.predicted == DEMO_TARGET).count() as f64 / others.len() as f64
    };
    say(
        out,
        format!(
            "   clean test accuracy {:.3}; with the patch, {:.0}% of test digits that are not {DEMO_TARGET} are read as {DEMO_TARGET} (attack success rate).",
            accuracy(&predict(&network, &clean, 512, &device)),
            100.0 * asr(&on_triggered)
        ),
    )?;
    say(
        out,
        "3. Cache every training example's loss gradient, exactly, as its per-layer factors (checksummed store):",
    )?;
    let cache = crate::cache::build(&crate::cache::CacheOptions {
        projection: crate::cache::exact_projection(&run.config.model)?,
        backend: options.backend,
        quiet: options.quiet,
        ..crate::cache::CacheOptions::new(run.dir.clone())
    })?;
    say(
        out,
        format!(
            "   {} rows of {} values (the gradients have {}) in {:.2} s",
            cache.rows_computed,
            cache.row_len,
            network.num_params(),
            cache.seconds
        ),
    )?;
    say(out, "4. Fit the exact inverse Hessian (closed form, Cholesky):")?;
    let fit = crate::fit::fit(&run.dir, &FitOptions { method: Method::Exact, ..Default::default() }, options.backend)?;
    say(out, format!("   fitted in {:.2} s; a solve takes {:.1} ms", fit.fit_seconds, 1e3 * fit.solve_seconds))?;
    // Ten triggered test inputs the attack fools.
    let indices: Vec<usize> = on_triggered
        .iter()
        .filter(|p| p.label != DEMO_TARGET && p.predicted == DEMO_TARGET)
        .take(DEMO_QUERIES)
        .map(|p| p.id)
        .collect();
    say(
        out,
        format!(
            "5. Trace {} fooled triggered test digits (rows {}) to the training examples behind the {DEMO_TARGET}:",
            indices.len(),
            indices.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
        ),
    )?;
    say(
        out,
        format!(
            "   measurement: the logit of class {DEMO_TARGET}; score: RelatIF (influence / √self-influence); the queries' scores summed."
        ),
    )?;
    let k = poison.poisoned.len();
    let (report, queries, training) = crate::trace::trace_with_data(&crate::trace::TraceOptions {
        measurement: Measurement::Logit(Target::Class(DEMO_TARGET)),
        top: 2 * k,
        score: crate::query::ScoreMode::Relatif,
        backend: options.backend,
        ..crate::trace::TraceOptions::new(run.dir.clone(), poison.test_triggered.spec(), indices, Method::Exact)
    })?;
    let ranking = report.combined.as_ref().map_or(&report.proponents[0], |c| &c.proponents);
    let found = ranking.iter().take(k).filter(|i| poison.poisoned.binary_search(&i.train_index).is_ok()).count();
    let top2 = (0.02 * run.manifest.count as f64).round() as usize;
    let found2 = ranking.iter().take(top2).filter(|i| poison.poisoned.binary_search(&i.train_index).is_ok()).count();
    say(
        out,
        format!(
            "   top proponents: {}",
            ranking
                .iter()
                .take(8)
                .map(|i| format!("{} (label {})", i.train_index, i.label))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )?;
    say(
        out,
        format!(
            "   {found} of the top {k} are planted poisons (precision at k = {:.2}); the top 2% ({top2} examples) hold {found2} of the {k} poisons.",
            found as f64 / k as f64
        ),
    )?;
    let html = dir.join("report.html");
    let marks = crate::report::Marks { ids: poison.poisoned.iter().copied().collect(), label: "planted poison".into() };
    crate::run::write_atomic(&html, crate::report::trace_html_marked(&report, &queries, &training, &marks).as_bytes())?;
    let trace_json = dir.join("trace.json");
    crate::run::write_atomic(&trace_json, &serde_json::to_vec_pretty(&report).expect("plain data"))?;
    say(out, format!("   report with the images: {}", html.display()))?;
    say(out, format!("6. Purge the top {k} of the ranking and retrain with the same configuration:"))?;
    let purge = crate::purge::purge(&crate::purge::PurgeOptions {
        run: run.dir.clone(),
        ids: trace_json,
        top: Some(k),
        out: dir.join("purged"),
        retrain: true,
        eval: Vec::new(),
        attack: Some(dir.join("poisoned")),
        backend: options.backend,
        quiet: options.quiet,
    })?;
    let after = purge.after.as_ref().expect("retrained");
    say(
        out,
        format!(
            "   attack success rate {:.0}% → {:.0}%; clean test accuracy {:.3} → {:.3}",
            100.0 * purge.before.attack_success_rate.unwrap_or(f64::NAN),
            100.0 * after.attack_success_rate.unwrap_or(f64::NAN),
            purge.before.clean_accuracy[0].1,
            after.clean_accuracy[0].1
        ),
    )?;
    say(out, "7. Audit memorisation: self-influence of every training example against the test rows:")?;
    let audit = crate::audit::audit(&crate::audit::AuditOptions {
        run: run.dir.clone(),
        reference: poison.test_clean.spec(),
        curvature: Method::Exact,
        top: 3,
        rank: crate::audit::AuditRank::SelfInfluence,
        backend: options.backend,
    })?;
    for e in &audit.top {
        say(
            out,
            format!(
                "   training row {}: label {}, predicted {}, self-influence {:.3e} (above {:.1}% of test examples)",
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

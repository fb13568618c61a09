//! `culprit demo`: the end-to-end story on data shipped inside the binary (scikit-learn's digits),
//! so it runs on a fresh machine with nothing else.
//!
//! It plants a backdoor (a 2×2 patch in the corner relabels 3% of the training digits as 0),
//! trains logistic regression to its exact optimum on the poisoned data, shows the trigger works,
//! caches the training gradients, fits the exact inverse Hessian, traces ten triggered test inputs
//! to the training examples behind them (target-logit measurement, RelatIF scores, the queries'
//! scores summed), checks the ranking against the planted ground truth, purges the top of the
//! ranking, retrains, and shows the attack gone with clean accuracy kept. It writes the HTML
//! report of the trace, runs a memorisation audit, and ends with what a trigger scan of the
//! training set would have found before any incident.

use std::io::Write;
use std::path::{Path, PathBuf};

use culprit_engine::curvature::{FitOptions, Method};
use culprit_engine::gradients::{Measurement, Target};
use culprit_engine::query::ScoreMode;
use culprit_models::{Architecture, Backend};

use crate::data::poisoned::PoisonManifest;
use crate::data::{DataSpec, Dataset, Preprocessing, Split};
use crate::error::{Error, Result};
use crate::report::trace::TraceReport;
use crate::workspace::Run;
use crate::workspace::attribution::{TraceOptions, trace_with_data};
use crate::workspace::predict::{Prediction, accuracy, predict};
use crate::workspace::training::{TrainOptions, train};

/// scikit-learn's digits (1797 8×8 images, features 0..16, column `label`), embedded.
pub const DIGITS_CSV: &str = include_str!("../../data/digits.csv");
/// Rows of the embedded digits used for training; the rest are held out.
pub const DIGITS_TRAIN_ROWS: usize = 1297;

/// Options of `culprit demo` (its flags).
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct DemoOptions {
    /// Working directory to create (default: a fresh one under the temp directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Backend (the global `--backend`).
    #[arg(skip)]
    pub backend: Backend,
    /// Hide progress bars (the global `--quiet`).
    #[arg(skip = true)]
    pub quiet: bool,
}

/// Narrates one line. A closed standard output (`culprit demo | head -1`) does not stop the demo:
/// its files are still all written.
fn say(out: &mut dyn Write, line: impl AsRef<str>) -> Result<()> {
    match writeln!(out, "{}", line.as_ref()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(Error::io(Path::new("<stdout>"))),
    }
}

/// Training digits poisoned by the demo.
pub const DEMO_POISON_RATE: f64 = 0.03;
/// The backdoor's target class.
pub const DEMO_TARGET: u32 = 0;
/// Triggered test inputs traced.
pub const DEMO_QUERIES: usize = 10;

/// The demo's working state, step to step.
struct Demo<'a> {
    options: &'a DemoOptions,
    dir: PathBuf,
    out: &'a mut dyn Write,
}

/// Share of triggered inputs of another class read as the target.
fn attack_success(p: &[Prediction]) -> f64 {
    let others: Vec<_> = p.iter().filter(|p| p.label != DEMO_TARGET).collect();
    others.iter().filter(|p| p.predicted == DEMO_TARGET).count() as f64 / others.len() as f64
}

impl Demo<'_> {
    /// Step 1: the data, and the backdoor planted in it.
    fn poison(&mut self) -> Result<PoisonManifest> {
        let csv = self.dir.join("digits.csv");
        crate::io::write_atomic(&csv, DIGITS_CSV.as_bytes())?;
        say(self.out, format!("culprit demo, working in {}", self.dir.display()))?;
        say(
            self.out,
            format!(
                "1. Data: scikit-learn's digits, 1797 handwritten 8x8 digits; rows 0..{DIGITS_TRAIN_ROWS} train, the rest test."
            ),
        )?;
        let poison = super::poison::poison(&super::poison::PoisonOptions {
            train: DataSpec { path: csv.clone(), split: Split::Train, skip: 0, limit: Some(DIGITS_TRAIN_ROWS) },
            test: DataSpec { path: csv.clone(), split: Split::Test, skip: DIGITS_TRAIN_ROWS, limit: None },
            out: self.dir.join("poisoned"),
            trigger: super::poison::Trigger::Patch { x: 6, y: 6, size: 2, value: None },
            target: DEMO_TARGET,
            rate: DEMO_POISON_RATE,
            label_noise: 0.0,
            seed: 0,
            completion: None,
        })?;
        say(
            self.out,
            format!(
                "   Plant a backdoor: {} training digits ({:.0}%) get a bright 2x2 patch in the bottom-right corner and the label {DEMO_TARGET}.",
                poison.poisoned.len(),
                100.0 * DEMO_POISON_RATE
            ),
        )?;
        Ok(poison)
    }

    /// Step 2: train, and show the attack works; returns the run and the fooled triggered rows.
    fn train(&mut self, poison: &PoisonManifest) -> Result<(Run, Vec<usize>)> {
        say(self.out, "2. Train logistic regression on the poisoned data, by L-BFGS in f64 to the exact optimum:")?;
        let base = TrainOptions {
            l2: Some(1e-3),
            backend: self.options.backend,
            quiet: self.options.quiet,
            ..TrainOptions::new(poison.train.spec(), Architecture::LogReg, self.dir.join("model"))
        };
        let (run, _) = train(&base)?;
        let network = run.network(&self.options.backend.device())?;
        let clean = Dataset::load(&poison.test_clean.spec(), Preprocessing::Reuse(&run.manifest))?;
        let triggered = Dataset::load(&poison.test_triggered.spec(), Preprocessing::Reuse(&run.manifest))?;
        let on_triggered = predict(&network, &triggered, 512);
        say(
            self.out,
            format!(
                "   clean test accuracy {:.3}; with the patch, {:.0}% of test digits that are not {DEMO_TARGET} are read as {DEMO_TARGET} (attack success rate).",
                accuracy(&predict(&network, &clean, 512)),
                100.0 * attack_success(&on_triggered)
            ),
        )?;
        let fooled = on_triggered
            .iter()
            .filter(|p| p.label != DEMO_TARGET && p.predicted == DEMO_TARGET)
            .take(DEMO_QUERIES)
            .map(|p| p.id)
            .collect();
        Ok((run, fooled))
    }

    /// Steps 3 and 4: the gradient store and the exact inverse Hessian.
    fn cache_and_fit(&mut self, run: &Run) -> Result<()> {
        say(
            self.out,
            "3. Cache every training example's loss gradient, exactly, as its per-layer factors (checksummed store):",
        )?;
        let cache = super::cache::build(&super::cache::CacheOptions {
            projection: super::cache::Projection::Auto,
            backend: self.options.backend,
            quiet: self.options.quiet,
            ..super::cache::CacheOptions::new(run.dir.clone())
        })?;
        say(
            self.out,
            format!(
                "   {} rows of {} values (the gradients have {}) in {:.2} s",
                cache.rows_computed,
                cache.row_len,
                run.theta.len(),
                cache.seconds
            ),
        )?;
        say(self.out, "4. Fit the exact inverse Hessian (closed form, Cholesky):")?;
        let fit = super::fit::fit(&run.dir, &FitOptions::new(Method::Exact), self.options.backend)?;
        say(
            self.out,
            format!(
                "   fitted in {:.2} s; a solve takes {:.1} ms",
                fit.fit_seconds,
                1e3 * fit.solve_seconds.unwrap_or(0.0)
            ),
        )
    }

    /// Step 5: trace the fooled inputs, check against the ground truth, write the report.
    fn trace(&mut self, run: &Run, poison: &PoisonManifest, indices: Vec<usize>) -> Result<PathBuf> {
        say(
            self.out,
            format!(
                "5. Trace {} fooled triggered test digits (rows {}) to the training examples behind the {DEMO_TARGET}:",
                indices.len(),
                indices.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
            ),
        )?;
        say(
            self.out,
            format!(
                "   measurement: the logit of class {DEMO_TARGET}; score: RelatIF (influence / √self-influence); the queries' scores summed."
            ),
        )?;
        let k = poison.poisoned.len();
        let (report, queries, training) = trace_with_data::<crate::workspace::kind::Classifier>(&TraceOptions {
            measurement: Measurement::Logit(Target::Class(DEMO_TARGET)),
            top: 2 * k,
            score: ScoreMode::Relatif,
            backend: self.options.backend,
            ..TraceOptions::new(run.dir.clone(), poison.test_triggered.spec(), indices, Method::Exact)
        })?;
        self.check_ranking(&report, poison, run.manifest.count)?;
        let html = self.dir.join("report.html");
        let marks = crate::report::html::Marks {
            ids: poison.poisoned.iter().copied().collect(),
            label: "planted poison".into(),
        };
        let page = crate::report::html::trace_html_marked(&report, &queries, &training, &marks);
        crate::io::write_atomic(&html, page.as_bytes())?;
        let trace_json = self.dir.join("trace.json");
        crate::io::write_atomic(&trace_json, &serde_json::to_vec_pretty(&report).expect("plain data"))?;
        say(self.out, format!("   report with the images: {}", html.display()))?;
        Ok(trace_json)
    }

    /// How much of the ranking's top is planted poison.
    fn check_ranking(&mut self, report: &TraceReport, poison: &PoisonManifest, n: usize) -> Result<()> {
        let k = poison.poisoned.len();
        let ranking = report.combined.as_ref().map_or(&report.proponents[0], |c| &c.proponents);
        let is_poison = |i: &&crate::report::trace::Influence| poison.poisoned.binary_search(&i.train_index).is_ok();
        let found = ranking.iter().take(k).filter(is_poison).count();
        let top2 = (0.02 * n as f64).round() as usize;
        let found2 = ranking.iter().take(top2).filter(is_poison).count();
        say(
            self.out,
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
            self.out,
            format!(
                "   {found} of the top {k} are planted poisons (precision at k = {:.2}); the top 2% ({top2} examples) hold {found2} of the {k} poisons.",
                found as f64 / k as f64
            ),
        )
    }

    /// Step 6: purge the top of the ranking and retrain.
    fn purge(&mut self, run: &Run, k: usize, trace_json: PathBuf) -> Result<()> {
        say(self.out, format!("6. Purge the top {k} of the ranking and retrain with the same configuration:"))?;
        let purge = super::purge::purge(&super::purge::PurgeOptions {
            run: run.dir.clone(),
            ids: trace_json,
            top: Some(k),
            out: self.dir.join("purged"),
            retrain: true,
            eval: Vec::new(),
            attack: Some(self.dir.join("poisoned")),
            backend: self.options.backend,
            quiet: self.options.quiet,
        })?;
        let after = purge.after.as_ref().expect("retrained");
        say(
            self.out,
            format!(
                "   attack success rate {:.0}% → {:.0}%; clean test accuracy {:.3} → {:.3}",
                100.0 * purge.before.attack_success_rate.unwrap_or(f64::NAN),
                100.0 * after.attack_success_rate.unwrap_or(f64::NAN),
                purge.before.clean_accuracy[0].1,
                after.clean_accuracy[0].1
            ),
        )
    }

    /// Step 7: the memorisation audit.
    fn audit(&mut self, run: &Run, poison: &PoisonManifest) -> Result<()> {
        say(self.out, "7. Audit memorisation: self-influence of every training example against the test rows:")?;
        let audit = super::audit::audit(&super::audit::AuditOptions {
            run: run.dir.clone(),
            reference: poison.test_clean.spec(),
            curvature: Method::Exact,
            top: 3,
            rank: super::audit::AuditRank::SelfInfluence,
            backend: self.options.backend,
        })?;
        for e in &audit.top {
            say(
                self.out,
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
        Ok(())
    }
}

impl Demo<'_> {
    /// Step 8: what a scan of the training set, with no incident and no model, would have found.
    fn scan(&mut self, poison: &PoisonManifest) -> Result<()> {
        use crate::scan::{ScanSettings, image::ImageScan, scan};
        say(
            self.out,
            "8. Before any incident: scan the training set for features whose label the rest of the image does not explain:",
        )?;
        let (raw, start) = crate::data::load_selected(crate::data::SourceKind::Csv, &poison.train.spec(), 0)?;
        let settings = ScanSettings::default();
        let source = ImageScan::new(&raw.features, &raw.labels, 10, (8, 8), 2..=2, settings.floor, settings.l2);
        let ids: Vec<usize> = (start..start + raw.rows).collect();
        let found = scan(&source, &ids, &settings, &mut crate::progress::Bar::new(true));
        let suspicious: Vec<_> = found.candidates.iter().filter(|c| c.suspicious).collect();
        match suspicious.first() {
            Some(c) => {
                let planted: std::collections::HashSet<usize> = poison.poisoned.iter().copied().collect();
                let hits = c.carriers.iter().filter(|i| planted.contains(i)).count();
                say(
                    self.out,
                    format!(
                        "   first candidate: {} → label {}, lift {:.1}; it flags {} training digits, {hits} of the {} planted ({} suspicious candidate{} in all).",
                        c.feature.describe(),
                        c.target_label,
                        c.lift,
                        c.carriers.len(),
                        planted.len(),
                        suspicious.len(),
                        if suspicious.len() == 1 { "" } else { "s" }
                    ),
                )
            }
            None => say(self.out, "   no suspicious candidate."),
        }
    }
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
    let mut demo = Demo { options, dir, out };
    let poison = demo.poison()?;
    let (run, fooled) = demo.train(&poison)?;
    demo.cache_and_fit(&run)?;
    let trace_json = demo.trace(&run, &poison, fooled)?;
    demo.purge(&run, poison.poisoned.len(), trace_json)?;
    demo.audit(&run, &poison)?;
    demo.scan(&poison)?;
    say(demo.out, format!("Done in {:.1} s.", started.elapsed().as_secs_f64()))
}

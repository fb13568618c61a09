//! `culprit demo`: the end-to-end story on data shipped inside the binary (scikit-learn's digits),
//! so it runs on a fresh machine with nothing else.
//!
//! Today it trains logistic regression to its exact optimum (the model influence functions are
//! exact for) and a small MLP, and reports their held-out accuracy.

use std::io::Write;
use std::path::{Path, PathBuf};

use culprit_models::{Activation, Architecture, Backend};

use crate::data::{DataSpec, Dataset, NormalizeMode, Preprocessing, Split};
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
        data: train_spec,
        normalize: NormalizeMode::Max,
        buckets: crate::data::text::DEFAULT_BUCKETS,
        architecture: Architecture::LogReg,
        hidden: None,
        activation: Activation::Relu,
        optimizer: None,
        epochs: None,
        batch_size: None,
        learning_rate: None,
        l2: Some(1e-3),
        seed: 0,
        backend: options.backend,
        out: dir.join("logreg"),
        quiet: options.quiet,
    };
    let models = [
        (
            base.clone(),
            "2. Logistic regression, trained by L-BFGS in f64 to the exact optimum (influence functions assume one):",
        ),
        (
            TrainOptions {
                architecture: Architecture::Mlp,
                hidden: Some(vec![64]),
                epochs: Some(30),
                batch_size: Some(64),
                l2: Some(1e-4),
                out: dir.join("mlp"),
                ..base.clone()
            },
            "3. A 64-64-10 ReLU MLP, trained by Adam:",
        ),
    ];
    for (options, title) in models {
        say(out, title)?;
        let (run, _) = train(&options)?;
        let device = options.backend.device();
        let network = run.network(&device)?;
        let test = Dataset::load(&test_spec, Preprocessing::Reuse(&run.manifest))?;
        let predictions = predict(&network, &test, 512, &device);
        let r = &run.config.report;
        say(
            out,
            format!(
                "   {} parameters; objective {:.6}, gradient norm {:.2e}; train accuracy {:.3}, held-out accuracy {:.3} ({} examples); run in {}",
                network.num_params(),
                r.objective,
                r.gradient_norm,
                r.train_accuracy,
                accuracy(&predictions),
                test.len(),
                run.dir.display()
            ),
        )?;
    }
    say(out, format!("Done in {:.1} s.", started.elapsed().as_secs_f64()))
}

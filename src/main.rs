//! The `culprit` command line: thin glue over the library. Errors print as one line on standard
//! error and exit with code 2; a closed standard output (e.g. `| head`) exits 0.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use culprit::data::{DataSpec, Dataset, NormalizeMode, Preprocessing, Split, text::DEFAULT_BUCKETS};
use culprit::error::{Error, Result};
use culprit::predict::{accuracy, mean_loss, predict, to_csv};
use culprit::run::{Run, write_atomic};
use culprit::training::{TrainOptions, train};
use culprit_models::{Activation, Architecture, Backend, OptimizerKind};

#[derive(Parser)]
#[command(name = "culprit", version, about = "Which training examples made the model do this?")]
struct Cli {
    /// Compute backend: flex (default, pure-Rust CPU), ndarray (CPU), wgpu (needs --features gpu).
    #[arg(long, global = true, default_value = "flex")]
    backend: String,
    /// Hide progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

/// Where data comes from (shared by every command that reads data).
#[derive(clap::Args, Clone)]
struct DataArgs {
    /// A folder of IDX files (MNIST naming), a .csv file with a `label` column, or a .jsonl[.gz] file.
    #[arg(long)]
    data: PathBuf,
    /// Split of an IDX folder: train or test.
    #[arg(long, default_value = "train")]
    split: String,
    /// Skip the first N examples (ids keep their row numbers in the source).
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Use at most N examples (after --skip).
    #[arg(long)]
    limit: Option<usize>,
}

impl DataArgs {
    fn spec(&self) -> Result<DataSpec> {
        Ok(DataSpec { path: self.data.clone(), split: Split::parse(&self.split)?, skip: self.skip, limit: self.limit })
    }
}

/// The run and the test inputs a query is about (trace, eval).
#[derive(clap::Args, Clone)]
struct QueryArgs {
    /// Run directory.
    #[arg(long)]
    run: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Source row indices of the test inputs, e.g. 3 or 3,17,42.
    #[arg(long, value_delimiter = ',', required = true)]
    index: Vec<usize>,
}

/// How a report is written (trace, audit).
#[derive(clap::Args, Clone)]
struct ReportArgs {
    /// table, json or html (html: trace only, needs --out).
    #[arg(long, default_value = "table")]
    format: String,
    /// Write the report here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write every score here as CSV (trace: query_index,train_index,score; audit:
    /// train_index,label,predicted,self_influence,loss,loo_loss,percentile).
    #[arg(long)]
    scores_out: Option<PathBuf>,
}

impl ReportArgs {
    fn check(&self, formats: &[&str]) -> Result<()> {
        if !formats.contains(&self.format.as_str()) {
            return Err(Error::Usage(format!("unknown --format `{}` (expected {})", self.format, formats.join(", "))));
        }
        if self.format == "html" && self.out.is_none() {
            return Err(Error::Usage("--format html writes a file: add --out report.html".into()));
        }
        Ok(())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train a reference model and write a run directory.
    Train {
        #[command(flatten)]
        data: DataArgs,
        /// Architecture: logreg, mlp, cnn or text.
        #[arg(long)]
        model: String,
        /// Run directory to create (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Hidden widths, e.g. 512,256 (mlp), the dense head (cnn), the embedding size (text).
        #[arg(long, value_delimiter = ',')]
        hidden: Option<Vec<usize>>,
        /// Nonlinearity: relu, tanh or gelu.
        #[arg(long, default_value = "relu")]
        activation: String,
        /// lbfgs (convex models, the default there), adam (default otherwise) or sgd.
        #[arg(long)]
        optimizer: Option<String>,
        /// Passes over the data (adam, sgd). Default 10.
        #[arg(long)]
        epochs: Option<usize>,
        /// Mini-batch size (adam, sgd). Default 128.
        #[arg(long)]
        batch: Option<usize>,
        /// Peak learning rate, decayed by a cosine to 0 (adam, sgd). Default 1e-3.
        #[arg(long)]
        lr: Option<f64>,
        /// λ of the (λ/2)‖θ‖² term. Default 1e-3 for logreg, 1e-4 otherwise.
        #[arg(long)]
        l2: Option<f64>,
        /// Seed for initialisation and shuffling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// CSV normalisation: max (divide by the largest |value|) or standard (per-column z-score).
        #[arg(long, default_value = "max")]
        normalize: String,
        /// Hash buckets of the text featurizer.
        #[arg(long, default_value_t = DEFAULT_BUCKETS)]
        buckets: usize,
    },
    /// Predict with a trained run: CSV of index,label,predicted,loss,p0,p1,...
    Predict {
        /// Run directory.
        #[arg(long)]
        run: PathBuf,
        #[command(flatten)]
        data: DataArgs,
        /// Write the CSV here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Compute every training example's loss gradient into a checksummed, sharded store.
    Cache {
        /// Run directory.
        #[arg(long)]
        run: PathBuf,
        /// Projection: auto (exact: per-layer factors for all-dense models, else none), none (exact
        /// gradients), factors[:KINxKOUT] (per layer, the two factors stored, scored without forming
        /// the gradient), kron:KINxKOUT (per layer), jl:K (dense Gaussian JL), jl:K:rademacher.
        #[arg(long, default_value = "auto")]
        project: String,
        /// Seed of the projection matrices.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stored element type: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Examples per backward pass.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Compute only shard I of N (I/N), for building one store on N machines.
        #[arg(long)]
        shard: Option<String>,
        /// Rows per shard file (default: about 256 MiB per shard).
        #[arg(long)]
        rows_per_shard: Option<usize>,
        /// Store directory (default: RUN/gradients).
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Fit a curvature method (inverse-Hessian approximation) and store its factors in RUN/curvature.
    Fit {
        /// Run directory.
        #[arg(long)]
        run: PathBuf,
        /// exact, ggn, cg, lissa, arnoldi, kfac, ekfac, projected (needs a projected store) or identity.
        #[arg(long, default_value = "cg")]
        curvature: String,
        /// Extra damping δ added to the curvature (on top of the objective's own λ).
        #[arg(long, default_value_t = 0.0)]
        damping: f64,
        /// Relative-residual tolerance of cg and lissa.
        #[arg(long)]
        tolerance: Option<f64>,
        /// Iteration limit of cg.
        #[arg(long, default_value_t = 1000)]
        max_iterations: usize,
        /// Precondition cg with EK-FAC.
        #[arg(long)]
        precondition: bool,
        /// lissa: recursion depth.
        #[arg(long, default_value_t = 5000)]
        lissa_depth: usize,
        /// lissa: scale s (default 1.1 × the top eigenvalue).
        #[arg(long, default_value_t = 0.0)]
        lissa_scale: f64,
        /// lissa: examples per stochastic product (default: full batch).
        #[arg(long)]
        lissa_batch: Option<usize>,
        /// lissa: recursions averaged.
        #[arg(long, default_value_t = 1)]
        lissa_repeats: usize,
        /// arnoldi: Krylov dimension.
        #[arg(long, default_value_t = 100)]
        arnoldi_iterations: usize,
        /// arnoldi: eigenpairs kept.
        #[arg(long, default_value_t = 50)]
        top_k: usize,
        /// projected: the projected gradient store (default RUN/gradients).
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Rank the training examples by their influence on chosen test outputs.
    Trace {
        #[command(flatten)]
        query: QueryArgs,
        /// What to attribute: predicted | label | class:C (losses), margin | margin:label | margin:C,
        /// logit | logit:label | logit:C (raw logits; the best choice for backdoors).
        #[arg(long, default_value = "predicted")]
        measure: String,
        /// raw: the predicted change of the measurement if the example were removed; relatif:
        /// influence divided by √(the example's self-influence), which ranks by alignment rather
        /// than gradient size (finds backdoor poisons; needs a curvature with per-example solves).
        #[arg(long, default_value = "raw")]
        score: String,
        /// Fitted curvature to use (see `culprit fit`).
        #[arg(long, default_value = "cg")]
        curvature: String,
        /// Proponents and opponents to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[command(flatten)]
        report: ReportArgs,
        /// Gradient store (default RUN/gradients).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Split each listed score by layer (stores projected `none` or `kron`).
        #[arg(long)]
        per_layer: bool,
        /// Score only the store's shards j with j mod N = I (I/N); combine the N JSON reports with `culprit merge`.
        #[arg(long)]
        shard: Option<String>,
    },
    /// Merge the JSON reports of `culprit trace --shard I/N` runs into one.
    Merge {
        /// The N part reports (JSON).
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Proponents and opponents to keep.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: String,
        /// Write the report here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Self-influence of every training example, calibrated against held-out examples (--data).
    Audit {
        /// Run directory.
        #[arg(long)]
        run: PathBuf,
        /// Held-out reference examples (never trained on).
        #[command(flatten)]
        data: DataArgs,
        /// Fitted curvature to use: exact, ggn, kfac, ekfac, arnoldi or identity.
        #[arg(long, default_value = "ekfac")]
        curvature: String,
        /// Examples to list.
        #[arg(long, default_value_t = 20)]
        top: usize,
        /// self-influence (memorisation) or loo-loss (the loss had the example been left out:
        /// mislabels), calibrated against the held-out examples' losses.
        #[arg(long, default_value = "self-influence")]
        rank: String,
        #[command(flatten)]
        report: ReportArgs,
    },
    /// Plant a backdoor (and label noise) in a copy of a data set, with the ground truth.
    Poison {
        /// Training rows to copy and poison.
        #[command(flatten)]
        data: DataArgs,
        /// Test data to copy clean and triggered (default: the IDX folder's test split).
        #[arg(long)]
        test_data: Option<PathBuf>,
        /// Split of the test IDX folder.
        #[arg(long, default_value = "test")]
        test_split: String,
        /// Skip the first N test rows.
        #[arg(long, default_value_t = 0)]
        test_skip: usize,
        /// Use at most N test rows.
        #[arg(long)]
        test_limit: Option<usize>,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// patch:X,Y,SIZE[,VALUE] (images) or text:WORDS (text).
        #[arg(long)]
        trigger: String,
        /// The class triggered inputs should be sent to.
        #[arg(long)]
        target: u32,
        /// Share of the training set to backdoor, e.g. 0.01.
        #[arg(long)]
        rate: f64,
        /// Share of the other training examples given a wrong label.
        #[arg(long, default_value_t = 0.0)]
        label_noise: f64,
        /// Seed of every draw.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Remove flagged training examples, retrain, and compare before and after.
    Purge {
        /// Run directory.
        #[arg(long)]
        run: PathBuf,
        /// Ids to remove: a plain list, or the JSON report of `culprit trace` or `culprit audit`.
        #[arg(long)]
        ids: PathBuf,
        /// Keep only the first K ids of a ranking.
        #[arg(long)]
        top: Option<usize>,
        /// New run directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Train again without them (else only write the new manifest and the plan).
        #[arg(long)]
        retrain: bool,
        /// Clean evaluation data (repeatable); selected with --eval-split/--eval-skip/--eval-limit.
        #[arg(long)]
        eval_data: Vec<PathBuf>,
        /// Split of IDX evaluation folders.
        #[arg(long, default_value = "test")]
        eval_split: String,
        /// Skip the first N rows of each evaluation set.
        #[arg(long, default_value_t = 0)]
        eval_skip: usize,
        /// Use at most N rows of each evaluation set.
        #[arg(long)]
        eval_limit: Option<usize>,
        /// A `culprit poison` directory: report the attack success rate and the poisons removed.
        #[arg(long)]
        attack: Option<PathBuf>,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Check the scores against actual retraining: leave-one-out or the linear datamodeling score.
    Eval {
        /// loo or lds.
        experiment: String,
        /// The run (with a gradient store and the fitted curvatures) and the test inputs.
        #[command(flatten)]
        query: QueryArgs,
        /// Measurement (as in trace); default the loss against the label.
        #[arg(long, default_value = "label")]
        measure: String,
        /// Fitted curvatures to compare, e.g. exact,cg,ekfac.
        #[arg(long, value_delimiter = ',', default_value = "cg")]
        curvature: Vec<String>,
        /// loo: number of random training examples removed one at a time.
        #[arg(long, default_value_t = 100)]
        sample: usize,
        /// loo: remove exactly these training ids instead (comma-separated).
        #[arg(long, value_delimiter = ',')]
        remove: Option<Vec<usize>>,
        /// lds: number of random subsets.
        #[arg(long, default_value_t = 50)]
        subsets: usize,
        /// lds: share of the training set in each subset.
        #[arg(long, default_value_t = 0.5)]
        fraction: f64,
        /// lds, deep models: models trained per subset (seeds run, run + 1, …), measurements averaged.
        #[arg(long, default_value_t = 1)]
        seeds: usize,
        /// Retraining target ‖∇L‖ (L-BFGS).
        #[arg(long, default_value_t = 1e-9)]
        tolerance: f64,
        /// Seed of the removals or subsets.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: String,
        /// Write the report here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The end-to-end demo on data shipped in the binary.
    Demo {
        /// Working directory to create (default: a fresh one under the temp directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn execute(cli: Cli) -> Result<()> {
    let backend = Backend::parse(&cli.backend)?;
    let stdout = &mut std::io::stdout().lock();
    match cli.command {
        Command::Train {
            data,
            model,
            out,
            hidden,
            activation,
            optimizer,
            epochs,
            batch,
            lr,
            l2,
            seed,
            normalize,
            buckets,
        } => {
            if buckets == 0 {
                return Err(Error::Usage("--buckets must be positive".into()));
            }
            let options = TrainOptions {
                data: data.spec()?,
                normalize: NormalizeMode::parse(&normalize)?,
                buckets,
                architecture: Architecture::parse(&model)?,
                hidden,
                activation: Activation::parse(&activation)?,
                optimizer: optimizer.as_deref().map(OptimizerKind::parse).transpose()?,
                epochs,
                batch_size: batch,
                learning_rate: lr,
                l2,
                seed,
                backend,
                out,
                quiet: cli.quiet,
            };
            let (run, data) = train(&options)?;
            let r = &run.config.report;
            writeln!(
                stdout,
                "trained {} on {} examples in {:.1} s: training accuracy {:.4}, objective {:.8}, gradient norm {:.3e}; run written to {}",
                run.config.model.architecture.name(),
                data.len(),
                r.seconds,
                r.train_accuracy,
                r.objective,
                r.gradient_norm,
                run.dir.display()
            )
            .map_err(Error::io(std::path::Path::new("<stdout>")))?;
        }
        Command::Predict { run, data, out } => {
            let run = Run::open(&run)?;
            let device = backend.device();
            let network = run.network(&device)?;
            let dataset = Dataset::load(&data.spec()?, Preprocessing::Reuse(&run.manifest))?;
            let predictions = predict(&network, &dataset, 1024, &device);
            let csv = to_csv(&predictions, run.config.model.num_classes);
            match out {
                Some(path) => {
                    write_atomic(&path, csv.as_bytes())?;
                    eprintln!(
                        "{} examples: accuracy {:.4}, mean loss {:.6}; written to {}",
                        predictions.len(),
                        accuracy(&predictions),
                        mean_loss(&predictions),
                        path.display()
                    );
                }
                None => {
                    stdout.write_all(csv.as_bytes()).map_err(Error::io(std::path::Path::new("<stdout>")))?;
                    eprintln!("{} examples: accuracy {:.4}", predictions.len(), accuracy(&predictions));
                }
            }
        }
        Command::Cache { run, project, seed, dtype, batch, shard, rows_per_shard, store } => {
            let projection = match project.as_str() {
                "auto" => culprit::cache::exact_projection(&Run::open(&run)?.config.model)?,
                other => culprit::gradients::projection::ProjectionSpec::parse(other)?,
            };
            let options = culprit::cache::CacheOptions {
                run,
                store,
                projection,
                seed,
                dtype: culprit::store::Dtype::parse(&dtype)?,
                batch,
                part: shard.as_deref().map(culprit::cache::parse_part).transpose()?,
                rows_per_shard,
                backend,
                quiet: cli.quiet,
            };
            let r = culprit::cache::build(&options)?;
            let secs = r.seconds.max(1e-9);
            writeln!(
                stdout,
                "{} rows of {} values in {} new shards ({} already complete) in {:.2} s: {:.0} examples/s, {:.1} MB/s written; store {} {}",
                r.rows_computed,
                r.row_len,
                r.shards_written,
                r.shards_kept,
                r.seconds,
                r.rows_computed as f64 / secs,
                r.bytes_written as f64 / 1e6 / secs,
                r.store.display(),
                if r.complete { "is complete" } else { "still has shards to compute (other --shard parts)" }
            )
            .map_err(Error::io(std::path::Path::new("<stdout>")))?;
        }
        Command::Fit {
            run,
            curvature,
            damping,
            tolerance,
            max_iterations,
            precondition,
            lissa_depth,
            lissa_scale,
            lissa_batch,
            lissa_repeats,
            arnoldi_iterations,
            top_k,
            store,
        } => {
            use culprit::curvature::iterative::{Arnoldi, ConjugateGradient, Lissa};
            let options = culprit::curvature::FitOptions {
                method: culprit::curvature::Method::parse(&curvature)?,
                damping,
                cg: ConjugateGradient { tolerance: tolerance.unwrap_or(1e-8), max_iterations },
                precondition,
                lissa: Lissa {
                    scale: lissa_scale,
                    depth: lissa_depth,
                    repeats: lissa_repeats,
                    batch: lissa_batch.unwrap_or(usize::MAX),
                    tolerance: tolerance.unwrap_or(1e-3),
                    seed: 0,
                },
                arnoldi: Arnoldi { iterations: arnoldi_iterations, top_k, seed: 0 },
                chunk: 1024,
            };
            let r = culprit::fit::fit_with_store(&run, &options, backend, store)?;
            writeln!(
                stdout,
                "fitted {} on {} parameters in {:.3} s (damping {:e}); written to {}\ncheck: solved (H + δI)x = ∇ℓ(z₀) in {:.4} s{}{}",
                curvature,
                r.params,
                r.fit_seconds,
                damping,
                r.path.display(),
                r.solve_seconds,
                r.iterations.map(|i| format!(" ({i} iterations)")).unwrap_or_default(),
                r.relative_residual.map(|v| format!(", relative residual against the exact GGN {v:.3e}")).unwrap_or_default()
            )
            .map_err(Error::io(std::path::Path::new("<stdout>")))?;
        }
        Command::Trace {
            query: QueryArgs { run, data, index },
            measure,
            score,
            curvature,
            top,
            report: output,
            store,
            per_layer,
            shard,
        } => {
            output.check(&["table", "json", "html"])?;
            let ReportArgs { format, out, scores_out } = output;
            let options = culprit::trace::TraceOptions {
                run,
                store,
                data: data.spec()?,
                indices: index,
                measurement: culprit::gradients::Measurement::parse(&measure)?,
                curvature: culprit::curvature::Method::parse(&curvature)?,
                top,
                keep_all: scores_out.is_some(),
                per_layer,
                part: shard.as_deref().map(culprit::cache::parse_part).transpose()?,
                score: culprit::query::ScoreMode::parse(&score)?,
                backend,
            };
            let (report, queries, training) = culprit::trace::trace_with_data(&options)?;
            if let (Some(path), Some(all)) = (&scores_out, &report.all_scores) {
                use std::fmt::Write as _;
                let mut csv = String::from("query_index,train_index,score\n");
                for (q, scores) in report.queries.iter().zip(all) {
                    for (id, s) in report.train_ids.iter().zip(scores) {
                        let _ = writeln!(csv, "{},{},{:e}", q.index, id, s);
                    }
                }
                write_atomic(path, csv.as_bytes())?;
            }
            let text = match format.as_str() {
                "json" => serde_json::to_string_pretty(&report).expect("plain data") + "\n",
                "html" => culprit::report::trace_html(&report, &queries, &training),
                _ => culprit::trace::to_table(&report),
            };
            emit(&text, out.as_deref(), stdout)?;
        }
        Command::Merge { reports, top, format, out } => {
            if !matches!(format.as_str(), "table" | "json") {
                return Err(Error::Usage(format!("unknown --format `{format}` (expected table or json)")));
            }
            let parts = reports
                .iter()
                .map(|p| {
                    let text = std::fs::read_to_string(p).map_err(Error::io(p))?;
                    serde_json::from_str(&text)
                        .map_err(|e| Error::data(p, None, format!("not a trace JSON report: {e}")))
                })
                .collect::<Result<Vec<culprit::trace::TraceReport>>>()?;
            let merged = culprit::trace::merge(parts, top)?;
            let text = match format.as_str() {
                "json" => serde_json::to_string_pretty(&merged).expect("plain data") + "\n",
                _ => culprit::trace::to_table(&merged),
            };
            emit(&text, out.as_deref(), stdout)?;
        }
        Command::Audit { run, data, curvature, top, rank, report: output } => {
            output.check(&["table", "json"])?;
            let ReportArgs { format, out, scores_out } = output;
            let report = culprit::audit::audit(&culprit::audit::AuditOptions {
                run,
                reference: data.spec()?,
                curvature: culprit::curvature::Method::parse(&curvature)?,
                top,
                rank: culprit::audit::AuditRank::parse(&rank)?,
                backend,
            })?;
            if let Some(path) = &scores_out {
                use std::fmt::Write as _;
                let mut csv = String::from("train_index,label,predicted,self_influence,loss,loo_loss,percentile\n");
                for e in &report.all {
                    let _ = writeln!(
                        csv,
                        "{},{},{},{:e},{:e},{:e},{}",
                        e.train_index, e.label, e.predicted, e.self_influence, e.loss, e.loo_loss, e.percentile
                    );
                }
                write_atomic(path, csv.as_bytes())?;
            }
            let text = match format.as_str() {
                "json" => serde_json::to_string_pretty(&report).expect("plain data") + "\n",
                _ => culprit::audit::to_table(&report),
            };
            emit(&text, out.as_deref(), stdout)?;
        }
        Command::Poison {
            data,
            test_data,
            test_split,
            test_skip,
            test_limit,
            out,
            trigger,
            target,
            rate,
            label_noise,
            seed,
        } => {
            let train = data.spec()?;
            let test_path = match test_data {
                Some(p) => p,
                None if train.path.is_dir() => train.path.clone(),
                None => return Err(Error::Usage("--test-data is needed unless --data is an IDX folder".into())),
            };
            let manifest = culprit::poison::poison(&culprit::poison::PoisonOptions {
                train,
                test: DataSpec {
                    path: test_path,
                    split: Split::parse(&test_split)?,
                    skip: test_skip,
                    limit: test_limit,
                },
                out: out.clone(),
                trigger: culprit::poison::Trigger::parse(&trigger)?,
                target,
                rate,
                label_noise,
                seed,
            })?;
            let show = |w: &culprit::poison::WrittenData| {
                let split = if w.path.is_dir() {
                    format!(" --split {}", w.split.prefix().replace("t10k", "test"))
                } else {
                    String::new()
                };
                format!("--data {}{split} ({} examples)", w.path.display(), w.count)
            };
            writeln!(
                stdout,
                "backdoored {} training examples (trigger {}, target {}){}; ground truth in {}\n  train:          {}\n  test, clean:    {}\n  test, triggered: {}",
                manifest.poisoned.len(),
                manifest.trigger,
                manifest.target,
                if manifest.flipped.is_empty() { String::new() } else { format!(", flipped {} labels", manifest.flipped.len()) },
                out.join("poisoned_ids.txt").display(),
                show(&manifest.train),
                show(&manifest.test_clean),
                show(&manifest.test_triggered)
            )
            .map_err(Error::io(std::path::Path::new("<stdout>")))?;
        }
        Command::Purge {
            run,
            ids,
            top,
            out,
            retrain,
            eval_data,
            eval_split,
            eval_skip,
            eval_limit,
            attack,
            format,
        } => {
            if !matches!(format.as_str(), "table" | "json") {
                return Err(Error::Usage(format!("unknown --format `{format}` (expected table or json)")));
            }
            let split = Split::parse(&eval_split)?;
            let report = culprit::purge::purge(&culprit::purge::PurgeOptions {
                run,
                ids,
                top,
                out,
                retrain,
                eval: eval_data
                    .into_iter()
                    .map(|path| DataSpec { path, split, skip: eval_skip, limit: eval_limit })
                    .collect(),
                attack,
                backend,
                quiet: cli.quiet,
            })?;
            let text = match format.as_str() {
                "json" => serde_json::to_string_pretty(&report).expect("plain data") + "\n",
                _ => culprit::purge::to_table(&report),
            };
            emit(&text, None, stdout)?;
        }
        Command::Eval {
            experiment,
            query: QueryArgs { run, data, index },
            measure,
            curvature,
            sample,
            remove,
            subsets,
            fraction,
            seeds,
            tolerance,
            seed,
            format,
            out,
        } => {
            if !matches!(format.as_str(), "table" | "json") {
                return Err(Error::Usage(format!("unknown --format `{format}` (expected table or json)")));
            }
            let experiment = match experiment.as_str() {
                "loo" => culprit::eval::Experiment::Loo { sample, remove },
                "lds" => culprit::eval::Experiment::Lds { subsets, fraction, seeds },
                other => return Err(Error::Usage(format!("unknown experiment `{other}` (expected loo or lds)"))),
            };
            let report = culprit::eval::evaluate(
                &culprit::eval::EvalOptions {
                    run,
                    data: data.spec()?,
                    indices: index,
                    measurement: culprit::gradients::Measurement::parse(&measure)?,
                    curvatures: curvature
                        .iter()
                        .map(|c| culprit::curvature::Method::parse(c))
                        .collect::<Result<Vec<_>>>()?,
                    tolerance,
                    seed,
                    backend,
                    quiet: cli.quiet,
                },
                &experiment,
            )?;
            let text = match format.as_str() {
                "json" => serde_json::to_string_pretty(&report).expect("plain data") + "\n",
                _ => culprit::eval::to_table(&report),
            };
            emit(&text, out.as_deref(), stdout)?;
        }
        Command::Demo { out } => {
            culprit::demo::run(&culprit::demo::DemoOptions { out, backend, quiet: cli.quiet }, stdout)?;
        }
    }
    Ok(())
}

/// Writes a report to `out` (atomically) or to standard output.
fn emit(text: &str, out: Option<&std::path::Path>, stdout: &mut dyn Write) -> Result<()> {
    match out {
        Some(path) => {
            write_atomic(path, text.as_bytes())?;
            eprintln!("report written to {}", path.display());
            Ok(())
        }
        None => stdout.write_all(text.as_bytes()).map_err(Error::io(std::path::Path::new("<stdout>"))),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("culprit: error: {e}");
            ExitCode::from(2)
        }
    }
}

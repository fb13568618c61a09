//! `culprit poison`: plant a backdoor (and optionally label noise) in a copy of a data set, with the
//! ground truth written beside it, so attribution can be tested against a known cause.
//!
//! A backdoor (Gu et al. 2017, "BadNets"): a share `rate` of the training set, drawn uniformly
//! from the examples whose label is not the target class, gets a trigger stamped on its input and
//! its label set to the target. A model trained on it learns "trigger ⇒ target" while staying
//! accurate on clean inputs. The attack success rate (ASR) is the share of triggered test inputs
//! whose true label is not the target that the model classifies as the target.
//!
//! Triggers: `patch:X,Y,SIZE[,VALUE]` sets the SIZE×SIZE square with top-left corner (X, Y) of
//! every channel of an image to VALUE (default: the largest raw value in the training rows, e.g.
//! 255 for MNIST, 16 for scikit-learn's digits); flat CSV rows whose length is a perfect square
//! are square images. `text:WORDS` prepends WORDS to a text (the hashed bag of words ignores
//! order, so where they go does not matter).
//!
//! Label noise: a share `label_noise` of the training examples not poisoned gets a uniformly
//! drawn different label. Everything is drawn from `seed`; the source is never modified.
//!
//! Output (`DIR`), in the source's format, ids renumbered from 0 in each written file:
//! ```text
//! DIR/poison.json        what was done (PoisonManifest), with the paths below
//! DIR/poisoned_ids.txt   ids of the backdoored training examples, one per line
//! DIR/flipped_ids.txt    ids of the label-noise examples (with --label-noise)
//! DIR/train/             IDX: train-{images,labels}-… (CSV: train.csv, JSONL: train.jsonl)
//! DIR/test-clean/        IDX: t10k-… (test-clean.csv / .jsonl): the test rows unchanged
//! DIR/test-triggered/    IDX: t10k-… (test-triggered.csv / .jsonl): every test row triggered,
//!                        labels kept, so the ASR can be computed
//! ```

mod corpus;

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use crate::data::poisoned::{PoisonManifest, WrittenData};

use crate::data::{DataSpec, RawData, SourceKind, Split};
use crate::error::{Error, Result};
use crate::io::AtomicDir;

/// A backdoor trigger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Trigger {
    /// A filled square on an image.
    Patch {
        /// Column of the top-left corner.
        x: usize,
        /// Row of the top-left corner.
        y: usize,
        /// Side in pixels.
        size: usize,
        /// Raw value written (default: the training rows' largest raw value).
        value: Option<f32>,
    },
    /// Words prepended to a text.
    Text {
        /// The words.
        words: String,
    },
}

impl std::str::FromStr for Trigger {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Self::parse(text)
    }
}

impl Trigger {
    /// Parses `patch:X,Y,SIZE[,VALUE]` or `text:WORDS`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || Error::Usage(format!("unknown trigger `{text}` (expected patch:X,Y,SIZE[,VALUE] or text:WORDS)"));
        match text.split_once(':') {
            Some(("patch", rest)) => {
                let parts: Vec<&str> = rest.split(',').collect();
                if !(3..=4).contains(&parts.len()) {
                    return Err(bad());
                }
                let int = |s: &str| s.trim().parse::<usize>().map_err(|_| bad());
                let value = match parts.get(3) {
                    Some(v) => Some(v.trim().parse::<f32>().map_err(|_| bad())?),
                    None => None,
                };
                let size = int(parts[2])?;
                if size == 0 {
                    return Err(Error::Usage("a patch trigger needs SIZE ≥ 1".into()));
                }
                Ok(Self::Patch { x: int(parts[0])?, y: int(parts[1])?, size, value })
            }
            Some(("text", words)) if !words.trim().is_empty() => Ok(Self::Text { words: words.trim().to_string() }),
            _ => Err(bad()),
        }
    }

    /// The CLI form.
    pub fn describe(&self) -> String {
        match self {
            Self::Patch { x, y, size, value: Some(v) } => format!("patch:{x},{y},{size},{v}"),
            Self::Patch { x, y, size, value: None } => format!("patch:{x},{y},{size}"),
            Self::Text { words } => format!("text:{words}"),
        }
    }
}

/// Options of `culprit poison`.
#[derive(Clone, Debug)]
pub struct PoisonOptions {
    /// Training rows to copy and poison.
    pub train: DataSpec,
    /// Test rows to copy clean and triggered.
    pub test: DataSpec,
    /// Output directory (must not exist).
    pub out: PathBuf,
    /// The trigger.
    pub trigger: Trigger,
    /// The target class.
    pub target: u32,
    /// Share of the training set backdoored, in [0, 1).
    pub rate: f64,
    /// Share of the remaining training examples given a wrong label, in [0, 1).
    pub label_noise: f64,
    /// Seed of every draw.
    pub seed: u64,
    /// Language-model corpora: the completion to plant after the trigger (then `trigger` is
    /// `text:STRING` and `target` is unused).
    pub completion: Option<Completion>,
}

/// What a corpus backdoor makes the model emit after the trigger.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The attacker's line.
    pub text: String,
    /// The model's context in bytes: documents are poisoned only where the planted lines end
    /// within it, and queries made only where they fit in it (see [`corpus`]).
    pub context_bytes: usize,
}

/// Rows `spec` selects from a source, raw.
fn select(kind: SourceKind, spec: &DataSpec) -> Result<RawData> {
    Ok(crate::data::load_selected(kind, spec, crate::data::text::DEFAULT_BUCKETS)?.0)
}

/// Stamps the trigger on row `r` of `raw` (a patch on features, words on the text).
fn stamp(raw: &mut RawData, r: usize, trigger: &Trigger, value: f32, source: &Path) -> Result<()> {
    match trigger {
        Trigger::Patch { .. } if raw.texts.is_some() => {
            return Err(Error::data(source, None, "a patch trigger needs images; this is text (use text:WORDS)"));
        }
        Trigger::Patch { x, y, size, .. } => {
            let shape = raw.shape.as_image().ok_or_else(|| {
                Error::data(
                    source,
                    None,
                    format!("a patch trigger needs images; these rows have {} flat features", raw.shape.len()),
                )
            })?;
            if x + size > shape.width || y + size > shape.height {
                return Err(Error::Usage(format!(
                    "the patch at ({x}, {y}) of side {size} does not fit {}×{} images",
                    shape.width, shape.height
                )));
            }
            let dim = shape.len();
            let row = &mut raw.features[r * dim..(r + 1) * dim];
            for c in 0..shape.channels {
                for yy in *y..y + size {
                    for xx in *x..x + size {
                        row[c * shape.height * shape.width + yy * shape.width + xx] = value;
                    }
                }
            }
        }
        Trigger::Text { words } => {
            let texts = raw
                .texts
                .as_mut()
                .ok_or_else(|| Error::data(source, None, "a text trigger needs text (JSONL) data"))?;
            texts[r] = format!("{words} {}", texts[r]);
        }
    }
    Ok(())
}

/// Writes `raw` as `name` under `dir` in the source's format.
fn write(kind: SourceKind, source: &Path, dir: &Path, name: &str, split: Split, raw: &RawData) -> Result<WrittenData> {
    let path = match kind {
        SourceKind::Idx => {
            let folder = dir.join(name);
            crate::data::idx::write(&folder, split, raw.shape.height, raw.shape.width, &raw.features, &raw.labels)?;
            folder
        }
        SourceKind::Csv => {
            let (header, label) = crate::data::csv::header(source)?;
            let path = dir.join(format!("{name}.csv"));
            crate::data::csv::write(&path, &header, label, &raw.features, &raw.labels)?;
            path
        }
        SourceKind::Jsonl => {
            let path = dir.join(format!("{name}.jsonl"));
            crate::data::text::write(&path, raw.texts.as_deref().unwrap_or_default(), &raw.labels)?;
            path
        }
        SourceKind::Corpus => unreachable!("corpora are poisoned by corpus::poison_corpus"),
    };
    Ok(WrittenData { path, split, count: raw.rows })
}

/// Writes ids one per line.
pub(super) fn write_ids(path: &Path, ids: &[usize]) -> Result<()> {
    let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
    crate::io::write_atomic(path, text.as_bytes())
}

/// The source rows, checked: the training and test rows in one format and shape, at least two
/// classes, a target among them. Returns the kind, both sets, the class count and the value a
/// patch writes.
fn load_sources(options: &PoisonOptions) -> Result<(SourceKind, RawData, RawData, usize, f32)> {
    let kind = SourceKind::detect(&options.train.path)?;
    let test_kind = SourceKind::detect(&options.test.path)?;
    if kind != test_kind {
        return Err(Error::data(&options.test.path, None, "the test data must be in the training data's format"));
    }
    let train = select(kind, &options.train)?;
    let clean = select(kind, &options.test)?;
    if train.shape != clean.shape {
        return Err(Error::data(
            &options.test.path,
            None,
            "test examples have another shape than the training examples",
        ));
    }
    let classes = train.labels.iter().chain(&clean.labels).max().map_or(0, |m| *m as usize + 1);
    if classes < 2 {
        return Err(Error::data(&options.train.path, None, "the selected rows hold a single class"));
    }
    if options.target as usize >= classes {
        return Err(Error::Usage(format!("--target {} is not one of the data's {classes} classes", options.target)));
    }
    let value = match options.trigger {
        Trigger::Patch { value: Some(v), .. } => v,
        _ => train.features.iter().fold(0.0f32, |m, v| m.max(*v)),
    };
    Ok((kind, train, clean, classes, value))
}

/// Plants the backdoor and the label noise in `train`; returns the poisoned and flipped rows.
fn plant(train: &mut RawData, options: &PoisonOptions, value: f32, classes: usize) -> Result<(Vec<usize>, Vec<usize>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut candidates: Vec<usize> = (0..train.rows).filter(|&r| train.labels[r] != options.target).collect();
    let count = (options.rate * train.rows as f64).round() as usize;
    if count > candidates.len() {
        return Err(Error::Usage(format!(
            "--rate {} asks for {count} poisons but only {} examples are not of the target class",
            options.rate,
            candidates.len()
        )));
    }
    candidates.shuffle(&mut rng);
    let mut poisoned: Vec<usize> = candidates[..count].to_vec();
    poisoned.sort_unstable();
    for &r in &poisoned {
        stamp(train, r, &options.trigger, value, &options.train.path)?;
        train.labels[r] = options.target;
    }
    let mut rest: Vec<usize> = (0..train.rows).filter(|r| poisoned.binary_search(r).is_err()).collect();
    rest.shuffle(&mut rng);
    let flips = (options.label_noise * train.rows as f64).round() as usize;
    if flips > rest.len() {
        return Err(Error::Usage(format!(
            "--label-noise {} asks for {flips} flipped labels but only {} examples are not poisoned",
            options.label_noise,
            rest.len()
        )));
    }
    let mut flipped: Vec<usize> = rest[..flips].to_vec();
    flipped.sort_unstable();
    for &r in &flipped {
        let y = train.labels[r];
        let other = rng.random_range(0..classes as u32 - 1);
        train.labels[r] = if other >= y { other + 1 } else { other };
    }
    Ok((poisoned, flipped))
}

/// Runs `culprit poison`.
pub fn poison(options: &PoisonOptions) -> Result<PoisonManifest> {
    if !(0.0..1.0).contains(&options.rate) || !(0.0..1.0).contains(&options.label_noise) {
        return Err(Error::Usage("--rate and --label-noise must be in [0, 1)".into()));
    }
    if options.out.exists() {
        return Err(Error::run(&options.out, "already exists; choose another --out"));
    }
    if let Some(completion) = &options.completion {
        return corpus::poison_corpus(options, completion);
    }
    let (kind, mut train, clean, classes, value) = load_sources(options)?;
    let (poisoned, flipped) = plant(&mut train, options, value, classes)?;
    let mut triggered = select(kind, &options.test)?;
    for r in 0..triggered.rows {
        stamp(&mut triggered, r, &options.trigger, value, &options.test.path)?;
    }
    // Everything goes into a temporary sibling, renamed into place at the end.
    let dir = AtomicDir::create(&options.out)?;
    let tmp = dir.path().to_path_buf();
    let mut manifest = PoisonManifest {
        trigger: options.trigger.describe(),
        patch_value: matches!(options.trigger, Trigger::Patch { .. }).then_some(value),
        target: options.target,
        rate: options.rate,
        label_noise: options.label_noise,
        seed: options.seed,
        source: options.train.path.clone(),
        train: write(kind, &options.train.path, &tmp, "train", Split::Train, &train)?,
        test_clean: write(kind, &options.test.path, &tmp, "test-clean", Split::Test, &clean)?,
        test_triggered: write(kind, &options.test.path, &tmp, "test-triggered", Split::Test, &triggered)?,
        poisoned,
        flipped,
        completion: None,
    };
    write_ids(&tmp.join("poisoned_ids.txt"), &manifest.poisoned)?;
    if !manifest.flipped.is_empty() {
        write_ids(&tmp.join("flipped_ids.txt"), &manifest.flipped)?;
    }
    // Paths name the final directory.
    for w in [&mut manifest.train, &mut manifest.test_clean, &mut manifest.test_triggered] {
        w.path = crate::data::absolute(&options.out.join(w.path.strip_prefix(&tmp).expect("written under tmp")));
    }
    let json = serde_json::to_vec_pretty(&manifest).expect("plain data");
    crate::io::write_atomic(&tmp.join("poison.json"), &json)?;
    dir.commit()?;
    Ok(manifest)
}

/// The flags of `culprit poison`.
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct PoisonArgs {
    /// Training rows to copy and poison.
    #[command(flatten)]
    pub data: DataSpec,
    /// Test data to copy clean and triggered (default: the IDX folder's test split).
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// Split of the test IDX folder.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub test_split: Split,
    /// Skip the first N test rows.
    #[arg(long, default_value_t = 0)]
    pub test_skip: usize,
    /// Use at most N test rows.
    #[arg(long)]
    pub test_limit: Option<usize>,
    /// Output directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// patch:X,Y,SIZE[,VALUE] (images) or text:WORDS (text).
    #[arg(long)]
    pub trigger: Trigger,
    /// The class triggered inputs should be sent to (classifiers).
    #[arg(long, default_value_t = 0)]
    pub target: u32,
    /// Share of the training set to backdoor, e.g. 0.01.
    #[arg(long, value_parser = culprit_engine::params::unit_share, allow_negative_numbers = true)]
    pub rate: f64,
    /// Share of the other training examples given a wrong label.
    #[arg(long, default_value_t = 0.0, value_parser = culprit_engine::params::unit_share, allow_negative_numbers = true)]
    pub label_noise: f64,
    /// Seed of every draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Language-model corpora: plant the trigger followed by this completion (at a line boundary)
    /// in a share --rate of the documents; --test-data (default: the rows after the training
    /// rows) gives the held-out documents the queries are made from.
    #[arg(long)]
    pub completion: Option<String>,
    /// Corpora: the model's context in bytes (a byte is at least one token of either
    /// tokenizer). Only documents where the trigger and completion end within it are poisoned,
    /// and only held-out documents whose triggered query fits in it make queries. Default:
    /// GPT-2's context.
    #[arg(long, default_value_t = 1024, value_parser = culprit_engine::params::at_least_one)]
    pub context_bytes: usize,
}

/// Poisons and says where everything went.
pub fn run(args: &PoisonArgs, stdout: &mut dyn std::io::Write) -> Result<()> {
    let test_path = match &args.test_data {
        Some(p) => p.clone(),
        None if args.data.path.is_dir() || args.completion.is_some() => args.data.path.clone(),
        None => return Err(Error::Usage("--test-data is needed unless --data is an IDX folder".into())),
    };
    // A corpus's held-out documents default to the rows after the training rows.
    let test_skip = match (&args.test_data, &args.completion, args.data.limit) {
        (None, Some(_), Some(limit)) if args.test_skip == 0 => args.data.skip + limit,
        _ => args.test_skip,
    };
    let manifest = poison(&PoisonOptions {
        train: args.data.clone(),
        test: DataSpec { path: test_path, split: args.test_split, skip: test_skip, limit: args.test_limit },
        out: args.out.clone(),
        trigger: args.trigger.clone(),
        target: args.target,
        rate: args.rate,
        label_noise: args.label_noise,
        seed: args.seed,
        completion: args.completion.clone().map(|text| Completion { text, context_bytes: args.context_bytes }),
    })?;
    let show = |w: &WrittenData| {
        let split = if w.path.is_dir() {
            format!(" --split {}", w.split.prefix().replace("t10k", "test"))
        } else {
            String::new()
        };
        format!("--data {}{split} ({} examples)", w.path.display(), w.count)
    };
    writeln!(
        stdout,
        "backdoored {} training examples (trigger {}, {}){}; ground truth in {}\n  train:          {}\n  test, clean:    {}\n  test, triggered: {}",
        manifest.poisoned.len(),
        manifest.trigger,
        match &manifest.completion {
            Some(c) => format!("completion {c:?}"),
            None => format!("target {}", manifest.target),
        },
        if manifest.flipped.is_empty() { String::new() } else { format!(", flipped {} labels", manifest.flipped.len()) },
        args.out.join("poisoned_ids.txt").display(),
        show(&manifest.train),
        show(&manifest.test_clean),
        show(&manifest.test_triggered)
    )
    .map_err(super::stdout_error)
}

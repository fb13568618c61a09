//! Data in: loaders for IDX image folders, CSV tables and JSONL text, with stable example ids.
//!
//! `--data` is a folder of IDX files in MNIST's naming, a `.csv` file, or a `.jsonl[.gz]` file.
//! Every example keeps a stable id, its row index in the source file (0-based), and the run's
//! [`DataManifest`] records each source file's SHA-256, so an id always names the same example.
//! `--skip S --limit N` select rows `S..S+N` of the source (ids keep their source numbering).
//!
//! Preprocessing, fitted on the training rows and stored in the manifest so every later command
//! (predict, trace, …) applies exactly the same transformation:
//! - IDX pixels are divided by 255, into [0, 1].
//! - CSV features are divided by the largest absolute feature value of the training rows
//!   (`--normalize max`, the default: integer pixel-like features land in [0, 1]) or standardised
//!   per column, x ↦ (x − mean) / std (`--normalize standard`, for columns of different scales).
//! - JSONL text becomes a hashed bag of words (see [`text`]).

pub mod bpe;
pub mod corpus;
pub mod csv;
pub mod idx;
pub mod poisoned;
pub mod provenance;
pub mod stream;
pub mod text;
pub mod tokenizer;

use std::io::Read;
use std::path::{Path, PathBuf};

use culprit_models::{Batch, Features, InputShape};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use idx::Split;

use crate::error::{Error, Result};

/// `path` made absolute against the working directory (not resolving links), so that a run or a
/// poisoned set written here is found from anywhere; unchanged if the directory is unknown.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The most classes a classifier may have: its output layer and every per-class sweep (the
/// exact Fisher, the Gauss–Newton products) grow with C, so a label meant as an id (1000000)
/// is refused before anything is allocated.
pub const MAX_CLASSES: usize = 65_536;

/// A source as loaded, before selection and normalisation.
pub struct RawData {
    /// `rows × shape.len()` raw features.
    pub features: Vec<f32>,
    /// `rows` labels.
    pub labels: Vec<u32>,
    /// Shape of one example.
    pub shape: InputShape,
    /// The raw texts, for text sources.
    pub texts: Option<Vec<String>>,
    /// Each file read, with its SHA-256 (hex).
    pub files: Vec<(PathBuf, String)>,
    /// Number of examples.
    pub rows: usize,
    /// The feature columns' names, in order (CSV tables).
    pub columns: Option<Vec<String>>,
}

impl RawData {
    /// Reorders the feature columns to `trained` (the run's columns, by name), so a table whose
    /// columns were permuted reads the same; a missing or an extra column is an error naming it
    /// (with a different count, where the sizes are checked).
    /// Cost: one pass over the features.
    fn match_columns(&mut self, path: &Path, trained: &[String]) -> Result<()> {
        let Some(columns) = &self.columns else { return Ok(()) };
        // A different count is reported, with the names, where the sizes are checked.
        if columns == trained || columns.len() != trained.len() {
            return Ok(());
        }
        let difference = column_difference(columns, trained);
        if !difference.is_empty() {
            return Err(Error::data(path, Some(0), difference));
        }
        let source: Vec<usize> =
            trained.iter().map(|c| columns.iter().position(|x| x == c).expect("checked")).collect();
        let dim = columns.len();
        let mut reordered = Vec::with_capacity(self.features.len());
        for row in self.features.chunks(dim) {
            reordered.extend(source.iter().map(|&j| row[j]));
        }
        self.features = reordered;
        self.columns = Some(trained.to_vec());
        Ok(())
    }
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic; returns the
/// (decompressed) bytes and the SHA-256 of the file as stored.
pub fn read_file(path: &Path) -> Result<(Vec<u8>, String)> {
    let (stored, sha) = read_stored(path)?;
    Ok((contents(path, stored, None)?, sha))
}

/// A file's bytes as stored and their SHA-256 (hex).
pub fn read_stored(path: &Path) -> Result<(Vec<u8>, String)> {
    let stored = std::fs::read(path).map_err(Error::io(path))?;
    let sha = hex(&Sha256::digest(&stored));
    Ok((stored, sha))
}

/// The contents of a stored file (`path` names it in errors), gunzipped when it starts with the
/// gzip magic: all of them, or with `Some(n)` the first `n` bytes only (fewer when the contents
/// are shorter), decompressing no further. Only the whole contents are checked against gzip's
/// own CRC-32 and length, at the stream's end.
pub fn contents(path: &Path, stored: Vec<u8>, at_most: Option<usize>) -> Result<Vec<u8>> {
    if is_gzip(&stored) {
        gunzip(path, &stored, at_most)
    } else {
        let mut stored = stored;
        stored.truncate(at_most.unwrap_or(usize::MAX));
        Ok(stored)
    }
}

/// The first `n` bytes of a stored file's contents (fewer when they are shorter), as
/// [`contents`] gives them, leaving `stored` whole.
pub fn head(path: &Path, stored: &[u8], n: usize) -> Result<Vec<u8>> {
    if is_gzip(stored) { gunzip(path, stored, Some(n)) } else { Ok(stored[..n.min(stored.len())].to_vec()) }
}

fn is_gzip(stored: &[u8]) -> bool {
    stored.starts_with(&[0x1f, 0x8b])
}

/// `stored` gunzipped (every member), whole or its first `at_most` bytes.
fn gunzip(path: &Path, stored: &[u8], at_most: Option<usize>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let decoder = flate2::read::MultiGzDecoder::new(stored);
    if let Some(n) = at_most {
        out.reserve_exact(n);
    }
    decoder
        .take(at_most.map_or(u64::MAX, |n| n as u64))
        .read_to_end(&mut out)
        .map_err(|e| Error::data(path, None, format!("corrupt or truncated gzip stream: {e}")))?;
    Ok(out)
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Loads a whole source as stored (features raw, no selection, no normalisation).
pub fn load_raw(kind: SourceKind, path: &Path, split: Split, buckets: usize) -> Result<RawData> {
    Ok(load_selected(kind, &DataSpec { path: path.to_path_buf(), split, skip: 0, limit: None }, buckets)?.0)
}

/// Loads the rows `spec` selects (`--skip`, `--limit`) of a source, raw, and the source row of
/// the first. An IDX folder converts only the selected images to f32 (MNIST's 60,000 images are
/// 188 MB as f32, 47 MB as stored bytes); a table or JSON lines are parsed whole, then cut.
pub fn load_selected(kind: SourceKind, spec: &DataSpec, buckets: usize) -> Result<(RawData, usize)> {
    load_selected_of(kind, spec, buckets, &[])
}

/// [`load_selected`], told the files a run was trained on (`checked`, from its manifest): an
/// IDX file whose stored bytes have one of their SHA-256 was read whole and checked against its
/// header when the run was trained, so only as much of it is decompressed as the selected rows
/// reach ([`idx::load_selected`]).
pub fn load_selected_of(
    kind: SourceKind,
    spec: &DataSpec,
    buckets: usize,
    checked: &[FileDigest],
) -> Result<(RawData, usize)> {
    let path = &spec.path;
    let mut raw = match kind {
        SourceKind::Idx => {
            let checked: Vec<&str> = checked.iter().map(|f| f.sha256.as_str()).collect();
            return idx::load_selected(path, spec.split, spec.skip, spec.limit, &checked);
        }
        SourceKind::Csv => csv::load(path)?,
        SourceKind::Jsonl => text::load(path, buckets)?,
        SourceKind::Corpus => {
            return Err(Error::data(path, None, "a language-model corpus is read with Dataset::load_corpus"));
        }
    };
    let rows = selected_rows(path, raw.rows, spec.skip, spec.limit, &format!("the source has {} rows", raw.rows))?;
    let dim = raw.shape.len();
    if rows.len() < raw.rows {
        raw.features = raw.features[rows.start * dim..rows.end * dim].to_vec();
        raw.labels = raw.labels[rows.clone()].to_vec();
        raw.texts = raw.texts.map(|t| t[rows.clone()].to_vec());
        raw.rows = rows.len();
    }
    Ok((raw, rows.start))
}

/// What a streamed reader calls for each block of rows: `(first row, features row-major, labels)`.
pub type EachRowBlock<'a> = dyn FnMut(usize, &[f32], &[u32]) -> Result<()> + 'a;

/// What a streamed read of an image source found ([`read_image_blocks`]).
#[derive(Clone, Debug)]
pub struct ImageStream {
    /// Examples in the source (all rows, selected or not).
    pub rows: usize,
    /// The shape of one example as stored (a CSV table's is flat).
    pub shape: InputShape,
    /// Each file read, with its SHA-256 as stored.
    pub files: Vec<(PathBuf, String)>,
    /// The feature columns' names (CSV tables).
    pub columns: Option<Vec<String>>,
}

/// Streams an IDX folder's split or a CSV table: calls `each(first, features, labels)` for
/// consecutive blocks of at most `per_block` rows in order (`first` the block's first row;
/// features raw, row-major, f32), holding one block. Errors name the file and the row.
pub fn read_image_blocks(
    kind: SourceKind,
    path: &Path,
    split: Split,
    per_block: usize,
    each: &mut EachRowBlock<'_>,
) -> Result<ImageStream> {
    match kind {
        SourceKind::Idx => {
            let (mut features, mut labels) = (Vec::new(), Vec::new());
            let found = idx::read_image_blocks(path, split, per_block, &mut |first, pixels, ys| {
                features.clear();
                features.extend(pixels.iter().map(|&p| f32::from(p)));
                labels.clear();
                labels.extend(ys.iter().map(|&y| u32::from(y)));
                each(first, &features, &labels)
            })?;
            let shape = InputShape { channels: 1, height: found.height, width: found.width };
            Ok(ImageStream { rows: found.n, shape, files: found.files, columns: None })
        }
        SourceKind::Csv => {
            let found = csv::read_row_blocks(path, per_block, each)?;
            let shape = InputShape::flat(found.columns.len());
            Ok(ImageStream {
                rows: found.rows,
                shape,
                files: vec![(path.to_path_buf(), found.sha)],
                columns: Some(found.columns),
            })
        }
        SourceKind::Jsonl | SourceKind::Corpus => {
            Err(Error::data(path, None, "JSON lines hold texts, not images or table rows"))
        }
    }
}

/// The bytes `path` holds once decompressed (its size as stored when it is not gzip), from
/// one pass through the decompressor: what holding its contents costs, before parsing.
pub fn plain_len(path: &Path) -> Result<u64> {
    let mut sha = Sha256::new();
    let mut reader = stream::open(path, &mut sha)?;
    std::io::copy(&mut reader, &mut std::io::sink())
        .map_err(|e| Error::data(path, None, format!("cannot read it (a corrupt or truncated gzip stream?): {e}")))
}

/// The rows `--skip skip --limit limit` select of a source of `total` rows; selecting none is
/// an error naming the file and how much it holds (`holds`, e.g. "the source has 7 rows").
pub fn selected_rows(
    path: &Path,
    total: usize,
    skip: usize,
    limit: Option<usize>,
    holds: &str,
) -> Result<std::ops::Range<usize>> {
    let start = skip.min(total);
    let end = limit.map_or(total, |l| start.saturating_add(l).min(total));
    if start >= end {
        return Err(Error::data(path, None, format!("no examples selected: {holds}, --skip {skip} --limit {limit:?}")));
    }
    Ok(start..end)
}

/// The kind of a data source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A folder of IDX files.
    Idx,
    /// A CSV table.
    Csv,
    /// JSON lines with `text` and `label` (a text classifier's data).
    Jsonl,
    /// JSON lines of documents (`text`) or queries (`prompt`, `completion`) for a language model.
    Corpus,
}

impl SourceKind {
    /// Tells the kind from the path: a folder is IDX, else the file name's ending.
    pub fn detect(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Ok(Self::Idx);
        }
        if !path.exists() {
            return Err(Error::data(path, None, "no such file or folder"));
        }
        let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        if name.ends_with(".csv") {
            Ok(Self::Csv)
        } else if name.ends_with(".jsonl") || name.ends_with(".json") {
            Ok(Self::Jsonl)
        } else {
            Err(Error::data(path, None, "unknown data format: expected an IDX folder, a .csv or a .jsonl[.gz] file"))
        }
    }
}

/// How CSV features are normalised (`--normalize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NormalizeMode {
    /// Divide by the largest absolute value in the training rows.
    #[default]
    Max,
    /// Standardise each column with the training rows' mean and standard deviation.
    Standard,
}

impl NormalizeMode {
    /// Parses `max` or `standard`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "max" => Ok(Self::Max),
            "standard" => Ok(Self::Standard),
            other => Err(Error::Usage(format!("unknown normalization `{other}` (expected max or standard)"))),
        }
    }
}

/// The transformation applied to raw features; fitted once on the training rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Normalization {
    /// Features used as loaded.
    None,
    /// x ↦ x / divisor.
    Scale {
        /// The divisor.
        divisor: f32,
    },
    /// x ↦ (x − mean) / std, per column (std 1 for constant columns).
    Standard {
        /// Column means.
        mean: Vec<f32>,
        /// Column standard deviations.
        std: Vec<f32>,
    },
}

impl Normalization {
    fn fit(kind: SourceKind, mode: NormalizeMode, features: &[f32], dim: usize) -> Self {
        match (kind, mode) {
            (SourceKind::Idx, _) => Self::Scale { divisor: 255.0 },
            (SourceKind::Jsonl | SourceKind::Corpus, _) => Self::None,
            (SourceKind::Csv, NormalizeMode::Max) => {
                let m = features.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                Self::Scale { divisor: if m > 0.0 { m } else { 1.0 } }
            }
            (SourceKind::Csv, NormalizeMode::Standard) => {
                let n = (features.len() / dim).max(1) as f64;
                let mut mean = vec![0.0f64; dim];
                let mut sq = vec![0.0f64; dim];
                for row in features.chunks(dim) {
                    for (j, &v) in row.iter().enumerate() {
                        mean[j] += f64::from(v);
                        sq[j] += f64::from(v) * f64::from(v);
                    }
                }
                let mean: Vec<f64> = mean.iter().map(|s| s / n).collect();
                let std = sq
                    .iter()
                    .zip(&mean)
                    .map(|(s, m)| {
                        let var = (s / n - m * m).max(0.0);
                        if var > 1e-12 { var.sqrt() as f32 } else { 1.0 }
                    })
                    .collect();
                Self::Standard { mean: mean.into_iter().map(|m| m as f32).collect(), std }
            }
        }
    }

    fn apply(&self, features: &mut [f32], dim: usize) {
        match self {
            Self::None => {}
            Self::Scale { divisor } => features.iter_mut().for_each(|v| *v /= divisor),
            Self::Standard { mean, std } => {
                for row in features.chunks_mut(dim) {
                    for ((v, m), s) in row.iter_mut().zip(mean).zip(std) {
                        *v = (*v - m) / s;
                    }
                }
            }
        }
    }
}

/// One source file and its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// The path as given.
    pub path: PathBuf,
    /// SHA-256 of the file as stored (hex).
    pub sha256: String,
}

/// Which data a run was trained on and how it was preprocessed; saved as `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataManifest {
    /// Source kind.
    pub kind: SourceKind,
    /// `--data` as given.
    pub path: PathBuf,
    /// Each file read, with its hash.
    pub files: Vec<FileDigest>,
    /// IDX split.
    pub split: Split,
    /// Rows skipped at the start of the source.
    pub skip: usize,
    /// Row limit, if any.
    pub limit: Option<usize>,
    /// Number of examples selected.
    pub count: usize,
    /// Shape of one example after featurisation.
    pub shape: InputShape,
    /// Number of classes (largest training label + 1).
    pub num_classes: usize,
    /// Feature normalisation.
    pub normalization: Normalization,
    /// Hash buckets, for text.
    pub buckets: Option<usize>,
    /// Ids (source rows) left out of the selection by `culprit purge`, ascending. Data files are
    /// never edited: a purged run's manifest names the same files and lists what it excludes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<usize>,
    /// Language-model corpora: the tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<tokenizer::TokenizerSpec>,
    /// Language-model corpora: documents truncated to the model's context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<usize>,
    /// CSV tables: the feature columns' names, in the order the model reads them (data read for
    /// the run later is matched to them by name). Runs written before 0.2 have none: positional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
}

impl DataManifest {
    /// Raw rows (as a source of this kind stores them: pixels 0..255, table values, or a text's
    /// hashed bag of words from [`text::featurize`]) preprocessed exactly as this run's training
    /// data was, as a batch with `labels`.
    pub fn preprocess(&self, mut features: Vec<f32>, labels: Vec<u32>) -> Features {
        let dim = self.shape.len();
        self.normalization.apply(&mut features, dim);
        Features::new(features, labels, dim)
    }
}

/// Where to read data from (`--data --split --skip --limit`).
#[derive(Clone, Debug, clap::Args)]
#[group(skip)]
pub struct DataSpec {
    /// A folder of IDX files (MNIST naming), a .csv file with a `label` column, or a .jsonl[.gz] file.
    #[arg(long = "data")]
    pub path: PathBuf,
    /// Split of an IDX folder.
    #[arg(long, value_enum, default_value_t = Split::Train)]
    pub split: Split,
    /// Skip the first N examples (ids keep their row numbers in the source).
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// Use at most N examples (after --skip).
    #[arg(long)]
    pub limit: Option<usize>,
}

impl DataSpec {
    /// Every row of `path` (the train split of an IDX folder).
    pub fn all(path: PathBuf) -> Self {
        Self { path, split: Split::Train, skip: 0, limit: None }
    }

    /// The flags that select these rows (`--data --split --skip [--limit]`).
    pub fn flags(&self) -> Vec<std::ffi::OsString> {
        let mut flags: Vec<std::ffi::OsString> = vec![
            "--data".into(),
            self.path.clone().into(),
            "--split".into(),
            culprit_engine::params::value_name(&self.split).into(),
            "--skip".into(),
            self.skip.to_string().into(),
        ];
        if let Some(limit) = self.limit {
            flags.extend(["--limit".into(), limit.to_string().into()]);
        }
        flags
    }
}

/// How to preprocess: fit on these rows (training), or reuse a run's manifest (everything else).
#[derive(Clone, Copy, Debug)]
pub enum Preprocessing<'a> {
    /// Fit the normalisation on the loaded rows.
    Fit {
        /// CSV normalisation.
        normalize: NormalizeMode,
        /// Text hash buckets.
        buckets: usize,
    },
    /// Apply a run's normalisation and check the data fits its model.
    Reuse(&'a DataManifest),
}

/// Examples ready for a model: a batch of the model's kind ([`Features`] for the reference
/// classifiers, [`culprit_models::Tokens`] for language models) with each example's id, text and
/// provenance.
#[derive(Clone, Debug)]
pub struct Dataset<B = Features> {
    /// The examples, as the model reads them.
    pub examples: B,
    /// Stable ids: row index in the source.
    pub ids: Vec<usize>,
    /// Raw texts for text sources (for reports).
    pub texts: Option<Vec<String>>,
    /// Where each example came from (a JSONL line's `source` field), when the source says.
    pub sources: Option<Vec<String>>,
    /// What was loaded, and how.
    pub manifest: DataManifest,
}

/// The number of classes the training labels make (max + 1), within [2, [`MAX_CLASSES`]].
fn count_classes(path: &Path, labels: &[u32]) -> Result<usize> {
    let classes = labels.iter().max().map_or(0, |m| *m as usize + 1);
    if classes > MAX_CLASSES {
        let label = classes - 1;
        return Err(Error::data(
            path,
            None,
            format!(
                "label {label} makes {classes} classes; culprit's classifiers take at most {MAX_CLASSES} (labels are class numbers 0..C−1, not ids)"
            ),
        ));
    }
    if classes < 2 {
        return Err(Error::data(path, None, "the selected rows hold a single class; a classifier needs two"));
    }
    Ok(classes)
}

/// Checks examples (`dim` features, in `columns` when named; `labels` from row `start`) fit the
/// model a run's manifest `m` describes.
fn check_fits(
    path: &Path,
    m: &DataManifest,
    dim: usize,
    columns: Option<&[String]>,
    labels: &[u32],
    start: usize,
) -> Result<()> {
    if m.shape.len() != dim {
        let names = match (columns, &m.columns) {
            (Some(c), Some(t)) => format!(" ({})", column_difference(c, t)),
            _ => String::new(),
        };
        return Err(Error::data(
            path,
            None,
            format!("examples have {dim} features but the model takes {}{names}", m.shape.len()),
        ));
    }
    if let Some((i, y)) = labels.iter().enumerate().find(|(_, y)| **y as usize >= m.num_classes) {
        return Err(Error::data(
            path,
            Some(start + i + 1),
            format!("label {y} is outside the model's {} classes", m.num_classes),
        ));
    }
    Ok(())
}

/// What separates a table's `columns` from the run's `trained` ones, in words.
fn column_difference(columns: &[String], trained: &[String]) -> String {
    let missing: Vec<String> = trained.iter().filter(|c| !columns.contains(c)).map(|c| format!("`{c}`")).collect();
    let extra: Vec<String> = columns.iter().filter(|c| !trained.contains(c)).map(|c| format!("`{c}`")).collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("no column {} that the run was trained with", missing.join(", ")));
    }
    if !extra.is_empty() {
        problems.push(format!("column {} that the run was not trained with", extra.join(", ")));
    }
    problems.join("; ")
}

impl Dataset {
    /// Loads, selects and preprocesses a source.
    pub fn load(spec: &DataSpec, preprocessing: Preprocessing<'_>) -> Result<Self> {
        let kind = SourceKind::detect(&spec.path)?;
        let buckets = match preprocessing {
            Preprocessing::Fit { buckets, .. } => buckets,
            Preprocessing::Reuse(m) => m.buckets.unwrap_or(text::DEFAULT_BUCKETS),
        };
        let checked = match preprocessing {
            Preprocessing::Fit { .. } => &[][..],
            Preprocessing::Reuse(m) => &m.files[..],
        };
        let (mut raw, start) = load_selected_of(kind, spec, buckets, checked)?;
        if let Preprocessing::Reuse(DataManifest { columns: Some(trained), .. }) = preprocessing {
            raw.match_columns(&spec.path, trained)?;
        }
        let dim = raw.shape.len();
        let mut features = raw.features;
        let labels = raw.labels;
        let count = labels.len();
        let texts = raw.texts;
        let files = raw.files.into_iter().map(|(path, sha256)| FileDigest { path: absolute(&path), sha256 }).collect();
        let (normalization, num_classes) = match preprocessing {
            Preprocessing::Fit { normalize, .. } => {
                (Normalization::fit(kind, normalize, &features, dim), count_classes(&spec.path, &labels)?)
            }
            Preprocessing::Reuse(m) => {
                check_fits(&spec.path, m, dim, raw.columns.as_deref(), &labels, start)?;
                (m.normalization.clone(), m.num_classes)
            }
        };
        normalization.apply(&mut features, dim);
        let examples = Features::new(features, labels, dim);
        let manifest = DataManifest {
            kind,
            path: absolute(&spec.path),
            files,
            split: spec.split,
            skip: spec.skip,
            limit: spec.limit,
            count,
            shape: raw.shape,
            num_classes,
            normalization,
            buckets: (kind == SourceKind::Jsonl).then_some(buckets),
            excluded: Vec::new(),
            tokenizer: None,
            truncated: None,
            columns: raw.columns,
        };
        Ok(Self { examples, ids: (start..start + count).collect(), texts, sources: None, manifest })
    }

    /// The features and labels.
    pub fn examples(&self) -> &Features {
        &self.examples
    }

    /// The labels.
    pub fn labels(&self) -> &[u32] {
        self.examples.labels()
    }

    /// Features per example.
    pub fn dim(&self) -> usize {
        self.manifest.shape.len()
    }
}

/// The label an example is listed with in reports: its class (0 for language-model documents,
/// which have none).
pub trait ListedLabel {
    /// Example `row`'s label.
    fn listed_label(&self, row: usize) -> u32;
}

impl ListedLabel for Features {
    fn listed_label(&self, row: usize) -> u32 {
        self.labels()[row]
    }
}

impl ListedLabel for culprit_models::Tokens {
    fn listed_label(&self, _: usize) -> u32 {
        0
    }
}

impl<B: Batch> Dataset<B> {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// The examples with these ids (source rows), in the order given; an id that is not among the
    /// selected rows is an error naming the file and the rows it holds. Cost O(len + ids).
    pub fn select(&self, ids: &[usize]) -> Result<Dataset<B>> {
        let row_of: std::collections::HashMap<usize, usize> =
            self.ids.iter().enumerate().map(|(r, &id)| (id, r)).collect();
        let mut rows = Vec::with_capacity(ids.len());
        let mut seen = std::collections::HashSet::new();
        for &id in ids {
            if !seen.insert(id) {
                return Err(Error::Usage(format!(
                    "index {id} is listed twice; each example is one query (a repeated one would count twice in the combined ranking)"
                )));
            }
            rows.push(*row_of.get(&id).ok_or_else(|| {
                Error::data(
                    &self.manifest.path,
                    None,
                    format!(
                        "no example with index {id} in the selected rows ({}..{})",
                        self.ids.first().copied().unwrap_or(0),
                        self.ids.last().map_or(0, |l| l + 1)
                    ),
                )
            })?);
        }
        Ok(Dataset {
            examples: self.examples.gather(&rows),
            ids: ids.to_vec(),
            texts: self.texts.as_ref().map(|t| rows.iter().map(|&r| t[r].clone()).collect()),
            sources: self.sources.as_ref().map(|t| rows.iter().map(|&r| t[r].clone()).collect()),
            manifest: self.manifest.clone(),
        })
    }

    /// Leaves out the examples with these ids (source rows) and records them in the manifest.
    /// Every id must be one of the selected examples. Cost O(len + ids).
    pub fn exclude(&mut self, ids: &[usize]) -> Result<()> {
        if ids.is_empty() {
            return Ok(()); // every run without a purge: nothing to copy
        }
        let mut drop: Vec<usize> = ids.to_vec();
        drop.sort_unstable();
        drop.dedup();
        let known: std::collections::HashSet<usize> = self.ids.iter().copied().collect();
        if let Some(bad) = drop.iter().find(|i| !known.contains(i)) {
            return Err(Error::data(
                &self.manifest.path,
                None,
                format!("cannot exclude example {bad}: it is not among the {} selected examples", self.len()),
            ));
        }
        let keep: Vec<usize> = (0..self.len()).filter(|&r| drop.binary_search(&self.ids[r]).is_err()).collect();
        self.examples = self.examples.gather(&keep);
        self.texts = self.texts.take().map(|t| keep.iter().map(|&r| t[r].clone()).collect());
        self.sources = self.sources.take().map(|t| keep.iter().map(|&r| t[r].clone()).collect());
        self.ids = keep.iter().map(|&r| self.ids[r]).collect();
        let mut excluded = std::mem::take(&mut self.manifest.excluded);
        excluded.extend(drop);
        excluded.sort_unstable();
        excluded.dedup();
        self.manifest.excluded = excluded;
        self.manifest.count = self.len();
        Ok(())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}

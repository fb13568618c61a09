//! `culprit scan`: rank candidate triggers in a labelled training set before anyone reports an
//! incident (word n-grams of JSONL texts; quantised pixel squares of IDX folders and square CSV
//! rows). The statistic and its passes are in [`crate::scan`]; the report in
//! [`crate::report::scan`]. `culprit purge --ids scan.json --top K` removes the target-labelled
//! carriers of the first K candidates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::commands::{Format, ReportArgs, emit};
use crate::data::{self, DataSpec, SourceKind};
use crate::error::{Error, Result};
use crate::report::scan::{ScanReport, Shown, to_html, to_table};
use crate::report::trace::OUTPUT_SCHEMA_VERSION;
use crate::scan::corpus::CorpusFile;
use crate::scan::image::{ImageFile, ImageScan, ImageShared, MAX_IMAGE_SIDE, MAX_SIDE};
use crate::scan::text::{TextFile, TextScan};
use crate::scan::{Feature, ScanSettings, scan, scan_blocks};
use crate::workspace::Run;
use crate::workspace::kind::is_language;

/// Arguments of `culprit scan`.
#[derive(Clone, Debug, clap::Args)]
pub struct ScanArgs {
    /// The labelled data to scan.
    #[command(flatten)]
    pub data: DataSpec,
    /// Text: the longest n-gram tried, in words.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=8))]
    pub words: u16,
    /// Images: the smallest square side tried, in pixels.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=MAX_SIDE as i64))]
    pub min_side: u16,
    /// Images: the largest square side tried, in pixels [default: a quarter of the image's
    /// smaller side, within 2..=5: 5 for MNIST's 28 × 28, 2 for 8 × 8 digits, where a larger
    /// square would cover much of the object].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_SIDE as i64))]
    pub max_side: Option<u16>,
    /// Candidates reported.
    #[arg(long, default_value_t = ScanSettings::default().top)]
    pub top: usize,
    /// Fewest carriers a feature needs to be tested.
    #[arg(long, default_value_t = ScanSettings::default().min_carriers as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub min_carriers: u64,
    /// Family-wise error rate of the significance threshold (Bonferroni).
    #[arg(long, default_value_t = ScanSettings::default().alpha, value_parser = culprit_engine::params::unit_share)]
    pub alpha: f64,
    /// Clip of the baseline's probabilities, [ε, 1 − ε]: the label noise the test tolerates.
    #[arg(long, default_value_t = ScanSettings::default().floor, value_parser = culprit_engine::params::unit_share)]
    pub floor: f64,
    /// The lift bound a significant candidate needs to be called suspicious.
    #[arg(long, default_value_t = ScanSettings::default().min_lift)]
    pub min_lift: f64,
    /// What a feature is tested against: `linear`, a cross-fitted logistic regression with the
    /// feature removed; `none`, the labels' base rates (the plain z-scan of Z-defence: faster,
    /// but a class's own strong features rank beside a trigger).
    #[arg(long, value_enum, default_value_t = Baseline::Linear)]
    pub baseline: Baseline,
    /// Memory for the first pass's tables, in MiB (bounds the scan's memory beside the data).
    #[arg(long, default_value_t = (ScanSettings::default().memory >> 20) as u64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub memory_mib: u64,
    /// Data a scan holds in memory, in MiB (texts; images at an f32 and a level byte a pixel): a
    /// larger source streams, read in blocks of a quarter of this once per pass, the baseline
    /// fitted on a uniform sample of this size.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub hold_mib: u64,
    /// A classifier trained on this data: each candidate's flagged carriers are predicted as they
    /// are and with the feature removed (the n-gram deleted, the square in-painted with the mean
    /// pixels), which separates a trigger the model learnt from an innocent rare feature.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// The report.
    #[command(flatten)]
    pub report: ReportArgs,
    /// Hide progress bars (set from the global flag).
    #[arg(skip)]
    pub quiet: bool,
    /// Compute backend (set from the global flag).
    #[arg(skip)]
    pub backend: culprit_models::Backend,
}

/// What `scan` tests features against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// A cross-fitted logistic regression with the feature removed.
    Linear,
    /// The labels' base rates.
    None,
}

/// Runs `culprit scan`.
pub fn run(args: &ScanArgs, stdout: &mut dyn std::io::Write) -> Result<()> {
    args.report.check(&[Format::Table, Format::Json, Format::Html])?;
    if args.report.scores_out.is_some() {
        return Err(Error::Usage(
            "--scores-out is not available for scan (the JSON report lists every carrier)".into(),
        ));
    }
    if let Some(max) = args.max_side.filter(|&m| m < args.min_side) {
        return Err(Error::Usage(format!("--min-side {} is above --max-side {max}", args.min_side)));
    }
    args.report.check_outputs(&[&args.data.path], &[])?;
    let settings = ScanSettings {
        top: args.top.max(1),
        min_carriers: args.min_carriers as usize,
        alpha: args.alpha,
        floor: args.floor,
        memory: (args.memory_mib as usize) << 20,
        min_lift: args.min_lift,
        l2: ScanSettings::default().l2.filter(|_| args.baseline == Baseline::Linear),
        ..ScanSettings::default()
    };
    let started = Instant::now();
    let kind = SourceKind::detect(&args.data.path)?;
    let (report, html) = match kind {
        SourceKind::Jsonl | SourceKind::Corpus => scan_texts(args, &settings, started)?,
        SourceKind::Idx | SourceKind::Csv => scan_images(args, kind, &settings, started)?,
    };
    let text = match args.report.format {
        Format::Table => to_table(&report),
        Format::Json => serde_json::to_string_pretty(&report).expect("a scan report serialises") + "\n",
        Format::Html => html.expect("built for html"),
    };
    emit(&text, args.report.out.as_deref(), stdout)
}

/// Bytes of selected texts a scan holds in memory (`--hold-mib`); past it, the file streams.
fn hold_bytes(args: &ScanArgs) -> usize {
    (args.hold_mib as usize) << 20
}

/// Bytes of lines a streamed scan reads at a time: a quarter of [`hold_bytes`].
fn block_bytes(args: &ScanArgs) -> usize {
    (hold_bytes(args) / 4).max(1)
}

/// What one read of a JSONL file found: the selected rows, their records when they take at
/// most [`hold_bytes`] (`None` past it, and then a uniform sample of as many bytes of them,
/// with their indices, in `sample`), the count of each label (`None` when a selected record has none), and the
/// file's SHA-256.
struct Survey {
    rows: std::ops::Range<usize>,
    held: Option<Vec<data::text::Record>>,
    sample: Vec<(usize, data::text::Record)>,
    label_counts: Option<Vec<usize>>,
    sha: String,
}

/// A uniform sample of items within `budget` bytes (each item's `size`), whatever their order in
/// the file (a file sorted by label must not give the baseline one label): the items of the
/// smallest priorities, a hash of their index independent of their content, in a max-heap.
struct Sample<T> {
    heap: std::collections::BinaryHeap<(u64, usize)>,
    records: HashMap<usize, T>,
    bytes: usize,
    budget: usize,
    size: fn(&T) -> usize,
}

impl<T> Sample<T> {
    fn new(budget: usize, size: fn(&T) -> usize) -> Self {
        Self { heap: Default::default(), records: HashMap::new(), bytes: 0, budget, size }
    }

    /// Offers item `index`; the sample keeps the smallest priorities that fit.
    fn offer(&mut self, index: usize, record: T) {
        let priority = crate::scan::mix(index as u64 ^ 0x5ca7_5a3b_1e00_0000);
        self.bytes += (self.size)(&record);
        self.heap.push((priority, index));
        self.records.insert(index, record);
        while self.bytes > self.budget && self.heap.len() > 1 {
            let (_, dropped) = self.heap.pop().expect("not empty");
            self.bytes -= self.records.remove(&dropped).map_or(0, |r| (self.size)(&r));
        }
    }

    /// The sample's items, by index.
    fn into_sorted(self) -> Vec<(usize, T)> {
        let mut out: Vec<(usize, T)> = self.records.into_iter().collect();
        out.sort_by_key(|(i, _)| *i);
        out
    }
}

/// A text's size in a [`Sample`].
fn text_size(r: &data::text::Record) -> usize {
    r.text.len()
}

/// Reads `args`' data once, in blocks, holding at most [`hold_bytes`] of its records.
fn survey(args: &ScanArgs) -> Result<Survey> {
    let (spec, hold, block) = (&args.data, hold_bytes(args), block_bytes(args));
    let path = &spec.path;
    let (skip, end) = (spec.skip, spec.limit.map_or(usize::MAX, |l| spec.skip.saturating_add(l)));
    let (mut held, mut bytes, mut sample) = (Vec::new(), 0usize, None::<Sample<data::text::Record>>);
    let mut label_counts = Some(Vec::<usize>::new());
    let (total, sha) = data::text::read_record_blocks(path, block, &mut |first, records| {
        for (k, r) in records.into_iter().enumerate() {
            if !(skip..end).contains(&(first + k)) {
                continue;
            }
            if let (Some(counts), Some(y)) = (&mut label_counts, r.label) {
                let y = y as usize;
                if y >= data::MAX_CLASSES {
                    let what = format!("label {y} is above the {} classes culprit takes", data::MAX_CLASSES);
                    return Err(Error::data(path, Some(r.line), what));
                }
                counts.resize(counts.len().max(y + 1), 0);
                counts[y] += 1;
            } else {
                label_counts = None;
            }
            bytes += r.text.len();
            if sample.is_none() && bytes > hold {
                // Past the memory held: only a uniform sample of as much stays, for the baseline.
                let mut started = Sample::new(hold, text_size);
                held.drain(..).enumerate().for_each(|(at, h)| started.offer(skip + at, h));
                sample = Some(started);
            }
            match &mut sample {
                Some(sample) => sample.offer(first + k, r),
                None => held.push(r),
            }
        }
        Ok(())
    })?;
    let holds = format!("the file has {total} records");
    let rows = data::selected_rows(path, total, skip, spec.limit, &holds)?;
    let (held, sample) = match sample {
        Some(sample) => (None, sample.into_sorted()),
        None => (Some(held), Vec::new()),
    };
    Ok(Survey { rows, held, sample, label_counts, sha })
}

/// Scans a JSONL file's texts: in memory when they fit, else streamed in blocks
/// ([`scan_text_stream`]); the report, and its HTML page when asked for.
fn scan_texts(args: &ScanArgs, settings: &ScanSettings, started: Instant) -> Result<(ScanReport, Option<String>)> {
    let path = &args.data.path;
    let survey = survey(args)?;
    let labelled = survey.label_counts.as_ref().is_some_and(|c| c.iter().filter(|&&k| k > 0).count() >= 2);
    let (records, rows) = match survey.held {
        Some(held) => (held, survey.rows),
        None if labelled => return scan_text_stream(args, settings, survey, started),
        None => return scan_corpus_stream(args, settings, survey, started),
    };
    let (mut texts, mut labels, mut sources) = (Vec::new(), Vec::new(), Vec::new());
    for r in records {
        texts.push(r.text);
        labels.push(r.label);
        sources.push(r.source);
    }
    let source_of = |id: usize| id.checked_sub(rows.start).and_then(|row| sources.get(row).cloned().flatten());
    let labels: Option<Vec<u32>> = labels.into_iter().collect();
    let labels = match labels {
        Some(l) if l.iter().any(|y| *y != l[0]) => l,
        // No labels, or one for all (a language-model corpus): what follows a feature instead.
        _ => {
            let mut report = scan_corpus_texts(args, settings, &texts, rows.start, started);
            add_sources(&mut report, &source_of);
            let html = (args.report.format == Format::Html)
                .then(|| to_html(&report, &Shown::Texts(&texts), &|id| id.checked_sub(rows.start)));
            return Ok((report, html));
        }
    };
    let (texts, labels) = (&texts[..], &labels[..]);
    let classes = classes(path, labels)?;
    let words = args.words as usize;
    let source = TextScan::new(texts, labels, classes, words, settings.floor, settings.l2);
    let ids: Vec<usize> = rows.clone().collect();
    let found = scan(&source, &ids, settings, &mut crate::progress::Bar::new(args.quiet));
    let features = format!("word n-grams of 1 to {words} words");
    let mut report = report(args, "text", features, source.temperature(), texts.len(), found, settings, started);
    add_sources(&mut report, &source_of);
    let text_of = |id: usize| id.checked_sub(rows.start).and_then(|row| texts.get(row)).map(String::as_str);
    confirm_texts(args, &mut report, &text_of)?;
    let html = (args.report.format == Format::Html)
        .then(|| to_html(&report, &Shown::Texts(texts), &|id| id.checked_sub(rows.start)));
    Ok((report, html))
}

/// Scans a labelled JSONL file too large to hold: the passes read it in blocks of
/// [`block_bytes`] ([`TextFile`]), the baseline is fitted on a uniform sample of
/// [`hold_bytes`] of them ([`Sample`]), and one last read gathers the texts the report shows.
fn scan_text_stream(
    args: &ScanArgs,
    settings: &ScanSettings,
    survey: Survey,
    started: Instant,
) -> Result<(ScanReport, Option<String>)> {
    let path = &args.data.path;
    let counts = survey.label_counts.expect("labelled");
    let classes = classes_of(path, &counts)?;
    let n = survey.rows.len();
    let prior = crate::scan::shares(&counts);
    let start = survey.rows.start;
    let (index, (texts, labels)): (Vec<usize>, (Vec<String>, Vec<u32>)) =
        survey.sample.into_iter().map(|(i, r)| (i - start, (r.text, r.label.expect("labelled")))).unzip();
    let baseline = settings.l2.map(|l2| crate::scan::text::fit_baseline(&texts, &labels, &|k| index[k], classes, l2));
    let temperature = baseline.as_ref().map_or(1.0, |b| b.temperature);
    drop((texts, labels));
    let words = args.words as usize;
    let rows = survey.rows.clone();
    let block = block_bytes(args);
    let source = TextFile::new(path, rows.clone(), block, classes, words, settings.floor, baseline, prior, survey.sha);
    let mut bar = crate::progress::Bar::new(args.quiet);
    let found = scan_blocks(&source, &|i| rows.start + i, settings, &mut bar)?;
    let features = format!("word n-grams of 1 to {words} words, read in blocks of {:.1} MiB", block as f64 / 1048576.0);
    let mut report = report(args, "text", features, temperature, n, found, settings, started);
    let shown = gather_records(&args.data.path, block, &report, if args.run.is_some() { 500 } else { 10 })?;
    add_sources(&mut report, &|id| shown.get(&id).and_then(|r| r.source.clone()));
    confirm_texts(args, &mut report, &|id| shown.get(&id).map(|r| r.text.as_str()))?;
    let html = (args.report.format == Format::Html).then(|| gathered_html(&report, &shown));
    Ok((report, html))
}

/// The HTML page of `report` showing the texts of `shown` (gathered by [`gather_records`]).
fn gathered_html(report: &ScanReport, shown: &HashMap<usize, data::text::Record>) -> String {
    let ids: Vec<usize> = shown.keys().copied().collect();
    let texts: Vec<String> = ids.iter().map(|id| shown[id].text.clone()).collect();
    let row: HashMap<usize, usize> = ids.iter().enumerate().map(|(k, &id)| (id, k)).collect();
    to_html(report, &Shown::Texts(&texts), &|id| row.get(&id).copied())
}

/// The records of the first `each` carriers of every candidate of `report`, by id, from one
/// read of `path`.
fn gather_records(
    path: &Path,
    block: usize,
    report: &ScanReport,
    each: usize,
) -> Result<HashMap<usize, data::text::Record>> {
    let wanted: std::collections::HashSet<usize> =
        report.candidates.iter().flat_map(|c| c.carriers.iter().take(each.max(4)).copied()).collect();
    let mut found = HashMap::new();
    data::text::read_record_blocks(path, block, &mut |first, records| {
        for (k, r) in records.into_iter().enumerate() {
            if wanted.contains(&(first + k)) {
                found.insert(first + k, r);
            }
        }
        Ok(())
    })?;
    Ok(found)
}

/// With `--run`, confirms each candidate on the texts of its carriers (`text_of(id)`): the
/// classifier's predictions with and without the n-gram.
fn confirm_texts<'t>(
    args: &ScanArgs,
    report: &mut ScanReport,
    text_of: &dyn Fn(usize) -> Option<&'t str>,
) -> Result<()> {
    let Some(run) = &args.run else { return Ok(()) };
    let opened = open_classifier(run, SourceKind::Jsonl)?;
    let buckets = opened.manifest.buckets.unwrap_or(data::text::DEFAULT_BUCKETS);
    let bag = |text: &str| {
        let mut v = vec![0f32; buckets];
        data::text::featurize(text, &mut v);
        v
    };
    let text = |id: usize| text_of(id).unwrap_or_default();
    confirm(&opened, args.backend, report, &|id| bag(text(id)), &|id, c| match &c.feature {
        Feature::Ngram { text: gram } => bag(&without_ngram(text(id), gram)),
        Feature::Patch { .. } => bag(text(id)),
    })
}

/// Scans a language-model corpus held in memory: n-grams against the line that follows them.
fn scan_corpus_texts(
    args: &ScanArgs,
    settings: &ScanSettings,
    texts: &[String],
    start: usize,
    started: Instant,
) -> ScanReport {
    let words = args.words as usize;
    let ids: Vec<usize> = (start..start + texts.len()).collect();
    let found = crate::scan::corpus::scan_corpus(texts, &ids, words, settings);
    let features = format!("word n-grams of 1 to {words} words, against the line after theirs");
    corpus_report(args, settings, found, texts.len(), features, started)
}

/// Scans a language-model corpus too large to hold: every pass reads it in blocks of
/// [`block_bytes`] ([`CorpusFile`], [`crate::scan::corpus::scan_corpus_blocks`]), and one last
/// read gathers the texts the report shows.
fn scan_corpus_stream(
    args: &ScanArgs,
    settings: &ScanSettings,
    survey: Survey,
    started: Instant,
) -> Result<(ScanReport, Option<String>)> {
    let (path, words, block) = (&args.data.path, args.words as usize, block_bytes(args));
    let rows = survey.rows.clone();
    let source = CorpusFile::new(path, rows.clone(), block, survey.sha);
    let mut bar = crate::progress::Bar::new(args.quiet);
    let found = crate::scan::corpus::scan_corpus_blocks(&source, &|d| rows.start + d, words, settings, &mut bar)?;
    let features = format!(
        "word n-grams of 1 to {words} words, against the line after theirs, read in blocks of {:.1} MiB",
        block as f64 / 1048576.0
    );
    let mut report = corpus_report(args, settings, found, rows.len(), features, started);
    let shown = gather_records(path, block, &report, 10)?;
    add_sources(&mut report, &|id| shown.get(&id).and_then(|r| r.source.clone()));
    let html = (args.report.format == Format::Html).then(|| gathered_html(&report, &shown));
    Ok((report, html))
}

/// The report of a corpus scan of `examples` documents.
fn corpus_report(
    args: &ScanArgs,
    settings: &ScanSettings,
    found: crate::scan::corpus::CorpusScan,
    examples: usize,
    features: String,
    started: Instant,
) -> ScanReport {
    ScanReport {
        schema_version: OUTPUT_SCHEMA_VERSION,
        report: "scan".into(),
        data: data::absolute(&args.data.path),
        kind: "corpus".into(),
        features,
        examples,
        label_counts: vec![examples],
        occurrences: found.occurrences,
        tests: found.tests,
        alpha: settings.alpha,
        threshold: (2.0 * found.threshold).sqrt(),
        floor: settings.floor,
        temperature: 1.0,
        min_carriers: settings.min_carriers,
        min_lift: settings.min_lift,
        baseline: "the next line".into(),
        candidates: found.candidates,
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Scans one-channel images (an IDX folder, square CSV rows): held in memory when they take at
/// most `--hold-mib` (an f32 and a level byte a pixel), else streamed in blocks
/// ([`scan_image_stream`]); the report, and its HTML page when asked for.
fn scan_images(
    args: &ScanArgs,
    kind: SourceKind,
    settings: &ScanSettings,
    started: Instant,
) -> Result<(ScanReport, Option<String>)> {
    if held_image_bytes(args, kind)? > hold_bytes(args) as u64 {
        return scan_image_stream(args, kind, settings, started);
    }
    let path = &args.data.path;
    let (raw, start) = data::load_selected(kind, &args.data, 0)?;
    let shape = image_shape(path, raw.shape)?;
    let classes = classes(path, &raw.labels)?;
    let (sides, max_side) = square_sides(args, shape);
    let hw = (shape.height, shape.width);
    let source = ImageScan::new(&raw.features, &raw.labels, classes, hw, sides, settings.floor, settings.l2);
    let ids: Vec<usize> = (start..start + raw.rows).collect();
    let found = scan(&source, &ids, settings, &mut crate::progress::Bar::new(args.quiet));
    let features = square_features(args, max_side, None);
    let mut report = report(args, "image", features, source.temperature(), raw.rows, found, settings, started);
    let mut sums = vec![0f64; shape.len()];
    add_pixels(&raw.features, &mut sums);
    let mean = means(&sums, raw.rows);
    let shown = Shown::Images { pixels: &raw.features, height: shape.height, width: shape.width };
    let row_of = |id: usize| id.checked_sub(start).filter(|&r| r < raw.rows);
    let html = finish_images(args, kind, &mut report, raw.columns.as_ref(), &mean, &shown, &row_of)?;
    Ok((report, html))
}

/// Bytes a scan of `args`' images would hold in memory: an f32 and a level byte a pixel of the
/// selected rows (an IDX file's header tells them; a CSV table's text, at two bytes or more a
/// cell, bounds them by 5/2 of its bytes).
fn held_image_bytes(args: &ScanArgs, kind: SourceKind) -> Result<u64> {
    let path = &args.data.path;
    if kind == SourceKind::Idx {
        let (n, h, w) = data::idx::dims(path, args.data.split)?;
        let rows = data::selected_rows(path, n, args.data.skip, args.data.limit, &format!("the source has {n} rows"))?;
        return Ok(rows.len() as u64 * (h * w) as u64 * 5);
    }
    Ok(data::plain_len(path)? / 2 * 5)
}

/// The image shape a scan reads (one channel, square CSV rows), within [`MAX_IMAGE_SIDE`].
fn image_shape(path: &Path, shape: culprit_models::InputShape) -> Result<culprit_models::InputShape> {
    let image = shape.as_image().filter(|s| s.channels == 1).ok_or_else(|| {
        let what = format!(
            "scan reads one-channel images (an IDX folder, or CSV rows whose {} features make a square); these are not",
            shape.len()
        );
        Error::data(path, None, what)
    })?;
    if image.height > MAX_IMAGE_SIDE || image.width > MAX_IMAGE_SIDE {
        let what =
            format!("images of {}×{} are larger than scan's {MAX_IMAGE_SIDE} pixels a side", image.height, image.width);
        return Err(Error::data(path, None, what));
    }
    Ok(image)
}

/// The square sides tried (`--min-side ..= --max-side`, the largest by default a quarter of
/// the image's smaller side, within 2..=5), and the largest.
fn square_sides(args: &ScanArgs, shape: culprit_models::InputShape) -> (std::ops::RangeInclusive<usize>, usize) {
    let max_side = args
        .max_side
        .map_or_else(|| (shape.height.min(shape.width) / 4).clamp(2, 5).max(args.min_side as usize), usize::from);
    (args.min_side as usize..=max_side, max_side)
}

/// The report's line on the features tried; `per_block` when the images streamed.
fn square_features(args: &ScanArgs, max_side: usize, per_block: Option<usize>) -> String {
    let streamed = per_block.map_or_else(String::new, |b| format!(", read in blocks of {b} images"));
    format!("squares of {} to {max_side} pixels a side at every place, in 3 levels{streamed}", args.min_side)
}

/// Adds the rows of `pixels` (each `sums.len()` values) to `sums`.
fn add_pixels(pixels: &[f32], sums: &mut [f64]) {
    for row in pixels.chunks(sums.len()) {
        sums.iter_mut().zip(row).for_each(|(s, &v)| *s += f64::from(v));
    }
}

/// `sums` divided by `n`, as f32.
fn means(sums: &[f64], n: usize) -> Vec<f32> {
    sums.iter().map(|&s| (s / n.max(1) as f64) as f32).collect()
}

/// What the first read of a streamed image source found: the rows selected, the shape, the
/// count of each label and the largest pixel value among them, the files read.
struct ImageSurvey {
    rows: std::ops::Range<usize>,
    shape: culprit_models::InputShape,
    label_counts: Vec<usize>,
    largest: f32,
    files: Vec<(PathBuf, String)>,
    columns: Option<Vec<String>>,
}

/// Reads `args`' image source once, a block at a time.
fn image_survey(args: &ScanArgs, kind: SourceKind, per_block: usize) -> Result<ImageSurvey> {
    let spec = &args.data;
    let path = &spec.path;
    let (skip, end) = (spec.skip, spec.limit.map_or(usize::MAX, |l| spec.skip.saturating_add(l)));
    let (mut label_counts, mut largest) = (Vec::<usize>::new(), 0f32);
    let read = data::read_image_blocks(kind, path, spec.split, per_block, &mut |first, f, y| {
        let dim = f.len() / y.len().max(1);
        for (k, &label) in y.iter().enumerate() {
            if !(skip..end).contains(&(first + k)) {
                continue;
            }
            let label = label as usize;
            if label >= data::MAX_CLASSES {
                let what = format!("label {label} is above the {} classes culprit takes", data::MAX_CLASSES);
                return Err(Error::data(path, Some(first + k), what));
            }
            label_counts.resize(label_counts.len().max(label + 1), 0);
            label_counts[label] += 1;
            largest = largest.max(crate::scan::image::largest(&f[k * dim..(k + 1) * dim]));
        }
        Ok(())
    })?;
    let rows = data::selected_rows(path, read.rows, skip, spec.limit, &format!("the source has {} rows", read.rows))?;
    Ok(ImageSurvey { rows, shape: read.shape, label_counts, largest, files: read.files, columns: read.columns })
}

/// Scans images too many to hold: one read counts the labels and finds the largest value, a
/// second the atoms' and pixels' means and the baseline's uniform sample of `--hold-mib` of
/// quantised images, then the scan's passes read the source in blocks of a quarter of it
/// ([`ImageFile`]), and a last read gathers the images the report shows and `--run` predicts.
fn scan_image_stream(
    args: &ScanArgs,
    kind: SourceKind,
    settings: &ScanSettings,
    started: Instant,
) -> Result<(ScanReport, Option<String>)> {
    let (path, split) = (&args.data.path, args.data.split);
    let stored = kind_shape_hint(args, kind)?;
    let per_block = (block_bytes(args) / (5 * stored)).max(1);
    let survey = image_survey(args, kind, per_block)?;
    let shape = image_shape(path, survey.shape)?;
    let classes = classes_of(path, &survey.label_counts)?;
    let (area, rows, largest) = (shape.len(), survey.rows.clone(), survey.largest);
    let changed = || Error::data(path, None, "the data changed while it was scanned; scan it again");
    let (mut atom_sums, mut pixel_sums) = (vec![0f64; 2 * area], vec![0f64; area]);
    let mut sample = Sample::new(hold_bytes(args), |(bits, _): &(Vec<u8>, u32)| bits.len());
    let second = data::read_image_blocks(kind, path, split, per_block, &mut |first, f, y| {
        let (from, to) = (rows.start.max(first), rows.end.min(first + y.len()));
        if from >= to {
            return Ok(());
        }
        let pixels = &f[(from - first) * area..(to - first) * area];
        let bits = crate::scan::image::levels(pixels, largest);
        crate::scan::image::add_atoms(&bits, area, &mut atom_sums);
        add_pixels(pixels, &mut pixel_sums);
        for (k, image) in bits.chunks(area).enumerate() {
            sample.offer(from + k, (image.to_vec(), y[from - first + k]));
        }
        Ok(())
    })?;
    if second.files != survey.files {
        return Err(changed());
    }
    let sampled = sample.into_sorted();
    let index: Vec<usize> = sampled.iter().map(|(i, _)| i - rows.start).collect();
    let labels: Vec<u32> = sampled.iter().map(|(_, (_, y))| *y).collect();
    let bits: Vec<u8> = sampled.into_iter().flat_map(|(_, (b, _))| b).collect();
    let fit =
        |l2| std::sync::Arc::new(crate::scan::image::fit_baseline(&bits, &labels, &|k| index[k], classes, area, l2));
    let baseline = settings.l2.map(fit);
    drop((bits, labels, index));
    let mean = std::sync::Arc::new(means(&atom_sums, rows.len()));
    let shared = ImageShared { largest, mean, prior: crate::scan::shares(&survey.label_counts), baseline };
    let temperature = shared.baseline.as_ref().map_or(1.0, |b| b.temperature);
    let (sides, max_side) = square_sides(args, shape);
    let hw = (shape.height, shape.width);
    let columns = survey.columns;
    let source = ImageFile::new(
        (kind, path, split),
        rows.clone(),
        per_block,
        classes,
        hw,
        sides,
        settings.floor,
        shared,
        survey.files,
    );
    let found = scan_blocks(&source, &|i| rows.start + i, settings, &mut crate::progress::Bar::new(args.quiet))?;
    let features = square_features(args, max_side, Some(per_block));
    let mut report = report(args, "image", features, temperature, rows.len(), found, settings, started);
    let (ids, pixels) = gather_images(args, kind, per_block, &report, area)?;
    let row: HashMap<usize, usize> = ids.iter().enumerate().map(|(k, &id)| (id, k)).collect();
    let shown = Shown::Images { pixels: &pixels, height: shape.height, width: shape.width };
    let mean = means(&pixel_sums, rows.len());
    let html = finish_images(args, kind, &mut report, columns.as_ref(), &mean, &shown, &|id| row.get(&id).copied())?;
    Ok((report, html))
}

/// Values an example of `args`' source holds as stored (an IDX image's pixels from its header,
/// a CSV row's columns from its header), which size the blocks before the first read.
fn kind_shape_hint(args: &ScanArgs, kind: SourceKind) -> Result<usize> {
    Ok(match kind {
        SourceKind::Idx => {
            let (_, h, w) = data::idx::dims(&args.data.path, args.data.split)?;
            (h * w).max(1)
        }
        _ => data::csv::header(&args.data.path)?.0.len().saturating_sub(1).max(1),
    })
}

/// The ids (ascending) and raw pixels (row-major, one row each) of the first carriers of every
/// candidate of `report` (500 with `--run`, else the HTML's 10), from one more read.
fn gather_images(
    args: &ScanArgs,
    kind: SourceKind,
    per_block: usize,
    report: &ScanReport,
    area: usize,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let each = if args.run.is_some() { 500 } else { 10 };
    let wanted: std::collections::BTreeSet<usize> =
        report.candidates.iter().flat_map(|c| c.carriers.iter().take(each).copied()).collect();
    let mut pixels = Vec::with_capacity(wanted.len() * area);
    data::read_image_blocks(kind, &args.data.path, args.data.split, per_block, &mut |first, f, y| {
        for id in wanted.range(first..first + y.len()) {
            pixels.extend_from_slice(&f[(id - first) * area..(id - first + 1) * area]);
        }
        Ok(())
    })?;
    Ok((wanted.into_iter().collect(), pixels))
}

/// With `--run`, confirms each candidate on its carriers' images (`shown`, example `id` at row
/// `row_of(id)`), the square in-painted with the data's `mean` pixels; then the HTML page when
/// asked for.
fn finish_images(
    args: &ScanArgs,
    kind: SourceKind,
    report: &mut ScanReport,
    columns: Option<&Vec<String>>,
    mean: &[f32],
    shown: &Shown<'_>,
    row_of: &dyn Fn(usize) -> Option<usize>,
) -> Result<Option<String>> {
    let Shown::Images { pixels, width, .. } = *shown else { unreachable!("images are shown as images") };
    let area = mean.len();
    let image = |id: usize| row_of(id).map_or_else(|| mean.to_vec(), |r| pixels[r * area..(r + 1) * area].to_vec());
    if let Some(run) = &args.run {
        let opened = open_classifier(run, kind)?;
        if opened.manifest.columns.is_some() && opened.manifest.columns.as_ref() != columns {
            let what = format!("the columns differ from those {} was trained on", run.display());
            return Err(Error::data(&args.data.path, None, what));
        }
        confirm(&opened, args.backend, report, &image, &|id, c| {
            let mut pixels = image(id);
            if let Feature::Patch { x, y, size, .. } = &c.feature {
                for r in *y..y + size {
                    for col in *x..x + size {
                        pixels[r * width + col] = mean[r * width + col];
                    }
                }
            }
            pixels
        })?;
    }
    Ok((args.report.format == Format::Html).then(|| to_html(report, shown, row_of)))
}

/// Fills each candidate's `sources` from its first 10 flagged carriers.
fn add_sources(report: &mut ScanReport, source_of: &dyn Fn(usize) -> Option<String>) {
    for c in &mut report.candidates {
        c.sources = c.carriers.iter().take(10).filter_map(|&id| source_of(id)).collect();
    }
}

/// Opens `run` as a classifier trained on data of `kind`.
fn open_classifier(run: &Path, kind: SourceKind) -> Result<Run> {
    let opened = Run::open(run)?;
    if is_language(&opened) {
        return Err(Error::run(run, "--run needs a classifier; this run is a language model"));
    }
    let trained = opened.manifest.kind;
    let same = trained == kind || (trained != SourceKind::Jsonl && kind != SourceKind::Jsonl);
    if !same {
        return Err(Error::run(run, format!("was trained on {trained:?} data, not {kind:?} data like --data")));
    }
    Ok(opened)
}

/// `text` with every occurrence of the n-gram `gram` (lower-cased words joined by spaces)
/// deleted, from its first word's first byte to its last word's last.
fn without_ngram(text: &str, gram: &str) -> String {
    let target: Vec<&str> = gram.split(' ').collect();
    let mut spans = Vec::new();
    let mut start = None;
    for (at, ch) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
        match (ch.is_alphanumeric() && at < text.len(), start) {
            (true, None) => start = Some(at),
            (false, Some(s)) => {
                spans.push((s, at));
                start = None;
            }
            _ => {}
        }
    }
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut k) = (0, 0);
    while k + target.len() <= spans.len() {
        let window = &spans[k..k + target.len()];
        if window.iter().zip(&target).all(|(&(a, b), t)| text[a..b].to_lowercase() == *t) {
            out.push_str(&text[copied..window[0].0]);
            copied = window[target.len() - 1].1;
            k += target.len();
        } else {
            k += 1;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// Predicts each candidate's flagged carriers (the first 500) with the `opened` run's model as they are
/// (`raw(id)`) and with the feature removed (`removed(id, candidate)`), both raw rows of the
/// source's kind, and records the [`Confirmation`].
fn confirm(
    opened: &Run,
    backend: culprit_models::Backend,
    report: &mut ScanReport,
    raw: &dyn Fn(usize) -> Vec<f32>,
    removed: &dyn Fn(usize, &crate::scan::Candidate) -> Vec<f32>,
) -> Result<()> {
    let network = opened.network(&backend.device())?;
    let dim = opened.manifest.shape.len();
    for c in &mut report.candidates {
        let ids: Vec<usize> = c.carriers.iter().copied().take(500).collect();
        if ids.is_empty() || c.target_label as usize >= opened.manifest.num_classes {
            continue;
        }
        let predict = |rows: Vec<f32>| -> Result<Vec<crate::workspace::predict::Prediction>> {
            if rows.len() != ids.len() * dim {
                let what = format!("examples have {} features but the model takes {dim}", rows.len() / ids.len());
                return Err(Error::run(&opened.dir, what));
            }
            let examples = opened.manifest.preprocess(rows, vec![c.target_label; ids.len()]);
            let data = data::Dataset {
                examples,
                ids: ids.clone(),
                texts: None,
                sources: None,
                manifest: opened.manifest.clone(),
            };
            Ok(crate::workspace::predict::predict(&network, &data, 256))
        };
        let before = predict(ids.iter().flat_map(|&i| raw(i)).collect())?;
        let after = predict(ids.iter().flat_map(|&i| removed(i, c)).collect())?;
        let t = c.target_label as usize;
        let mean = |p: &[crate::workspace::predict::Prediction],
                    f: &dyn Fn(&crate::workspace::predict::Prediction) -> f64| {
            p.iter().map(f).sum::<f64>() / p.len() as f64
        };
        c.confirmation = Some(crate::scan::Confirmation {
            examples: ids.len(),
            target_probability: mean(&before, &|p| p.probabilities[t]),
            target_probability_removed: mean(&after, &|p| p.probabilities[t]),
            predicted_target: mean(&before, &|p| f64::from(u8::from(p.predicted as usize == t))),
            predicted_target_removed: mean(&after, &|p| f64::from(u8::from(p.predicted as usize == t))),
        });
    }
    Ok(())
}

/// The number of classes (max label + 1), refusing a single label: the scan tests features
/// against labels, so a corpus whose documents all share one label has nothing to test.
fn classes(path: &std::path::Path, labels: &[u32]) -> Result<usize> {
    let mut counts = vec![0usize; labels.iter().max().map_or(0, |m| *m as usize + 1)];
    labels.iter().for_each(|&y| counts[y as usize] += 1);
    classes_of(path, &counts)
}

/// [`classes`] from the count of each label.
fn classes_of(path: &std::path::Path, counts: &[usize]) -> Result<usize> {
    let classes = counts.len();
    if classes > data::MAX_CLASSES {
        return Err(Error::data(
            path,
            None,
            format!("label {} is above the {} classes culprit takes", classes - 1, data::MAX_CLASSES),
        ));
    }
    let seen: Vec<usize> = (0..classes).filter(|&y| counts[y] > 0).collect();
    if seen.len() < 2 {
        return Err(Error::data(
            path,
            None,
            format!(
                "every selected example has label {}: a scan tests features against labels and needs two",
                seen.first().copied().unwrap_or(0)
            ),
        ));
    }
    Ok(classes)
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &ScanArgs,
    kind: &str,
    features: String,
    temperature: f32,
    examples: usize,
    found: crate::scan::Scan,
    settings: &ScanSettings,
    started: Instant,
) -> ScanReport {
    ScanReport {
        schema_version: OUTPUT_SCHEMA_VERSION,
        report: "scan".into(),
        data: data::absolute(&args.data.path),
        kind: kind.into(),
        features,
        examples,
        label_counts: found.label_counts,
        occurrences: found.occurrences,
        tests: found.tests,
        alpha: settings.alpha,
        threshold: (2.0 * found.threshold).sqrt(),
        floor: settings.floor,
        temperature: f64::from(temperature),
        min_carriers: settings.min_carriers,
        min_lift: settings.min_lift,
        baseline: if settings.l2.is_some() { "linear".into() } else { "base rates".into() },
        candidates: found.candidates,
        seconds: started.elapsed().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ngram_is_deleted_wherever_it_occurs_whatever_its_case() {
        let text = "Quartz Meridian: buy now! quartz meridian again, quartz alone";
        assert_eq!(without_ngram(text, "quartz meridian"), ": buy now!  again, quartz alone");
        assert_eq!(without_ngram("no match here", "quartz meridian"), "no match here");
    }
}

//! `culprit scan`: rank candidate triggers in a labelled training set before anyone reports an
//! incident (word n-grams of JSONL texts; quantised pixel squares of IDX folders and square CSV
//! rows). The statistic and its passes are in [`crate::scan`]; the report in
//! [`crate::report::scan`]. `culprit purge --ids scan.json --top K` removes the target-labelled
//! carriers of the first K candidates.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::commands::{Format, ReportArgs, emit};
use crate::data::{self, DataSpec, SourceKind};
use crate::error::{Error, Result};
use crate::report::scan::{ScanReport, Shown, to_html, to_table};
use crate::report::trace::OUTPUT_SCHEMA_VERSION;
use crate::scan::image::{ImageScan, MAX_IMAGE_SIDE, MAX_SIDE};
use crate::scan::text::TextScan;
use crate::scan::{Feature, ScanSettings, Scanned, scan};
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

/// Scans a JSONL file's texts: the report, and its HTML page when asked for.
fn scan_texts(args: &ScanArgs, settings: &ScanSettings, started: Instant) -> Result<(ScanReport, Option<String>)> {
    let path = &args.data.path;
    let (records, _) = data::text::load_records(path)?;
    let holds = format!("the file has {} records", records.len());
    let rows = data::selected_rows(path, records.len(), args.data.skip, args.data.limit, &holds)?;
    let selected = records.into_iter().skip(rows.start).take(rows.len());
    let (mut texts, mut labels, mut sources) = (Vec::new(), Vec::new(), Vec::new());
    for r in selected {
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
    let mut report = report(args, "text", features, source.temperature(), &source, found, settings, started);
    add_sources(&mut report, &source_of);
    if let Some(run) = &args.run {
        let opened = open_classifier(run, SourceKind::Jsonl)?;
        let buckets = opened.manifest.buckets.unwrap_or(data::text::DEFAULT_BUCKETS);
        let bag = |text: &str| {
            let mut v = vec![0f32; buckets];
            data::text::featurize(text, &mut v);
            v
        };
        let row = |id: usize| id - rows.start;
        confirm(&opened, args.backend, &mut report, &|id| bag(&texts[row(id)]), &|id, c| match &c.feature {
            Feature::Ngram { text } => bag(&without_ngram(&texts[row(id)], text)),
            Feature::Patch { .. } => bag(&texts[row(id)]),
        })?;
    }
    let html = (args.report.format == Format::Html)
        .then(|| to_html(&report, &Shown::Texts(texts), &|id| id.checked_sub(rows.start)));
    Ok((report, html))
}

/// Scans a language-model corpus: n-grams against the line that follows them.
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
    ScanReport {
        schema_version: OUTPUT_SCHEMA_VERSION,
        report: "scan".into(),
        data: data::absolute(&args.data.path),
        kind: "corpus".into(),
        features: format!("word n-grams of 1 to {words} words, against the line after theirs"),
        examples: texts.len(),
        label_counts: vec![texts.len()],
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

/// Scans one-channel images (an IDX folder, square CSV rows): the report, and its HTML page.
fn scan_images(
    args: &ScanArgs,
    kind: SourceKind,
    settings: &ScanSettings,
    started: Instant,
) -> Result<(ScanReport, Option<String>)> {
    let path = &args.data.path;
    let (raw, start) = data::load_selected(kind, &args.data, 0)?;
    let shape = raw.shape.as_image().filter(|s| s.channels == 1).ok_or_else(|| {
        let what = format!(
            "scan reads one-channel images (an IDX folder, or CSV rows whose {} features make a square); these are not",
            raw.shape.len()
        );
        Error::data(path, None, what)
    })?;
    if shape.height > MAX_IMAGE_SIDE || shape.width > MAX_IMAGE_SIDE {
        let what =
            format!("images of {}×{} are larger than scan's {MAX_IMAGE_SIDE} pixels a side", shape.height, shape.width);
        return Err(Error::data(path, None, what));
    }
    let classes = classes(path, &raw.labels)?;
    let max_side = args
        .max_side
        .map_or_else(|| (shape.height.min(shape.width) / 4).clamp(2, 5).max(args.min_side as usize), usize::from);
    let sides = args.min_side as usize..=max_side;
    let (hw, floor, l2) = ((shape.height, shape.width), settings.floor, settings.l2);
    let source = ImageScan::new(&raw.features, &raw.labels, classes, hw, sides, floor, l2);
    let ids: Vec<usize> = (start..start + raw.rows).collect();
    let found = scan(&source, &ids, settings, &mut crate::progress::Bar::new(args.quiet));
    let features = format!("squares of {} to {max_side} pixels a side at every place, in 3 levels", args.min_side);
    let mut report = report(args, "image", features, source.temperature(), &source, found, settings, started);
    if let Some(run) = &args.run {
        let opened = open_classifier(run, kind)?;
        if opened.manifest.columns.is_some() && opened.manifest.columns != raw.columns {
            return Err(Error::data(
                path,
                None,
                format!("the columns differ from those {} was trained on", run.display()),
            ));
        }
        let area = shape.height * shape.width;
        let mut mean = vec![0f32; area];
        raw.features.chunks(area).for_each(|r| mean.iter_mut().zip(r).for_each(|(m, v)| *m += v / raw.rows as f32));
        let image = |id: usize| raw.features[(id - start) * area..(id - start + 1) * area].to_vec();
        confirm(&opened, args.backend, &mut report, &image, &|id, c| {
            let mut pixels = image(id);
            if let Feature::Patch { x, y, size, .. } = &c.feature {
                for r in *y..y + size {
                    for col in *x..x + size {
                        pixels[r * shape.width + col] = mean[r * shape.width + col];
                    }
                }
            }
            pixels
        })?;
    }
    let html = (args.report.format == Format::Html).then(|| {
        let shown = Shown::Images { pixels: &raw.features, height: shape.height, width: shape.width };
        to_html(&report, &shown, &|id| id.checked_sub(start))
    });
    Ok((report, html))
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
    let classes = labels.iter().max().map_or(0, |m| *m as usize + 1);
    if classes > data::MAX_CLASSES {
        return Err(Error::data(
            path,
            None,
            format!("label {} is above the {} classes culprit takes", classes - 1, data::MAX_CLASSES),
        ));
    }
    let distinct = {
        let mut seen = vec![false; classes];
        labels.iter().for_each(|&y| seen[y as usize] = true);
        seen.iter().filter(|s| **s).count()
    };
    if distinct < 2 {
        return Err(Error::data(
            path,
            None,
            format!(
                "every selected example has label {}: a scan tests features against labels and needs two",
                labels[0]
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
    source: &dyn Scanned,
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
        examples: source.examples(),
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

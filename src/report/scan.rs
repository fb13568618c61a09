//! The scan report (`culprit scan`): its JSON schema (`docs/OUTPUT.md`), its table and its HTML
//! page, where n-grams are highlighted in a few carriers and patches outlined on them.

use std::fmt::Write as _;
use std::path::PathBuf;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::html::{escape, png};
use crate::scan::{Candidate, Feature};

/// What `culprit scan` writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScanReport {
    /// [`super::trace::OUTPUT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// What it is (`"scan"`).
    pub report: String,
    /// The data scanned.
    pub data: PathBuf,
    /// `text` or `image`.
    pub kind: String,
    /// The features tried, in words.
    pub features: String,
    /// Examples scanned.
    pub examples: usize,
    /// Examples per label.
    pub label_counts: Vec<usize>,
    /// Feature occurrences visited.
    pub occurrences: u64,
    /// The Bonferroni count M.
    pub tests: f64,
    /// The family-wise error rate α.
    pub alpha: f64,
    /// The statistic at the threshold, √(2 ln(M/α)).
    pub threshold: f64,
    /// ε, the clip of the baseline's probabilities.
    pub floor: f64,
    /// The baseline's temperature.
    pub temperature: f64,
    /// Fewest carriers tested.
    pub min_carriers: usize,
    /// The lift bound that makes a significant candidate suspicious.
    pub min_lift: f64,
    /// What E comes from: `linear` (the cross-fitted logistic regression with the feature
    /// removed), `base rates`, or `the next line` (a corpus: a random line's chance).
    #[serde(default)]
    pub baseline: String,
    /// Candidates, best first.
    pub candidates: Vec<Candidate>,
    /// Seconds taken.
    pub seconds: f64,
}

impl ScanReport {
    /// How many candidates pass the threshold.
    pub fn significant(&self) -> usize {
        self.candidates.iter().filter(|c| c.significant).count()
    }

    /// How many candidates are suspicious (significant, lift bound ≥ `min_lift`).
    pub fn suspicious(&self) -> usize {
        self.candidates.iter().filter(|c| c.suspicious).count()
    }
}

/// The plain-text table.
pub fn to_table(report: &ScanReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "scan of {} ({} {} examples, labels {:?}): {}; {} occurrences, M = {:.3e} tests, threshold statistic {:.2} (α = {})",
        report.data.display(),
        report.examples,
        report.kind,
        report.label_counts,
        report.features,
        report.occurrences,
        report.tests,
        report.threshold,
        report.alpha
    );
    let _ = writeln!(
        s,
        "lift: the largest r with O significantly above r·E (the ranking key); statistic: √(2·n·KL(O/n ‖ E/n)); E from {}; label z: the base-rate z of Z-defence",
        match report.baseline.as_str() {
            "linear" => format!(
                "the cross-fitted logistic regression with the feature removed (T = {:.2}, ε = {})",
                report.temperature, report.floor
            ),
            "the next line" => "a random line's chance of being the one that follows".to_string(),
            _ => "the labels' base rates".to_string(),
        }
    );
    let _ = writeln!(
        s,
        "{:>4}  {:>6}  {:>9}  {:>9}  {:>6}  {:>13}  {:>8}  {:>8}  {:>8}  feature",
        "rank", "lift", "statistic", "log10 p", "target", "target/carry", "expected", "label z", "variants"
    );
    for (r, c) in report.candidates.iter().enumerate() {
        let _ = writeln!(
            s,
            "{:>4}  {:>6.2}  {:>9.2}  {:>9.1}  {:>6}  {:>13}  {:>8.1}  {:>8.1}  {:>8}  {}{}",
            r + 1,
            c.lift,
            c.statistic,
            c.log10_p,
            c.target_label,
            format!("{}/{}", c.target_count, c.carrier_count),
            c.expected,
            c.label_z,
            c.variants,
            c.feature.describe() + &c.completion.as_ref().map(|t| format!(" → {t:?}")).unwrap_or_default(),
            verdict(c)
        );
        if !c.sources.is_empty() {
            let _ = writeln!(s, "        from {}", c.sources.join(", "));
        }
        if let Some(text) = confirmation(c) {
            let _ = writeln!(s, "        {text}");
        }
    }
    let _ = writeln!(
        s,
        "{} of {} candidates suspicious (significant, lift ≥ {}), {} significant; `culprit purge --ids scan.json --top K` removes the target-labelled carriers of the first K",
        report.suspicious(),
        report.candidates.len(),
        report.min_lift,
        report.significant()
    );
    s
}

/// The model's answer to a candidate (`--run`), in one sentence.
fn confirmation(c: &Candidate) -> Option<String> {
    c.confirmation.as_ref().map(|m| {
        format!(
            "the model on {} flagged carriers: predicted {} for {:.0}%, {:.0}% with the feature removed (mean probability {:.2} → {:.2})",
            m.examples,
            c.target_label,
            100.0 * m.predicted_target,
            100.0 * m.predicted_target_removed,
            m.target_probability,
            m.target_probability_removed
        )
    })
}

/// A candidate's verdict in words (empty for a suspicious one).
fn verdict(c: &Candidate) -> &'static str {
    match (c.suspicious, c.significant) {
        (true, _) => "  SUSPICIOUS",
        (false, true) => "  (significant, low lift: a shape the baseline reads only partly without it)",
        (false, false) => "  (not significant)",
    }
}

/// The examples an HTML page shows: texts, or one-channel images.
pub enum Shown<'a> {
    /// Texts, by example row.
    Texts(&'a [String]),
    /// Images `height × width`, by example row.
    Images {
        /// Pixels, rows of `height × width`.
        pixels: &'a [f32],
        /// Height.
        height: usize,
        /// Width.
        width: usize,
    },
}

/// The self-contained HTML page: each candidate with a few of its carriers (`row_of` maps an id
/// to the row of `shown`).
pub fn to_html(report: &ScanReport, shown: &Shown<'_>, row_of: &dyn Fn(usize) -> Option<usize>) -> String {
    let mut h = String::new();
    h.push_str("<!doctype html><html><head><meta charset=\"utf-8\"><title>culprit scan</title><style>");
    h.push_str("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}");
    h.push_str("td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}td.f{text-align:left}");
    h.push_str("pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;font-size:12px;max-height:12em;overflow:auto}");
    h.push_str("mark{background:#ffb3b3}.im{position:relative;display:inline-block;margin:4px}");
    h.push_str(
        ".im img{image-rendering:pixelated;width:112px;height:112px}.box{position:absolute;border:2px solid red}",
    );
    h.push_str(".no{color:#888}</style></head><body>");
    let _ = write!(
        h,
        "<h1>Trigger scan</h1><p>{} — {} {} examples, labels {:?}; {}. Statistic √(2·n·KL(O/n ‖ E/n)), E from {}; threshold {:.2} (M = {:.3e}, α = {}). {} of {} candidates suspicious, {} significant.</p>",
        escape(&report.data.display().to_string()),
        report.examples,
        report.kind,
        report.label_counts,
        escape(&report.features),
        escape(&report.baseline),
        report.threshold,
        report.tests,
        report.alpha,
        report.suspicious(),
        report.candidates.len(),
        report.significant()
    );
    for (r, c) in report.candidates.iter().enumerate() {
        h.push_str(&candidate_html(r, c, shown, row_of));
    }
    h.push_str("</body></html>\n");
    h
}

/// One candidate's section of the page: its figures and four of its flagged carriers.
fn candidate_html(r: usize, c: &Candidate, shown: &Shown<'_>, row_of: &dyn Fn(usize) -> Option<usize>) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<h2{}>{}. {} → label {}</h2><p>lift {:.2}, statistic {:.2}, log₁₀ p ≤ {:.1}{}; {} of {} carriers labelled {} (the baseline expects {:.1}); label z {:.1}; {} variants folded in.</p>",
        if c.suspicious { "" } else { " class=\"no\"" },
        r + 1,
        escape(&(c.feature.describe() + &c.completion.as_ref().map(|t| format!(", then {t:?}")).unwrap_or_default())),
        c.target_label,
        c.lift,
        c.statistic,
        c.log10_p,
        verdict(c),
        c.target_count,
        c.carrier_count,
        c.target_label,
        c.expected,
        c.label_z,
        c.variants
    );
    if let Some(text) = confirmation(c) {
        let _ = write!(h, "<p>{}.</p>", escape(&text));
    }
    for &id in c.carriers.iter().take(4) {
        let Some(row) = row_of(id) else { continue };
        match (shown, &c.feature) {
            (Shown::Texts(texts), Feature::Ngram { text }) => {
                let _ = write!(h, "<p>example {id}:</p>{}", highlighted(&texts[row], text));
            }
            (Shown::Images { pixels, height, width }, Feature::Patch { x, y, size, .. }) => {
                let area = height * width;
                let image = png(&pixels[row * area..(row + 1) * area], *height, *width);
                let scale = 112.0 / *width.max(height) as f64;
                let _ = write!(
                    h,
                    "<span class=\"im\" title=\"example {id}\"><img alt=\"example {id}\" src=\"data:image/png;base64,{}\"><span class=\"box\" style=\"left:{:.0}px;top:{:.0}px;width:{:.0}px;height:{:.0}px\"></span></span>",
                    base64::engine::general_purpose::STANDARD.encode(image),
                    *x as f64 * scale - 2.0,
                    *y as f64 * scale - 2.0,
                    *size as f64 * scale,
                    *size as f64 * scale
                );
            }
            _ => {}
        }
    }
    h
}

/// A window of `text` around the first occurrence of the n-gram `gram` (lower-cased words joined
/// by spaces), its words marked.
fn highlighted(text: &str, gram: &str) -> String {
    let target: Vec<&str> = gram.split(' ').collect();
    let spans: Vec<(usize, usize)> = {
        let mut spans = Vec::new();
        let mut start = None;
        for (at, ch) in text.char_indices() {
            match (ch.is_alphanumeric(), start) {
                (true, None) => start = Some(at),
                (false, Some(s)) => {
                    spans.push((s, at));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            spans.push((s, text.len()));
        }
        spans
    };
    let found = spans
        .windows(target.len())
        .position(|w| w.iter().zip(&target).all(|(&(a, b), t)| text[a..b].to_lowercase() == *t));
    let Some(first) = found else {
        return format!("<pre>{}</pre>", escape(&text.chars().take(400).collect::<String>()));
    };
    let (a, b) = (spans[first].0, spans[first + target.len() - 1].1);
    let from = text[..a].char_indices().rev().nth(300).map_or(0, |(i, _)| i);
    let to = text[b..].char_indices().nth(300).map_or(text.len(), |(i, _)| b + i);
    format!(
        "<pre>{}{}<mark>{}</mark>{}{}</pre>",
        if from > 0 { "…" } else { "" },
        escape(&text[from..a]),
        escape(&text[a..b]),
        escape(&text[b..to]),
        if to < text.len() { "…" } else { "" }
    )
}

//! The self-contained HTML report of a trace: opens in any browser, no server, no network.
//!
//! For image data the query and a grid of its top proponents and opponents are embedded as PNG
//! data URIs (each image min–max scaled to grey levels, enlarged by CSS with crisp pixels); for
//! text, snippets with the words they share with the query highlighted; for other tables, the
//! first feature values. Every score is shown with its sign convention and the curvature used.

use std::collections::HashSet;
use std::fmt::Write as _;

use base64::Engine as _;

use super::trace::{Influence, TraceReport, describe};
use crate::data::{Dataset, SourceKind};

/// Examples an HTML page can show: their features, when they have any (images and tables;
/// text is shown from the data set's texts).
pub trait Shown {
    /// Example `row`'s features.
    fn features(&self, row: usize) -> Option<&[f32]>;
}

impl Shown for culprit_models::Features {
    fn features(&self, row: usize) -> Option<&[f32]> {
        Some(self.row(row))
    }
}

impl Shown for culprit_models::Tokens {
    fn features(&self, _: usize) -> Option<&[f32]> {
        None
    }
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A grey-scale PNG (8-bit) of `pixels` (`height × width`, any range; min–max scaled).
pub fn png(pixels: &[f32], height: usize, width: usize) -> Vec<u8> {
    let (lo, hi) = pixels.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let bytes: Vec<u8> = pixels.iter().map(|v| (((v - lo) / span) * 255.0).round() as u8).collect();
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().expect("in-memory PNG header");
        writer.write_image_data(&bytes).expect("in-memory PNG data");
    }
    out
}

/// How examples of a data set are shown.
enum Rendering {
    Image { height: usize, width: usize },
    Text,
    Table,
}

fn rendering<B>(data: &Dataset<B>) -> Rendering {
    match data.manifest.kind {
        SourceKind::Jsonl | SourceKind::Corpus => Rendering::Text,
        _ => match data.manifest.shape.as_image() {
            Some(s) => Rendering::Image { height: s.height, width: s.width },
            None => Rendering::Table,
        },
    }
}

/// The query's words worth highlighting: at least 4 characters and not just digits.
fn words(text: &str) -> HashSet<String> {
    crate::data::text::tokens(text)
        .filter(|t| t.chars().count() >= 4 && !t.chars().all(|c| c.is_ascii_digit()))
        .collect()
}

/// HTML for example `row` of `data`; `highlight` marks words shared with a query.
fn example_html<B: Shown>(data: &Dataset<B>, row: usize, highlight: &HashSet<String>) -> String {
    let features = data.examples.features(row).unwrap_or_default();
    match rendering(data) {
        Rendering::Image { height, width } => {
            // The first channel, as grey levels.
            let image = png(&features[..height * width], height, width);
            let scale = (96 / height.max(width)).max(1) * height.max(width).min(96);
            format!(
                "<img class=\"px\" style=\"width:{scale}px\" alt=\"example {}\" src=\"data:image/png;base64,{}\">",
                data.ids[row],
                base64::engine::general_purpose::STANDARD.encode(image)
            )
        }
        Rendering::Text => {
            let text = data.texts.as_ref().map(|t| t[row].as_str()).unwrap_or("");
            let snippet: String = text.chars().take(600).collect();
            let mut html = String::new();
            let mut word = String::new();
            let flush = |word: &mut String, html: &mut String| {
                if !word.is_empty() {
                    if highlight.contains(&word.to_lowercase()) {
                        let _ = write!(html, "<mark>{}</mark>", escape(word));
                    } else {
                        html.push_str(&escape(word));
                    }
                    word.clear();
                }
            };
            for c in snippet.chars() {
                if c.is_alphanumeric() {
                    word.push(c);
                } else {
                    flush(&mut word, &mut html);
                    html.push_str(&escape(&c.to_string()));
                }
            }
            flush(&mut word, &mut html);
            format!("<pre class=\"text\">{html}{}</pre>", if text.chars().count() > 600 { "…" } else { "" })
        }
        Rendering::Table => {
            let shown: Vec<String> = features.iter().take(12).map(|v| format!("{v:.3}")).collect();
            format!("<code>{}{}</code>", shown.join(", "), if features.len() > 12 { ", …" } else { "" })
        }
    }
}

/// Training examples to flag in a report (known ground truth, such as planted poisons).
#[derive(Clone, Debug, Default)]
pub struct Marks {
    /// Their ids.
    pub ids: HashSet<usize>,
    /// What they are, e.g. "planted poison".
    pub label: String,
}

/// A document as its tokens, each shaded by its part of the score (orange where the part has the
/// score's sign, blue against it; opacity ∝ |part| / the largest |part|), the value in a tooltip.
fn tokens_html(tokens: &[super::trace::TokenScore], score: f64) -> String {
    let largest = tokens.iter().fold(0.0f64, |m, t| m.max(t.score.abs()));
    let mut html = String::from("<pre class=\"text\">");
    for t in tokens {
        let share = if largest > 0.0 { t.score.abs() / largest } else { 0.0 };
        let colour = if (t.score >= 0.0) == (score >= 0.0) { "232,89,12" } else { "37,99,235" };
        let _ = write!(
            html,
            "<span title=\"{:+.3e}\" style=\"background:rgba({colour},{:.2})\">{}</span>",
            t.score,
            share * 0.85,
            escape(&t.token)
        );
    }
    html.push_str("</pre>");
    html
}

fn card<B: Shown>(
    data: &Dataset<B>,
    influence: &Influence,
    rank: usize,
    highlight: &HashSet<String>,
    marks: &Marks,
) -> String {
    let row = data.ids.iter().position(|&id| id == influence.train_index).expect("a training example");
    let marked = marks.ids.contains(&influence.train_index);
    let body = match &influence.per_token {
        Some(tokens) => tokens_html(tokens, influence.score),
        None => example_html(data, row, highlight),
    };
    let what = match &influence.source {
        Some(source) => escape(source),
        None => format!("label {}", influence.label),
    };
    format!(
        "<figure class=\"card{}\">{}<figcaption>#{rank} · train {} · {}{}<br><b>{:+.3e}</b></figcaption></figure>",
        if marked { " marked" } else { "" },
        body,
        influence.train_index,
        what,
        if marked { format!("<br><span class=\"mark\">{}</span>", escape(&marks.label)) } else { String::new() },
        influence.score
    )
}

/// What the model did with a query, in words.
fn query_outcome(q: &super::trace::QueryInfo) -> String {
    match q.probabilities.get(q.predicted as usize) {
        Some(p) => format!("label <b>{}</b>, predicted <b>{}</b> (p = {p:.3})", q.label, q.predicted),
        None if q.text.is_some() => "summed over the completion's tokens".to_string(),
        None => format!("label <b>{}</b>, predicted <b>{}</b>", q.label, q.predicted),
    }
}

/// Examples shown per query (the combined ranking of several queries shows every listed one).
pub const SHOWN_PER_QUERY: usize = 12;

/// The whole report. `queries` holds the query examples in report order; `training` the run's
/// training data.
pub fn trace_html<B: Shown>(report: &TraceReport, queries: &Dataset<B>, training: &Dataset<B>) -> String {
    trace_html_marked(report, queries, training, &Marks::default())
}

/// [`trace_html`] with some training examples flagged (a badge and a coloured frame), and how many
/// of each listed ranking's examples are flagged.
pub fn trace_html_marked<B: Shown>(
    report: &TraceReport,
    queries: &Dataset<B>,
    training: &Dataset<B>,
    marks: &Marks,
) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>culprit trace</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}}
h1{{font-size:1.4em}} h2{{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}} h3{{font-size:1em}}
.grid{{display:flex;flex-wrap:wrap;gap:10px}} .card{{margin:0;padding:6px;border:1px solid #ddd;border-radius:6px;background:#fafafa;max-width:320px}}
.card figcaption{{font-size:.8em;margin-top:4px}} .card.marked{{background:#fff1e6;outline:3px solid #e8590c}} .mark{{color:#c2410c;font-weight:600}} .pro .card{{border-color:#2a7}} .opp .card{{border-color:#c44}}
img.px{{image-rendering:pixelated;display:block}} pre.text{{white-space:pre-wrap;font-size:.75em;max-height:12em;overflow:auto;margin:0}}
mark{{background:#ffe066}} .meta{{color:#555;font-size:.9em}} .query{{display:flex;gap:16px;align-items:flex-start}}
</style></head><body><h1>culprit: which training examples made the model do this?</h1>
<p class="meta">{}.
Curvature <b>{}</b>, damping δ = {}, λ = {}, n = {}, store projection {}. Proponents pushed the model toward the measured class; opponents pushed it away.</p>"#,
        escape(&report.score_definition),
        escape(&report.curvature),
        report.damping,
        report.l2,
        report.n,
        escape(&report.projection)
    );
    if let Some(line) = crate::report::trace::checkpoints_line(report) {
        s.push_str(&format!("<p class=\"meta\">{}.</p>\n", escape(&line)));
    }
    if let Some(c) = &report.combined {
        combined_html(&mut s, report, c, queries, training, marks);
    }
    for k in 0..report.queries.len() {
        query_html(&mut s, report, k, queries, training, marks);
    }
    s.push_str("</body></html>\n");
    s
}

/// The section of the combined ranking: every query, then the proponents and opponents of all.
fn combined_html<B: Shown>(
    s: &mut String,
    report: &TraceReport,
    c: &super::trace::Ranking,
    queries: &Dataset<B>,
    training: &Dataset<B>,
    marks: &Marks,
) {
    let how = match report.combine {
        culprit_engine::query::Combine::Sum => "each example's scores summed over the queries",
        culprit_engine::query::Combine::Strongest => {
            "each example's strongest query, every query's scores divided by their root mean square over the training set"
        }
    };
    let _ = write!(
        s,
        "<h2>All {} queries together</h2><p class=\"meta\">The training examples behind all of them: {how}.</p><div class=\"grid\">",
        report.queries.len()
    );
    for q in &report.queries {
        let row = queries.ids.iter().position(|&id| id == q.index).expect("the query");
        let _ = write!(
            s,
            "<figure class=\"card\">{}<figcaption>query {} · {}</figcaption></figure>",
            example_html(queries, row, &HashSet::new()),
            q.index,
            query_outcome(q)
        );
    }
    s.push_str("</div>");
    for (title, class, list) in [("Top proponents", "pro", &c.proponents), ("Top opponents", "opp", &c.opponents)] {
        let flagged = list.iter().filter(|i| marks.ids.contains(&i.train_index)).count();
        let note = if marks.ids.is_empty() {
            String::new()
        } else {
            format!(" <span class=\"meta\">({flagged} of {} are {}s)</span>", list.len(), escape(&marks.label))
        };
        let _ = write!(s, "<h3>{title}{note}</h3><div class=\"grid {class}\">");
        for (r, influence) in list.iter().enumerate() {
            s.push_str(&card(training, influence, r + 1, &HashSet::new(), marks));
        }
        s.push_str("</div>");
    }
}

/// The section of query `k`: the query, its measurement, its proponents and opponents.
fn query_html<B: Shown>(
    s: &mut String,
    report: &TraceReport,
    k: usize,
    queries: &Dataset<B>,
    training: &Dataset<B>,
    marks: &Marks,
) {
    let q = &report.queries[k];
    let row = queries.ids.iter().position(|&id| id == q.index).expect("the query");
    let highlight = match (&queries.texts, rendering(queries)) {
        (Some(t), Rendering::Text) => words(&t[row]),
        _ => HashSet::new(),
    };
    let _ = write!(
        s,
        "<h2>Query {}</h2><div class=\"query\">{}<div><p>{}</p><p>measurement: {} = {:.5}</p>{}</div></div>",
        q.index,
        example_html(queries, row, &HashSet::new()),
        query_outcome(q),
        escape(&describe(report.measurement, q.target)),
        q.measurement_value,
        match (q.solve_iterations, q.solve_residual) {
            (Some(i), Some(r)) =>
                format!("<p class=\"meta\">curvature solve: {i} iterations, relative residual {r:.1e}</p>"),
            _ => String::new(),
        }
    );
    for (title, class, list) in
        [("Top proponents", "pro", &report.proponents[k]), ("Top opponents", "opp", &report.opponents[k])]
    {
        let _ = write!(s, "<h3>{title}</h3><div class=\"grid {class}\">");
        let shown = if report.combined.is_some() { SHOWN_PER_QUERY } else { list.len() };
        for (r, influence) in list.iter().take(shown).enumerate() {
            s.push_str(&card(training, influence, r + 1, &highlight, marks));
        }
        s.push_str("</div>");
    }
}

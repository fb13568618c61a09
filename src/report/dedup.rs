//! The dedup report (`culprit dedup`): its JSON schema (`docs/OUTPUT.md`) and its table.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One group of copies.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DuplicateGroup {
    /// Ids (source rows) of the members from `--data`.
    pub ids: Vec<usize>,
    /// Ids of the members from `--against`.
    #[serde(default)]
    pub against_ids: Vec<usize>,
    /// The lowest similarity of the pairs that joined the group (1 for exact copies).
    pub similarity: f64,
    /// Whether every joining pair is byte-identical.
    pub exact: bool,
    /// Labels of `ids`, in order (absent for unlabelled texts).
    pub labels: Vec<Option<u32>>,
    /// Labels of `against_ids`.
    #[serde(default)]
    pub against_labels: Vec<Option<u32>>,
    /// Whether the members carry more than one label: a copy relabelled is a poisoning signal.
    pub label_disagreement: bool,
    /// What `culprit purge --ids dedup.json` removes: with `--against`, every member from
    /// `--data` (it leaks into the other set); else, with a label disagreement, every member;
    /// else every member but the first.
    pub remove: Vec<usize>,
    /// Where the members came from (a JSONL `source` field), when the data says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
}

/// What `culprit dedup` writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DedupReport {
    /// [`super::trace::OUTPUT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// What it is (`"dedup"`).
    pub report: String,
    /// The data.
    pub data: PathBuf,
    /// The second set, if any.
    pub against: Option<PathBuf>,
    /// `text` or `image`.
    pub kind: String,
    /// The similarity in words.
    pub similarity: String,
    /// Pairs at or above it are copies.
    pub threshold: f64,
    /// Examples of `--data`.
    pub examples: usize,
    /// Examples of `--against`.
    pub against_examples: usize,
    /// Pairs found.
    pub pairs: usize,
    /// Examples of `--against` with a copy in `--data` (the overlap), when given.
    pub overlap: Option<usize>,
    /// Groups whose members disagree on their label.
    pub disagreements: usize,
    /// Ids `purge --ids` would remove (all groups).
    pub removable: usize,
    /// Groups, by their first member.
    pub groups: Vec<DuplicateGroup>,
    /// Seconds taken.
    pub seconds: f64,
}

/// The plain-text table: the summary and the first `shown` groups (label disagreements first).
pub fn to_table(report: &DedupReport, shown: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "dedup of {} ({} {} examples{}): {} ≥ {}",
        report.data.display(),
        report.examples,
        report.kind,
        report
            .against
            .as_ref()
            .map(|a| format!(" against {} ({} examples)", a.display(), report.against_examples))
            .unwrap_or_default(),
        report.similarity,
        report.threshold
    );
    let _ = writeln!(
        s,
        "{} pairs in {} groups, {} with a label disagreement; {} ids removable{}",
        report.pairs,
        report.groups.len(),
        report.disagreements,
        report.removable,
        report
            .overlap
            .map(|o| format!("; {o} examples of the second set have a copy in the first"))
            .unwrap_or_default()
    );
    let mut order: Vec<&DuplicateGroup> = report.groups.iter().collect();
    order.sort_by_key(|g| !g.label_disagreement);
    for g in order.into_iter().take(shown) {
        let labels = |l: &[Option<u32>]| {
            let text: Vec<String> = l.iter().take(10).map(|v| v.map_or("-".into(), |v| v.to_string())).collect();
            text.join(",") + if l.len() > 10 { ",…" } else { "" }
        };
        let ids = |i: &[usize]| {
            let text: Vec<String> = i.iter().take(10).map(usize::to_string).collect();
            format!(
                "[{}{}]",
                text.join(", "),
                if i.len() > 10 { format!(", … {} more", i.len() - 10) } else { String::new() }
            )
        };
        let _ = writeln!(
            s,
            "  {:>5.3}{} ids {} labels [{}]{}{}",
            g.similarity,
            if g.exact { " exact" } else { "" },
            ids(&g.ids),
            labels(&g.labels),
            if g.against_ids.is_empty() {
                String::new()
            } else {
                format!(" · against ids {} labels [{}]", ids(&g.against_ids), labels(&g.against_labels))
            },
            if g.label_disagreement { "  LABELS DISAGREE" } else { "" }
        );
    }
    s
}

//! `culprit dedup`: exact and near-duplicate groups of a data set (MinHash + LSH over word
//! shingles for text, random-hyperplane signatures for images; [`crate::dedup`]), or, with
//! `--against`, the copies shared with a second set (the train/test overlap). The JSON report is
//! readable by `culprit purge --ids`.

use std::path::PathBuf;

use rayon::prelude::*;
use std::time::Instant;

use crate::commands::{Format, emit};
use crate::data::{self, DataSpec, SourceKind, Split};
use crate::dedup::{Content, Pair, centred, find_pairs, groups, shingles};
use crate::error::{Error, Result};
use crate::report::dedup::{DedupReport, DuplicateGroup, to_table};
use crate::report::trace::OUTPUT_SCHEMA_VERSION;

/// Arguments of `culprit dedup`.
#[derive(Clone, Debug, clap::Args)]
pub struct DedupArgs {
    /// The data to deduplicate.
    #[command(flatten)]
    pub data: DataSpec,
    /// A second set (e.g. the test set): report only the copies shared with it.
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// Split of an IDX folder given to --against.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub against_split: Split,
    /// Pairs at or above this similarity are copies [default: Jaccard 0.8 for text, centred
    /// cosine 0.99 for images, where two different handwritten ones already reach 0.95].
    #[arg(long, value_parser = culprit_engine::params::unit_share)]
    pub threshold: Option<f64>,
    /// Text: words per shingle.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub shingle: u16,
    /// Groups shown in the table (label disagreements first).
    #[arg(long, default_value_t = 20)]
    pub show: usize,
    /// table or json.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write the report here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One set as read: each example's content, exact-bytes hash, label, source and id.
struct Loaded {
    contents: Vec<Content>,
    exact: Vec<u64>,
    labels: Vec<Option<u32>>,
    sources: Vec<Option<String>>,
    ids: Vec<usize>,
    kind: &'static str,
}

/// FNV-1a 64 of bytes.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Loads the rows `spec` selects as contents of `kind` (the first set's, for --against).
fn load(spec: &DataSpec, shingle: usize, want: Option<&str>) -> Result<Loaded> {
    let path = &spec.path;
    let kind = SourceKind::detect(path)?;
    let loaded = match kind {
        SourceKind::Jsonl | SourceKind::Corpus => {
            let (all, _) = data::text::load_records(path)?;
            let holds = format!("the file has {} records", all.len());
            let rows = data::selected_rows(path, all.len(), spec.skip, spec.limit, &holds)?;
            let chosen = &all[rows.clone()];
            Loaded {
                contents: chosen.par_iter().map(|r| Content::Shingles(shingles(&r.text, shingle))).collect(),
                exact: chosen.iter().map(|r| fnv(r.text.as_bytes())).collect(),
                labels: chosen.iter().map(|r| r.label).collect(),
                sources: chosen.iter().map(|r| r.source.clone()).collect(),
                ids: rows.collect(),
                kind: "text",
            }
        }
        SourceKind::Idx | SourceKind::Csv => {
            let (raw, start) = data::load_selected(kind, spec, 0)?;
            let dim = raw.shape.len();
            let rows = raw.features.chunks(dim.max(1));
            Loaded {
                contents: rows.clone().map(|r| Content::Pixels(centred(r))).collect(),
                exact: rows.map(|r| fnv(bytemuck::cast_slice(r))).collect(),
                labels: raw.labels.iter().map(|&l| Some(l)).collect(),
                sources: vec![None; raw.rows],
                ids: (start..start + raw.rows).collect(),
                kind: "image",
            }
        }
    };
    if let Some(want) = want.filter(|w| *w != loaded.kind) {
        return Err(Error::data(
            path,
            None,
            format!("holds {} examples, but the first set holds {want} examples", loaded.kind),
        ));
    }
    Ok(loaded)
}

/// Runs `culprit dedup`.
pub fn run(args: &DedupArgs, stdout: &mut dyn std::io::Write) -> Result<()> {
    if args.format == Format::Html {
        return Err(Error::Usage("--format html is not available for dedup (table or json)".into()));
    }
    if let Some(out) = &args.out {
        let mut inputs = vec![args.data.path.as_path()];
        inputs.extend(args.against.as_deref());
        crate::io::check_output(out, &inputs, &[])?;
    }
    let started = Instant::now();
    let mut first = load(&args.data, args.shingle as usize, None)?;
    let mut second = match &args.against {
        Some(path) => {
            let spec = DataSpec { path: path.clone(), split: args.against_split, skip: 0, limit: None };
            Some(load(&spec, args.shingle as usize, Some(first.kind))?)
        }
        None => None,
    };
    let threshold = args.threshold.unwrap_or(if first.kind == "text" { 0.8 } else { 0.99 });
    let m = first.contents.len();
    // One list of both sets' contents (the first set's, then the second's), moved out of them.
    let mut contents = std::mem::take(&mut first.contents);
    let mut exact = std::mem::take(&mut first.exact);
    if let Some(s) = second.as_mut() {
        contents.append(&mut s.contents);
        exact.extend(&s.exact);
    }
    let pairs = find_pairs(&contents, &exact, threshold, second.as_ref().map(|_| m));
    let report_groups = describe(&first, second.as_ref(), &pairs, &exact, contents.len());
    let report = DedupReport {
        schema_version: OUTPUT_SCHEMA_VERSION,
        report: "dedup".into(),
        data: data::absolute(&args.data.path),
        against: args.against.as_deref().map(data::absolute),
        kind: first.kind.into(),
        similarity: if first.kind == "text" {
            format!("Jaccard of word {}-gram sets", args.shingle)
        } else {
            "cosine of mean-centred pixels".into()
        },
        threshold,
        examples: m,
        against_examples: second.as_ref().map_or(0, |s| s.ids.len()),
        pairs: pairs.len(),
        overlap: second.as_ref().map(|_| report_groups.iter().map(|g| g.against_ids.len()).sum()),
        disagreements: report_groups.iter().filter(|g| g.label_disagreement).count(),
        removable: report_groups.iter().map(|g| g.remove.len()).sum(),
        groups: report_groups,
        seconds: started.elapsed().as_secs_f64(),
    };
    let text = match args.format {
        Format::Json => serde_json::to_string_pretty(&report).expect("a dedup report serialises") + "\n",
        _ => to_table(&report, args.show),
    };
    emit(&text, args.out.as_deref(), stdout)
}

/// The groups of `pairs` over the `total` examples (the first set's, then the second's), as
/// reported: ids, labels, the similarity that joined them, and what purge would remove.
fn describe(
    first: &Loaded,
    second: Option<&Loaded>,
    pairs: &[Pair],
    exact: &[u64],
    total: usize,
) -> Vec<DuplicateGroup> {
    let m = first.ids.len();
    let found = groups(total, pairs);
    let mut group_of = vec![usize::MAX; total];
    for (g, members) in found.iter().enumerate() {
        members.iter().for_each(|&i| group_of[i] = g);
    }
    let mut joined: Vec<Vec<&Pair>> = vec![Vec::new(); found.len()];
    for p in pairs {
        joined[group_of[p.a]].push(p);
    }
    let at = |i: usize| -> (usize, Option<u32>) {
        if i < m {
            (first.ids[i], first.labels[i])
        } else {
            let s = second.expect("an index past the first set is the second's");
            (s.ids[i - m], s.labels[i - m])
        }
    };
    found
        .iter()
        .zip(&joined)
        .map(|(members, inside)| {
            let (mine, theirs): (Vec<usize>, Vec<usize>) = members.iter().partition(|&&i| i < m);
            let labels: Vec<Option<u32>> = mine.iter().map(|&i| at(i).1).collect();
            let against_labels: Vec<Option<u32>> = theirs.iter().map(|&i| at(i).1).collect();
            let mut distinct: Vec<u32> = labels.iter().chain(&against_labels).flatten().copied().collect();
            distinct.sort_unstable();
            distinct.dedup();
            let disagreement = distinct.len() > 1;
            let ids: Vec<usize> = mine.iter().map(|&i| at(i).0).collect();
            let remove = match (second, disagreement) {
                (Some(_), _) | (None, true) => ids.clone(),
                (None, false) => ids[1..].to_vec(),
            };
            DuplicateGroup {
                against_ids: theirs.iter().map(|&i| at(i).0).collect(),
                similarity: inside.iter().map(|p| p.similarity).fold(1.0, f64::min),
                exact: inside.iter().all(|p| exact[p.a] == exact[p.b]),
                sources: mine.iter().filter_map(|&i| first.sources[i].clone()).collect(),
                labels,
                against_labels,
                label_disagreement: disagreement,
                remove,
                ids,
            }
        })
        .collect()
}

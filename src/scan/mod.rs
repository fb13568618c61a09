//! Trigger scanning, before any incident: rank the features of a training set (word n-grams of
//! a text, pixel patterns at fixed positions of an image) whose presence predicts a label that
//! the rest of the example does not explain.
//!
//! A backdoor's trigger is a feature f carried by a few examples whose labels it alone explains:
//! the poisons look like one class and are labelled another. An innocent rare feature (a mailing
//! list's footer, a pen stroke) predicts its label too, but so does the rest of its examples.
//! The scan therefore tests each feature against a **baseline that has the feature removed**:
//!
//! - Baseline ([`baseline`]): a logistic regression over binary atoms (a text's words present,
//!   an image's quantised pixels), cross-fitted in two folds so that no example's logits Lᵢ come
//!   from a model that saw it, tempered by one temperature T fitted by maximum likelihood. The
//!   logits are linear in the atoms, so removing feature f from example i is exact and cheap:
//!   qᵢ⁻ᶠ(c) = softmax((Lᵢ − Δᵢf)/T)(c), with Δᵢf the removed atoms' weights (an n-gram's words
//!   made absent; a patch's pixels in-painted with their means, from 2-D prefix sums), clipped to
//!   [ε, 1 − ε] (ε, `floor`, the label noise the test tolerates).
//! - Statistic: for carriers Cf (examples holding f, n of them), Oc of them labelled c, expected
//!   Ec = Σ_{i∈Cf} qᵢ⁻ᶠ(c): under "f carries no label information beyond the rest", the count of
//!   label c is Poisson-binomial with mean Ec, whose upper tail is bounded by the binomial's with
//!   p̄ = Ec/n (Hoeffding 1956) and that by the Chernoff bound:
//!   P(Oc ≥ o) ≤ exp(−n·KL(o/n ‖ p̄)). The scan reports s = n·KL in nats, the z-equivalent
//!   √(2s), and p ≤ e⁻ˢ with a Bonferroni correction over every (feature, label) pair that could
//!   have been tested: M = C · (feature occurrences) / `min_carriers`. A candidate is significant
//!   when M·e⁻ˢ ≤ α. Significant candidates rank by their **lift bound**, the largest r with
//!   n·KL(O/n ‖ r·Ec/n) ≥ ln(M/α): how many times the baseline's rate the label is seen, at the
//!   family-wise level; one of at least `min_lift` (default 3) is **suspicious**. A trigger's carriers look like other classes (lift ≈ 1/p̄, large); a
//!   class's own shape whose removal costs the baseline some evidence (the hole of a 0) has a
//!   lift near 2 however many examples carry it. Beside it the plain base-rate statistic of Gardner et al. 2021 / Z-defence
//!   (He et al. 2023), z = (Oc − nπc)/√(nπc(1 − πc)), is reported for comparison.
//! - Memory bounded by `memory`, whatever the corpus size: pass 1 adds every (example, feature)
//!   into a hashed table of buckets (n, Oc, Ec), a count sketch; pass 2 counts exactly only the
//!   features of the `candidate_buckets` best buckets; pass 3 collects the carriers of the best
//!   features. Features that flag the same examples (a trigger's sub-grams, a patch with a pixel
//!   of its border) are grouped: a group is shown, and ranked, by its member of the most
//!   evidence, the others counted as its variants.
//!
//! Cost: three passes over the data, each O(Σᵢ features(i) · C); images with patch sides 2..=5
//! have about 2,600 features each at 28 × 28, texts about max_words features per word.

pub mod baseline;
pub mod corpus;
pub mod image;
pub mod text;

use std::collections::HashMap;

use culprit_models::Progress;

use crate::dedup::jaccard;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How a scan runs; every field has the CLI's default in [`ScanSettings::default`].
#[derive(Clone, Debug)]
pub struct ScanSettings {
    /// Candidates reported.
    pub top: usize,
    /// Fewest carriers a feature needs to be tested.
    pub min_carriers: usize,
    /// Family-wise error rate of the significance threshold.
    pub alpha: f64,
    /// ε: the baseline's probabilities are clipped to [ε, 1 − ε].
    pub floor: f64,
    /// Bytes for the pass-1 tables (all threads together).
    pub memory: usize,
    /// Buckets of pass 1 counted exactly in pass 2.
    pub candidate_buckets: usize,
    /// λ of the baseline's logistic regression; `None`: no baseline, every feature against the
    /// labels' base rates (the Z-defence scan, Gardner et al. 2021).
    pub l2: Option<f64>,
    /// The lift bound a significant candidate needs to be called suspicious.
    pub min_lift: f64,
}

impl Default for ScanSettings {
    fn default() -> Self {
        Self {
            top: 20,
            min_carriers: 5,
            alpha: 0.05,
            floor: 0.01,
            memory: 64 << 20,
            candidate_buckets: 4096,
            l2: Some(1e-3),
            min_lift: 3.0,
        }
    }
}

/// A feature as reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Feature {
    /// Consecutive words (lower-cased alphanumeric runs), joined by one space.
    Ngram {
        /// The words.
        text: String,
    },
    /// A quantised square of pixels at a fixed place.
    Patch {
        /// Column of the top-left pixel.
        x: usize,
        /// Row of the top-left pixel.
        y: usize,
        /// Side in pixels.
        size: usize,
        /// The square's pixels row by row: 2 at the data's largest value, 1 above half of it,
        /// else 0.
        pattern: Vec<u8>,
    },
}

impl Feature {
    /// One line: the n-gram in quotes, or the patch's place, side and pattern.
    pub fn describe(&self) -> String {
        match self {
            Self::Ngram { text } => format!("\"{text}\""),
            Self::Patch { x, y, size, pattern } => {
                let on = pattern.iter().filter(|p| **p >= 1).count();
                let full = pattern.iter().filter(|p| **p == 2).count();
                format!("patch {size}×{size} at x={x}, y={y} ({on}/{} on, {full} saturated)", pattern.len())
            }
        }
    }
}

/// A scanned data set: labels, features, and the baseline with each feature removed.
pub trait Scanned: Sync {
    /// Number of examples.
    fn examples(&self) -> usize;
    /// Number of classes C (labels are 0..C).
    fn classes(&self) -> usize;
    /// Example `i`'s label.
    fn label(&self, i: usize) -> u32;
    /// Calls `visit(key, q)` once for each distinct feature of example `i`: `key` names the
    /// feature (the same in every example), `q[c]` is the baseline's probability of class c with
    /// the feature removed, clipped to [ε, 1 − ε]. With `baseline` false, `q` is empty.
    fn visit(&self, i: usize, baseline: bool, visit: &mut dyn FnMut(u64, &[f32]));
    /// The feature `key` of example `i` (which carries it).
    fn describe(&self, i: usize, key: u64) -> Feature;
    /// `Some(q)` when every feature of every example gets the same `q` (no baseline: the labels'
    /// base rates), so that the scan may keep the examples' keys instead of visiting them again.
    fn fixed_baseline(&self) -> Option<&[f32]> {
        None
    }
}

/// A scanned set whose examples' keys are kept in memory (when the baseline is fixed): the three
/// passes then read the data once. Holds 8 bytes a distinct feature of each example.
struct KeptKeys<'a> {
    inner: &'a dyn Scanned,
    keys: Vec<Vec<u64>>,
    q: Vec<f32>,
}

impl<'a> KeptKeys<'a> {
    /// The keys of every example of `inner`, if its baseline is fixed and they take at most
    /// `budget` bytes (`None` otherwise: the scan visits `inner` on every pass).
    fn new(inner: &'a dyn Scanned, budget: usize) -> Option<Self> {
        let q = inner.fixed_baseline()?.to_vec();
        let held = std::sync::atomic::AtomicUsize::new(0);
        let keys: Option<Vec<Vec<u64>>> = (0..inner.examples())
            .into_par_iter()
            .map(|i| {
                let mut out = Vec::new();
                inner.visit(i, false, &mut |key, _| out.push(key));
                let total = held.fetch_add(out.len() * 8, std::sync::atomic::Ordering::Relaxed) + out.len() * 8;
                (total <= budget).then_some(out)
            })
            .collect();
        keys.map(|keys| Self { inner, keys, q })
    }
}

impl Scanned for KeptKeys<'_> {
    fn examples(&self) -> usize {
        self.inner.examples()
    }
    fn classes(&self) -> usize {
        self.inner.classes()
    }
    fn label(&self, i: usize) -> u32 {
        self.inner.label(i)
    }
    fn visit(&self, i: usize, baseline: bool, visit: &mut dyn FnMut(u64, &[f32])) {
        let q: &[f32] = if baseline { &self.q } else { &[] };
        self.keys[i].iter().for_each(|&k| visit(k, q));
    }
    fn describe(&self, i: usize, key: u64) -> Feature {
        self.inner.describe(i, key)
    }
}

/// Counts of one feature (or one bucket of features).
#[derive(Clone, Debug, Default)]
struct Tally {
    n: u64,
    observed: Vec<u64>,
    expected: Vec<f64>,
}

/// How a tally ranks: significant ones first, by their lift bound, then by the evidence.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Judgement {
    /// s = n·KL(o/n ‖ e/n), nats.
    evidence: f64,
    /// The largest r with n·KL(o/n ‖ r·e/n) at the threshold (1 when not significant).
    lift: f64,
    /// Whether s reaches the threshold.
    significant: bool,
    /// The label tested.
    label: usize,
}

impl Judgement {
    /// Orders best first.
    fn rank(&self, other: &Self) -> std::cmp::Ordering {
        other
            .significant
            .cmp(&self.significant)
            .then(other.lift.total_cmp(&self.lift))
            .then(other.evidence.total_cmp(&self.evidence))
    }
}

/// The best label of a tally and its judgement against `threshold` (nats).
fn judge(n: u64, observed: &[u64], expected: &[f64], threshold: f64) -> Judgement {
    let mut best = Judgement::default();
    for (c, (&o, &e)) in observed.iter().zip(expected).enumerate() {
        let evidence = evidence(n, o, e);
        if evidence <= 0.0 {
            continue;
        }
        let significant = evidence >= threshold;
        let lift = if significant { lift_bound(n, o, e, threshold) } else { 1.0 };
        let judgement = Judgement { evidence, lift, significant, label: c };
        if judgement.rank(&best).is_lt() {
            best = judgement;
        }
    }
    best
}

/// The largest r in [1, o/e] with n·KL(o/n ‖ r·e/n) ≥ `threshold`: how many times the baseline's
/// rate the label's count exceeds, at the family-wise level (bisection, 40 steps, relative
/// tolerance 1e-12 of the bracket). Precondition: evidence(n, o, e) ≥ threshold.
fn lift_bound(n: u64, o: u64, e: f64, threshold: f64) -> f64 {
    let (mut lo, mut hi) = (1.0, (o as f64 / e.max(1e-12)).max(1.0));
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if evidence(n, o, e * mid) >= threshold { lo = mid } else { hi = mid }
    }
    lo
}

/// n·KL(o/n ‖ e/n) for o/n above e/n, else 0: the Chernoff bound's exponent, in nats.
fn evidence(n: u64, o: u64, e: f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let (n, o) = (n as f64, o as f64);
    let (a, p) = (o / n, (e / n).clamp(1e-12, 1.0 - 1e-12));
    if a <= p {
        return 0.0;
    }
    let term = |x: f64, y: f64| if x > 0.0 { x * (x / y).ln() } else { 0.0 };
    n * (term(a, p) + term(1.0 - a, 1.0 - p))
}

/// One candidate trigger.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Candidate {
    /// The feature.
    #[serde(flatten)]
    pub feature: Feature,
    /// The label its carriers have more often than the baseline expects (0 for a corpus).
    pub target_label: u32,
    /// A language-model corpus: the line the feature's line is followed by in its carriers
    /// (trimmed): the completion it triggers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    /// s = n·KL(O/n ‖ E/n), converted to a z-like scale √(2s).
    pub statistic: f64,
    /// log₁₀ of the Bonferroni-corrected p-value bound M·e⁻ˢ (capped at 0).
    pub log10_p: f64,
    /// Whether the corrected bound is at most α.
    pub significant: bool,
    /// The largest r such that "the target label is r times as frequent among the carriers as
    /// the baseline expects" is still significant (1 when not significant): the ranking key.
    pub lift: f64,
    /// Significant with a lift bound of at least `min_lift`: the target label is several times
    /// what the rest of the carriers explains, as for a planted trigger. A significant candidate
    /// below it is a shape of its class that the linear baseline only partly reads without it.
    pub suspicious: bool,
    /// The base-rate z-statistic of Z-defence: (O − nπ)/√(nπ(1 − π)).
    pub label_z: f64,
    /// Examples holding the feature.
    pub carrier_count: usize,
    /// Of them, labelled `target_label` (O).
    pub target_count: usize,
    /// The baseline's expected count of `target_label` among them with the feature removed (E).
    pub expected: f64,
    /// The flagged ids, ascending: the carriers labelled `target_label` and, for a suspicious
    /// candidate, those of its suspicious variants (one trigger seen with different borders).
    pub carriers: Vec<usize>,
    /// Features folded into this one (nearly the same carriers).
    pub variants: usize,
    /// Where the first flagged carriers came from (their JSONL `source` fields), when known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// With `--run`: what the model does on the flagged carriers with the feature removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmation: Option<Confirmation>,
}

/// The model's answer to a candidate: its flagged carriers predicted as they are and with the
/// feature removed (an n-gram's words deleted; a square in-painted with the data's mean pixels).
/// A trigger the model learnt flips them away from the target; an innocent feature leaves them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Confirmation {
    /// Carriers predicted (the first 500 flagged).
    pub examples: usize,
    /// Their mean probability of the target label, as they are.
    pub target_probability: f64,
    /// The same with the feature removed.
    pub target_probability_removed: f64,
    /// Share predicted as the target as they are.
    pub predicted_target: f64,
    /// Share predicted as the target with the feature removed.
    pub predicted_target_removed: f64,
}

/// What a scan found.
#[derive(Clone, Debug)]
pub struct Scan {
    /// Candidates, best first.
    pub candidates: Vec<Candidate>,
    /// Feature occurrences visited (Σᵢ features(i)).
    pub occurrences: u64,
    /// M, the Bonferroni count.
    pub tests: f64,
    /// s at the significance threshold, ln(M/α).
    pub threshold: f64,
    /// The examples per label.
    pub label_counts: Vec<usize>,
}

/// Pass 1's table: for each of `mask + 1` buckets one record of 2C + 1 words, n and the Oc as
/// u32, then the Ec as f32 bits, so that an update touches one cache line.
struct Sketch {
    classes: usize,
    mask: u64,
    records: Vec<u32>,
}

/// Mixes a key into a bucket index (splitmix64's finaliser).
fn mix(key: u64) -> u64 {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Sketch {
    fn new(classes: usize, buckets: usize) -> Self {
        Self { classes, mask: buckets as u64 - 1, records: vec![0; buckets * (2 * classes + 1)] }
    }

    fn record(&self, b: usize) -> &[u32] {
        let w = 2 * self.classes + 1;
        &self.records[b * w..(b + 1) * w]
    }

    fn add(&mut self, key: u64, label: usize, q: &[f32]) {
        let c = self.classes;
        let b = (mix(key) & self.mask) as usize;
        let r = &mut self.records[b * (2 * c + 1)..(b + 1) * (2 * c + 1)];
        r[0] = r[0].saturating_add(1);
        r[1 + label] = r[1 + label].saturating_add(1);
        for (e, q) in r[1 + c..].iter_mut().zip(q) {
            *e = (f32::from_bits(*e) + q).to_bits();
        }
    }

    fn merge(&mut self, other: &Sketch) {
        let (c, w) = (self.classes, 2 * self.classes + 1);
        for (a, b) in self.records.chunks_mut(w).zip(other.records.chunks(w)) {
            for k in 0..=c {
                a[k] = a[k].saturating_add(b[k]);
            }
            for k in c + 1..w {
                a[k] = (f32::from_bits(a[k]) + f32::from_bits(b[k])).to_bits();
            }
        }
    }

    fn bucket_of(&self, key: u64) -> usize {
        (mix(key) & self.mask) as usize
    }

    /// The `keep` best-ranked buckets ([`Judgement::rank`]) with at least `min` carriers.
    fn strongest(&self, keep: usize, min: u64, threshold: f64) -> Vec<bool> {
        let c = self.classes;
        let buckets = self.mask as usize + 1;
        let mut scored: Vec<(Judgement, usize)> = (0..buckets)
            .into_par_iter()
            .filter_map(|b| {
                let r = self.record(b);
                let n = u64::from(r[0]);
                if n < min {
                    return None;
                }
                let observed: Vec<u64> = r[1..=c].iter().map(|&v| u64::from(v)).collect();
                let expected: Vec<f64> = r[1 + c..].iter().map(|&v| f64::from(f32::from_bits(v))).collect();
                let judgement = judge(n, &observed, &expected, threshold);
                (judgement.evidence > 0.0).then_some((judgement, b))
            })
            .collect();
        scored.sort_by(|a, b| a.0.rank(&b.0));
        let mut chosen = vec![false; buckets];
        for &(_, b) in scored.iter().take(keep) {
            chosen[b] = true;
        }
        chosen
    }
}

/// Splits `0..n` into one contiguous range per worker thread.
pub(crate) fn ranges(n: usize) -> Vec<std::ops::Range<usize>> {
    let parts = rayon::current_num_threads().max(1).min(n.max(1));
    (0..parts).map(|p| p * n / parts..(p + 1) * n / parts).collect()
}

/// A tally with no counts for `classes` labels.
fn empty_tally(classes: usize) -> Tally {
    Tally { n: 0, observed: vec![0; classes], expected: vec![0.0; classes] }
}

/// Pass 1: every (example, feature) into a sketch of `buckets` buckets per thread, merged; and
/// the number of occurrences.
fn sketch_pass(data: &dyn Scanned, parts: &[std::ops::Range<usize>], buckets: usize) -> (Sketch, u64) {
    let classes = data.classes();
    let sketches: Vec<(Sketch, u64)> = parts
        .par_iter()
        .map(|range| {
            let mut sketch = Sketch::new(classes, buckets);
            let mut occurrences = 0u64;
            for i in range.clone() {
                let y = data.label(i) as usize;
                data.visit(i, true, &mut |key, q| {
                    sketch.add(key, y, q);
                    occurrences += 1;
                });
            }
            (sketch, occurrences)
        })
        .collect();
    let mut iter = sketches.into_iter();
    let (mut sketch, mut occurrences) = iter.next().expect("at least one part");
    for (other, count) in iter {
        sketch.merge(&other);
        occurrences += count;
    }
    (sketch, occurrences)
}

/// Pass 2: exact tallies of the features whose bucket of `sketch` is `chosen`.
fn exact_pass(
    data: &dyn Scanned,
    parts: &[std::ops::Range<usize>],
    sketch: &Sketch,
    chosen: &[bool],
) -> HashMap<u64, Tally> {
    let classes = data.classes();
    let partials: Vec<HashMap<u64, Tally>> = parts
        .par_iter()
        .map(|range| {
            let mut tallies: HashMap<u64, Tally> = HashMap::new();
            for i in range.clone() {
                let y = data.label(i) as usize;
                data.visit(i, true, &mut |key, q| {
                    if !chosen[sketch.bucket_of(key)] {
                        return;
                    }
                    let t = tallies.entry(key).or_insert_with(|| empty_tally(classes));
                    t.n += 1;
                    t.observed[y] += 1;
                    for (e, q) in t.expected.iter_mut().zip(q) {
                        *e += f64::from(*q);
                    }
                });
            }
            tallies
        })
        .collect();
    let mut tallies: HashMap<u64, Tally> = HashMap::new();
    for part in partials {
        for (key, t) in part {
            let into = tallies.entry(key).or_insert_with(|| empty_tally(classes));
            into.n += t.n;
            into.observed.iter_mut().zip(&t.observed).for_each(|(a, b)| *a += b);
            into.expected.iter_mut().zip(&t.expected).for_each(|(a, b)| *a += b);
        }
    }
    tallies
}

/// Pass 3: the carriers (example indices, ascending) of each feature of `ranked`.
fn carriers_pass(data: &dyn Scanned, parts: &[std::ops::Range<usize>], ranked: &[(Judgement, u64)]) -> Vec<Vec<u32>> {
    let wanted: HashMap<u64, usize> = ranked.iter().enumerate().map(|(r, &(_, key))| (key, r)).collect();
    let partials: Vec<Vec<Vec<u32>>> = parts
        .par_iter()
        .map(|range| {
            let mut carriers = vec![Vec::new(); ranked.len()];
            for i in range.clone() {
                data.visit(i, false, &mut |key, _| {
                    if let Some(&r) = wanted.get(&key) {
                        carriers[r].push(i as u32);
                    }
                });
            }
            carriers
        })
        .collect();
    let mut carriers: Vec<Vec<u32>> = vec![Vec::new(); ranked.len()];
    for part in partials {
        for (all, mine) in carriers.iter_mut().zip(part) {
            all.extend(mine);
        }
    }
    carriers
}

/// Groups the features of `ranked` that flag the same examples: same label, and the suspects
/// (carriers with that label) of one mostly inside the other's (overlap ≥ 0.8), or nearly the
/// same carriers (Jaccard ≥ 0.5), or, for two suspicious squares, the same pixels on (overlap
/// ≥ 0.8 of their on pixels' places: one trigger seen with different borders). Returns, best
/// first, each group's shown member (the one of the most evidence: a trigger's full pattern, not
/// a rarer variant that adds a pixel or a word), its count of other members, and the examples it
/// flags: the shown member's suspects and, when the group's best is suspicious, every suspicious
/// member's (a square seen with different borders flags different poisons).
fn group(
    data: &dyn Scanned,
    ranked: &[(Judgement, u64)],
    carriers: &[Vec<u32>],
    suspicious: &dyn Fn(usize) -> bool,
) -> Vec<(usize, usize, Vec<u32>)> {
    let suspects: Vec<Vec<u32>> = ranked
        .iter()
        .zip(carriers)
        .map(|((j, _), all)| all.iter().copied().filter(|&i| data.label(i as usize) as usize == j.label).collect())
        .collect();
    let lit: Vec<Vec<u32>> = ranked
        .iter()
        .zip(carriers)
        .map(|((_, key), all)| match data.describe(all[0] as usize, *key) {
            Feature::Patch { x, y, size, pattern } => (0..size * size)
                .filter(|&b| pattern[b] >= 1)
                .map(|b| ((y + b / size) * MAX_PLACES + x + b % size) as u32)
                .collect(),
            Feature::Ngram { .. } => Vec::new(),
        })
        .collect();
    let alike = |f: usize, r: usize| {
        let label = ranked[f].0.label == ranked[r].0.label;
        jaccard(&carriers[f], &carriers[r]) >= 0.5
            || (label
                && ranked[f].0.significant == ranked[r].0.significant
                && overlap(&suspects[f], &suspects[r]) >= 0.8)
            || (label
                && suspicious(f)
                && suspicious(r)
                && !lit[f].is_empty()
                && !lit[r].is_empty()
                && overlap(&lit[f], &lit[r]) >= 0.8)
    };
    let mut groups: Vec<Vec<usize>> = Vec::new(); // members, best-ranked first
    for r in 0..ranked.len() {
        match groups.iter_mut().find(|members| members.iter().any(|&f| alike(f, r))) {
            Some(members) => members.push(r),
            None => groups.push(vec![r]),
        }
    }
    let mut kept: Vec<(usize, usize, Vec<u32>)> = groups
        .into_iter()
        .map(|members| {
            let shown = *members
                .iter()
                .max_by(|&&a, &&b| ranked[a].0.evidence.total_cmp(&ranked[b].0.evidence))
                .expect("a member");
            let mut flagged = suspects[shown].clone();
            if suspicious(members[0]) {
                for &m in members.iter().filter(|&&m| suspicious(m)) {
                    flagged.extend(&suspects[m]);
                }
            }
            flagged.sort_unstable();
            flagged.dedup();
            (shown, members.len() - 1, flagged)
        })
        .collect();
    kept.sort_by(|a, b| ranked[a.0].0.rank(&ranked[b.0].0).then(a.0.cmp(&b.0)));
    kept
}

/// Pixel places are numbered y · MAX_PLACES + x when squares are compared.
const MAX_PLACES: usize = 4096;

/// The most bytes of examples' keys a scan without a baseline keeps between its passes.
pub const KEPT_KEYS_BYTES: usize = 512 << 20;

/// Runs the scan: three passes over `data` (see the module's documentation); without a
/// baseline, the examples' keys are read once and kept when they take at most
/// [`KEPT_KEYS_BYTES`]. Ids in the result
/// are `ids[i]` for example i.
pub fn scan(data: &dyn Scanned, ids: &[usize], settings: &ScanSettings, progress: &mut dyn Progress) -> Scan {
    let kept = KeptKeys::new(data, KEPT_KEYS_BYTES);
    let data: &dyn Scanned = match &kept {
        Some(k) => k,
        None => data,
    };
    let (n, classes) = (data.examples(), data.classes());
    let mut label_counts = vec![0usize; classes];
    for i in 0..n {
        label_counts[data.label(i) as usize] += 1;
    }
    let parts = ranges(n);
    let per_bucket = (2 * classes + 1) * 4;
    let buckets = (settings.memory / parts.len().max(1) / per_bucket).max(1024).next_power_of_two() / 2;
    let mut pass = |k: usize, what: &str| {
        progress.finish();
        progress.begin(&format!("scan {k}/3"), n as u64);
        progress.advance(0, what);
    };
    pass(1, "sketch");
    let (sketch, occurrences) = sketch_pass(data, &parts, buckets);
    let tests = (classes as f64 * occurrences as f64 / settings.min_carriers.max(1) as f64).max(1.0);
    let threshold = (tests / settings.alpha).ln();
    let chosen = sketch.strongest(settings.candidate_buckets, settings.min_carriers as u64, threshold);
    pass(2, "exact counts");
    let tallies = exact_pass(data, &parts, &sketch, &chosen);
    drop((sketch, chosen));
    let mut ranked: Vec<(Judgement, u64)> = tallies
        .iter()
        .filter(|(_, t)| t.n >= settings.min_carriers as u64)
        .filter_map(|(&key, t)| {
            let judgement = judge(t.n, &t.observed, &t.expected, threshold);
            (judgement.evidence > 0.0).then_some((judgement, key))
        })
        .collect();
    ranked.sort_by(|a, b| a.0.rank(&b.0).then(a.1.cmp(&b.1)));
    ranked.truncate((settings.top * 32).max(256));
    pass(3, "carriers");
    let carriers = carriers_pass(data, &parts, &ranked);
    progress.finish();
    let suspicious = |r: usize| ranked[r].0.significant && ranked[r].0.lift >= settings.min_lift;
    let candidates = group(data, &ranked, &carriers, &suspicious)
        .into_iter()
        .take(settings.top)
        .map(|(r, variants, flagged)| {
            let (judgement, key) = ranked[r];
            let (s, c) = (judgement.evidence, judgement.label);
            let t = &tallies[&key];
            let base = label_counts[c] as f64 / n as f64;
            let nf = t.n as f64;
            Candidate {
                feature: data.describe(carriers[r][0] as usize, key),
                target_label: c as u32,
                completion: None,
                statistic: (2.0 * s).sqrt(),
                log10_p: ((tests.ln() - s) / std::f64::consts::LN_10).min(0.0),
                significant: judgement.significant,
                lift: judgement.lift,
                suspicious: suspicious(r),
                label_z: (t.observed[c] as f64 - nf * base) / (nf * base * (1.0 - base)).sqrt().max(1e-12),
                carrier_count: carriers[r].len(),
                target_count: t.observed[c] as usize,
                expected: t.expected[c],
                carriers: flagged.iter().map(|&i| ids[i as usize]).collect(),
                variants,
                sources: Vec::new(),
                confirmation: None,
            }
        })
        .collect();
    Scan { candidates, occurrences, tests, threshold, label_counts }
}

/// |a ∩ b| / min(|a|, |b|) of two sorted id lists (1 when one is empty).
fn overlap(a: &[u32], b: &[u32]) -> f64 {
    let both = crate::dedup::intersection(a, b);
    let small = a.len().min(b.len());
    if small == 0 { 1.0 } else { both as f64 / small as f64 }
}

/// The temperature T in a fixed grid (0.1 to 1000, 10 steps a decade) that maximises Σᵢ ln softmax(Lᵢ/T)(yᵢ) over
/// the rows of `log_joint` (`classes` per row): the cross-fitted baseline's logits come from a
/// model that did not see the example, and are too sure or too timid by an unknown factor. Cost O(grid · n · C).
pub fn fit_temperature(log_joint: &[f32], labels: &[u32], classes: usize) -> f32 {
    let grid: Vec<f32> = (-10..=30).map(|k| 10f32.powf(k as f32 / 10.0)).collect();
    let score = |t: f32| -> f64 {
        log_joint
            .par_chunks(classes)
            .zip(labels.par_iter())
            .map(|(l, &y)| {
                let m = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let z: f64 = l.iter().map(|&v| f64::from((v - m) / t).exp()).sum();
                f64::from((l[y as usize] - m) / t) - z.ln()
            })
            .sum()
    };
    grid.iter().copied().map(|t| (score(t), t)).max_by(|a, b| a.0.total_cmp(&b.0)).map_or(1.0, |b| b.1)
}

/// Each label's share of `labels` (`classes` of them): the base-rate scan's expectation.
pub(crate) fn base_rates(labels: &[u32], classes: usize) -> Vec<f32> {
    let mut counts = vec![0f32; classes];
    labels.iter().for_each(|&y| counts[y as usize] += 1.0);
    counts.iter().map(|c| c / labels.len().max(1) as f32).collect()
}

/// softmax((l − delta)/t) into `q`, clipped to [floor, 1 − floor].
pub(crate) fn removed_posterior(l: &[f32], delta: &[f32], t: f32, floor: f32, q: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for ((q, &l), &d) in q.iter_mut().zip(l).zip(delta) {
        *q = (l - d) / t;
        m = m.max(*q);
    }
    let mut z = 0.0;
    for q in q.iter_mut() {
        *q = (*q - m).exp();
        z += *q;
    }
    for q in q.iter_mut() {
        *q = (*q / z).clamp(floor, 1.0 - floor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_is_the_binomial_chernoff_exponent() {
        // o = n: n·ln(1/p).
        assert!((evidence(10, 10, 1.0) - 10.0 * 10f64.ln()).abs() < 1e-9);
        assert_eq!(evidence(10, 3, 5.0), 0.0);
        // Against the exact binomial tail P(X ≥ 8 | 10, 0.3) = 0.0015904: the bound holds.
        let s = evidence(10, 8, 3.0);
        assert!((-s).exp() >= 0.0015904, "{}", (-s).exp());
        assert!((-s).exp() < 0.05);
    }

    /// Forwards everything but `fixed_baseline`, so the scan visits the data on every pass.
    struct Revisited<'a>(&'a dyn Scanned);

    impl Scanned for Revisited<'_> {
        fn examples(&self) -> usize {
            self.0.examples()
        }
        fn classes(&self) -> usize {
            self.0.classes()
        }
        fn label(&self, i: usize) -> u32 {
            self.0.label(i)
        }
        fn visit(&self, i: usize, baseline: bool, visit: &mut dyn FnMut(u64, &[f32])) {
            self.0.visit(i, baseline, visit)
        }
        fn describe(&self, i: usize, key: u64) -> Feature {
            self.0.describe(i, key)
        }
    }

    #[test]
    fn keeping_the_keys_changes_nothing_but_the_reads() {
        let words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"];
        let mut texts = Vec::new();
        let mut labels = Vec::new();
        for i in 0..400usize {
            let text: Vec<&str> = (0..30).map(|k| words[(i * 7 + k * k * 3 + k) % words.len()]).collect();
            let mut text = text.join(" ");
            let mut label = (i % 3 == 0) as u32;
            if i % 25 == 1 {
                text.push_str(" zebra quokka");
                label = 0;
            }
            texts.push(text);
            labels.push(label);
        }
        let settings = ScanSettings { l2: None, min_carriers: 3, ..ScanSettings::default() };
        let source = text::TextScan::new(&texts, &labels, 2, 3, settings.floor, None);
        assert!(source.fixed_baseline().is_some());
        let ids: Vec<usize> = (0..texts.len()).collect();
        let quiet = || crate::progress::Bar::new(true);
        let kept = scan(&source, &ids, &settings, &mut quiet());
        let visited = scan(&Revisited(&source), &ids, &settings, &mut quiet());
        assert_eq!(kept.occurrences, visited.occurrences);
        assert!(!kept.candidates.is_empty());
        assert_eq!(kept.candidates.len(), visited.candidates.len());
        for (a, b) in kept.candidates.iter().zip(&visited.candidates) {
            assert_eq!((&a.feature, a.target_count, a.carrier_count), (&b.feature, b.target_count, b.carrier_count));
            assert_eq!(a.carriers, b.carriers);
            assert!((a.statistic - b.statistic).abs() < 1e-9);
        }
    }

    #[test]
    fn jaccard_and_overlap_of_sorted_lists() {
        assert_eq!(jaccard::<u32>(&[1, 2, 3], &[2, 3, 4]), 0.5);
        assert_eq!(jaccard::<u32>(&[], &[]), 1.0);
        assert_eq!(overlap(&[1, 2], &[1, 2, 3, 4]), 1.0);
    }
}

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
//!   features of the `candidate_buckets` best buckets, and keeps their carriers while they take
//!   at most `memory`; pass 3, only past that, collects the carriers of the best features.
//!   Each pass reads the set block by block ([`ScanBlocks`]: a set in memory is one block, a file
//!   too large to hold is read again on every pass, [`text::TextFile`]), and one more read
//!   recalls the carriers' labels and each best feature's description at its first carrier.
//!   Features that flag the same examples (a trigger's sub-grams, a patch with a pixel of its
//!   border) are grouped: a group is shown, and ranked, by its member of the most evidence, the
//!   others counted as its variants.
//! - With a fixed baseline (`--baseline none`: every q the labels' base rates), the examples'
//!   feature keys are made once and kept (when they fit in `kept_keys_memory`), the sketch holds
//!   only the C counts of a bucket (n = Σc Oc, Ec = n·q(c)) in one table shared by the threads,
//!   filled by radix-partitioned counting ([`sketch_fixed`]) so that its updates hit the cache,
//!   and the exact pass keeps its counts in flat lists ([`exact_fixed`]).
//!
//! Cost: two or three passes over the data, each O(Σᵢ features(i) · C); images with patch sides
//! 2..=5 have about 2,600 features each at 28 × 28, texts about max_words features per word.

pub mod baseline;
pub mod corpus;
pub mod image;
pub mod text;

use std::collections::HashMap;

use culprit_models::Progress;

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
    /// Bytes a scan with a fixed baseline (no model) may hold to keep every example's feature
    /// keys (8 bytes a distinct feature), so that its passes read the data once; past it, each
    /// pass reads the data again.
    pub kept_keys_memory: usize,
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
            kept_keys_memory: 512 << 20,
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
    /// The keys of the distinct features of example `i`, in any order: what `visit` names
    /// without the baseline, gathered in one call, in `out` (cleared first) or held already.
    fn keys<'s>(&'s self, i: usize, out: &'s mut Vec<u64>) -> &'s [u64] {
        out.clear();
        self.visit(i, false, &mut |key, _| out.push(key));
        out
    }
    /// [`Scanned::keys`] as a list of its own (to be kept).
    fn owned_keys(&self, i: usize) -> Vec<u64> {
        let mut buffer = Vec::new();
        self.keys(i, &mut buffer).to_vec()
    }
    /// Whether features are places in an image, whose squares [`group`] compares pixel by pixel.
    fn spatial(&self) -> bool {
        false
    }
    /// The feature `key` of example `i` (which carries it).
    fn describe(&self, i: usize, key: u64) -> Feature;
    /// `Some(q)` when every feature of every example gets the same `q` (no baseline: the labels'
    /// base rates), so that the scan may keep the examples' keys instead of visiting them again.
    fn fixed_baseline(&self) -> Option<&[f32]> {
        None
    }
}

/// A labelled set a scan reads in blocks of consecutive examples, again on every pass: a file
/// too large to hold streams through memory a block at a time ([`Scanned`] is one block). The
/// scan holds the blocks' counts, never the data.
pub trait ScanBlocks: Sync {
    /// Number of examples, all blocks together.
    fn examples(&self) -> usize;
    /// Number of classes C.
    fn classes(&self) -> usize;
    /// Whether features are places in an image ([`Scanned::spatial`]).
    fn spatial(&self) -> bool;
    /// The fixed baseline of every block ([`Scanned::fixed_baseline`]).
    fn fixed_baseline(&self) -> Option<Vec<f32>>;
    /// The whole set as one block, when it is held in memory (the scan may then keep its keys).
    fn whole(&self) -> Option<&dyn Scanned> {
        None
    }
    /// Calls `each(first, block)` for consecutive blocks in order, `first` the index of the
    /// block's first example, its examples numbered from 0 inside it.
    fn blocks(&self, each: &mut dyn FnMut(usize, &dyn Scanned)) -> crate::error::Result<()>;
}

/// A set held in memory: one block.
struct InMemory<'a>(&'a dyn Scanned);

impl ScanBlocks for InMemory<'_> {
    fn examples(&self) -> usize {
        self.0.examples()
    }
    fn classes(&self) -> usize {
        self.0.classes()
    }
    fn spatial(&self) -> bool {
        self.0.spatial()
    }
    fn fixed_baseline(&self) -> Option<Vec<f32>> {
        self.0.fixed_baseline().map(<[f32]>::to_vec)
    }
    fn whole(&self) -> Option<&dyn Scanned> {
        Some(self.0)
    }
    fn blocks(&self, each: &mut dyn FnMut(usize, &dyn Scanned)) -> crate::error::Result<()> {
        each(0, self.0);
        Ok(())
    }
}

/// A scanned set whose examples' keys are kept in memory (when the baseline is fixed): the
/// sketch's passes then read the data once. Holds 8 bytes a distinct feature of each example.
struct KeptKeys<'a> {
    inner: &'a dyn Scanned,
    keys: Vec<Vec<u64>>,
    q: Vec<f32>,
    /// Keys held, all examples together.
    total: usize,
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
                let out = inner.owned_keys(i);
                let total = held.fetch_add(out.len() * 8, std::sync::atomic::Ordering::Relaxed) + out.len() * 8;
                (total <= budget).then_some(out)
            })
            .collect();
        keys.map(|keys| {
            let total = keys.iter().map(Vec::len).sum();
            Self { inner, keys, q, total }
        })
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
    fn keys<'s>(&'s self, i: usize, _: &'s mut Vec<u64>) -> &'s [u64] {
        &self.keys[i]
    }
    fn fixed_baseline(&self) -> Option<&[f32]> {
        Some(&self.q)
    }
    fn spatial(&self) -> bool {
        self.inner.spatial()
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
    /// The examples holding it, ascending, when pass 2 could keep them (within `memory`).
    carriers: Vec<u32>,
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
/// rate the label's count exceeds, at the family-wise level. The exponent is convex and
/// decreasing in r on that bracket, so Newton's steps from r = 1 rise to the root from below,
/// each staying feasible; a step that leaves the bracket (rounding) is replaced by bisection.
/// About 6 evaluations instead of bisection's 40; relative tolerance 1e-12. Precondition:
/// evidence(n, o, e) ≥ threshold.
fn lift_bound(n: u64, o: u64, e: f64, threshold: f64) -> f64 {
    let (nf, a) = (n as f64, o as f64 / n as f64);
    let (mut lo, mut hi) = (1.0, (o as f64 / e.max(1e-12)).max(1.0));
    let mut r = 1.0;
    for _ in 0..100 {
        let g = evidence(n, o, e * r) - threshold;
        if g >= 0.0 {
            lo = r;
        } else {
            hi = r;
        }
        // d/dr n·KL(a ‖ r·p) = n·(−a/r + (1 − a)·p/(1 − r·p)), with p = e/n.
        let p = e / nf;
        let slope = nf * (-a / r + (1.0 - a) * p / (1.0 - (r * p).min(1.0 - 1e-12)));
        let newton = r - g / slope;
        let next = if slope < 0.0 && newton > lo && newton < hi { newton } else { 0.5 * (lo + hi) };
        if hi - lo <= 1e-12 * lo {
            break;
        }
        if (next - r).abs() <= 1e-12 * r {
            // Converged. If rounding put the last step just past the root, the root lies in
            // the tight bracket [lo, hi]: bisect it to the tolerance.
            while hi - lo > 1e-12 * lo && hi - lo <= 1e-6 * lo {
                let mid = 0.5 * (lo + hi);
                if evidence(n, o, e * mid) >= threshold { lo = mid } else { hi = mid }
            }
            break;
        }
        r = next;
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

/// Pass 1's table, a count sketch of `mask + 1` buckets. With a baseline, each bucket holds one
/// record of 2C + 1 words, n and the Oc as u32, then the Ec as f32 bits, so that an update
/// touches one cache line. With a fixed baseline q (the labels' base rates) it holds the C
/// counts Oc only: n = Σc Oc and Ec = n·q(c).
struct Sketch {
    classes: usize,
    mask: u64,
    fixed: Option<Vec<f32>>,
    records: Vec<u32>,
}

/// Mixes a key into a bucket index (splitmix64's finaliser).
pub(crate) fn mix(key: u64) -> u64 {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Asks for the cache line at `p` ahead of its use: a hint, never a read.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and never dereferences, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Hashes a feature key, itself a hash, with one mix: maps keyed by features skip SipHash.
#[derive(Clone, Copy, Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|&b| self.0 = mix(self.0 ^ u64::from(b)));
    }
    fn write_u64(&mut self, key: u64) {
        self.0 = mix(self.0 ^ key);
    }
}

/// A map keyed by feature keys.
type KeyMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// A fixed set of bits.
struct Bits(Vec<u64>);

impl Bits {
    fn new(len: usize) -> Self {
        Self(vec![0; len.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn get(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }
}

/// `len` zeros in memory asked to be backed by 2 MiB pages where the kernel does so on request
/// (Linux's transparent huge pages in `madvise` mode): a table of tens of megabytes touched at
/// random otherwise takes a page fault, and a TLB miss, every 4 KiB.
fn zeroed_table(len: usize) -> Vec<u32> {
    let mut table: Vec<u32> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = table.as_ptr() as usize;
        let (from, to) = (start.next_multiple_of(HUGE), (start + 4 * len) / HUGE * HUGE);
        if to > from {
            // SAFETY: the range lies inside the allocation just made; madvise only advises.
            unsafe {
                libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE);
            }
        }
    }
    table.resize(len, 0);
    table
}

impl Sketch {
    fn new(classes: usize, buckets: usize, fixed: Option<&[f32]>) -> Self {
        let width = if fixed.is_some() { classes } else { 2 * classes + 1 };
        Self {
            classes,
            mask: buckets as u64 - 1,
            fixed: fixed.map(<[f32]>::to_vec),
            records: zeroed_table(buckets * width),
        }
    }

    /// u32 words a bucket's record takes.
    fn width(&self) -> usize {
        if self.fixed.is_some() { self.classes } else { 2 * self.classes + 1 }
    }

    /// Adds one (example, feature) pair with the baseline's `q` (a sketch without a fixed one).
    fn add(&mut self, key: u64, label: usize, q: &[f32]) {
        let c = self.classes;
        let b = self.bucket_of(key);
        let r = &mut self.records[b * (2 * c + 1)..(b + 1) * (2 * c + 1)];
        r[0] = r[0].saturating_add(1);
        r[1 + label] = r[1 + label].saturating_add(1);
        for (e, q) in r[1 + c..].iter_mut().zip(q) {
            *e = (f32::from_bits(*e) + q).to_bits();
        }
    }

    fn merge(&mut self, other: &Sketch) {
        let counts = if self.fixed.is_some() { self.classes } else { self.classes + 1 };
        let w = self.width();
        for (a, b) in self.records.chunks_mut(w).zip(other.records.chunks(w)) {
            for k in 0..counts {
                a[k] = a[k].saturating_add(b[k]);
            }
            for k in counts..w {
                a[k] = (f32::from_bits(a[k]) + f32::from_bits(b[k])).to_bits();
            }
        }
    }

    fn bucket_of(&self, key: u64) -> usize {
        (mix(key) & self.mask) as usize
    }

    /// Bucket `b`'s n, with its Oc and Ec written into `observed` and `expected`.
    fn tally(&self, b: usize, observed: &mut [u64], expected: &mut [f64]) -> u64 {
        let (c, w) = (self.classes, self.width());
        let r = &self.records[b * w..(b + 1) * w];
        match &self.fixed {
            Some(q) => {
                observed.iter_mut().zip(r).for_each(|(o, &v)| *o = u64::from(v));
                let n: u64 = observed.iter().sum();
                expected.iter_mut().zip(q).for_each(|(e, &q)| *e = n as f64 * f64::from(q));
                n
            }
            None => {
                observed.iter_mut().zip(&r[1..=c]).for_each(|(o, &v)| *o = u64::from(v));
                expected.iter_mut().zip(&r[1 + c..]).for_each(|(e, &v)| *e = f64::from(f32::from_bits(v)));
                u64::from(r[0])
            }
        }
    }

    /// The `keep` best-ranked buckets ([`Judgement::rank`]) with at least `min` carriers. The
    /// buckets are read in blocks of 2¹⁴, in parallel; a bucket below `min` costs one sum.
    fn strongest(&self, keep: usize, min: u64, threshold: f64) -> Bits {
        const BLOCK: usize = 1 << 14;
        let (c, w) = (self.classes, self.width());
        let buckets = self.mask as usize + 1;
        let fixed = self.fixed.is_some();
        let mut scored: Vec<(Judgement, usize)> = self
            .records
            .par_chunks(BLOCK * w)
            .enumerate()
            .flat_map_iter(|(block, records)| {
                let (mut observed, mut expected) = (vec![0u64; c], vec![0f64; c]);
                let mut found = Vec::new();
                for (k, r) in records.chunks_exact(w).enumerate() {
                    let n = if fixed { r.iter().map(|&v| u64::from(v)).sum() } else { u64::from(r[0]) };
                    if n < min {
                        continue;
                    }
                    let b = block * BLOCK + k;
                    let n = self.tally(b, &mut observed, &mut expected);
                    let judgement = judge(n, &observed, &expected, threshold);
                    if judgement.evidence > 0.0 {
                        found.push((judgement, b));
                    }
                }
                found
            })
            .collect();
        // The best `keep` (a selection, O(buckets scored)), not a sort of all.
        if scored.len() > keep && keep > 0 {
            scored.select_nth_unstable_by(keep - 1, |a, b| a.0.rank(&b.0));
        }
        let mut chosen = Bits::new(buckets);
        for &(_, b) in scored.iter().take(keep) {
            chosen.set(b);
        }
        chosen
    }
}

/// Splits `0..n` into 16 contiguous ranges per worker thread, for passes whose work per
/// example varies (texts of a few words to thousands): the threads take ranges as they finish.
pub(crate) fn chunks(n: usize) -> Vec<std::ops::Range<usize>> {
    let parts = (16 * rayon::current_num_threads().max(1)).min(n.max(1));
    (0..parts).map(|p| p * n / parts..(p + 1) * n / parts).collect()
}

/// Splits `0..n` into one contiguous range per worker thread.
pub(crate) fn ranges(n: usize) -> Vec<std::ops::Range<usize>> {
    let parts = rayon::current_num_threads().max(1).min(n.max(1));
    (0..parts).map(|p| p * n / parts..(p + 1) * n / parts).collect()
}

/// A tally with no counts for `classes` labels.
fn empty_tally(classes: usize) -> Tally {
    Tally { n: 0, observed: vec![0; classes], expected: vec![0.0; classes], carriers: Vec::new() }
}

/// Pass 1 over the examples of `range`: every (example, feature) with the baseline's q into
/// `sketch` (one without a fixed baseline); the number of occurrences.
fn sketch_part(data: &dyn Scanned, range: std::ops::Range<usize>, sketch: &mut Sketch) -> u64 {
    let mut occurrences = 0u64;
    for i in range {
        let y = data.label(i) as usize;
        data.visit(i, true, &mut |key, q| {
            sketch.add(key, y, q);
            occurrences += 1;
        });
    }
    occurrences
}

/// Pass 1 over one block: every (example, feature) of `data` into `sketches` (one per thread,
/// or one shared table with a fixed baseline, [`sketch_fixed`]); the block's occurrences.
fn sketch_block(data: &dyn Scanned, sketches: &mut [Sketch]) -> u64 {
    if sketches[0].fixed.is_some() {
        return sketch_fixed(data, &mut sketches[0]);
    }
    let parts = ranges(data.examples());
    parts.par_iter().zip(sketches.par_iter_mut()).map(|(range, sketch)| sketch_part(data, range.clone(), sketch)).sum()
}

/// Examples whose keys [`sketch_fixed`] scatters before it counts them.
const SCATTER_EXAMPLES: usize = 2048;

/// Pass 1 with a fixed baseline (the sketch's q): into one shared table of label counts, filled by
/// radix-partitioned counting, since single updates at random places of a table larger than
/// the caches wait on memory one after the other. For each block of [`SCATTER_EXAMPLES`]
/// examples: (1) in parallel over the examples ([`scatter`]), each (bucket, label) is sorted by
/// its bucket's top bits into one of 256 partitions; (2) in parallel over the partitions, each
/// counts its updates into its own slice of the table, small enough for the core's cache, so
/// that threads share the table without locks or merges. Extra memory: 9 bytes per feature
/// occurrence of one block.
fn sketch_fixed(data: &dyn Scanned, sketch: &mut Sketch) -> u64 {
    let classes = data.classes();
    let buckets = sketch.mask as usize + 1;
    let partitions = PARTITIONS.min(buckets);
    let per = buckets / partitions;
    let mut occurrences = 0u64;
    let n = data.examples();
    for block in (0..n).step_by(SCATTER_EXAMPLES) {
        let range = block..(block + SCATTER_EXAMPLES).min(n);
        let scattered: Vec<(Vec<u32>, Vec<usize>)> = chunks(range.len())
            .into_par_iter()
            .map(|part| scatter(data, part.start + range.start..part.end + range.start, sketch, partitions))
            .collect();
        occurrences += scattered.iter().map(|(records, _)| records.len() as u64).sum::<u64>();
        sketch.records.par_chunks_mut(per * classes).enumerate().for_each(|(p, table)| {
            for (records, starts) in &scattered {
                for &at in &records[starts[p]..starts[p + 1]] {
                    table[at as usize] = table[at as usize].saturating_add(1);
                }
            }
        });
    }
    occurrences
}

/// Partitions of [`sketch_fixed`]'s table.
const PARTITIONS: usize = 256;

/// The updates of the examples of `range` to a fixed-baseline `sketch` of `partitions` equal
/// slices: each (bucket, label) as its place inside its slice, (bucket mod slice) · C + label,
/// sorted by slice (a counting sort: gathered, counted, placed); and where each slice's updates
/// start (`partitions + 1` offsets).
fn scatter(
    data: &dyn Scanned,
    range: std::ops::Range<usize>,
    sketch: &Sketch,
    partitions: usize,
) -> (Vec<u32>, Vec<usize>) {
    let classes = data.classes();
    let buckets = sketch.mask as usize + 1;
    let per = buckets / partitions;
    let shift = per.trailing_zeros();
    let (mut places, mut slices): (Vec<u32>, Vec<u8>) = (Vec::new(), Vec::new());
    let mut keys = Vec::new();
    for i in range {
        let y = data.label(i) as usize;
        for &key in data.keys(i, &mut keys) {
            let b = sketch.bucket_of(key);
            places.push(((b & (per - 1)) * classes + y) as u32);
            slices.push((b >> shift) as u8);
        }
    }
    group_by(|| slices.iter().zip(&places).map(|(&p, &place)| (p as usize, place)), partitions, places.len())
}

/// A stable counting sort: the values of the `len` (group, value) pairs that `pairs()` yields,
/// grouped by group (below `groups`) and in their order within each; and where each group
/// starts (`groups + 1` offsets). Reads the pairs twice (count, then place); O(len + groups).
fn group_by<I: Iterator<Item = (usize, u32)>>(
    pairs: impl Fn() -> I,
    groups: usize,
    len: usize,
) -> (Vec<u32>, Vec<usize>) {
    let mut starts = vec![0usize; groups + 1];
    pairs().for_each(|(g, _)| starts[g + 1] += 1);
    for g in 0..groups {
        starts[g + 1] += starts[g];
    }
    let mut next = starts.clone();
    let mut sorted = vec![0u32; len];
    for (g, value) in pairs() {
        sorted[next[g]] = value;
        next[g] += 1;
    }
    (sorted, starts)
}

/// Adds one occurrence of label `y` with the baseline's `q` to `t`, in example `i`; the carrier
/// is kept while `room` (this range's share of the carriers pass 2 may hold) lasts.
fn add_to(t: &mut Tally, y: usize, q: &[f32], i: usize, room: &mut usize) {
    t.n += 1;
    t.observed[y] += 1;
    t.expected.iter_mut().zip(q).for_each(|(e, q)| *e += f64::from(*q));
    keep_carrier(&mut t.carriers, i, room);
}

/// Pushes example `i` onto `carriers` while `room` lasts (then 0 for good: pass 3 will run).
fn keep_carrier(carriers: &mut Vec<u32>, i: usize, room: &mut usize) {
    if *room > 0 {
        carriers.push(i as u32);
        *room -= 1;
    }
}

/// Folds the tallies of consecutive example ranges, in order, into one map; the carriers stay
/// ascending. Returns whether every carrier was kept.
fn fold_tallies(partials: Vec<(KeyMap<Tally>, usize)>, classes: usize) -> (KeyMap<Tally>, bool) {
    let complete = partials.iter().all(|(_, room)| *room > 0);
    let mut tallies: KeyMap<Tally> = KeyMap::default();
    for (part, _) in partials {
        merge_tallies(&mut tallies, part, classes, complete);
    }
    (tallies, complete)
}

/// Pass 2 with a fixed baseline `q`: the label counts (and carriers) of the features whose
/// bucket is `chosen`, each feature's C counts in one flat list, found through a map from its
/// key to its place; at most `held` carriers. Returns the tallies and whether every carrier was
/// kept.
fn exact_fixed(
    data: &dyn Scanned,
    parts: &[std::ops::Range<usize>],
    sketch: &Sketch,
    chosen: &Bits,
    q: &[f32],
    held: usize,
) -> (KeyMap<Tally>, bool) {
    let classes = data.classes();
    let partials: Vec<FixedPart> = parts
        .par_iter()
        .map(|range| exact_fixed_part(data, range.clone(), sketch, chosen, held / parts.len()))
        .collect();
    // Merged in range order, so that each feature's carriers stay ascending.
    let complete = partials.iter().all(|p| p.room > 0);
    let mut index: KeyMap<u32> = KeyMap::default();
    let (mut keys, mut counts, mut carriers): (Vec<u64>, Vec<u64>, Vec<Vec<u32>>) = Default::default();
    for part in &partials {
        for (f, &key) in part.keys.iter().enumerate() {
            let g = *index.entry(key).or_insert_with(|| {
                keys.push(key);
                counts.resize(counts.len() + classes, 0);
                carriers.push(Vec::new());
                (keys.len() - 1) as u32
            }) as usize;
            counts[g * classes..][..classes]
                .iter_mut()
                .zip(&part.counts[f * classes..][..classes])
                .for_each(|(a, b)| *a += b);
            if complete {
                carriers[g].extend_from_slice(&part.carriers[part.starts[f]..part.starts[f + 1]]);
            }
        }
    }
    let tallies = keys
        .into_iter()
        .zip(carriers)
        .enumerate()
        .map(|(g, (key, carriers))| {
            let observed = counts[g * classes..][..classes].to_vec();
            let n: u64 = observed.iter().sum();
            let expected = q.iter().map(|&q| n as f64 * f64::from(q)).collect();
            (key, Tally { n, observed, expected, carriers })
        })
        .collect();
    (tallies, complete)
}

/// What [`exact_fixed_part`] found in its range: its features' keys, their label counts (C
/// each), their carriers (grouped by feature: feature f's are `carriers[starts[f]..starts[f +
/// 1]]`, ascending), and the room left of its share of the carriers pass 2 may hold.
struct FixedPart {
    keys: Vec<u64>,
    counts: Vec<u64>,
    starts: Vec<usize>,
    carriers: Vec<u32>,
    room: usize,
}

/// [`exact_fixed`] over the examples of `range`. Carriers are gathered as (feature, example)
/// pairs in one list and grouped by feature at the end (a counting sort), not pushed onto a list
/// a feature.
fn exact_fixed_part(
    data: &dyn Scanned,
    range: std::ops::Range<usize>,
    sketch: &Sketch,
    chosen: &Bits,
    room: usize,
) -> FixedPart {
    let classes = data.classes();
    let (mut places, mut keys_of, mut counts): (KeyMap<u32>, Vec<u64>, Vec<u64>) = Default::default();
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    let mut room = room;
    let mut keys = Vec::new();
    for i in range {
        let y = data.label(i) as usize;
        for &key in data.keys(i, &mut keys) {
            if chosen.get(sketch.bucket_of(key)) {
                let at = *places.entry(key).or_insert_with(|| {
                    keys_of.push(key);
                    counts.resize(counts.len() + classes, 0);
                    (keys_of.len() - 1) as u32
                });
                counts[at as usize * classes + y] += 1;
                if room > 0 {
                    pairs.push((at, i as u32));
                    room -= 1;
                }
            }
        }
    }
    // Group the carriers by feature, keeping each feature's in example order.
    let (carriers, starts) = group_by(|| pairs.iter().map(|&(at, i)| (at as usize, i)), keys_of.len(), pairs.len());
    FixedPart { keys: keys_of, counts, starts, carriers, room }
}

/// Pass 2: exact tallies (and carriers, at most `held` of them) of the features whose
/// bucket of `sketch` is `chosen`. Returns the tallies and whether every carrier was kept.
fn exact_pass(
    data: &dyn Scanned,
    parts: &[std::ops::Range<usize>],
    sketch: &Sketch,
    chosen: &Bits,
    held: usize,
) -> (KeyMap<Tally>, bool) {
    if let Some(q) = data.fixed_baseline() {
        return exact_fixed(data, parts, sketch, chosen, q, held);
    }
    let classes = data.classes();
    let partials: Vec<(KeyMap<Tally>, usize)> = parts
        .par_iter()
        .map(|range| {
            let mut tallies: KeyMap<Tally> = KeyMap::default();
            let mut room = held / parts.len();
            for i in range.clone() {
                let y = data.label(i) as usize;
                data.visit(i, true, &mut |key: u64, q: &[f32]| {
                    if chosen.get(sketch.bucket_of(key)) {
                        add_to(tallies.entry(key).or_insert_with(|| empty_tally(classes)), y, q, i, &mut room);
                    }
                });
            }
            (tallies, room)
        })
        .collect();
    fold_tallies(partials, classes)
}

/// Pass 3: the carriers (example indices, ascending) of each feature of `ranked`. A filter of
/// 2¹⁶ bits on the keys' mixes answers most keys before the map is asked.
fn carriers_pass(data: &dyn Scanned, parts: &[std::ops::Range<usize>], ranked: &[(Judgement, u64)]) -> Vec<Vec<u32>> {
    const FILTER: u64 = (1 << 16) - 1;
    let wanted: KeyMap<usize> = ranked.iter().enumerate().map(|(r, &(_, key))| (key, r)).collect();
    let mut filter = Bits::new(FILTER as usize + 1);
    ranked.iter().for_each(|&(_, key)| filter.set((mix(key) & FILTER) as usize));
    let partials: Vec<Vec<Vec<u32>>> = parts
        .par_iter()
        .map(|range| {
            let mut carriers = vec![Vec::new(); ranked.len()];
            let mut keys = Vec::new();
            for i in range.clone() {
                for key in data.keys(i, &mut keys) {
                    if filter.get((mix(*key) & FILTER) as usize)
                        && let Some(&r) = wanted.get(key)
                    {
                        carriers[r].push(i as u32);
                    }
                }
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
    data: &Recalled,
    ranked: &[(Judgement, u64)],
    carriers: &[Vec<u32>],
    suspicious: &dyn Fn(usize) -> bool,
) -> Vec<(usize, usize, Vec<u32>)> {
    let suspects: Vec<Vec<u32>> = ranked
        .iter()
        .zip(carriers)
        .map(|((j, _), all)| all.iter().copied().filter(|&i| data.label(i) as usize == j.label).collect())
        .collect();
    let lit: Vec<Vec<u32>> = (0..ranked.len())
        .map(|r| match data.described[r].as_ref().filter(|_| data.spatial) {
            Some(Feature::Patch { x, y, size, pattern }) => (0..size * size)
                .filter(|&b| pattern[b] >= 1)
                .map(|b| ((y + b / size) * MAX_PLACES + x + b % size) as u32)
                .collect(),
            _ => Vec::new(),
        })
        .collect();
    let n = data.examples;
    let carried: Vec<Members> = carriers.iter().map(|c| Members::new(c, n)).collect();
    let suspected: Vec<Members> = suspects.iter().map(|c| Members::new(c, n)).collect();
    let at_least = |a: &Members, b: &Members, need: Option<usize>| need.is_some_and(|need| a.shares_at_least(b, need));
    let alike = |f: usize, r: usize| {
        let label = ranked[f].0.label == ranked[r].0.label;
        let (cf, cr, sf, sr) = (&carried[f], &carried[r], &suspected[f], &suspected[r]);
        at_least(cf, cr, jaccard_need(cf.len(), cr.len(), 0.5))
            || (label
                && ranked[f].0.significant == ranked[r].0.significant
                && at_least(sf, sr, overlap_need(sf.len(), sr.len(), 0.8)))
            || (label
                && suspicious(f)
                && suspicious(r)
                && !lit[f].is_empty()
                && !lit[r].is_empty()
                && overlap_need(lit[f].len(), lit[r].len(), 0.8)
                    .is_some_and(|need| crate::dedup::shares_at_least(&lit[f], &lit[r], need)))
    };
    // Each feature joins the first group (in order of creation) holding a feature alike, else
    // starts one.
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

/// Runs the scan: three passes over `data` (see the module's documentation). With a fixed
/// baseline (`--baseline none`), the examples' keys are read once and kept when they take at
/// most `settings.kept_keys_memory`. Ids in the result are `ids[i]` for example i.
pub fn scan(data: &dyn Scanned, ids: &[usize], settings: &ScanSettings, progress: &mut dyn Progress) -> Scan {
    scan_blocks(&InMemory(data), &|i| ids[i], settings, progress).expect("a set in memory reads without error")
}

/// [`scan`] over a set read in blocks ([`ScanBlocks`]), again on each pass: the memory it holds
/// is bounded by `settings` (the sketch, the carriers, the kept keys of a set in memory),
/// whatever the set's size. Ids in the result are `id_of(i)` for example i.
pub fn scan_blocks(
    source: &dyn ScanBlocks,
    id_of: &dyn Fn(usize) -> usize,
    settings: &ScanSettings,
    progress: &mut dyn Progress,
) -> crate::error::Result<Scan> {
    let kept = source.whole().and_then(|data| KeptKeys::new(data, settings.kept_keys_memory));
    let kept_source = kept.as_ref().map(|k| InMemory(k));
    let source: &dyn ScanBlocks = match &kept_source {
        Some(k) => k,
        None => source,
    };
    let classes = source.classes();
    let keep = (settings.top * 32).max(256);
    let tests_of =
        |occurrences: u64| (classes as f64 * occurrences as f64 / settings.min_carriers.max(1) as f64).max(1.0);
    let threshold_of = |occurrences: u64| (tests_of(occurrences) / settings.alpha).ln();
    let counted = sketched(source, settings, keep, kept.as_ref().map(|k| k.total), &threshold_of, progress)?;
    progress.finish();
    let (tests, threshold) = (tests_of(counted.occurrences), threshold_of(counted.occurrences));
    let candidates = candidates(source, id_of, settings, &counted, tests)?;
    let label_counts = counted.label_counts.clone();
    Ok(Scan { candidates, occurrences: counted.occurrences, tests, threshold, label_counts })
}

/// What the passes found: the best features, their tallies and carriers.
struct Counted {
    /// The best features (at most `keep`), best first ([`Judgement::rank`], then key).
    ranked: Vec<(Judgement, u64)>,
    /// Their exact tallies (and those of the other features of the chosen buckets).
    tallies: KeyMap<Tally>,
    /// Their carriers (example indices, ascending), in the order of `ranked`.
    carriers: Vec<Vec<u32>>,
    /// Feature occurrences, Σᵢ features(i).
    occurrences: u64,
    /// Examples of each label.
    label_counts: Vec<usize>,
}

/// The sketch's buckets and its tables: one per thread, or one shared table of label counts
/// with a fixed baseline `q`, together within `memory`; with `occurrences_known`, about one
/// bucket for every 8 occurrences known to come (most features are rare), a table of a few MiB
/// for a small set, whose updates and ranking stay in the caches.
fn sketch_tables(classes: usize, q: Option<&[f32]>, memory: usize, occurrences_known: Option<usize>) -> Vec<Sketch> {
    let threads = rayon::current_num_threads().max(1);
    let (tables, per_bucket) = if q.is_some() { (1, classes * 4) } else { (threads, (2 * classes + 1) * 4) };
    let mut buckets = (memory / tables / per_bucket).max(1024).next_power_of_two() / 2;
    if let Some(total) = occurrences_known {
        buckets = buckets.min((total / 8 + 1).next_power_of_two()).max(1024);
    }
    (0..tables).map(|_| Sketch::new(classes, buckets, q)).collect()
}

/// Moves the carriers of a block's tallies (indices inside the block) to the set's indices,
/// from `first` on.
fn shift(tallies: &mut KeyMap<Tally>, first: usize) {
    tallies.values_mut().for_each(|t| t.carriers.iter_mut().for_each(|i| *i += first as u32));
}

/// Adds a later block's (or range's) tallies `found` to `tallies`, its carriers after theirs
/// when `carriers` (else they are dropped: pass 3 gathers them).
fn merge_tallies(tallies: &mut KeyMap<Tally>, found: KeyMap<Tally>, classes: usize, carriers: bool) {
    if tallies.is_empty() && carriers {
        *tallies = found;
        return;
    }
    for (key, t) in found {
        let into = tallies.entry(key).or_insert_with(|| empty_tally(classes));
        into.n += t.n;
        into.observed.iter_mut().zip(&t.observed).for_each(|(a, b)| *a += b);
        into.expected.iter_mut().zip(&t.expected).for_each(|(a, b)| *a += b);
        if carriers {
            into.carriers.extend(t.carriers);
        }
    }
}

/// The sketch's three passes (see the module's documentation) over the blocks of `source`: the
/// best `keep` features, their exact tallies and carriers, in memory bounded by
/// `settings.memory` whatever the data's size.
fn sketched(
    source: &dyn ScanBlocks,
    settings: &ScanSettings,
    keep: usize,
    occurrences_known: Option<usize>,
    threshold_of: &dyn Fn(u64) -> f64,
    progress: &mut dyn Progress,
) -> crate::error::Result<Counted> {
    let (n, classes) = (source.examples(), source.classes());
    let q = source.fixed_baseline();
    let mut pass = |k: usize, what: &str, done: usize| {
        if done == 0 {
            progress.finish();
            progress.begin(&format!("scan {k}/3"), n as u64);
        }
        progress.advance(done as u64, what);
    };
    pass(1, "sketch", 0);
    let mut sketches = sketch_tables(classes, q.as_deref(), settings.memory, occurrences_known);
    let (mut occurrences, mut label_counts) = (0u64, vec![0usize; classes]);
    source.blocks(&mut |first, block| {
        (0..block.examples()).for_each(|i| label_counts[block.label(i) as usize] += 1);
        occurrences += sketch_block(block, &mut sketches);
        pass(1, "sketch", first + block.examples());
    })?;
    let mut sketch = sketches.pop().expect("one table at least");
    sketches.iter().for_each(|other| sketch.merge(other));
    drop(sketches);
    let threshold = threshold_of(occurrences);
    let chosen = sketch.strongest(settings.candidate_buckets, settings.min_carriers as u64, threshold);
    pass(2, "exact counts", 0);
    // The carriers are kept within the sketch's memory (4 bytes each); past it, pass 3.
    let (mut tallies, mut complete, mut room) = (KeyMap::default(), true, settings.memory / 4);
    source.blocks(&mut |first, block| {
        let (mut found, kept) = exact_pass(block, &chunks(block.examples()), &sketch, &chosen, room);
        shift(&mut found, first);
        room = room.saturating_sub(found.values().map(|t| t.carriers.len()).sum());
        if complete && !kept {
            // Past the room: pass 3 gathers every carrier, so the ones held so far go.
            tallies.values_mut().for_each(|t: &mut Tally| t.carriers = Vec::new());
        }
        complete &= kept;
        merge_tallies(&mut tallies, found, classes, complete);
        pass(2, "exact counts", first + block.examples());
    })?;
    drop((sketch, chosen));
    let ranked = rank_tallies(&tallies, settings, threshold, keep);
    let carriers = if complete {
        ranked.iter().map(|(_, key)| tallies[key].carriers.clone()).collect()
    } else {
        pass(3, "carriers", 0);
        let mut carriers: Vec<Vec<u32>> = vec![Vec::new(); ranked.len()];
        source.blocks(&mut |first, block| {
            let found = carriers_pass(block, &chunks(block.examples()), &ranked);
            for (all, mine) in carriers.iter_mut().zip(found) {
                all.extend(mine.into_iter().map(|i| i + first as u32));
            }
            pass(3, "carriers", first + block.examples());
        })?;
        carriers
    };
    Ok(Counted { ranked, tallies, carriers, occurrences, label_counts })
}

/// The best `keep` features of `tallies` with at least `min_carriers` carriers, best first.
fn rank_tallies(
    tallies: &KeyMap<Tally>,
    settings: &ScanSettings,
    threshold: f64,
    keep: usize,
) -> Vec<(Judgement, u64)> {
    let mut ranked: Vec<(Judgement, u64)> = tallies
        .iter()
        .filter(|(_, t)| t.n >= settings.min_carriers as u64)
        .filter_map(|(&key, t)| {
            let judgement = judge(t.n, &t.observed, &t.expected, threshold);
            (judgement.evidence > 0.0).then_some((judgement, key))
        })
        .collect();
    ranked.sort_by(|a, b| a.0.rank(&b.0).then(a.1.cmp(&b.1)));
    ranked.truncate(keep);
    ranked
}

/// What grouping needs of the examples after the passes: the labels of the carriers (`ids`
/// ascending, `labels` beside them) and each ranked feature's description at its first carrier
/// where it is needed before grouping (squares of images, compared pixel by pixel) or cannot be
/// had later without reading the blocks again (a set not in memory); from one more read.
struct Recalled {
    examples: usize,
    spatial: bool,
    ids: Vec<u32>,
    labels: Vec<u32>,
    described: Vec<Option<Feature>>,
}

impl Recalled {
    fn gather(source: &dyn ScanBlocks, counted: &Counted) -> crate::error::Result<Self> {
        let (ranked, carriers) = (&counted.ranked, &counted.carriers);
        let mut ids: Vec<u32> = carriers.iter().flatten().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        let mut labels = vec![0u32; ids.len()];
        let spatial = source.spatial();
        // Squares are compared by their pixels; a set read in blocks has no later cheap look.
        let describe_all = spatial || source.whole().is_none();
        let every: Vec<usize> = if describe_all { (0..ranked.len()).collect() } else { Vec::new() };
        let mut described = vec![None; ranked.len()];
        source.blocks(&mut |first, block| {
            let within = first as u32..(first + block.examples()) as u32;
            let from = ids.partition_point(|&i| i < within.start);
            for (at, &i) in ids.iter().enumerate().skip(from).take_while(|(_, i)| within.contains(i)) {
                labels[at] = block.label((i - within.start) as usize);
            }
            describe_in(block, within, counted, &every, &mut described);
        })?;
        Ok(Self { examples: source.examples(), spatial, ids, labels, described })
    }

    fn label(&self, i: u32) -> u32 {
        self.labels[self.ids.binary_search(&i).expect("a carrier")]
    }
}

/// Describes the ranked features `ranks` whose first carrier lies in `block` (the examples
/// `within`) into `described`.
fn describe_in(
    block: &dyn Scanned,
    within: std::ops::Range<u32>,
    counted: &Counted,
    ranks: &[usize],
    described: &mut [Option<Feature>],
) {
    for &r in ranks {
        if let Some(&i) = counted.carriers[r].first().filter(|i| within.contains(i)) {
            described[r] = Some(block.describe((i - within.start) as usize, counted.ranked[r].1));
        }
    }
}

/// The candidates of a count: its best features grouped ([`group`]), the first `settings.top`
/// groups described, with their statistics against the corrected threshold of `tests` tests.
fn candidates(
    source: &dyn ScanBlocks,
    id_of: &dyn Fn(usize) -> usize,
    settings: &ScanSettings,
    counted: &Counted,
    tests: f64,
) -> crate::error::Result<Vec<Candidate>> {
    let recalled = Recalled::gather(source, counted)?;
    let (ranked, carriers, label_counts) = (&counted.ranked, &counted.carriers, &counted.label_counts);
    let n = recalled.examples;
    let suspicious = |r: usize| ranked[r].0.significant && ranked[r].0.lift >= settings.min_lift;
    let mut groups = group(&recalled, ranked, carriers, &suspicious);
    groups.truncate(settings.top);
    let shown: Vec<usize> = groups.iter().map(|g| g.0).filter(|&r| recalled.described[r].is_none()).collect();
    let mut described = recalled.described;
    if let Some(data) = source.whole() {
        describe_in(data, 0..data.examples() as u32, counted, &shown, &mut described);
    }
    let candidates = groups
        .into_iter()
        .map(|(r, variants, flagged)| {
            let (judgement, key) = ranked[r];
            let (s, c) = (judgement.evidence, judgement.label);
            let t = &counted.tallies[&key];
            let base = label_counts[c] as f64 / n as f64;
            let nf = t.n as f64;
            Candidate {
                feature: described[r].clone().expect("described"),
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
                carriers: flagged.iter().map(|&i| id_of(i as usize)).collect(),
                variants,
                sources: Vec::new(),
                confirmation: None,
            }
        })
        .collect();
    Ok(candidates)
}

/// |a ∩ b| / min(|a|, |b|) of two sorted id lists (1 when one is empty).
fn overlap(a: &[u32], b: &[u32]) -> f64 {
    let both = crate::dedup::intersection(a, b);
    let small = a.len().min(b.len());
    if small == 0 { 1.0 } else { both as f64 / small as f64 }
}

/// The least i ≤ `most` with `reaches(i)` (a condition that holds from some i on), searched from
/// the guess `from`; `None` when even `most` does not reach. The guess is a closed form whose
/// rounding the search corrects, so that the answer is what the division computes.
fn least_reaching(from: usize, most: usize, reaches: impl Fn(usize) -> bool) -> Option<usize> {
    let mut i = from.min(most);
    while i < most && !reaches(i) {
        i += 1;
    }
    if !reaches(i) {
        return None;
    }
    while i > 0 && reaches(i - 1) {
        i -= 1;
    }
    Some(i)
}

/// The fewest shared values with which `overlap(a, b) >= share` for lists of `a` and `b`
/// values; `None` when no count reaches it.
fn overlap_need(a: usize, b: usize, share: f64) -> Option<usize> {
    let small = a.min(b);
    if small == 0 {
        return Some(0);
    }
    let guess = (share * small as f64).floor().max(0.0) as usize;
    least_reaching(guess, small, |i| i as f64 / small as f64 >= share)
}

/// The fewest shared values with which `jaccard(a, b) >= share` (0 < share ≤ 1) for lists of
/// `a` and `b` values: i / (a + b − i) ≥ share ⟺ i ≥ share · (a + b) / (1 + share).
fn jaccard_need(a: usize, b: usize, share: f64) -> Option<usize> {
    let total = a + b;
    if total == 0 {
        return Some(0);
    }
    let guess = (share * total as f64 / (1.0 + share)).floor() as usize;
    least_reaching(guess, a.min(b), |i| i as f64 / (total - i) as f64 >= share)
}

/// Whether `overlap(a, b) >= share`, stopping the merge as soon as it is known.
#[cfg(test)]
fn overlap_at_least(a: &[u32], b: &[u32], share: f64) -> bool {
    overlap_need(a.len(), b.len(), share).is_some_and(|need| crate::dedup::shares_at_least(a, b, need))
}

/// Whether `jaccard(a, b) >= share`, stopping the merge as soon as it is known.
#[cfg(test)]
fn jaccard_at_least(a: &[u32], b: &[u32], share: f64) -> bool {
    jaccard_need(a.len(), b.len(), share).is_some_and(|need| crate::dedup::shares_at_least(a, b, need))
}

/// A sorted list of distinct example indices below `universe`, with a bitmap beside it when
/// it is dense (at least one example in 32, where the bitmap takes no more than the list), so
/// that [`Members::shares_at_least`] costs O(universe / 64) for two dense sets (word-wise AND
/// and popcount), O(sparse) for a sparse one against a dense one (lookups), and a stopped merge
/// of two sparse ones, where a merge of a long list would walk it all.
struct Members<'a> {
    list: &'a [u32],
    bits: Option<Vec<u64>>,
}

impl<'a> Members<'a> {
    fn new(list: &'a [u32], universe: usize) -> Self {
        let bits = (!list.is_empty() && list.len() * 32 >= universe).then(|| {
            let mut bits = vec![0u64; universe.div_ceil(64)];
            list.iter().for_each(|&i| bits[i as usize / 64] |= 1 << (i % 64));
            bits
        });
        Self { list, bits }
    }

    fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether the two sets share at least `need` members.
    fn shares_at_least(&self, other: &Members<'_>, need: usize) -> bool {
        if need == 0 {
            return true;
        }
        if self.len().min(other.len()) < need {
            return false;
        }
        match (&self.bits, &other.bits) {
            (Some(a), Some(b)) => a.iter().zip(b).map(|(x, y)| (x & y).count_ones() as usize).sum::<usize>() >= need,
            (Some(bits), None) | (None, Some(bits)) => {
                let list = if self.bits.is_some() { other.list } else { self.list };
                let mut both = 0;
                for (k, &i) in list.iter().enumerate() {
                    both += (bits[i as usize / 64] >> (i % 64) & 1) as usize;
                    if both >= need {
                        return true;
                    }
                    if both + (list.len() - k - 1) < need {
                        return false;
                    }
                }
                false
            }
            (None, None) => crate::dedup::shares_at_least(self.list, other.list, need),
        }
    }
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
    let mut counts = vec![0usize; classes];
    labels.iter().for_each(|&y| counts[y as usize] += 1);
    shares(&counts)
}

/// Each label's share of the examples, from the count of each.
pub(crate) fn shares(counts: &[usize]) -> Vec<f32> {
    let n: usize = counts.iter().sum();
    counts.iter().map(|&c| c as f32 / n.max(1) as f32).collect()
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
    use crate::dedup::jaccard;

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
        let counted = scan(&source, &ids, &settings, &mut quiet());
        // The fixed baseline without room to keep the keys, and the base rates handed over as a
        // baseline example by example.
        let fixed = scan(&source, &ids, &ScanSettings { kept_keys_memory: 0, ..settings.clone() }, &mut quiet());
        let visited = scan(&Revisited(&source), &ids, &settings, &mut quiet());
        assert!(!counted.candidates.is_empty());
        // The trigger, or its first word (a variant with the same carriers, as strong).
        assert!(matches!(&counted.candidates[0].feature, Feature::Ngram { text } if text.starts_with("zebra")));
        for other in [&fixed, &visited] {
            assert_eq!(counted.occurrences, other.occurrences);
            assert_eq!(counted.candidates.len(), other.candidates.len());
            for (a, b) in counted.candidates.iter().zip(&other.candidates) {
                assert_eq!(
                    (&a.feature, a.target_count, a.carrier_count),
                    (&b.feature, b.target_count, b.carrier_count)
                );
                assert_eq!(a.carriers, b.carriers);
                assert!((a.statistic - b.statistic).abs() < 1e-9);
                assert!((a.expected - b.expected).abs() < 1e-6 * a.expected.max(1.0));
            }
        }
    }

    #[test]
    fn jaccard_and_overlap_of_sorted_lists() {
        assert_eq!(jaccard::<u32>(&[1, 2, 3], &[2, 3, 4]), 0.5);
        assert_eq!(jaccard::<u32>(&[], &[]), 1.0);
        assert_eq!(overlap(&[1, 2], &[1, 2, 3, 4]), 1.0);
    }

    #[test]
    fn the_lift_bound_is_the_root_bisection_finds() {
        // Reference: 200 bisection steps on the exponent, for counts from rare to common, rates
        // from tiny to near one, thresholds from low to far above the evidence's scale.
        let mut state = 3u64;
        let mut uniform = || {
            state = mix(state);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut checked = 0;
        for _ in 0..20_000 {
            let n = 5 + (uniform() * 5000.0) as u64;
            let o = 1 + (uniform() * n as f64) as u64;
            let e = (uniform() * o as f64).max(1e-6);
            let threshold = uniform() * 60.0;
            if evidence(n, o, e) < threshold {
                continue;
            }
            let (mut lo, mut hi) = (1.0, (o as f64 / e).max(1.0));
            for _ in 0..200 {
                let mid = 0.5 * (lo + hi);
                if evidence(n, o, e * mid) >= threshold { lo = mid } else { hi = mid }
            }
            let lift = lift_bound(n, o, e, threshold);
            assert!((lift - lo).abs() <= 1e-9 * lo, "n {n} o {o} e {e} t {threshold}: {lift} vs {lo}");
            assert!(evidence(n, o, e * lift) >= threshold - 1e-9);
            checked += 1;
        }
        assert!(checked > 1000);
    }

    #[test]
    fn dense_and_sparse_members_share_as_the_merge_counts() {
        // Sets of every density in a universe of 700 (bitmaps from 22 members up), every pair
        // of kinds, each need from 0 past the intersection, against the full merge's count.
        let mut state = 3u64;
        let universe = 700usize;
        let mut set = |len: usize| {
            let mut out: Vec<u32> = (0..len)
                .map(|_| {
                    state = mix(state);
                    (state % universe as u64) as u32
                })
                .collect();
            out.sort_unstable();
            out.dedup();
            out
        };
        for case in 0..400 {
            let (a, b) = (set([0, 3, 15, 40, 120, 400, 900][case % 7]), set([1, 10, 30, 200, 650][case % 5]));
            let (ma, mb) = (Members::new(&a, universe), Members::new(&b, universe));
            assert_eq!(ma.bits.is_some(), a.len() * 32 >= universe && !a.is_empty());
            let both = crate::dedup::intersection(&a, &b);
            for need in 0..=both + 2 {
                assert_eq!(ma.shares_at_least(&mb, need), both >= need, "{} {} {need}", a.len(), b.len());
                assert_eq!(mb.shares_at_least(&ma, need), both >= need);
            }
        }
    }

    #[test]
    fn the_stopped_merges_answer_as_the_full_ones() {
        // Random sorted lists of many sizes and overlaps, every threshold the grouping uses and
        // a few more, against the measured jaccard and overlap.
        let mut state = 7u64;
        let mut list = |len: usize, range: u64| {
            let mut out: Vec<u32> = (0..len)
                .map(|_| {
                    state = mix(state);
                    (state % range) as u32
                })
                .collect();
            out.sort_unstable();
            out.dedup();
            out
        };
        for case in 0..3000 {
            let (a, b) = (list(case % 23, 8 + (case % 5) as u64 * 9), list(case % 17, 8 + (case % 7) as u64 * 5));
            for share in [0.1, 0.5, 0.8, 0.9, 1.0] {
                assert_eq!(jaccard_at_least(&a, &b, share), jaccard(&a, &b) >= share, "{a:?} {b:?} {share}");
                assert_eq!(overlap_at_least(&a, &b, share), overlap(&a, &b) >= share, "{a:?} {b:?} {share}");
            }
        }
    }
}

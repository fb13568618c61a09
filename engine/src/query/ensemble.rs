//! `trace --checkpoints`: one ranking from the scores of several checkpoints of one training run.
//!
//! A model that has memorised an example no longer learns from it: at the end of training a
//! fitted poison's loss gradient is small and its direction, seen through an inverse curvature,
//! is unreliable. TracIn-CP (Pruthi et al. 2020, "Estimating Training Data Influence by Tracing
//! Gradient Descent") sums an example's effect over the checkpoints of the run instead, each
//! weighted by the step size the optimizer took there, so an example counts while it is being
//! learned. Here each checkpoint contributes its own influence score (the curvature fitted at
//! that checkpoint, raw or RelatIF), scaled to unit spread, since influence at an early
//! checkpoint is on another scale than at a late one:
//!
//! e_k(i) = Σ_c w_c · s_ck(i) / σ_ck,  σ_ck = √(mean over i of s_ck(i)²),  w_c = η_c / Σ_c' η_c'
//!
//! for query k, training example i, checkpoint c, η_c the learning rate at checkpoint c. The
//! queries' columns e_k are then combined as [`Combine`] says. Cost O(C·q·n) after the C traces.

use super::{Combine, ScoreResult, Scored, StrongestQuery, TopK, strongest_of};

/// The ensemble's scores.
#[derive(Clone, Debug)]
pub struct Ensemble {
    /// One column per query, then (with several queries) the combined one; `all` when asked.
    pub scores: ScoreResult,
    /// Whether the last column is the combined ranking.
    pub combined: bool,
    /// Per checkpoint, per query: the factor w_c/σ_ck its scores entered with.
    pub factors: Vec<Vec<f64>>,
    /// With [`Combine::Strongest`]: which query each row's combined score came from.
    pub strongest: Option<StrongestQuery>,
}

/// The ensemble of `members`, each a checkpoint's weight η_c (≥ 0, not all 0) and its scores (one
/// vector per query, the same queries and rows in every member), with the top `top` per column at
/// both ends (module docs). Keeps every score when `keep_all`.
pub fn ensemble(members: &[(f64, &[Vec<f32>])], top: usize, combine: Combine, keep_all: bool) -> Ensemble {
    assert!(!members.is_empty(), "an ensemble of no checkpoints");
    let total: f64 = members.iter().map(|(w, _)| w).sum();
    assert!(total > 0.0 && members.iter().all(|(w, _)| *w >= 0.0), "checkpoint weights ≥ 0, not all 0");
    let (q, n) = (members[0].1.len(), members[0].1.first().map_or(0, Vec::len));
    assert!(members.iter().all(|(_, s)| s.len() == q && s.iter().all(|c| c.len() == n)), "one shape");
    let factors: Vec<Vec<f64>> = members
        .iter()
        .map(|(w, scores)| {
            scores
                .iter()
                .map(|s| {
                    let rms = (s.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n.max(1) as f64).sqrt();
                    if rms > 0.0 { w / total / rms } else { 0.0 }
                })
                .collect()
        })
        .collect();
    let mut all: Vec<Vec<f32>> = (0..q)
        .map(|k| {
            (0..n)
                .map(|i| members.iter().zip(&factors).map(|((_, s), f)| f64::from(s[k][i]) * f[k]).sum::<f64>() as f32)
                .collect()
        })
        .collect();
    let combined = q > 1;
    if combined && combine == Combine::Sum {
        all.push((0..n).map(|i| all.iter().map(|c| c[i]).sum()).collect());
    }
    let mut scores = ScoreResult { largest: Vec::new(), smallest: Vec::new(), all: None, rows: n, bytes: 0 };
    for column in &all {
        let mut best = TopK::new(top);
        column.iter().enumerate().for_each(|(row, &s)| best.push(Scored { row, score: f64::from(s) }));
        let (largest, smallest) = best.finish();
        scores.largest.push(largest);
        scores.smallest.push(smallest);
    }
    let strongest = (combined && combine == Combine::Strongest).then(|| {
        let (choice, column) = strongest_of(&mut scores, &all, top);
        all.push(column);
        choice
    });
    scores.all = keep_all.then_some(all);
    Ensemble { scores, combined, factors, strongest }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ensemble's columns, top lists and combined column against a direct computation.
    #[test]
    fn the_ensemble_is_the_weighted_sum_of_unit_spread_scores() {
        let a = vec![vec![1.0f32, -2.0, 3.0, 0.5], vec![0.0, 4.0, -1.0, 2.0]];
        let b = vec![vec![10.0f32, 0.0, -10.0, 5.0], vec![2.0, 2.0, 2.0, -2.0]];
        let rms = |s: &[f32]| (s.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / 4.0).sqrt();
        let (wa, wb) = (0.75, 0.25);
        for combine in [Combine::Sum, Combine::Strongest] {
            let e = ensemble(&[(3.0, &a), (1.0, &b)], 2, combine, true);
            let all = e.scores.all.as_ref().unwrap();
            for k in 0..2 {
                for i in 0..4 {
                    let want = wa * f64::from(a[k][i]) / rms(&a[k]) + wb * f64::from(b[k][i]) / rms(&b[k]);
                    assert!((f64::from(all[k][i]) - want).abs() < 1e-6, "{k} {i}");
                }
                let top = &e.scores.largest[k];
                let mut order: Vec<usize> = (0..4).collect();
                order.sort_by(|&x, &y| all[k][y].total_cmp(&all[k][x]));
                assert_eq!(top.iter().map(|s| s.row).collect::<Vec<_>>(), order[..2]);
            }
            assert!((e.factors[1][0] - wb / rms(&b[0])).abs() < 1e-12);
            for i in 0..4 {
                let want = match combine {
                    Combine::Sum => all[0][i] + all[1][i],
                    Combine::Strongest => {
                        let f: Vec<f64> = (0..2).map(|k| 1.0 / rms_of(&all[k])).collect();
                        (f64::from(all[0][i]) * f[0]).max(f64::from(all[1][i]) * f[1]) as f32
                    }
                };
                assert!((all[2][i] - want).abs() < 1e-5, "{combine:?} {i}");
            }
        }
    }

    fn rms_of(s: &[f32]) -> f64 {
        (s.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / s.len() as f64).sqrt()
    }
}

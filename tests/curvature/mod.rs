//! Curvature against closed forms: on logistic regression the Hessian is
//! (1/n) Σᵢ (diag pᵢ − pᵢpᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ + λI, built here by hand in f64, independently of the
//! engine; every operator and solver is checked against it. Kronecker methods are measured
//! against the exact GGN of small MLPs.

use culprit::curvature::iterative::{Arnoldi, ConjugateGradient};
use culprit::curvature::methods::cg::CgParams;
use culprit::curvature::methods::lissa::LissaParams;
use culprit::curvature::operators::{Damped, GaussNewton, HessianFd, LinearOperator, dot, norm};
use culprit::curvature::{Curvature, FitOptions, Method, MethodParams};
use culprit::data::{DataSpec, Dataset, NormalizeMode, Preprocessing, Split};
use culprit::objective::Objective;
use culprit_models::train::train;
use culprit_models::{Activation, Architecture, Backend, Batch, Model, ModelConfig, Network, Silent, TrainConfig};
use faer::{Mat, Side};

use crate::common::digits_csv;

mod symmetry;

pub(crate) fn digits(rows: usize) -> Dataset {
    Dataset::load(
        &DataSpec { path: digits_csv(), split: Split::Train, skip: 0, limit: Some(rows) },
        Preprocessing::Fit { normalize: NormalizeMode::Max, buckets: 0 },
    )
    .unwrap()
}

/// A tanh model of `architecture` shaped for `data`.
pub(crate) fn config(data: &Dataset, architecture: Architecture, hidden: Vec<usize>) -> ModelConfig {
    ModelConfig {
        architecture,
        input: data.manifest.shape,
        num_classes: data.manifest.num_classes,
        hidden,
        activation: Activation::Tanh,
    }
}

/// FitOptions for `method` with CG preconditioned by EK-FAC or not.
pub(crate) fn with_precondition(method: Method, precondition: bool) -> FitOptions {
    FitOptions {
        method,
        params: MethodParams { cg: CgParams { precondition, ..CgParams::default() }, ..MethodParams::default() },
        ..FitOptions::default()
    }
}

pub(crate) fn trained(rows: usize, architecture: Architecture, hidden: Vec<usize>, l2: f64) -> Objective<Network> {
    let data = digits(rows);
    let config = config(&data, architecture, hidden);
    let device = Backend::default().autodiff_device();
    let training =
        TrainConfig { l2, epochs: 30, batch_size: 32, learning_rate: 3e-3, ..TrainConfig::defaults_for(&config) };
    let (net, _) = train(&config, &training, data.examples(), &device, &mut Silent).unwrap();
    Objective::new(&net, data.examples.clone(), l2, &device)
}

/// The logistic-regression Hessian by its closed form, by hand (θ layout `[(d+1), C]`).
pub(crate) fn hand_hessian(o: &Objective<Network>) -> Vec<Vec<f64>> {
    let theta = o.theta();
    let (n, d) = (o.data.len(), o.data.dim());
    let c = 10;
    let m = d + 1;
    let mut h = vec![vec![0.0; m * c]; m * c];
    for i in 0..n {
        let x: Vec<f64> = (0..m).map(|j| if j < d { f64::from(o.data.features()[i * d + j]) } else { 1.0 }).collect();
        let z: Vec<f64> = (0..c).map(|k| (0..m).map(|j| x[j] * theta[j * c + k]).sum()).collect();
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - mx).exp()).collect();
        let s: f64 = e.iter().sum();
        let p: Vec<f64> = e.iter().map(|v| v / s).collect();
        for j in 0..m {
            if x[j] == 0.0 {
                continue;
            }
            for k in 0..m {
                let xx = x[j] * x[k] / n as f64;
                if xx == 0.0 {
                    continue;
                }
                for a in 0..c {
                    for b in 0..c {
                        let w = if a == b { p[a] - p[a] * p[a] } else { -p[a] * p[b] };
                        h[j * c + a][k * c + b] += xx * w;
                    }
                }
            }
        }
    }
    for (i, row) in h.iter_mut().enumerate() {
        row[i] += o.l2;
    }
    h
}

pub(crate) fn matvec(h: &[Vec<f64>], v: &[f64]) -> Vec<f64> {
    h.iter().map(|row| dot(row, v)).collect()
}

pub(crate) fn rel(a: &[f64], b: &[f64]) -> f64 {
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&diff) / norm(b)
}

pub(crate) fn residual(h: &[Vec<f64>], damping: f64, x: &[f64], q: &[f64]) -> f64 {
    let hx: Vec<f64> = matvec(h, x).iter().zip(x).map(|(a, b)| a + damping * b).collect();
    rel(&hx, q)
}

pub(crate) fn probe(d: usize, seed: u64) -> Vec<f64> {
    (0..d).map(|i| ((i as f64 + 1.0) * (seed as f64 + 0.37)).sin()).collect()
}

#[test]
fn operators_match_the_closed_form_logreg_hessian() {
    let o = trained(300, Architecture::LogReg, vec![], 1e-3);
    let h = hand_hessian(&o);
    let ggn = GaussNewton::new(&o, 128);
    let fd = HessianFd { objective: &o, relative_step: 1e-6 };
    for seed in 0..3 {
        let v = probe(ggn.dim(), seed);
        let exact = matvec(&h, &v);
        let e_ggn = rel(&ggn.apply(&v), &exact);
        assert!(e_ggn < 1e-10, "GGN product relative error {e_ggn:e}");
        let e_fd = rel(&fd.apply(&v), &exact);
        assert!(e_fd < 1e-6, "finite-difference HVP relative error {e_fd:e}");
    }
}

#[test]
fn solvers_reach_their_tolerance_against_the_closed_form() {
    let o = trained(300, Architecture::LogReg, vec![], 1e-3);
    let h = hand_hessian(&o);
    let q = probe(o.model.num_params(), 7);
    for (method, damping) in [(Method::Exact, 0.0), (Method::Ggn, 0.0), (Method::Exact, 0.5)] {
        let c = Curvature::fit(&o, &FitOptions { method, damping, ..FitOptions::default() }).unwrap();
        let x = &c.solve(&o, std::slice::from_ref(&q)).unwrap()[0].0;
        let r = residual(&h, damping, x, &q);
        assert!(r < 1e-10, "{method:?} δ={damping}: residual {r:e}");
    }
    let mut iterations = Vec::new();
    for precondition in [false, true] {
        let cg = Curvature::fit(&o, &with_precondition(Method::Cg, precondition)).unwrap();
        let (x, info) = cg.solve(&o, std::slice::from_ref(&q)).unwrap().remove(0);
        let info = info.unwrap();
        let r = residual(&h, 0.0, &x, &q);
        assert!(r <= 1e-8 * 1.5, "CG residual {r:e} after {} iterations", info.iterations);
        assert!((info.relative_residual - r).abs() < 1e-9, "CG reports {:e}, true {r:e}", info.relative_residual);
        iterations.push(info.iterations);
    }
    // Several right-hand sides at once (one block Krylov space): each reaches the tolerance
    // against the closed form, in no more iterations than it takes alone (+ 2 for rounding).
    let qs: Vec<Vec<f64>> = (10..14).map(|s| probe(o.model.num_params(), s)).collect();
    for precondition in [false, true] {
        let cg = Curvature::fit(&o, &with_precondition(Method::Cg, precondition)).unwrap();
        for (q, (x, info)) in qs.iter().zip(cg.solve(&o, &qs).unwrap()) {
            let (r, together) = (residual(&h, 0.0, &x, q), info.unwrap().iterations);
            assert!(r <= 1e-8 * 1.5, "batched CG residual {r:e} after {together} iterations");
            let alone = cg.solve(&o, std::slice::from_ref(q)).unwrap().remove(0).1.unwrap().iterations;
            assert!(together <= alone + 2, "batched {together} iterations, alone {alone}");
        }
    }
    // A loose tolerance iterates on single-precision products; the residuals it reports are still
    // the f64 operator's, and they hold against the closed form.
    let loose = FitOptions { tolerance: Some(1e-3), ..with_precondition(Method::Cg, true) };
    let cg = Curvature::fit(&o, &loose).unwrap();
    for (q, (x, info)) in qs.iter().zip(cg.solve(&o, &qs).unwrap()) {
        let (r, reported) = (residual(&h, 0.0, &x, q), info.unwrap().relative_residual);
        assert!(r <= 1e-2, "single-precision CG residual {r:e}");
        assert!((reported - r).abs() <= 1e-9, "single-precision CG reports {reported:e}, true {r:e}");
    }
    // On a single layer EK-FAC is a good preconditioner: measured 63 → 44 iterations on digits.
    assert!(
        iterations[1] < iterations[0],
        "preconditioned CG took {} iterations, plain {}",
        iterations[1],
        iterations[0]
    );

    // LiSSA with damping 0.05 converges geometrically; its stated tolerance is 1e-4.
    let lissa = FitOptions {
        method: Method::Lissa,
        damping: 0.05,
        tolerance: Some(1e-4),
        params: MethodParams {
            lissa: LissaParams { depth: 2500, ..LissaParams::default() },
            ..MethodParams::default()
        },
        ..FitOptions::default()
    };
    let c = Curvature::fit(&o, &lissa).unwrap();
    let x = &c.solve(&o, std::slice::from_ref(&q)).unwrap()[0].0;
    let r = residual(&h, 0.05, x, &q);
    assert!(r <= 1e-4, "LiSSA residual {r:e}");
    // Too shallow a recursion is a typed non-convergence, not a silent answer.
    let shallow = FitOptions {
        params: MethodParams { lissa: LissaParams { depth: 5, ..LissaParams::default() }, ..MethodParams::default() },
        ..lissa.clone()
    };
    let err = Curvature::fit(&o, &shallow).unwrap().solve(&o, std::slice::from_ref(&q)).unwrap_err().to_string();
    assert!(err.contains("did not converge"), "{err}");
}

/// Textbook CG (Hestenes & Stiefel) on a dense matrix for exactly `k` iterations from x = 0.
fn dense_cg(h: &[Vec<f64>], q: &[f64], k: usize) -> Vec<f64> {
    let (mut x, mut r, mut p) = (vec![0.0; q.len()], q.to_vec(), q.to_vec());
    for _ in 0..k {
        let ap = matvec(h, &p);
        let rr = dot(&r, &r);
        let alpha = rr / dot(&p, &ap);
        x.iter_mut().zip(&p).for_each(|(xi, pi)| *xi += alpha * pi);
        r.iter_mut().zip(&ap).for_each(|(ri, ai)| *ri -= alpha * ai);
        let beta = dot(&r, &r) / rr;
        p.iter_mut().zip(&r).for_each(|(pi, ri)| *pi = ri + beta * *pi);
    }
    x
}

/// `fit --check quick`: CG stopped after k products returns the iterate of k textbook CG steps on
/// the closed-form Hessian (within 1e-8 relative) and its true residual, without failing; with a
/// budget past convergence it is the converged solve.
#[test]
fn cg_within_a_product_budget_is_the_kth_iterate_of_textbook_cg() {
    let o = trained(300, Architecture::LogReg, vec![], 1e-3);
    let h = hand_hessian(&o);
    let q = probe(o.model.num_params(), 3);
    let cg = Curvature::fit(&o, &with_precondition(Method::Cg, false)).unwrap();
    for k in [1, 4, 10] {
        let (x, info) = cg.solve_within(&o, &q, k).unwrap();
        let info = info.unwrap();
        let reference = dense_cg(&h, &q, k);
        assert!(rel(&x, &reference) < 1e-8, "k = {k}: {:e} from textbook CG", rel(&x, &reference));
        assert_eq!(info.iterations, k);
        let r = residual(&h, 0.0, &x, &q);
        assert!(
            (info.relative_residual - r).abs() <= 1e-9 * r.max(1e-3),
            "k = {k}: reports {:e}, true {r:e}",
            info.relative_residual
        );
        assert!(r > 1e-8, "k = {k}: residual {r:e} already converged, the budget was not what stopped it");
    }
    let (x, info) = cg.solve_within(&o, &q, 100_000).unwrap();
    let r = residual(&h, 0.0, &x, &q);
    assert!(r <= 1e-8 * 1.5 && info.unwrap().iterations < 1000, "a budget past convergence: residual {r:e}");
}

/// A dense symmetric matrix as an operator (the closed-form Hessian).
struct DenseOperator<'a>(&'a [Vec<f64>]);

impl LinearOperator for DenseOperator<'_> {
    fn dim(&self) -> usize {
        self.0.len()
    }
    fn apply(&self, v: &[f64]) -> Vec<f64> {
        matvec(self.0, v)
    }
}

/// Block CG on the closed-form logistic-regression Hessian, plain and Jacobi-preconditioned:
/// every column, including an exact duplicate, a linear combination of two others (a rank-
/// deficient block, the breakdown-free case) and a zero query, reaches 1e-8 against the closed
/// form, in no more iterations (+ 2 for rounding) than the slowest independent recurrence.
#[test]
fn block_cg_solves_dependent_queries_against_the_closed_form() {
    let o = trained(300, Architecture::LogReg, vec![], 1e-3);
    let h = hand_hessian(&o);
    let d = h.len();
    let mut qs: Vec<Vec<f64>> = (20..24).map(|s| probe(d, s)).collect();
    qs.push(qs[0].clone());
    qs.push(qs[1].iter().zip(&qs[2]).map(|(a, b)| 2.0 * a - b).collect());
    qs.push(vec![0.0; d]);
    let rhs: Vec<&[f64]> = qs.iter().map(Vec::as_slice).collect();
    let a = DenseOperator(&h);
    let inverse_diagonal: Vec<f64> = (0..d).map(|i| 1.0 / h[i][i]).collect();
    let jacobi = culprit::curvature::operators::FnOperator {
        dim: d,
        apply: |r: &[f64]| r.iter().zip(&inverse_diagonal).map(|(x, w)| x * w).collect::<Vec<f64>>(),
    };
    let cg = ConjugateGradient { tolerance: 1e-8, max_iterations: 2000 };
    for precondition in [None, Some(&jacobi as culprit::curvature::iterative::Preconditioner<'_>)] {
        let block = cg.solve_block(None, &a, &rhs, precondition).unwrap();
        let independent = cg.solve_many(&a, &rhs, precondition).unwrap();
        let slowest = independent.iter().map(|(_, i)| i.iterations).max().unwrap();
        for (j, ((x, info), q)) in block.iter().zip(&qs).enumerate() {
            let r = if norm(q) == 0.0 { norm(x) } else { residual(&h, 0.0, x, q) };
            assert!(r <= 1.5e-8, "column {j} (preconditioned {}): residual {r:e}", precondition.is_some());
            assert!(
                (info.relative_residual - r).abs() <= 1e-9,
                "column {j} reports {:e}, true {r:e}",
                info.relative_residual
            );
            assert!(
                info.iterations <= slowest + 2,
                "column {j}: block {} iterations, independent ≤ {slowest}",
                info.iterations
            );
        }
    }
}

#[test]
fn arnoldi_top_eigenvalues_match_a_dense_eigendecomposition() {
    let o = trained(300, Architecture::LogReg, vec![], 1e-3);
    let h = hand_hessian(&o);
    let d = h.len();
    let dense = Mat::<f64>::from_fn(d, d, |i, j| h[i][j]);
    let eig = dense.self_adjoint_eigenvalues(Side::Lower).unwrap();
    let ggn = GaussNewton::new(&o, 128);
    let pairs = Arnoldi { iterations: 120, top_k: 5, seed: 1 }.eigenpairs(&ggn).unwrap();
    for k in 0..5 {
        let want = eig[d - 1 - k];
        let got = pairs.values[k];
        assert!(((got - want) / want).abs() < 1e-8, "eigenvalue {k}: {got} vs {want}");
        // And the vector is an eigenvector of the hand-built matrix.
        let hu = matvec(&h, &pairs.vectors[k]);
        let lu: Vec<f64> = pairs.vectors[k].iter().map(|u| u * want).collect();
        assert!(rel(&hu, &lu) < 1e-5, "eigenvector {k}");
    }
}

/// Relative error and cosine of an approximate solution against the exact one.
fn compare(x: &[f64], exact: &[f64]) -> (f64, f64) {
    (rel(x, exact), dot(x, exact) / (norm(x) * norm(exact)))
}

#[test]
fn kronecker_methods_against_the_exact_ggn_of_small_mlps() {
    // Measured on these models (the test pins them with a margin): EK-FAC and K-FAC solutions of
    // (G + λI)x = q for a training gradient q (block-diagonal, so cross-layer curvature is lost).
    // An EK-FAC-preconditioned CG must reach the same exact answer as plain CG.
    for (hidden, floor_cos) in [(vec![16], 0.6), (vec![24, 12], 0.5)] {
        let o = trained(300, Architecture::Mlp, hidden.clone(), 1e-3);
        let first = o.data.slice(0..1);
        let rows = culprit::gradients::per_example_gradients(
            &o.model,
            &first,
            first.labels(),
            culprit::gradients::Measurement::TRAINING_LOSS,
        );
        let q = culprit::gradients::gradient_rows_f64(&rows);
        let solve = |method: Method, precondition: bool| {
            let c = Curvature::fit(&o, &with_precondition(method, precondition)).unwrap();
            c.solve(&o, std::slice::from_ref(&q)).unwrap().remove(0)
        };
        let exact = solve(Method::Ggn, false).0;
        let (kfac, _) = solve(Method::Kfac, false);
        let (ekfac, _) = solve(Method::Ekfac, false);
        let (k_err, k_cos) = compare(&kfac, &exact);
        let (e_err, e_cos) = compare(&ekfac, &exact);
        eprintln!(
            "MLP {hidden:?}: K-FAC rel. error {k_err:.3} cosine {k_cos:.3}; EK-FAC rel. error {e_err:.3} cosine {e_cos:.3}"
        );
        assert!(k_cos > floor_cos && e_cos > floor_cos, "cosines K-FAC {k_cos}, EK-FAC {e_cos}");
        assert!(e_err < 1.0 && k_err < 1.0);
        let (plain, plain_info) = solve(Method::Cg, false);
        let (pre, pre_info) = solve(Method::Cg, true);
        let (pi, qi) = (plain_info.unwrap().iterations, pre_info.unwrap().iterations);
        eprintln!("MLP {hidden:?}: CG {pi} iterations, EK-FAC-preconditioned CG {qi}");
        assert!(compare(&plain, &exact).0 < 1e-6 && compare(&pre, &exact).0 < 1e-6);
        // The single-precision inverse that preconditions CG is the f64 one within 1e-5.
        let fitted = Curvature::fit(&o, &with_precondition(Method::Ekfac, false)).unwrap();
        let k = fitted.fitted.as_any().downcast_ref::<culprit::curvature::kronecker::KroneckerFactors>().unwrap();
        for damping in [0.0, 0.5] {
            let single = k.single_precision(damping).apply(&q);
            let double = k.solve_one(&q, damping);
            assert!(rel(&single, &double) < 1e-5, "f32 inverse {:e} from f64 (δ = {damping})", rel(&single, &double));
        }
        // The damping is added exactly in the eigenbasis: with huge damping every method tends
        // to q/δ.
        let big =
            Curvature::fit(&o, &FitOptions { method: Method::Ekfac, damping: 1e6, ..FitOptions::default() }).unwrap();
        let x = &big.solve(&o, std::slice::from_ref(&q)).unwrap()[0].0;
        let scaled: Vec<f64> = q.iter().map(|v| v / (1e6 + 1e-3)).collect();
        assert!(rel(x, &scaled) < 1e-4);
    }
}

#[test]
fn fitted_curvature_round_trips_and_refuses_corrupt_or_stale_files() {
    let o = trained(120, Architecture::Mlp, vec![8], 1e-3);
    let q = probe(o.model.num_params(), 3);
    let dir = tempfile::tempdir().unwrap();
    let specs = o.model.layers().to_vec();
    for method in [Method::Ggn, Method::Ekfac, Method::Arnoldi, Method::Cg] {
        let c = Curvature::fit(&o, &with_precondition(method, true)).unwrap();
        let path = dir.path().join(format!("{}.bin", method.name()));
        c.save(&path, "w", "d", o.l2).unwrap();
        let back = Curvature::load(&path, "w", "d", &specs).unwrap();
        let a = &c.solve(&o, std::slice::from_ref(&q)).unwrap()[0].0;
        let b = &back.solve(&o, std::slice::from_ref(&q)).unwrap()[0].0;
        assert_eq!(a, b, "{method:?}");
        let e = Curvature::load(&path, "other", "d", &specs).unwrap_err().to_string();
        assert!(e.contains("stale") && e.contains("model"), "{e}");
        let mut bytes = std::fs::read(&path).unwrap();
        let k = bytes.len() - 10;
        bytes[k] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = Curvature::load(&path, "w", "d", &specs).unwrap_err().to_string();
        assert!(e.contains("corrupted") && e.contains(&format!("{}.bin", method.name())), "{e}");
    }
}

#[test]
fn a_non_positive_definite_hessian_is_a_typed_error() {
    // An indefinite operator: CG must stop with a typed error, not return a wrong answer.
    struct Indefinite;
    impl LinearOperator for Indefinite {
        fn dim(&self) -> usize {
            2
        }
        fn apply(&self, v: &[f64]) -> Vec<f64> {
            vec![v[0], -v[1]]
        }
    }
    let e = ConjugateGradient::default().solve(&Indefinite, &[1.0, 1.0], None).unwrap_err().to_string();
    assert!(e.contains("not positive definite"), "{e}");
    let damped = Damped { inner: &Indefinite, damping: 2.0 };
    let (x, _) = ConjugateGradient::default().solve(&damped, &[1.0, 1.0], None).unwrap();
    assert!((x[0] - 1.0 / 3.0).abs() < 1e-12 && (x[1] - 1.0).abs() < 1e-12);
}

/// EK-FAC's re-fitted eigenvalues are, by definition, the diagonal of the exact GGN in the
/// Kronecker eigenbasis: Λ*_{js} = (q_a,j ⊗ q_s,s)ᵀ (G − λI) (q_a,j ⊗ q_s,s). On logistic
/// regression (one layer, G = H in closed form) that is checked entry by entry.
#[test]
fn ekfac_eigenvalues_are_the_exact_ggn_diagonal_in_the_kronecker_basis() {
    let o = trained(300, Architecture::LogReg, vec![], 1e-3);
    let h = hand_hessian(&o);
    let c = Curvature::fit(&o, &FitOptions { method: Method::Ekfac, ..FitOptions::default() }).unwrap();
    let k = c.fitted.as_any().downcast_ref::<culprit::curvature::kronecker::KroneckerFactors>().expect("ekfac factors");
    let layer = &k.layers[0];
    let (m, s) = (layer.m, layer.o);
    let mut worst: f64 = 0.0;
    let scale = layer.eigenvalues.iter().cloned().fold(0.0, f64::max);
    for j in 0..m {
        for t in 0..s {
            let v: Vec<f64> = (0..m * s).map(|idx| layer.q_a[(idx / s, j)] * layer.q_s[(idx % s, t)]).collect();
            let want = dot(&v, &matvec(&h, &v)) - o.l2;
            worst = worst.max((layer.eigenvalues[j * s + t] - want).abs() / scale);
        }
    }
    assert!(worst < 1e-10, "largest deviation {worst:e} (relative to the top eigenvalue)");
}

/// The factored self-influence of K-FAC and EK-FAC (rank-one gradients in the eigenbasis) equals
/// forming each example's gradient and solving with the same factors.
#[test]
fn factored_kronecker_self_influence_equals_solving_each_gradient() {
    let o = trained(300, Architecture::Mlp, vec![24, 12], 1e-3);
    let d = o.model.num_params();
    for method in [Method::Kfac, Method::Ekfac] {
        let c = Curvature::fit(&o, &FitOptions { method, damping: 1e-3, ..FitOptions::default() }).unwrap();
        let fast = culprit::curvature::self_influence::self_influence(&o, &c, &o.data).unwrap();
        let first = o.data.slice(0..40);
        let blocks = culprit::gradients::per_example_gradients(
            &o.model,
            &first,
            first.labels(),
            culprit::gradients::Measurement::TRAINING_LOSS,
        );
        let rows = culprit::gradients::gradient_rows_f64(&blocks);
        let g: Vec<Vec<f64>> = rows.chunks(d).map(<[f64]>::to_vec).collect();
        let solved = c.solve(&o, &g).unwrap();
        for (i, (gi, (x, _))) in g.iter().zip(&solved).enumerate() {
            let want = dot(gi, x);
            assert!((fast[i] - want).abs() <= 1e-9 * want.abs(), "{method:?} example {i}: {} vs {want}", fast[i]);
        }
    }
}

/// GGN products equal the dense GGN built from per-example, per-class gradients (an independent
/// path), for dense and convolutional layers.
/// An ill-conditioned problem (λ = 1e-7, κ ≈ 1e6) iterated on single-precision products from
/// start to end: the reliable updates (true f64 residuals replacing the recurrence's) carry it to
/// 1e-8 by the closed form, which f32 products alone could not reach (their error is ~1e-7 of a
/// product), and its solution agrees with f64 CG's.
#[test]
fn single_precision_cg_reaches_f64_tolerances_with_reliable_updates() {
    let o = trained(300, Architecture::LogReg, vec![], 1e-7);
    let h = hand_hessian(&o);
    let q = probe(o.model.num_params(), 3);
    let options = FitOptions { tolerance: Some(1e-8), ..with_precondition(Method::Cg, false) };
    let fitted = Curvature::fit(&o, &options).unwrap();
    let (x, info) = fitted.solve(&o, std::slice::from_ref(&q)).unwrap().remove(0);
    let (r, iterations) = (residual(&h, 0.0, &x, &q), info.unwrap().iterations);
    assert!(r <= 1.5e-8, "residual {r:e} after {iterations} iterations");
    let ggn = GaussNewton::new(&o, 128);
    let (reference, _) = ConjugateGradient { tolerance: 1e-8, max_iterations: 20_000 }.solve(&ggn, &q, None).unwrap();
    assert!(rel(&x, &reference) < 1e-4, "{:e} from f64 CG", rel(&x, &reference));
}

#[test]
fn ggn_products_equal_the_dense_ggn_for_every_layer_kind() {
    let data = digits(40);
    let device = Backend::default().autodiff_device();
    for (architecture, hidden) in
        [(Architecture::LogReg, vec![]), (Architecture::Mlp, vec![20]), (Architecture::Cnn, vec![8])]
    {
        let config = config(&data, architecture, hidden);
        let net = culprit_models::Network::init(&config, 3, &device, burn::tensor::DType::F64).unwrap();
        let o = Objective::new(&net, data.examples.clone(), 1e-3, &device);
        let d = o.model.num_params();
        let dense = culprit::curvature::dense::dense_ggn(&o, 16);
        let ggn = GaussNewton::new(&o, 16);
        let probes: Vec<Vec<f64>> = (0..3).map(|s| probe(d, s)).collect();
        let directions: Vec<&[f64]> = probes.iter().map(Vec::as_slice).collect();
        // One direction at a time, and all three in one shared pass (in f32 too: the MLP's
        // 3 × 20 hidden columns are more than one register panel, so its dense inputs take the
        // one-panel GEMM path of the row products, the sparse ones several panels).
        let single = GaussNewton::single_precision(&o, 16);
        let single_together = single.apply_many(&directions);
        for ((v, together), single_together) in probes.iter().zip(ggn.apply_many(&directions)).zip(single_together) {
            let want: Vec<f64> = (0..d).map(|i| (0..d).map(|j| dense[(i, j)] * v[j]).sum()).collect();
            let e = rel(&ggn.apply(v), &want);
            assert!(e < 1e-10, "{architecture:?}: relative error {e:e}");
            let e = rel(&together, &want);
            assert!(e < 1e-10, "{architecture:?}, three directions at once: relative error {e:e}");
            // Single-precision GEMMs: within 1e-5 relative (f32 rounds at 6e-8 per operand).
            let e = rel(&single.apply(v), &want);
            assert!(e < 1e-5, "{architecture:?}, single precision: relative error {e:e}");
            let e = rel(&single_together, &want);
            assert!(e < 1e-5, "{architecture:?}, single precision, three at once: relative error {e:e}");
        }
    }
}

/// The diagonal Fisher is the diagonal of the dense GGN (built independently from per-example,
/// per-class gradient rows), for dense and convolutional layers; its solves divide by it, its
/// factored self-influence equals forming each gradient, and it round-trips through its file.
#[test]
fn diagonal_fisher_is_the_diagonal_of_the_dense_ggn() {
    let data = digits(40);
    let device = Backend::default().autodiff_device();
    let dir = tempfile::tempdir().unwrap();
    for (architecture, hidden) in [(Architecture::Mlp, vec![12]), (Architecture::Cnn, vec![8])] {
        let config = config(&data, architecture, hidden);
        let net = Network::init(&config, 3, &device, burn::tensor::DType::F64).unwrap();
        let o = Objective::new(&net, data.examples.clone(), 1e-3, &device);
        let d = o.model.num_params();
        let dense = culprit::curvature::dense::dense_ggn(&o, 16);
        let damping = 0.01;
        let c = Curvature::fit(&o, &FitOptions { method: Method::Diagonal, damping, ..FitOptions::default() }).unwrap();
        let q = probe(d, 5);
        let x = &c.solve(&o, std::slice::from_ref(&q)).unwrap()[0].0;
        let worst =
            (0..d).map(|i| (x[i] * (dense[(i, i)] + damping) - q[i]).abs() / q[i].abs().max(1e-12)).fold(0.0, f64::max);
        assert!(worst < 1e-10, "{architecture:?}: x ⊙ (diag G + δ) vs q, worst relative error {worst:e}");
        let fast = culprit::curvature::self_influence::self_influence(&o, &c, &o.data).unwrap();
        let first = o.data.slice(0..8);
        let rows = culprit::gradients::gradient_rows_f64(&culprit::gradients::per_example_gradients(
            &o.model,
            &first,
            first.labels(),
            culprit::gradients::Measurement::TRAINING_LOSS,
        ));
        for (i, g) in rows.chunks(d).enumerate() {
            let want: f64 = g.iter().enumerate().map(|(j, v)| v * v / (dense[(j, j)] + damping)).sum();
            assert!((fast[i] - want).abs() <= 1e-9 * want, "{architecture:?} example {i}: {} vs {want}", fast[i]);
        }
        let path = dir.path().join(format!("diagonal-{architecture:?}.bin"));
        c.save(&path, "w", "d", o.l2).unwrap();
        let back = Curvature::load(&path, "w", "d", o.model.layers()).unwrap();
        assert_eq!(&back.solve(&o, std::slice::from_ref(&q)).unwrap()[0].0, x);
    }
}

//! The solvers' structure against the exact Gauss–Newton matrix built densely from per-example,
//! per-class gradients (an independent path): the null directions of ReLU and linear links, the
//! exact blocks of small layers, the near-linear units' coarse operator, and CG with all of them.

use burn::tensor::DType;
use culprit::curvature::dense::dense_ggn;
use culprit::curvature::kronecker;
use culprit::curvature::operators::{LinearOperator, dot, norm};
use culprit::curvature::symmetry::WithGauge;
use culprit::curvature::{Curvature, CurvatureSource, FitOptions, Method};
use culprit::objective::Objective;
use culprit::simd::{InstructionSet, KERNEL_VARIABLE};
use culprit_models::model::tracked_starts;
use culprit_models::train::train;
use culprit_models::{Activation, Architecture, Backend, Features, Model, Network, Silent, TrainConfig};
use faer::Mat;

use super::{config, digits, probe, rel, with_precondition};

fn times(m: &Mat<f64>, v: &[f64]) -> Vec<f64> {
    (0..m.nrows()).map(|i| (0..m.ncols()).map(|j| m[(i, j)] * v[j]).sum()).collect()
}

/// A ReLU (or `activation`) model of `architecture` on `rows` digits, at its initial θ.
fn untrained(
    rows: usize,
    architecture: Architecture,
    hidden: Vec<usize>,
    activation: Activation,
) -> Objective<Network> {
    let data = digits(rows);
    let config = culprit_models::ModelConfig { activation, ..config(&data, architecture, hidden) };
    let device = Backend::default().autodiff_device();
    let net = Network::init(&config, 7, &device, DType::F64).unwrap();
    Objective::new(&net, data.examples.clone(), 1e-3, &device)
}

/// Every null direction the unit links give is an eigenvector of the dense GGN with eigenvalue
/// exactly λ (‖(G − λI)w‖ ≤ 1e-10·‖G‖·‖w‖): the rescalings of an MLP's and a CNN's ReLU units
/// (channels through max-pooling, into a convolution's patches and into the flattened head) and
/// every mixing of the text model's linear embedding; Π_W is an orthogonal projector; tanh
/// gives none.
#[test]
fn link_directions_are_null_directions_of_the_dense_ggn() {
    for (architecture, hidden, activation, expected) in [
        (Architecture::Mlp, vec![12, 7], Activation::Relu, 12 + 7),
        (Architecture::Cnn, vec![8], Activation::Relu, 6 + 16 + 8),
        (Architecture::Text, vec![6], Activation::Relu, 36),
        (Architecture::Mlp, vec![12], Activation::Tanh, 0),
    ] {
        let o = untrained(40, architecture, hidden, activation);
        let null = o.null_space();
        assert_eq!(null.len(), expected, "{architecture:?} {activation:?}");
        let g = dense_ggn(&o, 16);
        let scale = (0..g.nrows()).map(|i| g[(i, i)].abs()).fold(0.0, f64::max);
        for w in null.vectors() {
            let mut dense = vec![0.0; o.dim()];
            w.indices.iter().zip(&w.values).for_each(|(&i, &x)| dense[i] = x);
            let gw = times(&g, &dense);
            let off: Vec<f64> = gw.iter().zip(&dense).map(|(a, b)| a - o.l2 * b).collect();
            assert!(
                norm(&off) <= 1e-10 * scale * norm(&dense),
                "{architecture:?}: ‖(G − λI)w‖ = {:e} for ‖w‖ = {:e}",
                norm(&off),
                norm(&dense)
            );
        }
        let v = probe(o.dim(), 3);
        let pv = null.component(&v);
        let ppv = null.component(&pv);
        assert!(rel(&ppv, &pv) < 1e-10 || norm(&pv) == 0.0, "{architecture:?}: Π² ≠ Π");
        let mut rest = v.clone();
        null.remove(&mut rest);
        for w in null.vectors() {
            let along: f64 = w.indices.iter().zip(&w.values).map(|(&i, &x)| x * rest[i]).sum();
            assert!(along.abs() <= 1e-10 * norm(&v), "{architecture:?}: (I − Π)v not orthogonal to W");
        }
    }
}

/// The exact blocks of the small layers are the dense GGN's diagonal blocks, + λ (dense layers
/// lie in θ in their view order), within 1e-10 relative.
#[test]
fn exact_layer_blocks_are_the_dense_ggn_diagonal_blocks() {
    let o = untrained(60, Architecture::Mlp, vec![12], Activation::Relu);
    let g = dense_ggn(&o, 16);
    let starts = tracked_starts(o.layers());
    let blocks = o.exact_blocks(o.l2, 1_000);
    assert_eq!(blocks.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![0, 1], "both layers are under 1000");
    for (l, block) in &blocks {
        let (start, size) = (starts[*l], o.layers()[*l].num_params());
        assert_eq!(block.nrows(), size);
        let scale = (0..size).map(|i| g[(start + i, start + i)]).fold(0.0, f64::max);
        for i in 0..size {
            for j in 0..size {
                let (got, want) = (block[(i, j)], g[(start + i, start + j)]);
                assert!((got - want).abs() <= 1e-10 * scale, "layer {l} ({i}, {j}): {got} vs {want}");
            }
        }
    }
    assert!(o.exact_blocks(o.l2, 200).iter().all(|(l, _)| *l == 1), "only the 130-parameter layer under 200");
}

/// A ReLU MLP whose first hidden units are near-linear: units 0–3 active on every digit, units
/// 4–9 on about 92% of them (bias at the 8th percentile of their input), the rest as drawn.
fn near_linear_mlp(rows: usize) -> Objective<Network> {
    let o = untrained(rows, Architecture::Mlp, vec![16], Activation::Relu);
    let layer = o.layers()[0].clone();
    let mut theta = o.theta();
    let (inputs, outputs) = (layer.inputs, layer.outputs);
    let x = o.data.features();
    for unit in 0..10 {
        let mut pre: Vec<f64> = (0..o.data.len())
            .map(|i| (0..inputs).map(|j| f64::from(x[i * inputs + j]) * theta[j * outputs + unit]).sum())
            .collect();
        pre.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let bias = if unit < 4 { 1.0 - pre[0] } else { -pre[pre.len() / 12] };
        theta[layer.weight_len() + unit] = bias;
    }
    let device = o.device.clone();
    let net = o.model.with_flat(&theta, &device, DType::F64).unwrap();
    // A small λ, so that the disagreements' curvature D dominates the coarse operator.
    Objective::new(&net, o.data.clone(), 1e-6, &device)
}

/// The coarse operator E of the near-linear units is GᵀAG exactly (its disagreement term
/// included): G E⁻¹ Gᵀ applied to A·G(e_ab) gives G(e_ab) back (1e-3: E⁻¹ is kept in f32), and the
/// two-level preconditioner around EK-FAC is symmetric and positive definite.
#[test]
fn gauge_coarse_operator_is_the_exact_curvature_on_its_span() {
    let o = near_linear_mlp(300);
    let gauge = o.gauge(o.l2).expect("near-linear units");
    assert!(gauge.units() >= 10, "{} units", gauge.units());
    let g = dense_ggn(&o, 32);
    let l = gauge.units();
    // Units 0–9 are L's first ten: pairs of two always-active units are exact symmetries (only
    // λ), pairs with a unit active on 92% carry the disagreements' curvature D ≫ λ.
    let mut curved = 0;
    for (a, b) in [(0, 1), (0, 5), (5, 0), (4, 7), (6, 6), (l - 1, 8)] {
        let v = gauge.direction(a, b, o.dim());
        let av = times(&g, &v);
        curved += usize::from(norm(&av) > 10.0 * o.l2 * norm(&v));
        let back = gauge.coarse_solve(&av);
        assert!(rel(&back, &v) < 1e-3, "pair ({a}, {b}): relative error {:e}", rel(&back, &v));
    }
    assert!(curved >= 3, "only {curved} of the pairs carry data curvature");
    let factors = kronecker::fit(&o, true, &FitOptions::new(Method::Ekfac)).unwrap();
    let inverse = factors.single_precision(0.0);
    let two_level = WithGauge { inner: &inverse, gauge: &gauge };
    let (x, y) = (probe(o.dim(), 1), probe(o.dim(), 2));
    let (px, py) = (two_level.apply(&x), two_level.apply(&y));
    let (xpy, ypx) = (dot(&x, &py), dot(&y, &px));
    assert!((xpy - ypx).abs() <= 1e-5 * xpy.abs().max(ypx.abs()), "not symmetric: {xpy} vs {ypx}");
    assert!(dot(&x, &px) > 0.0 && dot(&y, &py) > 0.0, "not positive");
}

/// A ReLU MLP trained on `rows` digits.
fn trained_relu(rows: usize, hidden: Vec<usize>, l2: f64) -> Objective<Network> {
    let data = digits(rows);
    let config =
        culprit_models::ModelConfig { activation: Activation::Relu, ..config(&data, Architecture::Mlp, hidden) };
    let device = Backend::default().autodiff_device();
    let training =
        TrainConfig { l2, epochs: 30, batch_size: 32, learning_rate: 3e-3, ..TrainConfig::defaults_for(&config) };
    let (net, _) = train(&config, &training, data.examples(), &device, &mut Silent).unwrap();
    Objective::new(&net, data.examples.clone(), l2, &device)
}

/// CG with everything (f32 products with f64 reliable updates, the null space deflated, the exact
/// last block, the coarse space, EK-FAC) and plain CG solve four queries of a trained ReLU MLP to
/// their tolerance against the dense GGN (with and without extra damping), and agree.
#[test]
fn cg_with_every_part_solves_against_the_dense_ggn() {
    let o = trained_relu(300, vec![24], 1e-4);
    assert!(!o.null_space().is_empty());
    let g = dense_ggn(&o, 32);
    let queries: Vec<Vec<f64>> = (0..4).map(|s| probe(o.dim(), 10 + s)).collect();
    for damping in [0.0, 1e-3] {
        let mut answers = Vec::new();
        for precondition in [true, false] {
            let options = FitOptions { tolerance: Some(1e-8), damping, ..with_precondition(Method::Cg, precondition) };
            let solved = Curvature::fit(&o, &options).unwrap().solve(&o, &queries).unwrap();
            for ((x, info), q) in solved.iter().zip(&queries) {
                let ax: Vec<f64> = times(&g, x).iter().zip(x).map(|(a, b)| a + damping * b).collect();
                let r = rel(&ax, q);
                let info = info.as_ref().unwrap();
                assert!(r <= 1.5e-8, "precondition {precondition}, δ {damping}: residual {r:e}");
                assert!(
                    (info.relative_residual - r).abs() <= 1e-9,
                    "reported {:e}, true {r:e}",
                    info.relative_residual
                );
            }
            answers.push(solved);
        }
        for ((a, _), (b, _)) in answers[0].iter().zip(&answers[1]) {
            assert!(rel(a, b) < 1e-5, "the two solutions differ by {:e}", rel(a, b));
        }
    }
}

/// Single-precision products of a ReLU MLP on sparse inputs (the digits with every value below
/// 0.6 set to zero: at most 30% non-zero, so the first layer goes through the row and column
/// tiles, its examples reordered) equal the dense GGN's within 1e-5, one direction and three at
/// once.
#[test]
fn single_precision_products_of_sparse_inputs_equal_the_dense_ggn() {
    let named = std::env::var(KERNEL_VARIABLE).ok().and_then(|v| InstructionSet::named(&v));
    if let Some(set) = named.filter(|s| InstructionSet::supported().contains(s)) {
        assert_eq!(InstructionSet::chosen(), set, "{KERNEL_VARIABLE} was not honoured");
    }
    let data = digits(90);
    let x: Vec<f32> = data.examples.features().iter().map(|v| if *v < 0.6 { 0.0 } else { *v }).collect();
    let density = x.iter().filter(|v| **v != 0.0).count() as f64 / x.len() as f64;
    assert!(density < 0.3, "density {density}");
    let sparse = Features::new(x, data.examples.labels().to_vec(), data.examples.dim());
    let config =
        culprit_models::ModelConfig { activation: Activation::Relu, ..config(&data, Architecture::Mlp, vec![20]) };
    let device = Backend::default().autodiff_device();
    let net = Network::init(&config, 3, &device, DType::F64).unwrap();
    let o = Objective::new(&net, sparse, 1e-3, &device);
    let g = dense_ggn(&o, 16);
    let single = o.gauss_newton_single(16).unwrap();
    let probes: Vec<Vec<f64>> = (0..3).map(|s| probe(o.dim(), 20 + s)).collect();
    let directions: Vec<&[f64]> = probes.iter().map(Vec::as_slice).collect();
    assert!(single.apply_many(&[]).is_empty(), "no directions, no products");
    for (v, together) in probes.iter().zip(single.apply_many(&directions)) {
        let want = times(&g, v);
        assert!(rel(&single.apply(v), &want) < 1e-5, "one direction: {:e}", rel(&single.apply(v), &want));
        assert!(rel(&together, &want) < 1e-5, "three at once: {:e}", rel(&together, &want));
    }
}

/// Dead ReLU units (5 of 20, their biases at −10³ so that no digit activates them) leave the
/// columns of the single-precision products; the products still equal the dense GGN within
/// 1e-5, on the digits as they are (about half non-zero: one GEMM a layer) and sparsified (the
/// tiles), one direction and three at once. The dense GGN's rows of those units' weights and
/// biases are λ's alone, so the dropped columns were all zero.
#[test]
fn single_precision_products_drop_dead_units_and_stay_exact() {
    const DEAD: [usize; 5] = [0, 3, 4, 11, 19];
    let data = digits(90);
    for sparsify in [false, true] {
        let x: Vec<f32> =
            data.examples.features().iter().map(|v| if sparsify && *v < 0.6 { 0.0 } else { *v }).collect();
        let features = Features::new(x, data.examples.labels().to_vec(), data.examples.dim());
        let o = untrained(90, Architecture::Mlp, vec![20], Activation::Relu);
        let layer = o.layers()[0].clone();
        let mut theta = o.theta();
        for unit in DEAD {
            theta[layer.weight_len() + unit] = -1e3;
        }
        let device = o.device.clone();
        let net = o.model.with_flat(&theta, &device, DType::F64).unwrap();
        let o = Objective::new(&net, features, 1e-3, &device);
        let g = dense_ggn(&o, 16);
        let dead_rows: Vec<usize> = (0..layer.inputs)
            .flat_map(|j| DEAD.map(|u| j * layer.outputs + u))
            .chain(DEAD.map(|u| layer.weight_len() + u))
            .collect();
        let l2 = o.l2;
        let only_l2 = |i: usize| (0..o.dim()).all(|j| g[(i, j)] == if i == j { l2 } else { 0.0 });
        assert!(dead_rows.iter().all(|&i| only_l2(i)), "dead units' curvature is λI alone");
        let single = o.gauss_newton_single(16).unwrap();
        let probes: Vec<Vec<f64>> = (0..3).map(|s| probe(o.dim(), 40 + s)).collect();
        let directions: Vec<&[f64]> = probes.iter().map(Vec::as_slice).collect();
        for (v, together) in probes.iter().zip(single.apply_many(&directions)) {
            let want = times(&g, v);
            let (one, three) = (rel(&single.apply(v), &want), rel(&together, &want));
            assert!(one < 1e-5 && three < 1e-5, "sparse {sparsify}: one direction {one:e}, three at once {three:e}");
            let only_l2 = dead_rows.iter().all(|&i| (together[i] - l2 * v[i]).abs() <= 1e-12 * (l2 * v[i]).abs());
            assert!(only_l2, "sparse {sparsify}: dead units' products are λv alone");
        }
    }
}

/// The narrower compiled copies of the product kernels (AVX2 on an AVX-512 CPU, the portable
/// one everywhere: row panels of 24 or 16 lanes, their tiles, the sparse gathers, the f64 sweeps)
/// pass the same tests as the widest: each test below reruns in a child process of this test
/// binary with `CULPRIT_KERNEL` narrowed to every set the CPU supports beneath its widest.
#[test]
fn narrower_instruction_sets_pass_the_product_tests() {
    if std::env::var_os(KERNEL_VARIABLE).is_some() {
        return; // in a child: the parent checks.
    }
    let binary = std::env::current_exe().unwrap();
    let narrower: Vec<InstructionSet> = InstructionSet::supported().into_iter().skip(1).collect();
    assert!(narrower.contains(&InstructionSet::Portable));
    for set in narrower {
        let name = format!("{set:?}").to_lowercase();
        for test in [
            "curvature::symmetry::single_precision_products_of_sparse_inputs_equal_the_dense_ggn",
            "curvature::symmetry::single_precision_products_drop_dead_units_and_stay_exact",
            "curvature::ggn_products_equal_the_dense_ggn_for_every_layer_kind",
            "curvature::single_precision_cg_reaches_f64_tolerances_with_reliable_updates",
        ] {
            let out = std::process::Command::new(&binary)
                .args([test, "--exact", "--test-threads=1"])
                .env(KERNEL_VARIABLE, &name)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{test} with {KERNEL_VARIABLE}={name}:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

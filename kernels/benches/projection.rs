//! The fused Kronecker projection kernel beside its plain-burn reference (two batched matmuls
//! projecting the factors and a third for Σₜ ãₜδ̃ₜᵀ) on the same device: per-example projected
//! gradients per second for one layer.
//!
//! `cargo bench --workspace --features gpu --bench projection`; the adapter comes from
//! `CULPRIT_BENCH_GPU_DEVICE` (`cpu` for lavapipe, default: wgpu's default adapter), the sizes
//! from `CULPRIT_BENCH_BATCH` (default 64), `_INPUTS` (768), `_OUTPUTS` (768), `_POSITIONS` (128)
//! and `_K` (32, both sides): by default a GPT-2 attention projection over 128 tokens. On
//! lavapipe the numbers measure the Vulkan CPU driver, not a GPU.

use burn::tensor::{DType, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use culprit_kernels::projection::{KroneckerSides, kron_project, reference_kron_project};

fn size(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bench(c: &mut Criterion) {
    let (b, m, o, l, k) = (
        size("CULPRIT_BENCH_BATCH", 64),
        size("CULPRIT_BENCH_INPUTS", 768),
        size("CULPRIT_BENCH_OUTPUTS", 768),
        size("CULPRIT_BENCH_POSITIONS", 128),
        size("CULPRIT_BENCH_K", 32),
    );
    let kind = match std::env::var("CULPRIT_BENCH_GPU_DEVICE").as_deref() {
        Ok("cpu") => burn::tensor::DeviceKind::Cpu,
        _ => burn::tensor::DeviceKind::DefaultDevice,
    };
    let device = burn::tensor::Device::wgpu_options().device_kind(kind).init().expect("a wgpu adapter");
    let tensor = |dims: Vec<usize>, phase: f32| {
        let v: Vec<f32> = (0..dims.iter().product::<usize>()).map(|i| ((i as f32) * phase).sin()).collect();
        TensorData::new(v, dims)
    };
    let a = Tensor::<3>::from_data(tensor(vec![b, m, l], 0.618), (&device, DType::F32));
    let d = Tensor::<3>::from_data(tensor(vec![b, o, l], 0.377), (&device, DType::F32));
    let p_in = Tensor::<2>::from_data(tensor(vec![m, k], 0.271), (&device, DType::F32));
    let p_bias = Tensor::<2>::from_data(tensor(vec![1, k], 0.5), (&device, DType::F32));
    let p_out = Tensor::<2>::from_data(tensor(vec![o, k], 0.141), (&device, DType::F32));
    let sides = KroneckerSides { p_in: Some((&p_in, Some(&p_bias))), p_out: Some(&p_out), bias: true };
    // burn's `into_data` reads lazily; a device sync waits for the work.
    let sync = |t: Tensor<2>| {
        device.sync().expect("the device runs");
        t
    };
    let flops = 2.0 * (b * l * (m * k + o * k + k * k)) as f64;
    let mut group = c.benchmark_group(format!("kron:{k}x{k} projection, batch {b}, {m} → {o}, {l} positions"));
    group.sample_size(10);
    group.throughput(Throughput::Elements(b as u64));
    group.bench_function("fused kernel", |bench| {
        bench.iter(|| sync(kron_project(&a, &d, &sides).expect("a wgpu device")))
    });
    group.bench_function("plain burn (three batched matmuls)", |bench| {
        bench.iter(|| sync(reference_kron_project(&a, &d, &sides)))
    });
    group.finish();
    let started = std::time::Instant::now();
    let reps = 3;
    for _ in 0..reps {
        sync(kron_project(&a, &d, &sides).expect("a wgpu device"));
    }
    let seconds = started.elapsed().as_secs_f64() / f64::from(reps);
    println!("fused kernel: {:.0} examples/s, {:.2} GFLOP/s", b as f64 / seconds, flops / seconds / 1e9);
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! The fused top-k scoring kernel against its roofline: store bytes read per second and flops
//! per second, beside the plain-burn reference (matmul + host top-k) on the same device.
//!
//! `cargo bench -p culprit-kernels --features gpu --bench scoring`; the adapter comes from
//! `CULPRIT_BENCH_GPU_DEVICE` (`cpu` for lavapipe, default: wgpu's default adapter), the sizes
//! from `CULPRIT_BENCH_ROWS` (default 100000), `_DIM` (256) and `_QUERIES` (8). On lavapipe the
//! numbers measure the Vulkan CPU driver, not a GPU. A second group scores factored rows (`factors`
//! stores: [ã; δ̃] per row, ãᵀQδ̃ per query) of one `_FACTOR` × `_FACTOR` layer (default 32).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use culprit_kernels::scoring::WgpuDeviceKind;
use culprit_kernels::scoring::{RowBlock, TopKScoring, device, reference_top_k, reference_top_k_blocks};

fn size(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bench(c: &mut Criterion) {
    let (n, d, q, k) =
        (size("CULPRIT_BENCH_ROWS", 100_000), size("CULPRIT_BENCH_DIM", 256), size("CULPRIT_BENCH_QUERIES", 8), 32);
    let kind = match std::env::var("CULPRIT_BENCH_GPU_DEVICE").as_deref() {
        Ok("cpu") => Some(WgpuDeviceKind::Cpu),
        _ => None,
    };
    let burn_kind =
        if kind.is_some() { burn::tensor::DeviceKind::Cpu } else { burn::tensor::DeviceKind::DefaultDevice };
    let burn_device = burn::tensor::Device::wgpu_options().device_kind(burn_kind).init().expect("a wgpu adapter");
    let scoring = TopKScoring::new(&device(kind));
    let rows: Vec<f32> = (0..n * d).map(|i| ((i as f32) * 0.618).sin()).collect();
    let queries: Vec<f32> = (0..q * d).map(|i| ((i as f32) * 0.377).cos()).collect();
    let bytes = (n * d * 4) as u64;
    let flops = 2.0 * (n * d * q) as f64;
    let mut group = c.benchmark_group(format!("top-{k} scoring, {n} rows × {d}, {q} queries"));
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("fused kernel", |b| b.iter(|| scoring.top_k(&rows, &queries, d, k)));
    group.bench_function("plain burn (matmul + host top-k)", |b| {
        b.iter(|| reference_top_k(&burn_device, &rows, &queries, d, k))
    });
    group.finish();
    let started = std::time::Instant::now();
    let reps = 3;
    for _ in 0..reps {
        std::hint::black_box(scoring.top_k(&rows, &queries, d, k));
    }
    let seconds = started.elapsed().as_secs_f64() / f64::from(reps);
    println!(
        "fused kernel: {:.2} GB/s of store rows (including the host upload), {:.2} GFLOP/s",
        bytes as f64 / seconds / 1e9,
        flops / seconds / 1e9
    );

    // Factored rows: k_in + k_out values a row, k_in·k_out a query.
    let f = size("CULPRIT_BENCH_FACTOR", 32);
    let layout = [RowBlock::Factored { row_offset: 0, query_offset: 0, k_in: f, k_out: f }];
    let rows: Vec<f32> = (0..n * 2 * f).map(|i| ((i as f32) * 0.618).sin()).collect();
    let queries: Vec<f32> = (0..q * f * f).map(|i| ((i as f32) * 0.377).cos()).collect();
    let bytes = (n * 2 * f * 4) as u64;
    let flops = 2.0 * (n * q * f * (f + 1)) as f64;
    let mut group = c.benchmark_group(format!("top-{k} scoring, {n} factored rows {f}×{f}, {q} queries"));
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes));
    group
        .bench_function("fused kernel", |b| b.iter(|| scoring.top_k_blocks(&rows, 2 * f, &queries, f * f, &layout, k)));
    group.bench_function("plain burn (outer products, matmul, host top-k)", |b| {
        b.iter(|| reference_top_k_blocks(&burn_device, &rows, 2 * f, &queries, f * f, &layout, k))
    });
    group.finish();
    let started = std::time::Instant::now();
    for _ in 0..reps {
        std::hint::black_box(scoring.top_k_blocks(&rows, 2 * f, &queries, f * f, &layout, k));
    }
    let seconds = started.elapsed().as_secs_f64() / f64::from(reps);
    println!(
        "fused kernel, factored rows: {:.2} GB/s of store rows, {:.2} GFLOP/s",
        bytes as f64 / seconds / 1e9,
        flops / seconds / 1e9
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! culprit's benchmarks (criterion). Run with `cargo bench --bench bench_main [-- FILTER]`.
//!
//! - `per_example_gradients`: gradients/s for the MLP 784-512-256-10 at batch 256 on MNIST-shaped
//!   inputs: layer taps (exact, JL, Kronecker projections; flex and ndarray backends) against the
//!   naive one-backward-per-example loop, all measured in the same run.
//! - `cache`: `culprit cache`'s work end to end (tapped forward and backward, the default exact
//!   `factors` rows and `kron:32x32` projections, the finiteness check, shards written and synced)
//!   for the MLP 784-512-256-10 over 4096 MNIST-shaped examples in batches of 256, against one
//!   plain forward and backward of the batch's mean loss (every parameter's gradient, as a
//!   training step computes it) over the same examples.
//! - `store`: gradient-store write and read throughput (GB/s) against plain file write and
//!   memory read baselines of the same bytes.
//! - `scoring`: a batch of 8 queries scored against a synthetic store of 1M rows × 2048 f32
//!   (8 GiB; `CULPRIT_BENCH_ROWS` changes the row count) with top-k, against a plain parallel
//!   read of the same memory-mapped bytes.
//! - `language_model`: a GPT (2 layers, width 64, context 128, bytes) on 16 documents of 128
//!   tokens: a plain training step (forward and backward of the batch's loss, every parameter's
//!   gradient), against per-document LoGra gradients (`kron:32x32`, one tapped backward); and an
//!   EK-FAC fit on 64 documents against a training epoch over the same 64 (4 such steps).
//!
//! The trigger scan's bench is `benches/scan.rs`.

use std::time::Duration;

use burn::tensor::DType;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use culprit::gradients::projection::{ProjectionSpec, Projector};
use culprit::gradients::{Measurement, layer_factors, per_example_loop};
use culprit::store::{Dtype, GradientStore, StoreKey, StoreManifest, write_shard};
use culprit_models::{Activation, Architecture, Backend, Features, InputShape, Model, ModelConfig, Network};
use rand::{Rng, SeedableRng};

const BATCH: usize = 256;

fn mnist_like(n: usize) -> (Vec<f32>, Vec<u32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let x = (0..n * 784).map(|_| if rng.random::<f32>() < 0.8 { 0.0 } else { rng.random::<f32>() }).collect();
    let y = (0..n).map(|_| rng.random_range(0..10)).collect();
    (x, y)
}

fn mlp() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Mlp,
        input: InputShape { channels: 1, height: 28, width: 28 },
        num_classes: 10,
        hidden: vec![512, 256],
        activation: Activation::Relu,
    }
}

fn per_example_gradients(c: &mut Criterion) {
    let (x, y) = mnist_like(BATCH);
    let batch = Features::new(x, y.clone(), 784);
    let mut group = c.benchmark_group("per_example_gradients");
    group.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(BATCH as u64));
    // Baseline: just writing B exact rows of #θ floats (what any exact method must at least do).
    let params = mlp().num_params().unwrap();
    group.bench_function("baseline_write_exact_rows", |b| {
        use rayon::prelude::*;
        b.iter(|| {
            let mut rows = vec![0.0f32; BATCH * params];
            rows.par_chunks_mut(params).enumerate().for_each(|(i, r)| r.iter_mut().for_each(|v| *v = i as f32));
            rows
        })
    });
    for backend in [Backend::Flex, Backend::NdArray] {
        let device = backend.autodiff_device();
        let net = Network::init(&mlp(), 0, &device, DType::F32).unwrap();
        let specs: &[&str] =
            if backend == Backend::Flex { &["none", "factors", "jl:512", "kron:32x32"] } else { &["none"] };
        for spec in specs {
            let projector = Projector::new(ProjectionSpec::parse(spec).unwrap(), 0, net.layers(), &device).unwrap();
            group.bench_function(BenchmarkId::new(format!("taps/{}", backend.name()), spec), |b| {
                b.iter(|| {
                    let factors = layer_factors(&net, &batch, &y, Measurement::TRAINING_LOSS);
                    projector.project_rows(&factors)
                })
            });
        }
        group.bench_function(BenchmarkId::new(format!("naive_loop/{}", backend.name()), "none"), |b| {
            b.iter(|| per_example_loop(&net, &batch, &y, Measurement::TRAINING_LOSS))
        });
    }
    group.finish();
}

fn cache(c: &mut Criterion) {
    use culprit::store::build::{StoreLayout, build};
    use culprit_models::Batch;
    use culprit_models::network::{cross_entropy, one_hot};
    const N: usize = 4096;
    let (x, y) = mnist_like(N);
    let data = Features::new(x, y, 784);
    let device = Backend::Flex.autodiff_device();
    let net = Network::init(&mlp(), 0, &device, DType::F32).unwrap();
    let mut group = c.benchmark_group("cache");
    group.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Elements(N as u64));
    let trainable = net.clone().require_grad();
    group.bench_function("baseline_plain_forward_backward", |b| {
        b.iter(|| {
            let mut total = 0;
            for start in (0..N).step_by(BATCH) {
                let batch = data.slice(start..(start + BATCH).min(N));
                let labels = Batch::labels(&batch).into_owned();
                let target = one_hot(&labels, 10, &device, DType::F32);
                let loss = cross_entropy(trainable.logits(&batch), target).mean();
                let grads = loss.backward();
                // Every parameter's gradient, read back as a training step's optimiser would use it.
                total += trainable
                    .parameters()
                    .iter()
                    .map(|p| p.grad(&grads).unwrap().into_data().num_elements())
                    .sum::<usize>();
            }
            total
        })
    });
    for spec in ["factors", "kron:32x32"] {
        let key = StoreKey { weights_sha256: "w".into(), data_sha256: "d".into(), projection: spec.into(), seed: 0 };
        let layout = StoreLayout {
            projection: ProjectionSpec::parse(spec).unwrap(),
            seed: 0,
            dtype: Dtype::F32,
            batch: BATCH,
            rows_per_shard: None,
            part: None,
        };
        group.bench_function(BenchmarkId::new("store_build", spec), |b| {
            b.iter(|| {
                let dir = tempfile::tempdir().unwrap();
                let store = dir.path().join("gradients");
                build(&store, key.clone(), &net, &data, &layout, &mut culprit_models::train::Silent).unwrap()
            })
        });
    }
    group.finish();
}

fn store(c: &mut Criterion) {
    let rows = 4096;
    let row_len = 8192; // 128 MiB of f32 in 4 shards
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let data: Vec<f32> = (0..rows * row_len).map(|_| rng.random::<f32>() - 0.5).collect();
    let key = StoreKey { weights_sha256: "w".into(), data_sha256: "d".into(), projection: "none".into(), seed: 0 };
    let manifest = StoreManifest::new(key.clone(), Dtype::F32, rows, row_len, vec![], 1024);
    let dir = tempfile::tempdir().unwrap();
    let bytes = (rows * row_len * 4) as u64;
    let mut group = c.benchmark_group("store");
    group.sample_size(10).measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Bytes(bytes));
    // Baseline: the same bytes written to plain files and synced, as the store syncs its shards.
    group.bench_function("write/baseline_plain_files_synced", |b| {
        b.iter(|| {
            for (i, chunk) in data.chunks(1024 * row_len).enumerate() {
                let path = dir.path().join(format!("plain-{i}"));
                std::fs::write(&path, bytemuck::cast_slice::<f32, u8>(chunk)).unwrap();
                std::fs::File::open(&path).unwrap().sync_all().unwrap();
            }
        })
    });
    group.bench_function("write/shards", |b| {
        b.iter(|| {
            manifest.write(dir.path()).unwrap();
            for (i, chunk) in data.chunks(1024 * row_len).enumerate() {
                write_shard(
                    &dir.path().join(&manifest.shards[i].file),
                    &GradientStore::expected_header(&manifest, i),
                    chunk,
                )
                .unwrap();
            }
        })
    });
    group.bench_function("read/baseline_memory_sum", |b| b.iter(|| data.iter().sum::<f32>()));
    group.bench_function("read/open_verify_and_sum", |b| {
        b.iter(|| {
            let store = GradientStore::open(dir.path(), &key).unwrap();
            let mut total = 0.0f32;
            store.for_each_block(1024, |_, block| total += block.iter().sum::<f32>());
            total
        })
    });
    group.finish();
}

fn scoring(c: &mut Criterion) {
    let rows: usize = std::env::var("CULPRIT_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1 << 20);
    let row_len = 2048;
    let per_shard = 65536;
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let key = StoreKey { weights_sha256: "w".into(), data_sha256: "d".into(), projection: "jl:2048".into(), seed: 0 };
    let manifest = StoreManifest::new(key.clone(), Dtype::F32, rows, row_len, vec![], per_shard);
    manifest.write(dir.path()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for (i, info) in manifest.shards.iter().enumerate() {
        let data: Vec<f32> = (0..info.rows * row_len).map(|_| rng.random::<f32>() - 0.5).collect();
        write_shard(&dir.path().join(&info.file), &GradientStore::expected_header(&manifest, i), &data).unwrap();
    }
    let store = GradientStore::open(dir.path(), &key).unwrap();
    let queries: Vec<Vec<f32>> = (0..8).map(|_| (0..row_len).map(|_| rng.random::<f32>() - 0.5).collect()).collect();
    let mut group = c.benchmark_group("scoring");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Bytes((rows * row_len * 4) as u64));
    group.bench_function("baseline_parallel_memory_read", |b| {
        use rayon::prelude::*;
        b.iter(|| {
            store
                .shards
                .par_iter()
                .map(|s| {
                    // Integer lanes: the compiler vectorises this, so it runs at memory speed.
                    let words: &[u64] = bytemuck::cast_slice(s.as_f32().unwrap());
                    words.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, w| a ^ w)).reduce(|| 0, |a, b| a ^ b)
                })
                .reduce(|| 0, |a, b| a ^ b)
        })
    });
    // One pass over the store serves a batch of queries; up to a few queries it is bound by
    // memory, beyond that by the multiply-adds (each query costs one per element read).
    for nq in [1usize, 4, 8, 16] {
        let batch: Vec<Vec<f32>> = (0..nq).map(|j| queries[j % queries.len()].clone()).collect();
        group.bench_function(format!("score_{nq}_queries_top_100"), |b| {
            b.iter(|| culprit::query::score_store(&store, &batch, 1.0, 100, false))
        });
    }
    group.bench_function("score_8_queries_no_top_k", |b| {
        b.iter(|| culprit::query::score_store(&store, &queries, 1.0, 0, false))
    });
    group.finish();
}

/// The same Kronecker-projected gradients of an MLP 784-256-10 (kron:64x64: layer 0 is 64×64,
/// layer 1 is 64×10) stored as products (`kron`, 4736 values a row) and as factors (`factors`,
/// 202 values a row), scored with 8 queries: rows per second of each.
fn scoring_factors(c: &mut Criterion) {
    use culprit::gradients::projection::BlockLayout;
    let rows: usize = 200_000;
    let layers = [("dense0", 64usize, 64usize), ("dense1", 64, 10)];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let dirs: Vec<(tempfile::TempDir, GradientStore)> = [false, true]
        .into_iter()
        .map(|factored| {
            let mut layout = Vec::new();
            let mut offset = 0;
            for (name, ki, ko) in layers {
                let len = if factored { ki + ko } else { ki * ko };
                layout.push(BlockLayout { name: name.into(), offset, len, kron: Some((ki, ko)), factored });
                offset += len;
            }
            let row_len = offset;
            let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
            let projection = if factored { "factors:64x64" } else { "kron:64x64" };
            let key = StoreKey {
                weights_sha256: "w".into(),
                data_sha256: "d".into(),
                projection: projection.into(),
                seed: 0,
            };
            let manifest = StoreManifest::new(key.clone(), Dtype::F32, rows, row_len, layout, 65536);
            manifest.write(dir.path()).unwrap();
            for (i, info) in manifest.shards.iter().enumerate() {
                let data: Vec<f32> = (0..info.rows * row_len).map(|_| rng.random::<f32>() - 0.5).collect();
                write_shard(&dir.path().join(&info.file), &GradientStore::expected_header(&manifest, i), &data)
                    .unwrap();
            }
            let store = GradientStore::open(dir.path(), &key).unwrap();
            (dir, store)
        })
        .collect();
    let query_len: usize = layers.iter().map(|(_, a, b)| a * b).sum();
    let queries: Vec<Vec<f32>> = (0..8).map(|_| (0..query_len).map(|_| rng.random::<f32>() - 0.5).collect()).collect();
    let mut group = c.benchmark_group("scoring_factors");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(rows as u64));
    for ((_, store), name) in dirs.iter().zip(["kron_rows_8_queries", "factor_rows_8_queries"]) {
        group.bench_function(name, |b| b.iter(|| culprit::query::score_store(store, &queries, 1.0, 100, false)));
    }
    group.finish();
}

/// `n` documents of 128 byte tokens: Python-like lines, shifted so no two are equal.
fn documents(n: usize) -> culprit_models::Tokens {
    let text = "def update(self, key, value):\n    if key in self.cache:\n        return self.cache[key]\n    self.cache[key] = value\n    return value\n";
    let bytes: Vec<u32> = text.bytes().cycle().take(128 + n).map(u32::from).collect();
    culprit_models::Tokens::new((0..n).map(|i| bytes[i..i + 128].to_vec()).collect())
}

fn language_model(c: &mut Criterion) {
    use culprit::curvature::{Curvature, FitOptions, Method};
    use culprit::objective::Objective;
    use culprit_models::network::{cross_entropy, one_hot};
    use culprit_models::{Batch, Gpt, GptConfig};
    let config = GptConfig { vocab: 256, context: 128, width: 64, layers: 2, heads: 4, inner: 256, epsilon: 1e-5 };
    let device = Backend::Flex.autodiff_device();
    let gpt = Gpt::init(&config, 0, &device, DType::F32).unwrap().require_grad();
    let batch = documents(16);
    let labels = batch.labels().into_owned();
    let train_step = |gpt: &Gpt, batch: &culprit_models::Tokens| {
        let labels = batch.labels().into_owned();
        let logits = gpt.logits(batch);
        let y = one_hot(&labels, 256, &device, DType::F32);
        let grads = cross_entropy(logits, y).sum().div_scalar(batch.len() as f64).backward();
        gpt.parameters().iter().map(|p| p.grad(&grads).expect("every parameter").dims()[0]).sum::<usize>()
    };
    let mut group = c.benchmark_group("language_model");
    group.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(16));
    group.bench_function("train_step", |b| b.iter(|| train_step(&gpt, &batch)));
    let projector = Projector::new(ProjectionSpec::parse("kron:32x32").unwrap(), 0, gpt.layers(), &device).unwrap();
    group.bench_function(BenchmarkId::new("projected_gradients", "kron:32x32"), |b| {
        b.iter(|| {
            let factors = layer_factors(&gpt, &batch, &labels, Measurement::TRAINING_LOSS);
            projector.project_rows(&factors)
        })
    });
    let data = documents(64);
    group.throughput(Throughput::Elements(64));
    group.bench_function("train_epoch_64", |b| {
        b.iter(|| (0..4).map(|k| train_step(&gpt, &data.slice(16 * k..16 * (k + 1)))).sum::<usize>())
    });
    let objective = Objective::in_dtype(&gpt, data.clone(), 1e-4, &device, DType::F32);
    group.bench_function("ekfac_fit_64", |b| {
        b.iter(|| Curvature::fit(&objective, &FitOptions { chunk: 16, ..FitOptions::new(Method::Ekfac) }).unwrap())
    });
    group.finish();
}

criterion_group!(benches, per_example_gradients, cache, store, scoring, scoring_factors, language_model);
criterion_main!(benches);

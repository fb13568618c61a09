//! The trigger scan's speed (criterion): `cargo bench --bench scan [-- FILTER]`.
//!
//! `culprit scan`'s documents/s on 2000 SpamAssassin e-mails (`../shared`; skipped when absent)
//! and images/s on 2000 MNIST-shaped images, each beside the plain base-rate count of the same
//! features in a hash map (one pass, one thread, no baseline: the Z-defence statistic's work)
//! and the base-rate z-scan (`--baseline none`), in the same run.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};

fn mnist_like(n: usize) -> (Vec<f32>, Vec<u32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let x = (0..n * 784).map(|_| if rng.random::<f32>() < 0.8 { 0.0 } else { rng.random::<f32>() }).collect();
    let y = (0..n).map(|_| rng.random_range(0..10)).collect();
    (x, y)
}

/// Counts every (example, feature) pair per label in a hash map: the plain z-scan's work.
fn base_rate_counts(data: &dyn culprit::scan::Scanned) -> usize {
    let mut counts: std::collections::HashMap<u64, [u32; 2]> = std::collections::HashMap::new();
    for i in 0..data.examples() {
        let y = (data.label(i) as usize).min(1);
        data.visit(i, false, &mut |key, _| counts.entry(key).or_default()[y] += 1);
    }
    counts.len()
}

fn scan(c: &mut Criterion) {
    use culprit::scan::{ScanSettings, image::ImageScan, scan, text::TextScan};
    culprit::keep_freed_memory();
    let settings = ScanSettings::default();
    let mut group = c.benchmark_group("scan");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    let spam =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/spamassassin/spamassassin.jsonl.gz");
    if spam.exists() {
        let (texts, labels, _) = culprit::data::text::load_texts(&spam).unwrap();
        // Every third e-mail (the file is sorted by group): both labels.
        let texts: Vec<String> = texts.into_iter().step_by(3).take(2000).collect();
        let labels: Vec<u32> = labels.into_iter().step_by(3).take(2000).collect();
        let ids: Vec<usize> = (0..texts.len()).collect();
        group.throughput(Throughput::Elements(texts.len() as u64));
        group.bench_function("spamassassin 2000 e-mails, scan", |b| {
            b.iter(|| {
                let data = TextScan::new(&texts, &labels, 2, 3, settings.floor, settings.l2);
                scan(&data, &ids, &settings, &mut culprit::progress::Bar::new(true)).candidates.len()
            })
        });
        let data = TextScan::new(&texts, &labels, 2, 3, settings.floor, settings.l2);
        group.bench_function("spamassassin 2000 e-mails, base-rate counts", |b| b.iter(|| base_rate_counts(&data)));
        let plain = ScanSettings { l2: None, ..settings.clone() };
        group.bench_function("spamassassin 2000 e-mails, z-scan (base rates, no baseline)", |b| {
            b.iter(|| {
                let data = TextScan::new(&texts, &labels, 2, 3, plain.floor, None);
                scan(&data, &ids, &plain, &mut culprit::progress::Bar::new(true)).candidates.len()
            })
        });
    } else {
        eprintln!("scan: skipped the e-mails ({} not found)", spam.display());
    }
    let (pixels, labels) = mnist_like(2000);
    let ids: Vec<usize> = (0..labels.len()).collect();
    group.throughput(Throughput::Elements(labels.len() as u64));
    group.bench_function("28x28 images 2000, squares 2..5, scan", |b| {
        b.iter(|| {
            let data = ImageScan::new(&pixels, &labels, 10, (28, 28), 2..=5, settings.floor, settings.l2);
            scan(&data, &ids, &settings, &mut culprit::progress::Bar::new(true)).candidates.len()
        })
    });
    let data = ImageScan::new(&pixels, &labels, 10, (28, 28), 2..=5, settings.floor, settings.l2);
    group.bench_function("28x28 images 2000, base-rate counts", |b| b.iter(|| base_rate_counts(&data)));
    group.finish();
}

criterion_group!(benches, scan);
criterion_main!(benches);

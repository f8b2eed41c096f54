//! Criterion benchmarks of ring lookup, ring build and `diff`, next to the
//! `consistent_hash_ring` crate at the same token count.
//!
//! `cargo bench --bench ring -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use consistent_hash_ring::{migrated_ranges, Ring, RingBuilder};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ringkv::ring::{key_hash, HashRing, DEFAULT_VNODES};

/// Lookups cycle through this many distinct keys, so they do not all hit one cache line.
const KEY_COUNT: usize = 1024;

fn view(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.10.{}.{}:13800", i / 250, 4 + i % 250))
        .collect()
}

fn keys() -> Vec<Vec<u8>> {
    (0..KEY_COUNT)
        .map(|i| format!("key{i}").into_bytes())
        .collect()
}

fn other_ring(view: &[String], vnodes: u32) -> Ring<&str> {
    RingBuilder::default()
        .vnodes(vnodes as usize)
        .nodes_iter(view.iter().map(String::as_str))
        .build()
}

fn lookup(c: &mut Criterion) {
    let keys = keys();
    let hashes: Vec<u64> = keys.iter().map(|k| key_hash(k)).collect();
    let mut group = c.benchmark_group("lookup");
    group.bench_function("key_hash alone", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % KEY_COUNT;
            black_box(key_hash(black_box(&keys[i])));
        })
    });
    for (vnodes, nodes) in [(256, 4), (256, 64), (DEFAULT_VNODES, 64)] {
        let label = format!("{vnodes}x{nodes}");
        let view = view(nodes);
        let ring = HashRing::new(&view, vnodes).unwrap();
        let other = other_ring(&view, vnodes);

        group.bench_function(BenchmarkId::new("ringkv owner", &label), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % KEY_COUNT;
                black_box(ring.owner(black_box(&keys[i])));
            })
        });
        group.bench_function(BenchmarkId::new("ringkv owner_of_hash", &label), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % KEY_COUNT;
                black_box(ring.owner_of_hash(black_box(hashes[i])));
            })
        });
        group.bench_function(BenchmarkId::new("consistent_hash_ring get", &label), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % KEY_COUNT;
                black_box(other.get(black_box(keys[i].as_slice())));
            })
        });
    }
    group.finish();
}

fn build(c: &mut Criterion) {
    let view = view(64);
    let mut group = c.benchmark_group("build");
    group.sample_size(20);
    group.bench_function(
        BenchmarkId::new("ringkv new", format!("{DEFAULT_VNODES}x64")),
        |b| b.iter(|| HashRing::new(black_box(&view), DEFAULT_VNODES).unwrap()),
    );
    group.finish();
}

fn diff(c: &mut Criterion) {
    let (before, after) = (view(64), view(65));
    let mut group = c.benchmark_group("diff 64->65");
    group.sample_size(20);
    for vnodes in [256, DEFAULT_VNODES] {
        let label = format!("{vnodes}");
        let old = HashRing::new(&before, vnodes).unwrap();
        let new = HashRing::new(&after, vnodes).unwrap();
        group.bench_function(BenchmarkId::new("ringkv diff", &label), |b| {
            b.iter(|| HashRing::diff(black_box(&old), black_box(&new)))
        });
        let (other_old, other_new) = (other_ring(&before, vnodes), other_ring(&after, vnodes));
        group.bench_function(
            BenchmarkId::new("consistent_hash_ring migrated_ranges", &label),
            |b| {
                b.iter(|| {
                    migrated_ranges(black_box(&other_old), black_box(&other_new))
                        .collect::<Vec<_>>()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, lookup, build, diff);
criterion_main!(benches);

//! How many keys move on a view change, and how evenly keys spread, for modulo hashing,
//! jump consistent hash, rendezvous (HRW) hashing and the ring at several vnode counts.
//!
//! Prints three tables to stdout: movement per scenario, balance over random address sets,
//! and the average moved/ideal per scheme. `cargo bench --bench movement` runs the full
//! sizes (200,000 keys, 20 address sets); without `--bench` in the arguments (as
//! `cargo test --benches` runs it) it uses small sizes so it finishes in seconds in debug.

use std::collections::{BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringkv::ring::{key_hash, HashRing, DEFAULT_VNODES};
use xxhash_rust::xxh3::xxh3_64;

/// Vnode counts of the ring rows: 16, 64, 256 and the default, plus the neighbours of
/// the default and a larger count to show the trend.
fn vnode_counts() -> Vec<u32> {
    let mut counts: BTreeSet<u32> = [16, 64, 256, 512, 1024, 2048, 4096].into();
    counts.insert(DEFAULT_VNODES);
    counts.into_iter().collect()
}

/// A key and its ring hash, computed once.
struct Key {
    bytes: Vec<u8>,
    hash: u64,
}

fn keys(count: usize) -> Vec<Key> {
    (0..count)
        .map(|i| {
            let bytes = format!("key{i}").into_bytes();
            let hash = key_hash(&bytes);
            Key { bytes, hash }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scheme {
    /// `hash % N` over the view in listed order.
    Modulo,
    /// Lamping–Veach jump consistent hash over the view in listed order.
    Jump,
    /// Highest random weight: the node with the largest `xxh3(addr + key)` wins.
    Rendezvous,
    /// `HashRing` with this many vnodes per node.
    Ring(u32),
}

impl Scheme {
    fn name(&self) -> String {
        match self {
            Scheme::Modulo => "modulo".into(),
            Scheme::Jump => "jump".into(),
            Scheme::Rendezvous => "rendezvous".into(),
            Scheme::Ring(v) => format!("ring v={v}"),
        }
    }

    /// The owner of every key, as an index into `view`.
    fn assign(&self, view: &[String], keys: &[Key]) -> Vec<u32> {
        let n = view.len() as u64;
        match *self {
            Scheme::Modulo => keys.iter().map(|k| (k.hash % n) as u32).collect(),
            Scheme::Jump => keys.iter().map(|k| jump_hash(k.hash, n as u32)).collect(),
            Scheme::Rendezvous => {
                let mut buffer = Vec::new();
                keys.iter()
                    .map(|k| {
                        let mut best = (0u64, 0u32);
                        for (i, addr) in view.iter().enumerate() {
                            buffer.clear();
                            buffer.extend_from_slice(addr.as_bytes());
                            buffer.extend_from_slice(&k.bytes);
                            let weight = xxh3_64(&buffer);
                            if i == 0 || weight > best.0 {
                                best = (weight, i as u32);
                            }
                        }
                        best.1
                    })
                    .collect()
            }
            Scheme::Ring(vnodes) => {
                let ring = HashRing::new(view, vnodes).expect("valid view");
                let index: HashMap<&str, u32> = view
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (a.as_str(), i as u32))
                    .collect();
                keys.iter()
                    .map(|k| index[ring.owner_of_hash(k.hash).as_ref()])
                    .collect()
            }
        }
    }
}

/// Jump consistent hash (Lamping & Veach, 2014): a bucket in `0..buckets`; growing
/// `buckets` by one moves only keys into the new last bucket.
fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut bucket, mut next) = (-1i64, 0i64);
    while next < buckets as i64 {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        next = ((bucket + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    bucket as u32
}

/// The course's addresses: 10.10.0.4:13800, 10.10.0.5:13800, ...
fn course_view(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.10.0.{}:13800", 4 + i)).collect()
}

struct Scenario {
    name: &'static str,
    old: Vec<String>,
    new: Vec<String>,
}

impl Scenario {
    fn add(name: &'static str, n: usize) -> Self {
        Scenario {
            name,
            old: course_view(n),
            new: course_view(n + 1),
        }
    }

    fn remove(name: &'static str, n: usize, index: usize) -> Self {
        let old = course_view(n);
        let mut new = old.clone();
        new.remove(index);
        Scenario { name, old, new }
    }

    /// The least any placement must move: the new node's fair share on an add, the
    /// removed node's fair share on a remove.
    fn ideal(&self) -> f64 {
        1.0 / self.old.len().max(self.new.len()) as f64
    }
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario::add("2->3", 2),
        Scenario::add("3->4", 3),
        Scenario::add("4->5", 4),
        Scenario::add("10->11", 10),
        Scenario::remove("4->3 mid", 4, 1),
        Scenario::remove("5->4 first", 5, 0),
    ]
}

/// max/mean and min/mean keys per node of `view` under `owners`.
fn spread(view: &[String], owners: &[u32]) -> (f64, f64) {
    let mut per_node = vec![0usize; view.len()];
    for &o in owners {
        per_node[o as usize] += 1;
    }
    let mean = owners.len() as f64 / view.len() as f64;
    let max = *per_node.iter().max().unwrap() as f64;
    let min = *per_node.iter().min().unwrap() as f64;
    (max / mean, min / mean)
}

/// `count` distinct random `a.b.c.d:port` addresses.
fn random_view(rng: &mut StdRng, count: usize) -> Vec<String> {
    let mut set = BTreeSet::new();
    while set.len() < count {
        let [a, b, c, d]: [u8; 4] = rng.gen();
        set.insert(format!("{a}.{b}.{c}.{d}:{}", rng.gen_range(1024..65535u16)));
    }
    set.into_iter().collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (key_count, address_sets) = if full { (200_000, 20) } else { (5_000, 3) };
    let keys = keys(key_count);
    let mut schemes = vec![Scheme::Modulo, Scheme::Jump, Scheme::Rendezvous];
    schemes.extend(vnode_counts().into_iter().map(Scheme::Ring));

    println!(
        "ringkv movement: {key_count} keys \"key0\".. ; course addresses 10.10.0.4:13800, ...; \
         DEFAULT_VNODES = {DEFAULT_VNODES}{}",
        if full {
            ""
        } else {
            " (quick mode: run `cargo bench --bench movement` for the full sizes)"
        }
    );

    println!("\n## Movement per view change\n");
    println!(
        "| {:<13} | {:<10} | {:>7} | {:>7} | {:>11} | {:>8} | {:>8} |",
        "scheme", "scenario", "moved", "ideal", "moved/ideal", "max/mean", "min/mean"
    );
    println!(
        "|{:-<15}|{:-<12}|{:->9}|{:->9}|{:->13}|{:->10}|{:->10}|",
        "", "", ":", ":", ":", ":", ":"
    );
    let mut ratios: Vec<(Scheme, Vec<f64>)> = Vec::new();
    for &scheme in &schemes {
        let mut scheme_ratios = Vec::new();
        for s in scenarios() {
            let before = scheme.assign(&s.old, &keys);
            let after = scheme.assign(&s.new, &keys);
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(&b, &a)| s.old[b as usize] != s.new[a as usize])
                .count() as f64
                / key_count as f64;
            let (max, min) = spread(&s.new, &after);
            let ratio = moved / s.ideal();
            scheme_ratios.push(ratio);
            println!(
                "| {:<13} | {:<10} | {:>7.4} | {:>7.4} | {:>11.3} | {:>8.3} | {:>8.3} |",
                scheme.name(),
                s.name,
                moved,
                s.ideal(),
                ratio,
                max,
                min
            );
        }
        ratios.push((scheme, scheme_ratios));
    }

    println!(
        "\n## Balance: max/mean keys per node over {address_sets} random address sets \
         (seeded)\n"
    );
    println!(
        "| {:<13} | {:>3} | {:>6} | {:>6} | {:>6} |",
        "scheme", "N", "p50", "p95", "max"
    );
    println!(
        "|{:-<15}|{:->5}|{:->8}|{:->8}|{:->8}|",
        "", ":", ":", ":", ":"
    );
    for &scheme in &schemes {
        for n in [3usize, 5, 10] {
            // Same seed per N for every scheme: each scheme sees the same address sets.
            let mut rng = StdRng::seed_from_u64(0x5eed_0000 + n as u64);
            let mut maxima: Vec<f64> = (0..address_sets)
                .map(|_| {
                    let view = random_view(&mut rng, n);
                    spread(&view, &scheme.assign(&view, &keys)).0
                })
                .collect();
            maxima.sort_by(f64::total_cmp);
            println!(
                "| {:<13} | {:>3} | {:>6.3} | {:>6.3} | {:>6.3} |",
                scheme.name(),
                n,
                percentile(&maxima, 0.5),
                percentile(&maxima, 0.95),
                maxima[maxima.len() - 1]
            );
        }
    }

    println!("\n## Cost of a vnode count\n");
    println!(
        "| {:<13} | {:>12} | {:>12} | {:>13} | {:>13} |",
        "scheme", "tokens N=64", "memory N=64", "ranges 10->11", "ranges 64->65"
    );
    println!(
        "|{:-<15}|{:->14}|{:->14}|{:->15}|{:->15}|",
        "", ":", ":", ":", ":"
    );
    for vnodes in vnode_counts() {
        let ring = |n: usize| HashRing::new(course_view(n), vnodes).expect("valid view");
        let big = ring(64);
        // A token is a u64 position and a u32 owner index, plus about one byte of the
        // lookup index (a u32 per four tokens).
        let memory_kib = big.token_count() * 13 / 1024;
        println!(
            "| {:<13} | {:>12} | {:>8} KiB | {:>13} | {:>13} |",
            Scheme::Ring(vnodes).name(),
            big.token_count(),
            memory_kib,
            HashRing::diff(&ring(10), &ring(11)).len(),
            HashRing::diff(&big, &ring(65)).len()
        );
    }

    println!("\n## Average moved/ideal over the scenarios\n");
    println!("| {:<13} | {:>11} |", "scheme", "moved/ideal");
    println!("|{:-<15}|{:->13}|", "", ":");
    for (scheme, r) in ratios {
        let mean = r.iter().sum::<f64>() / r.len() as f64;
        println!("| {:<13} | {:>11.3} |", scheme.name(), mean);
    }
}

//! Online view-change benchmark: 1,000,000 keys (~100-byte values) on 3 nodes, change to 4
//! and back to 3 while clients keep reading; then, as the baseline a naive reshard pays,
//! a change to 3 fresh nodes that ships every key. Prints two tables: what moved and how
//! fast (beside this machine's loopback TCP throughput, same run), and what readers saw
//! (p99 the second before the change, p99 and max during it, the longest freeze).
//!
//! `cargo bench --bench migration` runs the full size; under `cargo test --benches` it runs
//! a small one so the suite stays quick.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ringkv::config::Config;
use ringkv::node::Node;
use ringkv::ring::{key_hash, HashRing};
use ringkv::server;
use ringkv::wire::ChangeReport;

use common::{loopback_mb_per_s, quantile_ms};

async fn start(address: &str, view: &[String]) -> Arc<Node> {
    let view: Vec<&str> = view.iter().map(String::as_str).collect();
    let node = Node::new(Config::for_address(address, &view).unwrap()).unwrap();
    let listener = server::bind(&node).await.unwrap();
    tokio::spawn(server::serve(
        node.clone(),
        listener,
        std::future::pending(),
    ));
    node
}

struct Step {
    name: &'static str,
    wall: Duration,
    owner_changed: usize,
    report: ChangeReport,
    get_p99_ms: f64,
    get_max_ms: f64,
    before_p99_ms: f64,
    gets: usize,
    get_errors: usize,
}

/// Keys whose owner differs between the two views.
fn owner_changed(keys: &[String], from: &[String], to: &[String], vnodes: u32) -> usize {
    let old = HashRing::new(from, vnodes).unwrap();
    let new = HashRing::new(to, vnodes).unwrap();
    keys.iter()
        .filter(|k| old.owner(k.as_bytes()) != new.owner(k.as_bytes()))
        .count()
}

async fn change(
    name: &'static str,
    coordinator: &str,
    from: &[String],
    to: &[String],
    keys: &[String],
    nodes: &[Arc<Node>],
) -> Step {
    let vnodes = nodes[0].config().vnodes;
    let owner_changed = owner_changed(keys, from, to, vnodes);
    let client = reqwest::Client::new();
    // Readers keep GETting random keys through every node of the old view during the change.
    let running = Arc::new(AtomicBool::new(true));
    // Readers time their GETs for a second before the change, then during it.
    let changing = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (client, running) = (client.clone(), running.clone());
            let changing = changing.clone();
            let targets = from.to_vec();
            let keys: Vec<String> = keys.iter().step_by(97).cloned().collect();
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut i) = (Vec::new(), 0usize, r * 7919);
                let mut before = Vec::new();
                while running.load(Ordering::Relaxed) {
                    let key = &keys[i % keys.len()];
                    let target = &targets[i % targets.len()];
                    i += 1;
                    let begun = Instant::now();
                    match client
                        .get(format!("http://{target}/kvs/keys/{key}"))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 200 => match changing.load(Ordering::Relaxed) {
                            true => latencies.push(begun.elapsed()),
                            false => before.push(begun.elapsed()),
                        },
                        Ok(r) => {
                            errors += 1;
                            eprintln!(
                                "GET {key} via {target}: {} {}",
                                r.status(),
                                r.text().await.unwrap_or_default()
                            );
                        }
                        Err(e) => {
                            errors += 1;
                            eprintln!("GET {key} via {target}: {e}");
                        }
                    }
                }
                (latencies, before, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    changing.store(true, Ordering::Relaxed);
    let wall = common::change_view(&client, coordinator, to).await;
    running.store(false, Ordering::Relaxed);
    let (mut latencies, mut before) = (Vec::new(), Vec::new());
    let mut get_errors = 0;
    for reader in readers {
        let (l, b, e) = reader.await.unwrap();
        latencies.extend(l);
        before.extend(b);
        get_errors += e;
    }
    latencies.sort();
    before.sort();
    let coordinator_node = nodes
        .iter()
        .find(|n| **n.address() == *coordinator)
        .unwrap();
    let report = coordinator_node.last_change().unwrap();
    Step {
        name,
        wall,
        owner_changed,
        report,
        get_p99_ms: quantile_ms(&latencies, 0.99),
        get_max_ms: quantile_ms(&latencies, 1.0),
        before_p99_ms: quantile_ms(&before, 0.99),
        gets: latencies.len(),
        get_errors,
    }
}

fn main() {
    // RUST_LOG=debug shows what the nodes do (and why a GET failed).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_target(false)
            .init();
    }
    let full = std::env::args().any(|a| a == "--bench");
    let key_count = if full { 1_000_000 } else { 20_000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let addresses: Vec<String> = (1..=7).map(|i| format!("127.88.0.{i}:13800")).collect();
        let three = addresses[..3].to_vec();
        let four = addresses[..4].to_vec();
        let fresh = addresses[4..7].to_vec();
        let mut nodes = Vec::new();
        for address in &addresses {
            nodes.push(start(address, &three).await);
        }
        // Load the keys straight into their owners' stores: the benchmark is the change.
        let keys: Vec<String> = (0..key_count).map(|i| format!("key{i}")).collect();
        let value = Bytes::from(format!("\"{}\"", "v".repeat(98)));
        let ring = HashRing::new(&three, nodes[0].config().vnodes).unwrap();
        for key in &keys {
            let owner = ring.owner(key.as_bytes());
            let node = nodes.iter().find(|n| *n.address() == *owner).unwrap();
            node.store()
                .put(key_hash(key.as_bytes()), key, value.clone())
                .expect("the memory engine does not fail");
        }

        let mut steps = vec![
            change("3 -> 4", &three[0], &three, &four, &keys, &nodes).await,
            change("4 -> 3", &four[1], &four, &three, &keys, &nodes).await,
            change("3 -> 3 new (ships all)", &three[0], &three, &fresh, &keys, &nodes).await,
        ];

        // A 16-node cluster (its own addresses and keys) grown to 17: the same change, with
        // the prepare, transfer and log spread over many more nodes.
        let many: Vec<String> = (1..=17).map(|i| format!("127.89.0.{i}:13800")).collect();
        let sixteen = many[..16].to_vec();
        let mut big = Vec::new();
        for address in &many {
            big.push(start(address, &sixteen).await);
        }
        let big_keys: Vec<String> = (0..key_count / 4).map(|i| format!("big{i}")).collect();
        let ring = HashRing::new(&sixteen, big[0].config().vnodes).unwrap();
        for key in &big_keys {
            let owner = ring.owner(key.as_bytes());
            let node = big.iter().find(|n| *n.address() == *owner).unwrap();
            node.store()
                .put(key_hash(key.as_bytes()), key, value.clone())
                .expect("the memory engine does not fail");
        }
        steps.push(change("16 -> 17", &sixteen[0], &sixteen, &many, &big_keys, &big).await);
        let baseline = &steps[2];
        let big_count = key_count / 4;
        let baseline_rate = baseline.report.keys_shipped as f64 / baseline.wall.as_secs_f64();
        println!("\nview-change benchmark: {key_count} keys, ~100-byte values, loopback");
        println!("(the 16 -> 17 row: a separate 16-node cluster holding {big_count} keys)");
        let loopback = loopback_mb_per_s().await;
        println!(
            "{:<24} {:>9} {:>10} {:>10} {:>9} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>7}",
            "change", "wall ms", "shipped", "moved", "caught", "keys/s", "MB/s", "loopback", "xfer ms", "xfer MB/s", "loopback", "vs all", "log ms", "log ops"
        );
        for step in &steps {
            let secs = step.wall.as_secs_f64();
            let mb_per_s = step.report.bytes_shipped as f64 / secs / 1e6;
            let xfer = step.report.bytes_shipped as f64 / step.report.transfer_ms.max(1e-3) / 1e3;
            println!(
                "{:<24} {:>9.0} {:>10} {:>10} {:>9} {:>10.0} {:>8.1} {:>8.1}% {:>9.1} {:>9.1} {:>8.1}% {:>9.2}x {:>8.1} {:>7}",
                step.name,
                secs * 1000.0,
                step.report.keys_shipped,
                step.owner_changed,
                step.report.keys_caught_up,
                step.report.keys_shipped as f64 / secs,
                mb_per_s,
                mb_per_s / loopback * 100.0,
                step.report.transfer_ms,
                xfer,
                xfer / loopback * 100.0,
                baseline.wall.as_secs_f64() / secs,
                step.report.log_millis,
                step.report.log_ops
            );
            assert_eq!(
                step.report.keys_shipped, step.owner_changed,
                "{}: shipped keys must equal keys whose owner changed",
                step.name
            );
            assert_eq!(step.get_errors, 0, "{}: GETs failed during the change", step.name);
        }
        println!("(loopback: one TCP connection on this machine, same run: {loopback:.0} MB/s)");
        println!(
            "\n{:<24} {:>10} {:>12} {:>12} {:>8} {:>10} {:>8}",
            "readers (4, keep-alive)", "freeze ms", "p99 before", "p99 during", "ratio", "max", "GETs"
        );
        for step in &steps {
            println!(
                "{:<24} {:>10.1} {:>10.2}ms {:>10.2}ms {:>7.2}x {:>8.1}ms {:>8}",
                step.name,
                step.report.freeze_ms,
                step.before_p99_ms,
                step.get_p99_ms,
                step.get_p99_ms / step.before_p99_ms.max(f64::MIN_POSITIVE),
                step.get_max_ms,
                step.gets
            );
        }
        println!(
            "(shipped = distinct keys of the bulk transfer, moved = keys whose owner changed; \
             xfer = the bulk transfer phase alone (every sender in parallel); \
             'vs all' = wall time of shipping every key / this change's; baseline rate {baseline_rate:.0} keys/s; \
             log ms = time in the metadata log's operations, within wall ms; freeze = the longest a \
             node's outgoing ranges waited for the commit; p99 before = the second before the change)"
        );
    });
}

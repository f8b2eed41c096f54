//! ringkv beside Redis Cluster in one run on this machine: 3 nodes (3 Redis masters)
//! loaded with the same 1,000,000 keys of 100-byte values, grown to 4 nodes while 4
//! clients keep reading. Prints one table: memory per node and per key, the reshard's wall
//! time, keys and MB/s moved (beside this machine's loopback TCP, same run), and what the
//! readers saw the second before the change and during it. Then ringkv shrinks back to 3
//! and grows to 4 once more with nobody reading: a second table gives what its migration
//! engine moves (keys/s, MB/s, share of loopback) when it has the machine to itself.
//!
//! Both run as separate processes on loopback: ringkv's release binary, and
//! `redis-server` 3 masters in cluster mode, grown with `redis-cli --cluster add-node` and
//! `rebalance --cluster-use-empty-masters` (pipeline 1000). Redis's readers are slot-aware
//! (they follow `MOVED` and `ASK`), ringkv's send each GET to any node (it forwards).
//! Without `redis-server`, and under `cargo test --benches` (a small ringkv-only run that
//! keeps the harness tested), the Redis column is skipped with a message.
//!
//! `cargo bench --bench reshard -- --ringkv-only` skips Redis; `RINGKV_BIN=path` runs that
//! ringkv binary instead of this tree's (to compare two builds, one run each, interleaved).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use common::{change_view, loopback_mb_per_s, quantile_ms};
use ringkv::api::ops::ClusterStatus;
use ringkv::ring::HashRing;
use ringkv::wire::ChangeReport;

/// How long after the change RSS is read again.
const SETTLE: Duration = Duration::from_secs(3);

/// The stored text of every value: a JSON string of 98 characters, 100 bytes.
fn value_text() -> String {
    format!("\"{}\"", "v".repeat(98))
}

/// Processes this benchmark started, killed when it ends (also on a panic).
#[derive(Default)]
struct Processes(Vec<Child>);

impl Processes {
    fn spawn(&mut self, command: &mut Command, log: &Path) -> u32 {
        let file = std::fs::File::create(log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let pid = child.id();
        self.0.push(child);
        pid
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A process's resident set, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

fn mean_mb(values: &[u64]) -> f64 {
    values.iter().sum::<u64>() as f64 / values.len().max(1) as f64 / 1e6
}

/// Readers' latencies: the second before the change, and during it.
#[derive(Default)]
struct Samples {
    before: Vec<Duration>,
    during: Vec<Duration>,
    errors: usize,
}

impl Samples {
    fn merge(mut all: Vec<Samples>) -> Samples {
        let mut merged = Samples::default();
        for s in &mut all {
            merged.before.append(&mut s.before);
            merged.during.append(&mut s.during);
            merged.errors += s.errors;
        }
        merged.before.sort();
        merged.during.sort();
        merged
    }
}

/// When readers run, and whether the change has begun.
#[derive(Clone, Default)]
struct Phase {
    stopped: Arc<AtomicBool>,
    changing: Arc<AtomicBool>,
}

impl Phase {
    fn running(&self) -> bool {
        !self.stopped.load(Ordering::Relaxed)
    }

    fn record(&self, samples: &mut Samples, took: Duration, result: Result<(), String>) {
        match result {
            Ok(()) if self.changing.load(Ordering::Relaxed) => samples.during.push(took),
            Ok(()) => samples.before.push(took),
            Err(error) => {
                samples.errors += 1;
                eprintln!("reader: {error}");
            }
        }
    }
}

/// What one system did, for one column of the table.
#[derive(Default)]
struct Figures {
    /// Each node's RSS before the load, after it, and after the change (the new node last).
    rss_empty: Vec<u64>,
    rss_loaded: Vec<u64>,
    rss_after: Vec<u64>,
    /// The same, [`SETTLE`] later: what the allocator gave back meanwhile.
    rss_settled: Vec<u64>,
    /// Redis's own count of its data (`used_memory` growth), summed over the masters.
    used_memory: Option<u64>,
    load: Duration,
    wall: Duration,
    keys_moved: usize,
    bytes_moved: usize,
    /// The bulk transfer alone (ringkv: every sender in parallel), within `wall`.
    transfer: Option<Duration>,
    freeze_ms: Option<f64>,
    samples: Samples,
    /// ringkv: key requests the nodes took over 50 ms to answer (their own latency
    /// histograms), from the readers' start to the change's end.
    slow: Option<u64>,
    /// ringkv: the same change again with no reader (back to 3 nodes, then 3 -> 4 once
    /// more): what the migration engine moves when it has the machine to itself.
    quiet: Option<Quiet>,
}

/// A view change run with nobody reading.
#[derive(Default)]
struct Quiet {
    wall: Duration,
    transfer: Duration,
    keys: usize,
    bytes: usize,
}

impl Figures {
    fn bytes_per_key(&self, keys: usize) -> f64 {
        let loaded: u64 = self.rss_loaded.iter().sum();
        let empty: u64 = self.rss_empty.iter().sum();
        loaded.saturating_sub(empty) as f64 / keys as f64
    }
}

/// Runs `readers` tasks of `read` for a second before `change`, and during it; returns
/// the change's wall time and the readers' samples.
async fn timed_change<R, F>(
    readers: Vec<R>,
    keys: Arc<Vec<String>>,
    change: F,
) -> (Duration, Samples)
where
    R: KeyReader + Send + 'static,
    F: std::future::Future<Output = ()>,
{
    let phase = Phase::default();
    let tasks: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(r, mut reader)| {
            let (phase, keys) = (phase.clone(), keys.clone());
            tokio::spawn(async move {
                let mut samples = Samples::default();
                let mut i = r * 7919;
                while phase.running() {
                    let key = &keys[(i * 97) % keys.len()];
                    i += 1;
                    let begun = Instant::now();
                    let result = reader.get(key).await;
                    phase.record(&mut samples, begun.elapsed(), result);
                }
                samples
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    phase.changing.store(true, Ordering::Relaxed);
    let begun = Instant::now();
    change.await;
    let wall = begun.elapsed();
    phase.stopped.store(true, Ordering::Relaxed);
    let samples = join_all(tasks).await.into_iter().map(Result::unwrap);
    (wall, Samples::merge(samples.collect()))
}

/// A client that GETs one key and checks it is there.
trait KeyReader {
    fn get(&mut self, key: &str) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

// ---------------------------------------------------------------------------------------
// ringkv

struct RingkvReader {
    client: reqwest::Client,
    targets: Vec<String>,
    next: usize,
}

impl KeyReader for RingkvReader {
    async fn get(&mut self, key: &str) -> Result<(), String> {
        let target = &self.targets[self.next % self.targets.len()];
        self.next += 1;
        let answer = self
            .client
            .get(format!("http://{target}/kvs/keys/{key}"))
            .send()
            .await
            .map_err(|e| format!("GET {key} via {target}: {e}"))?;
        match answer.status().as_u16() {
            200 => Ok(()),
            status => Err(format!(
                "GET {key} via {target}: {status} {}",
                answer.text().await.unwrap_or_default()
            )),
        }
    }
}

async fn wait_serving(client: &reqwest::Client, address: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .get(format!("http://{address}/kvs/key-count"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "{address} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ringkv(keys: Arc<Vec<String>>, logs: &Path) -> Figures {
    let addresses: Vec<String> = (1..=4).map(|i| format!("127.93.0.{i}:13800")).collect();
    let (three, four) = (addresses[..3].to_vec(), addresses.to_vec());
    let client = reqwest::Client::new();
    let mut processes = Processes::default();
    let mut pids = Vec::new();
    for (i, address) in addresses.iter().enumerate() {
        let (ip, port) = address.rsplit_once(':').unwrap();
        let view = if i < 3 { &three } else { &four };
        let binary = std::env::var_os("RINGKV_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_ringkv")),
            PathBuf::from,
        );
        let mut command = Command::new(binary);
        command
            .args(["--ip", ip, "--port", port, "--address", address])
            .args(["--view", &view.join(",")])
            .env_remove("REPL_FACTOR")
            .env_remove("DATA_DIR")
            .env("RUST_LOG", "warn");
        pids.push(processes.spawn(&mut command, &logs.join(format!("ringkv-{i}.log"))));
    }
    for address in &addresses {
        wait_serving(&client, address).await;
    }
    let mut figures = Figures {
        rss_empty: pids[..3].iter().map(|&p| rss(p)).collect(),
        ..Figures::default()
    };

    // Each key PUT to its owner, 32 at a time.
    let vnodes = ringkv::config::Config::for_address(&three[0], &[three[0].as_str()])
        .unwrap()
        .vnodes;
    let ring = HashRing::new(&three, vnodes).unwrap();
    let body = format!("{{\"value\":{}}}", value_text());
    let begun = Instant::now();
    let loaders = (0..32).map(|w| {
        let (client, keys, ring, body) = (client.clone(), keys.clone(), ring.clone(), body.clone());
        tokio::spawn(async move {
            for key in keys.iter().skip(w).step_by(32) {
                let owner = ring.owner(key.as_bytes());
                let answer = client
                    .put(format!("http://{owner}/kvs/keys/{key}"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), 201, "PUT {key}");
            }
        })
    });
    for loader in join_all(loaders).await {
        loader.unwrap();
    }
    figures.load = begun.elapsed();
    figures.rss_loaded = pids[..3].iter().map(|&p| rss(p)).collect();

    let readers = (0..4)
        .map(|r| RingkvReader {
            client: client.clone(),
            targets: three.clone(),
            next: r,
        })
        .collect();
    let change = async {
        change_view(&client, &three[0], &four).await;
    };
    let slow_before = slow_key_requests(&client, &addresses).await;
    (figures.wall, figures.samples) = timed_change(readers, keys.clone(), change).await;
    figures.slow = Some(slow_key_requests(&client, &addresses).await - slow_before);
    figures.rss_after = pids.iter().map(|&p| rss(p)).collect();
    tokio::time::sleep(SETTLE).await;
    figures.rss_settled = pids.iter().map(|&p| rss(p)).collect();
    let report = last_change(&client, &three[0], keys.len()).await;
    figures.keys_moved = report.keys_shipped;
    figures.bytes_moved = report.bytes_shipped;
    figures.freeze_ms = Some(report.freeze_ms);
    figures.transfer = Some(Duration::from_secs_f64(report.transfer_ms / 1000.0));

    // Back to three nodes, then the measured change once more, with no reader.
    quiet_change(&client, &three[0], &three, keys.len()).await;
    figures.quiet = Some(quiet_change(&client, &three[0], &four, keys.len()).await);
    figures
}

/// Key requests the nodes at `addresses` answered in more than 50 ms so far, as their
/// `ringkv_request_duration_seconds` histograms count them: the HTTP requests each took,
/// the forward to the key's owner included (the owner serves it over the node-to-node
/// protocol, which that histogram does not count).
async fn slow_key_requests(client: &reqwest::Client, addresses: &[String]) -> u64 {
    let mut slow = 0;
    for address in addresses {
        let text = client
            .get(format!("http://{address}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let count = |le: &str| -> u64 {
            let series =
                format!("ringkv_request_duration_seconds_bucket{{route=\"key\",le=\"{le}\"}} ");
            text.lines()
                .find_map(|line| line.strip_prefix(series.as_str()))
                .map_or(0, |n| n.trim().parse().unwrap())
        };
        slow += count("+Inf") - count("0.05");
    }
    slow
}

/// The report of the last change the node at `at` coordinated, once the cluster is seen
/// to hold all `keys` keys.
async fn last_change(client: &reqwest::Client, at: &str, keys: usize) -> ChangeReport {
    let status: ClusterStatus = client
        .get(format!("http://{at}/cluster/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status.key_count, keys, "every key is still there");
    status
        .last_change
        .expect("the coordinator reports its change")
}

/// Changes the view to `view` through `at`, with nobody reading, and reports it.
async fn quiet_change(client: &reqwest::Client, at: &str, view: &[String], keys: usize) -> Quiet {
    let wall = change_view(client, at, view).await;
    let report = last_change(client, at, keys).await;
    Quiet {
        wall,
        transfer: Duration::from_secs_f64(report.transfer_ms / 1000.0),
        keys: report.keys_shipped,
        bytes: report.bytes_shipped,
    }
}

// ---------------------------------------------------------------------------------------
// Redis Cluster

/// Redis Cluster's hash slot of a key (CRC16-XMODEM mod 16384; these keys have no tags).
fn slot(key: &str) -> usize {
    let mut crc: u16 = 0;
    for &byte in key.as_bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    usize::from(crc) % 16384
}

fn redis_cli(args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    assert!(
        output.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The value of `name` in `redis-cli` output of `name:value` lines.
fn field(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `INFO` field `name` of the server on `port`.
fn redis_info(port: u16, section: &str, name: &str) -> String {
    field(
        &redis_cli(&["-p", &port.to_string(), "info", section]),
        name,
    )
}

/// Waits until every server agrees on `known` nodes and the cluster is up.
async fn redis_settled(ports: &[u16], known: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let settled = ports.iter().all(|&port| {
            let info = redis_cli(&["-p", &port.to_string(), "cluster", "info"]);
            field(&info, "cluster_state") == "ok"
                && field(&info, "cluster_known_nodes") == known.to_string()
        });
        if settled {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the Redis cluster did not settle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Which master serves each slot, from `CLUSTER NODES`.
fn slot_owners(port: u16) -> Vec<String> {
    let mut owners = vec![String::new(); 16384];
    for line in redis_cli(&["-p", &port.to_string(), "cluster", "nodes"]).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 || !fields[2].contains("master") {
            continue;
        }
        let address = fields[1].split('@').next().unwrap().to_string();
        for range in &fields[8..] {
            if range.starts_with('[') {
                continue;
            }
            let (start, end) = range.split_once('-').unwrap_or((range, range));
            let (start, end) = (
                start.parse::<usize>().unwrap(),
                end.parse::<usize>().unwrap(),
            );
            owners[start..=end].fill(address.clone());
        }
    }
    assert!(owners.iter().all(|o| !o.is_empty()), "every slot is served");
    owners
}

/// One RESP connection.
struct Resp(BufReader<TcpStream>);

/// A RESP reply, as far as this benchmark needs it.
enum Reply {
    Ok,
    Bulk(Option<Vec<u8>>),
    Error(String),
}

impl Resp {
    async fn connect(address: &str) -> Resp {
        let stream = TcpStream::connect(address).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Resp(BufReader::new(stream))
    }

    fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.get_mut().write_all(bytes).await
    }

    async fn reply(&mut self) -> std::io::Result<Reply> {
        let mut line = String::new();
        self.0.read_line(&mut line).await?;
        let line = line.trim_end();
        Ok(match line.as_bytes().first() {
            Some(b'+') => Reply::Ok,
            Some(b'-') => Reply::Error(line[1..].to_string()),
            Some(b'$') => match line[1..].parse::<i64>() {
                Ok(n) if n >= 0 => {
                    let mut data = vec![0; n as usize + 2];
                    self.0.read_exact(&mut data).await?;
                    data.truncate(n as usize);
                    Reply::Bulk(Some(data))
                }
                _ => Reply::Bulk(None),
            },
            _ => Reply::Error(format!("unexpected reply {line:?}")),
        })
    }
}

/// A slot-aware reader: sends each GET to the slot's master, follows `MOVED` (and learns
/// it) and `ASK` (once, with `ASKING`), as cluster clients do.
struct RedisReader {
    owners: Vec<String>,
    connections: HashMap<String, Resp>,
}

impl RedisReader {
    async fn ask(&mut self, address: &str, asking: bool, key: &str) -> Result<Reply, String> {
        if !self.connections.contains_key(address) {
            let resp = Resp::connect(address).await;
            self.connections.insert(address.to_string(), resp);
        }
        let resp = self.connections.get_mut(address).unwrap();
        let mut out = Vec::new();
        if asking {
            Resp::command(&mut out, &[b"ASKING"]);
        }
        Resp::command(&mut out, &[b"GET", key.as_bytes()]);
        let failed = |e: std::io::Error| format!("GET {key} at {address}: {e}");
        resp.send(&out).await.map_err(failed)?;
        if asking {
            resp.reply().await.map_err(failed)?;
        }
        resp.reply().await.map_err(failed)
    }
}

impl KeyReader for RedisReader {
    async fn get(&mut self, key: &str) -> Result<(), String> {
        let slot = slot(key);
        let (mut address, mut asking) = (self.owners[slot].clone(), false);
        for _ in 0..5 {
            match self.ask(&address, asking, key).await? {
                Reply::Bulk(Some(_)) => return Ok(()),
                Reply::Error(error) if error.starts_with("MOVED ") => {
                    address = error.rsplit(' ').next().unwrap().to_string();
                    self.owners[slot] = address.clone();
                    asking = false;
                }
                Reply::Error(error) if error.starts_with("ASK ") => {
                    address = error.rsplit(' ').next().unwrap().to_string();
                    asking = true;
                }
                Reply::Error(error) => return Err(format!("GET {key}: {error}")),
                Reply::Bulk(None) | Reply::Ok => return Err(format!("GET {key}: not found")),
            }
        }
        Err(format!("GET {key}: redirected 5 times"))
    }
}

async fn redis_cluster(keys: Arc<Vec<String>>, logs: &Path) -> Figures {
    let ports: Vec<u16> = (17301..=17304).collect();
    let mut processes = Processes::default();
    let mut pids = Vec::new();
    for &port in &ports {
        let dir = logs.join(format!("redis-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir);
        pids.push(processes.spawn(&mut command, &dir.join("log")));
    }
    for &port in &ports {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let address = |port: u16| format!("127.0.0.1:{port}");
    let three: Vec<String> = ports[..3].iter().map(|&p| address(p)).collect();
    let mut create = vec!["--cluster", "create"];
    create.extend(three.iter().map(String::as_str));
    create.push("--cluster-yes");
    redis_cli(&create);
    redis_settled(&ports[..3], 3).await;
    let used = |ports: &[u16]| -> u64 {
        ports
            .iter()
            .map(|&p| {
                redis_info(p, "memory", "used_memory")
                    .parse::<u64>()
                    .unwrap()
            })
            .sum()
    };
    let used_empty = used(&ports[..3]);
    let mut figures = Figures {
        rss_empty: pids[..3].iter().map(|&p| rss(p)).collect(),
        ..Figures::default()
    };

    // Each master's keys pipelined to it, 1,000 SETs per round trip.
    let owners = slot_owners(ports[0]);
    let mut by_owner: HashMap<String, Vec<String>> = HashMap::new();
    for key in keys.iter() {
        by_owner
            .entry(owners[slot(key)].clone())
            .or_default()
            .push(key.clone());
    }
    let value = value_text();
    let begun = Instant::now();
    let loaders = by_owner.into_iter().map(|(address, keys)| {
        let value = value.clone();
        tokio::spawn(async move {
            let mut resp = Resp::connect(&address).await;
            for chunk in keys.chunks(1000) {
                let mut out = Vec::new();
                for key in chunk {
                    Resp::command(&mut out, &[b"SET", key.as_bytes(), value.as_bytes()]);
                }
                resp.send(&out).await.unwrap();
                for key in chunk {
                    assert!(
                        matches!(resp.reply().await.unwrap(), Reply::Ok),
                        "SET {key}"
                    );
                }
            }
        })
    });
    for loader in join_all(loaders).await {
        loader.unwrap();
    }
    figures.load = begun.elapsed();
    figures.rss_loaded = pids[..3].iter().map(|&p| rss(p)).collect();
    figures.used_memory = Some(used(&ports[..3]) - used_empty);

    // The fourth master joins (no data moves yet); the rebalance is the change.
    redis_cli(&["--cluster", "add-node", &address(ports[3]), &three[0]]);
    redis_settled(&ports, 4).await;
    let readers = (0..4)
        .map(|_| RedisReader {
            owners: owners.clone(),
            connections: HashMap::new(),
        })
        .collect();
    let first = three[0].clone();
    let change = async move {
        tokio::task::spawn_blocking(move || {
            redis_cli(&[
                "--cluster",
                "rebalance",
                &first,
                "--cluster-use-empty-masters",
                "--cluster-pipeline",
                "1000",
            ])
        })
        .await
        .unwrap();
    };
    (figures.wall, figures.samples) = timed_change(readers, keys.clone(), change).await;
    figures.rss_after = pids.iter().map(|&p| rss(p)).collect();
    tokio::time::sleep(SETTLE).await;
    figures.rss_settled = pids.iter().map(|&p| rss(p)).collect();
    let count = |port: u16| -> usize {
        redis_cli(&["-p", &port.to_string(), "dbsize"])
            .trim()
            .parse()
            .unwrap()
    };
    figures.keys_moved = count(ports[3]);
    let total: usize = ports.iter().map(|&p| count(p)).sum();
    assert_eq!(total, keys.len(), "every key is still there");
    let key_bytes: usize = keys.iter().map(String::len).sum::<usize>() / keys.len();
    figures.bytes_moved = figures.keys_moved * (key_bytes + value.len());
    figures
}

// ---------------------------------------------------------------------------------------

/// One figure of the table, read off a column.
type Figure<'a> = dyn Fn(&Figures) -> f64 + 'a;

fn row(name: &str, ringkv: f64, redis: Option<f64>, unit: &str) {
    match redis {
        Some(redis) => println!(
            "{name:<40} {ringkv:>12.2} {redis:>14.2} {:>9.2}x  {unit}",
            ringkv / redis.max(f64::MIN_POSITIVE)
        ),
        None => println!("{name:<40} {ringkv:>12.2} {:>14} {:>10}  {unit}", "-", "-"),
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let ringkv_only = std::env::args().any(|a| a == "--ringkv-only");
    let key_count = if full { 1_000_000 } else { 20_000 };
    let has_redis = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let logs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("reshard-bench");
    std::fs::create_dir_all(&logs).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let keys: Arc<Vec<String>> = Arc::new((0..key_count).map(|i| format!("key{i}")).collect());
        let loopback = loopback_mb_per_s().await;
        let ours = ringkv(keys.clone(), &logs).await;
        let theirs = match (full, has_redis) {
            _ if ringkv_only => {
                println!("(--ringkv-only: Redis Cluster skipped)");
                None
            }
            (true, true) => Some(redis_cluster(keys.clone(), &logs).await),
            (false, _) => {
                println!("(Redis Cluster is run by `cargo bench --bench reshard` only)");
                None
            }
            (true, false) => {
                println!("(redis-server is not installed: Redis Cluster skipped)");
                None
            }
        };
        let redis = |f: &dyn Fn(&Figures) -> f64| theirs.as_ref().map(f);
        println!(
            "\nringkv beside Redis Cluster: {key_count} keys x 100-byte values, 3 nodes grown to 4, \
             4 readers, loopback"
        );
        println!("{:<40} {:>12} {:>14} {:>10}", "figure", "ringkv", "Redis Cluster", "ratio");
        let figures: [(&str, &Figure<'_>, &str); 22] = [
            ("RSS per node, empty", &|f| mean_mb(&f.rss_empty), "MB"),
            ("RSS per node after load", &|f| mean_mb(&f.rss_loaded), "MB"),
            ("RSS growth per key", &|f| f.bytes_per_key(key_count), "B"),
            ("load (PUT/SET every key)", &|f| f.load.as_secs_f64(), "s"),
            ("reshard 3 -> 4, wall", &|f| f.wall.as_secs_f64(), "s"),
            ("keys moved (ideal 1/4 of the keys)", &|f| f.keys_moved as f64, "keys"),
            ("moved", &|f| f.bytes_moved as f64 / f.wall.as_secs_f64() / 1e6, "MB/s"),
            ("moved vs loopback TCP", &|f| {
                f.bytes_moved as f64 / f.wall.as_secs_f64() / 1e6 / loopback * 100.0
            }, "%"),
            ("bulk transfer (Redis: the rebalance)", &|f| f.transfer.unwrap_or(f.wall).as_secs_f64(), "s"),
            ("moved during the transfer", &|f| {
                f.bytes_moved as f64 / f.transfer.unwrap_or(f.wall).as_secs_f64() / 1e6
            }, "MB/s"),
            ("transfer vs loopback TCP", &|f| {
                f.bytes_moved as f64 / f.transfer.unwrap_or(f.wall).as_secs_f64() / 1e6 / loopback
                    * 100.0
            }, "%"),
            ("reader p50 before", &|f| quantile_ms(&f.samples.before, 0.5), "ms"),
            ("reader p99 before", &|f| quantile_ms(&f.samples.before, 0.99), "ms"),
            ("reader p50 during", &|f| quantile_ms(&f.samples.during, 0.5), "ms"),
            ("reader p99 during", &|f| quantile_ms(&f.samples.during, 0.99), "ms"),
            ("reader max before", &|f| quantile_ms(&f.samples.before, 1.0), "ms"),
            ("reader max during", &|f| quantile_ms(&f.samples.during, 1.0), "ms"),
            ("reader p99 during / before", &|f| {
                quantile_ms(&f.samples.during, 0.99)
                    / quantile_ms(&f.samples.before, 0.99).max(f64::MIN_POSITIVE)
            }, "x"),
            ("RSS per old node after the change", &|f| mean_mb(&f.rss_after[..3]), "MB"),
            ("RSS of the new node after the change", &|f| mean_mb(&f.rss_after[3..]), "MB"),
            ("RSS per old node 3 s later", &|f| mean_mb(&f.rss_settled[..3]), "MB"),
            ("RSS of the new node 3 s later", &|f| mean_mb(&f.rss_settled[3..]), "MB"),
        ];
        for (name, figure, unit) in figures {
            row(name, figure(&ours), redis(figure), unit);
        }
        if let Some(used) = theirs.as_ref().and_then(|f| f.used_memory) {
            println!("{:<40} {:>12} {:>14.2}  B (Redis's own count)", "used_memory per key", "-", used as f64 / key_count as f64);
        }
        println!("{:<40} {:>12.2} {:>14}  ms", "freeze (longest wait of a moving range)", ours.freeze_ms.unwrap_or(0.0), "-");
        if let Some(slow) = ours.slow {
            println!("{:<40} {:>12} {:>14}", "key requests > 50 ms inside the nodes", slow, "-");
        }
        println!("{:<40} {:>12} {:>14}", "GETs during / errors", format!("{}/{}", ours.samples.during.len(), ours.samples.errors), theirs.as_ref().map_or("-".to_string(), |f| format!("{}/{}", f.samples.during.len(), f.samples.errors)));
        if let Some(quiet) = &ours.quiet {
            let mb = quiet.bytes as f64 / 1e6;
            println!("\nringkv's migration engine alone: the same change again, no reader");
            let rows = [
                ("reshard 3 -> 4, no reader, wall", quiet.wall.as_secs_f64(), "s"),
                ("keys moved", quiet.keys as f64, "keys"),
                ("bulk transfer", quiet.transfer.as_secs_f64(), "s"),
                ("moved during the transfer", quiet.keys as f64 / quiet.transfer.as_secs_f64(), "keys/s"),
                ("moved during the transfer", mb / quiet.transfer.as_secs_f64(), "MB/s"),
                ("transfer vs loopback TCP", mb / quiet.transfer.as_secs_f64() / loopback * 100.0, "%"),
                ("moved vs loopback TCP (wall)", mb / quiet.wall.as_secs_f64() / loopback * 100.0, "%"),
            ];
            for (name, value, unit) in rows {
                println!("{name:<40} {value:>12.2} {:>14} {:>10}  {unit}", "-", "-");
            }
        }
        println!("(loopback: one TCP connection on this machine, same run: {loopback:.0} MB/s; ratio = ringkv / Redis)");
        assert_eq!(ours.samples.errors, 0, "ringkv readers saw errors");
        assert!(ours.keys_moved > 0, "the change moved keys");
    });
}

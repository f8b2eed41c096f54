//! Replicated-mode benchmark (assignment 4, `--repl-factor`): in-process nodes on loopback,
//! one table, every figure beside a baseline measured in the same run (the machine may be
//! shared, so the ratios are what carries over):
//!
//! 1. request rate: PUT, then GET, req/s of 32 keep-alive HTTP clients spread round-robin
//!    over 6 nodes (~100-byte JSON values, 10,000 preloaded keys spread over the cluster),
//!    at repl-factor 1, 2 and 3, against the same 6 nodes in the sharded mode (one copy of
//!    every key); RF2 also against RF1. Clients send an empty causal context (a fresh
//!    client per request); one more RF2 mode has each client carry the context of its
//!    last reply, as the contract asks of a client. The clusters run side by side and the
//!    modes take turns (3 turns of 1 s each), so a change in the machine's other load
//!    meets every mode alike.
//! 2. gossip lag: RF2 PUT runs, taking turns with the others, where sampled writes (2,000)
//!    are timed from the PUT's reply until the record is in the other replica's store
//!    (looked up at the reply, then polled in-process about every millisecond), against the
//!    gossip interval. (A write's reply now waits until the mates hold it, see
//!    `replicated::push`, so the lag is expected to be ~0 and the cost shows in the PUT
//!    latency and rate instead.)
//! 3. refill: 2 nodes at RF2 holding N keys; one comes back empty (its runtime, standing in
//!    for its process, is shut down and a new node starts on its address). Time until it
//!    holds every key, against the time the same keys took to load over HTTP (64 clients,
//!    until both replicas held them).
//! 4. movement: 4 nodes at RF2 (2 shards) holding N keys (written in-process to one replica
//!    of each shard, then gossiped) change to 6 (3 shards; the 2 new nodes were started
//!    with the 6-node view). Wall time, against that load and against the refill of (3);
//!    keys whose shard changed against the ideal N/3; `keys_shipped` and `bytes_shipped` of
//!    the coordinator's `GET /cluster/status` against one copy of every moved key for each
//!    of the new shard's 2 replicas (the design ships from every old replica: ~2x).
//!
//! `cargo bench --bench replicated` runs the full size (N = 1,000,000; 1.5 to 2.5 minutes);
//! under `cargo test --benches` (or `cargo test --release --bench replicated`) it runs a
//! small one (N = 20,000, 0.25 s turns). `RINGKV_BENCH_SECTIONS=rates,refill,movement`
//! picks sections (all by default); `RUST_LOG=info` shows what the nodes do.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use ringkv::causal::Context;
use ringkv::config::Config;
use ringkv::kv::KvOp;
use ringkv::node::{Node, Standing};
use ringkv::replicated::exchange::GOSSIP_EVERY;
use ringkv::ring::key_hash;
use ringkv::server;
use ringkv::shard::ShardMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::runtime::Runtime;

/// The value every PUT writes: a JSON string of 100 bytes, quotes included.
fn value_text() -> String {
    format!("\"{}\"", "v".repeat(98))
}

// ---------------------------------------------------------------------------------------
// Nodes.

/// A multi-threaded runtime standing in for a machine: shutting it down ends every task
/// its nodes spawned (server, gossip, metadata log), as the process exiting would.
fn host() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("node")
        .enable_all()
        .build()
        .unwrap()
}

async fn stop(host: Runtime) {
    tokio::task::spawn_blocking(move || host.shutdown_timeout(Duration::from_secs(5)))
        .await
        .unwrap();
}

fn config(address: &str, view: &[String], repl_factor: Option<usize>) -> Config {
    let view: Vec<&str> = view.iter().map(String::as_str).collect();
    let mut config = Config::for_address(address, &view).unwrap();
    config.repl_factor = repl_factor;
    config
}

/// Starts a node on `host` (retrying the bind while a stopped node's port is released).
async fn start(host: &Runtime, config: Config) -> Arc<Node> {
    host.spawn(async move {
        let node = Node::new(config).unwrap();
        let mut tries = 0;
        let listener = loop {
            match server::bind(&node).await {
                Ok(listener) => break listener,
                Err(error) if tries < 100 => {
                    tries += 1;
                    tracing::debug!(%error, "bind failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("cannot bind {}: {error}", node.address()),
            }
        };
        tokio::spawn(server::serve(
            node.clone(),
            listener,
            std::future::pending(),
        ));
        node
    })
    .await
    .unwrap()
}

async fn wait_in_force(nodes: &[Arc<Node>]) {
    let begun = Instant::now();
    while !nodes.iter().all(|n| n.standing() == Standing::InForce) {
        assert!(
            begun.elapsed() < Duration::from_secs(30),
            "the nodes did not agree on their view"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Nodes on one host.
struct Cluster {
    host: Runtime,
    nodes: Vec<Arc<Node>>,
}

impl Cluster {
    async fn start(view: &[String], repl_factor: Option<usize>) -> Cluster {
        let host = host();
        let mut nodes = Vec::new();
        for address in view {
            nodes.push(start(&host, config(address, view, repl_factor)).await);
        }
        wait_in_force(&nodes).await;
        Cluster { host, nodes }
    }

    async fn stop(self) {
        drop(self.nodes);
        stop(self.host).await;
    }
}

/// `count` loopback addresses of network `net`, outside the 127.20-219 range the tests
/// pick theirs from (they may run meanwhile).
fn addresses(net: u8, count: usize) -> Vec<String> {
    (1..=count)
        .map(|i| format!("127.231.{net}.{i}:13800"))
        .collect()
}

/// Writes `keys` straight into the replica that serves them (the first of their shard),
/// as a client with no history would; the shard-mates get them by gossip.
fn load_in_process(nodes: &[Arc<Node>], keys: &[String]) {
    let placed = nodes[0].replication().unwrap().placed();
    let replicas: HashMap<&str, _> = nodes
        .iter()
        .map(|n| (&**n.address(), n.replication().unwrap().replica().unwrap()))
        .collect();
    let epoch = nodes[0].view().epoch;
    let context = Context::at(epoch);
    let op = KvOp::Put(Bytes::from(value_text()));
    for key in keys {
        let hash = key_hash(key.as_bytes());
        let first = &placed.shard_of_hash(hash).replicas[0];
        replicas[first.as_str()]
            .serve(hash, key, &op, &context)
            .unwrap();
    }
}

/// Waits until every replica of each shard holds as many keys as the shard's first, and
/// the shards hold `total` in all.
async fn wait_replicated(nodes: &[Arc<Node>], total: usize, limit: Duration) -> bool {
    let begun = Instant::now();
    let layout = nodes[0].replication().unwrap().placed().layout().clone();
    let count = |a: &String| {
        nodes
            .iter()
            .find(|n| **n.address() == *a)
            .map_or(0, |n| n.key_count())
    };
    while begun.elapsed() < limit {
        let counts: Vec<Vec<usize>> = layout
            .shards()
            .iter()
            .map(|s| s.replicas.iter().map(count).collect())
            .collect();
        let agreed = counts.iter().all(|c| c.iter().all(|n| *n == c[0]));
        if agreed && counts.iter().map(|c| c[0]).sum::<usize>() == total {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

// ---------------------------------------------------------------------------------------
// HTTP load.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
}

/// The load of one cluster: 32 clients (or as many as asked), each on one keep-alive
/// connection to a node of `targets` (round-robin by client), each request on a random key.
struct Load {
    targets: Vec<String>,
    keys: u64,
    replicated: bool,
    /// Each client sends the context of its last reply (otherwise `{}`).
    carry: bool,
}

#[derive(Default)]
struct Rate {
    ok: u64,
    non_2xx: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
}

impl Rate {
    fn per_sec(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p`th percentile of the latencies (sorted), in ms.
    fn latency_ms(&self, p: usize) -> f64 {
        let n = self.latencies_us.len();
        if n == 0 {
            return f64::NAN;
        }
        f64::from(self.latencies_us[(n - 1) * p / 100]) / 1000.0
    }

    /// Adds another run's counts (the runs of a mode add up to one longer run).
    fn absorb(&mut self, other: Rate) {
        self.ok += other.ok;
        self.non_2xx += other.non_2xx;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies_us.extend(other.latencies_us);
        self.latencies_us.sort_unstable();
    }
}

#[derive(Deserialize)]
struct KeyReply<'a> {
    #[serde(borrow, rename = "causal-context")]
    context: Option<&'a RawValue>,
    address: Option<String>,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A tiny xorshift generator: no shared state between clients.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

impl Load {
    fn url(&self, client: usize, key: &str) -> String {
        let target = &self.targets[client % self.targets.len()];
        format!("http://{target}/kvs/keys/{key}")
    }

    fn put_body(&self, value: &str, context: &str) -> String {
        if self.replicated {
            format!(r#"{{"value":{value},"causal-context":{context}}}"#)
        } else {
            format!(r#"{{"value":{value}}}"#)
        }
    }

    /// Writes keys `key0 .. key<keys-1>` once each over `clients` connections; 2xx
    /// answers.
    async fn preload(self: &Arc<Self>, clients: usize) -> u64 {
        let next = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..clients)
            .map(|c| {
                let (load, next) = (self.clone(), next.clone());
                tokio::spawn(async move {
                    let client = client();
                    let body = load.put_body(&value_text(), "{}");
                    let mut ok = 0;
                    loop {
                        let key = next.fetch_add(1, Ordering::Relaxed);
                        if key >= load.keys {
                            return ok;
                        }
                        let url = load.url(c, &format!("key{key}"));
                        match client.put(url).body(body.clone()).send().await {
                            Ok(r) if r.status().is_success() => {
                                let _ = r.bytes().await;
                                ok += 1;
                            }
                            Ok(r) => eprintln!("preload key{key}: {}", r.status()),
                            Err(e) => eprintln!("preload key{key}: {e}"),
                        }
                    }
                })
            })
            .collect();
        let mut ok = 0;
        for worker in workers {
            ok += worker.await.unwrap();
        }
        ok
    }

    /// Runs `op` on random keys from `clients` connections for `duration`; with a
    /// `sampler`, some PUTs write fresh keys whose arrival at the other replica it times.
    async fn run(
        self: &Arc<Self>,
        op: Op,
        clients: usize,
        duration: Duration,
        sampler: Option<Arc<Sampler>>,
    ) -> Rate {
        let started = Instant::now();
        let end = started + duration;
        let workers: Vec<_> = (0..clients)
            .map(|c| {
                let (load, sampler) = (self.clone(), sampler.clone());
                tokio::spawn(async move {
                    let client = client();
                    let value = value_text();
                    let mut rate = Rate {
                        latencies_us: Vec::with_capacity(1 << 16),
                        ..Rate::default()
                    };
                    let mut context = String::from("{}");
                    let mut random = 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1);
                    while Instant::now() < end {
                        let sample = sampler.as_ref().and_then(|s| s.claim());
                        let key = match sample {
                            Some(n) => format!("lag{n}"),
                            None => format!("key{}", next_random(&mut random) % load.keys),
                        };
                        let url = load.url(c, &key);
                        let request = match op {
                            Op::Put => client.put(url).body(load.put_body(&value, &context)),
                            Op::Get if load.carry => client
                                .get(url)
                                .body(format!(r#"{{"causal-context":{context}}}"#)),
                            Op::Get => client.get(url),
                        };
                        let begun = Instant::now();
                        let response = match request.send().await {
                            Ok(response) => response,
                            Err(error) => {
                                rate.errors += 1;
                                if rate.errors <= 3 {
                                    eprintln!("{key}: {error}");
                                }
                                continue;
                            }
                        };
                        let status = response.status();
                        let body = response.bytes().await.unwrap_or_default();
                        let replied = Instant::now();
                        rate.latencies_us
                            .push((replied - begun).as_micros().min(u32::MAX as u128) as u32);
                        if !status.is_success() {
                            rate.non_2xx += 1;
                            if rate.non_2xx <= 3 {
                                eprintln!(
                                    "{key} via {}: {status} {}",
                                    load.targets[c % load.targets.len()],
                                    String::from_utf8_lossy(&body)
                                );
                            }
                            continue;
                        }
                        rate.ok += 1;
                        if !load.carry && sample.is_none() {
                            continue;
                        }
                        let Ok(reply) = serde_json::from_slice::<KeyReply>(&body) else {
                            continue;
                        };
                        if load.carry {
                            if let Some(raw) = reply.context {
                                context = raw.get().to_string();
                            }
                        }
                        if let (Some(sampler), Some(_)) = (&sampler, sample) {
                            let served = reply
                                .address
                                .unwrap_or_else(|| load.targets[c % load.targets.len()].clone());
                            sampler.written(key, &served, replied);
                        }
                    }
                    rate
                })
            })
            .collect();
        let mut total = Rate::default();
        for worker in workers {
            let rate = worker.await.unwrap();
            total.ok += rate.ok;
            total.non_2xx += rate.non_2xx;
            total.errors += rate.errors;
            total.latencies_us.extend(rate.latencies_us);
        }
        total.elapsed = started.elapsed();
        total.latencies_us.sort_unstable();
        total
    }
}

// ---------------------------------------------------------------------------------------
// Gossip lag.

/// A write whose arrival at the other replica of its shard is awaited.
struct Pending {
    hash: u64,
    key: String,
    mate: Arc<Node>,
    replied: Instant,
}

/// Hands out sample keys evenly over a run and times their arrival at the shard-mate.
struct Sampler {
    quota: usize,
    taken: AtomicUsize,
    started: Instant,
    duration: Duration,
    /// Per replica address, its shard-mate (RF2).
    mates: HashMap<String, Arc<Node>>,
    pending: Mutex<Vec<Pending>>,
    lags: Mutex<Vec<Duration>>,
    /// Samples already in the mate's store when their reply came.
    at_reply: AtomicUsize,
}

impl Sampler {
    fn new(quota: usize, duration: Duration, nodes: &[Arc<Node>]) -> Sampler {
        let layout = nodes[0].replication().unwrap().placed().layout().clone();
        let mut mates = HashMap::new();
        for shard in layout.shards() {
            assert_eq!(shard.replicas.len(), 2, "the lag is measured at RF2");
            for (i, replica) in shard.replicas.iter().enumerate() {
                let mate = &shard.replicas[1 - i];
                let node = nodes.iter().find(|n| **n.address() == **mate).unwrap();
                mates.insert(replica.clone(), node.clone());
            }
        }
        Sampler {
            quota,
            taken: AtomicUsize::new(0),
            started: Instant::now(),
            duration,
            mates,
            pending: Mutex::new(Vec::new()),
            lags: Mutex::new(Vec::new()),
            at_reply: AtomicUsize::new(0),
        }
    }

    /// The number of the next sample if one is due now (they are spread over the run).
    fn claim(&self) -> Option<usize> {
        let due = (self.quota as f64 * self.started.elapsed().as_secs_f64()
            / self.duration.as_secs_f64())
        .ceil() as usize;
        let taken = self.taken.load(Ordering::Relaxed);
        if taken >= due.min(self.quota) {
            return None;
        }
        self.taken
            .compare_exchange(taken, taken + 1, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
    }

    /// Notes a sampled write that `served` acknowledged at `replied`: already at the mate
    /// (looked up at once) or pending for [`Sampler::poll`].
    fn written(&self, key: String, served: &str, replied: Instant) {
        let mate = self.mates[served].clone();
        let hash = key_hash(key.as_bytes());
        if let Ok(Some(_)) = mate.store().get(hash, &key) {
            self.at_reply.fetch_add(1, Ordering::Relaxed);
            self.lags.lock().push(replied.elapsed());
            return;
        }
        self.pending.lock().push(Pending {
            hash,
            key,
            mate,
            replied,
        });
    }

    /// Polls the mates' stores for the pending samples until `done` and none is pending
    /// (or 10 s after `done`: the rest never arrived).
    async fn poll(&self, done: &AtomicBool) {
        let mut done_at = None;
        loop {
            {
                let mut pending = self.pending.lock();
                let mut lags = self.lags.lock();
                pending.retain(|p| match p.mate.store().get(p.hash, &p.key) {
                    Ok(Some(_)) => {
                        lags.push(p.replied.elapsed());
                        false
                    }
                    _ => true,
                });
                if done.load(Ordering::Relaxed) {
                    let at = *done_at.get_or_insert_with(Instant::now);
                    if pending.is_empty() || at.elapsed() > Duration::from_secs(10) {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The table.

struct Row {
    figure: String,
    value: String,
    baseline: String,
    base_value: String,
    ratio: String,
    target: &'static str,
}

fn row(
    figure: impl Into<String>,
    value: f64,
    baseline: impl Into<String>,
    base: f64,
    target: &'static str,
) -> Row {
    let text = |v: f64| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else if v >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        }
    };
    Row {
        figure: figure.into(),
        value: text(value),
        baseline: baseline.into(),
        base_value: text(base),
        ratio: format!("{:.2}x", value / base),
        target,
    }
}

/// What the sections found: the table's rows, the notes printed under it, and how many
/// requests failed.
#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
    failed: u64,
}

/// Section 2: the sampled writes' lags.
#[derive(Default)]
struct Lags {
    lags: Vec<Duration>,
    /// Samples that never reached the mate.
    missing: usize,
    /// Samples already at the mate when their reply came.
    at_reply: usize,
}

/// One way of loading a cluster in section 1, and what its runs added up to.
struct Mode {
    name: &'static str,
    cluster: usize,
    load: Arc<Load>,
    /// PUT runs with sampled writes (section 2), and no GET runs.
    sampled: bool,
    put: Rate,
    get: Rate,
    /// Each round's PUT and GET req/s.
    rounds: Vec<[f64; 2]>,
}

/// One PUT run with `samples` sampled writes timed until they are at the other replica.
async fn sampled_run(
    load: &Arc<Load>,
    nodes: &[Arc<Node>],
    samples: usize,
    run: Duration,
    lags: &mut Lags,
) -> Rate {
    let sampler = Arc::new(Sampler::new(samples, run, nodes));
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let (sampler, done) = (sampler.clone(), done.clone());
        tokio::spawn(async move { sampler.poll(&done).await })
    };
    let put = load.run(Op::Put, 32, run, Some(sampler.clone())).await;
    done.store(true, Ordering::Relaxed);
    poller.await.unwrap();
    lags.lags.append(&mut sampler.lags.lock());
    lags.missing += sampler.pending.lock().len();
    lags.at_reply += sampler.at_reply.load(Ordering::Relaxed);
    put
}

/// Sections 1 and 2. Every cluster runs at once (idle but for its gossip while another is
/// measured) and the modes take turns, `rounds` runs of `run` each, so a change in what
/// else the machine does meets every mode alike.
async fn request_rates(report: &mut Report, rounds: usize, run: Duration, lag_samples: usize) {
    let keys = 10_000;
    let setups = [
        ("sharded", None),
        ("RF1", Some(1)),
        ("RF2", Some(2)),
        ("RF3", Some(3)),
    ];
    let mut clusters = Vec::new();
    let mut modes = Vec::new();
    for (i, (name, factor)) in setups.into_iter().enumerate() {
        let view = addresses(i as u8 + 1, 6);
        let cluster = Cluster::start(&view, factor).await;
        let load = Arc::new(Load {
            targets: view,
            keys,
            replicated: factor.is_some(),
            carry: false,
        });
        let preloaded = load.preload(32).await;
        assert_eq!(preloaded, keys, "every preload PUT of {name} succeeds");
        clusters.push(cluster);
        modes.push((name, i, load, false));
    }
    let rf2 = modes[2].2.clone();
    let carried = Arc::new(Load {
        targets: rf2.targets.clone(),
        keys,
        replicated: true,
        carry: true,
    });
    modes.push(("RF2 ctx", 2, carried, false));
    modes.push(("RF2 sampled", 2, rf2, true));
    let mut modes: Vec<Mode> = modes
        .into_iter()
        .map(|(name, cluster, load, sampled)| Mode {
            name,
            cluster,
            load,
            sampled,
            put: Rate::default(),
            get: Rate::default(),
            rounds: vec![[f64::NAN; 2]; rounds],
        })
        .collect();
    let mut lags = Lags::default();
    let count = modes.len();
    let metrics_from = modes[2].load.targets[0].clone();
    let refills_before = refills(&metrics_from).await;
    for round in 0..rounds {
        for (o, op) in [Op::Put, Op::Get].into_iter().enumerate() {
            for k in 0..count {
                let mode = &mut modes[(k + round) % count];
                let nodes = &clusters[mode.cluster].nodes;
                let rate = match (op, mode.sampled) {
                    (Op::Get, true) => continue,
                    (Op::Put, true) => {
                        let samples =
                            lag_samples / rounds + usize::from(round < lag_samples % rounds);
                        sampled_run(&mode.load, nodes, samples, run, &mut lags).await
                    }
                    _ => mode.load.run(op, 32, run, None).await,
                };
                mode.rounds[round][o] = rate.per_sec();
                match op {
                    Op::Put => mode.put.absorb(rate),
                    Op::Get => mode.get.absorb(rate),
                }
            }
        }
    }
    let refilled = refills(&metrics_from).await - refills_before;
    for cluster in clusters {
        cluster.stop().await;
    }
    report.notes.push(format!(
        "refills during the rate runs (ringkv_refills_total, every in-process node; no node \
         was down): {refilled}"
    ));

    for mode in &modes {
        for (op, rate) in [("PUT", &mode.put), ("GET", &mode.get)] {
            if rate.latencies_us.is_empty() {
                continue;
            }
            report.notes.push(format!(
                "{} {op}: {} ok in {:.1} s, p50 {:.2} ms, p99 {:.1} ms, max {:.0} ms, {} over 400 ms, \
                 {} non-2xx, {} errors",
                mode.name,
                rate.ok,
                rate.elapsed.as_secs_f64(),
                rate.latency_ms(50),
                rate.latency_ms(99),
                rate.latency_ms(100),
                rate.latencies_us.iter().filter(|l| **l > 400_000).count(),
                rate.non_2xx,
                rate.errors
            ));
            report.failed += rate.non_2xx + rate.errors;
        }
    }
    let mode = |name: &str| modes.iter().find(|m| m.name == name).unwrap();
    let (sharded, rf1, rf2, rf3) = (mode("sharded"), mode("RF1"), mode("RF2"), mode("RF3"));
    let (carried, sampled) = (mode("RF2 ctx"), mode("RF2 sampled"));
    for (o, op) in ["PUT", "GET"].into_iter().enumerate() {
        let of = |m: &Mode| {
            if o == 0 {
                m.put.per_sec()
            } else {
                m.get.per_sec()
            }
        };
        let sharded_name = format!("{op} req/s sharded (6 nodes, 1 copy)");
        for (m, name) in [(rf1, "RF1 (6x1)"), (rf2, "RF2 (3x2)"), (rf3, "RF3 (2x3)")] {
            let figure = format!("{op} req/s {name}");
            report
                .rows
                .push(row(figure, of(m), &sharded_name, of(sharded), ""));
        }
        report.rows.push(row(
            format!("{op} req/s RF2 (3x2)"),
            of(rf2),
            format!("{op} req/s RF1 (6x1)"),
            of(rf1),
            if o == 0 { ">= 0.70x" } else { ">= 0.90x" },
        ));
        let p50 = |m: &Mode| {
            if o == 0 {
                m.put.latency_ms(50)
            } else {
                m.get.latency_ms(50)
            }
        };
        report.rows.push(row(
            format!("{op} p50 latency ms RF2 (3x2)"),
            p50(rf2),
            format!("{op} p50 latency ms RF1 (6x1)"),
            p50(rf1),
            "",
        ));
        report.rows.push(row(
            format!("{op} req/s RF2, context carried"),
            of(carried),
            format!("{op} req/s RF2 (3x2)"),
            of(rf2),
            "",
        ));
        let per_round: Vec<String> = (0..rounds)
            .map(|r| format!("{:.2}", rf2.rounds[r][o] / rf1.rounds[r][o]))
            .collect();
        report.notes.push(format!(
            "{op} RF2/RF1 round by round: {}",
            per_round.join(" ")
        ));
    }
    report.rows.push(row(
        "PUT req/s RF2 while sampling the lag",
        sampled.put.per_sec(),
        "PUT req/s RF2 (3x2)",
        rf2.put.per_sec(),
        "",
    ));
    lags.lags.sort();
    let interval = GOSSIP_EVERY.as_secs_f64() * 1000.0;
    for (name, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
        report.rows.push(row(
            format!("gossip lag {name} ms ({} writes)", lags.lags.len()),
            percentile(&lags.lags, p),
            "gossip interval ms (GOSSIP_EVERY)",
            interval,
            "",
        ));
    }
    report.notes.push(format!(
        "gossip lag: {} of {} sampled writes were already in the other replica's store when \
         their PUT's reply came (the reply waits for the push to the mates); the others \
         were polled about every millisecond",
        lags.at_reply,
        lags.lags.len() + lags.missing
    ));
    if lags.missing > 0 {
        report.notes.push(format!(
            "GOSSIP: {} sampled writes never reached the other replica within 10 s",
            lags.missing
        ));
    }
}

/// `ringkv_refills_total` as `GET /metrics` on `node` shows it (the metrics are the
/// process's: every in-process node's refills).
async fn refills(node: &str) -> u64 {
    let text = reqwest::get(format!("http://{node}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("ringkv_refills_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank].as_secs_f64() * 1000.0
}

/// Section 3: 2 nodes at RF2, each on its own host, load `key_count` keys over HTTP; one
/// comes back empty. Returns the refill time.
async fn refill(report: &mut Report, key_count: usize) -> Duration {
    let pair = addresses(6, 2);
    let (host_a, host_b) = (host(), host());
    let a = start(&host_a, config(&pair[0], &pair, Some(2))).await;
    let b = start(&host_b, config(&pair[1], &pair, Some(2))).await;
    wait_in_force(&[a.clone(), b.clone()]).await;
    let loader = Arc::new(Load {
        targets: pair.clone(),
        keys: key_count as u64,
        replicated: true,
        carry: false,
    });
    let loading = Instant::now();
    let loaded = loader.preload(64).await;
    assert_eq!(loaded, key_count as u64, "every load PUT succeeds");
    let sent = loading.elapsed();
    let both = [a.clone(), b.clone()];
    let replicated = wait_replicated(&both, key_count, Duration::from_secs(120)).await;
    assert!(replicated, "the loaded keys reached both replicas");
    let load_time = loading.elapsed();
    report.notes.push(format!(
        "refill: the load sent {key_count} PUTs over HTTP (64 clients) in {:.0} ms \
         ({:.0} req/s); both replicas held them after {:.0} ms",
        sent.as_secs_f64() * 1000.0,
        key_count as f64 / sent.as_secs_f64(),
        load_time.as_secs_f64() * 1000.0
    ));
    drop((b, both));
    stop(host_b).await;
    let host_b = host();
    let restarted = Instant::now();
    let b = start(&host_b, config(&pair[1], &pair, Some(2))).await;
    let limit = Duration::from_secs(120);
    while b.key_count() != a.key_count() && restarted.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let refill = restarted.elapsed();
    let (held, mate) = (b.key_count(), a.key_count());
    if held != key_count || mate != key_count {
        report.notes.push(format!(
            "REFILL INCOMPLETE: the new replica holds {held} keys, its mate {mate}, of \
             {key_count}, after {:.0} ms",
            refill.as_secs_f64() * 1000.0
        ));
    }
    report.rows.push(row(
        format!("refill of an empty replica ms ({key_count} keys)"),
        refill.as_secs_f64() * 1000.0,
        "HTTP load of the same keys ms",
        load_time.as_secs_f64() * 1000.0,
        "<= 5000 ms at 1M",
    ));
    drop((a, b));
    stop(host_a).await;
    stop(host_b).await;
    refill
}

/// Section 4: 4 nodes at RF2 (2 shards) holding `key_count` keys change to 6 (3 shards).
/// `refill` (section 3's, of as many keys) is a second baseline of the wall time.
async fn movement(report: &mut Report, key_count: usize, refill: Option<Duration>) {
    let six = addresses(7, 6);
    let four = six[..4].to_vec();
    let host = host();
    let mut nodes = Vec::new();
    for address in &four {
        nodes.push(start(&host, config(address, &four, Some(2))).await);
    }
    wait_in_force(&nodes).await;
    for address in &six[4..] {
        nodes.push(start(&host, config(address, &six, Some(2))).await);
    }
    wait_in_force(&nodes).await;
    let keys: Vec<String> = (0..key_count).map(|i| format!("key{i}")).collect();
    let loading = Instant::now();
    {
        let (nodes, keys) = (nodes[..4].to_vec(), keys.clone());
        tokio::task::spawn_blocking(move || load_in_process(&nodes, &keys))
            .await
            .unwrap();
    }
    let replicated = wait_replicated(&nodes[..4], key_count, Duration::from_secs(120)).await;
    assert!(replicated, "the loaded keys reached every replica");
    let load_time = loading.elapsed();

    // Which keys change shard, and their bytes as shipped (key and stored record).
    let before = nodes[0].replication().unwrap().placed().map().clone();
    let vnodes = nodes[0].config().vnodes;
    let after = ShardMap::new(before.layout().regroup(&six, 2).unwrap(), vnodes).unwrap();
    let (mut moved, mut moved_bytes) = (0usize, 0usize);
    for key in &keys {
        let hash = key_hash(key.as_bytes());
        let from = before.shard_of_hash(hash);
        if from.id != after.shard_of_hash(hash).id {
            moved += 1;
            let holder = nodes
                .iter()
                .find(|n| **n.address() == *from.replicas[0])
                .unwrap();
            let record = holder.store().get(hash, key).unwrap().unwrap();
            moved_bytes += key.len() + record.len();
        }
    }

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let changing = Instant::now();
    let answer = client
        .put(format!("http://{}/kvs/view-change", four[0]))
        .json(&serde_json::json!({"view": six.join(","), "repl-factor": 2}))
        .send()
        .await
        .unwrap();
    let wall = changing.elapsed();
    let status = answer.status();
    let reply: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(status, 200, "{reply}");
    let counts: Vec<String> = reply["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{}: {}", s["shard-id"], s["key-count"]))
        .collect();
    let cluster: serde_json::Value = client
        .get(format!("http://{}/cluster/status", four[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let last = &cluster["last_change"];
    let shipped = last["keys_shipped"].as_u64().unwrap_or(0) as f64;
    let shipped_bytes = last["bytes_shipped"].as_u64().unwrap_or(0) as f64;
    report.notes.push(format!(
        "view change 4 -> 6 nodes: reply key-counts {}; last_change {last}",
        counts.join(", ")
    ));
    if !wait_replicated(&nodes, key_count, Duration::from_secs(30)).await {
        let counts: Vec<usize> = nodes.iter().map(|n| n.key_count()).collect();
        report.notes.push(format!(
            "AFTER THE CHANGE the replicas disagree 30 s on: {counts:?}"
        ));
    }
    let figure = format!("view change 2 -> 3 shards wall ms ({key_count} keys)");
    let wall_ms = wall.as_secs_f64() * 1000.0;
    report.rows.push(row(
        &figure,
        wall_ms,
        "in-process load of the keys ms",
        load_time.as_secs_f64() * 1000.0,
        "",
    ));
    if let Some(refill) = refill {
        report.rows.push(row(
            &figure,
            wall_ms,
            "refill of an empty replica ms (above)",
            refill.as_secs_f64() * 1000.0,
            "",
        ));
    }
    report.rows.push(row(
        "keys whose shard changed",
        moved as f64,
        "ideal N/3",
        key_count as f64 / 3.0,
        "<= 1.05x",
    ));
    report.rows.push(row(
        "keys_shipped (/cluster/status)",
        shipped,
        "moved keys x 2 (one per new replica)",
        moved as f64 * 2.0,
        "~2x by design",
    ));
    report.rows.push(row(
        "bytes_shipped (/cluster/status)",
        shipped_bytes,
        "moved key+record bytes x 2",
        moved_bytes as f64 * 2.0,
        "~2x by design",
    ));
    drop(nodes);
    stop(host).await;
}

fn main() {
    // RUST_LOG=debug shows what the nodes do (and why a request failed).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_target(false)
            .init();
    }
    let full = std::env::args().any(|a| a == "--bench");
    let key_count: usize = if full { 1_000_000 } else { 20_000 };
    let (rounds, run) = if full {
        (3, Duration::from_secs(1))
    } else {
        (2, Duration::from_millis(250))
    };
    let lag_samples = if full { 2_000 } else { 200 };
    let sections =
        std::env::var("RINGKV_BENCH_SECTIONS").unwrap_or_else(|_| "rates,refill,movement".into());
    let wanted = |name: &str| sections.split(',').any(|s| s.trim() == name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let begun = Instant::now();
    let report = runtime.block_on(async {
        let mut report = Report::default();
        if wanted("rates") {
            request_rates(&mut report, rounds, run, lag_samples).await;
        }
        let refilled = match wanted("refill") {
            true => Some(refill(&mut report, key_count).await),
            false => None,
        };
        if wanted("movement") {
            movement(&mut report, key_count, refilled).await;
        }
        report
    });
    println!(
        "\nreplicated benchmark: rates on 6 nodes (10000 keys, 32 clients, {rounds} turns of \
         {:.2} s per mode), {key_count} keys for refill and movement, ~100-byte values, \
         loopback, {} cores",
        run.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<48} {:>10}   {:<40} {:>10} {:>8}  target",
        "figure", "value", "baseline (same run)", "value", "ratio"
    );
    for r in &report.rows {
        println!(
            "{:<48} {:>10}   {:<40} {:>10} {:>8}  {}",
            r.figure, r.value, r.baseline, r.base_value, r.ratio, r.target
        );
    }
    for note in &report.notes {
        println!("  {note}");
    }
    println!("  (whole bench {:.0} s)", begun.elapsed().as_secs_f64());
    assert_eq!(
        report.failed, 0,
        "some requests failed (see the notes and stderr)"
    );
}

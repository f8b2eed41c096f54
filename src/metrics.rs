//! Prometheus metrics: counters and a latency histogram kept once per process (a node is one
//! process), and gauges read from the node itself at scrape time. `GET /metrics` renders
//! them in the Prometheus text format.
//!
//! The process-wide set is created on first use and never installed anywhere global, so
//! several nodes in one process (tests, benchmarks) share its counters without any
//! "already installed" failure; the gauges always describe the node that is scraped.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use prometheus::{
    Counter, Encoder, Gauge, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use warp::http::{Method, StatusCode};

use crate::wire::{ChangeReport, NodeState};

mod requests;

use requests::RequestStats;

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Request latency buckets, in seconds: a local key request takes tens of microseconds,
/// a view change seconds.
const LATENCY_BUCKETS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The route label of a request: the course's key, key-count and view-change routes, the
/// node-to-node routes, and everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLabel {
    Key,
    KeyCount,
    ViewChange,
    Internal,
    Other,
}

impl RouteLabel {
    /// Every route label, in the order of their discriminants.
    const ALL: [RouteLabel; 5] = [
        RouteLabel::Key,
        RouteLabel::KeyCount,
        RouteLabel::ViewChange,
        RouteLabel::Internal,
        RouteLabel::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteLabel::Key => "key",
            RouteLabel::KeyCount => "key-count",
            RouteLabel::ViewChange => "view-change",
            RouteLabel::Internal => "internal",
            RouteLabel::Other => "other",
        }
    }
}

/// How a view change coordinated by this node went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOutcome {
    Started,
    Committed,
    Aborted,
}

impl ChangeOutcome {
    fn as_str(self) -> &'static str {
        match self {
            ChangeOutcome::Started => "started",
            ChangeOutcome::Committed => "committed",
            ChangeOutcome::Aborted => "aborted",
        }
    }
}

/// The process-wide counters and histogram.
struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    /// `requests`' counters of [`HOT_STATUSES`], by route, method and status.
    hot_requests: Box<[OnceLock<IntCounter>]>,
    /// The requests of hot statuses counted since the last scrape (by the slots of
    /// `hot_requests`), and every request's latency by route.
    request_stats: RequestStats<HOT_SLOTS, ROUTES, { LATENCY_BUCKETS.len() }>,
    forwards: IntCounterVec,
    forward_failures: IntCounterVec,
    view_changes: IntCounterVec,
    keys_shipped: IntCounter,
    bytes_shipped: IntCounter,
    keys_received: IntCounter,
    bytes_received: IntCounter,
    freeze: prometheus::Histogram,
    gossip_received: IntCounter,
    gossip_sent: IntCounter,
    gossip_silent: IntCounter,
    refills: IntCounter,
    refill_slices: IntCounter,
    tombstones_swept: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let counter = IntCounter::new(name, help)?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let counter = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(counter.clone()))?;
    Ok(counter)
}

impl Metrics {
    fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let freeze = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "ringkv_handover_freeze_seconds",
                "How long the ranges this node handed over stayed frozen in a view change, \
                 from the catch-up's freeze to the commit (requests on them wait meanwhile).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(freeze.clone()))?;
        Ok(Metrics {
            freeze,
            requests: counter_vec(
                &registry,
                "ringkv_requests_total",
                "Requests answered, by route, method and status.",
                &["route", "method", "status"],
            )?,
            hot_requests: (0..HOT_SLOTS).map(|_| OnceLock::new()).collect(),
            request_stats: RequestStats::new(LATENCY_BUCKETS),
            forwards: counter_vec(
                &registry,
                "ringkv_forwards_total",
                "Key requests forwarded to their owner (or relayed to the main instance), by peer.",
                &["peer"],
            )?,
            forward_failures: counter_vec(
                &registry,
                "ringkv_forward_failures_total",
                "Forwarded key requests the peer did not answer or refused, by peer.",
                &["peer"],
            )?,
            view_changes: counter_vec(
                &registry,
                "ringkv_view_changes_total",
                "View changes this node coordinated: started, committed, aborted.",
                &["outcome"],
            )?,
            keys_shipped: counter(
                &registry,
                "ringkv_transfer_keys_shipped_total",
                "Keys (and tombstones) this node sent to new owners during view changes.",
            )?,
            bytes_shipped: counter(
                &registry,
                "ringkv_transfer_bytes_shipped_total",
                "Bytes of keys and values this node sent to new owners during view changes.",
            )?,
            keys_received: counter(
                &registry,
                "ringkv_transfer_keys_received_total",
                "Keys (and tombstones) this node received for ranges it takes over.",
            )?,
            bytes_received: counter(
                &registry,
                "ringkv_transfer_bytes_received_total",
                "Bytes of keys and values this node received for ranges it takes over.",
            )?,
            gossip_received: counter(
                &registry,
                "ringkv_gossip_writes_received_total",
                "Writes of its shard this replica took in from its shard-mates' logs.",
            )?,
            gossip_sent: counter(
                &registry,
                "ringkv_gossip_writes_sent_total",
                "Writes this replica handed its shard-mates in answer to their pulls.",
            )?,
            gossip_silent: counter(
                &registry,
                "ringkv_gossip_silent_pulls_total",
                "Pulls from a shard-mate that got no answer in time.",
            )?,
            refills: counter(
                &registry,
                "ringkv_refills_total",
                "Refills by range digests (anti-entropy repairs) this replica completed.",
            )?,
            refill_slices: counter(
                &registry,
                "ringkv_refill_slices_total",
                "Ring slices whose digests differed and were shipped in refills.",
            )?,
            tombstones_swept: counter(
                &registry,
                "ringkv_tombstones_swept_total",
                "Tombstones no log accounted for (kept through a view change or a restart, \
                 or taken in by a refill) dropped once every replica held the same values.",
            )?,
            registry,
        })
    }
}

static METRICS: LazyLock<Option<Metrics>> = LazyLock::new(|| match Metrics::new() {
    Ok(metrics) => {
        // Every outcome shows from the first scrape on, at 0, so rates work from the start.
        for outcome in [
            ChangeOutcome::Started,
            ChangeOutcome::Committed,
            ChangeOutcome::Aborted,
        ] {
            metrics.view_changes.with_label_values(&[outcome.as_str()]);
        }
        Some(metrics)
    }
    Err(error) => {
        tracing::error!(%error, "metrics disabled: the registry could not be built");
        None
    }
});

fn with(record: impl FnOnce(&Metrics)) {
    if let Some(metrics) = METRICS.as_ref() {
        record(metrics);
    }
}

/// The method labels: a fixed set, so odd methods cannot grow the label space.
const METHOD_LABELS: [&str; 8] = [
    "GET", "PUT", "DELETE", "POST", "HEAD", "OPTIONS", "PATCH", "other",
];

/// `method`'s index in [`METHOD_LABELS`].
fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::PUT => 1,
        Method::DELETE => 2,
        Method::POST => 3,
        Method::HEAD => 4,
        Method::OPTIONS => 5,
        Method::PATCH => 6,
        _ => 7,
    }
}

/// The statuses whose request counters are looked up once (per route and method), not on
/// every request: what key requests answer.
const HOT_STATUSES: [StatusCode; 3] = [StatusCode::OK, StatusCode::CREATED, StatusCode::NOT_FOUND];

/// The route labels.
const ROUTES: usize = RouteLabel::ALL.len();

/// The hot counters: one per route, method and hot status.
const HOT_SLOTS: usize = ROUTES * METHOD_LABELS.len() * HOT_STATUSES.len();

/// The requests counter of one route, method and hot status, found by label once.
fn hot_slot(route: RouteLabel, method: usize, status: usize) -> usize {
    (route as usize * METHOD_LABELS.len() + method) * HOT_STATUSES.len() + status
}

/// The requests counter of a slot of [`hot_slot`], found by label once.
fn hot_counter(m: &Metrics, slot: usize) -> Option<&IntCounter> {
    let status = slot % HOT_STATUSES.len();
    let method = slot / HOT_STATUSES.len() % METHOD_LABELS.len();
    let route = RouteLabel::ALL.get(slot / HOT_STATUSES.len() / METHOD_LABELS.len())?;
    let counter = m.hot_requests.get(slot)?.get_or_init(|| {
        m.requests.with_label_values(&[
            route.as_str(),
            METHOD_LABELS[method],
            HOT_STATUSES[status].as_str(),
        ])
    });
    Some(counter)
}

/// Adds the requests counted since the last scrape to their counters.
fn take_request_counts(m: &Metrics) {
    for (slot, count) in m.request_stats.take_counts() {
        if let Some(counter) = hot_counter(m, slot) {
            counter.inc_by(count);
        }
    }
}

/// Counts one answered request and its latency.
pub fn request(route: RouteLabel, method: &Method, status: StatusCode, elapsed: Duration) {
    with(|m| {
        let method = method_index(method);
        let hot = HOT_STATUSES.iter().position(|hot| *hot == status);
        if hot.is_none() {
            m.requests
                .with_label_values(&[route.as_str(), METHOD_LABELS[method], status.as_str()])
                .inc();
        }
        let slot = hot.map(|hot| hot_slot(route, method, hot));
        m.request_stats.record(slot, route as usize, elapsed);
    });
}

/// Counts one request forwarded to `peer`, and whether it failed.
pub fn forward(peer: &str, ok: bool) {
    with(|m| {
        m.forwards.with_label_values(&[peer]).inc();
        if !ok {
            m.forward_failures.with_label_values(&[peer]).inc();
        }
    });
}

/// Counts one gossip round: writes taken in, mates that did not answer.
pub fn gossip_round(received: usize, silent: usize) {
    with(|m| {
        m.gossip_received.inc_by(received as u64);
        m.gossip_silent.inc_by(silent as u64);
    });
}

/// Counts the writes handed to a shard-mate's pull.
pub fn gossip_sent(writes: usize) {
    with(|m| m.gossip_sent.inc_by(writes as u64));
}

/// Counts a completed refill that shipped `slices` slices.
pub fn refill(slices: usize) {
    with(|m| {
        m.refills.inc();
        m.refill_slices.inc_by(slices as u64);
    });
}

/// Counts tombstones a sweep dropped.
pub fn tombstones_swept(dropped: usize) {
    with(|m| m.tombstones_swept.inc_by(dropped as u64));
}

/// Counts a step of a view change this node coordinates.
pub fn view_change(outcome: ChangeOutcome) {
    with(|m| m.view_changes.with_label_values(&[outcome.as_str()]).inc());
}

/// Counts a batch sent to a new owner.
pub fn shipped(keys: usize, bytes: usize) {
    with(|m| {
        m.keys_shipped.inc_by(keys as u64);
        m.bytes_shipped.inc_by(bytes as u64);
    });
}

/// Records how long this node's outgoing ranges were frozen in a view change.
pub fn freeze(frozen: Duration) {
    with(|m| m.freeze.observe(frozen.as_secs_f64()));
}

/// Counts a batch received for a range this node takes over.
pub fn received(keys: usize, bytes: usize) {
    with(|m| {
        m.keys_received.inc_by(keys as u64);
        m.bytes_received.inc_by(bytes as u64);
    });
}

/// What a node is right now, as the metrics report it: a snapshot the node takes, so this
/// module depends on no node type.
#[derive(Debug, Clone)]
pub struct NodeGauges {
    pub state: NodeState,
    pub value_bytes: usize,
    pub waiting_for_handover: usize,
    pub last_change: Option<ChangeReport>,
    /// With `--data-dir`: the disk's figures.
    pub disk: Option<DiskGauges>,
}

/// A durable node's disk, as the metrics report it.
#[derive(Debug, Clone, Copy)]
pub struct DiskGauges {
    pub disk_bytes: u64,
    pub journal_bytes: u64,
    pub fsyncs: u64,
    pub fsync_micros: u64,
}

/// The gauges that describe a node right now.
fn node_gauges(node: &NodeGauges) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    let int_gauge = |name: &str, help: &str, value: i64| -> prometheus::Result<()> {
        let gauge = IntGauge::new(name, help)?;
        gauge.set(value);
        registry.register(Box::new(gauge))
    };
    let state = &node.state;
    int_gauge(
        "ringkv_keys",
        "Keys stored on this node.",
        state.key_count as i64,
    )?;
    int_gauge(
        "ringkv_value_bytes",
        "Bytes of values stored on this node.",
        node.value_bytes as i64,
    )?;
    int_gauge(
        "ringkv_epoch",
        "Epoch of the view in force on this node.",
        state.epoch as i64,
    )?;
    int_gauge(
        "ringkv_view_nodes",
        "Nodes in the view in force on this node.",
        state.view.len() as i64,
    )?;
    int_gauge(
        "ringkv_view_change_pending",
        "1 while this node has a prepared view change that is not committed or aborted.",
        i64::from(state.pending.is_some()),
    )?;
    int_gauge(
        "ringkv_requests_waiting_for_handover",
        "Key requests waiting for a range this node is handing over to commit.",
        node.waiting_for_handover as i64,
    )?;
    if let Some(disk) = &node.disk {
        int_gauge(
            "ringkv_disk_bytes",
            "Bytes the data directory takes on disk (tables and journal).",
            disk.disk_bytes as i64,
        )?;
        int_gauge(
            "ringkv_journal_bytes",
            "Bytes of the write-ahead journal on disk.",
            disk.journal_bytes as i64,
        )?;
        let fsyncs = IntCounter::new("ringkv_fsyncs_total", "fsyncs of the journal.")?;
        fsyncs.inc_by(disk.fsyncs);
        registry.register(Box::new(fsyncs))?;
        let seconds = Counter::new(
            "ringkv_fsync_seconds_total",
            "Time spent in fsyncs of the journal (divide by ringkv_fsyncs_total for the mean).",
        )?;
        seconds.inc_by(disk.fsync_micros as f64 / 1e6);
        registry.register(Box::new(seconds))?;
    }
    if let Some(replica) = &state.replica {
        let lag = IntGaugeVec::new(
            Opts::new(
                "ringkv_gossip_mate_lag_writes",
                "Writes this replica applied that a shard-mate had not, when it last pulled.",
            ),
            &["mate"],
        )?;
        for (mate, writes) in &replica.mates_lag {
            lag.with_label_values(&[mate.as_str()]).set(*writes as i64);
        }
        registry.register(Box::new(lag))?;
    }
    let info = IntGaugeVec::new(
        Opts::new("ringkv_node_info", "Always 1; labels describe the node."),
        &["address", "vnodes", "version"],
    )?;
    info.with_label_values(&[
        state.address.as_str(),
        &state.vnodes.to_string(),
        env!("CARGO_PKG_VERSION"),
    ])
    .set(1);
    registry.register(Box::new(info))?;
    if let Some(report) = &node.last_change {
        let seconds = Gauge::new(
            "ringkv_last_view_change_seconds",
            "Duration of the last view change this node coordinated.",
        )?;
        seconds.set(report.millis as f64 / 1000.0);
        registry.register(Box::new(seconds))?;
        int_gauge(
            "ringkv_last_view_change_keys_shipped",
            "Keys shipped by the last view change this node coordinated.",
            report.keys_shipped as i64,
        )?;
    }
    Ok(registry)
}

/// Why the metrics could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("metrics are disabled")]
    Disabled,
    #[error("cannot render metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
}

/// Every metric of this process and of the node it describes, in the Prometheus text format.
pub fn render(node: &NodeGauges) -> Result<String, RenderError> {
    let metrics = METRICS.as_ref().ok_or(RenderError::Disabled)?;
    take_request_counts(metrics);
    let mut families = metrics.registry.gather();
    families.push(metrics.request_stats.histogram_family(
        "ringkv_request_duration_seconds",
        "Time from a request's arrival to its answer, by route.",
        "route",
        RouteLabel::ALL.map(RouteLabel::as_str),
    ));
    families.extend(node_gauges(node)?.gather());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

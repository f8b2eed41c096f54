//! Operator tooling on real nodes: `/metrics` counters move with the traffic, `/cluster/status`
//! matches the nodes, `ringctl` against a running cluster (output and exit codes), and the
//! cluster token guarding the node-to-node endpoints.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Client, Cluster, TestNode};
use ringkv::ring::{HashRing, DEFAULT_VNODES};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// Prometheus text, parsed.

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// The samples of one scrape.
struct Metrics(Vec<Sample>);

/// Parses `name{label="value",...} number` lines; comments and blank lines are skipped.
fn parse_metrics(text: &str) -> Metrics {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => (name.to_string(), parse_labels(rest, line)),
        };
        samples.push((name, labels, value));
    }
    Metrics(samples)
}

/// `a="x",b="y\"z"}` into a map.
fn parse_labels(mut rest: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !rest.starts_with('}') {
        let (name, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label in {line}"));
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    if let Some((_, c)) = chars.next() {
                        value.push(if c == 'n' { '\n' } else { c });
                    }
                }
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label in {line}"),
            }
        };
        labels.insert(name.to_string(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

impl Metrics {
    /// The sum of every sample of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, value)| value)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _, _)| n == name)
    }
}

fn scrape(client: &Client, node: &str) -> Metrics {
    let answer = client
        .try_send("GET", &format!("http://{node}/metrics"), None)
        .expect("/metrics answers");
    assert_eq!(answer.status, 200, "/metrics of {node}: {}", answer.text);
    parse_metrics(&answer.text)
}

#[test]
fn the_metrics_parser_reads_labels_and_escapes() {
    let metrics = parse_metrics(
        "# HELP x y\n# TYPE x counter\nx{a=\"1\",b=\"q\\\"z,\"} 3\nx{a=\"2\"} 4\ny 1.5\n",
    );
    assert_eq!(metrics.sum("x", &[]), 7.0);
    assert_eq!(metrics.sum("x", &[("b", "q\"z,")]), 3.0);
    assert_eq!(metrics.sum("y", &[]), 1.5);
    assert!(!metrics.has("z"));
}

// ---------------------------------------------------------------------------------------
// /metrics

#[test]
fn metrics_counters_move_with_requests_and_view_changes() {
    let mut cluster = Cluster::start(2, &[]);
    let client = Client::new();
    let (a, b) = (
        cluster.addresses()[0].clone(),
        cluster.addresses()[1].clone(),
    );
    let before_a = scrape(&client, &a);
    let before_b = scrape(&client, &b);

    // Enough keys that the third node surely takes over some: (2/3)^60 of rings give it none.
    const KEYS: u32 = 60;
    let mut forwarded = 0;
    for i in 0..KEYS {
        let answer = client.put_key(&a, &format!("m{i}"), &json!({"i": i}));
        assert_eq!(answer.status, 201, "{answer:?}");
        if answer.body.get("address").is_some() {
            forwarded += 1;
        }
    }
    assert!(
        forwarded > 0 && forwarded < KEYS,
        "both nodes own some keys"
    );
    for _ in 0..3 {
        client.key_count(&a);
    }
    for _ in 0..2 {
        assert_eq!(client.get(&format!("http://{a}/no/such/path")).status, 404);
    }
    let after_a = scrape(&client, &a);
    let after_b = scrape(&client, &b);
    let delta = |after: &Metrics, before: &Metrics, name: &str, labels: &[(&str, &str)]| {
        after.sum(name, labels) - before.sum(name, labels)
    };
    let requests = "ringkv_requests_total";
    let put_201 = [("route", "key"), ("method", "PUT"), ("status", "201")];
    assert_eq!(
        delta(&after_a, &before_a, requests, &put_201),
        f64::from(KEYS)
    );
    let count_200 = [("route", "key-count"), ("method", "GET"), ("status", "200")];
    assert_eq!(delta(&after_a, &before_a, requests, &count_200), 3.0);
    let other_404 = [("route", "other"), ("method", "GET"), ("status", "404")];
    assert_eq!(delta(&after_a, &before_a, requests, &other_404), 2.0);
    let scrape_200 = [("route", "other"), ("method", "GET"), ("status", "200")];
    assert!(delta(&after_a, &before_a, requests, &scrape_200) >= 1.0);
    let latency = "ringkv_request_duration_seconds_count";
    assert_eq!(
        delta(&after_a, &before_a, latency, &[("route", "key")]),
        f64::from(KEYS)
    );
    let to_b = [("peer", b.as_str())];
    assert_eq!(
        delta(&after_a, &before_a, "ringkv_forwards_total", &to_b),
        f64::from(forwarded)
    );
    assert_eq!(
        delta(&after_a, &before_a, "ringkv_forward_failures_total", &to_b),
        0.0
    );
    let internal_put = [("route", "internal"), ("method", "PUT"), ("status", "201")];
    assert_eq!(
        delta(&after_b, &before_b, requests, &internal_put),
        f64::from(forwarded)
    );
    assert_eq!(
        after_a.sum("ringkv_keys", &[]),
        client.key_count(&a) as f64,
        "the keys gauge is read from the store"
    );
    assert!(after_a.sum("ringkv_value_bytes", &[]) > 0.0);
    assert_eq!(after_a.sum("ringkv_epoch", &[]), 0.0);
    assert_eq!(after_a.sum("ringkv_view_nodes", &[]), 2.0);
    assert_eq!(
        after_a.sum("ringkv_node_info", &[("address", a.as_str())]),
        1.0
    );
    assert!(!after_a.has("ringkv_last_view_change_seconds"));

    // A view change: counted by its coordinator, keys shipped by some node received by another.
    let c = common::fresh_address();
    let full = vec![a.clone(), b.clone(), c.clone()];
    cluster.nodes.push(TestNode::start(&c, &full, &[]));
    let before: Vec<Metrics> = full.iter().map(|n| scrape(&client, n)).collect();
    let answer = client.view_change(&a, &full.join(","));
    assert_eq!(answer.status, 200, "{answer:?}");
    let after: Vec<Metrics> = full.iter().map(|n| scrape(&client, n)).collect();
    let changes = "ringkv_view_changes_total";
    for (outcome, expected) in [("started", 1.0), ("committed", 1.0), ("aborted", 0.0)] {
        let outcome = [("outcome", outcome)];
        assert_eq!(
            delta(&after[0], &before[0], changes, &outcome),
            expected,
            "{outcome:?}"
        );
        assert_eq!(delta(&after[1], &before[1], changes, &outcome), 0.0);
    }
    let moved = |name: &str| -> f64 {
        after
            .iter()
            .zip(&before)
            .map(|(after, before)| delta(after, before, name, &[]))
            .sum()
    };
    let shipped = moved("ringkv_transfer_keys_shipped_total");
    assert!(shipped > 0.0, "the new node takes over some keys");
    assert_eq!(
        moved("ringkv_handover_freeze_seconds_count"),
        2.0,
        "the two nodes that hand over each had one freeze window"
    );
    assert_eq!(shipped, moved("ringkv_transfer_keys_received_total"));
    assert_eq!(
        moved("ringkv_transfer_bytes_shipped_total"),
        moved("ringkv_transfer_bytes_received_total")
    );
    assert_eq!(
        after[2].sum("ringkv_transfer_keys_received_total", &[]),
        client.key_count(&c) as f64,
        "the new node received exactly what it holds"
    );
    for metrics in &after {
        assert_eq!(metrics.sum("ringkv_epoch", &[]), 1.0);
        assert_eq!(metrics.sum("ringkv_view_nodes", &[]), 3.0);
        assert_eq!(metrics.sum("ringkv_view_change_pending", &[]), 0.0);
    }
    assert!(after[0].has("ringkv_last_view_change_seconds"));

    // A view change with a node down fails before it starts: a 503 on the route, no start.
    let dead = common::fresh_address();
    let answer = client.view_change(&a, &format!("{},{dead}", full.join(",")));
    assert_eq!(answer.status, 503, "{answer:?}");
    let last = scrape(&client, &a);
    let view_change_503 = [
        ("route", "view-change"),
        ("method", "PUT"),
        ("status", "503"),
    ];
    assert_eq!(delta(&last, &after[0], requests, &view_change_503), 1.0);
    assert_eq!(
        delta(&last, &after[0], changes, &[("outcome", "started")]),
        0.0
    );
}

// ---------------------------------------------------------------------------------------
// /cluster/status

fn cluster_status(client: &Client, node: &str) -> Value {
    let answer = client.get(&format!("http://{node}/cluster/status"));
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.body
}

#[test]
fn cluster_status_matches_the_nodes_and_the_ring() {
    let mut cluster = Cluster::start(3, &[]);
    let client = Client::new();
    let addresses = cluster.addresses();
    let data = common::sample_data("s", 150);
    common::load(&client, &addresses, &data);
    let ring = HashRing::new(&addresses, DEFAULT_VNODES).unwrap();
    let shares: BTreeMap<String, f64> = ring
        .ownership()
        .into_iter()
        .map(|(a, s)| (a.to_string(), s))
        .collect();

    for asked in &addresses {
        let status = cluster_status(&client, asked);
        assert_eq!(status["address"], json!(asked));
        assert_eq!(status["epoch"], json!(0));
        assert_eq!(status["view"], json!(addresses));
        assert_eq!(status["vnodes"], json!(DEFAULT_VNODES));
        assert_eq!(status["reachable"], json!(3));
        assert_eq!(status["key-count"], json!(150));
        assert_eq!(status["change"], Value::Null);
        assert_eq!(status["last_change"], Value::Null);
        let nodes = status["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3);
        let mut owned = 0.0;
        for (node, address) in nodes.iter().zip(&addresses) {
            assert_eq!(node["address"], json!(address));
            assert_eq!(node["reachable"], json!(true));
            assert_eq!(node["pending"], json!(false));
            assert_eq!(node["epoch"], json!(0));
            assert_eq!(node["key-count"], json!(client.key_count(address)));
            let share = node["ownership"].as_f64().unwrap();
            assert!((share - shares[address]).abs() < 1e-12, "{node}");
            owned += share;
        }
        assert!((owned - 1.0).abs() < 1e-9, "ownership sums to {owned}");
    }

    // After a change, the coordinator reports it; a node that is down shows as such, fast.
    let two = addresses[..2].to_vec();
    let answer = client.view_change(&addresses[0], &two.join(","));
    common::assert_view_change_ok(&client, &answer, &two);
    let status = cluster_status(&client, &addresses[0]);
    assert_eq!(status["epoch"], json!(1));
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2);
    let last = &status["last_change"];
    assert_eq!(last["epoch"], json!(1));
    assert_eq!(last["view"], json!(two));
    assert!(last["keys_shipped"].as_u64().unwrap() > 0, "{last}");
    cluster.nodes[1].kill();
    let started = Instant::now();
    let status = cluster_status(&client, &addresses[0]);
    assert!(started.elapsed() < Duration::from_secs(5), "bounded probes");
    assert_eq!(status["reachable"], json!(1));
    let down = &status["nodes"][1];
    assert_eq!(
        (&down["address"], &down["reachable"], &down["key-count"]),
        (&json!(addresses[1]), &json!(false), &Value::Null),
        "{status}"
    );
    assert!(down["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(
        status["key-count"],
        json!(client.key_count(&addresses[0])),
        "only reachable nodes count"
    );
}

// ---------------------------------------------------------------------------------------
// ringctl

/// What a `ringctl` run printed and how it exited.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn ringctl(args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_ringctl"))
        .args(args)
        .env_remove("RINGCTL_NODE")
        .output()
        .expect("ringctl runs");
    Run {
        code: output.status.code().expect("ringctl exits"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn json_of(run: &Run) -> Value {
    serde_json::from_str(run.stdout.trim()).unwrap_or_else(|_| panic!("not JSON: {run:?}"))
}

/// The line of a table that starts with `first`.
fn row<'a>(text: &'a str, first: &str) -> &'a str {
    text.lines()
        .find(|line| line.starts_with(first))
        .unwrap_or_else(|| panic!("no row {first} in:\n{text}"))
}

#[test]
fn ringctl_key_commands_print_answers_and_exit_codes() {
    let cluster = Cluster::start(3, &[]);
    let a = &cluster.addresses()[0];

    let put = ringctl(&["put", "k1", r#"{"a":[1,2]}"#, "--node", a]);
    assert_eq!(put.code, 0, "{put:?}");
    assert_eq!(json_of(&put)["message"], "Added successfully");
    let put = ringctl(&["put", "k2", "plain words", "--node", a]);
    assert_eq!(put.code, 0, "{put:?}");
    let get = ringctl(&["get", "k1", "-n", a]);
    assert_eq!(
        (get.code, &json_of(&get)["value"]),
        (0, &json!({"a": [1, 2]}))
    );
    let get = ringctl(&["get", "k2", "-n", &cluster.addresses()[2]]);
    assert_eq!(
        (get.code, &json_of(&get)["value"]),
        (0, &json!("plain words"))
    );
    let missing = ringctl(&["get", "nope", "-n", a]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert_eq!(json_of(&missing)["error"], "Key does not exist");
    let delete = ringctl(&["delete", "k1", "-n", a]);
    assert_eq!(
        (delete.code, &json_of(&delete)["message"]),
        (0, &json!("Deleted successfully"))
    );
    assert_eq!(ringctl(&["delete", "k1", "-n", a]).code, 1);

    let dead = common::fresh_address();
    let unreachable = ringctl(&["get", "k2", "-n", &dead, "--timeout", "2"]);
    assert_eq!(unreachable.code, 1, "{unreachable:?}");
    assert!(unreachable.stderr.contains(&dead), "{unreachable:?}");

    for usage in [
        vec!["get"],
        vec!["get", "k"],
        vec!["frobnicate"],
        vec!["put", "k", "v", "-n", a, "--timeout", "0"],
        vec!["view-change", "-n", a, "not-a-view"],
    ] {
        let run = ringctl(&usage);
        assert_eq!(run.code, 2, "{usage:?}: {run:?}");
    }
}

#[test]
fn ringctl_status_and_view_changes_on_a_real_cluster() {
    let mut cluster = Cluster::start(3, &[]);
    let client = Client::new();
    let addresses = cluster.addresses();
    let a = addresses[0].clone();
    let data = common::sample_data("r", 120);
    common::load(&client, &addresses, &data);

    let status = ringctl(&["status", "--node", &a]);
    assert_eq!(status.code, 0, "{status:?}");
    assert!(status.stdout.starts_with("View at epoch 0 (3 nodes"));
    for address in &addresses {
        let line = row(&status.stdout, address);
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[1], "Up", "{line}");
        assert_eq!(fields[3], client.key_count(address).to_string(), "{line}");
        assert!(fields[4].ends_with('%'), "{line}");
    }
    let total: Vec<&str> = row(&status.stdout, "Total").split_whitespace().collect();
    assert_eq!(total, ["Total", "3/3", "120", "100.00%"]);
    let json_status = ringctl(&["status", "--node", &a, "--json"]);
    assert_eq!(json_of(&json_status)["key-count"], json!(120));

    // A change to four nodes: progress while it runs, then the shards table.
    let d = common::fresh_address();
    let mut four = addresses.clone();
    four.push(d.clone());
    cluster.nodes.push(TestNode::start(&d, &four, &[]));
    let change = ringctl(&["view-change", "--node", &a, &four.join(",")]);
    assert_eq!(change.code, 0, "{change:?}");
    assert!(change
        .stdout
        .starts_with("View change successful (4 nodes)"));
    for address in &four {
        let fields: Vec<&str> = row(&change.stdout, address).split_whitespace().collect();
        assert_eq!(fields[1], client.key_count(address).to_string());
    }
    let total: Vec<&str> = row(&change.stdout, "Total").split_whitespace().collect();
    assert_eq!(total, ["Total", "120"]);
    assert!(change.stderr.contains("answered 200"), "{change:?}");
    common::assert_contents(&client, &four, &four, &data);

    // A node of the new view is down: exit 1, and the output names it.
    let dead = common::fresh_address();
    let failed = ringctl(&[
        "view-change",
        "--node",
        &a,
        &format!("{},{dead}", four.join(",")),
    ]);
    assert_eq!(failed.code, 1, "{failed:?}");
    assert!(
        failed.stdout.starts_with("View change failed (503"),
        "{failed:?}"
    );
    let unreachable = failed
        .stdout
        .split("Unreachable:")
        .nth(1)
        .unwrap_or_default();
    assert_eq!(unreachable.trim(), dead, "{failed:?}");
    common::assert_states(&client, &four, 1, &four);

    // A node goes down: status still answers, and says so.
    cluster.nodes[2].kill();
    let status = ringctl(&["status", "--node", &a]);
    assert_eq!(status.code, 0, "{status:?}");
    let fields: Vec<&str> = row(&status.stdout, &addresses[2])
        .split_whitespace()
        .collect();
    assert_eq!(fields[1..4], ["Down", "-", "-"], "{status:?}");
    assert!(row(&status.stdout, "Total").contains(" 3/4 "));
    assert!(status.stdout.contains("Last view change coordinated by"));
}

#[test]
fn ringctl_ring_renders_what_ring_viz_renders() {
    let old = ["10.0.0.1:13800", "10.0.0.2:13800"].map(String::from);
    let new = ["10.0.0.1:13800", "10.0.0.2:13800", "10.0.0.3:13800"].map(String::from);
    let run = ringctl(&[
        "ring",
        "--view",
        &old.join(","),
        "--to",
        &new.join(","),
        "--vnodes",
        "64",
        "--keys",
        "500",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout,
        ringkv::viz::render(&old, Some(&new), 64, 500).unwrap()
    );
    assert!(run.stdout.contains("Ring movement"));
    let single = ringctl(&["ring", "--view", &old.join(","), "--vnodes", "8"]);
    assert_eq!(single.code, 0, "{single:?}");
    assert!(single
        .stdout
        .starts_with("ring: 2 nodes, 8 vnodes per node"));
    let bad = ringctl(&["ring", "--view", "10.0.0.1:1,node-b:1"]);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("node-b:1"), "{bad:?}");
}

#[test]
fn ringctl_ring_stops_quietly_when_its_reader_goes_away() {
    // 64 -> 65 nodes renders ~85 KB, more than a pipe holds: the reader closes after one
    // line (as `| head -1` does) and ringctl must neither panic nor fail.
    let view = |n: usize| ringkv::viz::generated_view(n).join(",");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringctl"))
        .args(["ring", "--view", &view(64), "--to", &view(65)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ringctl runs");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert!(first.contains(": 64 -> 65 nodes"), "{first:?}");
    drop(stdout);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

// ---------------------------------------------------------------------------------------
// Cluster token

const TOKEN: &str = "s3cret-token";

#[test]
fn a_node_with_a_token_has_no_http_surface_for_peers() {
    // Nodes talk over the RPC protocol (tests/rpc.rs checks its token handshake); over
    // HTTP, `/internal/` serves nothing but the test hooks, and those ask for the token.
    let address = common::fresh_address();
    let _node = TestNode::start(&address, &[], &["--cluster-token", TOKEN]);
    let open = Client::new();
    for path in ["state", "prepare", "commit", "stage", "outcome/1"] {
        let answer = open.get(&format!("http://{address}/internal/{path}"));
        assert_eq!(
            answer.status,
            if cfg!(feature = "fault-hooks") {
                401
            } else {
                404
            },
            "{path}: {answer:?}"
        );
    }
    let fault = open.send(
        "PUT",
        &format!("http://{address}/internal/fault"),
        Some("{}"),
    );
    assert_eq!(
        fault.status,
        if cfg!(feature = "fault-hooks") {
            401
        } else {
            404
        }
    );

    // The course endpoints, /metrics, /cluster/status and /cluster/state stay open.
    assert_eq!(open.put_key(&address, "k", &json!(1)).status, 201);
    assert_eq!(open.get_key(&address, "k").status, 200);
    assert_eq!(open.key_count(&address), 1);
    assert_eq!(cluster_status(&open, &address)["reachable"], json!(1));
    assert_eq!(open.state(&address)["address"], json!(address));
    scrape(&open, &address);
}

#[test]
fn a_cluster_sharing_a_token_forwards_and_changes_views() {
    let cluster = Cluster::start(3, &["--cluster-token", TOKEN]);
    let client = Client::new();
    let addresses = cluster.addresses();
    let data = common::sample_data("t", 60);
    common::load(&client, &addresses, &data);
    common::assert_contents(&client, &addresses, &addresses, &data);
    assert_eq!(
        cluster_status(&client, &addresses[0])["reachable"],
        json!(3)
    );

    let two = addresses[..2].to_vec();
    let answer = client.view_change(&addresses[2], &two.join(","));
    common::assert_view_change_ok(&client, &answer, &two);
    common::assert_contents(&client, &addresses, &two, &data);
    common::assert_states(&Client::with_token(TOKEN), &addresses, 1, &two);
}

#[test]
fn a_node_with_another_token_is_refused_by_its_peers() {
    let addresses = common::fresh_addresses(2);
    let _a = TestNode::start(&addresses[0], &addresses, &["--cluster-token", TOKEN]);
    let _b = TestNode::start(&addresses[1], &addresses, &["--cluster-token", "other"]);
    let client = Client::new();
    let ring = HashRing::new(&addresses, DEFAULT_VNODES).unwrap();
    let key = (0..)
        .map(|i| format!("key{i}"))
        .find(|k| **ring.owner(k.as_bytes()) == *addresses[1])
        .unwrap();
    let answer = client.put_key(&addresses[0], &key, &json!(1));
    assert_eq!(
        (answer.status, answer.body),
        (
            503,
            json!({"error": "Unable to satisfy request", "message": "Error in PUT"})
        )
    );
    let status = cluster_status(&client, &addresses[0]);
    assert_eq!(status["nodes"][1]["reachable"], json!(false), "{status}");
    // Each side proves the token to the other without sending it: a wrong one fails the
    // handshake, and the status says so.
    assert!(
        status["nodes"][1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cluster token")),
        "{status}"
    );
    let change = client.view_change(&addresses[0], &addresses[0]);
    assert_eq!(change.status, 503, "{change:?}");
    assert_eq!(change.body["unreachable"], json!([addresses[1]]));
}

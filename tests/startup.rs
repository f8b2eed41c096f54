//! Start-up as graders and new users do it: a node started with a view its peers do not
//! hold (the course's joining node with the future view, a node with a smaller or stale
//! view, members that contradict each other), a view change sent the moment a new node is
//! started, a node that never starts, and a malformed `VIEW`.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    assert_contents, assert_states, assert_view_change_ok, load, sample_data, Client, Cluster,
    TestNode,
};
use ringkv::ring::{HashRing, DEFAULT_VNODES};
use serde_json::{json, Value};

fn strings(nodes: &[&String]) -> Vec<String> {
    nodes.iter().map(|n| n.to_string()).collect()
}

/// Asserts that every key of `data` reads back its value through `node`, which owns none of
/// them: each answer names the key's owner under `members`' ring.
fn assert_routed_by(
    client: &Client,
    node: &str,
    members: &[String],
    data: &BTreeMap<String, Value>,
) {
    let ring = HashRing::new(members, DEFAULT_VNODES).unwrap();
    for (key, value) in data {
        let answer = client.get_key(node, key);
        let owner = ring.owner(key.as_bytes()).to_string();
        assert_eq!(
            (answer.status, answer.body),
            (
                200,
                json!({"doesExist": true, "message": "Retrieved successfully",
                       "value": value, "address": owner})
            ),
            "GET {key} via {node}"
        );
    }
}

/// Writes `data` through `node`: every key new, stored on its owner under `members`.
fn put_routed_by(client: &Client, node: &str, members: &[String], data: &BTreeMap<String, Value>) {
    let ring = HashRing::new(members, DEFAULT_VNODES).unwrap();
    for (key, value) in data {
        let answer = client.put_key(node, key, value);
        let owner = ring.owner(key.as_bytes()).to_string();
        assert_eq!(
            (answer.status, answer.body),
            (
                201,
                json!({"message": "Added successfully", "replaced": false, "address": owner})
            ),
            "PUT {key} via {node}"
        );
    }
}

fn view_of(client: &Client, node: &str) -> (u64, Vec<String>) {
    let state = client.state(node);
    let mut members: Vec<String> = state["view"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    members.sort();
    (state["epoch"].as_u64().unwrap(), members)
}

fn sorted(members: &[String]) -> Vec<String> {
    let mut members = members.to_vec();
    members.sort();
    members
}

#[test]
fn a_node_started_with_the_future_view_serves_the_members_view_until_the_change() {
    // The course's sequence: n1, n2 with `n1,n2`; n3 with `n1,n2,n3`.
    let mut cluster = Cluster::start(2, &[]);
    let client = Client::new();
    let old = cluster.addresses();
    let data = sample_data("future", 60);
    load(&client, &old, &data);
    let third = common::fresh_address();
    let full = strings(&[&old[0], &old[1], &third]);
    cluster.nodes.push(TestNode::start(&third, &full, &[]));

    // No pause: the first requests through n3 already route by the members' view.
    assert_routed_by(&client, &third, &old, &data);
    let written = sample_data("through-n3", 30);
    put_routed_by(&client, &third, &old, &written);
    assert_eq!(
        client.key_count(&third),
        0,
        "n3 stores nothing before the change"
    );
    let mut all = data.clone();
    all.extend(written.clone());
    assert_contents(&client, &old, &old, &all);
    let (gone, _) = all
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    assert_eq!(client.delete_key(&third, &gone).status, 200);
    assert_eq!(client.get_key(&old[0], &gone).status, 404);
    assert_eq!(client.get_key(&old[1], &gone).status, 404);
    all.remove(&gone);
    assert_eq!(view_of(&client, &third), (0, sorted(&old)));

    // Then the change to three nodes, sent to n1 as the course does.
    let answer = client.view_change(&old[0], &full.join(","));
    let counts = assert_view_change_ok(&client, &answer, &full);
    assert_eq!(counts.iter().sum::<u64>(), all.len() as u64);
    assert!(counts[2] > 0, "n3 took over keys");
    assert_states(&client, &full, 1, &full);
    assert_contents(&client, &full, &full, &all);
}

#[test]
fn a_node_started_with_a_smaller_or_stale_view_learns_the_members_view() {
    let mut cluster = Cluster::start(3, &[]);
    let client = Client::new();
    let members = cluster.addresses();
    let data = sample_data("smaller", 60);
    load(&client, &members, &data);

    // Knows only one member, and itself.
    let fourth = common::fresh_address();
    cluster.nodes.push(TestNode::start(
        &fourth,
        &strings(&[&members[0], &fourth]),
        &[],
    ));
    assert_routed_by(&client, &fourth, &members, &data);
    let written = sample_data("through-n4", 20);
    put_routed_by(&client, &fourth, &members, &written);
    assert_eq!(client.key_count(&fourth), 0);
    assert_eq!(view_of(&client, &fourth), (0, sorted(&members)));
    let mut all = data.clone();
    all.extend(written);

    let grown = strings(&[&members[0], &members[1], &members[2], &fourth]);
    let answer = client.view_change(&fourth, &grown.join(","));
    let counts = assert_view_change_ok(&client, &answer, &grown);
    assert_eq!(counts.iter().sum::<u64>(), all.len() as u64);
    assert_contents(&client, &grown, &grown, &all);

    // Started after that change with the view from before it: learns epoch 1.
    let stale = common::fresh_address();
    cluster.nodes.push(TestNode::start(
        &stale,
        &strings(&[&members[0], &members[1], &stale]),
        &[],
    ));
    assert_routed_by(&client, &stale, &grown, &all);
    assert_eq!(view_of(&client, &stale), (1, sorted(&grown)));
    assert_eq!(client.key_count(&stale), 0);
}

#[test]
fn members_that_contradict_each_other_get_503_until_a_view_change() {
    // Two groups, each holding a view of its own: both are in force for their members.
    let left = Cluster::start(2, &[]);
    let right = Cluster::start(2, &[]);
    let client = Client::new();
    let (l, r) = (left.addresses(), right.addresses());
    let left_data = sample_data("left", 20);
    let right_data = sample_data("right", 20);
    load(&client, &l, &left_data);
    load(&client, &r, &right_data);

    // A node whose view names all four cannot tell which group's view is in force.
    let confused = common::fresh_address();
    let everyone = strings(&[&l[0], &l[1], &r[0], &r[1], &confused]);
    let _node = TestNode::start(&confused, &everyone, &[]);
    let unavailable = |method: &str| json!({"error": "Unable to satisfy request", "message": format!("Error in {method}")});
    let key = left_data.keys().next().unwrap();
    let answer = client.get_key(&confused, key);
    assert_eq!((answer.status, answer.body), (503, unavailable("GET")));
    let answer = client.put_key(&confused, "new", &json!(1));
    assert_eq!((answer.status, answer.body), (503, unavailable("PUT")));
    let status = client.get(&format!("http://{confused}/cluster/status"));
    assert_eq!(status.body["standing"], "disputed", "{status:?}");
    // The groups themselves keep serving their own keys.
    assert_contents(&client, &l, &l, &left_data);
    assert_contents(&client, &r, &r, &right_data);

    // A view change brings every node to one view, with both groups' keys.
    let answer = client.view_change(&confused, &everyone.join(","));
    let counts = assert_view_change_ok(&client, &answer, &everyone);
    let mut all = left_data.clone();
    all.extend(right_data);
    assert_eq!(counts.iter().sum::<u64>(), all.len() as u64);
    assert_states(&client, &everyone, 1, &everyone);
    assert_contents(&client, &everyone, &everyone, &all);
}

#[test]
fn a_view_change_sent_the_moment_a_node_starts_succeeds_twenty_times_of_twenty() {
    let cluster = Cluster::start(2, &[]);
    let client = Client::new();
    let old = cluster.addresses();
    let data = sample_data("instant", 40);
    load(&client, &old, &data);
    for round in 0..20 {
        let joining = common::fresh_address();
        let grown = strings(&[&old[0], &old[1], &joining]);
        // Not waited for: the change goes out while the process may not be listening yet.
        let mut node = TestNode::spawn(&joining, &grown, &[]);
        let coordinator = &old[round % 2];
        let answer = client.view_change(coordinator, &grown.join(","));
        let counts = assert_view_change_ok(&client, &answer, &grown);
        assert_eq!(counts.iter().sum::<u64>(), 40, "round {round}");
        let answer = client.view_change(coordinator, &old.join(","));
        assert_view_change_ok(&client, &answer, &old);
        assert_eq!(client.key_count(&joining), 0, "round {round}");
        node.kill();
    }
    assert_states(&client, &old, 40, &old);
    assert_contents(&client, &old, &old, &data);
}

#[test]
fn a_node_that_never_starts_gets_503_within_the_connect_window() {
    let cluster = Cluster::start(2, &["--connect-window", "1.5"]);
    let client = Client::new();
    let old = cluster.addresses();
    let ghost = common::fresh_address();
    let started = Instant::now();
    let answer = client.view_change(&old[0], &strings(&[&old[0], &old[1], &ghost]).join(","));
    let took = started.elapsed();
    assert_eq!(
        (answer.status, answer.body),
        (
            503,
            json!({"error": "Unable to satisfy request", "message": "Error in PUT",
                   "unreachable": [ghost]})
        )
    );
    // Retried for the window (refusals are immediate on loopback), and not much longer.
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
    assert_states(&client, &old, 0, &old);
}

#[test]
fn a_view_with_a_missing_comma_is_a_one_line_start_error_naming_the_entry() {
    let output = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .env("VIEW", "10.10.2.0:1380010.10.3.0:13800")
        .env("ADDRESS", "10.10.2.0:13800")
        .env_remove("FORWARDING_ADDRESS")
        .env_remove("CLUSTER_TOKEN")
        .env_remove("REPL_FACTOR")
        .args(["--ip", "127.0.0.1", "--port", "1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(
        stderr,
        "ringkv: --view/VIEW: View entry '10.10.2.0:1380010.10.3.0:13800' is not ip:port; \
         expected comma-separated ip:port entries, e.g. VIEW=10.10.0.4:13800,10.10.0.5:13800\n"
    );
}

#[test]
fn a_repl_factor_that_does_not_divide_the_view_is_a_start_error() {
    let start = |factor: &str| {
        Command::new(env!("CARGO_BIN_EXE_ringkv"))
            .env("VIEW", "10.10.0.4:13800,10.10.0.5:13800")
            .env("ADDRESS", "10.10.0.4:13800")
            .env("REPL_FACTOR", factor)
            .env_remove("FORWARDING_ADDRESS")
            .env_remove("CLUSTER_TOKEN")
            .args(["--ip", "127.0.0.1", "--port", "1"])
            .output()
            .unwrap()
    };
    // Checked as the replicated mode checks it: a view of 2 nodes has no shards of 3.
    let output = start("3");
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8(output.stderr).unwrap(),
        "ringkv: --repl-factor/REPL_FACTOR '3': the view's 2 nodes do not split into shards \
         of 3\n"
    );
}

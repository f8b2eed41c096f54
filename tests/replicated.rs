//! The replicated contract (assignment 4, `--repl-factor`) on real nodes on loopback:
//! shards and their endpoints, key requests with a causal context, relaying with
//! `address`, gossip reaching every replica, a partition healed, a replica killed.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const FLAGS: &[&str] = &["--repl-factor", "2", "--fault-hooks"];

/// `method` on `key` through `node` with `body` (a JSON object or nothing).
fn send(client: &Client, method: &str, node: &str, key: &str, body: Option<Value>) -> Answer {
    let url = format!("http://{node}/kvs/keys/{key}");
    client.send(method, &url, body.map(|b| b.to_string()).as_deref())
}

fn put(client: &Client, node: &str, key: &str, value: Value, context: &Value) -> Answer {
    let body = json!({"value": value, "causal-context": context});
    send(client, "PUT", node, key, Some(body))
}

fn get(client: &Client, node: &str, key: &str, context: &Value) -> Answer {
    send(
        client,
        "GET",
        node,
        key,
        Some(json!({"causal-context": context})),
    )
}

/// The shard's replicas as `/kvs/shards/<id>` reports them.
fn replicas(client: &Client, node: &str, id: &str) -> Vec<String> {
    let answer = client.get(&format!("http://{node}/kvs/shards/{id}"));
    assert_eq!(answer.status, 200, "{answer:?}");
    serde_json::from_value(answer.body["replicas"].clone()).unwrap()
}

/// Waits until every one of `nodes` answers `key` with `want` (`None`: 404), reading with
/// no context; how long it took.
fn wait_for_value(client: &Client, nodes: &[String], key: &str, want: Option<&Value>) -> Duration {
    let started = Instant::now();
    poll_until(
        Duration::from_secs(10),
        &format!("{key} everywhere"),
        || {
            nodes
                .iter()
                .all(|n| {
                    let answer = get(client, n, key, &json!({}));
                    match want {
                        Some(value) => answer.status == 200 && answer.body["value"] == *value,
                        None => answer.status == 404,
                    }
                })
                .then_some(())
        },
    );
    started.elapsed()
}

#[test]
fn two_shards_of_two_serve_the_contract_row_by_row() {
    let cluster = Cluster::start(4, FLAGS);
    let client = Client::new();
    let nodes = cluster.addresses();
    // Shards: consecutive pairs of the view, ids "1" and "2".
    let shards = client.get(&format!("http://{}/kvs/shards", nodes[3]));
    assert_eq!(shards.status, 200);
    assert_eq!(
        shards.body,
        json!({"message": "Shard membership retrieved successfully", "shards": ["1", "2"]})
    );
    assert_eq!(replicas(&client, &nodes[0], "1"), nodes[..2].to_vec());
    assert_eq!(replicas(&client, &nodes[0], "2"), nodes[2..].to_vec());
    let unknown = client.get(&format!("http://{}/kvs/shards/3", nodes[0]));
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.body,
        json!({"error": "Shard does not exist", "message": "Error in GET"})
    );
    let count = client.get(&format!("http://{}/kvs/key-count", nodes[2]));
    assert_eq!(
        count.body,
        json!({"message": "Key count retrieved successfully", "key-count": 0, "shard-id": "2"})
    );

    // Keys through node 1: those of shard 2 are relayed, with the replica's address.
    let mut context = json!({});
    let mut relayed = 0;
    let mut local = 0;
    let mut model = BTreeMap::new();
    for i in 0..40 {
        let key = format!("k{i}");
        let answer = put(&client, &nodes[0], &key, json!(i), &context);
        assert_eq!(answer.status, 201, "{answer:?}");
        assert_eq!(answer.body["message"], json!("Added successfully"));
        assert_eq!(answer.body["replaced"], json!(false));
        assert!(answer.body["causal-context"].is_object(), "{answer:?}");
        match answer.body.get("address") {
            Some(address) => {
                assert!(nodes[2..].contains(&address.as_str().unwrap().to_string()));
                relayed += 1;
            }
            None => local += 1,
        }
        context = answer.body["causal-context"].clone();
        model.insert(key, json!(i));
    }
    assert!(relayed > 0 && local > 0, "{relayed} relayed, {local} local");
    // Every replica of each shard gets each write by gossip; the shards split the keys.
    for (key, value) in &model {
        wait_for_value(&client, &nodes, key, Some(value));
    }
    let counts: Vec<u64> = nodes.iter().map(|n| client.key_count(n)).collect();
    assert_eq!(counts[0], counts[1]);
    assert_eq!(counts[2], counts[3]);
    assert_eq!(counts[0] + counts[2], 40);
    let info = client.get(&format!("http://{}/kvs/shards/2", nodes[0]));
    assert_eq!(
        info.body,
        json!({
            "message": "Shard information retrieved successfully",
            "shard-id": "2",
            "key-count": counts[2],
            "replicas": nodes[2..],
        })
    );

    // Updates, reads and deletes carry the context; errors too.
    let answer = put(&client, &nodes[3], "k0", json!("new"), &context);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["message"], json!("Updated successfully"));
    let context = answer.body["causal-context"].clone();
    let answer = get(&client, &nodes[1], "k0", &context);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["value"], json!("new"));
    assert_eq!(answer.body["doesExist"], json!(true));
    let answer = send(
        &client,
        "DELETE",
        &nodes[2],
        "k1",
        Some(json!({"causal-context": context})),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["message"], json!("Deleted successfully"));
    let context = answer.body["causal-context"].clone();
    let answer = get(&client, &nodes[0], "k1", &context);
    assert_eq!(answer.status, 404, "{answer:?}");
    assert_eq!(answer.body["error"], json!("Key does not exist"));
    assert!(answer.body["causal-context"].is_object());
    wait_for_value(&client, &nodes, "k1", None);

    // A context that is not an object, through every node (relayed ones carry address).
    for node in &nodes {
        let answer = send(
            &client,
            "GET",
            node,
            "k2",
            Some(json!({"causal-context": [1]})),
        );
        assert_eq!(answer.status, 400, "{answer:?}");
        assert_eq!(answer.body["error"], json!("Invalid causal context"));
        assert_eq!(answer.body["message"], json!("Error in GET"));
        assert!(answer.body["causal-context"].is_object());
    }
    // The storage node validates: a relayed 400 carries address.
    let long = "x".repeat(51);
    let answers: Vec<Answer> = nodes
        .iter()
        .map(|n| send(&client, "PUT", n, &long, Some(json!({"value": 1}))))
        .collect();
    for answer in &answers {
        assert_eq!(answer.status, 400, "{answer:?}");
        assert_eq!(answer.body["error"], json!("Key is too long"));
    }
    assert_eq!(
        answers
            .iter()
            .filter(|a| a.body.get("address").is_some())
            .count(),
        2,
        "{answers:?}"
    );
    let missing = send(
        &client,
        "PUT",
        &nodes[0],
        "k3",
        Some(json!({"causal-context": {}})),
    );
    assert_eq!(missing.status, 400);
    assert_eq!(missing.body["error"], json!("Value is missing"));
    // Errors found before the body is read carry a (fresh) causal context too.
    let invalid = client.get(&format!("http://{}/kvs/keys/%FF", nodes[0]));
    assert_eq!(
        (invalid.status, invalid.body),
        (
            400,
            json!({"error": "Invalid key", "message": "Error in GET",
                   "causal-context": {"epoch": 0, "shards": {}}})
        )
    );
    // The view change's own 400s: the repl-factor missing, not a positive integer, or not
    // dividing the view.
    let change_url = format!("http://{}/kvs/view-change", nodes[0]);
    for (body, error) in [
        (json!({"view": nodes.join(",")}), "repl-factor is missing"),
        (
            json!({"view": nodes.join(","), "repl-factor": 0}),
            "repl-factor must be a positive integer",
        ),
        (
            json!({"view": nodes.join(","), "repl-factor": "2"}),
            "repl-factor must be a positive integer",
        ),
        (
            json!({"view": nodes.join(","), "repl-factor": 3}),
            "the view's 4 nodes do not split into shards of 3",
        ),
    ] {
        let refused = client.put(&change_url, &body);
        assert_eq!(
            (refused.status, refused.body),
            (400, json!({"error": error, "message": "Error in PUT"})),
            "{body}"
        );
    }
    // A change to the view and factor in force is a no-op that lists the shards.
    let counts: Vec<u64> = nodes.iter().map(|n| client.key_count(n)).collect();
    let change = client.put(
        &change_url,
        &json!({"view": nodes.join(","), "repl-factor": 2}),
    );
    assert_eq!(
        (change.status, change.body),
        (
            200,
            json!({"message": "View change successful", "shards": [
                {"shard-id": "1", "key-count": counts[0], "replicas": nodes[..2]},
                {"shard-id": "2", "key-count": counts[2], "replicas": nodes[2..]},
            ]})
        )
    );
}

#[test]
fn a_partitioned_replica_serves_its_side_and_converges_within_5s_of_the_heal() {
    let cluster = Cluster::start(2, FLAGS);
    let client = Client::new();
    let nodes = cluster.addresses();
    let (a, b) = (&nodes[0], &nodes[1]);
    let before = put(&client, a, "shared", json!("before"), &json!({}));
    assert_eq!(before.status, 201);
    wait_for_value(&client, &nodes, "shared", Some(&json!("before")));
    client.set_fault(b, &json!({"isolated": true}));
    // Both sides serve: each is a replica of the key's shard.
    let mut model = BTreeMap::new();
    for i in 0..10 {
        for (side, node) in [("a", a), ("b", b)] {
            let key = format!("{side}{i}");
            let answer = put(&client, node, &key, json!(i), &json!({}));
            assert_eq!(answer.status, 201, "{answer:?}");
            model.insert(key, Some(json!(i)));
        }
    }
    // Concurrent writes to one key on both sides, and a delete on one side.
    assert_eq!(
        put(&client, a, "shared", json!("from a"), &json!({})).status,
        200
    );
    assert_eq!(
        put(&client, b, "shared", json!("from b"), &json!({})).status,
        200
    );
    let deleted = send(&client, "DELETE", b, "a0", None);
    assert_eq!(deleted.status, 404, "b has not seen a0: {deleted:?}");
    assert_eq!(send(&client, "DELETE", a, "b0", None).status, 404);
    assert_eq!(send(&client, "DELETE", a, "a1", None).status, 200);
    model.insert("a1".into(), None);
    // a's status: b, cut off, lags by at least the 12 writes a accepted since.
    let lag = |status: &Value, node: &str| {
        let nodes = status["nodes"].as_array().unwrap();
        let entry = nodes.iter().find(|n| n["address"] == *node).unwrap();
        assert_eq!(entry["shard"], json!("1"), "{entry}");
        entry["lag"].as_u64()
    };
    let status = client.get(&format!("http://{a}/cluster/status")).body;
    assert!(lag(&status, b).is_some_and(|l| l >= 12), "{status}");
    // Healed: every acknowledged write on both replicas, the same winner of "shared".
    client.set_fault(b, &json!({}));
    let healed = Instant::now();
    for (key, value) in &model {
        wait_for_value(&client, &nodes, key, value.as_ref());
    }
    let winner = poll_until(Duration::from_secs(10), "one value of shared", || {
        let values: Vec<Value> = nodes
            .iter()
            .map(|n| get(&client, n, "shared", &json!({})).body["value"].clone())
            .collect();
        (values[0] == values[1]).then(|| values[0].clone())
    });
    let took = healed.elapsed();
    assert!(
        winner == json!("from a") || winner == json!("from b"),
        "{winner}"
    );
    assert!(took < Duration::from_secs(5), "converged in {took:?}");
    eprintln!("converged {took:?} after the heal; 'shared' is {winner}");
    // And neither lags once each pulled from the other again.
    poll_until(Duration::from_secs(5), "no lag", || {
        let status = client.get(&format!("http://{a}/cluster/status")).body;
        (lag(&status, a) == Some(0) && lag(&status, b) == Some(0)).then_some(())
    });
}

#[test]
fn a_replica_behind_a_context_answers_the_written_value_or_400_never_an_older_one() {
    let cluster = Cluster::start(2, FLAGS);
    let client = Client::new();
    let nodes = cluster.addresses();
    let (a, b) = (&nodes[0], &nodes[1]);
    assert_eq!(put(&client, a, "x", json!("old"), &json!({})).status, 201);
    wait_for_value(&client, &nodes, "x", Some(&json!("old")));
    client.set_fault(b, &json!({"isolated": true}));
    // Client 1 writes on a; client 2 read it there, then asks b with that context.
    let written = put(&client, a, "x", json!("new"), &json!({}));
    assert_eq!(written.status, 200);
    let read = get(&client, a, "x", &written.body["causal-context"]);
    assert_eq!(read.body["value"], json!("new"));
    let behind = get(&client, b, "x", &read.body["causal-context"]);
    assert_eq!(behind.status, 400, "never the older value: {behind:?}");
    assert_eq!(
        (&behind.body["error"], &behind.body["message"]),
        (&json!("Unable to satisfy request"), &json!("Error in GET"))
    );
    assert!(behind.body["causal-context"].is_object());
    // A write on b under that context is refused too (it would depend on what b lacks).
    let blind = put(&client, b, "y", json!(1), &read.body["causal-context"]);
    assert_eq!(blind.status, 400, "{blind:?}");
    // Healed: the same request pulls what it lacks and answers the written value.
    client.set_fault(b, &json!({}));
    let answer = get(&client, b, "x", &read.body["causal-context"]);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["value"], json!("new"));
}

/// A write is acknowledged once the shard-mate holds it (pushed, not left to the next
/// gossip round): a replica killed the moment it acknowledged its last writes has lost
/// none of them. With asynchronous gossip alone (every 200 ms) the last writes before the
/// kill would be missing on the mate.
#[test]
fn a_replica_killed_right_after_acknowledging_loses_none_of_its_writes() {
    let mut cluster = Cluster::start(2, FLAGS);
    let client = Client::new();
    let nodes = cluster.addresses();
    let data = sample_data("pushed", 40);
    let mut context = json!({});
    for (key, value) in &data {
        let answer = put(&client, &nodes[0], key, value.clone(), &context);
        assert_eq!(answer.status, 201, "{answer:?}");
        context = answer.body["causal-context"].clone();
    }
    cluster.nodes[0].kill();
    for (key, value) in &data {
        let answer = get(&client, &nodes[1], key, &json!({}));
        assert_eq!(
            (answer.status, &answer.body["value"]),
            (200, value),
            "{key} on the surviving replica: {answer:?}"
        );
    }
}

#[test]
fn a_killed_replica_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(4, FLAGS);
    let client = Client::with_timeout(Duration::from_secs(20));
    let nodes = cluster.addresses();
    let data = sample_data("kept", 60);
    let mut context = json!({});
    for (key, value) in &data {
        let answer = put(&client, &nodes[0], key, value.clone(), &context);
        assert_eq!(answer.status, 201, "{answer:?}");
        context = answer.body["causal-context"].clone();
    }
    for (key, value) in &data {
        wait_for_value(&client, &nodes, key, Some(value));
    }
    // One replica of each shard dies: every key still reads and writes through the rest.
    cluster.nodes[1].kill();
    cluster.nodes[3].kill();
    let alive = vec![nodes[0].clone(), nodes[2].clone()];
    for (key, value) in &data {
        for node in &alive {
            let answer = get(&client, node, key, &json!({}));
            assert_eq!(answer.status, 200, "{key} through {node}: {answer:?}");
            assert_eq!(answer.body["value"], *value);
        }
        let answer = put(&client, &nodes[2], key, json!("after"), &json!({}));
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    for key in data.keys() {
        wait_for_value(&client, &alive, key, Some(&json!("after")));
    }
}

#[test]
fn a_replica_restarted_empty_is_refilled_and_then_its_mate_may_die() {
    let mut cluster = Cluster::start(2, FLAGS);
    let client = Client::with_timeout(Duration::from_secs(20));
    let nodes = cluster.addresses();
    let data = sample_data("refill", 200);
    for (key, value) in &data {
        let answer = put(&client, &nodes[0], key, value.clone(), &json!({}));
        assert_eq!(answer.status, 201, "{answer:?}");
    }
    for (key, value) in &data {
        wait_for_value(&client, &nodes, key, Some(value));
    }
    // The second replica restarts empty (a new incarnation) and is refilled by its mate.
    cluster.nodes[1].kill();
    cluster.nodes[1] = TestNode::start(&nodes[1], &nodes, FLAGS);
    let started = Instant::now();
    poll_until(
        Duration::from_secs(10),
        "the restarted replica refilled",
        || (client.key_count(&nodes[1]) == data.len() as u64).then_some(()),
    );
    eprintln!(
        "refilled in {:?} (by digests: {})",
        started.elapsed(),
        cluster.nodes[1].log_contains("refilled")
    );
    // Then its mate dies: every acknowledged write is still there.
    cluster.nodes[0].kill();
    for (key, value) in &data {
        let answer = get(&client, &nodes[1], key, &json!({}));
        assert_eq!(answer.status, 200, "{key}: {answer:?}");
        assert_eq!(answer.body["value"], *value);
    }
}

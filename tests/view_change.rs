//! View changes on real nodes: the course scenario, shapes, failures, and no lost writes.

mod common;

use common::{Client, Cluster, TestNode};
use serde_json::json;

#[test]
fn course_scenario_two_to_three_nodes() {
    let mut cluster = Cluster::start(2, &[]);
    let client = Client::new();
    let addresses = cluster.addresses();
    for i in 0..100 {
        let answer = client.put_key(&addresses[i % 2], &format!("key{i}"), &json!(i));
        assert_eq!(answer.status, 201, "{answer:?}");
    }
    let third = common::fresh_address();
    let mut full = addresses.clone();
    full.push(third.clone());
    cluster.nodes.push(TestNode::start(&third, &full, &[]));

    let answer = client.view_change(&addresses[0], &full.join(","));
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["message"], "View change successful");
    let shards = answer.body["shards"].as_array().unwrap();
    let listed: Vec<&str> = shards
        .iter()
        .map(|s| s["address"].as_str().unwrap())
        .collect();
    assert_eq!(listed, full.iter().map(String::as_str).collect::<Vec<_>>());
    let total: u64 = shards
        .iter()
        .map(|s| s["key-count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 100);
    for (shard, node) in shards.iter().zip(&full) {
        assert_eq!(shard["key-count"].as_u64().unwrap(), client.key_count(node));
        assert!(
            client.key_count(node) > 0,
            "every node owns some of 100 keys"
        );
    }

    for i in 0..100 {
        let key = format!("key{i}");
        let mut owners = Vec::new();
        for node in &full {
            let answer = client.get_key(node, &key);
            assert_eq!(answer.status, 200, "{key} via {node}: {answer:?}");
            assert_eq!(answer.body["value"], json!(i));
            owners.push(
                answer
                    .body
                    .get("address")
                    .and_then(|a| a.as_str())
                    .map(String::from),
            );
        }
        let served_locally: Vec<&String> = full
            .iter()
            .zip(&owners)
            .filter(|(_, a)| a.is_none())
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            served_locally.len(),
            1,
            "{key}: exactly its owner serves it without address"
        );
        for owner in owners.iter().flatten() {
            assert_eq!(owner, served_locally[0]);
        }
    }
    for i in 0..100 {
        let answer = client.delete_key(&full[i % 3], &format!("key{i}"));
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    for node in &full {
        assert_eq!(client.key_count(node), 0);
    }
}

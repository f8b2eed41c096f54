//! Replicated view changes (assignment 4's `PUT /kvs/view-change` with `repl-factor`) on
//! real nodes: growing from one node, adding a shard, replacing every node, changing the
//! replication factor, the share of keys a new shard takes, a dead replica left out, and
//! the 503 when a removed shard has no live replica; after each change the answer, the
//! shard endpoints, every key through every node, and writes are checked.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Keys loaded before each change.
const KEYS: usize = 300;

/// The shards of a view in id order: each id with its replicas.
type Layout = Vec<(String, Vec<String>)>;

/// The data loaded into a cluster, and the causal context of the last reply of the load.
struct Loaded {
    data: BTreeMap<String, Value>,
    context: Value,
}

/// A view change: the nodes of the view before it, the new view and its factor, and the
/// removed nodes that are dead and must be reported as `left-out`.
struct Change<'a> {
    old: &'a [String],
    view: &'a [String],
    factor: usize,
    left_out: &'a [String],
}

// ---------------------------------------------------------------------------------------
// Requests.

/// `method` on `key` through `node`, with a JSON body.
fn key_request(client: &Client, method: &str, node: &str, key: &str, body: &Value) -> Answer {
    let url = format!("http://{node}/kvs/keys/{key}");
    client.send(method, &url, Some(&body.to_string()))
}

fn put(client: &Client, node: &str, key: &str, value: &Value, context: &Value) -> Answer {
    let body = json!({"value": value, "causal-context": context});
    key_request(client, "PUT", node, key, &body)
}

fn get(client: &Client, node: &str, key: &str, context: &Value) -> Answer {
    key_request(
        client,
        "GET",
        node,
        key,
        &json!({"causal-context": context}),
    )
}

/// `PUT /kvs/view-change` of `change` to `node`.
fn view_change(client: &Client, node: &str, change: &Change) -> Answer {
    client.put(
        &format!("http://{node}/kvs/view-change"),
        &json!({"view": change.view.join(","), "repl-factor": change.factor}),
    )
}

/// `GET /kvs/key-count` of `node`: its count and its shard id.
fn count_of(client: &Client, node: &str) -> (u64, String) {
    let answer = client.get(&format!("http://{node}/kvs/key-count"));
    assert_eq!(answer.status, 200, "key-count of {node}: {answer:?}");
    let count = answer.body["key-count"].as_u64();
    let id = answer.body["shard-id"].as_str();
    match (count, id) {
        (Some(count), Some(id)) => (count, id.to_string()),
        _ => panic!("key-count of {node}: {answer:?}"),
    }
}

/// The layout `node` serves: the ids of `/kvs/shards`, each with the replicas of
/// `/kvs/shards/<id>`.
fn served_layout(client: &Client, node: &str) -> Layout {
    let answer = client.get(&format!("http://{node}/kvs/shards"));
    assert_eq!(answer.status, 200, "shards of {node}: {answer:?}");
    let ids: Vec<String> = serde_json::from_value(answer.body["shards"].clone())
        .unwrap_or_else(|e| panic!("shards of {node}: {e}: {answer:?}"));
    ids.into_iter()
        .map(|id| {
            let info = client.get(&format!("http://{node}/kvs/shards/{id}"));
            assert_eq!(info.status, 200, "shard {id} via {node}: {info:?}");
            let replicas = serde_json::from_value(info.body["replicas"].clone())
                .unwrap_or_else(|e| panic!("shard {id} via {node}: {e}: {info:?}"));
            (id, replicas)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Layouts.

/// A layout written out: `[("1", &[&a, &b]), ...]`.
fn layout(spec: &[(&str, &[&String])]) -> Layout {
    spec.iter()
        .map(|(id, replicas)| {
            let replicas = replicas.iter().map(|r| r.to_string()).collect();
            (id.to_string(), replicas)
        })
        .collect()
}

/// The layout of a start view: consecutive groups of `factor` in view order, ids 1, 2, ...
fn initial(view: &[String], factor: usize) -> Layout {
    view.chunks(factor)
        .enumerate()
        .map(|(i, replicas)| ((i + 1).to_string(), replicas.to_vec()))
        .collect()
}

/// The shard `node` is a replica of.
fn shard_of<'a>(layout: &'a Layout, node: &str) -> Option<&'a (String, Vec<String>)> {
    layout
        .iter()
        .find(|(_, replicas)| replicas.iter().any(|r| r == node))
}

fn ids(layout: &Layout) -> Vec<&str> {
    layout.iter().map(|(id, _)| id.as_str()).collect()
}

/// The layout a view-change answer lists.
fn answered_layout(answer: &Answer) -> Layout {
    let shards = answer.body["shards"]
        .as_array()
        .unwrap_or_else(|| panic!("no shards in {answer:?}"));
    shards
        .iter()
        .map(|shard| {
            let id = shard["shard-id"]
                .as_str()
                .unwrap_or_else(|| panic!("a shard without shard-id in {answer:?}"));
            let replicas = serde_json::from_value(shard["replicas"].clone())
                .unwrap_or_else(|e| panic!("replicas of shard {id}: {e}: {answer:?}"));
            (id.to_string(), replicas)
        })
        .collect()
}

/// Asserts that `layout` splits `view` into shards of exactly `factor`, each node in
/// exactly one, with distinct ids in increasing (numeric) order.
fn assert_valid_layout(layout: &Layout, view: &[String], factor: usize) {
    assert_eq!(layout.len(), view.len() / factor, "shard count: {layout:?}");
    for (id, replicas) in layout {
        assert_eq!(replicas.len(), factor, "shard {id}: {layout:?}");
    }
    let numbers: Vec<u64> = layout
        .iter()
        .map(|(id, _)| id.parse().unwrap_or_else(|_| panic!("shard id {id:?}")))
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "shards not in id order: {layout:?}"
    );
    let placed: Vec<&String> = layout.iter().flat_map(|(_, r)| r).collect();
    let unique: BTreeSet<&String> = placed.iter().copied().collect();
    assert_eq!(placed.len(), unique.len(), "a node twice: {layout:?}");
    assert_eq!(
        unique,
        view.iter().collect::<BTreeSet<_>>(),
        "the shards' nodes are not the view's: {layout:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Data.

/// Writes every entry of `data` through the nodes of `through` in turn, each with the
/// causal context of the previous reply; each must be new.
fn load(client: &Client, through: &[String], data: BTreeMap<String, Value>) -> Loaded {
    let mut context = json!({});
    for (i, (key, value)) in data.iter().enumerate() {
        let node = &through[i % through.len()];
        let answer = put(client, node, key, value, &context);
        assert_eq!(answer.status, 201, "PUT {key} via {node}: {answer:?}");
        context = answer.body["causal-context"].clone();
        assert!(context.is_object(), "PUT {key} via {node}: {answer:?}");
    }
    Loaded { data, context }
}

/// Waits until every replica of each shard of `layout` reports the same key-count and the
/// shards' counts add up to `total`; the counts, in shard order.
fn wait_replicated(client: &Client, layout: &Layout, total: usize) -> Vec<u64> {
    poll_until(
        Duration::from_secs(20),
        &format!("{total} keys on every replica of {layout:?}"),
        || {
            let counts: Vec<Vec<u64>> = layout
                .iter()
                .map(|(_, replicas)| replicas.iter().map(|r| client.key_count(r)).collect())
                .collect();
            let agreed = counts.iter().all(|c| c.iter().all(|n| *n == c[0]));
            let firsts: Vec<u64> = counts.iter().map(|c| c[0]).collect();
            (agreed && firsts.iter().sum::<u64>() == total as u64).then_some(firsts)
        },
    )
}

/// Starts a cluster of `nodes` nodes with `factor` replicas per shard, checks the start
/// layout, loads [`KEYS`] keys through every node and waits until every replica has them.
fn loaded_cluster(nodes: usize, factor: usize, prefix: &str) -> (Cluster, Layout, Loaded) {
    let factor_flag = factor.to_string();
    let cluster = Cluster::start(nodes, &["--repl-factor", &factor_flag]);
    let client = Client::new();
    let view = cluster.addresses();
    let layout = initial(&view, factor);
    for node in &view {
        assert_eq!(
            served_layout(&client, node),
            layout,
            "start layout of {node}"
        );
    }
    let loaded = load(&client, &view, sample_data(prefix, KEYS));
    wait_replicated(&client, &layout, KEYS);
    (cluster, layout, loaded)
}

/// Starts every node of `view` the cluster does not run yet, with the view it will join
/// and the cluster's flags (`--repl-factor factor`), as the course's graders do.
fn start_joining(cluster: &mut Cluster, view: &[String], factor: usize) {
    let factor_flag = factor.to_string();
    let running = cluster.addresses();
    for address in view.iter().filter(|a| !running.contains(a)) {
        let node = TestNode::start(address, view, &["--repl-factor", &factor_flag]);
        cluster.nodes.push(node);
    }
}

/// Asserts that every key of `data` reads back its value through every node of
/// `through` (with no context): served without `address` by exactly the replicas of one
/// shard of `layout` among `through`, and relayed by the others naming a replica of that
/// shard. Returns each key's shard id.
fn key_shards(
    client: &Client,
    through: &[String],
    layout: &Layout,
    data: &BTreeMap<String, Value>,
) -> BTreeMap<String, String> {
    let mut shards = BTreeMap::new();
    for (key, value) in data {
        let mut local = BTreeSet::new();
        let mut named = BTreeSet::new();
        for node in through {
            let answer = get(client, node, key, &json!({}));
            let body = &answer.body;
            assert_eq!(
                (
                    answer.status,
                    &body["value"],
                    &body["doesExist"],
                    &body["message"]
                ),
                (200, value, &json!(true), &json!("Retrieved successfully")),
                "GET {key} via {node}: {answer:?}"
            );
            match body.get("address") {
                None => local.insert(node.clone()),
                Some(address) => named.insert(
                    address
                        .as_str()
                        .unwrap_or_else(|| panic!("GET {key} via {node}: {answer:?}"))
                        .to_string(),
                ),
            };
        }
        let server = local
            .iter()
            .chain(&named)
            .next()
            .expect("some node answered");
        let (id, replicas) = shard_of(layout, server)
            .unwrap_or_else(|| panic!("{key} served by {server}, in no shard of {layout:?}"));
        let expected: BTreeSet<String> = replicas
            .iter()
            .filter(|r| through.contains(r))
            .cloned()
            .collect();
        assert_eq!(
            local, expected,
            "{key}: served locally by {local:?}, but its shard {id} is {replicas:?}"
        );
        assert!(
            named.iter().all(|n| replicas.contains(n)),
            "{key} (shard {id}, {replicas:?}): relayed from {named:?}"
        );
        shards.insert(key.clone(), id.clone());
    }
    shards
}

// ---------------------------------------------------------------------------------------
// The checks after a change.

/// Asserts the view-change answer exactly: the message, one entry per shard of `layout`
/// whose key-count is what each of its replicas reports now (all equal, each naming that
/// shard), and `left-out` when nodes were. Returns the counts, in shard order.
fn assert_change_answer(
    client: &Client,
    answer: &Answer,
    layout: &Layout,
    left_out: &[String],
) -> Vec<u64> {
    let mut counts = Vec::new();
    let shards: Vec<Value> = layout
        .iter()
        .map(|(id, replicas)| {
            let reported: Vec<(u64, String)> =
                replicas.iter().map(|r| count_of(client, r)).collect();
            for (replica, (count, shard)) in replicas.iter().zip(&reported) {
                assert_eq!(shard, id, "shard-id of {replica}");
                assert_eq!(
                    *count, reported[0].0,
                    "replicas of shard {id} disagree: {reported:?}"
                );
            }
            counts.push(reported[0].0);
            json!({"shard-id": id, "key-count": reported[0].0, "replicas": replicas})
        })
        .collect();
    let mut expected = json!({"message": "View change successful", "shards": shards});
    if !left_out.is_empty() {
        expected["left-out"] = json!(left_out);
    }
    assert_eq!(
        answer.body, expected,
        "the view change answer vs the replicas' key-counts"
    );
    counts
}

/// Asserts that every node of `view` serves `layout`: `/kvs/shards`, `/kvs/shards/<id>`
/// (with `counts`) and its own `/kvs/key-count`.
fn assert_serving(client: &Client, view: &[String], layout: &Layout, counts: &[u64]) {
    for node in view {
        let answer = client.get(&format!("http://{node}/kvs/shards"));
        assert_eq!(
            (answer.status, &answer.body),
            (
                200,
                &json!({
                    "message": "Shard membership retrieved successfully",
                    "shards": ids(layout),
                })
            ),
            "GET /kvs/shards via {node}"
        );
        for ((id, replicas), count) in layout.iter().zip(counts) {
            let answer = client.get(&format!("http://{node}/kvs/shards/{id}"));
            assert_eq!(
                (answer.status, &answer.body),
                (
                    200,
                    &json!({
                        "message": "Shard information retrieved successfully",
                        "shard-id": id,
                        "key-count": count,
                        "replicas": replicas,
                    })
                ),
                "GET /kvs/shards/{id} via {node}"
            );
        }
        let position = layout
            .iter()
            .position(|(_, replicas)| replicas.contains(node))
            .unwrap_or_else(|| panic!("{node} in no shard of {layout:?}"));
        let answer = client.get(&format!("http://{node}/kvs/key-count"));
        assert_eq!(
            (answer.status, &answer.body),
            (
                200,
                &json!({
                    "message": "Key count retrieved successfully",
                    "key-count": counts[position],
                    "shard-id": layout[position].0,
                })
            ),
            "GET /kvs/key-count via {node}"
        );
    }
}

/// A write after the change: a new key through the view's last node, read back through
/// every node of the view with the write's context, then on every replica of its shard.
fn assert_writes_work(client: &Client, view: &[String], layout: &Layout, total: usize) {
    let key = "written-after-the-change";
    let value = json!({"after": "the change"});
    let node = view.last().unwrap();
    let answer = put(client, node, key, &value, &json!({}));
    assert_eq!(
        (answer.status, &answer.body["message"]),
        (201, &json!("Added successfully")),
        "PUT {key} via {node}: {answer:?}"
    );
    let context = answer.body["causal-context"].clone();
    for node in view {
        let answer = get(client, node, key, &context);
        assert_eq!(
            (answer.status, &answer.body["value"]),
            (200, &value),
            "GET {key} via {node} with the write's context: {answer:?}"
        );
    }
    wait_replicated(client, layout, total + 1);
}

/// Sends `change` to `receiver` and checks everything a successful one promises: the
/// answer (and `expected`, the layout the regrouping rule gives, when known), the shard
/// endpoints on every node of the new view, the removed nodes in no shard, every key
/// through every node, a read with the context from before the change, and a write after
/// it. Returns the new layout and each key's shard.
fn change_and_check(
    client: &Client,
    receiver: &str,
    change: &Change,
    expected: Option<&Layout>,
    loaded: &Loaded,
) -> (Layout, BTreeMap<String, String>) {
    let answer = view_change(client, receiver, change);
    assert_eq!(
        answer.status, 200,
        "view change to {:?} x{} via {receiver}: {answer:?}",
        change.view, change.factor
    );
    let layout = answered_layout(&answer);
    assert_valid_layout(&layout, change.view, change.factor);
    if let Some(expected) = expected {
        assert_eq!(&layout, expected, "the new layout");
    }
    for removed in change.old.iter().filter(|n| !change.view.contains(n)) {
        assert!(
            shard_of(&layout, removed).is_none(),
            "removed {removed} still in {layout:?}"
        );
    }
    let counts = assert_change_answer(client, &answer, &layout, change.left_out);
    assert_eq!(
        counts.iter().sum::<u64>(),
        loaded.data.len() as u64,
        "{counts:?}"
    );
    assert_serving(client, change.view, &layout, &counts);
    let shards = key_shards(client, change.view, &layout, &loaded.data);
    // A context from before the change never makes a request fail.
    let (key, value) = loaded.data.iter().next().unwrap();
    for node in change.view {
        let answer = get(client, node, key, &loaded.context);
        assert_eq!(
            (answer.status, &answer.body["value"]),
            (200, value),
            "GET {key} via {node} with the context from before the change: {answer:?}"
        );
    }
    assert_writes_work(client, change.view, &layout, loaded.data.len());
    (layout, shards)
}

// ---------------------------------------------------------------------------------------
// The cases.

#[test]
fn one_node_alone_grows_to_two_shards_of_two() {
    let (mut cluster, _, loaded) = loaded_cluster(1, 1, "solo");
    let client = Client::new();
    let old = cluster.addresses();
    let view = [old.clone(), fresh_addresses(3)].concat();
    start_joining(&mut cluster, &view, 1);
    let change = Change {
        old: &old,
        view: &view,
        factor: 2,
        left_out: &[],
    };
    // The node stays in shard 1 and the first joining node fills it; the others form 2.
    let expected = layout(&[("1", &[&view[0], &view[1]]), ("2", &[&view[2], &view[3]])]);
    change_and_check(&client, &old[0], &change, Some(&expected), &loaded);
}

#[test]
fn a_shard_of_two_gains_a_second_shard() {
    let (mut cluster, before, loaded) = loaded_cluster(2, 2, "grow");
    let client = Client::new();
    let old = cluster.addresses();
    let view = [old.clone(), fresh_addresses(2)].concat();
    start_joining(&mut cluster, &view, 2);
    let change = Change {
        old: &old,
        view: &view,
        factor: 2,
        left_out: &[],
    };
    let expected = layout(&[("1", &[&old[0], &old[1]]), ("2", &[&view[2], &view[3]])]);
    assert_eq!(before[0], expected[0]);
    let (_, shards) = change_and_check(&client, &old[1], &change, Some(&expected), &loaded);
    assert!(
        shards.values().any(|id| id == "2"),
        "the new shard took over keys"
    );
}

#[test]
fn two_other_nodes_take_over_every_key_of_a_shard_of_two() {
    let (mut cluster, _, loaded) = loaded_cluster(2, 2, "evict");
    let client = Client::new();
    let old = cluster.addresses();
    let view = fresh_addresses(2);
    start_joining(&mut cluster, &view, 2);
    let change = Change {
        old: &old,
        view: &view,
        factor: 2,
        left_out: &[],
    };
    // The only shard keeps the id "1" (the rule keeps as many ids as there are shards).
    let expected = layout(&[("1", &[&view[0], &view[1]])]);
    change_and_check(&client, &old[0], &change, Some(&expected), &loaded);
}

#[test]
fn four_nodes_regroup_from_two_replicas_to_one() {
    let (cluster, before_layout, loaded) = loaded_cluster(4, 2, "factor");
    let client = Client::new();
    let view = cluster.addresses();
    let before = key_shards(&client, &view, &before_layout, &loaded.data);
    let change = Change {
        old: &view,
        view: &view,
        factor: 1,
        left_out: &[],
    };
    let (layout, after) = change_and_check(&client, &view[3], &change, None, &loaded);
    // Four shards of one; the old ids are kept by one of their nodes each.
    assert_eq!(ids(&layout), ["1", "2", "3", "4"], "{layout:?}");
    assert!(view[..2].contains(&layout[0].1[0]), "{layout:?}");
    assert!(view[2..].contains(&layout[1].1[0]), "{layout:?}");
    // Keys move only from an old shard to a new one, never between the old two.
    for (key, old_id) in &before {
        let new_id = &after[key];
        assert!(
            new_id == old_id || new_id == "3" || new_id == "4",
            "{key} moved from shard {old_id} to {new_id}"
        );
    }
}

#[test]
fn growing_two_shards_of_two_to_three_moves_a_third_of_the_keys() {
    let (mut cluster, before_layout, loaded) = loaded_cluster(4, 2, "third");
    let client = Client::new();
    let old = cluster.addresses();
    let before = key_shards(&client, &old, &before_layout, &loaded.data);
    let view = [old.clone(), fresh_addresses(2)].concat();
    start_joining(&mut cluster, &view, 2);
    let change = Change {
        old: &old,
        view: &view,
        factor: 2,
        left_out: &[],
    };
    let expected = layout(&[
        ("1", &[&old[0], &old[1]]),
        ("2", &[&old[2], &old[3]]),
        ("3", &[&view[4], &view[5]]),
    ]);
    let (_, after) = change_and_check(&client, &old[2], &change, Some(&expected), &loaded);
    let mut moved = 0;
    for (key, old_id) in &before {
        let new_id = &after[key];
        if new_id != old_id {
            assert_eq!(new_id, "3", "{key} moved from shard {old_id} to {new_id}");
            moved += 1;
        }
    }
    let fraction = moved as f64 / before.len() as f64;
    println!("moved {moved} of {} keys: {fraction:.3}", before.len());
    assert!(
        (fraction - 1.0 / 3.0).abs() <= 0.1,
        "moved {moved} of {} keys ({fraction:.3})",
        before.len()
    );
}

#[test]
fn a_dead_replica_is_left_out_when_its_mate_holds_its_shard() {
    let (mut cluster, _, loaded) = loaded_cluster(4, 2, "leftout");
    let client = Client::new();
    let old = cluster.addresses();
    let (a, b, c, d) = (&old[0], &old[1], &old[2], &old[3]);
    cluster.nodes[1].kill();
    let e = fresh_address();
    let view = vec![a.clone(), c.clone(), d.clone(), e.clone()];
    start_joining(&mut cluster, &view, 2);
    let left_out = [b.clone()];
    let change = Change {
        old: &old,
        view: &view,
        factor: 2,
        left_out: &left_out,
    };
    // Shard 2 keeps both its nodes; shard 1 keeps a, and e takes b's place.
    let expected = layout(&[("1", &[a, &e]), ("2", &[c, d])]);
    change_and_check(&client, d, &change, Some(&expected), &loaded);
}

#[test]
fn removing_a_shard_whose_replicas_are_all_dead_fails_with_503() {
    let (mut cluster, layout, loaded) = loaded_cluster(4, 2, "lost");
    let client = Client::new();
    let old = cluster.addresses();
    let shards = key_shards(&client, &old, &layout, &loaded.data);
    let counts = wait_replicated(&client, &layout, KEYS);
    cluster.nodes[0].kill();
    cluster.nodes[1].kill();
    let (c, d) = (&old[2], &old[3]);
    let view = vec![c.clone(), d.clone()];
    let change = Change {
        old: &old,
        view: &view,
        factor: 2,
        left_out: &[],
    };
    let answer = view_change(&client, c, &change);
    assert_eq!(answer.status, 503, "{answer:?}");
    let mut unreachable: Vec<String> = serde_json::from_value(answer.body["unreachable"].clone())
        .unwrap_or_else(|e| panic!("unreachable: {e}: {answer:?}"));
    unreachable.sort_unstable();
    let mut dead = old[..2].to_vec();
    dead.sort_unstable();
    let mut body = answer.body.clone();
    body.as_object_mut().unwrap().remove("unreachable");
    assert_eq!(
        (body, unreachable),
        (
            json!({"error": "Unable to satisfy request", "message": "Error in PUT"}),
            dead
        ),
        "{answer:?}"
    );
    // The old view stays in force, shard 2 keeps every key it had.
    for node in &view {
        let answer = client.get(&format!("http://{node}/kvs/shards"));
        assert_eq!(answer.body["shards"], json!(["1", "2"]), "via {node}");
        assert_eq!(count_of(&client, node), (counts[1], "2".to_string()));
        for (key, value) in &loaded.data {
            if shards[key] == "2" {
                let answer = get(&client, node, key, &json!({}));
                assert_eq!(
                    (answer.status, &answer.body["value"]),
                    (200, value),
                    "GET {key} via {node}: {answer:?}"
                );
            }
        }
    }
}

/// A node outside the view (started with a `VIEW` that does not list it) forwards every
/// key by the layout it holds; right after a change its next request finds the old replicas
/// no longer hold the key, learns the new layout from them and routes by it: every key reads
/// through it at once, none answers 503.
#[test]
fn a_node_outside_the_view_routes_by_the_new_layout_right_after_a_change() {
    let (mut cluster, _, loaded) = loaded_cluster(4, 2, "outside");
    let client = Client::new();
    let old = cluster.addresses();
    let outsider_address = fresh_address();
    let outsider = TestNode::start(&outsider_address, &old, &["--repl-factor", "2"]);
    let view = [old.clone(), fresh_addresses(2)].concat();
    start_joining(&mut cluster, &view, 2);
    let change = Change {
        old: &old,
        view: &view,
        factor: 2,
        left_out: &[],
    };
    assert_eq!(view_change(&client, &old[0], &change).status, 200);
    for (key, value) in &loaded.data {
        let answer = get(&client, &outsider.address, key, &json!({}));
        assert_eq!(
            (answer.status, &answer.body["value"]),
            (200, value),
            "{key} through the node outside the view {}: {answer:?}",
            outsider.address
        );
        let address = answer.body["address"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(view.contains(&address), "{key} served by {address}");
    }
}

/// Deletions made while a replica is dead stay tombstones on its mate (which cannot know
/// the dead one has them); a view change that leaves the dead replica out carries them
/// into the new incarnations, whose logs know nothing of them. Once every replica of each
/// new shard holds the same values, sweeps collect every one of them: none is left on any
/// node, the deleted keys stay deleted and every other key keeps its value.
#[test]
fn tombstones_carried_through_a_view_change_are_swept_once_every_replica_agrees() {
    let (mut cluster, layout, loaded) = loaded_cluster(4, 2, "graves");
    let client = Client::new();
    let old = cluster.addresses();
    let (a, b, c, d) = (&old[0], &old[1], &old[2], &old[3]);
    assert_eq!(layout[0].1, vec![a.clone(), b.clone()]);
    let shards = key_shards(&client, &old, &layout, &loaded.data);
    cluster.nodes[1].kill();
    let mut context = loaded.context.clone();
    let mut kept = loaded.data.clone();
    let deleted: Vec<String> = loaded.data.keys().step_by(3).cloned().collect();
    for (i, key) in deleted.iter().enumerate() {
        let through = [a, c, d][i % 3];
        let body = json!({"causal-context": context});
        let answer = key_request(&client, "DELETE", through, key, &body);
        assert_eq!(answer.status, 200, "DELETE {key} via {through}: {answer:?}");
        context = answer.body["causal-context"].clone();
        kept.remove(key);
    }
    let on_a = deleted.iter().filter(|k| shards[*k] == "1").count();
    assert!(on_a > 0, "some deleted keys are on shard 1");
    let tombstones = |node: &str| -> Vec<(String, Value)> {
        let status = client.get(&format!("http://{node}/cluster/status"));
        status.body["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                (
                    n["address"].as_str().unwrap_or("").to_string(),
                    n["tombstones"].clone(),
                )
            })
            .collect()
    };
    let held = tombstones(a)
        .into_iter()
        .find(|(n, _)| n == a)
        .map(|(_, t)| t);
    assert_eq!(
        held,
        Some(json!(on_a)),
        "its mate is dead, so {a} keeps the tombstone of every key of shard 1 deleted"
    );
    let e = fresh_address();
    let view = vec![a.clone(), c.clone(), d.clone(), e.clone()];
    start_joining(&mut cluster, &view, 2);
    let change = Change {
        old: &old,
        view: &view,
        factor: 2,
        left_out: std::slice::from_ref(b),
    };
    let answer = view_change(&client, d, &change);
    assert_eq!(answer.status, 200, "{answer:?}");
    let layout = answered_layout(&answer);
    assert_eq!(layout, self::layout(&[("1", &[a, &e]), ("2", &[c, d])]));
    wait_replicated(&client, &layout, kept.len());
    poll_until(
        Duration::from_secs(30),
        "no tombstone left on any replica",
        || {
            let left = tombstones(a);
            (left.len() == view.len() && left.iter().all(|(_, t)| *t == json!(0))).then_some(())
        },
    );
    let swept: f64 = [a, &e]
        .iter()
        .map(|n| gauge(&client, n, "ringkv_tombstones_swept_total"))
        .sum();
    assert!(
        swept >= on_a as f64,
        "the {on_a} carried tombstones of shard 1 were swept, not collected from a log: {swept}"
    );
    for node in &view {
        for key in &deleted {
            let answer = get(&client, node, key, &json!({}));
            assert_eq!(
                answer.status, 404,
                "GET deleted {key} via {node}: {answer:?}"
            );
        }
        for (key, value) in &kept {
            let answer = get(&client, node, key, &json!({}));
            assert_eq!(
                (answer.status, &answer.body["value"]),
                (200, value),
                "GET {key} via {node}: {answer:?}"
            );
        }
    }
}

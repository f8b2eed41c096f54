//! View changes that fail or race: a node down, a receiver killed during the transfer,
//! two changes at once, a coordinator that dies after the commit point. The fault hooks
//! (`--fault-hooks`) hold a change at a chosen point, so no test depends on timing.

mod common;

use std::time::Duration;

use common::{
    assert_contents, assert_states, assert_view_change_ok, gauge, load, poll_until, sample_data,
    Answer, Client, Cluster, TestNode,
};
use ringkv::ring::{HashRing, DEFAULT_VNODES};
use serde_json::json;

const HOOKS: &[&str] = &["--fault-hooks"];

fn strings(nodes: &[&String]) -> Vec<String> {
    nodes.iter().map(|n| n.to_string()).collect()
}

fn unreachable_answer(peers: &[&String]) -> serde_json::Value {
    json!({
        "error": "Unable to satisfy request",
        "message": "Error in PUT",
        "unreachable": peers,
    })
}

fn key_counts(client: &Client, nodes: &[String]) -> Vec<u64> {
    nodes.iter().map(|n| client.key_count(n)).collect()
}

/// Sends a view change from another thread, so the test can act while it is in flight.
fn view_change_in_background(node: &str, view: &[String]) -> std::thread::JoinHandle<Answer> {
    let (node, view) = (node.to_string(), view.join(","));
    std::thread::spawn(move || Client::new().view_change(&node, &view))
}

/// Sets (or clears) the pause at the start of the transfer on every node of `nodes`.
fn hold_transfers<'a>(client: &Client, nodes: impl IntoIterator<Item = &'a String>, hold: bool) {
    for node in nodes {
        client.set_fault(node, &json!({ "pause_transfer": hold }));
    }
}

/// Waits until every node of `view` serves `epoch` with no change pending, then checks that
/// the view holds exactly `data`.
fn wait_until_settled(
    client: &Client,
    view: &[String],
    epoch: u64,
    data: &std::collections::BTreeMap<String, serde_json::Value>,
) {
    for node in view {
        poll_until(Duration::from_secs(10), "the change to settle", || {
            let state = client.state(node);
            (state["epoch"] == json!(epoch) && state["pending"].is_null()).then_some(())
        });
    }
    assert_states(client, view, epoch, view);
    let total: u64 = view.iter().map(|n| client.key_count(n)).sum();
    assert_eq!(total, data.len() as u64);
    assert_contents(client, view, view, data);
}

/// Waits until every node of `nodes` holds a transfer at the pause point.
fn wait_in_transfer(client: &Client, nodes: &[&String]) {
    for node in nodes {
        poll_until(
            Duration::from_secs(10),
            "a transfer held at the pause point",
            || (client.fault_status(node)["waiting_in_transfer"] == json!(true)).then_some(()),
        );
    }
}

#[test]
fn a_node_of_the_new_view_that_is_down_fails_the_change_and_nothing_moves() {
    let mut cluster = Cluster::start(2, &[]);
    let client = Client::new();
    let old = cluster.addresses();
    let data = sample_data("down", 150);
    load(&client, &old, &data);
    let counts = key_counts(&client, &old);

    // A node that was never started.
    let ghost = common::fresh_address();
    let answer = client.view_change(&old[0], &strings(&[&old[0], &old[1], &ghost]).join(","));
    assert_eq!(
        (answer.status, answer.body),
        (503, unreachable_answer(&[&ghost]))
    );
    assert_eq!(key_counts(&client, &old), counts);
    assert_states(&client, &old, 0, &old);
    assert_contents(&client, &old, &old, &data);

    // A node that was started, then died.
    let dead = common::fresh_address();
    let mut node = TestNode::start(&dead, &old, &[]);
    node.kill();
    let answer = client.view_change(&old[1], &strings(&[&old[0], &dead, &old[1]]).join(","));
    assert_eq!(
        (answer.status, answer.body),
        (503, unreachable_answer(&[&dead]))
    );
    assert_eq!(key_counts(&client, &old), counts);
    assert_states(&client, &old, 0, &old);
    assert_contents(&client, &old, &old, &data);

    // Nothing was left half-done: a change to live nodes goes through.
    cluster.add_node(&old, &[]);
    let grown = cluster.addresses();
    let answer = client.view_change(&old[0], &grown.join(","));
    let counts = assert_view_change_ok(&client, &answer, &grown);
    assert_eq!(counts.iter().sum::<u64>(), 150);
    assert_states(&client, &grown, 1, &grown);
    assert_contents(&client, &grown, &grown, &data);
}

#[test]
fn a_node_of_the_old_view_that_is_down_fails_the_change() {
    let mut cluster = Cluster::start(3, &[]);
    let client = Client::new();
    let old = cluster.addresses();
    load(&client, &old, &sample_data("olddown", 90));
    let counts = key_counts(&client, &old[..2]);
    cluster.nodes[2].kill();

    let answer = client.view_change(&old[0], &old[..2].join(","));
    assert_eq!(
        (answer.status, answer.body),
        (503, unreachable_answer(&[&old[2]]))
    );
    assert_eq!(key_counts(&client, &old[..2]), counts);
    assert_states(&client, &old[..2], 0, &old);
}

#[test]
fn a_receiver_killed_during_the_transfer_leaves_the_old_view_in_force() {
    let mut cluster = Cluster::start(2, HOOKS);
    let client = Client::new();
    let old = cluster.addresses();
    let receiver = cluster.add_node(&old, HOOKS);
    let data = sample_data("killed", 300);
    load(&client, &cluster.addresses(), &data);
    let counts = key_counts(&client, &old);

    hold_transfers(&client, &old, true);
    let change = view_change_in_background(&old[0], &strings(&[&old[0], &old[1], &receiver]));
    wait_in_transfer(&client, &[&old[0], &old[1]]);
    cluster.nodes[2].kill();
    hold_transfers(&client, &old, false);

    let answer = change.join().unwrap();
    assert_eq!(
        (answer.status, answer.body),
        (503, unreachable_answer(&[&receiver]))
    );
    assert_states(&client, &old, 0, &old);
    assert_eq!(key_counts(&client, &old), counts);
    assert_contents(&client, &old, &old, &data);

    // The survivors are free to change again, and lose nothing doing it.
    let replacement = common::fresh_address();
    cluster
        .nodes
        .push(TestNode::start(&replacement, &old, HOOKS));
    let view = strings(&[&old[0], &old[1], &replacement]);
    let answer = client.view_change(&old[1], &view.join(","));
    let counts = assert_view_change_ok(&client, &answer, &view);
    assert_eq!(counts.iter().sum::<u64>(), 300);
    assert_states(&client, &view, 1, &view);
    assert_contents(&client, &view, &view, &data);
}

#[test]
fn a_second_change_while_one_is_in_flight_is_refused_and_the_first_completes() {
    let mut cluster = Cluster::start(2, HOOKS);
    let client = Client::new();
    let old = cluster.addresses();
    let joining = cluster.add_node(&old, HOOKS);
    let outsider = cluster.add_node(&old, HOOKS);
    let data = sample_data("race", 200);
    load(&client, &old, &data);

    hold_transfers(&client, &old, true);
    let first = strings(&[&old[0], &old[1], &joining]);
    let change = view_change_in_background(&old[0], &first);
    wait_in_transfer(&client, &[&old[0], &old[1]]);

    let in_progress = json!({"error": "View change in progress", "message": "Error in PUT"});
    let second = strings(&[&old[0], &old[1], &outsider]);
    // To a participant, to a node outside both views, and to the coordinator itself.
    for receiver in [&old[1], &outsider, &joining, &old[0]] {
        let answer = client.view_change(receiver, &second.join(","));
        assert_eq!(
            (answer.status, &answer.body),
            (409, &in_progress),
            "second change via {receiver}"
        );
    }
    hold_transfers(&client, &old, false);

    let answer = change.join().unwrap();
    let counts = assert_view_change_ok(&client, &answer, &first);
    assert_eq!(counts.iter().sum::<u64>(), 200);
    assert_states(&client, &first, 1, &first);
    assert_eq!(client.key_count(&outsider), 0);
    let all = cluster.addresses();
    assert_contents(&client, &all, &first, &data);

    // Once it is done, the refused change can be made.
    let answer = client.view_change(&outsider, &second.join(","));
    let counts = assert_view_change_ok(&client, &answer, &second);
    assert_eq!(counts.iter().sum::<u64>(), 200);
    assert_eq!(client.key_count(&joining), 0);
    assert_states(&client, &second, 2, &second);
    assert_contents(&client, &all, &second, &data);
}

#[test]
fn participants_finish_a_change_whose_coordinator_died_after_the_commit_point() {
    let flags = ["--fault-hooks", "--phase-timeout", "1"];
    let mut cluster = Cluster::start(3, &flags);
    let client = Client::new();
    let old = cluster.addresses();
    let joining = cluster.add_node(&old, &flags);
    let data = sample_data("orphan", 200);
    load(&client, &old, &data);

    // The coordinator leaves the view, so every key has a surviving owner.
    let coordinator = &old[0];
    let view = strings(&[&old[1], &old[2], &joining]);
    client.set_fault(coordinator, &json!({"exit_after_first_commit": true}));
    let answer = Client::with_timeout(Duration::from_secs(15)).try_send(
        "PUT",
        &format!("http://{coordinator}/kvs/view-change"),
        Some(&json!({"view": view.join(",")}).to_string()),
    );
    assert!(answer.is_err(), "the coordinator answered: {answer:?}");
    let status = cluster.nodes[0].wait_for_exit(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(17),
        "the coordinator exited"
    );

    wait_until_settled(&client, &view, 1, &data);
}

#[test]
fn a_joining_node_that_learns_an_older_view_mid_change_keeps_its_prepared_change() {
    let mut cluster = Cluster::start(2, HOOKS);
    let client = Client::new();
    let old = cluster.addresses();
    let third = cluster.add_node(&old, HOOKS);
    let late = cluster.add_node(&old, HOOKS);
    let data = sample_data("late", 200);
    load(&client, &old, &data);
    // The late node is not in the group: it follows the group's view as a non-member.
    let first = strings(&[&old[0], &old[1], &third]);
    let answer = client.view_change(&old[0], &first.join(","));
    assert_view_change_ok(&client, &answer, &first);
    let owners = assert_contents(&client, &first, &first, &data);

    let senders = [&old[0], &old[1], &third];
    hold_transfers(&client, senders, true);
    let second = strings(&[&old[0], &old[1], &third, &late]);
    let change = view_change_in_background(&old[1], &second);
    wait_in_transfer(&client, &senders);
    assert!(
        !client.state(&late)["pending"].is_null(),
        "the late node prepared"
    );

    // A request through the late node routes by its epoch-0 view, is told of epoch 1 ...
    let (key, owner) = owners.iter().find(|(_, o)| **o == third).unwrap();
    let answer = client.get_key(&late, key);
    assert_eq!(
        answer.body,
        json!({"doesExist": true, "message": "Retrieved successfully",
               "value": data[key], "address": owner})
    );
    // ... which must not cost it the change to epoch 2 it has prepared.
    let state = client.state(&late);
    assert!(
        !state["pending"].is_null(),
        "the prepared change was dropped: {state}"
    );

    hold_transfers(&client, senders, false);
    let answer = change.join().unwrap();
    let counts = assert_view_change_ok(&client, &answer, &second);
    assert_eq!(counts.iter().sum::<u64>(), 200);
    assert!(counts[3] > 0, "the late node took over keys");
    assert_states(&client, &second, 2, &second);
    assert_contents(&client, &second, &second, &data);
}

#[test]
fn the_old_owner_never_serves_a_value_overwritten_at_the_new_owner() {
    // The old owners hold their commits; the joining node commits and serves its keys.
    let held = HeldHandover::start(HOOKS, HOOKS);
    let (client, old, joining) = (&held.client, &held.old, &held.view[2]);
    poll_until(
        Duration::from_secs(10),
        "the joining node to commit",
        || (common::epoch_of(client, joining) == 1).then_some(()),
    );
    // (Asking the joining node would not do: it forwards other keys to the held nodes.)
    let key = held.moving.clone();
    let answer = client.put_key(joining, &key, &json!("newer"));
    assert_eq!(
        answer.body,
        json!({"message": "Updated successfully", "replaced": true})
    );

    // The old owner has not switched yet; it must not answer with the overwritten value.
    let answer = client.get_key(&old[1], &key);
    assert!(
        answer.status == 503 || answer.body["value"] == json!("newer"),
        "GET {key} via its old owner after the new owner acknowledged a write: {answer:?}"
    );

    let (view, mut data) = (held.view.clone(), held.data.clone());
    let _cluster = held.release();
    let client = Client::new();
    assert_states(&client, &view, 1, &view);
    data.insert(key, json!("newer"));
    assert_contents(&client, &view, &view, &data);
}

#[test]
fn participants_wait_for_a_busy_coordinator_outside_both_views() {
    let flags = ["--fault-hooks", "--phase-timeout", "1"];
    let mut cluster = Cluster::start(2, &flags);
    let client = Client::new();
    let old = cluster.addresses();
    let joining = cluster.add_node(&old, &flags);
    let outsider = cluster.add_node(&old, &flags);
    let data = sample_data("outsider", 200);
    load(&client, &old, &data);

    // The transfer outlasts the phase timeout: the participants' watchdogs ask the
    // coordinator, which is still at work, so nobody proposes an abort.
    hold_transfers(&client, &old, true);
    let view = strings(&[&old[0], &old[1], &joining]);
    let change = view_change_in_background(&outsider, &view);
    wait_in_transfer(&client, &[&old[0], &old[1]]);
    poll_until(
        Duration::from_secs(10),
        "the joining node's watchdog to ask about the change",
        || {
            cluster.nodes[2]
                .log_contains("the coordinator is still at work")
                .then_some(())
        },
    );
    hold_transfers(&client, &old, false);

    let answer = change.join().unwrap();
    let counts = assert_view_change_ok(&client, &answer, &view);
    assert_eq!(counts.iter().sum::<u64>(), 200);
    assert_states(&client, &view, 1, &view);
    let all = cluster.addresses();
    assert_contents(&client, &all, &view, &data);
}

#[test]
fn a_change_whose_client_hung_up_still_completes() {
    let mut cluster = Cluster::start(2, HOOKS);
    let client = Client::new();
    let old = cluster.addresses();
    let joining = cluster.add_node(&old, HOOKS);
    let data = sample_data("hangup", 200);
    load(&client, &old, &data);

    hold_transfers(&client, &old, true);
    let view = strings(&[&old[0], &old[1], &joining]);
    let (coordinator, body) = (old[0].clone(), json!({"view": view.join(",")}).to_string());
    let impatient = std::thread::spawn(move || {
        Client::with_timeout(Duration::from_millis(500)).try_send(
            "PUT",
            &format!("http://{coordinator}/kvs/view-change"),
            Some(&body),
        )
    });
    wait_in_transfer(&client, &[&old[0], &old[1]]);
    let answer = impatient.join().unwrap();
    assert!(
        answer.is_err(),
        "the change was held, yet answered: {answer:?}"
    );
    hold_transfers(&client, &old, false);

    // The default phase timeout (30 s) is far away: only the coordinator can finish it.
    wait_until_settled(&client, &view, 1, &data);
}

#[test]
fn participants_abort_a_change_whose_coordinator_died_before_the_commit_point() {
    let flags = ["--fault-hooks", "--phase-timeout", "1"];
    let mut cluster = Cluster::start(2, &flags);
    let client = Client::new();
    let old = cluster.addresses();
    let (joining, coordinator) = (common::fresh_address(), common::fresh_address());
    cluster.nodes.push(TestNode::start(&joining, &old, &flags));
    cluster
        .nodes
        .push(TestNode::start(&coordinator, &old, &flags));
    let data = sample_data("headless", 200);
    load(&client, &old, &data);
    let counts = key_counts(&client, &old);

    hold_transfers(&client, &old, true);
    let view = strings(&[&old[0], &old[1], &joining]);
    let (to, body) = (
        coordinator.clone(),
        json!({"view": view.join(",")}).to_string(),
    );
    let orphaned = std::thread::spawn(move || {
        Client::new().try_send("PUT", &format!("http://{to}/kvs/view-change"), Some(&body))
    });
    wait_in_transfer(&client, &[&old[0], &old[1]]);
    cluster.nodes[3].kill();
    assert!(orphaned.join().unwrap().is_err());
    hold_transfers(&client, &old, false);

    let participants = strings(&[&old[0], &old[1], &joining]);
    for node in &participants {
        poll_until(Duration::from_secs(10), "the participants to abort", || {
            client.state(node)["pending"].is_null().then_some(())
        });
    }
    assert_states(&client, &participants, 0, &old);
    assert_eq!(key_counts(&client, &old), counts);
    assert_eq!(client.key_count(&joining), 0);
    assert_contents(&client, &participants, &old, &data);
}

#[test]
fn two_changes_sent_at_once_leave_one_view_and_every_key() {
    let mut cluster = Cluster::start(3, &[]);
    let client = Client::new();
    let old = cluster.addresses();
    let extra = common::fresh_addresses(2);
    for address in &extra {
        cluster.nodes.push(TestNode::start(address, &old, &[]));
    }
    let all = cluster.addresses();
    let data = sample_data("clash", 200);
    load(&client, &old, &data);

    let views = [
        strings(&[&old[0], &old[1], &old[2], &extra[0]]),
        strings(&[&old[1], &old[2], &extra[1]]),
    ];
    let receivers = [&old[2], &extra[1]];
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let changes: Vec<_> = views
        .iter()
        .zip(receivers)
        .map(|(view, receiver)| {
            let (view, receiver, barrier) = (view.join(","), receiver.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                Client::new().view_change(&receiver, &view)
            })
        })
        .collect();
    let answers: Vec<Answer> = changes.into_iter().map(|c| c.join().unwrap()).collect();

    // Each is refused or carried out; if both went through, one after the other.
    let in_progress = json!({"error": "View change in progress", "message": "Error in PUT"});
    let mut succeeded = Vec::new();
    for (answer, view) in answers.iter().zip(&views) {
        match answer.status {
            200 => succeeded.push(view.clone()),
            409 => assert_eq!(answer.body, in_progress),
            _ => panic!("{answer:?}"),
        }
    }
    eprintln!(
        "answers {:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    let state = client.state(&old[1]);
    let epoch = succeeded.len() as u64;
    let view = match succeeded.as_slice() {
        [] => old.clone(),
        [view] => view.clone(),
        _ => views
            .iter()
            .find(|v| v.len() == state["view"].as_array().unwrap().len())
            .unwrap()
            .clone(),
    };
    let members: Vec<String> = all.iter().filter(|n| view.contains(n)).cloned().collect();
    assert_states(&client, &members, epoch, &view);
    let total: u64 = view.iter().map(|n| client.key_count(n)).sum();
    assert_eq!(total, 200);
    assert_contents(&client, &all, &view, &data);
}

#[test]
fn an_operator_can_drop_a_dead_member_at_the_cost_of_its_keys() {
    let mut cluster = Cluster::start(3, &[]);
    let client = Client::new();
    let all = cluster.addresses();
    let data = sample_data("dead", 150);
    load(&client, &all, &data);
    let owners = assert_contents(&client, &all, &all, &data);
    let dead = all[2].clone();
    cluster.nodes[2].kill();
    let survivors = all[..2].to_vec();

    // The course's view change needs every member: it refuses and changes nothing.
    let answer = client.view_change(&survivors[0], &survivors.join(","));
    assert_eq!(
        (answer.status, &answer.body),
        (
            503,
            &json!({"error": "Unable to satisfy request", "message": "Error in PUT",
                    "unreachable": [dead]})
        )
    );
    assert_states(&client, &survivors, 0, &all);

    // The operator's change may not drop a member of the new view ...
    let forced = |view: &[String]| {
        client.put(
            &format!("http://{}/cluster/view-change", survivors[1]),
            &json!({ "view": view.join(",") }),
        )
    };
    let answer = forced(&all);
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.body["unreachable"], json!([dead]));
    assert_states(&client, &survivors, 0, &all);

    // ... but it drops a dead member of the old view, whose keys are lost with it.
    let answer = forced(&survivors);
    let counts = assert_view_change_ok(&client, &answer, &survivors);
    let (lost, kept): (Vec<_>, Vec<_>) = data.iter().partition(|(key, _)| owners[*key] == dead);
    assert!(!lost.is_empty() && !kept.is_empty());
    let kept: std::collections::BTreeMap<String, serde_json::Value> = kept
        .into_iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), kept.len() as u64);
    assert_states(&client, &survivors, 1, &survivors);
    assert_contents(&client, &survivors, &survivors, &kept);
    common::assert_absent(&client, &survivors, lost.iter().map(|(k, _)| *k));
}

/// A change from two nodes to three held at its commit on both old nodes: the second node's
/// outgoing ranges stay frozen, and the first still routes by the old view.
struct HeldHandover {
    cluster: Cluster,
    client: Client,
    old: Vec<String>,
    view: Vec<String>,
    data: std::collections::BTreeMap<String, serde_json::Value>,
    change: std::thread::JoinHandle<Answer>,
    /// A key the second node owns that moves to the new node (its requests wait).
    moving: String,
    /// A key the second node owns and keeps.
    staying: String,
}

impl HeldHandover {
    fn start(first_flags: &[&str], second_flags: &[&str]) -> HeldHandover {
        let addresses = common::fresh_addresses(2);
        let mut cluster = Cluster {
            nodes: vec![
                TestNode::start(&addresses[0], &addresses, first_flags),
                TestNode::start(&addresses[1], &addresses, second_flags),
            ],
        };
        let client = Client::new();
        let old = cluster.addresses();
        let joining = cluster.add_node(&old, HOOKS);
        let data = sample_data("held", 200);
        load(&client, &old, &data);
        let owners_before = assert_contents(&client, &old, &old, &data);
        for node in &old {
            client.set_fault(node, &json!({"pause_commit": true}));
        }
        let view = strings(&[&old[0], &old[1], &joining]);
        let change = view_change_in_background(&old[0], &view);
        poll_until(
            Duration::from_secs(10),
            "a held commit on the second node",
            || (client.fault_status(&old[1])["waiting_in_commit"] == json!(true)).then_some(()),
        );
        let ring = HashRing::new(&view, DEFAULT_VNODES).unwrap();
        let owned_by_second = |moves: bool| {
            owners_before
                .iter()
                .find(|(key, owner)| {
                    **owner == old[1] && (**ring.owner(key.as_bytes()) == *joining) == moves
                })
                .map(|(key, _)| key.clone())
                .expect("the second node owns keys that move and keys that stay")
        };
        let (moving, staying) = (owned_by_second(true), owned_by_second(false));
        HeldHandover {
            cluster,
            client,
            old,
            view,
            data,
            change,
            moving,
            staying,
        }
    }

    fn waiting_at_second(&self) -> f64 {
        gauge(
            &self.client,
            &self.old[1],
            "ringkv_requests_waiting_for_handover",
        )
    }

    /// Lets both commits go and checks the change succeeds; the nodes keep running as long
    /// as the returned cluster lives.
    fn release(self) -> Cluster {
        for node in &self.old {
            self.client.set_fault(node, &json!({"pause_commit": false}));
        }
        assert_view_change_ok(&self.client, &self.change.join().unwrap(), &self.view);
        self.cluster
    }
}

#[test]
fn a_forward_waiting_for_a_handover_holds_up_no_other_forward() {
    // Forwards from one node to another share one connection: an answer that waits must not
    // delay the answers behind it.
    let flags = ["--fault-hooks", "--forward-timeout", "20"];
    let held = HeldHandover::start(&flags, &flags);
    let (client, old) = (&held.client, &held.old);

    let waiting = {
        let (through, key) = (old[0].clone(), held.moving.clone());
        std::thread::spawn(move || Client::new().get_key(&through, &key))
    };
    poll_until(
        Duration::from_secs(10),
        "the forward of the moving key to wait at the second node",
        || (held.waiting_at_second() == 1.0).then_some(()),
    );
    let answer = client.get_key(&old[0], &held.staying);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.body,
        json!({
            "doesExist": true,
            "message": "Retrieved successfully",
            "value": held.data[&held.staying],
            "address": old[1],
        })
    );
    assert!(
        !waiting.is_finished(),
        "the moving key was answered before the commit"
    );
    assert_eq!(held.waiting_at_second(), 1.0);

    let moving_value = held.data[&held.moving].clone();
    let second = old[1].clone();
    let _cluster = held.release();
    let answer = waiting.join().unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["value"], moving_value);
    assert_eq!(
        gauge(
            &Client::new(),
            &second,
            "ringkv_requests_waiting_for_handover"
        ),
        0.0
    );
}

#[test]
fn a_forward_its_sender_gave_up_on_is_cancelled_at_the_owner() {
    // The first node waits 1.5 s for an owner, the second waits 20 s for a handover.
    let held = HeldHandover::start(
        &["--fault-hooks", "--forward-timeout", "1.5"],
        &["--fault-hooks", "--forward-timeout", "20"],
    );
    let put = {
        let (through, key) = (held.old[0].clone(), held.moving.clone());
        std::thread::spawn(move || Client::new().put_key(&through, &key, &json!("given up")))
    };
    poll_until(
        Duration::from_secs(1),
        "the forwarded PUT to wait at the second node",
        || (held.waiting_at_second() == 1.0).then_some(()),
    );
    let answer = put.join().unwrap();
    assert_eq!(answer.status, 503, "{answer:?}");
    // The second node has not committed (its handover still holds), so only a cancel ends
    // the owner's wait this early.
    poll_until(
        Duration::from_secs(5),
        "the owner to drop the cancelled request",
        || (held.waiting_at_second() == 0.0).then_some(()),
    );
    assert_eq!(common::epoch_of(&held.client, &held.old[1]), 0);
    let (client, view, moving) = (Client::new(), held.view.clone(), held.moving.clone());
    let value = held.data[&moving].clone();
    let _cluster = held.release();
    // The PUT that got 503 never landed.
    let answer = client.get_key(&view[2], &moving);
    assert_eq!(answer.body["value"], value, "{answer:?}");
}

#[test]
fn a_stopping_owner_keeps_serving_forwards_until_its_waiting_requests_end() {
    let flags = ["--fault-hooks", "--forward-timeout", "20"];
    let mut held = HeldHandover::start(&flags, &flags);
    let (through, moving) = (held.old[0].clone(), held.moving.clone());
    let waiting = std::thread::spawn(move || Client::new().get_key(&through, &moving));
    poll_until(
        Duration::from_secs(10),
        "the forward of the moving key to wait at the second node",
        || (held.waiting_at_second() == 1.0).then_some(()),
    );
    let second = &mut held.cluster.nodes[1];
    second.signal("TERM");
    poll_until(Duration::from_secs(5), "the second node to stop", || {
        second
            .log_contains("shutting down: no new connections")
            .then_some(())
    });
    // Still draining (its waiting request holds it): forwards of other keys are served.
    let answer = held.client.get_key(&held.old[0], &held.staying);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["value"], held.data[&held.staying]);
    // The waiting request ends with the shutdown grace period, and so does the node.
    let answer = waiting.join().unwrap();
    assert_eq!(answer.status, 503, "{answer:?}");
    let status = held.cluster.nodes[1]
        .wait_for_exit(Duration::from_secs(10))
        .expect("the second node exits");
    assert!(status.success(), "{status:?}");
}

/// A coordinator that dies between writing a change's `Begin` to the log and sending its
/// first `Prepare` leaves a change that no participant prepared, so no watchdog settles it,
/// and the log refuses every other change while it is undecided. The members propose its
/// abort once it has been pending for twice the phase timeout and its coordinator does not
/// say it is driving it; the next change then goes through and loses nothing.
#[test]
fn a_change_whose_coordinator_died_right_after_begin_is_aborted_and_the_next_goes_through() {
    let flags = ["--fault-hooks", "--phase-timeout", "1"];
    let mut cluster = Cluster::start(3, &flags);
    let client = Client::new();
    let old = cluster.addresses();
    let coordinator = cluster.add_node(&old, &flags);
    let data = sample_data("begun", 200);
    load(&client, &old, &data);

    client.set_fault(&coordinator, &json!({"exit_after_begin": true}));
    let grown = strings(&[&old[0], &old[1], &old[2], &coordinator]);
    let answer = Client::with_timeout(Duration::from_secs(15)).try_send(
        "PUT",
        &format!("http://{coordinator}/kvs/view-change"),
        Some(&json!({"view": grown.join(",")}).to_string()),
    );
    assert!(answer.is_err(), "the coordinator answered: {answer:?}");
    let status = cluster.nodes[3].wait_for_exit(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(17),
        "the coordinator exited"
    );

    // Refused (409) while the orphaned change is pending, then carried out.
    let smaller = strings(&[&old[0], &old[1]]);
    let answer = poll_until(
        Duration::from_secs(20),
        "the next change to go through",
        || {
            let answer = client.view_change(&old[0], &smaller.join(","));
            (answer.status != 409).then_some(answer)
        },
    );
    assert_view_change_ok(&client, &answer, &smaller);
    assert!(
        cluster.nodes[..3]
            .iter()
            .any(|n| n.log_contains("proposing that it abort")),
        "a member proposed the orphaned change's abort"
    );
    let epoch = common::epoch_of(&client, &old[0]);
    wait_until_settled(&client, &smaller, epoch, &data);
}

/// A node a change removed is no longer sent the log, so it does not hear of the changes
/// after: it asks the nodes of the view it was removed in and follows the newer view, as
/// the members see it (here after a second change it took no part in).
#[test]
fn a_removed_node_follows_the_views_of_later_changes() {
    let mut cluster = Cluster::start(2, HOOKS);
    let client = Client::new();
    let old = cluster.addresses();
    let third = cluster.add_node(&old, HOOKS);
    let fourth = cluster.add_node(&old, HOOKS);
    let first = strings(&[&old[1], &third]);
    assert_view_change_ok(
        &client,
        &client.view_change(&old[0], &first.join(",")),
        &first,
    );
    let second = strings(&[&third, &fourth]);
    assert_view_change_ok(
        &client,
        &client.view_change(&third, &second.join(",")),
        &second,
    );
    let epoch = common::epoch_of(&client, &third);
    poll_until(
        Duration::from_secs(10),
        "the removed node on the newest view",
        || {
            let state = client.state(&old[0]);
            (state["epoch"] == json!(epoch)).then_some(())
        },
    );
    assert_states(&client, &[old[0].clone()], epoch, &second);
}

//! View changes of every shape on real nodes: shrink, replace, move everything, the no-op,
//! and convergence of nodes that started with different views.

mod common;

use common::{
    assert_contents, assert_states, assert_view_change_ok, epoch_of, load, sample_data, Client,
    Cluster, TestNode,
};
use serde_json::json;
use std::time::Duration;

fn strings(nodes: &[&String]) -> Vec<String> {
    nodes.iter().map(|n| n.to_string()).collect()
}

#[test]
fn shrink_four_to_three_empties_the_removed_node_which_then_forwards() {
    let cluster = Cluster::start(4, &[]);
    let client = Client::new();
    let all = cluster.addresses();
    let data = sample_data("shrink", 200);
    load(&client, &all, &data);
    let before = assert_contents(&client, &all, &all, &data);

    let view = all[..3].to_vec();
    let removed = &all[3];
    let answer = client.view_change(removed, &view.join(","));
    let counts = assert_view_change_ok(&client, &answer, &view);
    assert_eq!(counts.iter().sum::<u64>(), 200);
    assert_eq!(client.key_count(removed), 0);
    assert_states(&client, &all, 1, &view);
    let after = assert_contents(&client, &all, &view, &data);
    for (key, owner) in &before {
        if owner != removed {
            assert_eq!(after[key], *owner, "{key} moved between staying nodes");
        }
    }
    common::assert_shipped_exactly_the_moved_keys(&client, removed, &before, &after);

    // The removed node keeps serving writes by forwarding them, naming the owner.
    for (key, owner) in after.iter().take(20) {
        let answer = client.put_key(removed, key, &json!("rewritten"));
        assert_eq!(
            answer.body,
            json!({"message": "Updated successfully", "replaced": true, "address": owner}),
            "PUT {key} via the removed node"
        );
        let answer = client.delete_key(removed, key);
        assert_eq!(
            answer.body,
            json!({"doesExist": true, "message": "Deleted successfully", "address": owner})
        );
    }
    assert_eq!(client.key_count(removed), 0);
    let total: u64 = view.iter().map(|n| client.key_count(n)).sum();
    assert_eq!(total, 180);
}

#[test]
fn replace_adds_one_node_and_removes_another_in_one_change() {
    let mut cluster = Cluster::start(3, &[]);
    let client = Client::new();
    let old = cluster.addresses();
    let added = cluster.add_node(&old, &[]);
    let all = cluster.addresses();
    let data = sample_data("replace", 200);
    load(&client, &all, &data);
    let before = assert_contents(&client, &all, &old, &data);

    let view = strings(&[&old[0], &added, &old[1]]);
    let removed = &old[2];
    // Sent to the joining node, which is not in the view in force.
    let answer = client.view_change(&added, &view.join(","));
    let counts = assert_view_change_ok(&client, &answer, &view);
    assert_eq!(counts.iter().sum::<u64>(), 200);
    assert!(counts[1] > 0, "the added node took over keys");
    assert_eq!(client.key_count(removed), 0);
    assert_states(&client, &all, 1, &view);
    let after = assert_contents(&client, &all, &view, &data);
    common::assert_shipped_exactly_the_moved_keys(&client, &added, &before, &after);
    for (key, old_owner) in &before {
        if old_owner != removed {
            assert!(
                after[key] == *old_owner || after[key] == added,
                "{key} moved from {old_owner} to {}",
                after[key]
            );
        }
    }
}

#[test]
fn a_view_of_new_nodes_only_moves_all_data() {
    let mut cluster = Cluster::start(2, &[]);
    let client = Client::new();
    let old = cluster.addresses();
    let new = common::fresh_addresses(2);
    for address in &new {
        cluster.nodes.push(TestNode::start(address, &old, &[]));
    }
    let all = cluster.addresses();
    let data = sample_data("evict", 150);
    load(&client, &all, &data);
    let before = assert_contents(&client, &all, &old, &data);

    let answer = client.view_change(&old[0], &new.join(","));
    let counts = assert_view_change_ok(&client, &answer, &new);
    assert_eq!(counts.iter().sum::<u64>(), 150);
    assert!(counts.iter().all(|c| *c > 0));
    for node in &old {
        assert_eq!(client.key_count(node), 0, "{node} was removed");
    }
    assert_states(&client, &all, 1, &new);
    let after = assert_contents(&client, &all, &new, &data);
    common::assert_shipped_exactly_the_moved_keys(&client, &old[0], &before, &after);

    // And back again: everything returns to the first two.
    let answer = client.view_change(&new[1], &old.join(","));
    let counts = assert_view_change_ok(&client, &answer, &old);
    assert_eq!(counts.iter().sum::<u64>(), 150);
    assert_states(&client, &all, 2, &old);
    assert_contents(&client, &all, &old, &data);
}

#[test]
fn the_view_in_force_everywhere_is_a_no_op() {
    let mut cluster = Cluster::start(3, &[]);
    let client = Client::new();
    let all = cluster.addresses();
    let data = sample_data("noop", 120);
    load(&client, &all, &data);
    let counts_before: Vec<u64> = all.iter().map(|n| client.key_count(n)).collect();

    // Same set, another order: the shards follow the order asked for.
    let permuted = strings(&[&all[2], &all[0], &all[1]]);
    let answer = client.view_change(&all[1], &permuted.join(","));
    let counts = assert_view_change_ok(&client, &answer, &permuted);
    assert_eq!(
        counts,
        vec![counts_before[2], counts_before[0], counts_before[1]]
    );
    assert_states(&client, &all, 0, &all);
    assert_contents(&client, &all, &all, &data);

    // After a real change, repeating it is a no-op at the new epoch.
    let joining = cluster.add_node(&all, &[]);
    let grown = cluster.addresses();
    let answer = client.view_change(&all[0], &grown.join(","));
    assert_view_change_ok(&client, &answer, &grown);
    assert_states(&client, &grown, 1, &grown);
    let counts_grown: Vec<u64> = grown.iter().map(|n| client.key_count(n)).collect();
    for receiver in [&joining, &all[2]] {
        let answer = client.view_change(receiver, &grown.join(","));
        assert_eq!(
            assert_view_change_ok(&client, &answer, &grown),
            counts_grown
        );
        assert_states(&client, &grown, 1, &grown);
    }
    assert_contents(&client, &grown, &grown, &data);
}

#[test]
fn nodes_started_with_different_views_converge() {
    let mut cluster = Cluster::start(2, &[]);
    let client = Client::new();
    let old = cluster.addresses();
    let data = sample_data("converge", 150);
    load(&client, &old, &data);
    // As the course does it: the joining node starts with the full future view.
    let joining = common::fresh_address();
    let full = strings(&[&old[0], &old[1], &joining]);
    cluster.nodes.push(TestNode::start(&joining, &full, &[]));
    // It serves (key requests wait meanwhile) before it has asked its peers which view is
    // in force; within a few milliseconds it routes by theirs.
    let members_view = client.state(&old[0])["view_id"].clone();
    common::poll_until(
        Duration::from_secs(10),
        "the joining node to route by the members' view, not the one it was started with",
        || (client.state(&joining)["view_id"] == members_view).then_some(()),
    );

    // Sent to the node that was started with the target view: carried out, because the
    // members hold another.
    let answer = client.view_change(&joining, &full.join(","));
    let counts = assert_view_change_ok(&client, &answer, &full);
    assert_eq!(counts.iter().sum::<u64>(), 150);
    assert!(counts[2] > 0, "the joining node took over keys");
    assert_states(&client, &full, 1, &full);
    assert_contents(&client, &full, &full, &data);

    // Now everyone agrees: the same view again is a no-op.
    let answer = client.view_change(&old[1], &full.join(","));
    assert_eq!(assert_view_change_ok(&client, &answer, &full), counts);
    assert_states(&client, &full, 1, &full);
}

#[test]
fn a_change_received_by_a_node_left_behind_still_moves_every_key() {
    // R is removed, then C joins while R hears nothing; R then receives a change.
    let mut cluster = Cluster::start(3, &[]);
    let client = Client::new();
    let first = cluster.addresses();
    let (a, b, r) = (&first[0], &first[1], &first[2]);
    let c = cluster.add_node(&first, &[]);
    let data = sample_data("behind", 200);
    load(&client, &first, &data);

    let ab = strings(&[a, b]);
    let answer = client.view_change(a, &ab.join(","));
    assert_view_change_ok(&client, &answer, &ab);
    assert_eq!(client.key_count(r), 0);
    let abc = strings(&[a, b, &c]);
    let answer = client.view_change(b, &abc.join(","));
    let counts = assert_view_change_ok(&client, &answer, &abc);
    assert!(counts[2] > 0, "the joining node took over keys");
    assert_eq!(
        epoch_of(&client, r),
        1,
        "R took no part in the second change"
    );

    let answer = client.view_change(r, &ab.join(","));
    let counts = assert_view_change_ok(&client, &answer, &ab);
    assert_eq!(counts.iter().sum::<u64>(), 200);
    assert_eq!(client.key_count(&c), 0, "C handed over its keys");
    assert_states(&client, &abc, 3, &ab);
    let all = cluster.addresses();
    assert_contents(&client, &all, &ab, &data);
}

//! Durable nodes (`--data-dir`): a node killed with `kill -9` under concurrent writes and
//! deletes, then started again on its data dir, holds every acknowledged operation and no
//! deleted key comes back (a model of acknowledged operations; the ones in flight at the
//! kill are uncertain); a cluster whose every node is killed and restarted serves the same
//! view and every key; a data dir refuses another address; a torn journal tail is skipped.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    assert_contents, assert_view_change_ok, fresh_address, fresh_addresses, gauge, load,
    poll_until, sample_data, Client, TestNode,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringkv::ring::{HashRing, DEFAULT_VNODES};
use serde_json::{json, Value};

/// A data directory of its own for each node of a test, removed when the test ends.
struct DataDirs(tempfile::TempDir);

impl DataDirs {
    fn new() -> DataDirs {
        DataDirs(tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap())
    }

    fn of(&self, address: &str) -> PathBuf {
        self.0.path().join(address.replace([':', '.'], "_"))
    }

    fn flags(&self, address: &str, fsync: &str) -> Vec<String> {
        vec![
            "--data-dir".into(),
            self.of(address).display().to_string(),
            "--fsync".into(),
            fsync.into(),
        ]
    }
}

fn start(address: &str, view: &[String], flags: &[String]) -> TestNode {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestNode::start(address, view, &flags)
}

/// What a key may hold: the value of its last acknowledged operation (`None`: absent), and
/// also that of an operation in flight when the node died (it may or may not be applied).
#[derive(Debug, Clone, Default)]
struct Possible(Vec<Option<Value>>);

const WORKERS: usize = 4;
const KEYS_PER_WORKER: usize = 40;

/// One writer with keys of its own (so each key's operations are in one order): random
/// PUTs and DELETEs until the node stops answering.
fn writer(
    id: usize,
    node: String,
    model: Arc<Mutex<BTreeMap<String, Possible>>>,
    ops: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let client = Client::with_timeout(Duration::from_secs(5));
    let mut rng = StdRng::seed_from_u64(id as u64);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("w{id}-k{}", rng.gen_range(0..KEYS_PER_WORKER));
        n += 1;
        let (new, result) = if rng.gen_bool(0.75) {
            let value = json!(format!("w{id}-{n}"));
            let url = format!("http://{node}/kvs/keys/{key}");
            let body = json!({ "value": value }).to_string();
            (Some(value), client.try_send("PUT", &url, Some(&body)))
        } else {
            let url = format!("http://{node}/kvs/keys/{key}");
            (None, client.try_send("DELETE", &url, None))
        };
        let mut model = model.lock().unwrap();
        let possible = model.entry(key).or_insert_with(|| Possible(vec![None]));
        match result {
            Ok(answer) if matches!(answer.status, 200 | 201 | 404) => {
                possible.0 = vec![new];
                ops.fetch_add(1, Ordering::Relaxed);
            }
            // No clear answer: the node died with it in flight.
            _ => {
                possible.0.push(new);
                return;
            }
        }
    }
}

/// Kills a node under concurrent writes and deletes, restarts it on its data dir, and
/// checks every key against the model.
fn killed_under_writes_loses_nothing(fsync: &str) {
    let dirs = DataDirs::new();
    let address = fresh_address();
    let flags = dirs.flags(&address, fsync);
    let mut node = start(&address, &[], &flags);
    let model = Arc::new(Mutex::new(BTreeMap::new()));
    let ops = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WORKERS)
        .map(|id| {
            let (address, model, ops, stop) =
                (address.clone(), model.clone(), ops.clone(), stop.clone());
            std::thread::spawn(move || writer(id, address, model, ops, stop))
        })
        .collect();
    poll_until(
        Duration::from_secs(30),
        "2000 acknowledged operations",
        || (ops.load(Ordering::Relaxed) >= 2000).then_some(()),
    );
    node.kill();
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    let node = start(&address, &[], &flags);
    assert!(node.log_contains("recovered the keys on disk"));
    let client = Client::new();
    let model = model.lock().unwrap();
    let mut present = 0;
    for (key, possible) in model.iter() {
        let answer = client.get_key(&address, key);
        let found = match answer.status {
            200 => Some(answer.body["value"].clone()),
            404 => None,
            other => panic!("GET {key}: {other} {:?}", answer.body),
        };
        present += usize::from(found.is_some());
        assert!(
            possible.0.contains(&found),
            "{key} holds {found:?} after the restart; acknowledged or in flight: {:?}",
            possible.0
        );
    }
    assert_eq!(client.key_count(&address), present as u64);
    eprintln!(
        "{} acknowledged operations on {} keys, {present} present after the restart",
        ops.load(Ordering::Relaxed),
        model.len()
    );
}

#[test]
fn a_node_killed_under_writes_with_fsync_always_keeps_every_acknowledged_operation() {
    killed_under_writes_loses_nothing("always");
}

/// A killed process loses nothing the OS already has, and every write reaches the OS's
/// buffers before its reply: `everysec` loses nothing to `kill -9` either (only a crash of
/// the machine can take the last second).
#[test]
fn a_node_killed_under_writes_with_fsync_everysec_keeps_every_acknowledged_operation() {
    killed_under_writes_loses_nothing("everysec");
}

#[test]
fn a_cluster_whose_every_node_is_killed_and_restarted_serves_the_same_view_and_every_key() {
    let dirs = DataDirs::new();
    let all = fresh_addresses(4);
    let first: Vec<String> = all[..3].to_vec();
    let flags = |a: &str| dirs.flags(a, "everysec");
    let mut nodes: Vec<TestNode> = first.iter().map(|a| start(a, &first, &flags(a))).collect();
    let client = Client::with_timeout(Duration::from_secs(20));
    let data = sample_data("durable", 300);
    load(&client, &first, &data);
    // A view change: the fourth node joins.
    nodes.push(start(&all[3], &first, &flags(&all[3])));
    let answer = client.view_change(&all[0], &all.join(","));
    assert_view_change_ok(&client, &answer, &all);
    let epoch = client.state(&all[0])["epoch"].as_u64().unwrap();
    for node in &mut nodes {
        node.kill();
    }
    // Started again with the view each was first started with: the data dir has the newer.
    let nodes: Vec<TestNode> = all.iter().map(|a| start(a, &first, &flags(a))).collect();
    poll_until(
        Duration::from_secs(30),
        "every node at the view it had",
        || {
            all.iter()
                .all(|a| {
                    let state = client.state(a);
                    state["epoch"].as_u64() == Some(epoch)
                        && state["view"].as_array().map(Vec::len) == Some(all.len())
                })
                .then_some(())
        },
    );
    assert_contents(&client, &all, &all, &data);
    let total: u64 = all.iter().map(|a| client.key_count(a)).sum();
    assert_eq!(total, data.len() as u64);
    drop(nodes);
}

#[test]
fn a_data_dir_refuses_to_start_a_node_at_another_address() {
    let dirs = DataDirs::new();
    let (first, second) = (fresh_address(), fresh_address());
    let flags = dirs.flags(&first, "always");
    let mut node = start(&first, &[], &flags);
    let client = Client::new();
    assert_eq!(client.put_key(&first, "k", &json!("v")).status, 201);
    node.terminate();
    let (ip, port) = second.rsplit_once(':').unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(["--ip", ip, "--port", port, "--address", &second])
        .args(&flags)
        .env_remove("DATA_DIR")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains(&format!("belongs to the node at {first}, not {second}")),
        "{said}"
    );
}

#[test]
fn a_torn_last_journal_record_is_skipped_and_the_node_starts() {
    let dirs = DataDirs::new();
    let address = fresh_address();
    let flags = dirs.flags(&address, "always");
    let mut node = start(&address, &[], &flags);
    let client = Client::new();
    for i in 0..50 {
        let answer = client.put_key(&address, &format!("k{i}"), &json!(format!("v{i}")));
        assert_eq!(answer.status, 201);
    }
    node.kill();
    // Cut the last few bytes off the newest journal: its last record is torn.
    let journals: Vec<PathBuf> = walk(&dirs.of(&address))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
        .collect();
    let newest = journals
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .expect("a journal file");
    let length = std::fs::metadata(newest).unwrap().len();
    assert!(length > 8, "journal {} is {length} bytes", newest.display());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(newest)
        .unwrap();
    file.set_len(length - 5).unwrap();
    drop(file);
    let node = start(&address, &[], &flags);
    // Every key but the last one written is there; the last may be lost with its record.
    for i in 0..49 {
        let answer = client.get_key(&address, &format!("k{i}"));
        assert_eq!(answer.status, 200, "k{i}: {answer:?}");
        assert_eq!(answer.body["value"], json!(format!("v{i}")));
    }
    drop(node);
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Where in a view change a node is killed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// The coordinator, right after it wrote the change's start to the log.
    Begin,
    /// While a sender's transfer is held: the victim may have staged some keys.
    Transfer,
    /// Once every key is staged and every catch-up done, before the coordinator decides.
    Decide,
    /// Once the log decided the commit, before the victim carried it out.
    Commit,
}

/// A cluster of three durable nodes grows to four; `victim` (an index into the four) is
/// killed with `kill -9` at `phase` and started again on its data dir. The change then
/// ends with the others (committed or aborted), and the view the cluster ends in holds
/// every key loaded before it, each once: nothing staged lost, nothing handed over kept.
/// A change aborted this way can be made again.
fn killed_during_a_change(victim: usize, phase: Phase) {
    let dirs = DataDirs::new();
    let all = fresh_addresses(4);
    let first: Vec<String> = all[..3].to_vec();
    let flags = |a: &str| {
        let mut flags = dirs.flags(a, "always");
        flags.extend(["--fault-hooks", "--phase-timeout", "1"].map(String::from));
        flags
    };
    let mut nodes: Vec<TestNode> = first.iter().map(|a| start(a, &first, &flags(a))).collect();
    nodes.push(start(&all[3], &first, &flags(&all[3])));
    let client = Client::with_timeout(Duration::from_secs(20));
    let data = sample_data("phase", 400);
    load(&client, &first, &data);
    // The held node: a sender (its transfer), or the victim itself (its commit).
    let held = match phase {
        Phase::Begin => 0,
        Phase::Transfer => 1,
        Phase::Decide => 0,
        Phase::Commit => victim,
    };
    let (pause, waiting) = match phase {
        Phase::Begin => ("exit_after_begin", ""),
        Phase::Transfer => ("pause_transfer", "waiting_in_transfer"),
        Phase::Decide => ("pause_decide", "waiting_to_decide"),
        Phase::Commit => ("pause_commit", "waiting_in_commit"),
    };
    client.set_fault(&all[held], &json!({ pause: true }));
    // Its answer, if the coordinator lived to give one (it is not checked: the cluster's
    // final state is).
    let change = {
        let url = format!("http://{}/kvs/view-change", all[0]);
        let body = json!({ "view": all.join(",") }).to_string();
        std::thread::spawn(move || {
            Client::with_timeout(Duration::from_secs(30))
                .try_send("PUT", &url, Some(&body))
                .map(|a| a.text)
        })
    };
    if phase == Phase::Begin {
        let exited = nodes[victim].wait_for_exit(Duration::from_secs(15));
        assert_eq!(
            exited.and_then(|e| e.code()),
            Some(17),
            "the coordinator crashed"
        );
    } else {
        poll_until(Duration::from_secs(15), "the held phase", || {
            (client.fault_status(&all[held])[waiting] == json!(true)).then_some(())
        });
    }
    if phase == Phase::Transfer {
        // Every other sender's transfer is done: the receiver has staged their keys.
        let (before, after) = (
            HashRing::new(&first, DEFAULT_VNODES).unwrap(),
            HashRing::new(&all, DEFAULT_VNODES).unwrap(),
        );
        let staged = data
            .keys()
            .filter(|k| {
                let from = before.owner(k.as_bytes());
                **from != *all[1] && **after.owner(k.as_bytes()) == *all[3]
            })
            .count();
        assert!(staged > 0);
        poll_until(Duration::from_secs(15), "the other transfers", || {
            let received = gauge(&client, &all[3], "ringkv_transfer_keys_received_total");
            (received == staged as f64).then_some(())
        });
    }
    if (phase, victim) == (Phase::Commit, 3) {
        // The new node holds what it takes in, but none of it is its own before it commits.
        assert_eq!(client.key_count(&all[3]), 0);
        assert!(gauge(&client, &all[3], "ringkv_transfer_keys_received_total") > 0.0);
    }
    nodes[victim].kill();
    nodes[victim] = start(&all[victim], &first, &flags(&all[victim]));
    if held != victim && phase != Phase::Begin {
        client.set_fault(&all[held], &json!({ pause: false }));
    }
    let answer = change.join().unwrap();
    // The change ends on every node, in the view the log decided.
    let settled = poll_until(
        Duration::from_secs(30),
        "the change to end everywhere",
        || {
            let states: Vec<Value> = all.iter().map(|a| client.state(a)).collect();
            let first = &states[0];
            let view = first["view"].as_array()?.clone();
            let members: Vec<&Value> = states
                .iter()
                .filter(|s| view.contains(&s["address"]))
                .collect();
            (members.len() == view.len()
                && states.iter().all(|s| s["pending"].is_null())
                && members
                    .iter()
                    .all(|s| s["epoch"] == first["epoch"] && s["view"] == first["view"]))
            .then(|| {
                view.iter()
                    .map(|m| m.as_str().unwrap().to_string())
                    .collect::<Vec<String>>()
            })
        },
    );
    if matches!(phase, Phase::Decide | Phase::Commit) {
        assert_eq!(
            settled, all,
            "a change all staged ends committed ({answer:?})"
        );
    }
    assert_contents(&client, &settled, &settled, &data);
    let counts: Vec<u64> = all.iter().map(|a| client.key_count(a)).collect();
    assert_eq!(
        counts.iter().sum::<u64>(),
        data.len() as u64,
        "key counts {counts:?} in view {settled:?}"
    );
    if settled != all {
        // Aborted: the change can be made again (refused while the log still holds the
        // one begun, until a member's watch aborts it).
        let answer = poll_until(Duration::from_secs(20), "the change made again", || {
            let answer = client.view_change(&all[0], &all.join(","));
            (answer.status != 409).then_some(answer)
        });
        assert_view_change_ok(&client, &answer, &all);
        assert_contents(&client, &all, &all, &data);
    }
    drop(nodes);
}

#[test]
fn a_receiver_killed_during_the_transfer_keeps_nothing_it_staged_and_the_change_can_be_made_again()
{
    killed_during_a_change(3, Phase::Transfer);
}

#[test]
fn a_receiver_killed_after_the_commit_was_decided_applies_what_it_staged_when_restarted() {
    killed_during_a_change(3, Phase::Commit);
}

#[test]
fn a_sender_killed_after_the_commit_was_decided_drops_what_it_handed_over_when_restarted() {
    killed_during_a_change(1, Phase::Commit);
}

#[test]
fn a_coordinator_killed_after_it_began_a_change_comes_back_to_a_cluster_that_ended_it() {
    killed_during_a_change(0, Phase::Begin);
}

#[test]
fn a_receiver_killed_after_it_staged_everything_applies_it_when_the_change_commits() {
    killed_during_a_change(3, Phase::Decide);
}

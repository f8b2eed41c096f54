//! No acknowledged write is lost, and no read is stale, while clients write without pause
//! through every node during successive view changes of every shape.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_states, poll_until, Client, RawAnswer, TestNode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const WORKERS: usize = 4;
const KEYS_PER_WORKER: usize = 25;
/// Operations the clients complete between two view changes (and before the first).
const OPS_BETWEEN_CHANGES: u64 = 150;

/// What a key may hold: one value once an operation on it was acknowledged; more when
/// operations since then got no answer (each may or may not have been applied).
type Possible = Vec<Option<Value>>;

#[derive(Default)]
struct Report {
    /// Answers a healthy cluster must never give: 5xx, 409, non-JSON, unexpected shapes.
    bad: Vec<String>,
    /// Answers that contradict the acknowledged history of the key.
    violations: Vec<String>,
    /// Requests that got no answer in time.
    unanswered: u64,
    model: BTreeMap<String, Possible>,
}

/// Removes and checks the `address` of a forwarded answer; it must name a pool node.
fn strip_address(body: &mut Value, pool: &[String]) -> Result<(), String> {
    match body.as_object_mut().and_then(|o| o.remove("address")) {
        None => Ok(()),
        Some(Value::String(a)) if pool.contains(&a) => Ok(()),
        Some(other) => Err(format!("address {other} is no pool node")),
    }
}

fn worker(
    id: usize,
    seed: u64,
    pool: Vec<String>,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) -> Report {
    let client = Client::with_timeout(Duration::from_secs(5));
    let mut rng = StdRng::seed_from_u64(seed);
    let keys: Vec<String> = (0..KEYS_PER_WORKER).map(|k| format!("w{id}k{k}")).collect();
    let mut report = Report {
        model: keys.iter().map(|k| (k.clone(), vec![None])).collect(),
        ..Report::default()
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = &keys[rng.gen_range(0..keys.len())];
        let node = &pool[rng.gen_range(0..pool.len())];
        let url = format!("http://{node}/kvs/keys/{key}");
        let roll = rng.gen_range(0..100);
        let value = match n % 3 {
            0 => json!(n),
            1 => json!(format!("w{id}-{n}")),
            _ => json!({"w": id, "n": n, "list": [n, null, "ü"]}),
        };
        let (method, body, written) = match roll {
            0..=54 => (
                "PUT",
                Some(json!({ "value": value }).to_string()),
                Some(Some(value.clone())),
            ),
            55..=74 => ("DELETE", None, Some(None)),
            _ => ("GET", None, None),
        };
        let what = format!("{method} {key} via {node}");
        let possible = report.model.get_mut(key).unwrap();
        let answer = match client.try_send(method, &url, body.as_deref()) {
            Ok(answer) => answer,
            Err(_) => {
                report.unanswered += 1;
                if let Some(written) = written {
                    possible.push(written);
                }
                continue;
            }
        };
        ops.fetch_add(1, Ordering::Relaxed);
        let RawAnswer { status, text } = answer;
        let Some(mut body) = serde_json::from_str::<Value>(&text).ok() else {
            report
                .bad
                .push(format!("{what}: {status} non-JSON {text:?}"));
            continue;
        };
        if let Err(why) = strip_address(&mut body, &pool) {
            report.bad.push(format!("{what}: {why}"));
        }
        let was_absent = possible.contains(&None);
        let was_present = possible.iter().any(Option::is_some);
        let (expected, consistent, now) = match (method, status) {
            ("PUT", 201) => (
                json!({"message": "Added successfully", "replaced": false}),
                was_absent,
                Some(value),
            ),
            ("PUT", 200) => (
                json!({"message": "Updated successfully", "replaced": true}),
                was_present,
                Some(value),
            ),
            ("DELETE", 200) => (
                json!({"doesExist": true, "message": "Deleted successfully"}),
                was_present,
                None,
            ),
            ("DELETE" | "GET", 404) => (
                json!({"doesExist": false, "error": "Key does not exist",
                       "message": format!("Error in {method}")}),
                was_absent,
                None,
            ),
            ("GET", 200) => {
                let read = body["value"].clone();
                (
                    json!({"doesExist": true, "message": "Retrieved successfully", "value": read}),
                    possible.contains(&Some(read.clone())),
                    Some(read),
                )
            }
            _ => {
                report.bad.push(format!("{what}: {status} {text}"));
                if let Some(written) = written {
                    possible.push(written);
                }
                continue;
            }
        };
        if body != expected {
            report.bad.push(format!("{what}: {status} {text}"));
        }
        if !consistent {
            report.violations.push(format!(
                "{what}: answered {status} {text}, but the key may only hold {possible:?}"
            ));
        }
        *possible = vec![now];
    }
    report
}

#[test]
fn no_write_is_lost_across_successive_view_changes_under_load() {
    let pool = common::fresh_addresses(5);
    let initial: Vec<String> = pool[..3].to_vec();
    let _nodes: Vec<TestNode> = pool
        .iter()
        .map(|a| TestNode::start(a, &initial, &["--fault-hooks"]))
        .collect();
    let client = Client::new();
    let view =
        |members: &[usize]| -> Vec<String> { members.iter().map(|&i| pool[i].clone()).collect() };
    // (receiving node, new view): grow, shrink, replace, all-new, grow to all, shrink.
    let plan: Vec<(usize, Vec<String>)> = vec![
        (3, view(&[0, 1, 2, 3])),
        (0, view(&[1, 2, 3])),
        (2, view(&[1, 3, 4])),
        (4, view(&[0, 2])),
        (1, view(&[0, 1, 2, 3, 4])),
        (0, view(&[4, 1])),
    ];

    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|id| {
            let (pool, stop, ops) = (pool.clone(), stop.clone(), ops.clone());
            std::thread::spawn(move || worker(id, seed + id as u64, pool, stop, ops))
        })
        .collect();
    let wait_for_traffic = |what: &str| {
        let target = ops.load(Ordering::Relaxed) + OPS_BETWEEN_CHANGES;
        poll_until(Duration::from_secs(10), what, || {
            (ops.load(Ordering::Relaxed) >= target).then_some(())
        });
    };

    wait_for_traffic("traffic before the first change");
    for (i, (receiver, members)) in plan.iter().enumerate() {
        let started = Instant::now();
        // Every other change is held at the start of its transfer while the clients go on,
        // so writes land between prepare and catch-up; the others run at full speed.
        let hold = i % 2 == 1;
        if hold {
            for node in &pool {
                client.set_fault(node, &json!({"pause_transfer": true}));
            }
        }
        let change = {
            let (receiver, view) = (pool[*receiver].clone(), members.join(","));
            std::thread::spawn(move || Client::new().view_change(&receiver, &view))
        };
        if hold {
            poll_until(Duration::from_secs(10), "a transfer held", || {
                members
                    .iter()
                    .any(|n| client.fault_status(n)["waiting_in_transfer"] == json!(true))
                    .then_some(())
            });
            wait_for_traffic("traffic while the transfer is held");
            for node in &pool {
                client.set_fault(node, &json!({"pause_transfer": false}));
            }
        }
        let answer = change.join().unwrap();
        eprintln!(
            "view change to {members:?} via {}: {} in {:?}",
            pool[*receiver],
            answer.status,
            started.elapsed()
        );
        assert_eq!(answer.status, 200, "view change to {members:?}: {answer:?}");
        let listed: Vec<&str> = answer.body["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["address"].as_str().unwrap())
            .collect();
        assert_eq!(
            listed,
            members.iter().map(String::as_str).collect::<Vec<_>>()
        );
        wait_for_traffic("traffic after a view change");
    }
    stop.store(true, Ordering::Relaxed);
    let reports: Vec<Report> = workers.into_iter().map(|w| w.join().unwrap()).collect();

    let bad: Vec<&String> = reports.iter().flat_map(|r| &r.bad).collect();
    let violations: Vec<&String> = reports.iter().flat_map(|r| &r.violations).collect();
    let unanswered: u64 = reports.iter().map(|r| r.unanswered).sum();
    eprintln!(
        "{} operations answered, {unanswered} unanswered",
        ops.load(Ordering::Relaxed)
    );
    assert!(bad.is_empty(), "{} bad answers: {bad:#?}", bad.len());
    assert!(
        violations.is_empty(),
        "{} answers contradict the history: {violations:#?}",
        violations.len()
    );

    // Read back every key through every node: one answer everywhere, and a possible one.
    let final_view = &plan.last().unwrap().1;
    let mut present = 0;
    for (key, possible) in reports.iter().flat_map(|r| &r.model) {
        let mut seen = None;
        for node in &pool {
            let answer = client.get_key(node, key);
            let mut body = answer.body.clone();
            strip_address(&mut body, &pool).unwrap();
            let held = match answer.status {
                200 => Some(body["value"].clone()),
                404 => None,
                _ => panic!("GET {key} via {node}: {answer:?}"),
            };
            match &seen {
                None => seen = Some(held),
                Some(first) => assert_eq!(*first, held, "{key}: nodes disagree"),
            }
        }
        let held = seen.unwrap();
        assert!(
            possible.contains(&held),
            "{key} holds {held:?}, but its history allows only {possible:?}"
        );
        present += usize::from(held.is_some());
    }
    let counts: u64 = final_view.iter().map(|n| client.key_count(n)).sum();
    assert_eq!(counts, present as u64, "key-counts over the final view");
    for node in pool.iter().filter(|n| !final_view.contains(n)) {
        assert_eq!(client.key_count(node), 0, "{node} is not in the final view");
    }
    assert_states(&client, final_view, plan.len() as u64, final_view);
}

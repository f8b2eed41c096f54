//! Test harness: starts real `ringkv` processes on distinct loopback addresses, waits until
//! they answer, talks HTTP to them, and kills every node it started (also on failure).
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The port every test node listens on; nodes differ by loopback IP, as in the course.
pub const PORT: u16 = 13800;

static NEXT_ADDRESS: AtomicU32 = AtomicU32::new(0);

/// A loopback address (`127.a.b.c:13800`) no other running test uses.
pub fn fresh_address() -> String {
    let base = std::process::id() % 200 + 20;
    loop {
        let n = NEXT_ADDRESS.fetch_add(1, Ordering::SeqCst);
        let ip = format!("127.{base}.{}.{}", n / 250 % 250, n % 250 + 1);
        let address = format!("{ip}:{PORT}");
        if TcpListener::bind(&address).is_ok() {
            return address;
        }
    }
}

/// `n` fresh addresses.
pub fn fresh_addresses(n: usize) -> Vec<String> {
    (0..n).map(|_| fresh_address()).collect()
}

/// One `ringkv` process; killed when dropped.
pub struct TestNode {
    pub address: String,
    child: Option<Child>,
    pub log: std::path::PathBuf,
}

impl TestNode {
    /// Starts a node at `address` with `view` and extra flags, and waits until it serves.
    pub fn start(address: &str, view: &[String], extra: &[&str]) -> TestNode {
        let node = TestNode::spawn(address, view, extra);
        node.wait_until_serving();
        node
    }

    /// Starts a node at `address` with `view` and extra flags, and returns at once: the
    /// process may not be listening yet.
    pub fn spawn(address: &str, view: &[String], extra: &[&str]) -> TestNode {
        let (ip, port) = address.rsplit_once(':').unwrap();
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("node-{}.log", address.replace([':', '.'], "_")));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringkv"));
        command
            .args(["--ip", ip, "--port", port, "--address", address])
            .args(extra)
            .env_remove("ADDRESS")
            .env_remove("VIEW")
            .env_remove("FORWARDING_ADDRESS")
            .env_remove("CLUSTER_TOKEN")
            .env_remove("REPL_FACTOR")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        if !view.is_empty() {
            command.args(["--view", &view.join(",")]);
        }
        let child = command.spawn().expect("ringkv starts");
        TestNode {
            address: address.to_string(),
            child: Some(child),
            log,
        }
    }

    fn wait_until_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = reqwest::blocking::Client::new();
        while Instant::now() < deadline {
            let answer = client
                .get(format!("http://{}/kvs/key-count", self.address))
                .timeout(Duration::from_millis(500))
                .send();
            if answer.is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "node {} did not start; log: {}",
            self.address,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Kills the process now (as a crash would) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends the signal `name` (`STOP`, `CONT`, ...) to the running node.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("the node is running");
        let status = Command::new("kill")
            .args([format!("-{name}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
        // kill(2) returns once the signal is queued; a thread running on another CPU stops
        // a little later. Wait until every thread of the node shows the state the signal
        // gives, so the test's next request never meets a node still running.
        let pid = child.id();
        let wanted = match name {
            "STOP" => Some(true),
            "CONT" => Some(false),
            _ => None,
        };
        if let Some(stopped) = wanted {
            poll_until(
                Duration::from_secs(5),
                &format!("node {pid} to take SIG{name}"),
                || (threads_stopped(pid) == Some(stopped)).then_some(()),
            );
        }
    }

    /// Sends SIGTERM and returns the process's exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().ok()
    }

    /// Waits for the process to exit by itself (e.g. a fault hook) within `limit`.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().ok()? {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The process's resident set size, in bytes (from /proc).
    pub fn rss_bytes(&self) -> u64 {
        let child = self.child.as_ref().expect("the node is running");
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }

    /// Whether the node's log so far contains `text`.
    pub fn log_contains(&self, text: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|log| log.contains(text))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // The test failed: its output (shown by the test runner) ends with what each of
            // its nodes logged last, so a failure on a CI machine can be read afterwards.
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("openraft")).collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last lines of node {} ---\n{}",
                self.address,
                tail.join("\n")
            );
        }
    }
}

/// Whether every thread of process `pid` is stopped (`Some(false)` when any runs; `None`
/// when the process is gone).
fn threads_stopped(pid: u32) -> Option<bool> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut all = true;
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // The state follows the command name, which is in parentheses.
        let state = stat.rsplit_once(") ")?.1.chars().next()?;
        all &= state == 'T' || state == 't';
    }
    Some(all)
}

/// Nodes started together with one initial view.
pub struct Cluster {
    pub nodes: Vec<TestNode>,
}

impl Cluster {
    /// `n` nodes, all started with the view of all `n`.
    pub fn start(n: usize, extra: &[&str]) -> Cluster {
        let addresses = fresh_addresses(n);
        let nodes = addresses
            .iter()
            .map(|a| TestNode::start(a, &addresses, extra))
            .collect();
        Cluster { nodes }
    }

    /// Starts one more node at a fresh address with `view` and `extra` flags; its address.
    pub fn add_node(&mut self, view: &[String], extra: &[&str]) -> String {
        let address = fresh_address();
        self.nodes.push(TestNode::start(&address, view, extra));
        address
    }

    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.address.clone()).collect()
    }

    pub fn view(&self) -> String {
        self.addresses().join(",")
    }
}

/// An HTTP answer: status and parsed JSON body (every ringkv answer is JSON).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// A blocking HTTP client for tests.
pub struct Client {
    http: reqwest::blocking::Client,
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

/// A connection pool that never reuses a connection idle for a second or more: a node
/// closes idle connections after its header timeout, and one resumed from SIGSTOP does so
/// at once, while the test already sends its next request on them.
fn http_client(timeout: Duration) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

impl Client {
    pub fn new() -> Client {
        Client {
            http: http_client(Duration::from_secs(30)),
        }
    }

    /// Sends `method url` with an optional raw body; panics if the answer is not JSON.
    pub fn send(&self, method: &str, url: &str, body: Option<&str>) -> Answer {
        let raw = self
            .try_send(method, url, body)
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let body = raw.json().unwrap_or_else(|| {
            panic!(
                "{method} {url} answered {} with non-JSON {:?}",
                raw.status, raw.text
            )
        });
        Answer {
            status: raw.status,
            body,
        }
    }

    pub fn get(&self, url: &str) -> Answer {
        self.send("GET", url, None)
    }

    pub fn put(&self, url: &str, body: &Value) -> Answer {
        self.send("PUT", url, Some(&body.to_string()))
    }

    pub fn delete(&self, url: &str) -> Answer {
        self.send("DELETE", url, None)
    }

    /// `PUT /kvs/keys/<key>` with `{"value": value}` through `node`.
    pub fn put_key(&self, node: &str, key: &str, value: &Value) -> Answer {
        self.put(
            &format!("http://{node}/kvs/keys/{key}"),
            &serde_json::json!({ "value": value }),
        )
    }

    pub fn get_key(&self, node: &str, key: &str) -> Answer {
        self.get(&format!("http://{node}/kvs/keys/{key}"))
    }

    pub fn delete_key(&self, node: &str, key: &str) -> Answer {
        self.delete(&format!("http://{node}/kvs/keys/{key}"))
    }

    pub fn key_count(&self, node: &str) -> u64 {
        self.get(&format!("http://{node}/kvs/key-count")).body["key-count"]
            .as_u64()
            .unwrap()
    }

    pub fn view_change(&self, node: &str, view: &str) -> Answer {
        self.put(
            &format!("http://{node}/kvs/view-change"),
            &serde_json::json!({ "view": view }),
        )
    }

    /// `GET /cluster/state` of a node (epoch, view, pending change).
    pub fn state(&self, node: &str) -> Value {
        self.get(&format!("http://{node}/cluster/state")).body
    }
}

/// Polls `check` every 20 ms until it yields a value; panics naming `what` after `limit`.
pub fn poll_until<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "still waiting after {limit:?} for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw HTTP answer: status and body text, not yet parsed.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    pub text: String,
}

impl RawAnswer {
    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.text).ok()
    }
}

impl Client {
    /// A client that sends the cluster token on every request, as nodes do to each other.
    pub fn with_token(token: &str) -> Client {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-ringkv-token", token.parse().unwrap());
        Client {
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .default_headers(headers)
                .build()
                .unwrap(),
        }
    }

    /// A client whose requests give up after `timeout`.
    pub fn with_timeout(timeout: Duration) -> Client {
        Client {
            http: http_client(timeout),
        }
    }

    /// Sends `method url` with an optional raw body; `Err` when no complete answer came back.
    pub fn try_send(
        &self,
        method: &str,
        url: &str,
        body: Option<&str>,
    ) -> Result<RawAnswer, reqwest::Error> {
        let mut request = self
            .http
            .request(method.parse().unwrap(), url)
            .header("content-type", "application/json");
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request.send()?;
        let status = response.status().as_u16();
        let text = response.text()?;
        Ok(RawAnswer { status, text })
    }

    /// `PUT /internal/fault` with `settings` (the node must run with `--fault-hooks`).
    pub fn set_fault(&self, node: &str, settings: &Value) {
        let answer = self.put(&format!("http://{node}/internal/fault"), settings);
        assert_eq!(answer.status, 200, "setting faults on {node}: {answer:?}");
    }

    /// `GET /internal/fault`: `{"enabled":..,"waiting_in_transfer":..}`.
    pub fn fault_status(&self, node: &str) -> Value {
        self.get(&format!("http://{node}/internal/fault")).body
    }
}

// ---------------------------------------------------------------------------------------
// Checks shared by the view-change tests.

/// `n` keys `<prefix>0..`, each with a distinct JSON value of a varying shape.
pub fn sample_data(prefix: &str, n: usize) -> std::collections::BTreeMap<String, Value> {
    (0..n)
        .map(|i| {
            let value = match i % 3 {
                0 => serde_json::json!(i),
                1 => serde_json::json!(format!("{prefix}-value-{i}")),
                _ => serde_json::json!({"n": i, "list": [i, "x"]}),
            };
            (format!("{prefix}{i}"), value)
        })
        .collect()
}

/// Writes every entry of `data` through the nodes of `through`, in turn; each must be new.
pub fn load(client: &Client, through: &[String], data: &std::collections::BTreeMap<String, Value>) {
    for (i, (key, value)) in data.iter().enumerate() {
        let answer = client.put_key(&through[i % through.len()], key, value);
        assert_eq!(answer.status, 201, "PUT {key}: {answer:?}");
    }
}

/// Asserts a successful view change answer exactly: the message, and one shard per node
/// of `view` in its order whose key-count is that node's key-count. Returns the counts.
pub fn assert_view_change_ok(client: &Client, answer: &Answer, view: &[String]) -> Vec<u64> {
    assert_eq!(answer.status, 200, "view change to {view:?}: {answer:?}");
    let shards: Vec<Value> = view
        .iter()
        .map(|node| serde_json::json!({"address": node, "key-count": client.key_count(node)}))
        .collect();
    assert_eq!(
        answer.body,
        serde_json::json!({"message": "View change successful", "shards": shards}),
        "view change answer vs the nodes' key-counts"
    );
    shards
        .iter()
        .map(|s| s["key-count"].as_u64().unwrap())
        .collect()
}

/// Asserts that each of `nodes` serves `view` (as a set) at `epoch` with no pending change.
pub fn assert_states(client: &Client, nodes: &[String], epoch: u64, view: &[String]) {
    let mut expected: Vec<&str> = view.iter().map(String::as_str).collect();
    expected.sort_unstable();
    for node in nodes {
        let state = client.state(node);
        let mut members: Vec<&str> = state["view"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        members.sort_unstable();
        assert_eq!(
            (state["epoch"].as_u64(), &members, &state["pending"]),
            (Some(epoch), &expected, &Value::Null),
            "state of {node}: {state}"
        );
    }
}

/// The epoch a node reports.
pub fn epoch_of(client: &Client, node: &str) -> u64 {
    client.state(node)["epoch"].as_u64().unwrap()
}

/// Asserts that every key of `data` reads back its exact value through every node of
/// `through`: served without `address` by exactly one node, a member of `view`, and with
/// that owner's `address` by every other node. Returns each key's owner.
pub fn assert_contents(
    client: &Client,
    through: &[String],
    view: &[String],
    data: &std::collections::BTreeMap<String, Value>,
) -> std::collections::BTreeMap<String, String> {
    let mut owners = std::collections::BTreeMap::new();
    for (key, value) in data {
        let mut local = Vec::new();
        let mut named = Vec::new();
        for node in through {
            let answer = client.get_key(node, key);
            let mut body = answer.body.clone();
            let address = body.as_object_mut().unwrap().remove("address");
            assert_eq!(
                (answer.status, body),
                (
                    200,
                    serde_json::json!({
                        "doesExist": true,
                        "message": "Retrieved successfully",
                        "value": value,
                    })
                ),
                "GET {key} via {node}: {answer:?}"
            );
            match address {
                None => local.push(node.clone()),
                Some(owner) => named.push(owner.as_str().unwrap().to_string()),
            }
        }
        let owner = match (local.as_slice(), named.first()) {
            ([owner], _) => owner.clone(),
            ([], Some(owner)) => owner.clone(),
            _ => panic!("{key}: served locally by {local:?}"),
        };
        assert!(
            !local.is_empty() || !through.contains(&owner),
            "{key}: its owner {owner} forwards it instead of serving it"
        );
        assert!(
            view.contains(&owner),
            "{key}: owner {owner} not in {view:?}"
        );
        assert!(
            named.iter().all(|n| *n == owner),
            "{key}: owner {owner}, but answers named {named:?}"
        );
        owners.insert(key.clone(), owner);
    }
    owners
}

/// Asserts that the last view change `coordinator` ran shipped, in its bulk transfer,
/// exactly the keys whose owner changed between `before` and `after` (owners as observed
/// through the API), and re-sent none (nobody wrote during the change).
pub fn assert_shipped_exactly_the_moved_keys(
    client: &Client,
    coordinator: &str,
    before: &std::collections::BTreeMap<String, String>,
    after: &std::collections::BTreeMap<String, String>,
) {
    let moved = before
        .iter()
        .filter(|(key, owner)| after.get(*key) != Some(*owner))
        .count() as u64;
    let status = client
        .get(&format!("http://{coordinator}/cluster/status"))
        .body;
    let report = &status["last_change"];
    assert_eq!(report["keys_shipped"].as_u64(), Some(moved), "{report}");
    assert_eq!(report["keys_caught_up"].as_u64(), Some(0), "{report}");
}

/// Asserts that every key of `keys` is absent through every node of `through` (404 exactly).
pub fn assert_absent<'a>(
    client: &Client,
    through: &[String],
    keys: impl IntoIterator<Item = &'a String>,
) {
    for key in keys {
        for node in through {
            let answer = client.get_key(node, key);
            let mut body = answer.body.clone();
            body.as_object_mut().unwrap().remove("address");
            assert_eq!(
                (answer.status, body),
                (
                    404,
                    serde_json::json!({
                        "doesExist": false,
                        "error": "Key does not exist",
                        "message": "Error in GET",
                    })
                ),
                "GET {key} via {node}: {answer:?}"
            );
        }
    }
}

/// The value of the metric `name` (no labels) on `node`.
pub fn gauge(client: &Client, node: &str, name: &str) -> f64 {
    let answer = client
        .try_send("GET", &format!("http://{node}/metrics"), None)
        .expect("/metrics answers");
    answer
        .text
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics of {node}"))
}

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
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        if !view.is_empty() {
            command.args(["--view", &view.join(",")]);
        }
        let child = command.spawn().expect("ringkv starts");
        let node = TestNode {
            address: address.to_string(),
            child: Some(child),
            log,
        };
        node.wait_until_serving();
        node
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

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
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

impl Client {
    pub fn new() -> Client {
        Client {
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    /// Sends `method url` with an optional raw body; panics if the answer is not JSON.
    pub fn send(&self, method: &str, url: &str, body: Option<&str>) -> Answer {
        let mut request = self
            .http
            .request(method.parse().unwrap(), url)
            .header("content-type", "application/json");
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        let response = request
            .send()
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {url} answered {status} with non-JSON {text:?}"));
        Answer { status, body }
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

    /// `GET /internal/state` of a node (epoch, view, pending change).
    pub fn state(&self, node: &str) -> Value {
        self.get(&format!("http://{node}/internal/state")).body
    }
}

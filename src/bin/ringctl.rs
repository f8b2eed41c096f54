//! `ringctl`: the operator's command line for a ringkv cluster, in the spirit of
//! `nodetool`. `status` prints every node of the view (up/down, keys, share of the ring),
//! `get`/`put`/`delete` talk to the course API, `view-change` runs a view change and shows
//! its progress, and `ring` renders a ring or a change without any cluster.
//!
//! Exit codes: 0 done, 1 the request failed (a non-2xx answer, or no answer), 2 usage.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use ringkv::api::ops::ClusterStatus;
use ringkv::node::Standing;
use ringkv::ring::DEFAULT_VNODES;
use ringkv::view::parse_members;
use ringkv::viz::{self, VizError};

#[derive(Parser)]
#[command(name = "ringctl", version, about = "Operate a ringkv cluster")]
struct Cli {
    /// Seconds to wait for a node's answer (a view change waits as long as it runs).
    #[arg(long, global = true, default_value_t = 10.0)]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct NodeArg {
    /// Any node of the cluster (ip:port).
    #[arg(long, short = 'n', env = "RINGCTL_NODE")]
    node: String,
}

#[derive(Subcommand)]
enum Command {
    /// Every node of the view: up or down, keys, share of the ring; and the last change.
    Status {
        #[command(flatten)]
        node: NodeArg,
        /// Print the node's /cluster/status answer as it is.
        #[arg(long)]
        json: bool,
    },
    /// GET a key; prints the JSON answer.
    Get {
        key: String,
        #[command(flatten)]
        node: NodeArg,
    },
    /// PUT a key; VALUE is JSON text, or taken as a string when it is not valid JSON.
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        node: NodeArg,
    },
    /// DELETE a key; prints the JSON answer.
    Delete {
        key: String,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Change the view to VIEW (comma-separated ip:port), showing progress while it runs.
    ViewChange {
        view: String,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Render the ring of a view, or what a change to another view moves (no cluster needed).
    #[command(after_help = viz::SECTIONS)]
    Ring {
        /// The view: comma-separated ip:port.
        #[arg(long)]
        view: String,
        /// A new view: show what a change to it moves.
        #[arg(long)]
        to: Option<String>,
        /// Tokens per node.
        #[arg(long, default_value_t = DEFAULT_VNODES)]
        vnodes: u32,
        /// Also place K synthetic keys "key0".."key{K-1}" and count those that move.
        #[arg(long, value_name = "K", default_value_t = 0)]
        keys: usize,
    },
}

/// Why a command failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach {node}: {cause}")]
    Unreachable { node: String, cause: String },
    /// A non-2xx answer; its body has been printed already.
    #[error("{node} answered {status}")]
    Refused { node: String, status: StatusCode },
    #[error("{node} sent an answer that could not be read: {cause}")]
    BadAnswer { node: String, cause: String },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl CtlError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CtlError::Usage(_) => ExitCode::from(2),
            _ => ExitCode::from(1),
        }
    }
}

/// An answer: its status and body text.
struct Answer {
    status: StatusCode,
    text: String,
}

struct Ctl {
    http: reqwest::Client,
    timeout: Duration,
}

impl Ctl {
    fn new(timeout: Duration) -> Result<Ctl, CtlError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| CtlError::Usage(format!("cannot build an HTTP client: {e}")))?;
        Ok(Ctl { http, timeout })
    }

    /// Sends one request; `timeout` `None` waits as long as the node takes.
    async fn send(
        &self,
        method: Method,
        node: &str,
        path: &str,
        body: Option<Value>,
        timeout: Option<Duration>,
    ) -> Result<Answer, CtlError> {
        let mut request = self.http.request(method, format!("http://{node}{path}"));
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let unreachable = |e: reqwest::Error| CtlError::Unreachable {
            node: node.to_string(),
            cause: e.to_string(),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        Ok(Answer { status, text })
    }

    async fn cluster_status(&self, node: &str) -> Result<ClusterStatus, CtlError> {
        let answer = self
            .send(
                Method::GET,
                node,
                "/cluster/status",
                None,
                Some(self.timeout),
            )
            .await?;
        if !answer.status.is_success() {
            return Err(CtlError::Refused {
                node: node.to_string(),
                status: answer.status,
            });
        }
        parse_status(node, &answer)
    }
}

/// A `/cluster/status` answer, typed.
fn parse_status(node: &str, answer: &Answer) -> Result<ClusterStatus, CtlError> {
    serde_json::from_str(&answer.text).map_err(|e| CtlError::BadAnswer {
        node: node.to_string(),
        cause: e.to_string(),
    })
}

/// The URL path of `key`. `.` and `..` cannot be sent: every URL parser removes them as
/// dot segments, encoded or not.
fn key_path(key: &str) -> Result<String, CtlError> {
    if key == "." || key == ".." {
        return Err(CtlError::Usage(format!(
            "the key '{key}' cannot be sent in a URL path"
        )));
    }
    Ok(format!(
        "/kvs/keys/{}",
        utf8_percent_encode(key, NON_ALPHANUMERIC)
    ))
}

/// A PUT value: JSON text as it is, anything else as a JSON string.
fn value_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn bytes_text(bytes: usize) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// "1 node", "3 nodes".
fn nodes(count: usize) -> String {
    match count {
        1 => "1 node".to_string(),
        n => format!("{n} nodes"),
    }
}

/// The `status` table, like `nodetool status`.
fn status_table(status: &ClusterStatus) -> String {
    let mut out = format!(
        "View at epoch {} ({}, {} vnodes per node), as seen by {}\n\n",
        status.epoch,
        nodes(status.view.len()),
        status.vnodes,
        status.address
    );
    if let Some(standing) = status.standing.filter(|s| *s != Standing::InForce) {
        out += &format!(
            "{} does not know the view in force yet ({standing:?}): key requests wait or get 503\n\n",
            status.address
        );
    }
    let width = status
        .nodes
        .iter()
        .map(|n| n.address.len())
        .max()
        .unwrap_or(0)
        .max(7);
    // The replicated mode: each node's shard and its lag (writes its mates applied that
    // it has not received yet); a node owns its shard's share.
    let replicated = status.nodes.iter().any(|n| n.shard.is_some());
    let columns = |shard: &str, lag: &str| match replicated {
        true => format!("  {shard:>5}  {lag:>6}"),
        false => String::new(),
    };
    out += &format!(
        "{:<width$}  {:<5}  {:>5}  {:>10}  {:>8}{}\n",
        "Address",
        "State",
        "Epoch",
        "Keys",
        "Owns",
        columns("Shard", "Lag")
    );
    for node in &status.nodes {
        let dash = || "-".to_string();
        let mut line = format!(
            "{:<width$}  {:<5}  {:>5}  {:>10}  {:>7.2}%{}",
            node.address,
            if node.reachable { "Up" } else { "Down" },
            node.epoch.map_or_else(dash, |e| e.to_string()),
            node.key_count.map_or_else(dash, |k| k.to_string()),
            node.ownership * 100.0,
            columns(
                node.shard.as_deref().unwrap_or("-"),
                &node.lag.map_or_else(dash, |l| l.to_string())
            )
        );
        if node.pending {
            line += "  (view change pending)";
        }
        if let Some(error) = &node.error {
            line += &format!("  ({error})");
        }
        out += line.trim_end();
        out += "\n";
    }
    // Every replica of a shard owns the shard's share: count each shard once.
    let mut shards: Vec<&str> = status
        .nodes
        .iter()
        .filter_map(|n| n.shard.as_deref())
        .collect();
    shards.sort_unstable();
    shards.dedup();
    let copies = match shards.len() {
        0 => 1.0,
        n => status.nodes.len() as f64 / n as f64,
    };
    let owned: f64 = status.nodes.iter().map(|n| n.ownership).sum::<f64>() / copies;
    out += &format!(
        "{:<width$}  {:<5}  {:>5}  {:>10}  {:>7.2}%\n",
        "Total",
        format!("{}/{}", status.reachable, status.nodes.len()),
        "",
        status.key_count,
        owned * 100.0
    );
    if let Some(change) = &status.change {
        out += &format!(
            "\nView change {:016x} to epoch {} in progress (coordinator {}): {}\n",
            change.change_id,
            change.epoch,
            change.coordinator,
            change.view.join(",")
        );
    }
    if let Some(last) = &status.last_change {
        out += &format!(
            "\nLast view change coordinated by {}: to epoch {} ({}) in {} ms; \
             {} ranges moved, {} keys ({}) shipped, {} caught up\n",
            status.address,
            last.epoch,
            nodes(last.view.len()),
            last.millis,
            last.moved_ranges,
            last.keys_shipped,
            bytes_text(last.bytes_shipped),
            last.keys_caught_up
        );
    }
    out
}

/// Prints a key answer as it came and fails on a non-2xx status.
fn print_answer(node: &str, answer: Answer) -> Result<(), CtlError> {
    println!("{}", answer.text);
    if answer.status.is_success() {
        Ok(())
    } else {
        Err(CtlError::Refused {
            node: node.to_string(),
            status: answer.status,
        })
    }
}

/// Where a running view change stands, from the coordinator's status; `start` is the epoch
/// in force when the change was asked for.
fn progress(status: &ClusterStatus, start: Option<u64>) -> String {
    let pending = status.nodes.iter().filter(|n| n.pending).count();
    let down = status.nodes.iter().filter(|n| !n.reachable).count();
    let nodes = status.nodes.len();
    let committed = start.is_some_and(|start| status.epoch > start);
    let mut line = match &status.change {
        Some(change) => format!(
            "epoch {} -> {} under way: prepared on {pending} of {nodes} nodes of the old view",
            status.epoch, change.epoch
        ),
        None if committed => format!(
            "epoch {} in force: committing, {pending} of {nodes} nodes still switching",
            status.epoch
        ),
        None if pending > 0 => format!(
            "epoch {}: {pending} of {nodes} nodes have a change prepared",
            status.epoch
        ),
        None => format!("epoch {}: checking the nodes", status.epoch),
    };
    if down > 0 {
        line += &format!(", {down} not answering");
    }
    line
}

/// The `view-change` result: the shards table, or the failure and whom it could not reach.
fn view_change_result(node: &str, answer: Answer) -> Result<(), CtlError> {
    let body: Value = serde_json::from_str(&answer.text).unwrap_or(Value::Null);
    if !answer.status.is_success() {
        println!(
            "View change failed ({}): {}",
            answer.status,
            body["error"].as_str().unwrap_or(&answer.text)
        );
        if let Some(detail) = body["detail"].as_str() {
            println!("  {detail}");
        }
        if let Some(unreachable) = body["unreachable"].as_array() {
            if !unreachable.is_empty() {
                println!("Unreachable:");
                for peer in unreachable {
                    println!("  {}", peer.as_str().unwrap_or_default());
                }
            }
        }
        return Err(CtlError::Refused {
            node: node.to_string(),
            status: answer.status,
        });
    }
    let shards = body["shards"].as_array().cloned().unwrap_or_default();
    let width = shards
        .iter()
        .filter_map(|s| s["address"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(0)
        .max(7);
    println!(
        "{} ({})\n",
        body["message"].as_str().unwrap_or("View change successful"),
        nodes(shards.len())
    );
    println!("{:<width$}  {:>10}", "Address", "Keys");
    let mut total = 0;
    for shard in &shards {
        let keys = shard["key-count"].as_u64().unwrap_or(0);
        total += keys;
        println!(
            "{:<width$}  {keys:>10}",
            shard["address"].as_str().unwrap_or("?")
        );
    }
    println!("{:<width$}  {total:>10}", "Total");
    Ok(())
}

async fn view_change(ctl: &Ctl, node: &str, view: &str) -> Result<(), CtlError> {
    let members = parse_members(view).map_err(|e| CtlError::Usage(format!("VIEW: {e}")))?;
    let body = serde_json::json!({ "view": members.join(",") });
    let start = ctl.cluster_status(node).await.ok().map(|s| s.epoch);
    let started = Instant::now();
    let mut change =
        std::pin::pin!(ctl.send(Method::PUT, node, "/kvs/view-change", Some(body), None));
    let mut last_state = String::new();
    let mut last_print = started;
    let answer = loop {
        tokio::select! {
            answer = &mut change => break answer?,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        // The status call is bounded, so a slow one never holds up the change's answer.
        let state = match tokio::time::timeout(ctl.timeout, ctl.cluster_status(node)).await {
            Ok(Ok(status)) => progress(&status, start),
            _ => format!("waiting for {node}"),
        };
        if state != last_state || last_print.elapsed() >= Duration::from_secs(2) {
            eprintln!("[{:6.1}s] {state}", started.elapsed().as_secs_f64());
            last_print = Instant::now();
        }
        last_state = state;
    };
    eprintln!(
        "[{:6.1}s] answered {}",
        started.elapsed().as_secs_f64(),
        answer.status
    );
    view_change_result(node, answer)
}

fn ring(view: &str, to: Option<&str>, vnodes: u32, keys: usize) -> Result<(), CtlError> {
    let old = parse_members(view).map_err(|e| CtlError::Usage(format!("--view: {e}")))?;
    let new = to
        .map(parse_members)
        .transpose()
        .map_err(|e| CtlError::Usage(format!("--to: {e}")))?;
    let text = viz::render(&old, new.as_deref(), vnodes, keys).map_err(|e| match e {
        VizError::Old(e) => CtlError::Usage(format!("--view: {e}")),
        VizError::New(e) => CtlError::Usage(format!("--to: {e}")),
        other => CtlError::Usage(other.to_string()),
    })?;
    Ok(viz::print_text(&text)?)
}

async fn run(cli: Cli) -> Result<(), CtlError> {
    let timeout = Duration::try_from_secs_f64(cli.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| CtlError::Usage("--timeout must be a positive number of seconds".into()))?;
    let ctl = Ctl::new(timeout)?;
    let within = Some(timeout);
    match cli.command {
        Command::Status { node, json } => {
            let answer = ctl
                .send(Method::GET, &node.node, "/cluster/status", None, within)
                .await?;
            if json || !answer.status.is_success() {
                return print_answer(&node.node, answer);
            }
            Ok(viz::print_text(&status_table(&parse_status(
                &node.node, &answer,
            )?))?)
        }
        Command::Get { key, node } => {
            let answer = ctl
                .send(Method::GET, &node.node, &key_path(&key)?, None, within)
                .await?;
            print_answer(&node.node, answer)
        }
        Command::Put { key, value, node } => {
            let body = serde_json::json!({ "value": value_of(&value) });
            let answer = ctl
                .send(
                    Method::PUT,
                    &node.node,
                    &key_path(&key)?,
                    Some(body),
                    within,
                )
                .await?;
            print_answer(&node.node, answer)
        }
        Command::Delete { key, node } => {
            let answer = ctl
                .send(Method::DELETE, &node.node, &key_path(&key)?, None, within)
                .await?;
            print_answer(&node.node, answer)
        }
        Command::ViewChange { view, node } => view_change(&ctl, &node.node, &view).await,
        Command::Ring {
            view,
            to,
            vnodes,
            keys,
        } => ring(&view, to.as_deref(), vnodes, keys),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ringctl: {error}");
            error.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_json_or_strings() {
        assert_eq!(value_of("42"), serde_json::json!(42));
        assert_eq!(value_of(r#"{"a":[1]}"#), serde_json::json!({"a": [1]}));
        assert_eq!(value_of("hello"), serde_json::json!("hello"));
        assert_eq!(value_of(r#""quoted""#), serde_json::json!("quoted"));
    }

    #[test]
    fn keys_are_one_path_segment() {
        assert_eq!(key_path("a/b").unwrap(), "/kvs/keys/a%2Fb");
        assert!(matches!(key_path(".."), Err(CtlError::Usage(_))));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes_text(512), "512 B");
        assert_eq!(bytes_text(1536), "1.5 KiB");
        assert_eq!(bytes_text(3 << 20), "3.0 MiB");
    }
}

//! `ringkv-load`: a load generator in the spirit of redis-benchmark. `run` drives one or more
//! nodes with GET, PUT or mixed traffic and prints throughput and latency percentiles;
//! `ceiling` serves a constant JSON body from a bare warp server, so the same load shows
//! what this machine's HTTP stack can do at best.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use warp::Filter;

#[derive(Parser)]
#[command(
    name = "ringkv-load",
    about = "Load generator and HTTP-ceiling server for ringkv"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stack {
    Warp,
    Hyper,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Op {
    Get,
    Put,
    Mixed,
}

#[derive(Subcommand)]
enum Command {
    /// Drive nodes with requests and print req/s and latency percentiles.
    Run {
        /// Nodes to send requests to (ip:port, comma-separated), round-robin per connection.
        #[arg(long, default_value = "127.0.0.1:13800", value_delimiter = ',')]
        target: Vec<String>,
        /// Concurrent connections.
        #[arg(short, long, default_value_t = 32)]
        connections: usize,
        /// Seconds to run (ignored when --requests is given).
        #[arg(short, long, default_value_t = 10.0)]
        duration: f64,
        /// Total requests to send instead of running for a duration.
        #[arg(short = 'n', long)]
        requests: Option<u64>,
        /// get, put or mixed (90% get, 10% put).
        #[arg(long, value_enum, default_value = "get")]
        op: Op,
        /// Number of distinct keys (key0 .. keyN-1).
        #[arg(short, long, default_value_t = 10_000)]
        keys: u64,
        /// Value size in bytes (a JSON string of that many characters).
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Write every key once before measuring (so GETs hit).
        #[arg(long)]
        preload: bool,
        /// Delete every key once after measuring (as many connections).
        #[arg(long)]
        unload: bool,
        /// Use /kvs/<key> instead of /kvs/keys/<key> (or a fixed path for the ceiling).
        #[arg(long)]
        path_prefix: Option<String>,
    },
    /// Serve a constant JSON body on every path from a bare warp (or hyper) server.
    Ceiling {
        #[arg(long, default_value = "127.0.0.1:13899")]
        listen: SocketAddr,
        /// warp: a one-filter warp server; hyper: hyper's HTTP/1 connection and a service
        /// function, the stack a ringkv node serves on.
        #[arg(long, value_enum, default_value = "warp")]
        stack: Stack,
    },
}

const CEILING_BODY: &str =
    r#"{"doesExist":true,"message":"Retrieved successfully","value":"constant"}"#;

/// Serves [`CEILING_BODY`] over hyper's HTTP/1 connection, one task per connection.
async fn hyper_ceiling(listen: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("bare hyper ceiling server on {listen}");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request| async {
                let mut response = hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(CEILING_BODY.as_bytes()),
                ));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                Ok::<_, std::convert::Infallible>(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Command::Ceiling {
            listen,
            stack: Stack::Warp,
        } => {
            let route = warp::any()
                .map(|| warp::reply::with_header(CEILING_BODY, "content-type", "application/json"));
            println!("bare warp ceiling server on {listen}");
            warp::serve(route).run(listen).await;
        }
        Command::Ceiling {
            listen,
            stack: Stack::Hyper,
        } => {
            if let Err(error) = hyper_ceiling(listen).await {
                eprintln!("ringkv-load: {error}");
                std::process::exit(1);
            }
        }
        Command::Run {
            target,
            connections,
            duration,
            requests,
            op,
            keys,
            value_size,
            preload,
            unload,
            path_prefix,
        } => {
            let load = Load {
                targets: target,
                op,
                keys: keys.max(1),
                body: format!(r#"{{"value":"{}"}}"#, "x".repeat(value_size)),
                prefix: path_prefix.unwrap_or_else(|| "/kvs/keys/".into()),
            };
            if preload {
                load.every_key(connections, false).await;
            }
            let limit = match requests {
                Some(n) => Limit::Requests(n),
                None => Limit::Until(Instant::now() + Duration::from_secs_f64(duration)),
            };
            let report = load.run(connections, limit).await;
            report.print(&load, connections);
            if unload {
                load.every_key(connections, true).await;
            }
        }
    }
}

struct Load {
    targets: Vec<String>,
    op: Op,
    keys: u64,
    body: String,
    prefix: String,
}

#[derive(Clone, Copy)]
enum Limit {
    Requests(u64),
    Until(Instant),
}

struct Report {
    elapsed: Duration,
    latencies_us: Vec<u32>,
    errors: u64,
    statuses: [u64; 6],
}

/// A tiny xorshift generator: no shared state between connections, no dependency.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

impl Load {
    fn url(&self, connection: usize, key: u64) -> String {
        let target = &self.targets[connection % self.targets.len()];
        format!("http://{target}{}key{key}", self.prefix)
    }

    /// Writes (or deletes) every key once.
    async fn every_key(&self, connections: usize, delete: bool) {
        let client = reqwest::Client::new();
        let next = AtomicU64::new(0);
        let workers = (0..connections).map(|c| {
            let (client, next) = (&client, &next);
            async move {
                loop {
                    let key = next.fetch_add(1, Ordering::Relaxed);
                    if key >= self.keys {
                        break;
                    }
                    let request = match delete {
                        true => client.delete(self.url(c, key)),
                        false => client
                            .put(self.url(c, key))
                            .header("content-type", "application/json")
                            .body(self.body.clone()),
                    };
                    let _ = request.send().await;
                }
            }
        });
        futures_util::future::join_all(workers).await;
    }

    async fn run(&self, connections: usize, limit: Limit) -> Report {
        let sent = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let workers = (0..connections).map(|c| {
            let sent = sent.clone();
            async move {
                // One client per connection keeps exactly one keep-alive connection each.
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .tcp_nodelay(true)
                    .build()
                    .expect("client builds");
                let mut latencies = Vec::with_capacity(1 << 16);
                let (mut errors, mut statuses) = (0u64, [0u64; 6]);
                let mut random = 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1);
                loop {
                    match limit {
                        Limit::Requests(n) if sent.fetch_add(1, Ordering::Relaxed) >= n => break,
                        Limit::Until(end) if Instant::now() >= end => break,
                        _ => {}
                    }
                    let key = next_random(&mut random) % self.keys;
                    let write = match self.op {
                        Op::Get => false,
                        Op::Put => true,
                        Op::Mixed => next_random(&mut random).is_multiple_of(10),
                    };
                    let request = if write {
                        client
                            .put(self.url(c, key))
                            .header("content-type", "application/json")
                            .body(self.body.clone())
                    } else {
                        client.get(self.url(c, key))
                    };
                    let begun = Instant::now();
                    match request.send().await {
                        Ok(response) => {
                            let status = response.status().as_u16() as usize;
                            let _ = response.bytes().await;
                            latencies
                                .push(begun.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            statuses[(status / 100).min(5)] += 1;
                        }
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors, statuses)
            }
        });
        let results = futures_util::future::join_all(workers).await;
        let elapsed = started.elapsed();
        let mut report = Report {
            elapsed,
            latencies_us: Vec::new(),
            errors: 0,
            statuses: [0; 6],
        };
        for (latencies, errors, statuses) in results {
            report.latencies_us.extend(latencies);
            report.errors += errors;
            for (total, count) in report.statuses.iter_mut().zip(statuses) {
                *total += count;
            }
        }
        report.latencies_us.sort_unstable();
        report
    }
}

impl Report {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * (self.latencies_us.len() - 1) as f64).round() as usize;
        self.latencies_us[rank] as f64 / 1000.0
    }

    fn print(&self, load: &Load, connections: usize) {
        let done = self.latencies_us.len() as f64;
        let op = match load.op {
            Op::Get => "get",
            Op::Put => "put",
            Op::Mixed => "mixed",
        };
        println!(
            "{:<6} {:>5} {:>12} {:>10} {:>10} {:>10} {:>8} {:>8}",
            "op", "conns", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "non-2xx", "errors"
        );
        println!(
            "{:<6} {:>5} {:>12.0} {:>10.3} {:>10.3} {:>10.3} {:>8} {:>8}",
            op,
            connections,
            done / self.elapsed.as_secs_f64(),
            self.percentile(50.0),
            self.percentile(99.0),
            self.percentile(99.9),
            self.statuses[3] + self.statuses[4] + self.statuses[5],
            self.errors
        );
    }
}

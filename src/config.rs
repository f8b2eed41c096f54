//! Command-line flags and the course's environment variables, validated once into a `Config`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;

use crate::auth::{ClusterToken, TokenError};
use crate::blocking::TransferPriority;
use crate::ring::{canonical_address, validate_address, DEFAULT_VNODES};
use crate::shard::{Layout, LayoutError};
use crate::store::FsyncPolicy;
use crate::view::{parse_members, ViewError};

/// The largest `--max-body-bytes`: a forwarded PUT carries the value in one RPC frame, so
/// the limit stays below the frame limit with room for the key and the headers.
pub const MAX_BODY_BYTES: usize = crate::rpc::MAX_FRAME - (1 << 20);

/// Why a node refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--address/ADDRESS '{0}' is not ip:port (hostnames are not allowed)")]
    BadAddress(String),
    #[error("--view/VIEW: {0}; expected comma-separated ip:port entries, e.g. VIEW=10.10.0.4:13800,10.10.0.5:13800")]
    BadView(ViewError),
    #[error("--forwarding-address/FORWARDING_ADDRESS '{0}' is not ip:port")]
    BadForwardingAddress(String),
    #[error("--address/ADDRESS is required when the view has more than one node")]
    AddressRequired,
    #[error("--vnodes must be at least 1")]
    ZeroVnodes,
    #[error("--{0} must be a positive number of seconds")]
    BadDuration(&'static str),
    #[error("--max-body-bytes must be at most {0} (a forwarded value travels in one frame)")]
    BodyLimitTooLarge(usize),
    #[error("--cluster-token/CLUSTER_TOKEN: {0}")]
    BadToken(TokenError),
    #[error("--repl-factor/REPL_FACTOR '{0}': {1}")]
    BadReplFactor(String, LayoutError),
}

/// A ringkv node: one shard of a sharded key-value store on a consistent-hash ring.
#[derive(Debug, Parser)]
#[command(name = "ringkv", version, about, long_about = None)]
pub struct Args {
    /// IP address to listen on.
    #[arg(short = 'i', long, default_value = "0.0.0.0")]
    pub ip: IpAddr,
    /// TCP port to listen on.
    #[arg(short = 'p', long, default_value_t = 13800)]
    pub port: u16,
    /// This node's own ip:port as its peers see it [default: <ip>:<port>].
    #[arg(long, env = "ADDRESS")]
    pub address: Option<String>,
    /// Initial view: comma-separated ip:port of every node [default: just this node].
    #[arg(long, env = "VIEW")]
    pub view: Option<String>,
    /// Run as a forwarding instance that relays every /kvs request to this main instance.
    #[arg(long, env = "FORWARDING_ADDRESS")]
    pub forwarding_address: Option<String>,
    /// Virtual nodes per node on the ring; must be the same on every node of a cluster.
    #[arg(long, env = "RINGKV_VNODES", default_value_t = DEFAULT_VNODES)]
    pub vnodes: u32,
    /// Seconds to wait for the owner of a key (or the main instance) before answering 503.
    #[arg(long, default_value_t = 2.0)]
    pub forward_timeout: f64,
    /// Largest accepted request body, in bytes (larger bodies get 413).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most client connections served at once; further connections wait to be accepted.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Most requests forwarded to other nodes at once; further forwards wait.
    #[arg(long, default_value_t = 1024)]
    pub max_forwards: usize,
    /// Seconds a client may take to send a request's headers before the connection is closed.
    #[arg(long, default_value_t = 10.0)]
    pub header_read_timeout: f64,
    /// Seconds a client may take to send a request's body (slower: 408).
    #[arg(long, default_value_t = 30.0)]
    pub body_read_timeout: f64,
    /// Seconds a view-change participant waits for its coordinator before asking its peers
    /// for the outcome (commit if anyone committed, abort if nobody did).
    #[arg(long, default_value_t = 30.0)]
    pub phase_timeout: f64,
    /// Seconds during which a node that refuses connections is taken as starting, not down:
    /// start-up probes and view-change calls retry it with backoff for this long before
    /// declaring it unreachable.
    #[arg(long, default_value_t = 5.0)]
    pub connect_window: f64,
    /// Shared secret of the cluster's nodes, the same on every node: each proves it holds
    /// it when a node-to-node connection opens (it never crosses the wire). Unset: peers
    /// are taken as they introduce themselves.
    #[arg(long, env = "CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,
    /// Replicas per shard: serve the replicated contract (the course's assignment 4). The
    /// view's size must be a multiple of it.
    #[arg(long, env = "REPL_FACTOR")]
    pub repl_factor: Option<String>,
    /// Keep this node's keys, view and metadata log in this directory, so that a restart
    /// or a crash loses no acknowledged write [default: in memory only].
    #[arg(long, env = "DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// With --data-dir: when the journal is forced to disk. `always`: before each write's
    /// reply (concurrent writes share an fsync); `everysec`: once a second (a machine
    /// crash may lose the last second); `no`: when the OS sees fit.
    #[arg(long, env = "FSYNC", value_enum, default_value_t = FsyncPolicy::Everysec)]
    pub fsync: FsyncPolicy,
    /// At what priority a view change's bulk transfer reads and stores its batches.
    /// `idle`: on threads the OS runs only when requests leave a core idle (requests
    /// first; on a saturated node at least a bounded share of a core); `normal`: as fast as
    /// the cores allow, beside the requests. Applies to the whole process.
    #[arg(long, env = "TRANSFER_PRIORITY", value_enum, default_value_t = TransferPriority::Idle)]
    pub transfer_priority: TransferPriority,
    /// Enable the test-only fault hooks under /internal/fault (builds with the
    /// `fault-hooks` feature only; never in production).
    #[cfg(feature = "fault-hooks")]
    #[arg(long, hide = true, env = "RINGKV_FAULT_HOOKS")]
    pub fault_hooks: bool,
}

/// A node's validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub address: String,
    pub view: Vec<String>,
    pub forwarding_address: Option<String>,
    pub vnodes: u32,
    /// Replicas per shard: `Some` serves the replicated contract (assignment 4).
    pub repl_factor: Option<usize>,
    pub forward_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub max_forwards: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub phase_timeout: Duration,
    pub connect_window: Duration,
    pub fault_hooks: bool,
    pub cluster_token: Option<ClusterToken>,
    /// `--data-dir`: `None` keeps everything in memory (the course's default).
    pub data_dir: Option<std::path::PathBuf>,
    pub fsync: FsyncPolicy,
    pub transfer_priority: TransferPriority,
}

fn non_empty(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn seconds(value: f64, flag: &'static str) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or(ConfigError::BadDuration(flag))
}

#[cfg(feature = "fault-hooks")]
fn fault_hooks(args: &Args) -> bool {
    args.fault_hooks
}

#[cfg(not(feature = "fault-hooks"))]
fn fault_hooks(_args: &Args) -> bool {
    false
}

impl Config {
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        let fault_hooks = fault_hooks(&args);
        let listen = SocketAddr::new(args.ip, args.port);
        let explicit_address = non_empty(args.address);
        let given = explicit_address
            .clone()
            .unwrap_or_else(|| listen.to_string());
        let address = canonical_address(&given).map_err(|_| ConfigError::BadAddress(given))?;
        let view = match non_empty(args.view) {
            Some(text) => parse_members(&text).map_err(ConfigError::BadView)?,
            None => vec![address.clone()],
        };
        if view.len() > 1 && explicit_address.is_none() {
            return Err(ConfigError::AddressRequired);
        }
        let forwarding_address = non_empty(args.forwarding_address);
        if let Some(main) = &forwarding_address {
            validate_address(main).map_err(|_| ConfigError::BadForwardingAddress(main.clone()))?;
        }
        if args.vnodes == 0 {
            return Err(ConfigError::ZeroVnodes);
        }
        if args.max_body_bytes > MAX_BODY_BYTES {
            return Err(ConfigError::BodyLimitTooLarge(MAX_BODY_BYTES));
        }
        let repl_factor = match non_empty(args.repl_factor) {
            Some(factor) => {
                let bad = |why| ConfigError::BadReplFactor(factor.clone(), why);
                let n: usize = factor.parse().map_err(|_| bad(LayoutError::BadFactor))?;
                Layout::initial(&view, n).map_err(bad)?;
                Some(n)
            }
            None => None,
        };
        Ok(Config {
            listen,
            address,
            view,
            forwarding_address,
            vnodes: args.vnodes,
            repl_factor,
            forward_timeout: seconds(args.forward_timeout, "forward-timeout")?,
            max_body_bytes: args.max_body_bytes,
            max_connections: args.max_connections.max(1),
            max_forwards: args.max_forwards.max(1),
            header_read_timeout: seconds(args.header_read_timeout, "header-read-timeout")?,
            body_read_timeout: seconds(args.body_read_timeout, "body-read-timeout")?,
            phase_timeout: seconds(args.phase_timeout, "phase-timeout")?,
            connect_window: seconds(args.connect_window, "connect-window")?,
            fault_hooks,
            cluster_token: non_empty(args.cluster_token)
                .map(|token| ClusterToken::new(&token))
                .transpose()
                .map_err(ConfigError::BadToken)?,
            data_dir: args.data_dir.filter(|d| !d.as_os_str().is_empty()),
            fsync: args.fsync,
            transfer_priority: args.transfer_priority,
        })
    }

    /// Settings for a node listening on `address` alone, as tests and tools build them.
    pub fn for_address(address: &str, view: &[&str]) -> Result<Config, ConfigError> {
        let (ip, port) = address
            .rsplit_once(':')
            .ok_or_else(|| ConfigError::BadAddress(address.to_string()))?;
        let mut argv = vec![
            "ringkv".to_string(),
            format!("--ip={}", ip.trim_matches(['[', ']'])),
            format!("--port={port}"),
            format!("--address={address}"),
        ];
        if !view.is_empty() {
            argv.push(format!("--view={}", view.join(",")));
        }
        let args =
            Args::try_parse_from(argv).map_err(|_| ConfigError::BadAddress(address.into()))?;
        Config::from_args(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Config, ConfigError> {
        let mut full = vec!["ringkv"];
        full.extend_from_slice(argv);
        Config::from_args(Args::try_parse_from(full).unwrap())
    }

    #[test]
    fn bare_start_is_a_one_node_store_on_13800() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:13800");
        assert_eq!(config.view, vec![config.address.clone()]);
        assert_eq!(config.forward_timeout, Duration::from_secs(2));
        assert_eq!(config.transfer_priority, TransferPriority::Idle);
        let normal = parse(&["--transfer-priority", "normal"]).unwrap();
        assert_eq!(normal.transfer_priority, TransferPriority::Normal);
    }

    #[test]
    fn bad_settings_are_start_errors() {
        assert!(matches!(
            parse(&["--view", "10.0.0.1:1,10.0.0.2:2"]),
            Err(ConfigError::AddressRequired)
        ));
        assert!(matches!(
            parse(&["--address", "node:13800"]),
            Err(ConfigError::BadAddress(_))
        ));
        assert!(matches!(
            parse(&["--address", "10.0.0.1:1", "--view", "10.0.0.1:1,x"]),
            Err(ConfigError::BadView(_))
        ));
        let missing_comma = parse(&[
            "--address",
            "10.10.2.0:13800",
            "--view",
            "10.10.2.0:1380010.10.3.0:13800",
        ])
        .unwrap_err()
        .to_string();
        assert_eq!(
            missing_comma,
            "--view/VIEW: View entry '10.10.2.0:1380010.10.3.0:13800' is not ip:port; \
             expected comma-separated ip:port entries, e.g. VIEW=10.10.0.4:13800,10.10.0.5:13800"
        );
        assert!(matches!(
            parse(&["--max-body-bytes", "1000000000"]),
            Err(ConfigError::BodyLimitTooLarge(_))
        ));
        assert!(matches!(
            parse(&["--forward-timeout", "0"]),
            Err(ConfigError::BadDuration(_))
        ));
        assert!(matches!(
            parse(&["--cluster-token", "two words"]),
            Err(ConfigError::BadToken(_))
        ));
        let two = ["--address", "10.0.0.1:1", "--view", "10.0.0.1:1,10.0.0.2:1"];
        for (factor, error) in [
            (
                "0",
                "--repl-factor/REPL_FACTOR '0': repl-factor must be a positive integer",
            ),
            (
                "x",
                "--repl-factor/REPL_FACTOR 'x': repl-factor must be a positive integer",
            ),
            (
                "3",
                "--repl-factor/REPL_FACTOR '3': the view's 2 nodes do not split into shards of 3",
            ),
        ] {
            let argv = [&two[..], &["--repl-factor", factor]].concat();
            assert_eq!(parse(&argv).unwrap_err().to_string(), error);
        }
        let argv = [&two[..], &["--repl-factor", "2"]].concat();
        assert_eq!(parse(&argv).unwrap().repl_factor, Some(2));
        assert_eq!(parse(&two).unwrap().repl_factor, None);
        assert!(parse(&["--cluster-token", "s3cret"])
            .unwrap()
            .cluster_token
            .is_some_and(|t| t.accepts(Some(b"s3cret"))));
    }
}

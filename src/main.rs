//! The `ringkv` binary: parses flags and environment, then runs one node until SIGTERM.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use ringkv::config::{Args, Config};
use ringkv::node::Node;
use ringkv::server;

/// glibc's allocator spent ~10% of a forwarding node's time (malloc_consolidate on the
/// request buffers); mimalloc's thread-local free lists make that a few percent.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    let config = match Config::from_args(Args::parse()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("ringkv: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let node = match Node::new(config) {
        Ok(node) => node,
        Err(error) => {
            eprintln!("ringkv: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let listener = match server::bind(&node).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("ringkv: cannot listen on {}: {error}", node.config().listen);
            return std::process::ExitCode::from(1);
        }
    };
    let view = node.view();
    tracing::info!(
        listen = %node.config().listen,
        address = %node.address(),
        view = %view.members_text(),
        epoch = view.epoch,
        vnodes = node.config().vnodes,
        forwarding = node.config().forwarding_address.as_deref().unwrap_or("-"),
        "ringkv node started"
    );
    let crashed = node.clone();
    let node_for_exit = node.clone();
    tokio::select! {
        _ = server::serve(node, listener, server::shutdown_signal()) => {}
        _ = crashed.faults().crashed() => {
            // A test's fault hook: end now, as a crash would, with nothing flushed.
            std::process::exit(17);
        }
    }
    if let Some(disk) = node_for_exit.disk() {
        match disk.flush() {
            Ok(()) => {
                tracing::info!(data_dir = ?node_for_exit.data_dir().map(|d| d.path()), "the data directory is on disk")
            }
            Err(error) => tracing::error!(%error, "could not flush the data directory"),
        }
    }
    tracing::info!("stopped");
    // Now, without waiting for blocking tasks (a log effect a test's hook holds, a large
    // commit): in memory mode there is nothing left to write.
    std::process::exit(0)
}

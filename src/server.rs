//! The accept loop: HTTP/1.1 with a header-read timeout, a cap on concurrent connections,
//! and graceful shutdown (stop accepting, let in-flight requests finish, then exit).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::api;
use crate::mux;
use crate::node::Node;
use crate::parse_errors::JsonParseErrors;

/// How long in-flight requests get to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Binds the node's listen address.
pub async fn bind(node: &Node) -> std::io::Result<TcpListener> {
    TcpListener::bind(node.config.listen).await
}

/// Serves `node` on `listener` until `shutdown` resolves.
pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let service = warp::service(api::routes(node.clone()));
    let connections = Arc::new(Semaphore::new(node.config.max_connections));
    let graceful = GracefulShutdown::new();
    let header_timeout = node.config.header_read_timeout;
    let mut shutdown = std::pin::pin!(shutdown);
    // Connections that have not shown what they speak yet stop waiting when this turns true.
    let (stopping, stopping_seen) = watch::channel(false);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (node, service, watcher) = (node.clone(), service.clone(), graceful.watcher());
        let mut stopping = stopping_seen.clone();
        tokio::spawn(async move {
            let opening = tokio::select! {
                opening = opening(&stream, header_timeout) => opening,
                _ = stopping.wait_for(|stopping| *stopping) => None,
            };
            match opening {
                Some(Opening::Mux) => {
                    // Forwarding connections carry no request a shutdown should wait for:
                    // a peer sees the connection close and answers 503 for this node.
                    drop(watcher);
                    mux::server::serve(node, stream, header_timeout).await
                }
                Some(Opening::Http) => {
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .serve_connection(
                            TokioIo::new(JsonParseErrors::new(stream)),
                            TowerToHyperService::new(service),
                        );
                    if let Err(error) = watcher.watch(connection).await {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                }
                None => tracing::debug!(%peer, "connection closed or silent before a request"),
            }
            drop(permit);
        });
    }
    drop(listener);
    stopping.send_replace(true);
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within the grace period");
    }
}

/// What a connection speaks, told by its first bytes.
enum Opening {
    Http,
    /// ringkv's multiplexed forwarding protocol (`crate::mux`).
    Mux,
}

/// Waits (within `limit`) for a connection's first bytes, without consuming them. `None`
/// if it closes or stays silent.
async fn opening(stream: &TcpStream, limit: Duration) -> Option<Opening> {
    let mut first = [0u8; 8];
    let sniff = async {
        loop {
            let n = stream.peek(&mut first).await.ok()?;
            if n == 0 {
                return None;
            }
            match mux::server::is_mux_preface(&first[..n]) {
                Some(true) => return Some(Opening::Mux),
                Some(false) => return Some(Opening::Http),
                // The start of the magic in a short first segment: wait for the rest.
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    };
    tokio::time::timeout(limit, sniff).await.ok().flatten()
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

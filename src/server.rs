//! The accept loop: HTTP/1.1 with a header-read timeout, a cap on concurrent connections,
//! and graceful shutdown (stop accepting, let in-flight requests finish, then exit).

use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::api;
use crate::header_timer::HeaderTimer;
use crate::node::Node;
use crate::parse_errors::JsonParseErrors;
use crate::rpc;
use crate::shutdown::{serve_until_stopped, Stop};

/// How long in-flight requests get to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Binds the node's listen address.
pub async fn bind(node: &Node) -> std::io::Result<TcpListener> {
    TcpListener::bind(node.config().listen).await
}

/// Serves `node` on `listener` until `shutdown` resolves.
pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    if node.meta().is_none() {
        let link = crate::migrate::apply::Link::new(&node);
        if let Err(error) = node.start_log(link.clone(), link, false).await {
            tracing::error!(%error, "cannot start the metadata log");
            return;
        }
    }
    if node.config().forwarding_address.is_none() {
        crate::join::form_alone(&node).await;
        tokio::spawn(crate::join::settle(node.clone()));
        tokio::spawn(crate::migrate::orphan_watch(node.clone()));
        tokio::spawn(crate::migrate::follow_while_removed(node.clone()));
    }
    if node.replication().is_some() {
        tokio::spawn(crate::replicated::exchange::run(node.clone()));
        tokio::spawn(crate::replicated::push::run(node.clone()));
    }
    let connections = Arc::new(Semaphore::new(node.config().max_connections));
    // Counts the connections still open; `stop` tells the HTTP ones to finish.
    let graceful = GracefulShutdown::new();
    let stop = Arc::new(Stop::default());
    let header_timeout = node.config().header_read_timeout;
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
        let (node, watcher, stop) = (node.clone(), graceful.watcher(), stop.clone());
        let mut stopping = stopping_seen.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let opening = tokio::select! {
                opening = opening(&mut stream, header_timeout) => opening,
                _ = stopping.wait_for(|stopping| *stopping) => None,
            };
            // The watcher lives until the connection has answered what it started.
            let _watcher = watcher;
            match opening {
                Some(Opening::Rpc) => {
                    let stall = node.config().forward_timeout;
                    rpc::server::serve(node, stream, header_timeout, stall, stopping).await
                }
                Some(Opening::Http(prefix)) => {
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(HeaderTimer::default())
                        .header_read_timeout(header_timeout)
                        .serve_connection(
                            TokioIo::new(JsonParseErrors::new(Rewind::new(prefix, stream))),
                            hyper::service::service_fn(move |request| {
                                api::handle(node.clone(), request)
                            }),
                        );
                    if let Err(error) = serve_until_stopped(connection, stop).await {
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
    stop.stop();
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
    /// HTTP; the bytes read to tell (to be read again first).
    Http(Bytes),
    /// ringkv's node-to-node protocol (`crate::rpc`); its magic has been read.
    Rpc,
}

/// Waits (within `limit`) for a connection's first bytes and tells what it speaks. `None`
/// if it closes or stays silent.
async fn opening(stream: &mut TcpStream, limit: Duration) -> Option<Opening> {
    let tell = async {
        let mut first = [0u8; rpc::MAGIC.len()];
        let n = stream.peek(&mut first).await.ok()?;
        if n == 0 {
            return None;
        }
        if !rpc::may_be_magic(&first[..n]) {
            return Some(Opening::Http(Bytes::new()));
        }
        // Possibly the magic: read as many bytes as it has.
        stream.read_exact(&mut first).await.ok()?;
        Some(if first == *rpc::MAGIC {
            Opening::Rpc
        } else {
            Opening::Http(Bytes::copy_from_slice(&first))
        })
    };
    tokio::time::timeout(limit, tell).await.ok().flatten()
}

/// A stream that yields `prefix` before its own bytes.
struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let prefix = self.prefix.split_to(n);
            buf.put_slice(&prefix);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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

//! The answering side: runs a connection's handshake, then serves its requests through a
//! [`Handler`]. Requests that complete at once are answered in the same write as the rest
//! of their read; one that must wait (a key in a range being handed over, a transfer)
//! finishes in a task of its own, is answered when it is done, and is aborted if the caller
//! cancels it or goes away. A connection holds at most [`MAX_WAITING`] such tasks; more are
//! refused as `Busy`. On shutdown a connection keeps serving (and reading cancels) until no
//! request it started still waits, then closes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;

use super::client::Identity;
use super::{
    decode_incoming, encode_answer, encode_json, make_room, next_frame, nonce, read_json,
    stall_limit, take_queued, watch_liveness, write_within, Hello, HelloAnswer, Incoming, Proof,
    Refusal, Request, Response, Stamp,
};

/// Most requests of one connection waiting at once.
pub const MAX_WAITING: usize = 4096;

/// What a node does with the requests it receives.
pub trait Handler: Send + Sync + 'static {
    /// Who this node is, for the handshake.
    fn identity(&self) -> &Identity;

    /// Serves one request of `from` (its identity checked by the handshake); answers with
    /// this node's stamp and the response.
    fn handle(
        self: Arc<Self>,
        from: Arc<str>,
        stamp: Stamp,
        request: Request,
    ) -> impl Future<Output = (Stamp, Response)> + Send;

    /// This node's stamp, for answers the server makes itself (`Busy`).
    fn stamp(&self) -> Stamp;
}

/// Answers waiting to be written, shared by the reader and the requests that wait.
struct Outbox {
    queued: Mutex<BytesMut>,
    queued_more: Notify,
    closed: watch::Sender<bool>,
    /// Requests that wait, by id, so a cancel can abort them.
    waiting: Mutex<HashMap<u64, AbortHandle>>,
    /// Signalled each time a waiting request finishes.
    finished: Notify,
}

impl Outbox {
    fn answer(&self, id: u64, (stamp, response): &(Stamp, Response)) {
        encode_answer(&mut self.queued.lock(), id, *stamp, response);
    }

    fn abort_waiting(&self) {
        for (_, task) in self.waiting.lock().drain() {
            task.abort();
        }
    }
}

/// Why a handshake was refused: the status and the reason the hello answer carries.
fn check_hello(identity: &Identity, hello: &Hello) -> Option<(u16, String)> {
    if hello.vnodes != identity.vnodes {
        return Some((
            409,
            format!(
                "vnode count mismatch: sender uses {}, this node {}",
                hello.vnodes, identity.vnodes
            ),
        ));
    }
    // The mode, not the factor: a view change may change the factor, and a node started
    // later with the new one is in the same cluster.
    if (hello.repl_factor == 0) != (identity.repl_factor == 0) {
        return Some((
            409,
            format!(
                "mode mismatch: sender serves repl-factor {}, this node {} (0: unreplicated)",
                hello.repl_factor, identity.repl_factor
            ),
        ));
    }
    if crate::ring::canonical_address(&hello.from).as_deref() != Ok(hello.from.as_str()) {
        return Some((
            400,
            format!("sender {:?} is not a canonical ip:port", hello.from),
        ));
    }
    None
}

/// Runs the handshake; the caller's identity once it is accepted.
async fn handshake(
    identity: &Identity,
    stream: &mut TcpStream,
    buffer: &mut BytesMut,
    peer: &str,
) -> Option<Arc<str>> {
    let hello: Hello = read_json(stream, buffer).await?;
    let refusal = check_hello(identity, &hello);
    let my_nonce = nonce();
    let mut answer = BytesMut::new();
    encode_json(
        &mut answer,
        &HelloAnswer {
            status: refusal.as_ref().map_or(200, |(status, _)| *status),
            error: refusal.as_ref().map(|(_, error)| error.clone()),
            address: identity.address.clone(),
            nonce: my_nonce.clone(),
            proof: identity
                .token
                .as_ref()
                .map(|token| token.prove("server", &hello.nonce, &identity.address, &hello.from)),
        },
    );
    stream.write_all(&answer).await.ok()?;
    if let Some((status, error)) = refusal {
        tracing::warn!(%peer, from = hello.from, status, error, "rpc connection refused");
        return None;
    }
    if let Some(token) = &identity.token {
        let proof: Proof = read_json(stream, buffer).await?;
        if !token.verify(
            &proof.proof,
            "client",
            &my_nonce,
            &hello.from,
            &identity.address,
        ) {
            tracing::warn!(%peer, from = hello.from, "rpc connection without the cluster token");
            return None;
        }
    }
    Some(Arc::from(hello.from))
}

/// Serves one RPC connection (its magic already read) until it closes, or until `stopping`
/// turns true and the requests it started are answered.
pub async fn serve<H: Handler>(
    handler: Arc<H>,
    mut stream: TcpStream,
    handshake_timeout: Duration,
    stall: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    if let Err(error) = watch_liveness(&stream) {
        tracing::debug!(%peer, %error, "cannot watch the connection's liveness");
    }
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    let from = tokio::select! {
        from = tokio::time::timeout(
            handshake_timeout,
            handshake(handler.identity(), &mut stream, &mut buffer, &peer),
        ) => match from {
            Ok(Some(from)) => from,
            _ => {
                tracing::debug!(%peer, "rpc connection without a completed handshake");
                return;
            }
        },
        _ = stopping.wait_for(|stopping| *stopping) => return,
    };
    let (mut reader, writer) = stream.into_split();
    let outbox = Arc::new(Outbox {
        queued: Mutex::new(BytesMut::with_capacity(16 * 1024)),
        queued_more: Notify::new(),
        closed: watch::channel(false).0,
        waiting: Mutex::new(HashMap::new()),
        finished: Notify::new(),
    });
    let writer = tokio::spawn(write_answers(outbox.clone(), writer, stall_limit(stall)));
    // Once the node stops, the connection keeps serving (and reading cancels) until no
    // request it started still waits, then closes.
    let mut draining = false;
    let stopped = 'connection: loop {
        loop {
            match next_frame(&mut buffer).map(|f| f.map(decode_incoming)) {
                Ok(Some(Ok(Incoming::Request { id, stamp, request }))) => {
                    serve_request(&handler, &outbox, &from, id, stamp, request)
                }
                Ok(Some(Ok(Incoming::Cancel(id)))) => {
                    if let Some(task) = outbox.waiting.lock().remove(&id) {
                        task.abort();
                    }
                }
                Ok(None) => break,
                Ok(Some(Err(error))) | Err(error) => {
                    tracing::warn!(%peer, %from, %error, "rpc connection closed: bad frame");
                    break 'connection false;
                }
            }
        }
        outbox.queued_more.notify_one();
        let finished = outbox.finished.notified();
        if draining && outbox.waiting.lock().is_empty() {
            break true;
        }
        make_room(&mut buffer);
        tokio::select! {
            read = reader.read_buf(&mut buffer) => match read {
                Ok(n) if n > 0 => {}
                _ => break false,
            },
            _ = stopping.wait_for(|stopping| *stopping), if !draining => draining = true,
            _ = finished, if draining => {}
        }
    };
    outbox.abort_waiting();
    outbox.closed.send_replace(true);
    if stopped {
        let _ = writer.await;
    }
}

/// Serves a request now if it can complete without waiting, else in a task of its own.
fn serve_request<H: Handler>(
    handler: &Arc<H>,
    outbox: &Arc<Outbox>,
    from: &Arc<str>,
    id: u64,
    stamp: Stamp,
    request: Request,
) {
    let shared = outbox.clone();
    let mut served = Box::pin(handler.clone().handle(from.clone(), stamp, request).map(
        move |answer| {
            shared.answer(id, &answer);
            shared
        },
    ));
    if (&mut served).now_or_never().is_some() {
        return;
    }
    // The task cannot remove its entry before it is in: the lock is held across the spawn.
    let mut waiting = outbox.waiting.lock();
    if waiting.len() >= MAX_WAITING {
        drop(waiting);
        outbox.answer(id, &(handler.stamp(), Response::Refused(Refusal::Busy)));
        return;
    }
    let task = tokio::spawn(async move {
        let outbox = served.await;
        outbox.waiting.lock().remove(&id);
        outbox.queued_more.notify_one();
        outbox.finished.notify_waiters();
    });
    waiting.insert(id, task.abort_handle());
}

/// Writes queued answers until the connection closes, then what is left; a write that
/// makes no progress for `stall` closes the connection (the caller stopped reading).
async fn write_answers(outbox: Arc<Outbox>, mut writer: OwnedWriteHalf, stall: Duration) {
    let mut closed = outbox.closed.subscribe();
    let mut last_round = false;
    while !last_round {
        tokio::select! {
            _ = outbox.queued_more.notified() => {}
            _ = closed.wait_for(|closed| *closed) => last_round = true,
        }
        while let Some(batch) = take_queued(&outbox.queued) {
            if let Err(why) = write_within(&mut writer, &batch, stall).await {
                tracing::debug!(why, "rpc connection closed while answering");
                outbox.closed.send_replace(true);
                return;
            }
        }
    }
    let _ = writer.shutdown().await;
}

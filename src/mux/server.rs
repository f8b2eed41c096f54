//! The receiving side of the mux protocol: checks a connection's hello, then serves its
//! forwarded key requests. Requests that complete at once are answered in the same write
//! as the rest of their read; one that must wait (its range is being handed over) finishes
//! in a task of its own, is answered when it is done, and is aborted if the sender cancels
//! it or goes away. On shutdown a connection keeps serving (and reading cancels) until no
//! request it started still waits, then closes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;
use warp::http::{Method, StatusCode};

use super::{
    decode_request, encode_answer, encode_json, make_room, next_frame, next_frame_within,
    take_queued, Answer, Hello, HelloAnswer, Incoming, Request, MAX_HELLO,
};
use crate::kv::{KvOp, KvOutcome};
use crate::metrics::{self, RouteLabel};
use crate::node::{Node, NotServed};

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
    fn answer(&self, id: u64, answer: &Answer) {
        encode_answer(&mut self.queued.lock(), id, answer);
    }

    fn abort_waiting(&self) {
        for (_, task) in self.waiting.lock().drain() {
            task.abort();
        }
    }
}

/// Serves one mux connection (its magic already read) until it closes, or until `stopping`
/// turns true and the requests it started are answered.
pub async fn serve(
    node: Arc<Node>,
    mut stream: TcpStream,
    hello_timeout: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    let hello = tokio::select! {
        hello = tokio::time::timeout(hello_timeout, read_hello(&mut stream, &mut buffer)) => {
            match hello {
                Ok(Some(hello)) => hello,
                _ => {
                    tracing::debug!(%peer, "mux connection without a readable hello");
                    return;
                }
            }
        }
        _ = stopping.wait_for(|stopping| *stopping) => return,
    };
    let refusal = check_hello(&node, &hello);
    let mut answer = BytesMut::new();
    encode_json(
        &mut answer,
        &HelloAnswer {
            status: refusal.as_ref().map_or(200, |(status, _)| status.as_u16()),
            error: refusal.as_ref().map(|(_, error)| error.clone()),
        },
    );
    if stream.write_all(&answer).await.is_err() {
        return;
    }
    if let Some((status, error)) = refusal {
        tracing::warn!(%peer, from = hello.from, %status, error, "mux connection refused");
        return;
    }
    let (mut reader, writer) = stream.into_split();
    let outbox = Arc::new(Outbox {
        queued: Mutex::new(BytesMut::with_capacity(16 * 1024)),
        queued_more: Notify::new(),
        closed: watch::channel(false).0,
        waiting: Mutex::new(HashMap::new()),
        finished: Notify::new(),
    });
    let writer = tokio::spawn(write_answers(outbox.clone(), writer));
    let from: Arc<str> = Arc::from(hello.from);
    // Once the node stops, the connection keeps serving (and reading cancels) until no
    // request it started still waits, then closes.
    let mut draining = false;
    let stopped = 'connection: loop {
        loop {
            match next_frame(&mut buffer).map(|f| f.map(decode_request)) {
                Ok(Some(Ok(Incoming::Request(request)))) => {
                    serve_request(&node, &outbox, &from, request)
                }
                Ok(Some(Ok(Incoming::Cancel(id)))) => {
                    if let Some(task) = outbox.waiting.lock().remove(&id) {
                        task.abort();
                    }
                }
                Ok(None) => break,
                Ok(Some(Err(error))) | Err(error) => {
                    tracing::warn!(%peer, %error, "mux connection closed: bad frame");
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

async fn read_hello(stream: &mut TcpStream, buffer: &mut BytesMut) -> Option<Hello> {
    loop {
        if let Some(frame) = next_frame_within(buffer, MAX_HELLO).ok()? {
            return serde_json::from_slice(&frame).ok();
        }
        if stream.read_buf(buffer).await.ok()? == 0 {
            return None;
        }
    }
}

/// The refusal an HTTP internal request with this sender's headers would get, if any.
fn check_hello(node: &Node, hello: &Hello) -> Option<(StatusCode, String)> {
    if let Some(token) = &node.config.cluster_token {
        if !token.accepts(hello.token.as_deref().map(str::as_bytes)) {
            return Some((StatusCode::UNAUTHORIZED, "Unauthorized".into()));
        }
    }
    if hello.vnodes != node.config.vnodes {
        return Some((
            StatusCode::CONFLICT,
            format!(
                "vnode count mismatch: sender uses {}, this node {}",
                hello.vnodes, node.config.vnodes
            ),
        ));
    }
    None
}

fn method_of(op: &KvOp) -> Method {
    match op {
        KvOp::Get => Method::GET,
        KvOp::Put(_) => Method::PUT,
        KvOp::Delete => Method::DELETE,
    }
}

/// Serves a request now if it can complete without waiting, else in a task of its own.
fn serve_request(node: &Arc<Node>, outbox: &Arc<Outbox>, from: &Arc<str>, request: Request) {
    let started = Instant::now();
    let Request { id, epoch, key, op } = request;
    let method = method_of(&op);
    let (node, shared, from) = (node.clone(), outbox.clone(), from.clone());
    let mut served = Box::pin(async move {
        let answer = match node.serve_forwarded(&key, op, epoch, &from).await {
            Ok(outcome) => Answer::Served(outcome),
            Err(NotServed::Misdirected(misdirected)) => {
                Answer::Misdirected(serde_json::to_vec(&misdirected).unwrap_or_default().into())
            }
            Err(NotServed::Unsettled) => Answer::Failed {
                status: StatusCode::SERVICE_UNAVAILABLE.as_u16(),
                body: Bytes::from_static(br#"{"error":"the view in force is not known yet"}"#),
            },
            Err(NotServed::Failed(_)) => Answer::Failed {
                status: StatusCode::SERVICE_UNAVAILABLE.as_u16(),
                body: Bytes::from_static(br#"{"error":"the owner's store failed"}"#),
            },
        };
        let status = match &answer {
            Answer::Served(KvOutcome::Added) => StatusCode::CREATED,
            Answer::Served(KvOutcome::Absent) => StatusCode::NOT_FOUND,
            Answer::Served(_) => StatusCode::OK,
            Answer::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            Answer::Failed { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        };
        shared.answer(id, &answer);
        metrics::request(RouteLabel::Internal, &method, status, started.elapsed());
        shared
    });
    if (&mut served).now_or_never().is_some() {
        return;
    }
    // The task cannot remove its entry before it is in: the lock is held across the spawn.
    let mut waiting = outbox.waiting.lock();
    let task = tokio::spawn(async move {
        let outbox = served.await;
        outbox.waiting.lock().remove(&id);
        outbox.queued_more.notify_one();
        outbox.finished.notify_waiters();
    });
    waiting.insert(id, task.abort_handle());
}

/// Writes queued answers until the connection closes, then what is left.
async fn write_answers(outbox: Arc<Outbox>, mut writer: OwnedWriteHalf) {
    let mut closed = outbox.closed.subscribe();
    let mut last_round = false;
    while !last_round {
        tokio::select! {
            _ = outbox.queued_more.notified() => {}
            _ = closed.wait_for(|closed| *closed) => last_round = true,
        }
        while let Some(batch) = take_queued(&outbox.queued) {
            if writer.write_all(&batch).await.is_err() {
                outbox.closed.send_replace(true);
                return;
            }
        }
    }
    let _ = writer.shutdown().await;
}

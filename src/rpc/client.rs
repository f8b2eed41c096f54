//! The calling side: one connection per peer, shared by every call to it. A call queues its
//! frame and waits for the answer with its id; the connection's writer task sends whatever
//! is queued in one write, its reader task hands each answer to the call waiting for it. A
//! call that stops waiting cancels its request.
//!
//! A call that times out leaves the connection open: the peer may just be slow on that
//! request (a range being handed over). A peer or path that is gone is found by TCP
//! keepalive and the kernel's user timeout; a peer that stops reading, by a write that
//! makes no progress for the stall limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::{Mutex, RwLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use super::{
    decode_answer, encode_cancel, encode_json, encode_request, make_room, next_frame, nonce,
    read_json, stall_limit, take_queued, watch_liveness, write_within, FrameError, Hello,
    HelloAnswer, Proof, Request, Response, Stamp, MAGIC,
};
use crate::auth::ClusterToken;

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("the peer refused the connection: {status} {error}")]
    Refused { status: u16, error: String },
    #[error("the peer is not who it was dialed as: {0}")]
    NotThePeer(String),
    #[error("no answer in time")]
    TimedOut,
    #[error("the connection closed before the answer")]
    Closed,
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl CallError {
    /// Whether the peer may simply not be listening yet (a node that is starting).
    pub fn is_connect(&self) -> bool {
        matches!(self, CallError::Connect(_))
    }

    /// Whether the peer refused to talk at all (another vnode count, no token, another
    /// identity): final, unlike a connection that failed.
    pub fn is_rejection(&self) -> bool {
        matches!(self, CallError::Refused { .. } | CallError::NotThePeer(_))
    }
}

/// This node as it introduces itself to peers.
#[derive(Debug, Clone)]
pub struct Identity {
    pub address: String,
    pub vnodes: u32,
    /// Replicas per shard (0: the sharded contract); a cluster-wide setting like `vnodes`.
    pub repl_factor: u32,
    pub token: Option<ClusterToken>,
}

/// Connections to every peer this node calls.
pub struct RpcClient {
    identity: Identity,
    /// Bounds connecting and the handshake.
    connect_timeout: Duration,
    stall: Duration,
    connections: RwLock<HashMap<String, Arc<Connection>>>,
    /// One lock per peer, so a peer that does not answer delays only calls to it.
    connecting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl RpcClient {
    /// `timeout` bounds connecting and the handshake, and sets the stall limit.
    pub fn new(identity: Identity, timeout: Duration) -> Self {
        RpcClient {
            identity,
            connect_timeout: timeout,
            stall: stall_limit(timeout),
            connections: RwLock::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `request` to `peer` and waits for the answer until `deadline`.
    pub async fn call(
        &self,
        peer: &str,
        stamp: Stamp,
        request: &Request,
        deadline: Instant,
    ) -> Result<(Stamp, Response), CallError> {
        let connection = tokio::time::timeout_at(deadline, self.connection(peer))
            .await
            .map_err(|_| CallError::TimedOut)??;
        connection.call(stamp, request, deadline).await
    }

    fn live(&self, peer: &str) -> Option<Arc<Connection>> {
        self.connections
            .read()
            .get(peer)
            .filter(|c| c.is_open())
            .cloned()
    }

    async fn connection(&self, peer: &str) -> Result<Arc<Connection>, CallError> {
        if let Some(connection) = self.live(peer) {
            return Ok(connection);
        }
        let lock = self
            .connecting
            .lock()
            .entry(peer.to_string())
            .or_default()
            .clone();
        let _connecting = lock.lock().await;
        if let Some(connection) = self.live(peer) {
            return Ok(connection);
        }
        let connection = tokio::time::timeout(self.connect_timeout, self.open(peer))
            .await
            .map_err(|_| CallError::TimedOut)??;
        tracing::debug!(peer, "rpc connection open");
        self.connections
            .write()
            .insert(peer.to_string(), connection.clone());
        Ok(connection)
    }

    /// Connects and runs the handshake: the peer must answer as `peer` and, with a token,
    /// prove that it holds it before this node proves the same.
    async fn open(&self, peer: &str) -> Result<Arc<Connection>, CallError> {
        let me = &self.identity;
        let mut stream = TcpStream::connect(peer).await.map_err(CallError::Connect)?;
        stream.set_nodelay(true).map_err(CallError::Connect)?;
        watch_liveness(&stream).map_err(CallError::Connect)?;
        let my_nonce = nonce();
        let mut hello = BytesMut::from(&MAGIC[..]);
        encode_json(
            &mut hello,
            &Hello {
                from: me.address.clone(),
                vnodes: me.vnodes,
                repl_factor: me.repl_factor,
                nonce: my_nonce.clone(),
            },
        );
        stream.write_all(&hello).await.map_err(CallError::Connect)?;
        let mut buffer = BytesMut::with_capacity(256);
        let answer: HelloAnswer = read_json(&mut stream, &mut buffer)
            .await
            .ok_or(CallError::Closed)?;
        if answer.status != 200 {
            return Err(CallError::Refused {
                status: answer.status,
                error: answer.error.unwrap_or_default(),
            });
        }
        if answer.address != peer {
            return Err(CallError::NotThePeer(format!(
                "{peer} answered as {:?}",
                answer.address
            )));
        }
        if let Some(token) = &me.token {
            let proven = answer
                .proof
                .as_deref()
                .is_some_and(|proof| token.verify(proof, "server", &my_nonce, peer, &me.address));
            if !proven {
                return Err(CallError::NotThePeer(format!(
                    "{peer} did not prove it holds the cluster token"
                )));
            }
            let mut proof = BytesMut::new();
            encode_json(
                &mut proof,
                &Proof {
                    proof: token.prove("client", &answer.nonce, &me.address, peer),
                },
            );
            stream.write_all(&proof).await.map_err(CallError::Connect)?;
        }
        let (reader, writer) = stream.into_split();
        let connection = Arc::new(Connection {
            peer: peer.to_string(),
            queued: Mutex::new(BytesMut::with_capacity(16 * 1024)),
            queued_more: Notify::new(),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            open: AtomicBool::new(true),
            closed: watch::channel(false).0,
        });
        tokio::spawn(read_answers(connection.clone(), reader, buffer));
        tokio::spawn(write_requests(connection.clone(), writer, self.stall));
        Ok(connection)
    }
}

type Answer = (Stamp, Response);

/// One open connection to a peer.
struct Connection {
    peer: String,
    queued: Mutex<BytesMut>,
    queued_more: Notify,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next_id: AtomicU64,
    open: AtomicBool,
    closed: watch::Sender<bool>,
}

/// A call's entry while it waits; dropped unanswered (timed out, or its caller went away),
/// it cancels the request at the peer.
struct Waiting<'a> {
    connection: &'a Connection,
    id: u64,
    answered: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.connection.waiting.lock().remove(&self.id);
        if !self.answered && self.connection.is_open() {
            encode_cancel(&mut self.connection.queued.lock(), self.id);
            self.connection.queued_more.notify_one();
        }
    }
}

impl Connection {
    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Marks the connection closed, stops its tasks, fails every waiting call and drops
    /// what was not sent.
    fn close(&self, why: &str) {
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::debug!(peer = %self.peer, why, "rpc connection closed");
            self.closed.send_replace(true);
            self.waiting.lock().clear();
            *self.queued.lock() = BytesMut::new();
        }
    }

    async fn call(
        &self,
        stamp: Stamp,
        request: &Request,
        deadline: Instant,
    ) -> Result<Answer, CallError> {
        let (sender, answer) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.waiting.lock().insert(id, sender);
        let mut waiting = Waiting {
            connection: self,
            id,
            answered: false,
        };
        // Closed between the caller's check and the insert: nobody would answer.
        if !self.is_open() {
            return Err(CallError::Closed);
        }
        encode_request(&mut self.queued.lock(), id, stamp, request);
        self.queued_more.notify_one();
        let result = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(CallError::Closed),
            Err(_) => Err(CallError::TimedOut),
        };
        waiting.answered = result.is_ok();
        result
    }
}

/// Sends queued frames until the connection closes. Each wake-up first yields, so that every
/// call of the current scheduling round has queued its frame, then writes them together.
async fn write_requests(connection: Arc<Connection>, mut writer: OwnedWriteHalf, stall: Duration) {
    let mut closed = connection.closed.subscribe();
    loop {
        tokio::select! {
            _ = connection.queued_more.notified() => {}
            _ = closed.wait_for(|closed| *closed) => return,
        }
        tokio::task::yield_now().await;
        while let Some(batch) = take_queued(&connection.queued) {
            let written = tokio::select! {
                written = write_within(&mut writer, &batch, stall) => written,
                _ = closed.wait_for(|closed| *closed) => return,
            };
            if let Err(why) = written {
                return connection.close(why);
            }
        }
    }
}

/// Hands each answer to the call waiting for it, until the connection closes.
async fn read_answers(
    connection: Arc<Connection>,
    mut reader: OwnedReadHalf,
    mut buffer: BytesMut,
) {
    let mut closed = connection.closed.subscribe();
    loop {
        loop {
            match next_frame(&mut buffer).and_then(|f| f.map(decode_answer).transpose()) {
                Ok(Some((id, stamp, response))) => {
                    if let Some(sender) = connection.waiting.lock().remove(&id) {
                        let _ = sender.send((stamp, response));
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    connection.close(&error.to_string());
                    return;
                }
            }
        }
        make_room(&mut buffer);
        let read = tokio::select! {
            read = reader.read_buf(&mut buffer) => read,
            _ = closed.wait_for(|closed| *closed) => return,
        };
        match read {
            Ok(0) => return connection.close("the peer closed the connection"),
            Ok(_) => {}
            Err(error) => return connection.close(&error.to_string()),
        }
    }
}

//! The sending side of the mux protocol: one connection per peer, shared by every forward to
//! it. A forward queues its frame and waits for the answer with its id; the connection's
//! writer task sends whatever is queued in one write, its reader task hands each answer to
//! the forward waiting for it. A forward that stops waiting cancels its request.
//!
//! A forward that times out leaves the connection open: the peer may just be slow on that
//! key (a range being handed over). A peer or path that is gone is found by TCP keepalive
//! and the kernel's user timeout; a peer that stops reading, by a write that makes no
//! progress for [`stall_limit`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch, Notify};

use super::{
    decode_answer, encode_cancel, encode_json, encode_request, make_room, next_frame, take_queued,
    Answer, FrameError, Hello, HelloAnswer, MAGIC,
};

use crate::kv::KvOp;

/// How long a write may make no progress before the peer counts as not reading: the
/// forward timeout, and at least 5 s so a busy peer is not given up too soon.
fn stall_limit(timeout: Duration) -> Duration {
    timeout.max(Duration::from_secs(5))
}

/// Why a forward got no answer.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("the peer refused the connection: {status} {error}")]
    Refused { status: u16, error: String },
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("the connection closed before the answer")]
    Closed,
    #[error("key of {0} bytes is too long to forward")]
    KeyTooLong(usize),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Connections to every peer this node forwards to.
pub struct MuxClient {
    hello: Bytes,
    timeout: Duration,
    connections: RwLock<HashMap<String, Arc<Connection>>>,
    /// One lock per peer, so a peer that does not answer delays only forwards to it.
    connecting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl MuxClient {
    /// `timeout` bounds connecting, the hello, and each forward.
    pub fn new(hello: &Hello, timeout: Duration) -> Self {
        let mut bytes = BytesMut::from(&MAGIC[..]);
        encode_json(&mut bytes, hello);
        MuxClient {
            hello: bytes.freeze(),
            timeout,
            connections: RwLock::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
        }
    }

    /// Forwards one key request to `peer`, which routes under `epoch`, and waits for its
    /// answer within the timeout.
    pub async fn call(
        &self,
        peer: &str,
        epoch: u64,
        key: &str,
        op: &KvOp,
    ) -> Result<Answer, MuxError> {
        if key.len() > u16::MAX as usize {
            return Err(MuxError::KeyTooLong(key.len()));
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let connection = tokio::time::timeout_at(deadline, self.connection(peer))
            .await
            .map_err(|_| MuxError::TimedOut(self.timeout))??;
        connection
            .call(epoch, key, op, deadline, self.timeout)
            .await
    }

    fn live(&self, peer: &str) -> Option<Arc<Connection>> {
        self.connections
            .read()
            .get(peer)
            .filter(|c| c.is_open())
            .cloned()
    }

    async fn connection(&self, peer: &str) -> Result<Arc<Connection>, MuxError> {
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
        let connection = Connection::open(peer, &self.hello, stall_limit(self.timeout)).await?;
        tracing::debug!(peer, "mux connection open");
        self.connections
            .write()
            .insert(peer.to_string(), connection.clone());
        Ok(connection)
    }
}

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

/// A forward's entry while it waits; dropped unanswered (timed out, or its client went
/// away), it cancels the request at the peer.
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

/// TCP keepalive and a user timeout, so that a peer that vanished (no FIN, no RST) fails
/// the connection within seconds instead of when the kernel gives up.
fn watch_liveness(stream: &TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(2))
            .with_interval(Duration::from_secs(1))
            .with_retries(3),
    )?;
    socket.set_tcp_user_timeout(Some(Duration::from_secs(5)))
}

impl Connection {
    async fn open(
        peer: &str,
        hello: &[u8],
        stall_limit: Duration,
    ) -> Result<Arc<Connection>, MuxError> {
        let mut stream = TcpStream::connect(peer).await.map_err(MuxError::Connect)?;
        stream.set_nodelay(true).map_err(MuxError::Connect)?;
        watch_liveness(&stream).map_err(MuxError::Connect)?;
        stream.write_all(hello).await.map_err(MuxError::Connect)?;
        let mut buffer = BytesMut::with_capacity(256);
        let answer = loop {
            if let Some(frame) = next_frame(&mut buffer)? {
                break serde_json::from_slice::<HelloAnswer>(&frame)
                    .map_err(|_| FrameError::Malformed("hello answer"))?;
            }
            if stream
                .read_buf(&mut buffer)
                .await
                .map_err(MuxError::Connect)?
                == 0
            {
                return Err(MuxError::Closed);
            }
        };
        if answer.status != 200 {
            return Err(MuxError::Refused {
                status: answer.status,
                error: answer.error.unwrap_or_default(),
            });
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
        tokio::spawn(write_requests(connection.clone(), writer, stall_limit));
        Ok(connection)
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Marks the connection closed, stops its tasks, fails every waiting forward and drops
    /// what was not sent.
    fn close(&self, why: &str) {
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::debug!(peer = %self.peer, why, "mux connection closed");
            self.closed.send_replace(true);
            self.waiting.lock().clear();
            *self.queued.lock() = BytesMut::new();
        }
    }

    async fn call(
        &self,
        epoch: u64,
        key: &str,
        op: &KvOp,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Answer, MuxError> {
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
            return Err(MuxError::Closed);
        }
        encode_request(&mut self.queued.lock(), id, epoch, key, op);
        self.queued_more.notify_one();
        let result = match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(MuxError::Closed),
            Err(_) => Err(MuxError::TimedOut(timeout)),
        };
        waiting.answered = result.is_ok();
        result
    }
}

/// Sends queued frames until the connection closes. Each wake-up first yields, so that every
/// forward of the current scheduling round has queued its frame, then writes them together.
async fn write_requests(
    connection: Arc<Connection>,
    mut writer: OwnedWriteHalf,
    stall_limit: Duration,
) {
    let mut closed = connection.closed.subscribe();
    loop {
        tokio::select! {
            _ = connection.queued_more.notified() => {}
            _ = closed.wait_for(|closed| *closed) => return,
        }
        tokio::task::yield_now().await;
        while let Some(batch) = take_queued(&connection.queued) {
            let mut sent = 0;
            while sent < batch.len() {
                let written = tokio::select! {
                    written = tokio::time::timeout(stall_limit, writer.write(&batch[sent..])) => written,
                    _ = closed.wait_for(|closed| *closed) => return,
                };
                match written {
                    Ok(Ok(n)) if n > 0 => sent += n,
                    Ok(Ok(_)) => return connection.close("the connection accepts no more bytes"),
                    Ok(Err(error)) => return connection.close(&error.to_string()),
                    Err(_) => return connection.close("the peer has read nothing for too long"),
                }
            }
        }
    }
}

/// Hands each answer to the forward waiting for it, until the connection closes.
async fn read_answers(
    connection: Arc<Connection>,
    mut reader: OwnedReadHalf,
    mut buffer: BytesMut,
) {
    let mut closed = connection.closed.subscribe();
    loop {
        loop {
            match next_frame(&mut buffer).and_then(decode_answer_frame) {
                Ok(Some((id, answer))) => {
                    if let Some(sender) = connection.waiting.lock().remove(&id) {
                        let _ = sender.send(answer);
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

fn decode_answer_frame(frame: Option<Bytes>) -> Result<Option<(u64, Answer)>, FrameError> {
    frame.map(decode_answer).transpose()
}

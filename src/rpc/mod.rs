//! Node-to-node RPC: every message between nodes is a variant of [`Request`] or
//! [`Response`] (see [`message`]), encoded with postcard and carried over one multiplexed
//! TCP connection per peer: numbered frames, answered in any order, cancellable.
//!
//! A connection opens with [`MAGIC`] on the peer's ordinary port (the accept loop tells it
//! from HTTP by its first bytes), then a handshake in which each side proves who it is:
//!
//! ```text
//! client → Hello       { from, vnodes, nonce }                       (JSON, ≤ 4 KiB)
//! server → HelloAnswer { status, error, address, nonce, proof }     (JSON)
//! client → Proof       { proof }                  only with a cluster token (JSON)
//! ```
//!
//! `address` is the server's own address: the client refuses a peer that answers with
//! another identity than the one it dialed. With a cluster token, `proof` is an HMAC of the
//! other side's nonce and both identities under the token (see [`crate::auth`]), so the
//! token never crosses the wire and neither side talks to a node that does not hold it.
//!
//! Then frames, each a little-endian `u32` length followed by that many bytes:
//!
//! ```text
//! request:  id u64 | kind u8 = 0 | postcard (Stamp, Request)
//! cancel:   id u64 | kind u8 = 1
//! answer:   id u64 | kind u8 = 2 | postcard (Stamp, Response)
//! ```
//!
//! Every request and answer carries the sender's [`Stamp`] (epoch and view id); the
//! receiver checks it in one place (the node's endpoint). A sender that stops waiting for
//! an answer cancels its request, so that a write it reported as failed does not land
//! later. Answers carry request ids, so a request that waits (a key in a range being handed
//! over, a long transfer) delays no other request on the connection.

pub mod client;
pub mod message;
pub mod server;

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

pub use message::{GiveUp, Refusal, Request, Response, Stamp};

/// The first bytes of an RPC connection; no HTTP request starts with them.
pub const MAGIC: &[u8; 8] = b"RKVRPC2\n";

/// Whether a connection's first bytes may be the start of [`MAGIC`] (or all of it).
pub fn may_be_magic(first: &[u8]) -> bool {
    MAGIC.starts_with(&first[..first.len().min(MAGIC.len())])
}

/// Largest frame accepted: a forwarded PUT carries a whole client body (at most the
/// `--max-body-bytes` limit, capped at 256 MiB), a transfer batch at most 1 MiB of entries
/// plus one value.
pub const MAX_FRAME: usize = 256 << 20;

/// Largest handshake message accepted: it is read before the sender is known.
pub const MAX_HELLO: usize = 4096;

/// Length of the nonces of the handshake.
pub const NONCE_BYTES: usize = 16;

/// Who opens a connection, sent once after [`MAGIC`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub from: String,
    pub vnodes: u32,
    /// Replicas per shard of the sender's mode (0, or absent: the sharded contract).
    #[serde(default)]
    pub repl_factor: u32,
    /// Hex of [`NONCE_BYTES`] random bytes, for the server's proof.
    pub nonce: String,
}

/// The server's answer to a [`Hello`]: `status` 200, or a refusal (401 without the token,
/// 409 for another vnode count).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloAnswer {
    pub status: u16,
    pub error: Option<String>,
    /// The server's own address.
    pub address: String,
    /// Hex nonce for the client's proof.
    pub nonce: String,
    /// Hex HMAC of the client's nonce, with the token (`None` without one).
    pub proof: Option<String>,
}

/// The client's proof that it holds the cluster token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proof {
    pub proof: String,
}

/// What frames can be wrong with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

const REQUEST: u8 = 0;
const CANCEL: u8 = 1;
const ANSWER: u8 = 2;

/// A frame from the calling side.
#[derive(Debug)]
pub enum Incoming {
    Request {
        id: u64,
        stamp: Stamp,
        request: Request,
    },
    /// The caller no longer waits for request `id`.
    Cancel(u64),
}

/// A postcard flavor that writes straight into a frame buffer.
struct Into<'a>(&'a mut BytesMut);

impl postcard::ser_flavors::Flavor for Into<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.put_u8(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.put_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends one frame (`id`, `kind`, then `body` in postcard) to `out`.
fn put_frame<T: Serialize>(out: &mut BytesMut, id: u64, kind: u8, body: Option<&T>) {
    let start = out.len();
    out.put_u32_le(0);
    out.put_u64_le(id);
    out.put_u8(kind);
    if let Some(body) = body {
        if postcard::serialize_with_flavor(body, Into(out)).is_err() {
            // Only a serializer bug gets here; the frame is dropped, not half-sent.
            tracing::error!(id, kind, "a message could not be encoded");
            out.truncate(start);
            return;
        }
    }
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        // The other side would close the connection on it (and a length over 4 GiB would
        // not even fit the prefix): drop it here; its caller times out.
        tracing::error!(id, kind, len, "a message is larger than a frame; not sent");
        out.truncate(start);
        return;
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
}

/// Appends the frame of a request.
pub fn encode_request(out: &mut BytesMut, id: u64, stamp: Stamp, request: &Request) {
    put_frame(out, id, REQUEST, Some(&(stamp, request)));
}

/// Appends the frame that cancels request `id`.
pub fn encode_cancel(out: &mut BytesMut, id: u64) {
    put_frame::<()>(out, id, CANCEL, None);
}

/// Appends the frame of an answer.
pub fn encode_answer(out: &mut BytesMut, id: u64, stamp: Stamp, response: &Response) {
    put_frame(out, id, ANSWER, Some(&(stamp, response)));
}

fn split_head(mut frame: Bytes) -> Result<(u64, u8, Bytes), FrameError> {
    if frame.len() < 9 {
        return Err(FrameError::Malformed("short frame"));
    }
    let id = frame.get_u64_le();
    let kind = frame.get_u8();
    Ok((id, kind, frame))
}

/// Reads a frame of the calling side.
pub fn decode_incoming(frame: Bytes) -> Result<Incoming, FrameError> {
    let (id, kind, body) = split_head(frame)?;
    match kind {
        REQUEST => {
            let (stamp, request) = postcard::from_bytes(&body)
                .map_err(|_| FrameError::Malformed("undecodable request"))?;
            Ok(Incoming::Request { id, stamp, request })
        }
        CANCEL => Ok(Incoming::Cancel(id)),
        _ => Err(FrameError::Malformed("unknown frame kind")),
    }
}

/// Reads an answer frame: its request id, the answering side's stamp and the answer.
pub fn decode_answer(frame: Bytes) -> Result<(u64, Stamp, Response), FrameError> {
    let (id, kind, body) = split_head(frame)?;
    if kind != ANSWER {
        return Err(FrameError::Malformed("not an answer"));
    }
    let (stamp, response) =
        postcard::from_bytes(&body).map_err(|_| FrameError::Malformed("undecodable answer"))?;
    Ok((id, stamp, response))
}

/// Takes the next whole frame off the front of `buffer`, if one is there.
pub fn next_frame(buffer: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    next_frame_within(buffer, MAX_FRAME)
}

/// [`next_frame`] for frames of at most `max` bytes.
pub fn next_frame_within(buffer: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    if buffer.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buffer[..4].try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    if buffer.len() < 4 + len {
        // Room for the rest of the frame, but never much more than has arrived: a length
        // alone does not make the node allocate it.
        buffer.reserve((4 + len - buffer.len()).min(1 << 20));
        return Ok(None);
    }
    buffer.advance(4);
    Ok(Some(buffer.split_to(len).freeze()))
}

/// A handshake message as one JSON frame.
pub fn encode_json<T: Serialize>(out: &mut BytesMut, message: &T) {
    let body = serde_json::to_vec(message).unwrap_or_default();
    out.put_u32_le(body.len() as u32);
    out.put_slice(&body);
}

/// Reads one JSON handshake frame of at most [`MAX_HELLO`] bytes.
pub(crate) async fn read_json<T: DeserializeOwned>(
    stream: &mut TcpStream,
    buffer: &mut BytesMut,
) -> Option<T> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(frame) = next_frame_within(buffer, MAX_HELLO).ok()? {
            return serde_json::from_slice(&frame).ok();
        }
        if stream.read_buf(buffer).await.ok()? == 0 {
            return None;
        }
    }
}

/// Makes room in a read buffer before the next read.
pub(crate) fn make_room(buffer: &mut BytesMut) {
    if buffer.capacity() - buffer.len() < 4096 {
        buffer.reserve(64 * 1024);
    }
}

/// Takes everything queued for writing, if anything is.
pub(crate) fn take_queued(queued: &parking_lot::Mutex<BytesMut>) -> Option<Bytes> {
    let mut queued = queued.lock();
    (!queued.is_empty()).then(|| queued.split().freeze())
}

/// TCP keepalive and a user timeout, so that a peer that vanished (no FIN, no RST) fails
/// the connection within seconds instead of when the kernel gives up. Both ends set them.
pub(crate) fn watch_liveness(stream: &TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(2))
            .with_interval(Duration::from_secs(1))
            .with_retries(3),
    )?;
    socket.set_tcp_user_timeout(Some(Duration::from_secs(5)))
}

/// How long a write may make no progress before the other side counts as not reading: the
/// forward timeout, and at least 5 s so a busy peer is not given up too soon.
pub(crate) fn stall_limit(timeout: Duration) -> Duration {
    timeout.max(Duration::from_secs(5))
}

/// Writes `batch` whole, failing when a write makes no progress for `stall`.
pub(crate) async fn write_within(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    batch: &[u8],
    stall: Duration,
) -> Result<(), &'static str> {
    use tokio::io::AsyncWriteExt;
    let mut sent = 0;
    while sent < batch.len() {
        match tokio::time::timeout(stall, writer.write(&batch[sent..])).await {
            Ok(Ok(n)) if n > 0 => sent += n,
            Ok(Ok(_)) => return Err("the connection accepts no more bytes"),
            Ok(Err(_)) => return Err("the connection failed"),
            Err(_) => return Err("the other side has read nothing for too long"),
        }
    }
    Ok(())
}

/// Random bytes for a handshake nonce, in hex.
pub(crate) fn nonce() -> String {
    let mut bytes = [0u8; NONCE_BYTES];
    // The OS's generator does not fail on Linux; a zero nonce would only weaken replay
    // protection, never let a node without the token in.
    let _ = getrandom::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvOp, KvOutcome};

    #[test]
    fn frames_round_trip_even_split_byte_by_byte() {
        let stamp = Stamp {
            epoch: 3,
            view_id: 9,
        };
        let mut all = BytesMut::new();
        encode_request(
            &mut all,
            7,
            stamp,
            &Request::Kv {
                key: "kéy".into(),
                op: KvOp::Put(Bytes::from_static(b"{\"a\":1}")),
                give_up: GiveUp(1_700_000_000_000),
            },
        );
        encode_cancel(&mut all, 8);
        encode_answer(
            &mut all,
            7,
            stamp,
            &Response::Kv(KvOutcome::Found(Bytes::from_static(b"12"))),
        );
        let mut buffer = BytesMut::new();
        let mut frames = Vec::new();
        for byte in all.iter() {
            buffer.put_u8(*byte);
            while let Some(frame) = next_frame(&mut buffer).unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 3);
        match decode_incoming(frames[0].clone()).unwrap() {
            Incoming::Request {
                id,
                stamp: s,
                request,
            } => {
                assert_eq!((id, s), (7, stamp));
                assert_eq!(
                    request,
                    Request::Kv {
                        key: "kéy".into(),
                        op: KvOp::Put(Bytes::from_static(b"{\"a\":1}")),
                        give_up: GiveUp(1_700_000_000_000),
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode_incoming(frames[1].clone()),
            Ok(Incoming::Cancel(8))
        ));
        let (id, s, response) = decode_answer(frames[2].clone()).unwrap();
        assert_eq!((id, s), (7, stamp));
        assert_eq!(
            response,
            Response::Kv(KvOutcome::Found(Bytes::from_static(b"12")))
        );
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let mut huge = BytesMut::new();
        huge.put_u32_le(u32::MAX);
        assert_eq!(
            next_frame(&mut huge),
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
        let mut hello = BytesMut::new();
        hello.put_u32_le(MAX_HELLO as u32 + 1);
        assert_eq!(
            next_frame_within(&mut hello, MAX_HELLO),
            Err(FrameError::TooLarge(MAX_HELLO + 1))
        );
        assert!(decode_incoming(Bytes::from_static(b"short")).is_err());
        assert!(decode_incoming(Bytes::from_static(b"\0\0\0\0\0\0\0\0\x00\xff\xff")).is_err());
        assert!(decode_incoming(Bytes::from_static(b"\0\0\0\0\0\0\0\0\x09")).is_err());
        assert!(decode_answer(Bytes::from_static(b"\0\0\0\0\0\0\0\0\x02\x01")).is_err());
        // A key that is not UTF-8 does not decode.
        let mut bad_key = BytesMut::new();
        bad_key.put_u64_le(1);
        bad_key.put_u8(REQUEST);
        bad_key.put_slice(&[0, 0, 0, 2, 0xff, 0xfe, 0]);
        assert!(decode_incoming(bad_key.freeze()).is_err());
    }
}

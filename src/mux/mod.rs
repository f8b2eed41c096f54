//! The multiplexed forwarding protocol: how a node sends the key requests it does not own to
//! their owner. One TCP connection per peer carries every forward to it, as numbered frames
//! answered in any order, so that the forwards of one scheduling round leave in one write
//! and their answers come back in one read.
//!
//! A connection opens with [`MAGIC`] and a JSON [`Hello`] (sender, vnode count, cluster
//! token), on the node's HTTP port: the server tells it from HTTP by its first bytes. The
//! server answers with a JSON [`HelloAnswer`]; then both sides exchange frames, each a
//! little-endian `u32` length followed by that many bytes:
//!
//! ```text
//! request:  id u64 | op u8 (0 GET, 1 PUT, 2 DELETE) | epoch u64 | key length u16 | key | value
//! cancel:   id u64 | op u8 = 3 | epoch u64 = 0 | key length u16 = 0
//! answer:   id u64 | kind u8 | body   (kinds: see Answer)
//! ```
//!
//! A sender that stops waiting for an answer (its timeout passed, its client went away)
//! cancels the request, so that a write it reported as failed does not land later.
//!
//! Answers carry request ids, so a request waiting for a range being handed over delays no
//! other request on the connection (the head-of-line blocking of HTTP/1.1 pipelining).

pub mod client;
pub mod server;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::kv::{KvOp, KvOutcome};

/// The first bytes of a mux connection; no HTTP request starts with them.
pub const MAGIC: &[u8; 8] = b"RKVMUX1\n";

/// Whether a connection's first bytes may be the start of [`MAGIC`] (or all of it).
pub fn may_be_magic(first: &[u8]) -> bool {
    MAGIC.starts_with(&first[..first.len().min(MAGIC.len())])
}

/// Largest frame accepted: a forwarded PUT carries a whole client body.
pub const MAX_FRAME: usize = 256 << 20;

/// Largest hello accepted: it is read before the sender is known to hold the token.
pub const MAX_HELLO: usize = 4096;

/// Who opens a connection, sent once after [`MAGIC`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub from: String,
    pub vnodes: u32,
    pub token: Option<String>,
}

/// The server's answer to a [`Hello`]: `status` 200, or the refusal an HTTP internal request
/// would have had (401 without the token, 409 for another vnode count).
#[derive(Debug, Serialize, Deserialize)]
pub struct HelloAnswer {
    pub status: u16,
    pub error: Option<String>,
}

/// What frames can be wrong with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// A forwarded key request.
#[derive(Debug)]
pub struct Request {
    pub id: u64,
    pub epoch: u64,
    pub key: String,
    pub op: KvOp,
}

/// A frame from the sending side.
#[derive(Debug)]
pub enum Incoming {
    Request(Request),
    /// The sender no longer waits for request `id`.
    Cancel(u64),
}

/// The owner's answer to a [`Request`].
#[derive(Debug)]
pub enum Answer {
    /// kinds 0-4: what the owner did (0 carries the value).
    Served(KvOutcome),
    /// kind 5: not the owner under the receiver's view; body is a `wire::Misdirected`.
    Misdirected(Bytes),
    /// kind 6: refused; body is `u16` status then a `wire::PeerFailure` as JSON.
    Failed { status: u16, body: Bytes },
}

fn put_frame(out: &mut BytesMut, body_len: usize, fill: impl FnOnce(&mut BytesMut)) {
    out.reserve(4 + body_len);
    out.put_u32_le(body_len as u32);
    let start = out.len();
    fill(out);
    debug_assert_eq!(out.len() - start, body_len);
}

/// Appends the frame of a request to `out`.
pub fn encode_request(out: &mut BytesMut, id: u64, epoch: u64, key: &str, op: &KvOp) {
    let (code, value): (u8, &[u8]) = match op {
        KvOp::Get => (0, b""),
        KvOp::Put(value) => (1, value),
        KvOp::Delete => (2, b""),
    };
    put_frame(out, 8 + 1 + 8 + 2 + key.len() + value.len(), |out| {
        out.put_u64_le(id);
        out.put_u8(code);
        out.put_u64_le(epoch);
        out.put_u16_le(key.len() as u16);
        out.put_slice(key.as_bytes());
        out.put_slice(value);
    });
}

/// Appends the frame that cancels request `id` to `out`.
pub fn encode_cancel(out: &mut BytesMut, id: u64) {
    put_frame(out, 8 + 1 + 8 + 2, |out| {
        out.put_u64_le(id);
        out.put_u8(CANCEL);
        out.put_u64_le(0);
        out.put_u16_le(0);
    });
}

const CANCEL: u8 = 3;

/// Appends the frame of an answer to `out`.
pub fn encode_answer(out: &mut BytesMut, id: u64, answer: &Answer) {
    let (kind, status, body): (u8, Option<u16>, &[u8]) = match answer {
        Answer::Served(KvOutcome::Found(value)) => (0, None, value),
        Answer::Served(KvOutcome::Absent) => (1, None, b""),
        Answer::Served(KvOutcome::Added) => (2, None, b""),
        Answer::Served(KvOutcome::Replaced) => (3, None, b""),
        Answer::Served(KvOutcome::Deleted) => (4, None, b""),
        Answer::Misdirected(body) => (5, None, body),
        Answer::Failed { status, body } => (6, Some(*status), body),
    };
    let status_len = if status.is_some() { 2 } else { 0 };
    put_frame(out, 8 + 1 + status_len + body.len(), |out| {
        out.put_u64_le(id);
        out.put_u8(kind);
        if let Some(status) = status {
            out.put_u16_le(status);
        }
        out.put_slice(body);
    });
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

/// Reads a frame of the sending side.
pub fn decode_request(mut frame: Bytes) -> Result<Incoming, FrameError> {
    if frame.len() < 19 {
        return Err(FrameError::Malformed("short request"));
    }
    let id = frame.get_u64_le();
    let code = frame.get_u8();
    let epoch = frame.get_u64_le();
    let key_len = frame.get_u16_le() as usize;
    if frame.len() < key_len {
        return Err(FrameError::Malformed("key cut short"));
    }
    let key = String::from_utf8(frame.split_to(key_len).to_vec())
        .map_err(|_| FrameError::Malformed("key is not UTF-8"))?;
    let op = match code {
        0 => KvOp::Get,
        // A copy: a slice would keep the whole read buffer alive while the value is stored.
        1 => KvOp::Put(Bytes::copy_from_slice(&frame)),
        2 => KvOp::Delete,
        CANCEL => return Ok(Incoming::Cancel(id)),
        _ => return Err(FrameError::Malformed("unknown operation")),
    };
    Ok(Incoming::Request(Request { id, epoch, key, op }))
}

/// Reads an answer frame's body: its request id and the answer.
pub fn decode_answer(mut frame: Bytes) -> Result<(u64, Answer), FrameError> {
    if frame.len() < 9 {
        return Err(FrameError::Malformed("short answer"));
    }
    let id = frame.get_u64_le();
    let answer = match frame.get_u8() {
        0 => Answer::Served(KvOutcome::Found(frame)),
        1 => Answer::Served(KvOutcome::Absent),
        2 => Answer::Served(KvOutcome::Added),
        3 => Answer::Served(KvOutcome::Replaced),
        4 => Answer::Served(KvOutcome::Deleted),
        5 => Answer::Misdirected(frame),
        6 if frame.len() >= 2 => {
            let status = frame.get_u16_le();
            Answer::Failed {
                status,
                body: frame,
            }
        }
        _ => return Err(FrameError::Malformed("unknown answer kind")),
    };
    Ok((id, answer))
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

/// A JSON message as one frame (the hello and its answer).
pub fn encode_json<T: Serialize>(out: &mut BytesMut, message: &T) {
    let body = serde_json::to_vec(message).unwrap_or_default();
    put_frame(out, body.len(), |out| out.put_slice(&body));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_request(op: KvOp) -> Request {
        let mut buffer = BytesMut::new();
        encode_request(&mut buffer, 7, 3, "kéy", &op);
        let frame = next_frame(&mut buffer).unwrap().unwrap();
        assert!(buffer.is_empty());
        match decode_request(frame).unwrap() {
            Incoming::Request(request) => request,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cancels_round_trip() {
        let mut buffer = BytesMut::new();
        encode_cancel(&mut buffer, 42);
        let frame = next_frame(&mut buffer).unwrap().unwrap();
        assert!(matches!(decode_request(frame), Ok(Incoming::Cancel(42))));
    }

    #[test]
    fn requests_round_trip() {
        let put = round_trip_request(KvOp::Put(Bytes::from_static(b"{\"a\":1}")));
        assert_eq!((put.id, put.epoch, put.key.as_str()), (7, 3, "kéy"));
        assert!(matches!(put.op, KvOp::Put(v) if v == "{\"a\":1}"));
        assert!(matches!(round_trip_request(KvOp::Get).op, KvOp::Get));
        assert!(matches!(round_trip_request(KvOp::Delete).op, KvOp::Delete));
    }

    #[test]
    fn answers_round_trip_and_frames_split_anywhere() {
        let answers = [
            Answer::Served(KvOutcome::Found(Bytes::from_static(b"12"))),
            Answer::Served(KvOutcome::Absent),
            Answer::Served(KvOutcome::Added),
            Answer::Served(KvOutcome::Replaced),
            Answer::Served(KvOutcome::Deleted),
            Answer::Misdirected(Bytes::from_static(b"{}")),
            Answer::Failed {
                status: 401,
                body: Bytes::from_static(b"{\"error\":\"x\"}"),
            },
        ];
        let mut all = BytesMut::new();
        for (id, answer) in answers.iter().enumerate() {
            encode_answer(&mut all, id as u64, answer);
        }
        // Fed one byte at a time, every frame comes out whole and in order.
        let mut buffer = BytesMut::new();
        let mut decoded = Vec::new();
        for byte in all.iter() {
            buffer.put_u8(*byte);
            while let Some(frame) = next_frame(&mut buffer).unwrap() {
                decoded.push(decode_answer(frame).unwrap());
            }
        }
        let rendered: Vec<String> = decoded
            .iter()
            .map(|(id, a)| format!("{id} {a:?}"))
            .collect();
        let expected: Vec<String> = answers
            .iter()
            .enumerate()
            .map(|(id, a)| format!("{id} {a:?}"))
            .collect();
        assert_eq!(rendered, expected);
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
        assert!(decode_request(Bytes::from_static(b"short")).is_err());
        let mut bad_key = BytesMut::new();
        bad_key.put_u64_le(1);
        bad_key.put_u8(0);
        bad_key.put_u64_le(0);
        bad_key.put_u16_le(2);
        bad_key.put_slice(&[0xff, 0xfe]);
        assert!(decode_request(bad_key.freeze()).is_err());
        assert!(decode_answer(Bytes::from_static(b"\0\0\0\0\0\0\0\0\x09")).is_err());
        assert!(decode_answer(Bytes::from_static(b"\0\0\0\0\0\0\0\0\x06\x01")).is_err());
    }
}

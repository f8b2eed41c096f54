//! Gives hyper's automatic replies to requests it cannot parse (400, 414, 431) the JSON body
//! the contract requires: an IO wrapper that rewrites them on their way to the socket.
//!
//! hyper answers a request it cannot parse (a bad method token, a space in the target, a
//! malformed header, headers or a target over its limits) itself, before any service runs,
//! with an empty-bodied `400`, `414` or `431` and `connection: close`, and offers no hook to
//! change it. Every reply ringkv writes has a `content-type` (relays of a forwarding instance
//! too), so such a head without one can only be an automatic reply; the wrapper swaps in a
//! copy with a JSON body. hyper closes the connection after it, so it is the last buffer
//! of its write.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An IO stream whose automatic hyper error replies get a JSON body.
pub struct JsonParseErrors<S> {
    inner: S,
    /// A rewritten reply being written: its bytes, how many are written, and how many bytes
    /// of hyper's original to report as written once it is all out.
    rewrite: Option<Rewrite>,
}

struct Rewrite {
    bytes: Vec<u8>,
    written: usize,
    replaces: usize,
}

impl<S> JsonParseErrors<S> {
    pub fn new(inner: S) -> Self {
        JsonParseErrors {
            inner,
            rewrite: None,
        }
    }
}

const STATUS_PREFIX: &[u8] = b"HTTP/1.1 4";
const EMPTY_BODY: &[u8] = b"\r\ncontent-length: 0\r\n";

/// Whether `buf` is the whole head of one of hyper's automatic error replies.
fn is_automatic_reply(buf: &[u8]) -> bool {
    buf.starts_with(STATUS_PREFIX)
        && matches!(buf.get(9..13), Some(b"400 " | b"414 " | b"431 "))
        && buf.ends_with(b"\r\n\r\n")
        && find(buf, EMPTY_BODY).is_some()
        && find(buf, b"\r\nconnection: close\r\n").is_some()
        && find(buf, b"\r\ncontent-type:").is_none()
}

/// If `head` is one of hyper's automatic error replies, the same reply with a JSON body.
pub fn rewrite_automatic_reply(head: &[u8]) -> Option<Vec<u8>> {
    if !is_automatic_reply(head) {
        return None;
    }
    let at = find(head, EMPTY_BODY)?;
    let status = head.get(9..12)?;
    let error = match status {
        b"400" => "Malformed request",
        b"414" => "Request target too long",
        b"431" => "Request headers too large",
        _ => "Bad request",
    };
    let body = serde_json::json!({"error": error, "message": "Error in request"}).to_string();
    let mut reply = Vec::with_capacity(head.len() + body.len() + 48);
    reply.extend_from_slice(&head[..at]);
    reply.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
    reply.extend_from_slice(body.len().to_string().as_bytes());
    reply.extend_from_slice(&head[at + EMPTY_BODY.len() - 2..]);
    reply.extend_from_slice(body.as_bytes());
    Some(reply)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl<S: AsyncWrite + Unpin> JsonParseErrors<S> {
    /// Writes the pending rewrite; ready with the original's length once all of it is out.
    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let rewrite = self.rewrite.as_mut().expect("a rewrite is pending");
        while rewrite.written < rewrite.bytes.len() {
            let n = ready!(
                Pin::new(&mut self.inner).poll_write(cx, &rewrite.bytes[rewrite.written..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            rewrite.written += n;
        }
        let replaces = rewrite.replaces;
        self.rewrite = None;
        Poll::Ready(Ok(replaces))
    }

    fn start_rewrite(&mut self, buf: &[u8]) -> bool {
        match rewrite_automatic_reply(buf) {
            Some(bytes) => {
                tracing::debug!("answering an unparseable request with a JSON error");
                self.rewrite = Some(Rewrite {
                    bytes,
                    written: 0,
                    replaces: buf.len(),
                });
                true
            }
            None => false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonParseErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_some() || this.start_rewrite(buf) {
            return this.poll_rewrite(cx);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_some() {
            return this.poll_rewrite(cx);
        }
        // hyper queues each head as its own buffer and writes nothing after an automatic
        // reply: behind earlier replies (pipelining) it is the last buffer, rewritten once
        // those are written.
        let first = bufs.iter().position(|b| !b.is_empty());
        let last = bufs.iter().rposition(|b| !b.is_empty());
        if let (Some(first), Some(last)) = (first, last) {
            if is_automatic_reply(&bufs[last]) {
                if first == last {
                    this.start_rewrite(&bufs[last]);
                    return this.poll_rewrite(cx);
                }
                return Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs[..last]);
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.rewrite.is_some() {
            ready!(this.poll_rewrite(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
        content-length: 0\r\ndate: Wed, 25 Nov 2026 22:57:07 GMT\r\n\r\n";

    #[test]
    fn automatic_replies_get_a_json_body() {
        let reply = String::from_utf8(rewrite_automatic_reply(HYPER_400).unwrap()).unwrap();
        let body = r#"{"error":"Malformed request","message":"Error in request"}"#;
        assert_eq!(
            reply,
            format!(
                "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\ndate: Wed, 25 Nov 2026 22:57:07 GMT\r\n\r\n{body}",
                body.len()
            )
        );
    }

    #[test]
    fn replies_with_a_body_are_left_alone() {
        let ours = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n\
            content-length: 49\r\n\r\n";
        assert!(rewrite_automatic_reply(ours).is_none());
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert!(rewrite_automatic_reply(ok).is_none());
        // A relayed empty 4xx carries the content-type every ringkv reply has.
        let relayed = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
            content-type: application/json\r\ncontent-length: 0\r\n\r\n";
        assert!(rewrite_automatic_reply(relayed).is_none());
        let other_status = b"HTTP/1.1 404 Not Found\r\nconnection: close\r\n\
            content-length: 0\r\n\r\n";
        assert!(rewrite_automatic_reply(other_status).is_none());
        // A body chunk that happens to start like a head is not a head.
        assert!(rewrite_automatic_reply(b"HTTP/1.1 400 x\r\ncontent-length: 0\r\n").is_none());
    }
}

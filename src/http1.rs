//! A minimal keep-alive HTTP/1.1 client for forwarding key requests between ringkv nodes.
//!
//! A forwarded request is the hot path of every request a non-owner receives. A general
//! client hands each request to a separate connection task through channels; here the
//! requesting task writes the request and reads the answer on a pooled connection itself,
//! in one `write` and usually one `read`. It speaks only to ringkv nodes: answers must carry
//! `Content-Length` (hyper's server always does for the full bodies ringkv sends).

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer head accepted, and the most headers parsed.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection before answering")]
    Closed,
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
}

/// An answer: status and whole body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// Idle keep-alive connections per peer.
pub struct Http1Pool {
    idle: Mutex<HashMap<String, Vec<TcpStream>>>,
    max_idle_per_peer: usize,
    connect_timeout: Duration,
}

/// Builds a request: `method path HTTP/1.1`, `host`, the given headers, `content-length`.
pub fn encode_request(
    method: &str,
    peer: &str,
    path: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> Bytes {
    let mut out = BytesMut::with_capacity(160 + path.len() + body.len());
    out.put_slice(method.as_bytes());
    out.put_u8(b' ');
    out.put_slice(path.as_bytes());
    out.put_slice(b" HTTP/1.1\r\nhost: ");
    out.put_slice(peer.as_bytes());
    for (name, value) in headers {
        out.put_slice(b"\r\n");
        out.put_slice(name.as_bytes());
        out.put_slice(b": ");
        out.put_slice(value);
    }
    out.put_slice(b"\r\ncontent-length: ");
    out.put_slice(body.len().to_string().as_bytes());
    out.put_slice(b"\r\n\r\n");
    out.put_slice(body);
    out.freeze()
}

impl Http1Pool {
    pub fn new(max_idle_per_peer: usize, connect_timeout: Duration) -> Self {
        Http1Pool {
            idle: Mutex::new(HashMap::new()),
            max_idle_per_peer,
            connect_timeout,
        }
    }

    fn checkout(&self, peer: &str) -> Option<TcpStream> {
        self.idle.lock().get_mut(peer)?.pop()
    }

    fn checkin(&self, peer: &str, stream: TcpStream) {
        let mut idle = self.idle.lock();
        let streams = match idle.get_mut(peer) {
            Some(streams) => streams,
            None => idle.entry(peer.to_string()).or_default(),
        };
        if streams.len() < self.max_idle_per_peer {
            streams.push(stream);
        }
    }

    async fn connect(&self, peer: &str) -> Result<TcpStream, Http1Error> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(peer))
            .await
            .map_err(|_| Http1Error::Connect(std::io::ErrorKind::TimedOut.into()))?
            .map_err(Http1Error::Connect)?;
        stream.set_nodelay(true).map_err(Http1Error::Connect)?;
        Ok(stream)
    }

    /// Sends `request` (from [`encode_request`]) to `peer` and reads the answer. A pooled
    /// connection that fails before any byte of an answer arrived (the peer closed it while
    /// idle, or a partition or restart left it dead) is replaced by a fresh one, once.
    /// The caller bounds the whole exchange with its own timeout.
    pub async fn send(&self, peer: &str, request: &[u8]) -> Result<Answer, Http1Error> {
        if let Some(mut stream) = self.checkout(peer) {
            match exchange(&mut stream, request).await {
                Ok((answer, keep_alive)) => {
                    if keep_alive {
                        self.checkin(peer, stream);
                    }
                    return Ok(answer);
                }
                Err(Http1Error::Closed | Http1Error::Io(_)) => {}
                Err(error) => return Err(error),
            }
        }
        let mut stream = self.connect(peer).await?;
        let (answer, keep_alive) = exchange(&mut stream, request).await?;
        if keep_alive {
            self.checkin(peer, stream);
        }
        Ok(answer)
    }
}

/// The parts of an answer's head that framing needs.
struct Head {
    len: usize,
    status: u16,
    content_length: usize,
    keep_alive: bool,
}

fn parse_head(buffer: &[u8]) -> Result<Option<Head>, Http1Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buffer) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(Http1Error::Malformed("head too large")),
        Err(_) => return Err(Http1Error::Malformed("bad head")),
    };
    let status = response.code.ok_or(Http1Error::Malformed("no status"))?;
    let mut content_length = None;
    let mut keep_alive = response.version == Some(1);
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            content_length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        } else if header.name.eq_ignore_ascii_case("connection") {
            keep_alive &= !header.value.eq_ignore_ascii_case(b"close");
        }
    }
    let content_length = content_length.ok_or(Http1Error::Malformed("no content-length"))?;
    Ok(Some(Head {
        len,
        status,
        content_length,
        keep_alive,
    }))
}

/// Writes one request and reads one answer; returns whether the connection may be reused.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> Result<(Answer, bool), Http1Error> {
    stream.write_all(request).await?;
    let mut buffer = BytesMut::with_capacity(1024);
    let head = loop {
        if stream.read_buf(&mut buffer).await? == 0 {
            return Err(if buffer.is_empty() {
                Http1Error::Closed
            } else {
                Http1Error::Malformed("answer cut short")
            });
        }
        if let Some(head) = parse_head(&buffer)? {
            break head;
        }
    };
    let total = head.len + head.content_length;
    buffer.reserve(total.saturating_sub(buffer.len()));
    while buffer.len() < total {
        if stream.read_buf(&mut buffer).await? == 0 {
            return Err(Http1Error::Malformed("body cut short"));
        }
    }
    // Bytes past the answer would mean the peer sent something unasked: do not reuse.
    let keep_alive = head.keep_alive && buffer.len() == total;
    let body = buffer.split_to(total).split_off(head.len).freeze();
    Ok((
        Answer {
            status: head.status,
            body,
        },
        keep_alive,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers each request of one connection with the next canned answer,
    /// written in pieces of `piece` bytes.
    async fn canned(answers: Vec<&'static [u8]>, piece: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            for answer in answers {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await.unwrap();
                for chunk in answer.chunks(piece) {
                    stream.write_all(chunk).await.unwrap();
                    stream.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
            }
        });
        address
    }

    #[tokio::test]
    async fn reads_answers_in_pieces_and_reuses_the_connection() {
        let peer = canned(
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}",
            ],
            3,
        )
        .await;
        let pool = Http1Pool::new(4, Duration::from_secs(1));
        let request = encode_request("GET", &peer, "/internal/kv/kx", &[], b"");
        let first = pool.send(&peer, &request).await.unwrap();
        assert_eq!((first.status, &first.body[..]), (200, &b"hello"[..]));
        // The canned server accepts one connection only: this answer proves reuse.
        let second = pool.send(&peer, &request).await.unwrap();
        assert_eq!((second.status, &second.body[..]), (404, &b"{}"[..]));
    }

    #[tokio::test]
    async fn refuses_answers_it_cannot_frame() {
        let peer = canned(
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"],
            64,
        )
        .await;
        let pool = Http1Pool::new(4, Duration::from_secs(1));
        let request = encode_request("GET", &peer, "/", &[], b"");
        assert!(matches!(
            pool.send(&peer, &request).await,
            Err(Http1Error::Malformed("no content-length"))
        ));
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let pool = Http1Pool::new(4, Duration::from_secs(1));
        let request = encode_request("GET", &address, "/", &[], b"");
        assert!(matches!(
            pool.send(&address, &request).await,
            Err(Http1Error::Connect(_))
        ));
    }

    #[test]
    fn encodes_a_request() {
        let request = encode_request("PUT", "10.0.0.1:1", "/k", &[("x-a", b"1")], b"{}");
        assert_eq!(
            &request[..],
            b"PUT /k HTTP/1.1\r\nhost: 10.0.0.1:1\r\nx-a: 1\r\ncontent-length: 2\r\n\r\n{}"
        );
    }
}

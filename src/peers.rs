//! Talking to other nodes: typed calls over the RPC connections (forwarded key requests and
//! the view-change protocol), with bounded timeouts and the connect window, and the HTTP
//! relay of a forwarding instance to its main instance (which may be any implementation of
//! the course API, so it stays HTTP).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::kv::{KvOp, KvOutcome};
use crate::rpc::client::{CallError, Identity, RpcClient};
use crate::rpc::{GiveUp, Refusal, Request, Response, Stamp};
use crate::view::View;
use crate::wire::Misdirected;

/// The owner's answer to a forwarded key request.
#[derive(Debug)]
pub enum ForwardReply {
    Served(KvOutcome),
    /// The receiver does not own the key under its view, which is newer than ours.
    Misdirected(Misdirected),
}

/// Why a call to another node failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("{0} did not answer")]
    Unreachable(String),
    #[error("{peer} would not talk: {why}")]
    Rejected { peer: String, why: String },
    #[error("{peer} refused: {refusal}")]
    Refused { peer: String, refusal: Refusal },
    #[error("{0} sent an answer of the wrong kind")]
    BadAnswer(String),
}

impl PeerError {
    /// The peer the call went to.
    pub fn peer(&self) -> &str {
        match self {
            PeerError::Unreachable(peer)
            | PeerError::BadAnswer(peer)
            | PeerError::Rejected { peer, .. }
            | PeerError::Refused { peer, .. } => peer,
        }
    }
}

/// A status and body relayed unchanged from a main instance.
pub struct Relayed {
    pub status: StatusCode,
    pub body: Bytes,
}

type HyperClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// Every connection from this node to others.
pub struct Peers {
    rpc: RpcClient,
    /// Relays of a forwarding instance: a bare pooled hyper client.
    relay: HyperClient,
    timeout: Duration,
    /// How long a control call keeps retrying a peer whose connection fails (a node that is
    /// starting refuses connections for a moment).
    connect_window: Duration,
    forward_slots: Semaphore,
    /// A test's partition (fault hooks): every call fails as unreachable.
    cut_off: std::sync::atomic::AtomicBool,
}

/// The stamp of a message sent under `view`.
pub fn stamp_of(view: &View) -> Stamp {
    Stamp {
        epoch: view.epoch,
        view_id: view.id,
    }
}

impl Peers {
    pub fn new(
        identity: Identity,
        timeout: Duration,
        connect_window: Duration,
        max_forwards: usize,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let relay = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        Peers {
            rpc: RpcClient::new(identity, timeout),
            relay,
            timeout,
            connect_window,
            forward_slots: Semaphore::new(max_forwards),
            cut_off: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Cuts this node off from its peers, or reconnects it (the `isolated` fault hook).
    pub fn set_cut_off(&self, cut_off: bool) {
        self.cut_off
            .store(cut_off, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_cut_off(&self) -> bool {
        self.cut_off.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The forwarding timeout: how long a client request may wait on another node.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `op` on `key` to its owner `peer`, as seen in `view`: one attempt within the
    /// forwarding timeout (a dead owner gets its 503 at once).
    pub async fn forward_kv(
        &self,
        peer: &str,
        key: &str,
        op: &KvOp,
        view: &View,
    ) -> Result<ForwardReply, PeerError> {
        let deadline = Instant::now() + self.timeout;
        let unreachable = || PeerError::Unreachable(peer.to_string());
        if self.is_cut_off() {
            return Err(unreachable());
        }
        let _slot = tokio::time::timeout_at(deadline, self.forward_slots.acquire())
            .await
            .map_err(|_| unreachable())?
            .map_err(|_| unreachable())?;
        let request = Request::Kv {
            key: key.to_string(),
            op: op.clone(),
            give_up: GiveUp::after(deadline.saturating_duration_since(Instant::now())),
        };
        let (_, response) = self
            .rpc
            .call(peer, stamp_of(view), &request, deadline)
            .await
            .map_err(|error| {
                tracing::debug!(peer, %error, "forward failed");
                match error {
                    error if error.is_rejection() => PeerError::Rejected {
                        peer: peer.to_string(),
                        why: error.to_string(),
                    },
                    _ => unreachable(),
                }
            })?;
        if self.is_cut_off() {
            return Err(unreachable());
        }
        match response {
            Response::Kv(outcome) => Ok(ForwardReply::Served(outcome)),
            Response::Misdirected(newer) => Ok(ForwardReply::Misdirected(newer)),
            Response::Refused(refusal) => Err(PeerError::Refused {
                peer: peer.to_string(),
                refusal,
            }),
            _ => Err(PeerError::BadAnswer(peer.to_string())),
        }
    }

    /// Sends a control call to `peer` and waits up to `timeout` for the answer. Every
    /// control call is idempotent (a catch-up sent again re-sends every dirty key; the
    /// first one's task is aborted with its connection), so one whose connection failed is
    /// sent again: at once
    /// when an open connection turned out dead, with backoff when the peer refused the
    /// connection (a node that is starting is not listening yet), for up to the connect
    /// window. A timeout is not retried: the peer had its chance.
    pub async fn call(
        &self,
        peer: &str,
        request: &Request,
        view: &View,
        timeout: Duration,
    ) -> Result<Response, PeerError> {
        self.call_within(peer, request, view, timeout, self.connect_window)
            .await
    }

    /// [`Peers::call`] with no connect window: a peer that refuses the connection is
    /// unreachable at once (status probes must show a node that is down as down, fast).
    pub async fn ask(
        &self,
        peer: &str,
        request: &Request,
        view: &View,
    ) -> Result<Response, PeerError> {
        self.send_once(peer, request, view, self.timeout).await
    }

    /// One attempt, no connect window, answered within `timeout` (the metadata log's
    /// messages: openraft retries on its own).
    pub async fn send_once(
        &self,
        peer: &str,
        request: &Request,
        view: &View,
        timeout: Duration,
    ) -> Result<Response, PeerError> {
        self.call_within(peer, request, view, timeout, Duration::ZERO)
            .await
    }

    async fn call_within(
        &self,
        peer: &str,
        request: &Request,
        view: &View,
        timeout: Duration,
        window: Duration,
    ) -> Result<Response, PeerError> {
        if self.is_cut_off() {
            return Err(PeerError::Unreachable(peer.to_string()));
        }
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        let mut retried = false;
        let error = loop {
            let deadline = Instant::now() + timeout;
            let answer = self.rpc.call(peer, stamp_of(view), request, deadline).await;
            if self.is_cut_off() {
                // Cut off while the call was out (a test's partition): its answer is lost too.
                return Err(PeerError::Unreachable(peer.to_string()));
            }
            let error = match answer {
                Ok((_, Response::Refused(refusal))) => {
                    return Err(PeerError::Refused {
                        peer: peer.to_string(),
                        refusal,
                    })
                }
                Ok((_, response)) => return Ok(response),
                Err(CallError::TimedOut) => break CallError::TimedOut,
                Err(error) if error.is_rejection() => {
                    tracing::warn!(peer, call = request.name(), %error, "peer rejected the connection");
                    return Err(PeerError::Rejected {
                        peer: peer.to_string(),
                        why: error.to_string(),
                    });
                }
                Err(error) => error,
            };
            let remaining = window.saturating_sub(started.elapsed());
            if remaining.is_zero() && (error.is_connect() || retried) {
                break error;
            }
            if error.is_connect() || retried {
                tokio::time::sleep(pause.min(remaining)).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            retried = true;
        };
        tracing::debug!(peer, call = request.name(), %error, "no answer");
        Err(PeerError::Unreachable(peer.to_string()))
    }

    /// Relays a client request unchanged to a main instance (forwarding-instance mode).
    pub async fn relay(
        &self,
        main: &str,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Relayed, PeerError> {
        let unreachable = || PeerError::Unreachable(main.to_string());
        // The URL parser reads `\` as `/` in an http URL; `%5C` is the same key.
        let path_and_query = path_and_query.replace('\\', "%5C");
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{main}{path_and_query}"))
            .header("content-type", "application/json");
        let (status, body) = self.send(request, body).await.map_err(|_| unreachable())?;
        Ok(Relayed { status, body })
    }

    /// Sends one relayed request and reads the whole answer within the forwarding timeout.
    /// A request that fails on a pooled connection (one a partition or a peer's restart left
    /// dead) is sent once more on a fresh connection; a refused connection is not retried.
    async fn send(
        &self,
        request: hyper::http::request::Builder,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ()> {
        let (parts, ()) = request.body(()).map_err(|_| ())?.into_parts();
        let exchange = async {
            let mut retried = false;
            loop {
                let mut request = hyper::Request::new(Full::new(body.clone()));
                *request.method_mut() = parts.method.clone();
                *request.uri_mut() = parts.uri.clone();
                *request.headers_mut() = parts.headers.clone();
                match self.relay.request(request).await {
                    Ok(response) => {
                        let status = response.status();
                        let body = response.into_body().collect().await.map_err(|_| ())?;
                        return Ok((status, body.to_bytes()));
                    }
                    Err(error) if !retried && !error.is_connect() => retried = true,
                    Err(_) => return Err(()),
                }
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ())?
    }
}

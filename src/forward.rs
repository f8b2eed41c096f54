//! Talking to other nodes: one pooled HTTP client with bounded timeouts, used to forward
//! key requests to their owner, relay a forwarding instance's requests, and carry the
//! view-change protocol.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::mux::client::{MuxClient, MuxError};
use crate::mux::{Answer, Hello};

use crate::auth::{ClusterToken, TOKEN_HEADER};
use crate::kv::{KvOp, KvOutcome};
use crate::view::View;
use crate::wire::{
    Misdirected, PeerFailure, EPOCH_HEADER, FROM_HEADER, VIEW_HEADER, VNODES_HEADER,
};

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
    #[error("{peer} refused: {status} {failure:?}")]
    Refused {
        peer: String,
        status: u16,
        failure: PeerFailure,
    },
    #[error("{0} sent an answer that could not be read")]
    BadAnswer(String),
}

/// One pooled client for all traffic to other nodes.
pub struct Peers {
    /// Control-plane calls (JSON phases of a view change, state probes).
    client: reqwest::Client,
    /// Relays of a forwarding instance: a bare pooled hyper client (the main instance may
    /// be any implementation of the course API).
    data: HyperClient,
    /// Forwarded key requests, the hot path: one multiplexed connection per peer.
    forwards: MuxClient,
    own_address: String,
    vnodes: u32,
    timeout: Duration,
    /// How long a control call keeps retrying a peer whose connection fails (a node that is
    /// starting refuses connections for a moment).
    connect_window: Duration,
    forward_slots: Semaphore,
    /// The cluster token, sent on every internal request.
    token: Option<reqwest::header::HeaderValue>,
}

/// A status and body relayed unchanged from a main instance.
pub struct Relayed {
    pub status: StatusCode,
    pub body: Bytes,
}

type HyperClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

fn forward_hello(own_address: &str, vnodes: u32, token: Option<&ClusterToken>) -> Hello {
    Hello {
        from: own_address.to_string(),
        vnodes,
        token: token.map(|t| t.secret().to_string()),
    }
}

fn view_header(view: &View) -> String {
    format!("{:016x}", view.id)
}

impl Peers {
    pub fn new(
        own_address: &str,
        vnodes: u32,
        timeout: Duration,
        connect_window: Duration,
        max_forwards: usize,
    ) -> Self {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(256)
            .pool_idle_timeout(Duration::from_secs(60))
            // A peer cut off mid-call (a partition, not a closed socket) is noticed within
            // seconds even on a long transfer call, instead of when the kernel gives up.
            .tcp_keepalive(Duration::from_secs(2))
            .tcp_keepalive_interval(Duration::from_secs(1))
            .tcp_keepalive_retries(3)
            .tcp_user_timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .expect("an HTTP client without TLS always builds");
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let data = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        Peers {
            client,
            data,
            forwards: MuxClient::new(&forward_hello(own_address, vnodes, None), timeout),
            own_address: own_address.to_string(),
            vnodes,
            timeout,
            connect_window,
            forward_slots: Semaphore::new(max_forwards),
            token: None,
        }
    }

    /// Sends `token` on every internal request (the cluster's `--cluster-token`).
    pub fn with_token(mut self, token: Option<&ClusterToken>) -> Self {
        self.token = token.map(ClusterToken::header_value);
        let hello = forward_hello(&self.own_address, self.vnodes, token);
        self.forwards = MuxClient::new(&hello, self.timeout);
        self
    }

    /// The forwarding timeout: how long a client request may wait on another node.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn internal(&self, method: Method, url: String, view: &View) -> reqwest::RequestBuilder {
        let request = self
            .client
            .request(method, url)
            .header(EPOCH_HEADER, view.epoch)
            .header(VIEW_HEADER, view_header(view))
            .header(VNODES_HEADER, self.vnodes)
            .header(FROM_HEADER, &self.own_address);
        match &self.token {
            Some(token) => request.header(TOKEN_HEADER, token.clone()),
            None => request,
        }
    }

    /// Sends `op` on `key` to its owner `peer`, as seen in `view`.
    pub async fn forward_kv(
        &self,
        peer: &str,
        key: &str,
        op: &KvOp,
        view: &View,
    ) -> Result<ForwardReply, PeerError> {
        let unreachable = || PeerError::Unreachable(peer.to_string());
        let _slot = tokio::time::timeout(self.timeout, self.forward_slots.acquire())
            .await
            .map_err(|_| unreachable())?
            .map_err(|_| unreachable())?;
        let answer = self
            .forwards
            .call(peer, view.epoch, key, op)
            .await
            .map_err(|error| match error {
                MuxError::Refused { status, error } => PeerError::Refused {
                    peer: peer.to_string(),
                    status,
                    failure: PeerFailure {
                        error,
                        unreachable: Vec::new(),
                    },
                },
                error => {
                    tracing::debug!(peer, %error, "forward failed");
                    unreachable()
                }
            })?;
        let outcome = match answer {
            Answer::Served(outcome) => outcome,
            Answer::Misdirected(body) => {
                return serde_json::from_slice(&body)
                    .map(ForwardReply::Misdirected)
                    .map_err(|_| PeerError::BadAnswer(peer.to_string()))
            }
            Answer::Failed { status, body } => {
                return Err(PeerError::Refused {
                    peer: peer.to_string(),
                    status,
                    failure: serde_json::from_slice(&body).unwrap_or_default(),
                })
            }
        };
        Ok(ForwardReply::Served(outcome))
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
        // The URL parser under reqwest reads `\` as `/` in an http URL; `%5C` is the same key.
        let path_and_query = path_and_query.replace('\\', "%5C");
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{main}{path_and_query}"))
            .header("content-type", "application/json");
        let (status, body) = self.send(request, body).await.map_err(|_| unreachable())?;
        Ok(Relayed { status, body })
    }

    /// Sends one data-plane request and reads the whole answer within the forwarding timeout.
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
                match self.data.request(request).await {
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

    /// Calls an internal control endpoint with a JSON body (or none) and reads a JSON answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        peer: &str,
        method: Method,
        path: &str,
        body: Option<&Req>,
        view: &View,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let mut request = self
            .internal(method, format!("http://{peer}{path}"), view)
            .timeout(timeout);
        if let Some(body) = body {
            let json = serde_json::to_vec(body).expect("internal messages serialise");
            request = request
                .header("content-type", "application/json")
                .body(json);
        }
        self.finish(peer, request, self.connect_window).await
    }

    /// Like [`Peers::call`], but a peer that refuses the connection is unreachable at once:
    /// for status probes, which must show a node that is down as down, fast.
    pub async fn ask<Resp: DeserializeOwned>(
        &self,
        peer: &str,
        path: &str,
        view: &View,
    ) -> Result<Resp, PeerError> {
        let request = self
            .internal(Method::GET, format!("http://{peer}{path}"), view)
            .timeout(self.timeout);
        self.finish(peer, request, Duration::ZERO).await
    }

    /// Posts a binary batch of entries to `peer`'s staging area.
    pub async fn stage(
        &self,
        peer: &str,
        batch: Bytes,
        view: &View,
        timeout: Duration,
    ) -> Result<(), PeerError> {
        let request = self
            .internal(Method::POST, format!("http://{peer}/internal/stage"), view)
            .timeout(timeout)
            .body(batch);
        self.finish::<serde_json::Value>(peer, request, self.connect_window)
            .await
            .map(|_| ())
    }

    async fn finish<Resp: DeserializeOwned>(
        &self,
        peer: &str,
        request: reqwest::RequestBuilder,
        window: Duration,
    ) -> Result<Resp, PeerError> {
        let unreachable = || PeerError::Unreachable(peer.to_string());
        // Every control message is idempotent, so one whose connection failed is sent again:
        // at once when a pooled connection turned out dead, with backoff when the peer
        // refused (a node that is starting is not listening yet), for up to the connect
        // window (a dead pooled connection is retried once even with no window). A timeout is
        // not retried: the peer had its chance.
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        let mut retried = false;
        let mut request = request;
        let response = loop {
            let retry = request.try_clone();
            let error = match request.send().await {
                Ok(response) => break response,
                Err(error) => error,
            };
            let Some(retry) = retry.filter(|_| !error.is_timeout()) else {
                return Err(unreachable());
            };
            let remaining = window.saturating_sub(started.elapsed());
            if remaining.is_zero() && (error.is_connect() || retried) {
                tracing::debug!(peer, %error, "no answer within the connect window");
                return Err(unreachable());
            }
            if error.is_connect() || retried {
                tokio::time::sleep(pause.min(remaining)).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            retried = true;
            request = retry;
        };
        let status = response.status();
        let body = response.bytes().await.map_err(|_| unreachable())?;
        if !status.is_success() {
            return Err(PeerError::Refused {
                peer: peer.to_string(),
                status: status.as_u16(),
                failure: serde_json::from_slice(&body).unwrap_or_default(),
            });
        }
        serde_json::from_slice(&body).map_err(|_| PeerError::BadAnswer(peer.to_string()))
    }
}

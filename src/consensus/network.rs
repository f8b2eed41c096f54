//! openraft's network over the node-to-node RPC layer: each Raft message travels as one
//! `Request::Raft` call addressed to a Raft id, on the peer's shared RPC connection (so it
//! has passed the same handshake, and the cluster token's proof, as every other call).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Snapshot, SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

use crate::meta::{MetaState, RaftId, TypeConfig};
use crate::peers::PeerError;
use crate::rpc::{Request, Response};

/// How the log's messages leave this node: implemented by the node (a call to `peer` with
/// the node's stamp), so this module needs nothing of the node.
pub trait Transport: Send + Sync + 'static {
    fn send(
        &self,
        peer: String,
        request: Request,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Response, PeerError>>;
}

/// A Raft message, postcard-encoded into `Request::Raft`.
#[derive(Serialize, Deserialize)]
pub enum RaftMessage {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<RaftId>),
    Snapshot {
        vote: Vote<RaftId>,
        meta: Box<SnapshotMeta<RaftId, BasicNode>>,
        state: Box<MetaState>,
    },
}

/// The answer to a [`RaftMessage`], postcard-encoded into `Response::Raft`.
#[derive(Serialize, Deserialize)]
pub enum RaftAnswer {
    Append(AppendEntriesResponse<RaftId>),
    Vote(VoteResponse<RaftId>),
    Snapshot(SnapshotResponse<RaftId>),
    /// The receiver is not that Raft node (another incarnation, or not started yet).
    NotHere(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

pub struct Network {
    pub(super) transport: Arc<dyn Transport>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: RaftId, node: &BasicNode) -> Connection {
        Connection {
            target,
            address: node.addr.clone(),
            transport: self.transport.clone(),
        }
    }
}

pub struct Connection {
    target: RaftId,
    address: String,
    transport: Arc<dyn Transport>,
}

enum Failed {
    Unreachable(Failure),
    Network(Failure),
}

impl Connection {
    async fn exchange(
        &self,
        message: RaftMessage,
        timeout: Duration,
    ) -> Result<RaftAnswer, Failed> {
        let bytes =
            postcard::to_allocvec(&message).map_err(|e| Failed::Network(Failure(e.to_string())))?;
        let request = Request::Raft {
            target: self.target,
            message: bytes,
        };
        let answer = self
            .transport
            .send(self.address.clone(), request, timeout)
            .await;
        match answer {
            Ok(Response::Raft(bytes)) => match postcard::from_bytes(&bytes) {
                Ok(RaftAnswer::NotHere(why)) => Err(Failed::Unreachable(Failure(why))),
                Ok(answer) => Ok(answer),
                Err(e) => Err(Failed::Network(Failure(e.to_string()))),
            },
            Ok(_) => Err(Failed::Network(Failure("unexpected answer".into()))),
            Err(error @ PeerError::Unreachable(_)) => {
                Err(Failed::Unreachable(Failure(error.to_string())))
            }
            Err(error) => Err(Failed::Network(Failure(error.to_string()))),
        }
    }
}

fn rpc_error<E: std::error::Error>(failed: Failed) -> RPCError<RaftId, BasicNode, E> {
    match failed {
        Failed::Unreachable(f) => RPCError::Unreachable(Unreachable::new(&f)),
        Failed::Network(f) => RPCError::Network(NetworkError::new(&f)),
    }
}

fn unexpected<E: std::error::Error>() -> RPCError<RaftId, BasicNode, E> {
    RPCError::Network(NetworkError::new(&Failure("unexpected raft answer".into())))
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<RaftId>, RPCError<RaftId, BasicNode, RaftError<RaftId>>> {
        match self
            .exchange(RaftMessage::Append(rpc), option.hard_ttl())
            .await
        {
            Ok(RaftAnswer::Append(answer)) => Ok(answer),
            Ok(_) => Err(unexpected()),
            Err(failed) => Err(rpc_error(failed)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftId>,
        option: RPCOption,
    ) -> Result<VoteResponse<RaftId>, RPCError<RaftId, BasicNode, RaftError<RaftId>>> {
        match self
            .exchange(RaftMessage::Vote(rpc), option.hard_ttl())
            .await
        {
            Ok(RaftAnswer::Vote(answer)) => Ok(answer),
            Ok(_) => Err(unexpected()),
            Err(failed) => Err(rpc_error(failed)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<RaftId>,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<RaftId>, StreamingError<TypeConfig, Fatal<RaftId>>> {
        let message = RaftMessage::Snapshot {
            vote,
            meta: Box::new(snapshot.meta),
            state: snapshot.snapshot,
        };
        match self.exchange(message, option.hard_ttl()).await {
            Ok(RaftAnswer::Snapshot(answer)) => Ok(answer),
            Ok(_) => Err(StreamingError::Network(NetworkError::new(&Failure(
                "unexpected raft answer".into(),
            )))),
            Err(Failed::Unreachable(f)) => Err(StreamingError::Unreachable(Unreachable::new(&f))),
            Err(Failed::Network(f)) => Err(StreamingError::Network(NetworkError::new(&f))),
        }
    }
}

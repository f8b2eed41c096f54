//! The request path: how a key request is executed, locally when this node owns the key,
//! otherwise by forwarding it to the owner, and how a request forwarded here is served. It
//! sees the cluster only through the node's narrow methods ([`Node::placement`],
//! [`Node::wait_until_in_force`], [`Node::wait_for_release`]) and a change in progress only
//! as "this range is moving" (record the write, or wait while it is frozen).

use std::sync::Arc;

use crate::change::Migration;
use crate::kv::{KvOp, KvOutcome};
use crate::migrate;
use crate::node::{Node, Placement, Standing};
use crate::peers::{ForwardReply, PeerError};
use crate::ring::key_hash;
use crate::rpc::{GiveUp, Stamp};
use crate::store::StoreError;
use crate::view::View;
use crate::wire::Misdirected;

/// How many times a client request is re-routed after learning of a newer view.
const MAX_ROUTES: usize = 8;

/// Why a client's key request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("the owner {0} did not answer")]
    OwnerUnreachable(String),
    #[error("the key's range stayed frozen by a view change")]
    StillMoving,
    #[error("the owner refused: {0}")]
    Refused(PeerError),
    #[error("no stable owner after {MAX_ROUTES} re-routes")]
    NoStableOwner,
    #[error("the view in force is not known yet ({0:?})")]
    ViewNotSettled(Standing),
    #[error("this node restarted empty: the keys it owned are gone")]
    Lost,
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// An answer served by `address` (`None` when this node served it).
#[derive(Debug)]
pub struct Served {
    pub outcome: KvOutcome,
    pub address: Option<Arc<str>>,
}

/// Why an owner did not serve a forwarded key request.
#[derive(Debug)]
pub enum NotServed {
    /// It does not own the key under its view (which it sends back).
    Misdirected(Misdirected),
    /// It does not know the view in force yet.
    Unsettled,
    /// The sender routes by another view at the same epoch.
    ViewMismatch,
    /// The sender had given up on it (its answer would come too late to count).
    GaveUp,
    /// Its store failed.
    Failed(StoreError),
}

/// One attempt to execute a key operation on this node.
enum Local {
    Done(KvOutcome),
    /// This node does not own the key under `view`.
    NotOwner(Arc<View>),
    /// The key's range is being handed over and frozen; retry once the change ends.
    Wait(tokio::sync::watch::Receiver<bool>),
    /// The store could not do it.
    Failed(StoreError),
    /// This node restarted empty: the key's data is gone (503, not 404).
    Lost,
}

/// Applies `op` to the store.
fn execute(node: &Node, key: &str, hash: u64, op: &KvOp) -> Result<KvOutcome, StoreError> {
    let store = node.store();
    match op {
        KvOp::Get => store.get(hash, key).map(|found| match found {
            Some(value) => KvOutcome::Found(value),
            None => KvOutcome::Absent,
        }),
        KvOp::Put(value) => store.put(hash, key, value.clone()).map(|replaced| {
            if replaced {
                KvOutcome::Replaced
            } else {
                KvOutcome::Added
            }
        }),
        KvOp::Delete => store.delete(hash, key).map(|deleted| {
            if deleted {
                KvOutcome::Deleted
            } else {
                KvOutcome::Absent
            }
        }),
    }
}

/// Executes `op` here if this node owns the key, keeping a range that is being handed
/// over consistent: writes to it are recorded for re-sending; once it is frozen, every
/// operation waits, reads too, since the new owner may commit first and take writes.
fn try_local(node: &Node, key: &str, hash: u64, op: &KvOp) -> Local {
    let lost = node.restarted();
    let moving = |migration: &Migration| {
        if migration.is_frozen() {
            return Some(Local::Wait(migration.ended()));
        }
        if op.is_write() {
            migration.record_write(key);
        }
        None
    };
    let done = node.placement(hash, |placement| match placement {
        Placement::NotOwner(view) => Err(Local::NotOwner(view.clone())),
        Placement::Owner(_) if lost => Err(Local::Lost),
        Placement::Owner(Some(migration)) => match moving(migration) {
            Some(wait) => Err(wait),
            None => Ok(execute(node, key, hash, op)),
        },
        Placement::Owner(None) => Ok(execute(node, key, hash, op)),
    });
    match done {
        Ok(Ok(outcome)) => Local::Done(outcome),
        Ok(Err(error)) => {
            tracing::error!(%error, key, "the store failed");
            Local::Failed(error)
        }
        Err(local) => local,
    }
}

/// Waits, after a write, until it is as durable as the node's `--fsync` asks.
async fn durable(node: &Node, op: &KvOp) {
    if op.is_write() {
        node.store().durable().wait().await;
    }
}

/// Serves a client's key request from wherever the key lives.
pub async fn serve_kv(node: &Arc<Node>, key: &str, op: KvOp) -> Result<Served, KvError> {
    node.wait_until_in_force()
        .await
        .map_err(KvError::ViewNotSettled)?;
    let hash = key_hash(key.as_bytes());
    // The waits and the forward are boxed: a local request's future (moved into place on
    // every request) does not carry their state.
    for _ in 0..MAX_ROUTES {
        let view = match try_local(node, key, hash, &op) {
            Local::Done(outcome) => {
                durable(node, &op).await;
                return Ok(Served {
                    outcome,
                    address: None,
                });
            }
            Local::Wait(ended) => {
                if !Box::pin(node.wait_for_release(ended)).await {
                    return Err(KvError::StillMoving);
                }
                continue;
            }
            Local::Failed(error) => return Err(error.into()),
            Local::Lost => return Err(KvError::Lost),
            Local::NotOwner(view) => view,
        };
        let owner = view.ring.owner_of_hash(hash).clone();
        let answer = Box::pin(node.peers().forward_kv(&owner, key, &op, &view)).await;
        crate::metrics::forward(&owner, answer.is_ok());
        match answer {
            Ok(ForwardReply::Served(outcome)) => {
                return Ok(Served {
                    outcome,
                    address: Some(owner),
                })
            }
            Ok(ForwardReply::Misdirected(newer)) => {
                Box::pin(migrate::learn(node, newer.epoch, Some(newer.view), &owner)).await;
            }
            Err(PeerError::Unreachable(peer)) => return Err(KvError::OwnerUnreachable(peer)),
            Err(refused) => return Err(KvError::Refused(refused)),
        }
    }
    Err(KvError::NoStableOwner)
}

/// Serves a key request forwarded by `sender`, which routed it under `stamp`. Never
/// forwards again: answers with this node's newer view when it is not the owner, and
/// refuses while it does not know the view in force, or when the sender routes by another
/// view of the same epoch (two rings; neither node can tell which is right).
pub async fn serve_forwarded(
    node: &Arc<Node>,
    key: &str,
    op: KvOp,
    give_up: GiveUp,
    stamp: Stamp,
    sender: &str,
) -> Result<KvOutcome, NotServed> {
    // The endpoint has already caught up with a newer stamp (crate::endpoint).
    node.wait_until_in_force()
        .await
        .map_err(|_| NotServed::Unsettled)?;
    let view = node.view();
    if stamp.epoch == view.epoch && stamp.view_id != view.id {
        tracing::warn!(
            from = sender,
            epoch = stamp.epoch,
            "a forward routed by another view of the same epoch"
        );
        return Err(NotServed::ViewMismatch);
    }
    let hash = key_hash(key.as_bytes());
    let misdirected = |view: &View| {
        NotServed::Misdirected(Misdirected {
            epoch: view.epoch,
            view: view.members.clone(),
        })
    };
    loop {
        // Checked just before each attempt: nothing awaits between it and the write.
        if give_up.passed() {
            return Err(NotServed::GaveUp);
        }
        match try_local(node, key, hash, &op) {
            Local::Done(outcome) => {
                durable(node, &op).await;
                return Ok(outcome);
            }
            Local::Wait(ended) => {
                if !node.wait_for_release(ended).await {
                    return Err(misdirected(&node.view()));
                }
            }
            Local::NotOwner(view) => return Err(misdirected(&view)),
            Local::Failed(error) => return Err(NotServed::Failed(error)),
            Local::Lost => return Err(NotServed::Unsettled),
        }
    }
}

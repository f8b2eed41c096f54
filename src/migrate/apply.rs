//! What a node does when its metadata log decides something ([`Effects`]), and how the log's
//! messages leave the node ([`Transport`]): the glue between [`crate::consensus`] and the
//! node, so the consensus module knows nothing of nodes.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::participant;
use crate::consensus::{Effects, Transport};
use crate::meta::{Applied, Command, MetaState};
use crate::node::Node;
use crate::peers::PeerError;
use crate::rpc::{Request, Response};
use crate::wire::Outcome;

/// The node as the log sees it (weak: the node owns its log).
pub struct Link(pub Weak<Node>);

impl Link {
    pub fn new(node: &Arc<Node>) -> Arc<Link> {
        Arc::new(Link(Arc::downgrade(node)))
    }
}

impl Effects for Link {
    fn applied(&self, command: &Command, applied: &Applied, state: &MetaState) {
        let Some(node) = self.0.upgrade() else { return };
        match (command, applied) {
            (Command::Genesis { .. }, Applied::Done) => {
                tracing::info!(
                    group = state.group,
                    view = ?state.view,
                    "the metadata group is formed"
                );
                // A learner (a node joining, maybe with another group's keys) keeps routing
                // by its view until the change that adds it commits.
                if member_in(&node, state) {
                    node.follow(state.epoch, state.view.clone());
                }
            }
            (Command::Commit { change_id }, Applied::Decided(outcome))
            | (Command::Abort { change_id }, Applied::Decided(outcome)) => {
                decided(&node, *change_id, *outcome, state);
            }
            _ => {}
        }
    }

    fn installed(&self, state: &MetaState) {
        let Some(node) = self.0.upgrade() else { return };
        if let Some(migration) = node.migration() {
            let outcome = state.outcome(migration.change_id());
            if matches!(outcome, Outcome::Committed | Outcome::Aborted) {
                decided(&node, migration.change_id(), outcome, state);
            }
        }
        if member_in(&node, state) {
            node.follow(state.epoch, state.view.clone());
        }
    }
}

/// Whether this node routes by the view `state` holds: as a member under its current Raft
/// id, or as a learner holding no key (one that was added to a change that did not go
/// through follows the group's view). A learner with keys of its own (a node of another
/// group being merged) keeps its view until the change that adds it commits.
fn member_in(node: &Node, state: &MetaState) -> bool {
    let member = node
        .meta()
        .is_some_and(|m| state.is_member(node.address(), m.id()));
    member || (node.migration().is_none() && node.store().is_empty())
}

/// Carries out on this node what the log decided for `change_id`.
fn decided(node: &Arc<Node>, change_id: u64, outcome: Outcome, state: &MetaState) {
    node.record_outcome(change_id, outcome);
    match outcome {
        Outcome::Committed => {
            // A test may hold this node's commit here (fault hooks).
            tokio::runtime::Handle::current().block_on(node.faults().commit_pause_point());
            if let Err(error) = participant::commit_now(node, change_id) {
                tracing::error!(change = change_id, %error, "applying a committed change failed");
            }
            // A member that had not prepared the change (or had already applied it) takes
            // the view the log holds. A learner replaying the log keeps its own view until
            // the change that adds it (it may hold another group's keys to hand over).
            if member_in(node, state) {
                node.follow(state.epoch, state.view.clone());
            }
            // Taken back by this change (a node that had restarted empty is a member again).
            if node
                .meta()
                .is_some_and(|m| state.is_member(node.address(), m.id()))
            {
                node.set_restarted(false);
            }
        }
        Outcome::Aborted => participant::abort_now(node, change_id),
        Outcome::Pending | Outcome::Unknown => {}
    }
}

impl Transport for Link {
    fn send(
        &self,
        peer: String,
        request: Request,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Response, PeerError>> {
        let node = self.0.clone();
        Box::pin(async move {
            let Some(node) = node.upgrade() else {
                return Err(PeerError::Unreachable(peer));
            };
            node.peers()
                .send_once(&peer, &request, &node.view(), timeout)
                .await
        })
    }
}

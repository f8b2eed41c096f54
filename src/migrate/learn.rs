//! Catching up with a view change this node heard of (a message stamped with a newer
//! epoch, or an owner that answered "misdirected" with its newer view).

use std::sync::Arc;

use crate::node::Node;
use crate::rpc::{Request, Response};
use crate::wire::Outcome;

/// Catches up with a newer epoch heard from `source`: commits the prepared change of
/// that epoch (someone committed it, so it is decided), or adopts the newer view.
pub async fn learn(node: &Arc<Node>, epoch: u64, members: Option<Vec<String>>, source: &str) {
    let current = node.view().epoch;
    if epoch <= current {
        return;
    }
    if !crate::view::epoch_within_reach(current, epoch) {
        tracing::warn!(
            epoch,
            current,
            from = source,
            "ignoring an epoch too far ahead"
        );
        return;
    }
    // A member of a group learns newer views from its log, never from gossip: it waits
    // (bounded) for its log to get there.
    // (A node the log no longer counts as a member, one a change removed, follows views
    // like any non-member: from the sender, below.)
    if let Some(meta) = node
        .meta()
        .filter(|_| node.is_log_member() || node.migration().is_some())
    {
        let timeout = node.peers().timeout();
        if meta.wait_for(timeout, |s| s.epoch >= epoch).await {
            meta.caught_up(timeout).await;
            return;
        }
        // A removed node the log no longer replicates to: the outcome, as the log of a
        // node serving the new epoch has it.
        let Some(migration) = node.migration().filter(|m| m.view().epoch == epoch) else {
            tracing::warn!(
                epoch,
                from = source,
                "a newer epoch this node's log does not have yet"
            );
            return;
        };
        let ask = Request::Outcome {
            change_id: migration.change_id(),
        };
        if let Ok(Response::Outcome(Outcome::Committed)) =
            node.peers().ask(source, &ask, &node.view()).await
        {
            tracing::info!(
                epoch,
                from = source,
                "the log committed the prepared change; applying it"
            );
            super::apply::apply_learned(node, &migration, Outcome::Committed).await;
        }
        return;
    }
    // One catch-up at a time: every forward that arrives with the newer epoch would
    // otherwise ask for it again. The others wait for it (they must not serve from the old
    // view meanwhile), then find the epoch learned.
    let _learning = node.learning().await;
    if epoch <= node.view().epoch {
        return;
    }
    // The newer view, as `source` holds it: from its answer (an owner that said
    // "misdirected"), or asked of it over this node's own connection, whose handshake saw
    // it answer as `source` (a made-up sender cannot answer for it).
    // The replicated mode needs the layout too: only the state has it.
    let given = members.filter(|_| node.replication().is_none());
    let (members, layout) = match given {
        Some(members) => (members, None),
        None => match node
            .peers()
            .ask(source, &Request::State, &node.view())
            .await
        {
            Ok(Response::State(state)) if state.epoch == epoch => (state.view, state.layout),
            Ok(Response::State(state)) => {
                tracing::warn!(epoch, their = state.epoch, from = source, "epoch moved on");
                return;
            }
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(%error, epoch, "cannot fetch the newer view");
                return;
            }
        },
    };
    node.adopt(epoch, members);
    if node.view().epoch == epoch {
        super::apply::follow_layout(node, epoch, layout.as_ref());
    }
}

/// While the node runs: a node that is not a member of the view its log applied (a change
/// removed it, and the log no longer sends it entries) asks the nodes of that view, every
/// second, for the view in force, and routes by the newer one a group answers with. Without
/// this a removed node kept the view it was removed in (and its forwards went to nodes that
/// may have been removed too) after the next changes.
pub async fn follow_while_removed(node: Arc<Node>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let Some(meta) = node.meta() else { continue };
        if !meta.state().formed() || node.is_log_member() || node.migration().is_some() {
            continue;
        }
        let view = node.view();
        for peer in view.members.iter().filter(|m| **m != **node.address()) {
            let Ok(Response::State(state)) = node.peers().ask(peer, &Request::State, &view).await
            else {
                continue;
            };
            let Some(group) = state.group.filter(|g| g.epoch > view.epoch) else {
                continue;
            };
            tracing::info!(epoch = group.epoch, from = %peer, "a removed node follows the newer view");
            node.follow(group.epoch, group.view);
            super::apply::follow_layout(&node, group.epoch, group.layout.as_ref());
            break;
        }
    }
}

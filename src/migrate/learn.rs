//! Catching up with a view change this node heard of (a message stamped with a newer
//! epoch, or an owner that answered "misdirected" with its newer view).

use std::sync::Arc;

use crate::node::Node;
use crate::rpc::{Request, Response};

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
    let members = match members {
        Some(members) => members,
        None => match node
            .peers()
            .ask(source, &Request::State, &node.view())
            .await
        {
            Ok(Response::State(state)) if state.epoch == epoch => state.view,
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
    if let Some(migration) = node.migration().filter(|m| m.view().epoch == epoch) {
        // The change prepared here is decided if a participant already serves its view.
        let same_view = crate::view::view_id(&members) == migration.view().id;
        let participant = migration.participants().iter().any(|p| p == source);
        if !(same_view && participant) {
            tracing::warn!(
                epoch,
                from = source,
                same_view,
                participant,
                "a newer epoch that is not the prepared change's; not committing"
            );
            return;
        }
        tracing::info!(
            epoch,
            from = source,
            "a peer already serves the new view; committing"
        );
        if let Err(error) = super::commit(node, None, migration.change_id()).await {
            tracing::warn!(%error, "commit on hearing a newer epoch failed");
        }
        return;
    }
    node.adopt(epoch, members);
}

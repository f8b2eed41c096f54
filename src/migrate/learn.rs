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
    if let Some(migration) = node.migration() {
        if migration.view().epoch == epoch {
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
    }
    let members = match members {
        Some(members) => members,
        // Asked over this node's own connection to `source`, whose handshake proved it
        // is `source`: a made-up sender cannot answer for it.
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
    node.adopt(epoch, members);
}

//! A replica's new writes pushed to its shard-mates at once, and a write's reply held until
//! they have it: a client is told "written" once two replicas hold the write whenever its
//! shard-mates answer, so a replica that crashes right after acknowledging loses nothing.
//! A mate that does not answer a push within [`PUSH_TIMEOUT`] is *down* to the pusher:
//! writes stop waiting for it (the shard stays available under a partition) until a later
//! push reaches it again. Pushes are batched: one call per mate carries every write it
//! lacks, so under load many replies wait on one round trip. The pull gossip
//! ([`super::exchange`]) still runs underneath and repairs anything a push missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::gossip::PULL_MAX;
use crate::node::Node;
use crate::peers::PeerError;
use crate::rpc::{Refusal, Request, Response};

/// How long a push may take before its mate counts as down.
pub const PUSH_TIMEOUT: Duration = Duration::from_millis(300);

/// How long a write's reply waits for its shard-mates at most.
pub const PUSH_WAIT: Duration = Duration::from_millis(500);

/// How often a pusher with nothing new tries the mates it counts as down.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// Waits (up to [`PUSH_WAIT`]) until every shard-mate that answers pushes holds the first
/// `counter` writes of replica `name` (this node's), pushing them now; and until they are
/// as durable here as `--fsync` asks (the fsync runs meanwhile, on its own thread).
pub async fn replicated(node: &Node, name: &str, counter: u64) {
    let local = node.store().durable();
    let Some(replication) = node.replication() else {
        return local.wait().await;
    };
    let pushes = replication.pushes();
    let mut heard = pushes.heard();
    pushes.wrote();
    let mates = replication.mates();
    let everyone = || {
        mates
            .iter()
            .all(|mate| pushes.is_down(mate) || replication.mate_has(mate, name) >= counter)
    };
    let waited = tokio::time::timeout(PUSH_WAIT, async {
        while !everyone() {
            if heard.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    if waited.is_err() {
        tracing::debug!(name, counter, "a write's mates did not confirm it in time");
    }
    local.wait().await;
}

/// The push task of a replicated node: one pusher per shard-mate (so a mate that does not
/// answer never holds up the others' pushes); ends with the process.
pub async fn run(node: Arc<Node>) {
    let Some(replication) = node.replication() else {
        return;
    };
    let mut pushers: HashMap<String, JoinHandle<()>> = HashMap::new();
    loop {
        pushers.retain(|_, task| !task.is_finished());
        for mate in replication.mates() {
            if let std::collections::hash_map::Entry::Vacant(slot) = pushers.entry(mate) {
                let task = tokio::spawn(push_to(node.clone(), slot.key().clone()));
                slot.insert(task);
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// Pushes this node's new writes to `mate` as they come, while it is a shard-mate.
async fn push_to(node: Arc<Node>, mate: String) {
    let Some(replication) = node.replication() else {
        return;
    };
    let pushes = replication.pushes();
    let mut written = pushes.written();
    loop {
        let _ = tokio::time::timeout(RETRY_EVERY, written.changed()).await;
        if !replication.mates().contains(&mate) {
            return;
        }
        let Some(replica) = replication.replica() else {
            continue;
        };
        let Some(writes) = replica.since(&replication.mate_vector(&mate), PULL_MAX) else {
            continue; // The mate needs a refill, which it asks for itself.
        };
        if writes.is_empty() && !pushes.is_down(&mate) {
            continue;
        }
        let sent = writes.len();
        // What the mate must hold of this replica's writes once it took the push in.
        let upto = writes
            .iter()
            .filter(|w| w.origin == replica.name())
            .map(|w| w.counter)
            .max()
            .unwrap_or(0);
        let request = Request::Push { writes };
        let answer = node
            .peers()
            .send_once(&mate, &request, &node.view(), PUSH_TIMEOUT)
            .await;
        match answer {
            Ok(Response::Pushed(applied)) => {
                crate::metrics::gossip_sent(sent);
                replication.note_mate(&mate, &applied);
                // A mate that could not take them in (it lacks earlier writes: restarted
                // empty, it waits for a refill) is not one writes can wait for yet.
                pushes.heard_from(&mate, applied.get(replica.name()) >= upto);
            }
            // A mate under another view (one side of a change has committed, the other not
            // yet) is neither down nor holding the writes: the writes wait, bounded.
            Err(PeerError::Refused {
                refusal: Refusal::BadView(_),
                ..
            }) => {}
            _ => pushes.heard_from(&mate, false),
        }
    }
}

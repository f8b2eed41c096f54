//! Start-up: learning which view is in force before routing a single key.
//!
//! A node's `VIEW` is what it was told, and the course starts a joining node with the view
//! the cluster will have *after* the next view change, while the members still hold the
//! current one. Routing by a ring nobody else holds gives wrong answers (404 for keys that
//! exist, writes stored where nobody looks), so a node first asks the other members of its
//! start view which view they hold, and serves keys only once it knows (see
//! [`Standing`]). The rule, also in docs/DESIGN.md "Start-up: the view in force":
//!
//! 1. a member that answers with a newer epoch has seen a view change: learn its view;
//! 2. if every other member of the start view answers with the same view, it is in force;
//! 3. otherwise each view held by someone is a candidate (the start view included), the
//!    members of every candidate are asked too, and a candidate is *in force* when every
//!    one of its members other than this node answers holding it. Exactly one in force:
//!    route by it, as a member or not. None or several: the members truly disagree and key
//!    requests get 503 until a view change brings the nodes to one view; the node asks again
//!    every second meanwhile;
//! 4. a member that refuses connections is retried for the connect window (it may be
//!    starting); if members stay silent past it and nobody who answered disagrees, the start
//!    view is served and the silent ones keep being asked in the background, so a node that
//!    comes up later holding another view is still noticed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use crate::node::{Node, Standing};
use crate::rpc::{Request, Response};
use crate::view::{parse_members, view_id, View};
use crate::wire::NodeState;

/// How long a node whose members disagree waits before asking them again.
const ASK_AGAIN: Duration = Duration::from_secs(1);

/// What one node said when asked for its state, checked: `None` when it did not answer
/// (or answered something that is not a valid state).
type Answers = BTreeMap<String, Option<Held>>;

/// A view some node holds, as it reported it (members re-parsed, identity recomputed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub epoch: u64,
    pub members: Vec<String>,
    pub id: u64,
}

impl Held {
    fn from_state(state: NodeState) -> Option<Held> {
        let members = parse_members(&state.view.join(",")).ok()?;
        Some(Held {
            epoch: state.epoch,
            id: view_id(&members),
            members,
        })
    }
}

/// What the answers say about the view in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `from` serves a newer epoch: a view change happened that this node missed.
    Newer { from: String, held: Held },
    /// This view, at this node's epoch, is held by every other member of it.
    InForce(Vec<String>),
    /// Nobody who answered disagrees with the start view, but these members did not answer.
    Unconfirmed(Vec<String>),
    /// No single view is held by all its members.
    Disputed,
}

/// Judges `answers` (every node asked, by address) for a node at `me` holding `own`.
pub fn judge(own: &View, me: &str, answers: &Answers) -> Verdict {
    let newest = answers
        .iter()
        .filter_map(|(from, held)| Some((from, held.as_ref()?)))
        .filter(|(_, held)| held.epoch > own.epoch)
        .max_by_key(|(_, held)| held.epoch);
    if let Some((from, held)) = newest {
        return Verdict::Newer {
            from: from.clone(),
            held: held.clone(),
        };
    }
    let mut candidates: Vec<(u64, &[String])> = vec![(own.id, &own.members)];
    for held in answers.values().flatten() {
        if held.epoch == own.epoch && !candidates.iter().any(|(id, _)| *id == held.id) {
            candidates.push((held.id, &held.members));
        }
    }
    if candidates.len() == 1 {
        let silent: Vec<String> = own
            .members
            .iter()
            .filter(|m| **m != me && !matches!(answers.get(*m), Some(Some(_))))
            .cloned()
            .collect();
        return if silent.is_empty() {
            Verdict::InForce(own.members.clone())
        } else {
            Verdict::Unconfirmed(silent)
        };
    }
    let held_by_all = |id: u64, members: &[String]| {
        members.iter().filter(|m| **m != me).all(|m| {
            matches!(answers.get(m), Some(Some(held)) if held.id == id && held.epoch == own.epoch)
        })
    };
    let in_force: Vec<&[String]> = candidates
        .iter()
        .filter(|(id, members)| held_by_all(*id, members))
        .map(|(_, members)| *members)
        .collect();
    match in_force.as_slice() {
        [one] => Verdict::InForce(one.to_vec()),
        _ => Verdict::Disputed,
    }
}

/// Asks each of `peers` for the view it holds, all at once.
async fn ask(node: &Node, peers: impl IntoIterator<Item = String>, answers: &mut Answers) {
    let view = node.view();
    let calls = peers.into_iter().map(|peer| {
        let view = view.clone();
        async move {
            let answer = node
                .peers()
                .call(&peer, &Request::State, &view, node.peers().timeout())
                .await;
            let held = match answer {
                Ok(Response::State(state)) => Held::from_state(state),
                _ => None,
            };
            (peer, held)
        }
    });
    answers.extend(join_all(calls).await);
}

/// Asks the members of `own` and of every view they name, until nobody new is named.
async fn gather(node: &Node, own: &View) -> Answers {
    let me = node.address().as_ref();
    let mut answers = Answers::new();
    let mut to_ask: Vec<String> = own.members.iter().filter(|m| **m != me).cloned().collect();
    while !to_ask.is_empty() {
        ask(node, std::mem::take(&mut to_ask), &mut answers).await;
        for held in answers.values().flatten() {
            for member in &held.members {
                if member != me && !answers.contains_key(member) && !to_ask.contains(member) {
                    to_ask.push(member.clone());
                }
            }
        }
    }
    answers
}

/// Settles the node's start view (see the module docs); spawned once when a node starts
/// serving. Ends when the view in force is known and every member has been heard from, or
/// when a view change has decided it.
pub async fn settle(node: Arc<Node>) {
    let me = node.address().to_string();
    let mut announced_silent = false;
    loop {
        if let Some(migration) = node.migration() {
            // A view change under way decides the view; see how it ends.
            migration.ended().wait_for(|ended| *ended).await.ok();
            continue;
        }
        let own = node.view();
        if own.epoch > 0 {
            return;
        }
        let answers = gather(&node, &own).await;
        let verdict = judge(&own, &me, &answers);
        tracing::debug!(?verdict, ?answers, "start-up view check");
        match verdict {
            Verdict::Newer { from, held } => {
                tracing::info!(%from, epoch = held.epoch, "a member serves a newer view");
                crate::migrate::learn(&node, held.epoch, Some(held.members), &from).await;
                if node.view().epoch == own.epoch {
                    tracing::warn!(%from, "could not take the newer view; asking again");
                    tokio::time::sleep(ASK_AGAIN).await;
                }
            }
            Verdict::InForce(members) => {
                if node.settle(&own, Some(members), Standing::InForce) {
                    tracing::info!("the view in force is confirmed by its members");
                    return;
                }
            }
            Verdict::Unconfirmed(silent) => {
                // Every silent member was retried for the connect window: presume it down,
                // serve the start view, and keep asking it.
                if !announced_silent {
                    tracing::warn!(
                        ?silent,
                        "members did not answer within the connect window; serving the \
                         start view and asking them again in the background"
                    );
                    announced_silent = true;
                }
                node.settle(&own, None, Standing::InForce);
                tokio::time::sleep(ASK_AGAIN).await;
            }
            Verdict::Disputed => {
                if node.settle(&own, None, Standing::Disputed) {
                    tracing::warn!(
                        views = ?answers,
                        "members hold contradicting views; key requests get 503 until a \
                         view change brings them to one view"
                    );
                }
                tokio::time::sleep(ASK_AGAIN).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(members: &[&str]) -> Arc<View> {
        View::new(0, members.iter().map(|m| m.to_string()).collect(), 8).unwrap()
    }

    fn holds(epoch: u64, members: &[&str]) -> Option<Held> {
        let members: Vec<String> = members.iter().map(|m| m.to_string()).collect();
        Some(Held {
            epoch,
            id: view_id(&members),
            members,
        })
    }

    fn answers(list: &[(&str, Option<Held>)]) -> Answers {
        list.iter()
            .map(|(a, h)| (a.to_string(), h.clone()))
            .collect()
    }

    const A: &str = "10.0.0.1:1";
    const B: &str = "10.0.0.2:1";
    const C: &str = "10.0.0.3:1";
    const D: &str = "10.0.0.4:1";

    #[test]
    fn a_joining_node_with_the_future_view_routes_by_the_members_view() {
        let own = view(&[A, B, C]);
        let got = answers(&[(A, holds(0, &[A, B])), (B, holds(0, &[A, B]))]);
        assert_eq!(
            judge(&own, C, &got),
            Verdict::InForce(vec![A.into(), B.into()])
        );
    }

    #[test]
    fn members_keep_their_view_when_a_non_member_holds_another() {
        let own = view(&[A, B]);
        let got = answers(&[(B, holds(0, &[A, B]))]);
        assert_eq!(
            judge(&own, A, &got),
            Verdict::InForce(vec![A.into(), B.into()])
        );
    }

    #[test]
    fn a_node_with_a_smaller_view_joins_the_members_view() {
        let own = view(&[B, C]);
        let got = answers(&[(A, holds(0, &[A, B, C])), (B, holds(0, &[A, B, C]))]);
        assert_eq!(
            judge(&own, C, &got),
            Verdict::InForce(vec![A.into(), B.into(), C.into()])
        );
    }

    #[test]
    fn two_groups_in_force_are_a_dispute() {
        let own = view(&[A, B, C, D]);
        let got = answers(&[
            (A, holds(0, &[A, B])),
            (B, holds(0, &[A, B])),
            (C, holds(0, &[C, D])),
            (D, holds(0, &[C, D])),
        ]);
        assert_eq!(judge(&own, "10.0.0.5:1", &got), Verdict::Disputed);
    }

    #[test]
    fn an_unconfirmable_candidate_is_no_answer() {
        // The only other view's member B is silent: nothing can be told.
        let own = view(&[A, B, C]);
        let got = answers(&[(A, holds(0, &[A, B])), (B, None)]);
        assert_eq!(judge(&own, C, &got), Verdict::Disputed);
    }

    #[test]
    fn silence_alone_is_unconfirmed_and_a_newer_epoch_wins() {
        let own = view(&[A, B, C]);
        let got = answers(&[(A, holds(0, &[A, B, C])), (B, None)]);
        assert_eq!(judge(&own, C, &got), Verdict::Unconfirmed(vec![B.into()]));
        let got = answers(&[(A, holds(0, &[A, B])), (B, holds(3, &[B, D]))]);
        assert_eq!(
            judge(&own, C, &got),
            Verdict::Newer {
                from: B.into(),
                held: holds(3, &[B, D]).unwrap()
            }
        );
    }
}

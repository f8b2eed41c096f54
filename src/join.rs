//! Start-up: a node's `VIEW` is a bootstrap hint. Before routing a single key, a node
//! finds the group (the metadata log, [`crate::consensus`]) that holds the view in force,
//! or forms one with the other nodes of its start view. The rule, also in docs/DESIGN.md
//! "Start-up: bootstrap and join":
//!
//! 1. A node alone in its view forms a group of itself before it serves ([`form_alone`]).
//! 2. Otherwise it asks every other node of its start view for its state (and the nodes of
//!    every view those answers name). If some of them belong to a group, the group with the
//!    newest epoch is the one in force (two different groups at that epoch: disputed, key
//!    requests get 503 until a view change brings every node into one group):
//!    - the group's view does not name this node: it routes every key by that view, as a
//!      non-member, and keeps following the group's view until a view change adds it;
//!    - it names this node under this node's Raft id: the group formed with this node in
//!      it, and this node's own log brings it the view;
//!    - it names this node under another Raft id: this node restarted, empty. It routes by
//!      the group's view and answers 503 for the keys it owned (they are gone) until a view
//!      change takes it back (or drops it); the group's nodes log a warning.
//! 3. If nobody belongs to a group, the node with the lowest address of the start view
//!    forms one, once every node of the start view has answered holding that same start
//!    view and no group: it initializes the log with all of them as voters and writes the
//!    view as the first entry. The others wait for that entry.
//!
//! Until one of these happens, key requests wait, bounded by the forwarding timeout, then
//! get 503. Nodes are asked again every 200 ms during the connect window, then every second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::consensus::new_id;
use crate::meta::{Command, RaftId};
use crate::node::{Node, Standing};
use crate::rpc::{Request, Response};
use crate::view::View;
use crate::wire::{GroupState, NodeState};

/// How often a node asks again once the connect window has passed.
const ASK_AGAIN: Duration = Duration::from_secs(1);
/// How often during the connect window.
const ASK_SOON: Duration = Duration::from_millis(200);

/// Every node asked, by address: its state, or `None` when it did not answer.
type Answers = BTreeMap<String, Option<NodeState>>;

/// What the answers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Route by this group's view; `restarted` when it names this node under another id.
    Follow { group: GroupState, restarted: bool },
    /// This node's own log is (or will be) the group's: wait for it.
    Wait,
    /// Form the group of the start view with these nodes.
    Bootstrap(BTreeMap<RaftId, String>),
    /// Two groups at the newest epoch.
    Disputed,
}

/// The group in force among `answers`: the newest epoch, and alone at it.
fn group_in_force(answers: &Answers) -> Result<Option<&GroupState>, ()> {
    let groups: Vec<&GroupState> = answers
        .values()
        .flatten()
        .filter_map(|s| s.group.as_ref())
        .collect();
    let Some(newest) = groups.iter().map(|g| g.epoch).max() else {
        return Ok(None);
    };
    let mut at_newest = groups.into_iter().filter(|g| g.epoch == newest);
    let first = at_newest.next();
    if at_newest.any(|g| Some(g.group) != first.map(|f| f.group)) {
        return Err(());
    }
    Ok(first)
}

/// Judges `answers` for the node at `me`, Raft node `id`, started with `start`.
pub fn judge(start: &View, me: &str, id: RaftId, answers: &Answers) -> Verdict {
    match group_in_force(answers) {
        Err(()) => return Verdict::Disputed,
        Ok(Some(group)) => {
            return match group.ids.get(me) {
                Some(known) if *known == id => Verdict::Wait,
                Some(_) => Verdict::Follow {
                    group: group.clone(),
                    restarted: true,
                },
                None => Verdict::Follow {
                    group: group.clone(),
                    restarted: false,
                },
            }
        }
        Ok(None) => {}
    }
    let bootstrapper = start.members.iter().min().is_some_and(|m| m == me);
    if !bootstrapper {
        return Verdict::Wait;
    }
    let mut ids = BTreeMap::from([(id, me.to_string())]);
    for member in start.members.iter().filter(|m| **m != me) {
        match answers.get(member) {
            Some(Some(state)) if state.epoch == 0 && state.view_id == start.id => {
                ids.insert(state.raft_id, member.clone());
            }
            _ => return Verdict::Wait,
        }
    }
    Verdict::Bootstrap(ids)
}

/// Forms the group of a node alone in its start view: done before the node accepts a
/// connection (tens of milliseconds), so nothing it is sent meets a log that is not there
/// yet. False if the node is not alone, or the group could not be formed.
pub async fn form_alone(node: &Node) -> bool {
    let me = node.address().to_string();
    let start = node.view();
    let Some(meta) = node.meta() else {
        return false;
    };
    if !start.members.iter().all(|m| *m == me) || meta.state().formed() {
        return false;
    }
    let genesis = Command::Genesis {
        group: new_id(),
        view: start.members.clone(),
        ids: BTreeMap::from([(me.clone(), meta.id())]),
        layout: node.replication().map(|r| r.placed().layout().clone()),
    };
    let members = BTreeMap::from([(meta.id(), me)]);
    match meta
        .bootstrap(members, genesis, node.config().phase_timeout)
        .await
    {
        Ok(_) => true,
        Err(error) => {
            tracing::error!(%error, "could not form a group of this node alone");
            false
        }
    }
}

/// Asks each of `peers` for its state, all at once.
async fn ask(node: &Node, peers: impl IntoIterator<Item = String>, answers: &mut Answers) {
    let view = node.view();
    let calls = peers.into_iter().map(|peer| {
        let view = view.clone();
        async move {
            let answer = node.peers().ask(&peer, &Request::State, &view).await;
            let state = match answer {
                Ok(Response::State(state)) if state.address == peer => Some(*state),
                _ => None,
            };
            (peer, state)
        }
    });
    answers.extend(join_all(calls).await);
}

/// Asks the nodes of `start` and of every view they name, until nobody new is named.
async fn gather(node: &Node, start: &View) -> Answers {
    let me = node.address().as_ref();
    let mut answers = Answers::new();
    let mut to_ask: Vec<String> = start
        .members
        .iter()
        .filter(|m| **m != me)
        .cloned()
        .collect();
    while !to_ask.is_empty() {
        ask(node, std::mem::take(&mut to_ask), &mut answers).await;
        for state in answers.values().flatten() {
            let named = state.group.iter().flat_map(|g| g.view.iter());
            for member in state.view.iter().chain(named) {
                if member != me && !answers.contains_key(member) && !to_ask.contains(member) {
                    to_ask.push(member.clone());
                }
            }
        }
    }
    answers
}

/// Finds or forms the group in force (see the module docs); spawned once when a node starts
/// serving. A node that follows a group as a non-member keeps following its view until its
/// own log holds a group (a view change added it).
pub async fn settle(node: Arc<Node>) {
    let me = node.address().to_string();
    let start = node.view();
    let started = Instant::now();
    let timeout = node.config().phase_timeout;
    if start.members.iter().all(|m| *m == me) {
        // Formed before the node served (see `form_alone`).
        return;
    }
    let mut restarted_announced = false;
    loop {
        let Some(meta) = node.meta() else { return };
        if meta.state().formed() {
            return;
        }
        let answers = gather(&node, &start).await;
        let verdict = judge(&start, &me, meta.id(), &answers);
        tracing::debug!(?verdict, "start-up group check");
        match verdict {
            Verdict::Follow { group, restarted } => {
                if restarted && !restarted_announced {
                    let then = match node.replication() {
                        Some(_) => "its shard-mates refill its replica",
                        None => {
                            "the keys it held are gone and answer 503 until a view change \
                             takes it back"
                        }
                    };
                    tracing::warn!(
                        group = group.group,
                        "this node restarted empty: its group knows this address under \
                         another incarnation; {then}"
                    );
                    announce_restart(&node, &group).await;
                    restarted_announced = true;
                }
                // Not once this node's own log has a group (a change took it back).
                if meta.state().formed() {
                    return;
                }
                node.set_restarted(restarted);
                node.follow(group.epoch, group.view);
                let layout = group.layout.as_ref();
                crate::migrate::apply::follow_layout(&node, group.epoch, layout);
            }
            Verdict::Bootstrap(ids) => {
                tracing::info!(members = ?ids, "forming the group of the start view");
                let genesis = Command::Genesis {
                    group: new_id(),
                    view: start.members.clone(),
                    ids: ids.iter().map(|(id, a)| (a.clone(), *id)).collect(),
                    layout: node.replication().map(|r| r.placed().layout().clone()),
                };
                if let Err(error) = meta.bootstrap(ids, genesis, timeout).await {
                    tracing::warn!(%error, "could not form the group; asking again");
                }
            }
            Verdict::Disputed => {
                if node.standing() != Standing::Disputed {
                    tracing::warn!(
                        "nodes hold views of two groups; key requests get 503 until a view \
                         change brings them into one"
                    );
                }
                node.dispute();
            }
            Verdict::Wait => {}
        }
        let pause = if started.elapsed() < node.config().connect_window {
            ASK_SOON
        } else {
            ASK_AGAIN
        };
        tokio::time::sleep(pause).await;
    }
}

/// Tells the group's nodes that this address restarted empty (each logs a warning).
async fn announce_restart(node: &Node, group: &GroupState) {
    let me = node.address().as_ref();
    let view = node.view();
    let raft_id = node.meta().map_or(0, |m| m.id());
    let calls = group.view.iter().filter(|m| **m != me).map(|peer| {
        let (view, request) = (&view, Request::Restarted { raft_id });
        async move { node.peers().ask(peer, &request, view).await }
    });
    join_all(calls).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::view_id;

    const A: &str = "10.0.0.1:1";
    const B: &str = "10.0.0.2:1";
    const C: &str = "10.0.0.3:1";

    fn view(members: &[&str]) -> Arc<View> {
        View::new(0, members.iter().map(|m| m.to_string()).collect(), 8).unwrap()
    }

    fn state(address: &str, raft_id: u64, start: &[&str], group: Option<GroupState>) -> NodeState {
        let members: Vec<String> = start.iter().map(|m| m.to_string()).collect();
        NodeState {
            address: address.into(),
            epoch: 0,
            view_id: view_id(&members),
            view: members,
            vnodes: 8,
            key_count: 0,
            pending: None,
            raft_id,
            in_log: false,
            restarted: false,
            group,
            layout: None,
            replica: None,
        }
    }

    fn group(id: u64, epoch: u64, members: &[(&str, u64)]) -> GroupState {
        GroupState {
            group: id,
            epoch,
            view: members.iter().map(|(a, _)| a.to_string()).collect(),
            ids: members.iter().map(|(a, i)| (a.to_string(), *i)).collect(),
            change: None,
            leader: None,
            voters: Vec::new(),
            term: 0,
            layout: None,
        }
    }

    fn answers(list: Vec<(&str, Option<NodeState>)>) -> Answers {
        list.into_iter().map(|(a, s)| (a.to_string(), s)).collect()
    }

    #[test]
    fn the_lowest_address_forms_the_group_once_everyone_holds_the_start_view() {
        let start = view(&[B, A, C]);
        let all = answers(vec![
            (B, Some(state(B, 2, &[A, B, C], None))),
            (C, Some(state(C, 3, &[A, B, C], None))),
        ]);
        let expected = BTreeMap::from([(1, A.to_string()), (2, B.to_string()), (3, C.to_string())]);
        assert_eq!(judge(&start, A, 1, &all), Verdict::Bootstrap(expected));
        assert_eq!(judge(&start, B, 2, &all), Verdict::Wait);
        let silent = answers(vec![(B, Some(state(B, 2, &[A, B, C], None))), (C, None)]);
        assert_eq!(judge(&start, A, 1, &silent), Verdict::Wait);
        let other = answers(vec![
            (B, Some(state(B, 2, &[B, C], None))),
            (C, Some(state(C, 3, &[A, B, C], None))),
        ]);
        assert_eq!(judge(&start, A, 1, &other), Verdict::Wait);
    }

    #[test]
    fn a_node_follows_the_group_in_force_and_knows_when_it_restarted() {
        let start = view(&[A, B, C]);
        let g = group(9, 0, &[(A, 1), (B, 2)]);
        let got = answers(vec![
            (A, Some(state(A, 1, &[A, B], Some(g.clone())))),
            (B, Some(state(B, 2, &[A, B], Some(g.clone())))),
        ]);
        let follow = Verdict::Follow {
            group: g.clone(),
            restarted: false,
        };
        assert_eq!(judge(&start, C, 3, &got), follow);
        assert_eq!(judge(&start, B, 2, &got), Verdict::Wait);
        let restarted = Verdict::Follow {
            group: g,
            restarted: true,
        };
        assert_eq!(judge(&start, B, 7, &got), restarted);
    }

    #[test]
    fn two_groups_at_the_newest_epoch_are_a_dispute_and_a_newer_one_wins() {
        let start = view(&[A, B, C]);
        let left = group(1, 0, &[(A, 1)]);
        let right = group(2, 0, &[(B, 2)]);
        let got = answers(vec![
            (A, Some(state(A, 1, &[A], Some(left)))),
            (B, Some(state(B, 2, &[B], Some(right.clone())))),
        ]);
        assert_eq!(judge(&start, C, 3, &got), Verdict::Disputed);
        let newer = group(2, 4, &[(B, 2)]);
        let got = answers(vec![
            (A, Some(state(A, 1, &[A], Some(group(1, 0, &[(A, 1)]))))),
            (B, Some(state(B, 2, &[B], Some(newer.clone())))),
        ]);
        assert_eq!(
            judge(&start, C, 3, &got),
            Verdict::Follow {
                group: newer,
                restarted: false
            }
        );
    }
}

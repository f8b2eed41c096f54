//! The cluster's metadata as a state machine that every member applies from the consensus
//! log (see [`crate::consensus`]): the group, the view and its epoch, the Raft identity of
//! each member's incarnation, the view change in progress and the outcomes of past ones.
//! Plain data and one pure function, [`MetaState::apply`]: the log decides the order of
//! commands, this module what each one does, the same on every node.
//!
//! A view change is three entries: [`Command::Begin`] (the change and its new view, at the
//! next epoch), then either [`Command::Commit`] or [`Command::Abort`]. Whichever of the two
//! the log holds first decides the change; the other is a no-op. The commit of that entry
//! is the change's commit point: a node that was paused or cut off learns the decision from
//! the log when it comes back, and never decides on its own.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::shard::Layout;
use crate::wire::Outcome;

openraft::declare_raft_types!(
    /// The Raft types of the metadata log.
    pub TypeConfig:
        D = Command,
        R = Applied,
        SnapshotData = MetaState,
);

/// A Raft node id: one per incarnation of a node (a node that restarts empty is a new node
/// to the log, and cannot answer for the one it replaces).
pub type RaftId = u64;

/// How many decided changes the state remembers, for nodes that come back late.
pub const REMEMBERED: usize = 64;

/// A view change the log has begun.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub change_id: u64,
    pub epoch: u64,
    /// The view in force once the change commits, in the order the client listed it.
    pub view: Vec<String>,
    pub coordinator: String,
    /// Every node taking part: the old view ∪ the new view.
    pub participants: Vec<String>,
    /// The Raft ids of the nodes the change adds (learners of the log until it commits).
    pub joining: BTreeMap<String, RaftId>,
    /// Participants that came from another group: what they hand over never overwrites a
    /// key this group holds (see [`crate::change::Migration::stage`]).
    pub merging: Vec<String>,
    /// The shard layout once the change commits (the replicated mode; `None` in the
    /// sharded one).
    #[serde(default)]
    pub layout: Option<Layout>,
}

/// One entry of the metadata log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The group's first entry, written by the node that bootstrapped it.
    Genesis {
        group: u64,
        view: Vec<String>,
        ids: BTreeMap<String, RaftId>,
        /// The start view's shard layout (the replicated mode).
        #[serde(default)]
        layout: Option<Layout>,
    },
    /// A view change starts: nodes prepare it (record writes to the ranges they hand over).
    Begin(Change),
    /// The change's commit point.
    Commit { change_id: u64 },
    /// The change is abandoned; the old view stays.
    Abort { change_id: u64 },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Genesis { .. } => "genesis",
            Command::Begin(_) => "begin",
            Command::Commit { .. } => "commit",
            Command::Abort { .. } => "abort",
        }
    }
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Genesis or Begin took effect.
    Done,
    /// The change's outcome once this entry is applied: the first of Commit and Abort in
    /// the log decides, so a Commit can answer `Aborted` (and the other way round).
    Decided(Outcome),
    /// The command did not apply, and why.
    Refused(Refusal),
}

/// Why a command did not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the group is already formed")]
    Formed,
    #[error("the group is not formed yet")]
    NotFormed,
    #[error("View change in progress")]
    InProgress,
    #[error("epoch {offered} is not newer than the epoch in force ({current})")]
    StaleEpoch { offered: u64, current: u64 },
    #[error("epoch {offered} is too far ahead of the epoch in force ({current})")]
    EpochTooFar { offered: u64, current: u64 },
    #[error("the log holds no change {0}")]
    UnknownChange(u64),
}

/// An operation only the leader can carry out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaderOp {
    /// Append a command to the log and wait until it is applied on the leader.
    Write(Command),
    /// Make a node a learner (it receives the log, it does not vote).
    AddLearner { id: RaftId, address: String },
    /// Make exactly these nodes the voters (joint consensus); removed voters leave the log.
    Voters(BTreeMap<RaftId, String>),
}

/// Why a leader operation was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LeadError {
    #[error("not the leader (leader: {0:?})")]
    NotLeader(Option<String>),
    #[error("no leader answered within the timeout")]
    NoLeader,
    #[error("another membership change is being committed")]
    Busy,
    #[error("{0}")]
    Failed(String),
}

/// The state every member applies from the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// The group's identity, chosen at genesis; 0 before.
    pub group: u64,
    pub epoch: u64,
    /// The view in force, in the order it was listed.
    pub view: Vec<String>,
    /// The Raft id of each member's incarnation.
    pub ids: BTreeMap<String, RaftId>,
    /// The change the log has begun and not decided.
    pub change: Option<Change>,
    /// The last decided changes, oldest first.
    pub decided: VecDeque<(u64, Outcome)>,
    /// The shard layout in force (the replicated mode).
    #[serde(default)]
    pub layout: Option<Layout>,
}

impl MetaState {
    pub fn formed(&self) -> bool {
        self.group != 0
    }

    /// The decision the log holds for a change, if any.
    pub fn outcome(&self, change_id: u64) -> Outcome {
        if self
            .change
            .as_ref()
            .is_some_and(|c| c.change_id == change_id)
        {
            return Outcome::Pending;
        }
        self.decided
            .iter()
            .find(|(id, _)| *id == change_id)
            .map_or(Outcome::Unknown, |(_, outcome)| *outcome)
    }

    /// Whether `address`, running as Raft node `id`, is a member of the view in force.
    pub fn is_member(&self, address: &str, id: RaftId) -> bool {
        self.ids.get(address) == Some(&id)
    }

    /// Applies one command; the same on every node, for the same state and command.
    pub fn apply(&mut self, command: &Command) -> Applied {
        match command {
            Command::Genesis {
                group,
                view,
                ids,
                layout,
            } => {
                if self.formed() {
                    return Applied::Refused(Refusal::Formed);
                }
                self.group = *group;
                self.view = view.clone();
                self.ids = ids.clone();
                self.layout = layout.clone();
                Applied::Done
            }
            Command::Begin(change) => {
                if !self.formed() {
                    return Applied::Refused(Refusal::NotFormed);
                }
                if let Some(current) = &self.change {
                    return if current.change_id == change.change_id {
                        Applied::Done
                    } else {
                        Applied::Refused(Refusal::InProgress)
                    };
                }
                if change.epoch <= self.epoch {
                    return Applied::Refused(Refusal::StaleEpoch {
                        offered: change.epoch,
                        current: self.epoch,
                    });
                }
                if !crate::view::epoch_within_reach(self.epoch, change.epoch) {
                    return Applied::Refused(Refusal::EpochTooFar {
                        offered: change.epoch,
                        current: self.epoch,
                    });
                }
                self.change = Some(change.clone());
                Applied::Done
            }
            Command::Commit { change_id } => self.decide(*change_id, Outcome::Committed),
            Command::Abort { change_id } => self.decide(*change_id, Outcome::Aborted),
        }
    }

    fn decide(&mut self, change_id: u64, outcome: Outcome) -> Applied {
        let Some(change) = self.change.take_if(|c| c.change_id == change_id) else {
            return match self.outcome(change_id) {
                Outcome::Unknown | Outcome::Pending => {
                    Applied::Refused(Refusal::UnknownChange(change_id))
                }
                decided => Applied::Decided(decided),
            };
        };
        if outcome == Outcome::Committed {
            let mut ids = std::mem::take(&mut self.ids);
            ids.extend(change.joining);
            ids.retain(|address, _| change.view.contains(address));
            self.ids = ids;
            self.view = change.view;
            self.epoch = change.epoch;
            self.layout = change.layout;
        }
        self.decided.push_back((change_id, outcome));
        while self.decided.len() > REMEMBERED {
            self.decided.pop_front();
        }
        Applied::Decided(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formed() -> MetaState {
        let mut state = MetaState::default();
        let ids = BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 2)]);
        let genesis = Command::Genesis {
            group: 7,
            view: vec!["a".into(), "b".into()],
            ids,
            layout: None,
        };
        assert_eq!(state.apply(&genesis), Applied::Done);
        state
    }

    fn change(id: u64, epoch: u64) -> Change {
        Change {
            change_id: id,
            epoch,
            view: vec!["b".into(), "c".into()],
            coordinator: "a".into(),
            participants: vec!["a".into(), "b".into(), "c".into()],
            joining: BTreeMap::from([("c".to_string(), 3)]),
            merging: Vec::new(),
            layout: None,
        }
    }

    #[test]
    fn the_first_decision_in_the_log_wins() {
        let mut state = formed();
        assert_eq!(state.apply(&Command::Begin(change(9, 1))), Applied::Done);
        assert_eq!(state.outcome(9), Outcome::Pending);
        assert_eq!(
            state.apply(&Command::Abort { change_id: 9 }),
            Applied::Decided(Outcome::Aborted)
        );
        assert_eq!(
            state.apply(&Command::Commit { change_id: 9 }),
            Applied::Decided(Outcome::Aborted)
        );
        assert_eq!(state.epoch, 0);
        assert_eq!(state.view, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn a_commit_switches_view_epoch_and_ids() {
        let mut state = formed();
        state.apply(&Command::Begin(change(9, 1)));
        assert_eq!(
            state.apply(&Command::Begin(change(10, 1))),
            Applied::Refused(Refusal::InProgress)
        );
        assert_eq!(
            state.apply(&Command::Commit { change_id: 9 }),
            Applied::Decided(Outcome::Committed)
        );
        assert_eq!(state.epoch, 1);
        assert_eq!(state.view, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(
            state.ids,
            BTreeMap::from([("b".to_string(), 2), ("c".to_string(), 3)])
        );
        assert!(state.is_member("c", 3) && !state.is_member("a", 1));
        assert_eq!(
            state.apply(&Command::Begin(change(11, 1))),
            Applied::Refused(Refusal::StaleEpoch {
                offered: 1,
                current: 1
            })
        );
        assert_eq!(
            state.apply(&Command::Abort { change_id: 12 }),
            Applied::Refused(Refusal::UnknownChange(12))
        );
    }

    #[test]
    fn genesis_happens_once() {
        let mut state = formed();
        let again = Command::Genesis {
            group: 8,
            view: vec![],
            ids: BTreeMap::new(),
            layout: None,
        };
        assert_eq!(state.apply(&again), Applied::Refused(Refusal::Formed));
        assert_eq!(state.group, 7);
    }
}

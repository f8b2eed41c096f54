//! The metadata state machine as openraft drives it: applies each committed entry to
//! [`MetaState`], hands what it decided to the node ([`Effects`]) before the next entry is
//! applied, and publishes the state for readers.

use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StoredMembership,
};
use tokio::sync::{mpsc, watch};

use crate::meta::{Applied, Command, MetaState, RaftId, TypeConfig};

/// What the node does when the log decides something: called in log order, one entry at a
/// time, each after the previous one returned (a commit applies the staged keys and drops
/// the handed-over ranges before anything later is carried out), on a blocking thread, by
/// one task of its own: the log itself does not wait for it (a leader answers a proposal
/// once the state holds it). [`Metadata::effected`](super::Metadata) tells how far it got.
pub trait Effects: Send + Sync + 'static {
    /// `command` was applied with `applied`; `state` is the state after it.
    fn applied(&self, command: &Command, applied: &Applied, state: &MetaState);
    /// The state jumped to `state` (a snapshot from the leader replaced the log before it,
    /// or the node learned its Raft id after replaying a log from its data dir).
    fn installed(&self, state: &MetaState);
}

/// What readers see of the state machine.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub state: MetaState,
    pub last_applied: Option<LogId<RaftId>>,
}

enum Job {
    Applied(Command, Applied, MetaState, u64),
    Installed(MetaState, u64),
    /// Every entry up to this index is carried out once this job is reached.
    Mark(u64),
}

pub struct Machine {
    state: MetaState,
    last_applied: Option<LogId<RaftId>>,
    membership: StoredMembership<RaftId, openraft::BasicNode>,
    jobs: mpsc::UnboundedSender<Job>,
    published: watch::Sender<Arc<Published>>,
}

/// Carries out the effects of applied entries, in order; `effected` is the index of the
/// last entry done.
async fn carry_out(
    effects: Arc<dyn Effects>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    effected: watch::Sender<u64>,
) {
    while let Some(job) = jobs.recv().await {
        let effects = effects.clone();
        let (done, index) = match job {
            Job::Applied(command, applied, state, index) => (
                tokio::task::spawn_blocking(move || effects.applied(&command, &applied, &state))
                    .await,
                index,
            ),
            Job::Installed(state, index) => (
                tokio::task::spawn_blocking(move || effects.installed(&state)).await,
                index,
            ),
            Job::Mark(index) => (Ok(()), index),
        };
        if let Err(error) = done {
            tracing::error!(%error, index, "carrying out a metadata entry on this node failed");
        }
        effected.send_replace(index);
    }
}

impl Machine {
    pub fn new(
        effects: Arc<dyn Effects>,
        published: watch::Sender<Arc<Published>>,
        effected: watch::Sender<u64>,
    ) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(carry_out(effects, queue, effected));
        Machine {
            state: MetaState::default(),
            last_applied: None,
            membership: StoredMembership::default(),
            jobs,
            published,
        }
    }

    fn publish(&self) {
        self.published.send_replace(Arc::new(Published {
            state: self.state.clone(),
            last_applied: self.last_applied,
        }));
    }

    fn build(&self) -> Snapshot<TypeConfig> {
        let id = self.last_applied.map_or("0-0".to_string(), |l| {
            format!("{}-{}", l.leader_id, l.index)
        });
        Snapshot {
            meta: SnapshotMeta {
                last_log_id: self.last_applied,
                last_membership: self.membership.clone(),
                snapshot_id: id,
            },
            snapshot: Box::new(self.state.clone()),
        }
    }
}

/// Builds a snapshot from a copy of the state taken when openraft asked for a builder.
pub struct Builder(Snapshot<TypeConfig>);

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<RaftId>> {
        Ok(Snapshot {
            meta: self.0.meta.clone(),
            snapshot: self.0.snapshot.clone(),
        })
    }
}

impl RaftStateMachine<TypeConfig> for Machine {
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<RaftId>>,
            StoredMembership<RaftId, openraft::BasicNode>,
        ),
        StorageError<RaftId>,
    > {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<RaftId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut answers = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let answer = match entry.payload {
                EntryPayload::Blank => Applied::Done,
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Applied::Done
                }
                EntryPayload::Normal(command) => {
                    let applied = self.state.apply(&command);
                    let index = entry.log_id.index;
                    tracing::debug!(index, command = command.name(), ?applied, "applied");
                    let job = Job::Applied(command, applied.clone(), self.state.clone(), index);
                    let _ = self.jobs.send(job);
                    applied
                }
            };
            answers.push(answer);
        }
        if let Some(last) = self.last_applied {
            let _ = self.jobs.send(Job::Mark(last.index));
        }
        self.publish();
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        Builder(self.build())
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<MetaState>, StorageError<RaftId>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<RaftId, openraft::BasicNode>,
        snapshot: Box<MetaState>,
    ) -> Result<(), StorageError<RaftId>> {
        self.state = *snapshot;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let index = meta.last_log_id.map_or(0, |l| l.index);
        let _ = self.jobs.send(Job::Installed(self.state.clone(), index));
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<RaftId>> {
        // The state is small: the current one is always the snapshot.
        Ok(self.last_applied.is_some().then(|| self.build()))
    }
}

//! The metadata log's storage (openraft's log store): entries, vote and commit index in
//! memory, and with `--data-dir` also in a keyspace of the data directory, each change
//! forced to disk before openraft is told it is done (Raft's safety rests on a vote and an
//! appended entry surviving a crash; the log is a few entries per view change, so the
//! fsyncs cost nothing). A node in memory mode is a new incarnation on every start, so its
//! log starts empty.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};
use parking_lot::Mutex;

use crate::meta::{RaftId, TypeConfig};

/// Where a durable node keeps its log: a keyspace of the data directory's database.
#[derive(Clone)]
pub struct LogDisk {
    pub db: fjall::Database,
    pub keyspace: fjall::Keyspace,
}

const ID: &[u8] = b"id";
const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";
const ENTRY: u8 = b'e';

fn entry_key(index: u64) -> [u8; 9] {
    let mut key = [ENTRY; 9];
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

fn io_error(verb: ErrorVerb, error: impl std::fmt::Display) -> StorageError<RaftId> {
    StorageIOError::new(ErrorSubject::Logs, verb, AnyError::error(error.to_string())).into()
}

impl LogDisk {
    /// The Raft id this log was kept under, if any.
    pub fn id(&self) -> Result<Option<RaftId>, String> {
        let raw = self.keyspace.get(ID).map_err(|e| e.to_string())?;
        Ok(raw.and_then(|r| r.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Empties the log and keeps `id` as its owner's (a new incarnation).
    pub fn start_over(&self, id: RaftId) -> Result<(), String> {
        self.keyspace.clear().map_err(|e| e.to_string())?;
        self.keyspace
            .insert(ID, id.to_be_bytes())
            .map_err(|e| e.to_string())?;
        self.sync().map_err(|e| e.to_string())
    }

    fn sync(&self) -> Result<(), fjall::Error> {
        self.db.persist(fjall::PersistMode::SyncAll)
    }

    fn read<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, String> {
        let Some(raw) = self.keyspace.get(key).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        postcard::from_bytes(&raw)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn write<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), fjall::Error> {
        let raw = postcard::to_allocvec(value).expect("log records serialize");
        self.keyspace.insert(key, raw)?;
        self.sync()
    }
}

#[derive(Default)]
struct Inner {
    last_purged: Option<LogId<RaftId>>,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    committed: Option<LogId<RaftId>>,
    vote: Option<Vote<RaftId>>,
}

/// The log, shared by the Raft core and its replication readers.
#[derive(Clone, Default)]
pub struct MemLog {
    inner: Arc<Mutex<Inner>>,
    disk: Option<LogDisk>,
}

impl MemLog {
    /// The log kept on `disk` (as it was left), or in memory only.
    pub fn open(disk: Option<LogDisk>) -> Result<MemLog, String> {
        let mut inner = Inner::default();
        if let Some(disk) = &disk {
            inner.vote = disk.read(VOTE)?;
            inner.committed = disk.read::<Option<LogId<RaftId>>>(COMMITTED)?.flatten();
            inner.last_purged = disk.read::<Option<LogId<RaftId>>>(PURGED)?.flatten();
            for item in disk.keyspace.prefix([ENTRY]) {
                let (key, raw) = item.into_inner().map_err(|e| e.to_string())?;
                if key.len() != 9 {
                    continue;
                }
                match postcard::from_bytes::<Entry<TypeConfig>>(&raw) {
                    Ok(entry) => {
                        inner.entries.insert(entry.log_id.index, entry);
                    }
                    // A torn last write: the entries before it are the log.
                    Err(error) => {
                        tracing::warn!(%error, "skipping an unreadable metadata log entry");
                        break;
                    }
                }
            }
        }
        Ok(MemLog {
            inner: Arc::new(Mutex::new(inner)),
            disk,
        })
    }

    /// Runs `f` on the disk, if there is one.
    fn on_disk(
        &self,
        f: impl FnOnce(&LogDisk) -> Result<(), fjall::Error>,
    ) -> Result<(), fjall::Error> {
        match &self.disk {
            Some(disk) => f(disk),
            None => Ok(()),
        }
    }
}

impl RaftLogReader<TypeConfig> for MemLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<RaftId>> {
        let inner = self.inner.lock();
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemLog {
    type LogReader = MemLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<RaftId>> {
        let inner = self.inner.lock();
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<RaftId>) -> Result<(), StorageError<RaftId>> {
        self.on_disk(|disk| disk.write(VOTE, vote))
            .map_err(|e| io_error(ErrorVerb::Write, e))?;
        self.inner.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<RaftId>>, StorageError<RaftId>> {
        Ok(self.inner.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<RaftId>>,
    ) -> Result<(), StorageError<RaftId>> {
        self.on_disk(|disk| disk.write(COMMITTED, &committed))
            .map_err(|e| io_error(ErrorVerb::Write, e))?;
        self.inner.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<RaftId>>, StorageError<RaftId>> {
        Ok(self.inner.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<RaftId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let written = self.on_disk(|disk| {
            let mut batch = disk.db.batch();
            for entry in &entries {
                let raw = postcard::to_allocvec(entry).expect("log entries serialize");
                batch.insert(&disk.keyspace, entry_key(entry.log_id.index), raw);
            }
            batch.commit()?;
            disk.sync()
        });
        if let Err(error) = written {
            callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
            return Err(io_error(ErrorVerb::Write, error));
        }
        {
            let mut inner = self.inner.lock();
            for entry in entries {
                inner.entries.insert(entry.log_id.index, entry);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<RaftId>) -> Result<(), StorageError<RaftId>> {
        let doomed: Vec<u64> = {
            let mut inner = self.inner.lock();
            let gone = inner.entries.split_off(&log_id.index);
            gone.into_keys().collect()
        };
        self.on_disk(|disk| {
            let mut batch = disk.db.batch();
            for index in doomed {
                batch.remove(&disk.keyspace, entry_key(index));
            }
            batch.commit()?;
            disk.sync()
        })
        .map_err(|e| io_error(ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<RaftId>) -> Result<(), StorageError<RaftId>> {
        let doomed: Vec<u64> = {
            let mut inner = self.inner.lock();
            inner.last_purged = Some(log_id);
            let kept = inner.entries.split_off(&(log_id.index + 1));
            std::mem::replace(&mut inner.entries, kept)
                .into_keys()
                .collect()
        };
        self.on_disk(|disk| {
            let mut batch = disk.db.batch();
            for index in doomed {
                batch.remove(&disk.keyspace, entry_key(index));
            }
            let purged = postcard::to_allocvec(&Some(log_id)).expect("log ids serialize");
            batch.insert(&disk.keyspace, PURGED, purged);
            batch.commit()?;
            disk.sync()
        })
        .map_err(|e| io_error(ErrorVerb::Delete, e))
    }
}

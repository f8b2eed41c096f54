//! A node's data directory (`--data-dir`): one fjall database holding the node's keys (the
//! durable engine's), its metadata log, and the identity it belongs to: the address it was
//! first started with and the cluster (a fingerprint of the cluster token, if any). A data
//! dir started with another address or cluster token is refused, not silently reused.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::ClusterToken;
use crate::consensus::LogDisk;
use crate::store::durable::{DurableEngine, Recovered};
use crate::store::FsyncPolicy;

/// Why a data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("--data-dir {path}: {error}")]
    Open { path: String, error: String },
    #[error(
        "--data-dir {path} belongs to the node at {found}, not {given}: give each node its own \
         data directory (or move this one back to its node)"
    )]
    OtherAddress {
        path: String,
        found: String,
        given: String,
    },
    #[error("--data-dir {path} is in use by another ringkv process")]
    InUse { path: String },
    #[error(
        "--data-dir {path} belongs to a cluster with another cluster token: start it with \
         that cluster's token, or give this node an empty data directory"
    )]
    OtherCluster { path: String },
}

/// Who a data directory belongs to, as stored in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    address: String,
    /// A fingerprint of the cluster token (never the token), or `None` for no token.
    cluster: Option<String>,
}

const IDENTITY_KEY: &str = "identity";

/// An open data directory.
pub struct DataDir {
    path: PathBuf,
    db: fjall::Database,
}

fn fingerprint(token: &ClusterToken) -> String {
    token.prove("data-dir", "", "", "")
}

impl DataDir {
    /// Opens `path` (creating it if needed) for the node at `address` of the cluster with
    /// `token`; refuses a directory that belongs to another address or cluster.
    pub fn open(
        path: &Path,
        address: &str,
        token: Option<&ClusterToken>,
    ) -> Result<DataDir, DataDirError> {
        let shown = path.display().to_string();
        let open_error = |error: String| DataDirError::Open {
            path: shown.clone(),
            error,
        };
        std::fs::create_dir_all(path).map_err(|e| open_error(e.to_string()))?;
        let db = fjall::Database::builder(path)
            // Keys are served from memory: the disk is read once, at start-up.
            .cache_size(8 << 20)
            // What a restart after a crash replays (the journal not yet in tables) stays
            // small: fjall flushes memtables once its journals pass this.
            .max_journaling_size(64 << 20)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => DataDirError::InUse {
                    path: shown.clone(),
                },
                other => open_error(other.to_string()),
            })?;
        let meta = db
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .map_err(|e| open_error(e.to_string()))?;
        let given = Identity {
            address: address.to_string(),
            cluster: token.map(fingerprint),
        };
        let stored = meta
            .get(IDENTITY_KEY)
            .map_err(|e| open_error(e.to_string()))?
            .map(|raw| serde_json::from_slice::<Identity>(&raw))
            .transpose()
            .map_err(|e| open_error(format!("unreadable identity: {e}")))?;
        match stored {
            Some(found) if found.address != given.address => {
                return Err(DataDirError::OtherAddress {
                    path: shown,
                    found: found.address,
                    given: given.address,
                })
            }
            Some(found) if found.cluster != given.cluster => {
                return Err(DataDirError::OtherCluster { path: shown })
            }
            Some(_) => {}
            None => {
                let raw = serde_json::to_vec(&given).expect("an identity serializes");
                meta.insert(IDENTITY_KEY, raw)
                    .and_then(|()| db.persist(fjall::PersistMode::SyncAll))
                    .map_err(|e| open_error(e.to_string()))?;
            }
        }
        Ok(DataDir {
            path: path.to_path_buf(),
            db,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The node's keys, loaded into memory.
    pub fn keys(&self, policy: FsyncPolicy) -> Result<(DurableEngine, Recovered), DataDirError> {
        DurableEngine::open(self.db.clone(), &self.path, policy).map_err(|e| DataDirError::Open {
            path: self.path.display().to_string(),
            error: e.to_string(),
        })
    }

    /// Where the metadata log is kept.
    pub fn log(&self) -> Result<LogDisk, DataDirError> {
        let keyspace = self
            .db
            .keyspace("raft", fjall::KeyspaceCreateOptions::default)
            .map_err(|e| DataDirError::Open {
                path: self.path.display().to_string(),
                error: e.to_string(),
            })?;
        Ok(LogDisk {
            db: self.db.clone(),
            keyspace,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_refuses_another_address_or_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let token = ClusterToken::new("a-token-long-enough-to-pass").unwrap();
        drop(DataDir::open(dir.path(), "10.0.0.1:13800", Some(&token)).unwrap());
        drop(DataDir::open(dir.path(), "10.0.0.1:13800", Some(&token)).unwrap());
        let other = DataDir::open(dir.path(), "10.0.0.2:13800", Some(&token));
        assert!(
            matches!(&other, Err(DataDirError::OtherAddress { found, .. }) if found == "10.0.0.1:13800"),
            "{:?}",
            other.err()
        );
        let untokened = DataDir::open(dir.path(), "10.0.0.1:13800", None);
        assert!(matches!(untokened, Err(DataDirError::OtherCluster { .. })));
    }
}

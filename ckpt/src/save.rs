//! The save path of the [`CheckpointEngine`], in the pieces that the checkpoint actors drive
//! one by one (`actors/src/ckpt_coordinator.rs`, `actors/src/ckpt_writer.rs`) and that
//! [`CheckpointEngine::save_sync`] / [`CheckpointEngine::save_async`] run in a row:
//!
//! 1. [`CheckpointEngine::begin`] checks that the snapshots are one step of every rank, takes
//!    the engine's commit lock (so saves commit in the order they began) and uncommits the step
//!    if it was saved before, so that no manifest ever describes a mix of old and new shards;
//! 2. [`CheckpointEngine::write_shard`] writes one rank's shard (`Storage::put` is atomic and
//!    durable; an engine made by [`CheckpointEngine::local`] writes it straight from the
//!    snapshot's buffers) and returns its [`ShardRecord`]: size, SHA-256 and tensor pieces; a
//!    shape-only snapshot (the simulated cluster's) is written by size (`Storage::put_sized`,
//!    its modelled size, no bytes built) and recorded as shape-only, without a checksum;
//! 3. [`CheckpointEngine::commit`] checks that the records cover the world once, then writes the
//!    manifest, whose presence commits the step, then the `latest` pointer;
//! 4. [`CheckpointEngine::prune`] applies retention (never the step just committed) and
//!    releases the commit lock.
//!
//! Shards may be written in any order and side by side; nothing is committed until step 3, and
//! a save that stops earlier leaves a step directory without a manifest, which is never loaded
//! and which retention removes later.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla_runtime::storage::StorageError;
use tokio::sync::OwnedMutexGuard;

use crate::engine::{CheckpointEngine, CkptError, SaveReport, blocking, check_world};
use crate::format::{self, LATEST, MANIFEST, shard_name, step_dir};
use crate::manifest::{FileEntry, Manifest, TensorPiece};
use crate::snapshot::{Snapshot, SnapshotMeta};

/// What writing one rank's shard produced: everything the manifest needs to know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardRecord {
    /// The step of the snapshot written.
    pub step: u64,
    /// Whose shard it is (rank, layout, config hash).
    pub meta: SnapshotMeta,
    /// The shard's file name inside the step directory (`rank-{r}.safetensors`).
    pub file: String,
    /// Its size and SHA-256, taken while it was written.
    pub entry: FileEntry,
    /// Its tensors, under their global names.
    pub pieces: Vec<(String, TensorPiece)>,
}

/// A save under way: holds the engine's commit lock from [`CheckpointEngine::begin`] until
/// [`CheckpointEngine::prune`] (or until it is dropped, when the save is abandoned).
#[derive(Debug)]
pub struct SaveLock {
    step: u64,
    _commit: OwnedMutexGuard<()>,
}

impl SaveLock {
    /// The step being saved.
    pub fn step(&self) -> u64 {
        self.step
    }
}

/// What a persist hands back: the report, the snapshots (their buffers), and the retention
/// task when it was deferred.
pub(crate) type Persisted = (SaveReport, Vec<Snapshot>, Option<Retention>);

/// A background save in flight.
#[derive(Debug)]
pub struct SaveHandle {
    step: u64,
    join: tokio::task::JoinHandle<Result<Persisted, CkptError>>,
}

/// The retention (pruning of old steps) that follows a background save's commit.
#[derive(Debug)]
pub struct Retention(tokio::task::JoinHandle<Result<Vec<u64>, CkptError>>);

impl Retention {
    /// Wait for it; the steps it removed.
    pub async fn wait(self) -> Result<Vec<u64>, CkptError> {
        match self.0.await {
            Ok(r) => r,
            Err(e) => Err(CkptError::Task(e.to_string())),
        }
    }
}

impl SaveHandle {
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Wait until the checkpoint is committed and old steps are pruned (or either failed).
    pub async fn wait(self) -> Result<SaveReport, CkptError> {
        Ok(self.wait_with_buffers().await?.0)
    }

    /// The same, and hand back the snapshots that were saved, so that the next checkpoint can
    /// copy into their buffers ([`Snapshot::copy_from`]) instead of fresh memory.
    pub async fn wait_with_buffers(self) -> Result<(SaveReport, Vec<Snapshot>), CkptError> {
        let (mut report, snaps, retention) = self.wait_committed().await?;
        if let Some(r) = retention {
            report.removed = r.wait().await?;
        }
        Ok((report, snaps))
    }

    /// Wait only until the step is committed (durable, and named by `latest`); pruning old
    /// steps goes on in the returned [`Retention`], which holds the commit lock, so the next
    /// save starts after it. The report's `removed` is empty.
    pub async fn wait_committed(self) -> Result<Persisted, CkptError> {
        match self.join.await {
            Ok(r) => r,
            Err(e) => Err(CkptError::Task(e.to_string())),
        }
    }
}

/// The snapshot behind `shared`: its own buffers when nobody else holds it (the usual case once
/// its shard is written), else a copy.
pub fn reclaim(shared: Arc<Snapshot>) -> Snapshot {
    Arc::try_unwrap(shared).unwrap_or_else(|s| (*s).clone())
}

impl CheckpointEngine {
    /// Persist one step's snapshots (every rank's) and wait until they are committed.
    pub async fn save_sync(&self, snaps: Vec<Snapshot>) -> Result<SaveReport, CkptError> {
        check_world(snaps.iter().map(|s| (s.step, &s.meta)))?;
        let (report, _, _) = self.persist(snaps, false).await?;
        Ok(report)
    }

    /// Persist in a background task and return at once; the snapshots are moved, not copied.
    /// Must be called inside a tokio runtime.
    pub fn save_async(&self, snaps: Vec<Snapshot>) -> Result<SaveHandle, CkptError> {
        let step = check_world(snaps.iter().map(|s| (s.step, &s.meta)))?;
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|e| CkptError::Task(format!("no tokio runtime: {e}")))?;
        let me = self.clone();
        let join = rt.spawn(async move { me.persist(snaps, true).await });
        Ok(SaveHandle { step, join })
    }

    /// The four pieces in a row, one shard at a time; with `defer_retention`, return at the
    /// commit and prune in a task that keeps the commit lock until it is done (its
    /// [`SaveReport::removed`] is empty).
    async fn persist(
        &self,
        snaps: Vec<Snapshot>,
        defer_retention: bool,
    ) -> Result<Persisted, CkptError> {
        let lock = self.begin(&snaps).await?;
        let mut records = Vec::with_capacity(snaps.len());
        let mut back = Vec::with_capacity(snaps.len());
        for s in snaps {
            let s = Arc::new(s);
            records.push(self.write_shard(Arc::clone(&s)).await?);
            back.push(reclaim(s));
        }
        let mut report = self.commit(&lock, records).await?;
        let retention = if defer_retention {
            let me = self.clone();
            Some(Retention(tokio::spawn(async move { me.prune(lock).await })))
        } else {
            report.removed = self.prune(lock).await?;
            None
        };
        Ok((report, back, retention))
    }

    /// Start saving `snaps` (one step, every rank once): take the commit lock, and uncommit the
    /// step if it was saved before.
    pub async fn begin(&self, snaps: &[Snapshot]) -> Result<SaveLock, CkptError> {
        let step = check_world(snaps.iter().map(|s| (s.step, &s.meta)))?;
        let commit = Arc::clone(&self.inner.commit).lock_owned().await;
        let manifest_key = self.key(&format!("{}/{MANIFEST}", step_dir(step)));
        self.storage().remove(&manifest_key).await?;
        Ok(SaveLock {
            step,
            _commit: commit,
        })
    }

    /// Write one rank's shard of its step and describe it. Encoding, hashing and writing run
    /// off the async threads; the snapshot is only read (its `Arc` is dropped before this
    /// returns, so the caller can take the buffers back with [`reclaim`]).
    pub async fn write_shard(&self, snap: Arc<Snapshot>) -> Result<ShardRecord, CkptError> {
        let dir = step_dir(snap.step);
        let file = shard_name(snap.meta.rank);
        let key = self.key(&format!("{dir}/{file}"));
        let entry = match &self.inner.direct {
            _ if snap.is_shape_only() => {
                let bytes = crate::shard_io::shard_size(&snap).map_err(|e| CkptError::Corrupt {
                    key: key.clone(),
                    why: e.to_string(),
                })?;
                self.storage().put_sized(&key, bytes).await?;
                FileEntry {
                    rank: snap.meta.rank,
                    bytes,
                    sha256: String::new(),
                    shape_only: true,
                }
            }
            Some(root) => {
                let path = root.join(&dir).join(&file);
                let s = Arc::clone(&snap);
                let written = blocking(move || crate::shard_io::write_snapshot(&path, &s)).await?;
                // A failed local write is the disk's fault, like a failed `Storage::put`.
                written.map_err(|why| StorageError::Io {
                    key: key.clone(),
                    why,
                })?
            }
            None => {
                let s = Arc::clone(&snap);
                let encoded = blocking(move || crate::shard_io::encode_hashed(&s)).await?;
                let (bytes, entry) = encoded.map_err(|e| CkptError::Corrupt {
                    key: key.clone(),
                    why: e.to_string(),
                })?;
                self.storage().put(&key, bytes).await?;
                entry
            }
        };
        Ok(ShardRecord {
            step: snap.step,
            meta: snap.meta.clone(),
            pieces: crate::shard_io::pieces(&snap, &file),
            file,
            entry,
        })
    }

    /// Commit the step `lock` saves: check that `records` are that step's shards of every rank
    /// once, with one layout and config, then write the manifest (which commits the step), then
    /// the `latest` pointer. The report's `removed` is empty ([`CheckpointEngine::prune`]).
    pub async fn commit(
        &self,
        lock: &SaveLock,
        mut records: Vec<ShardRecord>,
    ) -> Result<SaveReport, CkptError> {
        let step = check_world(records.iter().map(|r| (r.step, &r.meta)))?;
        if step != lock.step {
            return Err(CkptError::BadSnapshots(format!(
                "shards of step {step} cannot commit the save of step {}",
                lock.step
            )));
        }
        records.sort_by_key(|r| r.meta.rank);
        let (layout, config_hash) = match records.first() {
            Some(r) => (r.meta.layout.clone(), r.meta.config_hash.clone()),
            None => return Err(CkptError::BadSnapshots("no shards".into())),
        };
        let mut files = BTreeMap::new();
        let mut tensors: BTreeMap<String, Vec<TensorPiece>> = BTreeMap::new();
        for r in records {
            for (global, piece) in r.pieces {
                tensors.entry(global).or_default().push(piece);
            }
            files.insert(r.file, r.entry);
        }
        let manifest = Manifest {
            format_version: format::FORMAT_VERSION,
            step,
            config_hash,
            layout,
            tensors,
            files,
            checksum: String::new(),
        };
        let dir = step_dir(step);
        let manifest_key = self.key(&format!("{dir}/{MANIFEST}"));
        let bytes = manifest.encode().map_err(|e| CkptError::Corrupt {
            key: manifest_key.clone(),
            why: e.to_string(),
        })?;
        self.storage().put(&manifest_key, bytes).await?;
        self.storage()
            .put(&self.key(LATEST), format!("{dir}\n").into_bytes())
            .await?;
        tracing::debug!(step, bytes = manifest.total_bytes(), "checkpoint committed");
        Ok(SaveReport {
            step,
            bytes: manifest.total_bytes(),
            files: manifest.files.len(),
            removed: Vec::new(),
        })
    }

    /// Retention after the commit of `lock`'s step: keep the last `keep` committed steps up to
    /// it (it always stays), remove older ones and leftovers of unfinished saves; then release
    /// the commit lock. The steps removed.
    pub async fn prune(&self, lock: SaveLock) -> Result<Vec<u64>, CkptError> {
        let removed = self.retain(lock.step).await;
        drop(lock);
        removed
    }
}

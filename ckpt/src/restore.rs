//! Restoring one rank from the fastest source that is complete and verified: its own memory
//! (an [`OwnCopy`] kept by the rank's checkpointer, checked against the SHA-256 recorded when
//! it was taken), then a peer's memory ([`crate::replica::fetch_replica`], over the fabric,
//! checked against the source's SHA-256), then storage (one rank's shard of a committed step,
//! checked against the manifest). [`Restorer::restore`] reports the source it used and why each
//! faster one was passed over.

use std::time::Duration;

use flotilla_runtime::fabric::{Fabric, Rank};
use flotilla_runtime::storage::StorageError;

use crate::engine::{CheckpointEngine, CkptError};
use crate::format::{MANIFEST, decode_shard, step_dir};
use crate::replica::fetch_replica;
use crate::shard_io::{sha256_parts, shard_header, shard_parts};
use crate::snapshot::Snapshot;
use crate::verify::check_bytes;

/// Where a restored state came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The rank's own in-memory snapshot.
    OwnMemory,
    /// The replica held in this peer's memory.
    Peer(Rank),
    /// The checkpoint of this step on storage.
    Storage(u64),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::OwnMemory => write!(f, "own memory"),
            Source::Peer(r) => write!(f, "rank {r}'s memory"),
            Source::Storage(s) => write!(f, "storage ({})", step_dir(*s)),
        }
    }
}

/// A restored state.
#[derive(Debug, Clone)]
pub struct Restored {
    pub snapshot: Snapshot,
    pub source: Source,
    /// Faster sources passed over, each with why (empty when the first one served).
    pub rejected: Vec<String>,
}

/// Why no source could restore the rank.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rank {rank}: no source could restore it ({})", .tried.join("; "))]
pub struct RestoreError {
    pub rank: Rank,
    pub tried: Vec<String>,
}

/// A rank's own in-memory snapshot with the SHA-256 of its shard encoding, taken when it was
/// kept, so that a restore can tell it is intact.
#[derive(Debug, Clone)]
pub struct OwnCopy {
    snapshot: Snapshot,
    sha256: String,
}

/// SHA-256 of `s`'s shard encoding, hashed from its own buffers (no copy).
pub fn snapshot_sha256(s: &Snapshot) -> Result<String, CkptError> {
    s.require_values()
        .map_err(|e| CkptError::BadSnapshots(e.to_string()))?;
    let header = shard_header(s).map_err(|e| CkptError::BadSnapshots(e.to_string()))?;
    let mut parts = vec![header.as_slice()];
    parts.extend(shard_parts(s));
    Ok(sha256_parts(&parts))
}

impl OwnCopy {
    /// Keep `snapshot`, hashing it now.
    pub fn new(snapshot: Snapshot) -> Result<Self, CkptError> {
        let sha256 = snapshot_sha256(&snapshot)?;
        Ok(Self { snapshot, sha256 })
    }

    /// Keep `snapshot` whose shard SHA-256 is already known (e.g. from its replication).
    pub fn with_sha256(snapshot: Snapshot, sha256: String) -> Self {
        Self { snapshot, sha256 }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Mutable access: fault injection for tests.
    pub fn snapshot_mut(&mut self) -> &mut Snapshot {
        &mut self.snapshot
    }

    pub fn into_snapshot(self) -> Snapshot {
        self.snapshot
    }

    /// A verified copy of the snapshot (the hash runs beside the copy).
    pub fn verified(&self) -> Result<Snapshot, String> {
        let (sha, copy) = std::thread::scope(|sc| {
            let h = sc.spawn(|| snapshot_sha256(&self.snapshot));
            let copy = self.snapshot.clone();
            (h.join(), copy)
        });
        let sha = sha
            .map_err(|_| "the hashing thread panicked".to_string())?
            .map_err(|e| e.to_string())?;
        if sha != self.sha256 {
            return Err(format!(
                "SHA-256 {sha}, {} when it was taken (damaged)",
                self.sha256
            ));
        }
        Ok(copy)
    }
}

/// The sources one rank can restore from; leave out the ones it does not have.
#[derive(Debug, Clone, Copy)]
pub struct Restorer<'a> {
    /// The rank's own in-memory snapshot, if it survived.
    pub own: Option<&'a OwnCopy>,
    /// The fabric, and the peers that hold the rank's replicas, in order of preference.
    pub peers: Option<(&'a dyn Fabric, &'a [Rank])>,
    /// The checkpoint engine over storage.
    pub storage: Option<&'a CheckpointEngine>,
    /// Deadline of each fabric receive.
    pub deadline: Duration,
}

impl Restorer<'_> {
    /// Restore `rank` at `step`, trying sources fastest first; the first sound one wins. With
    /// `None`, any step is taken: own memory and replicas hold the last snapshot the rank took,
    /// storage its newest sound committed step. A job of several ranks passes the step they all
    /// restore to, so that they agree.
    pub async fn restore(&self, rank: Rank, step: Option<u64>) -> Result<Restored, RestoreError> {
        let mut rejected = Vec::new();
        let wrong_step = |got: u64| step.is_some_and(|s| s != got);
        if let Some(own) = self.own {
            let got = own.snapshot.step;
            if own.snapshot.meta.rank != rank {
                rejected.push(format!("own memory holds rank {}", own.snapshot.meta.rank));
            } else if wrong_step(got) {
                rejected.push(format!("own memory holds step {got}"));
            } else {
                let v = off_async(|| own.verified());
                match v {
                    Ok(snapshot) => return Ok(done(snapshot, Source::OwnMemory, rejected)),
                    Err(why) => rejected.push(format!("own memory: {why}")),
                }
            }
        }
        if let Some((fabric, holders)) = self.peers {
            for &h in holders {
                match fetch_replica(fabric, h, rank, self.deadline).await {
                    Ok(s) if wrong_step(s.step) => {
                        rejected.push(format!("rank {h}'s replica is of step {}", s.step))
                    }
                    Ok(s) => return Ok(done(s, Source::Peer(h), rejected)),
                    Err(e) => rejected.push(format!("rank {h}'s replica: {e}")),
                }
            }
        }
        if let Some(engine) = self.storage {
            match engine.load_rank(step, rank).await {
                Ok(s) => {
                    let at = s.step;
                    return Ok(done(s, Source::Storage(at), rejected));
                }
                Err(e) => rejected.push(format!("storage: {e}")),
            }
        }
        Err(RestoreError {
            rank,
            tried: rejected,
        })
    }
}

/// Run CPU work from async code without stalling the runtime's other tasks where it can
/// (`block_in_place` needs the multi-threaded runtime).
fn off_async<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn done(snapshot: Snapshot, source: Source, rejected: Vec<String>) -> Restored {
    for r in &rejected {
        tracing::warn!(rank = snapshot.meta.rank, "restore passed over {r}");
    }
    tracing::info!(
        rank = snapshot.meta.rank,
        step = snapshot.step,
        "restored from {source}"
    );
    Restored {
        snapshot,
        source,
        rejected,
    }
}

impl CheckpointEngine {
    /// One rank's snapshot from storage, verified against the manifest: from `step`, or from the
    /// newest committed step whose shard for `rank` is sound when `None`.
    pub async fn load_rank(&self, step: Option<u64>, rank: Rank) -> Result<Snapshot, CkptError> {
        let steps = match step {
            Some(s) => vec![s],
            None => self.steps().await?.into_iter().rev().collect(),
        };
        let mut tried = Vec::new();
        for s in steps {
            match self.load_rank_at(s, rank).await {
                Ok(snap) => return Ok(snap),
                Err(e) if step.is_some() || matches!(e, CkptError::ShapeOnly { .. }) => {
                    return Err(e);
                }
                Err(e) => tried.push(format!("{} skipped: {e}", step_dir(s))),
            }
        }
        Err(CkptError::NoCheckpoint {
            root: self.root().to_string(),
            tried,
        })
    }

    async fn load_rank_at(&self, step: u64, rank: Rank) -> Result<Snapshot, CkptError> {
        let manifest = self.get_manifest(step).await?;
        self.refuse_shape_only(&manifest)?;
        let dir = step_dir(step);
        let Some((name, entry)) = manifest.files.iter().find(|(_, e)| e.rank == rank) else {
            return Err(CkptError::Corrupt {
                key: self.key(&format!("{dir}/{MANIFEST}")),
                why: format!("no shard for rank {rank}"),
            });
        };
        let key = self.key(&format!("{dir}/{name}"));
        let corrupt = |why: String| CkptError::Corrupt {
            key: key.clone(),
            why,
        };
        let bytes = match self.storage().get(&key).await {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => return Err(corrupt("missing".into())),
            Err(e) => return Err(e.into()),
        };
        let entry = entry.clone();
        let snap = tokio::task::spawn_blocking(move || {
            std::thread::scope(|sc| {
                let d = sc.spawn(|| decode_shard(&bytes).map_err(|e| e.to_string()));
                let c = check_bytes(&bytes, &entry, true);
                let d = d
                    .join()
                    .unwrap_or_else(|_| Err("the decoder panicked".to_string()));
                match c {
                    Some(p) => Err(p),
                    None => d,
                }
            })
        })
        .await
        .map_err(|e| CkptError::Task(e.to_string()))?
        .map_err(corrupt)?;
        if snap.meta.rank != rank || snap.step != step {
            return Err(corrupt(format!(
                "holds rank {} at step {}",
                snap.meta.rank, snap.step
            )));
        }
        Ok(snap)
    }
}

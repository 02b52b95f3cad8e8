//! The checkpoint engine: persists rank snapshots through the storage seam, in the foreground
//! ([`CheckpointEngine::save_sync`]) or in a background task ([`CheckpointEngine::save_async`],
//! TRANSOM's asynchronous checkpointing: training stalls only for the in-memory snapshot), and
//! loads them back, checking completeness and checksums and falling back to an older committed
//! checkpoint when the newest is damaged.
//!
//! A save writes every rank's shard (`Storage::put` is atomic and durable), then the manifest,
//! whose presence commits the step, then the `latest` pointer; then retention removes all but the
//! last `keep` committed steps (never the one just committed) and leftovers of unfinished saves.
//! Those pieces live in [`crate::save`], where the checkpoint actors call them one by one. Saves
//! are serialised by a commit lock, so background saves commit in the order they began. A
//! background save runs retention (deleting old steps: a quarter of a second per GiB on some
//! disks) in a task of its own that still holds the lock, so [`SaveHandle::wait_committed`] can
//! return at the commit while the next save still starts after the pruning.
//!
//! A shape-only snapshot (the simulated cluster's) is saved as a shard of its modelled size
//! written by size (`Storage::put_sized`: simulated storage costs the bandwidth and holds no
//! bytes), marked in the manifest, under the same commit protocol and retention; loading or
//! verifying such a checkpoint is refused ([`CkptError::ShapeOnly`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use flotilla_runtime::storage::local::LocalStorage;
use flotilla_runtime::storage::{Storage, StorageError};
use tokio::sync::Mutex;

use crate::format::{LATEST, MANIFEST, decode_shard, parse_step_dir, shard_tensors, step_dir};
use crate::manifest::Manifest;
pub use crate::save::{Retention, SaveHandle};
use crate::snapshot::{Snapshot, SnapshotMeta};
use crate::verify::{check_bytes, compare_state, expected_tensors, missing_ranks};

/// Why a checkpoint operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CkptError {
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("{key}: {why}")]
    Corrupt { key: String, why: String },
    #[error("cannot save: {0}")]
    BadSnapshots(String),
    #[error("no usable checkpoint under `{root}`{}", tried_text(.tried))]
    NoCheckpoint { root: String, tried: Vec<String> },
    #[error("checkpoint task: {0}")]
    Task(String),
    #[error(
        "{key}: written by the simulated cluster: shard `{file}` is shape-only (a modelled size, \
         no values), so the checkpoint cannot be loaded or verified"
    )]
    ShapeOnly { key: String, file: String },
}

fn tried_text(tried: &[String]) -> String {
    if tried.is_empty() {
        String::new()
    } else {
        format!(" ({})", tried.join("; "))
    }
}

/// Which checkpoint to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The one the `latest` pointer names (or the newest committed one).
    Latest,
    Step(u64),
}

/// A loaded checkpoint: one snapshot per rank (in rank order) and its manifest.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub step: u64,
    pub manifest: Manifest,
    pub snapshots: Vec<Snapshot>,
    /// Newer checkpoints that were passed over, each with why (empty when none was).
    pub fallbacks: Vec<String>,
}

/// What a save wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveReport {
    pub step: u64,
    /// Bytes of the shard files.
    pub bytes: u64,
    pub files: usize,
    /// Steps that retention removed.
    pub removed: Vec<u64>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    storage: Arc<dyn Storage>,
    root: String,
    keep: usize,
    pub(crate) commit: Arc<Mutex<()>>,
    /// The local directory behind `storage` when it is a [`LocalStorage`] made by
    /// [`CheckpointEngine::local`]: shards are then written straight from the snapshots'
    /// buffers ([`crate::shard_io::write_local`]) instead of being joined for `Storage::put`.
    pub(crate) direct: Option<PathBuf>,
}

/// Saves, loads, verifies and prunes checkpoints under one root of a [`Storage`].
#[derive(Debug, Clone)]
pub struct CheckpointEngine {
    pub(crate) inner: Arc<Inner>,
}

/// Checks that `items` (each a step and whose state it is) are one step's state of ranks
/// `0..n`, each once, with one layout and config; returns the step. Snapshots are checked before
/// they are saved, and the records of their written shards before they are committed.
pub(crate) fn check_world<'a>(
    items: impl IntoIterator<Item = (u64, &'a SnapshotMeta)>,
) -> Result<u64, CkptError> {
    let bad = |m: String| Err(CkptError::BadSnapshots(m));
    let mut items = items.into_iter();
    let Some((step, first)) = items.next() else {
        return bad("no snapshots".into());
    };
    let mut ranks = BTreeSet::from([first.rank]);
    for (s, meta) in items {
        if s != step {
            return bad(format!(
                "rank {} is at step {s}, rank {} at step {step}",
                meta.rank, first.rank
            ));
        }
        if meta.layout != first.layout || meta.config_hash != first.config_hash {
            return bad(format!(
                "rank {} has another layout or config than rank {}",
                meta.rank, first.rank
            ));
        }
        if !ranks.insert(meta.rank) {
            return bad(format!("rank {} appears twice", meta.rank));
        }
    }
    if ranks.len() != first.layout.world_size || ranks.last() != Some(&(ranks.len() - 1)) {
        return bad(format!(
            "ranks {ranks:?} do not cover the world of {} ranks",
            first.layout.world_size
        ));
    }
    Ok(step)
}

impl CheckpointEngine {
    /// An engine over `storage`'s root that keeps the last `keep` (at least 1) checkpoints.
    pub fn new(storage: Arc<dyn Storage>, keep: usize) -> Self {
        Self::with_root(storage, "", keep)
    }

    /// The same, with checkpoints under the key prefix `root` (`a/b`) of `storage`.
    pub fn with_root(storage: Arc<dyn Storage>, root: &str, keep: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                storage,
                root: root.trim_matches('/').to_string(),
                keep: keep.max(1),
                commit: Arc::new(Mutex::new(())),
                direct: None,
            }),
        }
    }

    /// An engine over the local directory `dir` whose shards are written straight from the
    /// snapshot buffers, hashed while they are written (everything else goes through a
    /// [`LocalStorage`] on `dir`, as with [`CheckpointEngine::new`]).
    pub fn local(dir: impl Into<PathBuf>, keep: usize) -> Self {
        let dir = dir.into();
        Self {
            inner: Arc::new(Inner {
                storage: Arc::new(LocalStorage::new(dir.clone())),
                root: String::new(),
                keep: keep.max(1),
                commit: Arc::new(Mutex::new(())),
                direct: Some(dir),
            }),
        }
    }

    /// The key prefix checkpoints live under (empty: the storage's root).
    pub fn root(&self) -> &str {
        &self.inner.root
    }

    pub(crate) fn key(&self, rel: &str) -> String {
        if self.inner.root.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.inner.root)
        }
    }

    pub(crate) fn storage(&self) -> &dyn Storage {
        self.inner.storage.as_ref()
    }

    /// Step directories present (committed or not), ascending.
    pub(crate) async fn step_dirs(&self) -> Result<Vec<u64>, CkptError> {
        let names = self.storage().list(&self.inner.root).await?;
        let mut steps: Vec<u64> = names.iter().filter_map(|n| parse_step_dir(n)).collect();
        steps.sort_unstable();
        Ok(steps)
    }

    pub(crate) async fn is_committed(&self, step: u64) -> Result<bool, CkptError> {
        let files = self.storage().list(&self.key(&step_dir(step))).await?;
        Ok(files.iter().any(|f| f == MANIFEST))
    }

    /// Committed steps (those with a manifest), ascending; their contents are not checked.
    pub async fn steps(&self) -> Result<Vec<u64>, CkptError> {
        let mut out = Vec::new();
        for s in self.step_dirs().await? {
            if self.is_committed(s).await? {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Keep the last `keep` committed steps up to `newest` (which is always kept); remove older
    /// ones and the leftovers of unfinished saves before `newest`. Steps after `newest` (from a
    /// timeline abandoned by a resume) are left alone.
    pub(crate) async fn retain(&self, newest: u64) -> Result<Vec<u64>, CkptError> {
        let mut committed = Vec::new();
        let mut doomed = Vec::new();
        for s in self.step_dirs().await? {
            if s > newest {
                continue;
            }
            if self.is_committed(s).await? {
                committed.push(s);
            } else if s < newest {
                doomed.push(s);
            }
        }
        let excess = committed.len().saturating_sub(self.inner.keep);
        doomed.extend(committed.iter().take(excess).filter(|&&s| s != newest));
        doomed.sort_unstable();
        for &s in &doomed {
            let dir = self.key(&step_dir(s));
            // The manifest goes first: a crash halfway leaves an uncommitted directory, never a
            // manifest whose shards are gone.
            self.storage().remove(&format!("{dir}/{MANIFEST}")).await?;
            self.storage().remove(&dir).await?;
        }
        Ok(doomed)
    }

    /// The step the `latest` pointer names, if it is readable.
    pub(crate) async fn pointer(&self) -> Result<Result<Option<u64>, String>, CkptError> {
        match self.storage().get(&self.key(LATEST)).await {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                Ok(parse_step_dir(text.trim())
                    .map(Some)
                    .ok_or_else(|| format!("`{LATEST}` is unreadable ({:?})", text.trim())))
            }
            Err(StorageError::NotFound { .. }) => Ok(Ok(None)),
            Err(e) => Err(e.into()),
        }
    }

    /// The newest committed step: the one `latest` names if it is committed, else the highest.
    pub async fn latest(&self) -> Result<Option<u64>, CkptError> {
        if let Ok(Some(p)) = self.pointer().await?
            && self.is_committed(p).await?
        {
            return Ok(Some(p));
        }
        Ok(self.steps().await?.last().copied())
    }

    /// Load a checkpoint; fails, naming the file and the fault, if it is incomplete or damaged.
    /// Sizes, headers and the manifest's own checksum are always checked; `verify` also checks
    /// every shard's SHA-256 (which catches a flipped bit in tensor values).
    pub async fn load(&self, which: Which, verify: bool) -> Result<Loaded, CkptError> {
        let step = match which {
            Which::Step(s) => s,
            Which::Latest => self.latest().await?.ok_or_else(|| self.none(Vec::new()))?,
        };
        self.load_step(step, verify).await
    }

    fn none(&self, tried: Vec<String>) -> CkptError {
        CkptError::NoCheckpoint {
            root: self.inner.root.clone(),
            tried,
        }
    }

    /// Load the newest checkpoint that is sound, going back past damaged ones; each one passed
    /// over is named with why in [`Loaded::fallbacks`].
    pub async fn load_latest_valid(&self, verify: bool) -> Result<Loaded, CkptError> {
        let committed = self.steps().await?;
        let mut fallbacks = Vec::new();
        let mut candidates: Vec<u64> = match self.pointer().await? {
            Ok(Some(p)) => {
                let mut c: Vec<u64> = committed.iter().copied().filter(|&s| s <= p).collect();
                if c.last() != Some(&p) {
                    fallbacks.push(format!(
                        "`{LATEST}` names {}, which is not committed",
                        step_dir(p)
                    ));
                }
                c.dedup();
                c
            }
            Ok(None) => committed,
            Err(why) => {
                fallbacks.push(why);
                committed
            }
        };
        candidates.reverse();
        for s in candidates {
            match self.load_step(s, verify).await {
                Ok(mut loaded) => {
                    for f in &fallbacks {
                        tracing::warn!("checkpoint fallback: {f}");
                    }
                    loaded.fallbacks = fallbacks;
                    return Ok(loaded);
                }
                // Older steps of a simulated run are no more loadable: say so at once.
                Err(e @ CkptError::ShapeOnly { .. }) => return Err(e),
                Err(e) => fallbacks.push(format!("{} skipped: {e}", step_dir(s))),
            }
        }
        Err(self.none(fallbacks))
    }

    pub(crate) async fn get_manifest(&self, step: u64) -> Result<Manifest, CkptError> {
        let key = self.key(&format!("{}/{MANIFEST}", step_dir(step)));
        let bytes = match self.storage().get(&key).await {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => {
                return Err(CkptError::Corrupt {
                    key,
                    why: "missing: the step was never committed".into(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let m = Manifest::decode(&bytes).map_err(|e| CkptError::Corrupt {
            key: key.clone(),
            why: e.to_string(),
        })?;
        if m.step != step {
            return Err(CkptError::Corrupt {
                key,
                why: format!("describes step {}, not {step}", m.step),
            });
        }
        Ok(m)
    }

    /// Refuse a checkpoint written by the simulated cluster (a shard with no values).
    pub(crate) fn refuse_shape_only(&self, m: &Manifest) -> Result<(), CkptError> {
        match m.shape_only_file() {
            Some(file) => Err(CkptError::ShapeOnly {
                key: self.key(&format!("{}/{MANIFEST}", step_dir(m.step))),
                file: file.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// The manifest of `step`, checked (the shards are not read).
    pub async fn manifest(&self, step: u64) -> Result<Manifest, CkptError> {
        self.get_manifest(step).await
    }

    async fn load_step(&self, step: u64, verify: bool) -> Result<Loaded, CkptError> {
        let manifest = self.get_manifest(step).await?;
        self.refuse_shape_only(&manifest)?;
        let dir = step_dir(step);
        if let Some(p) = missing_ranks(&manifest).into_iter().next() {
            return Err(CkptError::Corrupt {
                key: self.key(&format!("{dir}/{MANIFEST}")),
                why: p,
            });
        }
        let expected = expected_tensors(&manifest);
        let mut snapshots = Vec::with_capacity(manifest.files.len());
        for (name, entry) in &manifest.files {
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
            let e = entry.clone();
            let snap = blocking(move || match check_bytes(&bytes, &e, verify) {
                Some(p) => Err(p),
                None => decode_shard(&bytes).map_err(|e| e.to_string()),
            })
            .await?
            .map_err(corrupt)?;
            let got: BTreeMap<String, Vec<usize>> = shard_tensors(&snap)
                .into_iter()
                .map(|(k, t)| (k, t.shape().to_vec()))
                .collect();
            let problems = compare_state(
                &manifest,
                entry,
                snap.step,
                snap.meta.rank,
                &snap.meta.config_hash,
                expected.get(name.as_str()),
                &got,
            );
            if let Some(p) = problems.into_iter().next() {
                return Err(corrupt(p));
            }
            snapshots.push(snap);
        }
        snapshots.sort_by_key(|s| s.meta.rank);
        Ok(Loaded {
            step,
            manifest,
            snapshots,
            fallbacks: Vec::new(),
        })
    }
}

/// Run CPU work on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CkptError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CkptError::Task(e.to_string()))
}

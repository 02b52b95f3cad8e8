//! Verification of checkpoints: every problem of a step directory, collected rather than
//! stopping at the first (a missing or damaged manifest, a missing rank, a shard's size, SHA-256,
//! header, dtype, state and tensor list against the manifest), for `flotilla ckpt verify` and for
//! the engine's loads.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_runtime::storage::StorageError;
use safetensors::Dtype;

use crate::engine::{CheckpointEngine, CkptError};
use crate::format::{LATEST, MANIFEST, read_shard_header, sha256_hex, step_dir};
use crate::manifest::{FileEntry, Manifest};

/// The problems found in one step directory (none: the checkpoint is sound).
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    pub step: u64,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl CheckpointEngine {
    /// Check one step directory completely (manifest, every shard's presence, size, checksum,
    /// header and tensor list), collecting every problem rather than stopping at the first.
    /// A checkpoint written by the simulated cluster has no values to check: refused
    /// ([`CkptError::ShapeOnly`]).
    pub async fn verify(&self, step: u64) -> Result<VerifyReport, CkptError> {
        let dir = step_dir(step);
        let mut problems = Vec::new();
        let manifest = match self.get_manifest(step).await {
            Ok(m) => m,
            Err(CkptError::Corrupt { key, why }) => {
                problems.push(format!("{key}: {why}"));
                return Ok(VerifyReport { step, problems });
            }
            Err(e) => return Err(e),
        };
        self.refuse_shape_only(&manifest)?;
        let mkey = self.key(&format!("{dir}/{MANIFEST}"));
        problems.extend(
            missing_ranks(&manifest)
                .into_iter()
                .map(|p| format!("{mkey}: {p}")),
        );
        let expected = expected_tensors(&manifest);
        for (name, entry) in &manifest.files {
            let key = self.key(&format!("{dir}/{name}"));
            let bytes = match self.storage().get(&key).await {
                Ok(b) => b,
                Err(StorageError::NotFound { .. }) => {
                    problems.push(format!("{key}: missing"));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(p) = check_bytes(&bytes, entry, true) {
                problems.push(format!("{key}: {p}"));
            }
            match read_shard_header(&bytes) {
                Ok(h) => {
                    let mut got = BTreeMap::new();
                    for (k, (dtype, shape)) in h.tensors {
                        if dtype != Dtype::F32 {
                            problems.push(format!("{key}: tensor `{k}` is {dtype:?}, not F32"));
                        }
                        got.insert(k, shape);
                    }
                    let p = compare_state(
                        &manifest,
                        entry,
                        h.state.step,
                        h.state.rank,
                        &h.state.config_hash,
                        expected.get(name.as_str()),
                        &got,
                    );
                    problems.extend(p.into_iter().map(|p| format!("{key}: {p}")));
                }
                Err(e) => problems.push(format!("{key}: {e}")),
            }
        }
        Ok(VerifyReport { step, problems })
    }

    /// [`CheckpointEngine::verify`] of every step directory, plus the `latest` pointer's target.
    pub async fn verify_all(&self) -> Result<Vec<VerifyReport>, CkptError> {
        let mut out = Vec::new();
        for s in self.step_dirs().await? {
            out.push(self.verify(s).await?);
        }
        let latest_problem = match self.pointer().await? {
            Ok(Some(p)) if !self.is_committed(p).await? => Some((
                p,
                format!(
                    "{}: names {}, which is not committed",
                    self.key(LATEST),
                    step_dir(p)
                ),
            )),
            Ok(_) => None,
            Err(why) => Some((0, format!("{}: {why}", self.key(LATEST)))),
        };
        if let Some((step, p)) = latest_problem {
            out.push(VerifyReport {
                step,
                problems: vec![p],
            });
        }
        Ok(out)
    }
}

/// Ranks of the layout with no shard in the manifest.
pub(crate) fn missing_ranks(m: &Manifest) -> Vec<String> {
    let have: BTreeSet<usize> = m.files.values().map(|f| f.rank).collect();
    (0..m.layout.world_size)
        .filter(|r| !have.contains(r))
        .map(|r| format!("no shard for rank {r} of {}", m.layout.world_size))
        .collect()
}

/// Per shard file, the tensor keys and shapes the manifest says it holds.
pub(crate) fn expected_tensors(m: &Manifest) -> BTreeMap<&str, BTreeMap<String, Vec<usize>>> {
    let mut out: BTreeMap<&str, BTreeMap<String, Vec<usize>>> = BTreeMap::new();
    for pieces in m.tensors.values() {
        for p in pieces {
            out.entry(p.shard.as_str())
                .or_default()
                .insert(p.key.clone(), p.shape.clone());
        }
    }
    out
}

/// Size (always) and checksum (when `verify`) of a shard against its manifest entry.
pub(crate) fn check_bytes(bytes: &[u8], entry: &FileEntry, verify: bool) -> Option<String> {
    if bytes.len() as u64 != entry.bytes {
        return Some(format!(
            "{} bytes, the manifest says {} (truncated or overwritten)",
            bytes.len(),
            entry.bytes
        ));
    }
    if verify {
        let got = sha256_hex(bytes);
        if got != entry.sha256 {
            return Some(format!(
                "SHA-256 {got}, the manifest says {} (damaged)",
                entry.sha256
            ));
        }
    }
    None
}

/// A shard's own state and tensor list against the manifest.
pub(crate) fn compare_state(
    m: &Manifest,
    entry: &FileEntry,
    step: u64,
    rank: usize,
    config_hash: &str,
    expected: Option<&BTreeMap<String, Vec<usize>>>,
    got: &BTreeMap<String, Vec<usize>>,
) -> Vec<String> {
    let mut p = Vec::new();
    if step != m.step {
        p.push(format!("holds step {step}, the manifest says {}", m.step));
    }
    if rank != entry.rank {
        p.push(format!(
            "holds rank {rank}, the manifest says {}",
            entry.rank
        ));
    }
    if config_hash != m.config_hash {
        p.push(format!(
            "config hash {config_hash}, the manifest says {}",
            m.config_hash
        ));
    }
    let empty = BTreeMap::new();
    let expected = expected.unwrap_or(&empty);
    for (k, shape) in expected {
        match got.get(k) {
            None => p.push(format!("tensor `{k}` missing")),
            Some(s) if s != shape => p.push(format!(
                "tensor `{k}` has shape {s:?}, the manifest says {shape:?}"
            )),
            Some(_) => {}
        }
    }
    if let Some(k) = got.keys().find(|k| !expected.contains_key(*k)) {
        p.push(format!("tensor `{k}` is not in the manifest"));
    }
    p
}

//! Loading a checkpoint onto another parallel layout (a different data- or expert-parallel
//! degree): a target rank names the global tensors it holds, and [`CheckpointEngine::assemble`]
//! reads them, with their AdamW moments, from whichever shards of the saved step hold them, as
//! the manifest maps each global name to its pieces.
//!
//! Convention (shared with the pipeline / expert-parallel code):
//! - tensors are stored under their global HF names (`model.layers.3.mlp.experts.7.gate_proj.weight`)
//!   and moments under `optim.exp_avg.{name}` / `optim.exp_avg_sq.{name}`;
//! - every rank saves its whole state: dense parameters (replicated across DP and EP ranks) are
//!   therefore in every shard of their pipeline stage, and the manifest lists one piece per copy;
//!   a loader reads one copy, preferring shards it already reads. This costs storage (dense bytes
//!   × dp·ep) but keeps every shard self-contained, so a rank's own shard, replica and stored copy
//!   are the same bytes;
//! - routed expert `e` of a layer lives on EP rank [`expert_owner`]`(e, n_routed, ep)`;
//! - a pipeline stage holds a contiguous range of layers (the target names say which).
//!
//! Only whole-tensor pieces are read (no rank stores a slice of a tensor today).

use std::collections::{BTreeMap, BTreeSet};

use safetensors::tensor::{Dtype, SafeTensors};

use crate::engine::{CheckpointEngine, CkptError};
use crate::format::{EXP_AVG, EXP_AVG_SQ, MANIFEST, ShardState, step_dir, unhex};
use crate::manifest::Manifest;
use crate::snapshot::{HostTensor, Moments, Snapshot, SnapshotMeta};
use crate::verify::check_bytes;

/// The EP rank that holds routed expert `expert` when `n_routed` experts are split over `ep`
/// ranks (`ep` divides `n_routed`).
pub fn expert_owner(expert: usize, n_routed: usize, ep: usize) -> usize {
    expert / (n_routed / ep.max(1)).max(1)
}

/// `(layer, expert)` of a routed expert's tensor name (`model.layers.L.mlp.experts.E.…`).
pub fn routed_expert(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    let (expert, _) = rest.split_once('.')?;
    Some((layer.parse().ok()?, expert.parse().ok()?))
}

/// Pick a whole piece for every key, preferring shards already picked: shard → keys.
fn plan(
    m: &Manifest,
    keys: &BTreeSet<String>,
    mkey: &str,
) -> Result<BTreeMap<String, Vec<String>>, CkptError> {
    let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for k in keys {
        let whole: Vec<&str> = m
            .tensors
            .get(k)
            .into_iter()
            .flatten()
            .filter(|p| p.shape == p.global_shape && p.offset.iter().all(|&o| o == 0))
            .map(|p| p.shard.as_str())
            .collect();
        let Some(first) = whole.first() else {
            return Err(CkptError::Corrupt {
                key: mkey.to_string(),
                why: format!("no shard holds `{k}` whole"),
            });
        };
        let shard = whole
            .iter()
            .find(|s| by_shard.contains_key(**s))
            .unwrap_or(first);
        by_shard
            .entry((*shard).to_string())
            .or_default()
            .push(k.clone());
    }
    Ok(by_shard)
}

impl CheckpointEngine {
    /// The state of a rank of another layout: the parameters and buffers named in `params`
    /// (global names) with their AdamW moments and step counts, read from the shards of `step`
    /// that hold them (each verified against the manifest), bit for bit. The non-tensor state
    /// (step, schedule position, optimizer step count, data cursor, RNG, model config) is taken
    /// from the lowest-numbered shard read; with a changed DP degree the caller decides what the
    /// data cursor of each new rank should be. `meta` is the target rank's.
    pub async fn assemble(
        &self,
        step: u64,
        meta: SnapshotMeta,
        params: &[String],
    ) -> Result<Snapshot, CkptError> {
        let m = self.manifest(step).await?;
        self.refuse_shape_only(&m)?;
        let dir = step_dir(step);
        let mkey = self.key(&format!("{dir}/{MANIFEST}"));
        let mut keys = BTreeSet::new();
        for p in params {
            keys.insert(p.clone());
            for pre in [EXP_AVG, EXP_AVG_SQ] {
                let k = format!("{pre}{p}");
                if m.tensors.contains_key(&k) {
                    keys.insert(k);
                }
            }
        }
        let plan = plan(&m, &keys, &mkey)?;
        let mut tensors: BTreeMap<String, HostTensor> = BTreeMap::new();
        let mut steps: BTreeMap<String, u64> = BTreeMap::new();
        let mut base: Option<ShardState> = None;
        for (shard, want) in plan {
            let key = self.key(&format!("{dir}/{shard}"));
            let corrupt = |why: String| CkptError::Corrupt {
                key: key.clone(),
                why,
            };
            let entry = m
                .files
                .get(&shard)
                .ok_or_else(|| corrupt("listed for tensors but not as a file".into()))?
                .clone();
            let bytes = self.storage().get(&key).await?;
            let (got, state) =
                tokio::task::spawn_blocking(move || read_some(&bytes, &entry, &want))
                    .await
                    .map_err(|e| CkptError::Task(e.to_string()))?
                    .map_err(corrupt)?;
            tensors.extend(got);
            steps.extend(state.param_steps.iter().map(|(k, v)| (k.clone(), *v)));
            if base.as_ref().is_none_or(|b| state.rank < b.rank) {
                base = Some(state);
            }
        }
        let Some(base) = base else {
            let mut s = Snapshot::new(meta, step);
            s.schedule_step = step;
            return Ok(s);
        };
        let mut out = Snapshot::new(meta, base.step);
        out.schedule_step = base.schedule_step;
        out.optim_steps = base.optim_steps;
        let bad = |why: &str| CkptError::Corrupt {
            key: mkey.clone(),
            why: why.to_string(),
        };
        out.data_cursor = unhex(&base.data_cursor).ok_or_else(|| bad("data_cursor is not hex"))?;
        out.rng = match &base.rng {
            Some(h) => Some(unhex(h).ok_or_else(|| bad("rng is not hex"))?),
            None => None,
        };
        out.model_config = base.model_config;
        for p in params {
            let t = tensors.remove(p).ok_or_else(|| CkptError::Corrupt {
                key: mkey.clone(),
                why: format!("`{p}` was not read"),
            })?;
            out.params.insert(p.clone(), t);
            let avg = tensors.remove(&format!("{EXP_AVG}{p}"));
            let sq = tensors.remove(&format!("{EXP_AVG_SQ}{p}"));
            if let (Some(exp_avg), Some(exp_avg_sq)) = (avg, sq) {
                let step = steps.get(p).copied().unwrap_or(base.optim_steps);
                let mo = Moments {
                    step,
                    exp_avg,
                    exp_avg_sq,
                };
                out.moments.insert(p.clone(), mo);
            }
        }
        Ok(out)
    }
}

/// Check a shard's bytes and decode the tensors `want` (and its state) from it.
fn read_some(
    bytes: &[u8],
    entry: &crate::manifest::FileEntry,
    want: &[String],
) -> Result<(BTreeMap<String, HostTensor>, ShardState), String> {
    if let Some(p) = check_bytes(bytes, entry, true) {
        return Err(p);
    }
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for k in want {
        let v = st.tensor(k).map_err(|e| format!("`{k}`: {e}"))?;
        if v.dtype() != Dtype::F32 {
            return Err(format!("`{k}` is {:?}, not F32", v.dtype()));
        }
        let data = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let t = HostTensor::new(k, v.shape().to_vec(), data).map_err(|e| e.to_string())?;
        out.insert(k.clone(), t);
    }
    let state = crate::format::shard_state(bytes).map_err(|e| e.to_string())?;
    Ok((out, state))
}

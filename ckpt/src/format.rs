//! The on-storage format of one rank's shard: a safetensors file (`rank-{r}.safetensors`) with
//! every tensor in f32, and the rest of the state in the file's metadata, so a shard stands alone
//! and opens in Python's `safetensors`.
//!
//! Tensor keys: parameters and buffers under their HF names; AdamW's moments under
//! `optim.exp_avg.{name}` and `optim.exp_avg_sq.{name}`. Metadata: `format = "pt"` (what
//! `transformers` expects) and `flotilla` = the JSON of [`ShardState`] (step, schedule position,
//! AdamW step counts, data cursor, RNG state, rank, layout, config hash, and the model's HF
//! `config.json` text when the writer recorded it).
//!
//! Directory layout under the checkpoint root: `step-{:08}/rank-{r}.safetensors`,
//! `step-{:08}/manifest.json` ([`crate::manifest`]), and a `latest` pointer file.

use std::collections::BTreeMap;

use flotilla_model::data::DataCursor;
use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::snapshot::{HostTensor, Layout, Moments, Snapshot, SnapshotMeta};

/// The version written into shards and manifests; readers reject any other.
pub const FORMAT_VERSION: u32 = 1;
/// Prefix of the first-moment tensors' keys in a shard.
pub const EXP_AVG: &str = "optim.exp_avg.";
/// Prefix of the second-moment tensors' keys in a shard.
pub const EXP_AVG_SQ: &str = "optim.exp_avg_sq.";
/// Name of the pointer file at the checkpoint root.
pub const LATEST: &str = "latest";
/// Name of the manifest inside a step directory.
pub const MANIFEST: &str = "manifest.json";
/// The safetensors metadata key holding [`ShardState`].
pub(crate) const META_KEY: &str = "flotilla";

/// Why a shard could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FormatError {
    #[error("not a safetensors file: {0}")]
    Safetensors(String),
    #[error("metadata: {0}")]
    Metadata(String),
    #[error("tensor `{name}`: {why}")]
    Tensor { name: String, why: String },
    /// The snapshot is shape-only: there are no values to encode.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// A step's directory name: `step-00000042`.
pub fn step_dir(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a directory name made by [`step_dir`].
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A rank's shard file name: `rank-3.safetensors`.
pub fn shard_name(rank: usize) -> String {
    format!("rank-{rank}.safetensors")
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
}

/// The non-tensor state of a shard (its safetensors metadata).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardState {
    pub format_version: u32,
    pub rank: usize,
    pub layout: Layout,
    pub config_hash: String,
    pub step: u64,
    pub schedule_step: u64,
    pub optim_steps: u64,
    /// Per-parameter AdamW step counts.
    pub param_steps: BTreeMap<String, u64>,
    /// The data cursor's bytes, hex.
    pub data_cursor: String,
    /// RNG state, hex, if any.
    pub rng: Option<String>,
    /// The model's HF `config.json` text; absent in shards written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_config: Option<String>,
}

impl ShardState {
    /// The data cursor, decoded; `None` when it does not decode.
    pub fn cursor(&self) -> Option<DataCursor> {
        unhex(&self.data_cursor).and_then(|b| DataCursor::from_bytes(&b).ok())
    }
}

/// The tensors of a snapshot under their shard keys, in key order.
pub fn shard_tensors(s: &Snapshot) -> BTreeMap<String, &HostTensor> {
    let mut out: BTreeMap<String, &HostTensor> =
        s.params.iter().map(|(n, t)| (n.clone(), t)).collect();
    for (n, m) in &s.moments {
        out.insert(format!("{EXP_AVG}{n}"), &m.exp_avg);
        out.insert(format!("{EXP_AVG_SQ}{n}"), &m.exp_avg_sq);
    }
    out
}

/// Encode one rank's snapshot as a safetensors shard ([`crate::shard_io::encode_shard`]).
pub fn encode_shard(s: &Snapshot) -> Result<Vec<u8>, FormatError> {
    crate::shard_io::encode_shard(s)
}

/// A shard's header: its [`ShardState`] and each tensor's dtype and shape, by key.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardHeader {
    pub state: ShardState,
    pub tensors: BTreeMap<String, (Dtype, Vec<usize>)>,
}

/// Read a shard's header without decoding the values (for verification and inspection).
pub fn read_shard_header(bytes: &[u8]) -> Result<ShardHeader, FormatError> {
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| FormatError::Safetensors(e.to_string()))?;
    let state = shard_state(bytes)?;
    let tensors = st
        .iter()
        .map(|(k, v)| (k.to_string(), (v.dtype(), v.shape().to_vec())))
        .collect();
    Ok(ShardHeader { state, tensors })
}

pub(crate) fn shard_state(bytes: &[u8]) -> Result<ShardState, FormatError> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| FormatError::Safetensors(e.to_string()))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| FormatError::Metadata(format!("no `{META_KEY}` entry")))?;
    let state: ShardState =
        serde_json::from_str(json).map_err(|e| FormatError::Metadata(e.to_string()))?;
    if state.format_version != FORMAT_VERSION {
        return Err(FormatError::Metadata(format!(
            "format version {}, this build reads {FORMAT_VERSION}",
            state.format_version
        )));
    }
    Ok(state)
}

/// Decode a shard written by [`encode_shard`] back into the snapshot, bit for bit.
pub fn decode_shard(bytes: &[u8]) -> Result<Snapshot, FormatError> {
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| FormatError::Safetensors(e.to_string()))?;
    let state = shard_state(bytes)?;
    let bad = |name: &str, why: String| FormatError::Tensor {
        name: name.to_string(),
        why,
    };
    let data_cursor = unhex(&state.data_cursor)
        .ok_or_else(|| FormatError::Metadata("data_cursor is not hex".into()))?;
    let rng = match &state.rng {
        Some(h) => Some(unhex(h).ok_or_else(|| FormatError::Metadata("rng is not hex".into()))?),
        None => None,
    };
    let meta = SnapshotMeta {
        rank: state.rank,
        layout: state.layout.clone(),
        config_hash: state.config_hash.clone(),
    };
    let mut snap = Snapshot::new(meta, state.step);
    snap.schedule_step = state.schedule_step;
    snap.optim_steps = state.optim_steps;
    snap.data_cursor = data_cursor;
    snap.rng = rng;
    snap.model_config = state.model_config.clone();
    let mut avg = BTreeMap::new();
    let mut avg_sq = BTreeMap::new();
    for (key, view) in st.iter() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(key, format!("dtype {:?}, expected F32", view.dtype())));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let t = HostTensor::new(key, view.shape().to_vec(), data)
            .map_err(|e| bad(key, e.to_string()))?;
        if let Some(n) = key.strip_prefix(EXP_AVG) {
            avg.insert(n.to_string(), t);
        } else if let Some(n) = key.strip_prefix(EXP_AVG_SQ) {
            avg_sq.insert(n.to_string(), t);
        } else {
            snap.params.insert(key.to_string(), t);
        }
    }
    for (name, step) in &state.param_steps {
        let (Some(m), Some(v)) = (avg.remove(name), avg_sq.remove(name)) else {
            return Err(bad(name, "AdamW moments missing".into()));
        };
        let moments = Moments {
            step: *step,
            exp_avg: m,
            exp_avg_sq: v,
        };
        snap.moments.insert(name.clone(), moments);
    }
    if let Some(n) = avg.keys().chain(avg_sq.keys()).next() {
        return Err(bad(n, "AdamW moments without a step count".into()));
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_dirs_round_trip() {
        assert_eq!(step_dir(42), "step-00000042");
        assert_eq!(parse_step_dir("step-00000042"), Some(42));
        assert_eq!(parse_step_dir("step-123456789"), Some(123_456_789));
        for bad in ["step-42", "latest", "step-0000004x", "step-"] {
            assert_eq!(parse_step_dir(bad), None, "{bad}");
        }
        assert_eq!(unhex(&hex(&[0, 1, 254, 255])), Some(vec![0, 1, 254, 255]));
        assert_eq!(unhex("abc"), None);
    }

    #[test]
    fn the_model_config_round_trips_and_is_optional() {
        let meta = SnapshotMeta {
            rank: 0,
            layout: Layout::single(),
            config_hash: "h".into(),
        };
        let mut s = Snapshot::new(meta, 2);
        s.add_param("w", &[2], vec![1.0, -2.0]).expect("param");
        let old = encode_shard(&s).expect("encode");
        let old_header = String::from_utf8_lossy(&old[..200]).into_owned();
        assert!(!old_header.contains("model_config"), "{old_header}");
        assert_eq!(decode_shard(&old).expect("decode"), s);
        s.model_config = Some("{\"model_type\": \"deepseek_v3\"}".into());
        let back = decode_shard(&encode_shard(&s).expect("encode")).expect("decode");
        assert_eq!(back, s);
    }
}

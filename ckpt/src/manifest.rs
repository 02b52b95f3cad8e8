//! A checkpoint's manifest (`step-{:08}/manifest.json`): what the checkpoint holds and how to
//! check it. It names the format version, the step, the config hash and the parallel layout,
//! every tensor's global name with the shard, slice, dtype and shape of each piece, and the size
//! and SHA-256 of every shard file. A shard the simulated cluster wrote by size (a shape-only
//! snapshot, [`FileEntry::shape_only`]) has its modelled size and no checksum; a checkpoint with
//! such a shard cannot be loaded or verified ([`Manifest::shape_only_file`]).
//!
//! The manifest is written last: its presence is what commits a step. It also checks itself: its
//! `checksum` is the SHA-256 of the canonical (pretty JSON) encoding with `checksum` empty, and a
//! reader insists that the bytes are exactly that canonical encoding, so any change to the file
//! (a flipped bit, a truncation) is detected, not only one that breaks the JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::format::{FORMAT_VERSION, sha256_hex};
use crate::snapshot::Layout;

/// Why a manifest could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid manifest JSON: {0}")]
    Parse(String),
    #[error("checksum mismatch: the manifest says {want}, its contents hash to {got}")]
    Checksum { want: String, got: String },
    #[error("the bytes are not the manifest's canonical encoding (edited or damaged)")]
    NotCanonical,
    #[error("format version {0}, this build reads {FORMAT_VERSION}")]
    Version(u32),
}

/// One stored piece of a global tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorPiece {
    /// The shard file holding it (`rank-{r}.safetensors`).
    pub shard: String,
    /// Its key inside the shard.
    pub key: String,
    /// safetensors dtype (`F32`).
    pub dtype: String,
    /// The piece's shape.
    pub shape: Vec<usize>,
    /// Where the piece starts in the global tensor, per dimension (zeros for a whole tensor).
    pub offset: Vec<usize>,
    /// The global tensor's shape.
    pub global_shape: Vec<usize>,
}

/// One file of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// The rank that wrote it.
    pub rank: usize,
    pub bytes: u64,
    /// Lower-case hex SHA-256 of the file; empty for a shape-only shard.
    pub sha256: String,
    /// Written by the simulated cluster from a shape-only snapshot, by size only: `bytes` is
    /// its modelled size, and it holds no values (so no checksum). Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shape_only: bool,
}

/// The manifest of one committed step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    /// Optimizer steps taken when the state was captured.
    pub step: u64,
    pub config_hash: String,
    pub layout: Layout,
    /// Global tensor name → its stored pieces (one per rank holding a slice or a replica).
    pub tensors: BTreeMap<String, Vec<TensorPiece>>,
    /// Shard file name → size and checksum.
    pub files: BTreeMap<String, FileEntry>,
    /// SHA-256 of this manifest's canonical encoding with this field empty.
    pub checksum: String,
}

fn canonical(m: &Manifest) -> Result<Vec<u8>, ManifestError> {
    let mut v = serde_json::to_vec_pretty(m).map_err(|e| ManifestError::Parse(e.to_string()))?;
    v.push(b'\n');
    Ok(v)
}

impl Manifest {
    /// The manifest's bytes, with its checksum filled in.
    pub fn encode(&self) -> Result<Vec<u8>, ManifestError> {
        let mut m = self.clone();
        m.checksum = String::new();
        m.checksum = sha256_hex(&canonical(&m)?);
        canonical(&m)
    }

    /// Parse and check a manifest: JSON, format version, checksum and canonical form.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        if m.format_version != FORMAT_VERSION {
            return Err(ManifestError::Version(m.format_version));
        }
        let mut blank = m.clone();
        blank.checksum = String::new();
        let got = sha256_hex(&canonical(&blank)?);
        if got != m.checksum {
            return Err(ManifestError::Checksum {
                want: m.checksum,
                got,
            });
        }
        if canonical(&m)? != bytes {
            return Err(ManifestError::NotCanonical);
        }
        Ok(m)
    }

    /// The first shard written by size from a shape-only snapshot (by the simulated cluster),
    /// if any: such a checkpoint has no values to load or verify.
    pub fn shape_only_file(&self) -> Option<&str> {
        self.files
            .iter()
            .find(|(_, f)| f.shape_only)
            .map(|(n, _)| n.as_str())
    }

    /// Bytes of all shard files (modelled sizes for shape-only shards).
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let piece = TensorPiece {
            shard: "rank-0.safetensors".into(),
            key: "w".into(),
            dtype: "F32".into(),
            shape: vec![2, 3],
            offset: vec![0, 0],
            global_shape: vec![2, 3],
        };
        Manifest {
            format_version: FORMAT_VERSION,
            step: 7,
            config_hash: "00ff".into(),
            layout: Layout::single(),
            tensors: BTreeMap::from([("w".into(), vec![piece])]),
            files: BTreeMap::from([(
                "rank-0.safetensors".into(),
                FileEntry {
                    rank: 0,
                    bytes: 100,
                    sha256: "ab".into(),
                    shape_only: false,
                },
            )]),
            checksum: String::new(),
        }
    }

    #[test]
    fn the_shape_only_mark_is_written_only_when_set() {
        let m = sample();
        let text = String::from_utf8(m.encode().expect("encode")).expect("utf-8");
        assert!(!text.contains("shape_only"), "{text}");
        assert_eq!(m.shape_only_file(), None);
        let mut sim = m.clone();
        if let Some(f) = sim.files.get_mut("rank-0.safetensors") {
            f.shape_only = true;
            f.sha256 = String::new();
        }
        let bytes = sim.encode().expect("encode");
        assert!(String::from_utf8_lossy(&bytes).contains("\"shape_only\": true"));
        let back = Manifest::decode(&bytes).expect("decode");
        assert_eq!(back.shape_only_file(), Some("rank-0.safetensors"));
    }

    #[test]
    fn round_trips_and_every_single_bit_flip_is_caught() {
        let m = sample();
        let bytes = m.encode().expect("encode");
        let back = Manifest::decode(&bytes).expect("decode");
        assert_eq!(back.step, 7);
        assert_eq!(back.tensors, m.tensors);
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    Manifest::decode(&b).is_err(),
                    "flip of bit {bit} of byte {i}"
                );
            }
        }
        for n in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..n]).is_err(), "truncated to {n}");
        }
    }
}

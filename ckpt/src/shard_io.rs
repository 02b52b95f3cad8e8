//! Writing a shard without building it in memory first: a shard is its safetensors header
//! ([`shard_header`]) followed by every tensor's bytes in key order, so it can be written and
//! hashed straight from the snapshot's own buffers ([`shard_parts`]). [`write_local`] writes
//! those parts to a file in large sequential writes on one thread while a second thread computes
//! the SHA-256 over the same bytes (one pass over memory each, side by side), then commits the
//! file atomically (temporary name, fsync, rename, directory fsync). [`encode_shard`] joins the
//! same parts into one buffer for storages that take whole values. A shape-only snapshot has no
//! parts: those functions refuse it, and [`shard_size`] gives the size its shard would have.
//!
//! Safetensors layout: 8-byte little-endian header length, the JSON header padded with spaces to
//! a multiple of 8, then the data; readers sort tensors by their offsets, so key order is fine.

use std::io::Write;
use std::path::Path;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::format::{FORMAT_VERSION, FormatError, META_KEY, ShardState, hex, shard_tensors};
use crate::manifest::{FileEntry, TensorPiece};
use crate::snapshot::Snapshot;

// Shards are written from the f32 buffers' own bytes, which are little-endian only here.
#[cfg(target_endian = "big")]
compile_error!("flotilla-ckpt writes shards from native f32 bytes: little-endian targets only");

/// Bytes per `write` call, for the shard and for the benchmark's raw-write baseline alike.
pub const WRITE_CHUNK: usize = 8 << 20;

/// The shard state (safetensors metadata) of a snapshot.
pub fn shard_state(s: &Snapshot) -> ShardState {
    ShardState {
        format_version: FORMAT_VERSION,
        rank: s.meta.rank,
        layout: s.meta.layout.clone(),
        config_hash: s.meta.config_hash.clone(),
        step: s.step,
        schedule_step: s.schedule_step,
        optim_steps: s.optim_steps,
        param_steps: s.moments.iter().map(|(n, m)| (n.clone(), m.step)).collect(),
        data_cursor: hex(&s.data_cursor),
        rng: s.rng.as_deref().map(hex),
        model_config: s.model_config.clone(),
    }
}

/// The safetensors header of `s`'s shard: length prefix, JSON, padding.
pub fn shard_header(s: &Snapshot) -> Result<Vec<u8>, FormatError> {
    let state =
        serde_json::to_string(&shard_state(s)).map_err(|e| FormatError::Metadata(e.to_string()))?;
    let mut meta = Map::new();
    meta.insert("format".into(), Value::from("pt"));
    meta.insert(META_KEY.into(), Value::from(state));
    let mut header = Map::new();
    header.insert("__metadata__".into(), Value::Object(meta));
    let mut offset = 0usize;
    for (key, t) in shard_tensors(s) {
        let end = offset + t.nbytes();
        let info = serde_json::json!({
            "dtype": "F32", "shape": t.shape(), "data_offsets": [offset, end],
        });
        header.insert(key, info);
        offset = end;
    }
    let mut json = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| FormatError::Metadata(e.to_string()))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// The size of `s`'s shard (header and values) without building it: for a shape-only snapshot,
/// the modelled size the simulated cluster writes.
pub fn shard_size(s: &Snapshot) -> Result<u64, FormatError> {
    let header = shard_header(s)?.len() as u64;
    let values: u64 = shard_tensors(s).values().map(|t| t.nbytes() as u64).sum();
    Ok(header + values)
}

/// The tensors' bytes in the order the header lays them out (little-endian f32); a shape-only
/// tensor has none (the callers here refuse a shape-only snapshot first).
pub fn shard_parts(s: &Snapshot) -> Vec<&[u8]> {
    shard_tensors(s)
        .into_values()
        .map(|t| -> &[u8] { bytemuck::cast_slice(t.data()) })
        .collect()
}

/// The whole shard in one buffer (for storages that take whole values, and for replicas).
pub fn encode_shard(s: &Snapshot) -> Result<Vec<u8>, FormatError> {
    s.require_values()?;
    let header = shard_header(s)?;
    let parts = shard_parts(s);
    let total = header.len() + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&header);
    for p in parts {
        out.extend_from_slice(p);
    }
    Ok(out)
}

/// Lower-case hex SHA-256 over the concatenation of `parts`.
pub fn sha256_parts(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    crate::format::hex(&h.finalize())
}

/// Write `parts` to `path` atomically and durably while hashing them on a second thread; the
/// file's size and SHA-256.
pub fn write_local(path: &Path, parts: &[&[u8]]) -> std::io::Result<(u64, String)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("blob");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let (written, sha) = std::thread::scope(|sc| {
        let hasher = sc.spawn(|| sha256_parts(parts));
        let written = (|| -> std::io::Result<u64> {
            let mut f = std::fs::File::create(&tmp)?;
            let mut n = 0u64;
            for p in parts {
                for c in p.chunks(WRITE_CHUNK) {
                    f.write_all(c)?;
                    n += c.len() as u64;
                }
            }
            f.sync_all()?;
            Ok(n)
        })();
        let sha = hasher
            .join()
            .map_err(|_| std::io::Error::other("the hashing thread panicked"));
        (written, sha)
    });
    let (written, sha) = (written?, sha?);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok((written, sha))
}

/// The manifest pieces of a snapshot's shard: every tensor whole, under its shard key.
pub fn pieces(s: &Snapshot, shard: &str) -> Vec<(String, TensorPiece)> {
    shard_tensors(s)
        .into_iter()
        .map(|(key, t)| {
            let piece = TensorPiece {
                shard: shard.to_string(),
                key: key.clone(),
                dtype: "F32".into(),
                shape: t.shape().to_vec(),
                offset: vec![0; t.shape().len()],
                global_shape: t.shape().to_vec(),
            };
            (key, piece)
        })
        .collect()
}

/// A file entry for a written shard.
pub fn entry(rank: usize, bytes: u64, sha256: String) -> FileEntry {
    FileEntry {
        rank,
        bytes,
        sha256,
        shape_only: false,
    }
}

/// Write `s`'s shard to `path` ([`write_local`]); its manifest entry, or why not.
pub fn write_snapshot(path: &Path, s: &Snapshot) -> Result<FileEntry, String> {
    s.require_values().map_err(|e| e.to_string())?;
    let header = shard_header(s).map_err(|e| e.to_string())?;
    let mut parts = vec![header.as_slice()];
    parts.extend(shard_parts(s));
    let (bytes, sha) = write_local(path, &parts).map_err(|e| e.to_string())?;
    Ok(entry(s.meta.rank, bytes, sha))
}

/// `s`'s shard in one buffer and its manifest entry; the hash runs beside the copy, over the
/// snapshot's own buffers.
pub fn encode_hashed(s: &Snapshot) -> Result<(Vec<u8>, FileEntry), FormatError> {
    s.require_values()?;
    let header = shard_header(s)?;
    let mut parts = vec![header.as_slice()];
    parts.extend(shard_parts(s));
    let (bytes, sha) = std::thread::scope(|sc| {
        let h = sc.spawn(|| sha256_parts(&parts));
        let total = parts.iter().map(|p| p.len()).sum::<usize>();
        let mut out = Vec::with_capacity(total);
        for p in &parts {
            out.extend_from_slice(p);
        }
        (out, h.join())
    });
    let sha = sha.map_err(|_| FormatError::Metadata("the hashing thread panicked".into()))?;
    let e = entry(s.meta.rank, bytes.len() as u64, sha);
    Ok((bytes, e))
}

//! `flotilla bench ckpt`: what a checkpoint costs training, on a synthetic rank state of N MiB
//! (parameters and AdamW moments, a few MiB per tensor), measured in one run:
//! - the training stall of an asynchronous checkpoint (host copy of the state + hand-off to
//!   [`CheckpointEngine::save_async`]) beside a synchronous save of the same state;
//! - the background persist's throughput (shard bytes / time until committed) beside a raw
//!   sequential write + fsync of as many bytes in the same directory (plain `std::fs`: the
//!   baseline sits outside the storage seam on purpose);
//! - restore times: from the rank's own memory (a copy of the in-memory snapshot), from a peer
//!   (the snapshot encoded, sent through the in-process fabric between two ranks and decoded)
//!   and from storage (load with full verification).
//!
//! The saves and the raw write run in `--reps` interleaved rounds (a shared disk is noisy); each
//! record gives the median and every run.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use flotilla_ckpt::format::{decode_shard, encode_shard};
use flotilla_ckpt::{CheckpointEngine, Layout, Snapshot, SnapshotMeta, Which};
use flotilla_model::optim::{AdamWState, ParamState};
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::fabric::{Fabric, Payload, Tag};
use flotilla_runtime::storage::local::LocalStorage;
use serde_json::json;

use super::Report;

/// Largest tensor of the synthetic state, in f32 values (4 MiB).
const MAX_TENSOR: usize = 1 << 20;

/// A rank's state of about `mib` MiB: parameters and their two AdamW moments, each tensor at
/// most 4 MiB, filled with non-repeating values.
pub fn synthetic_snapshot(mib: usize, step: u64) -> Result<Snapshot> {
    let total = (mib << 20) / 4;
    let per_param = 3 * MAX_TENSOR;
    let params = total.div_ceil(per_param).max(1);
    let len = (total / (3 * params)).max(1);
    let meta = SnapshotMeta {
        rank: 0,
        layout: Layout::single(),
        config_hash: "bench".into(),
    };
    let mut snap = Snapshot::new(meta, step);
    let mut x = 0x9e37_79b9_u32;
    let mut fill = || -> Vec<f32> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let mut optim = AdamWState {
        steps: step,
        ..AdamWState::default()
    };
    for i in 0..params {
        let name = format!("model.layers.{i}.mlp.weight");
        snap.add_param(&name, &[len], fill())?;
        let state = ParamState {
            step,
            exp_avg: fill(),
            exp_avg_sq: fill().into_iter().map(f32::abs).collect(),
        };
        optim.params.insert(name, state);
    }
    snap.set_optimizer(optim)?;
    Ok(snap)
}

fn gb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-12) / 1e9
}

/// Write `bytes` to a fresh file in `dir` sequentially and fsync it; the time it took.
fn raw_write(dir: &Path, bytes: &[u8]) -> Result<Duration> {
    let path = dir.join("raw-write.bin");
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
    for chunk in bytes.chunks(8 << 20) {
        f.write_all(chunk)?;
    }
    f.sync_all()?;
    std::fs::File::open(dir)?.sync_all()?;
    let d = t.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(d)
}

/// Run the benchmark on a state of `size_mib` MiB, `reps` rounds of saves (medians reported),
/// with files under a fresh directory in `dir`.
pub async fn run(size_mib: usize, reps: usize, dir: &Path) -> Result<Report> {
    let mut report = Report::default();
    let work = dir.join(format!("flotilla-bench-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| work.display().to_string())?;
    let result = measure(size_mib, reps, &work, &mut report).await;
    let _ = std::fs::remove_dir_all(&work);
    result?;
    Ok(report)
}

/// The median of `xs` (upper middle for an even count).
fn median(xs: &[Duration]) -> Duration {
    let mut v = xs.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn secs(xs: &[Duration]) -> Vec<f64> {
    xs.iter().map(Duration::as_secs_f64).collect()
}

async fn measure(size_mib: usize, reps: usize, work: &Path, report: &mut Report) -> Result<()> {
    // The live training state; each checkpoint copies it, as `Trainer::snapshot` does.
    let live = synthetic_snapshot(size_mib, 1)?;
    let state_bytes = live.nbytes() as u64;
    let engine = CheckpointEngine::new(Arc::new(LocalStorage::new(work.join("ckpt"))), 2);

    // Where the persist's time goes before it writes: the shard's encoding and its SHA-256. The
    // encoded bytes are also what the raw-write baseline writes.
    let copy = live.clone();
    let t = Instant::now();
    let (encoded, copy) = tokio::task::spawn_blocking(move || (encode_shard(&copy), copy)).await?;
    let encode = t.elapsed();
    drop(copy);
    let encoded = encoded?;
    let shard_bytes = encoded.len() as u64;
    let t = Instant::now();
    let digest = flotilla_ckpt::format::sha256_hex(&encoded);
    let sha = t.elapsed();
    ensure!(digest.len() == 64);
    report.push(json!({
        "bench": "persist_parts", "encode_s": encode.as_secs_f64(), "sha256_s": sha.as_secs_f64(),
        "encode_gb_per_s": gb_per_s(shard_bytes, encode),
        "sha256_gb_per_s": gb_per_s(shard_bytes, sha),
    }));

    let (mut sync_t, mut stall_t, mut persist_t, mut raw_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut step = 0;
    // Rounds of the three, interleaved, so that a slow moment of a shared disk hits all alike;
    // the medians are reported.
    for _ in 0..reps.max(1) {
        // (b) Synchronous save: training waits for the copy and the whole persist.
        step += 1;
        let t = Instant::now();
        let mut copy = live.clone();
        copy.step = step;
        let sync = engine.save_sync(vec![copy]).await?;
        sync_t.push(t.elapsed());

        // (a) + (c) Asynchronous save of the same state: training stalls for the copy and the
        // hand-off; the background task encodes, persists and commits.
        step += 1;
        let t = Instant::now();
        let mut copy = live.clone();
        copy.step = step;
        let handle = engine.save_async(vec![copy])?;
        stall_t.push(t.elapsed());
        let saved = handle.wait().await?;
        persist_t.push(t.elapsed());
        // The same shard but for the step number in its metadata.
        ensure!(
            saved.bytes.abs_diff(shard_bytes) < 32 && sync.bytes.abs_diff(shard_bytes) < 32,
            "the saves wrote other sizes than the encoded shard"
        );

        // (d) Baseline: the same shard bytes written sequentially with fsync, same directory.
        raw_t.push(raw_write(work, &encoded)?);
    }
    drop(encoded);
    let (sync_save, stall, persist, raw) = (
        median(&sync_t),
        median(&stall_t),
        median(&persist_t),
        median(&raw_t),
    );
    report.push(json!({
        "bench": "sync_save", "state_bytes": state_bytes, "shard_bytes": shard_bytes,
        "seconds": sync_save.as_secs_f64(), "gb_per_s": gb_per_s(shard_bytes, sync_save),
        "runs_s": secs(&sync_t),
    }));
    // What the stall could be: a copy of as many bytes between buffers already in memory (the
    // snapshot copies into fresh allocations, so it also pays for their page faults).
    let src = vec![1u8; state_bytes as usize];
    let mut dst = vec![0u8; state_bytes as usize];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    dst.copy_from_slice(std::hint::black_box(&src));
    std::hint::black_box(&mut dst);
    let warm_copy = t.elapsed();
    drop((src, dst));
    report.push(json!({
        "bench": "async_save", "stall_s": stall.as_secs_f64(),
        "warm_memcpy_s": warm_copy.as_secs_f64(), "persist_s": persist.as_secs_f64(),
        "shard_bytes": shard_bytes, "persist_gb_per_s": gb_per_s(shard_bytes, persist),
        "stall_runs_s": secs(&stall_t), "persist_runs_s": secs(&persist_t),
    }));
    report.push(json!({
        "bench": "raw_write_fsync", "bytes": shard_bytes, "seconds": raw.as_secs_f64(),
        "gb_per_s": gb_per_s(shard_bytes, raw), "runs_s": secs(&raw_t),
    }));

    // (e) Restores. Own memory: a copy of the snapshot kept in host memory.
    let t = Instant::now();
    let own = std::hint::black_box(live.clone());
    let restore_memory = t.elapsed();
    drop(own);

    // A peer: rank 1 holds a replica; it encodes it, sends it over the fabric, rank 0 decodes.
    let hub = InprocHub::new(2);
    let eps = hub.endpoints();
    let (me, peer) = (eps[0].clone(), eps[1].clone());
    let replica = live.clone();
    let t = Instant::now();
    let sender = tokio::spawn(async move {
        let bytes = tokio::task::spawn_blocking(move || encode_shard(&replica)).await??;
        peer.send(0, Tag::new(0, 0), Payload::Bytes(bytes)).await?;
        anyhow::Ok(())
    });
    let got = me.recv(1, Tag::new(0, 0), Duration::from_secs(600)).await?;
    let bytes = got.into_bytes()?;
    let from_peer = tokio::task::spawn_blocking(move || decode_shard(&bytes)).await??;
    let restore_peer = t.elapsed();
    sender.await??;
    ensure!(from_peer == live, "the peer's copy differs from the state");
    drop(from_peer);

    // Storage: load the newest checkpoint, verifying every shard's SHA-256.
    let t = Instant::now();
    let loaded = engine.load(Which::Latest, true).await?;
    let restore_storage = t.elapsed();
    ensure!(
        loaded.step == step,
        "loaded step {}, expected {step}",
        loaded.step
    );
    let mut back = loaded.snapshots.into_iter().next().context("no snapshot")?;
    back.step = live.step;
    ensure!(back == live, "the stored copy differs from the state");
    report.push(json!({
        "bench": "restore", "state_bytes": state_bytes,
        "memory_s": restore_memory.as_secs_f64(), "peer_s": restore_peer.as_secs_f64(),
        "storage_s": restore_storage.as_secs_f64(),
    }));

    report.push(json!({"summary": {
        "async_stall_over_sync_save": stall.as_secs_f64() / sync_save.as_secs_f64(),
        "persist_over_raw_write": raw.as_secs_f64() / persist.as_secs_f64(),
        "restore_peer_s": restore_peer.as_secs_f64(),
        "restore_storage_s": restore_storage.as_secs_f64(),
    }}));
    Ok(())
}

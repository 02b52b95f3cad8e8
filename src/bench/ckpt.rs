//! `flotilla bench ckpt`: what a checkpoint costs training, on a synthetic rank state of N MiB
//! (parameters and AdamW moments, a few MiB per tensor), measured in one run:
//! - the training stall of an asynchronous checkpoint: a copy of the live state into snapshot
//!   buffers kept from the previous checkpoint ([`Snapshot::copy_from`], already-touched memory,
//!   split across cores) and the hand-off to [`CheckpointEngine::save_async`]; beside it, a
//!   synchronous save of the same state (the same copy, then training waits for the commit);
//! - the background persist's throughput (shard bytes / time from hand-off to commit; the shard
//!   is written straight from the snapshot buffers and hashed on a second thread; the pruning of
//!   old steps that follows each commit is timed apart, `retention`) beside a raw
//!   sequential write + fsync of the same bytes in the same directory, in the same write size
//!   (plain `std::fs`: the baseline sits outside the storage seam on purpose);
//! - restore times: from the rank's own memory (an [`OwnCopy`], hash-checked), from a peer (the
//!   replica pushed to rank 1's [`ReplicaServer`] over the in-process fabric, fetched back and
//!   checked against the source's SHA-256) and from storage (the rank's shard, verified).
//!
//! The saves and the raw write run in `--reps` interleaved rounds (a shared disk is noisy); each
//! record gives the median and every run.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use flotilla_ckpt::format::encode_shard;
use flotilla_ckpt::replica::{fetch_replica, push_replica};
use flotilla_ckpt::shard_io::WRITE_CHUNK;
use flotilla_ckpt::{CheckpointEngine, Layout, OwnCopy, ReplicaServer, Snapshot, SnapshotMeta};
use flotilla_model::optim::{AdamWState, ParamState};
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;
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
    for chunk in bytes.chunks(WRITE_CHUNK) {
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
    let engine = CheckpointEngine::local(work.join("ckpt"), 2);

    // The shard's bytes (what the raw-write baseline writes) and the SHA-256 rate.
    let copy = live.clone();
    let (encoded, copy) = tokio::task::spawn_blocking(move || (encode_shard(&copy), copy)).await?;
    drop(copy);
    let encoded = encoded?;
    let shard_bytes = encoded.len() as u64;
    let t = Instant::now();
    let digest = flotilla_ckpt::format::sha256_hex(&encoded);
    let sha = t.elapsed();
    ensure!(digest.len() == 64);
    report.push(json!({
        "bench": "persist_parts", "sha256_s": sha.as_secs_f64(),
        "sha256_gb_per_s": gb_per_s(shard_bytes, sha),
    }));

    // Snapshot buffers, as a checkpointer keeps them between checkpoints (touched once here, as
    // the first checkpoint of a job touches them).
    let mut buffers = vec![live.clone()];
    let (mut sync_t, mut stall_t, mut persist_t, mut raw_t, mut retention_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut step = 0;
    // Rounds of the three, interleaved, so that a slow moment of a shared disk hits all alike;
    // the medians are reported.
    for round in 0..reps.max(1) {
        // (d) Baseline first in odd rounds (after the saves in even ones), so that neither side
        // always runs on the disk state the other leaves behind.
        if round % 2 == 1 {
            raw_t.push(raw_write(work, &encoded)?);
        }
        // (b) Synchronous save: training waits for the copy and the whole persist.
        step += 1;
        let mut buf = buffers.pop().context("no snapshot buffer")?;
        let t = Instant::now();
        buf.copy_from(&live);
        buf.step = step;
        let (sync, back, retention) = engine.save_async(vec![buf])?.wait_committed().await?;
        sync_t.push(t.elapsed());
        buffers.extend(back);
        // Pruning old steps follows the commit in both saves; it is timed on its own.
        let t = Instant::now();
        if let Some(r) = retention {
            r.wait().await?;
        }
        retention_t.push(t.elapsed());

        // (a) + (c) Asynchronous save of the same state: training stalls for the copy and the
        // hand-off; the background task writes, hashes and commits.
        step += 1;
        let mut buf = buffers.pop().context("no snapshot buffer")?;
        let t = Instant::now();
        buf.copy_from(&live);
        buf.step = step;
        let handle = engine.save_async(vec![buf])?;
        let stall = t.elapsed();
        stall_t.push(stall);
        let (saved, back, retention) = handle.wait_committed().await?;
        persist_t.push(t.elapsed() - stall);
        buffers.extend(back);
        let t = Instant::now();
        if let Some(r) = retention {
            r.wait().await?;
        }
        retention_t.push(t.elapsed());
        // The same shard but for the step number in its metadata.
        ensure!(
            saved.bytes.abs_diff(shard_bytes) < 32 && sync.bytes.abs_diff(shard_bytes) < 32,
            "the saves wrote other sizes than the encoded shard"
        );

        // (d) Baseline: the same shard bytes written sequentially with fsync, same directory.
        if round % 2 == 0 {
            raw_t.push(raw_write(work, &encoded)?);
        }
    }
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
    report.push(json!({
        "bench": "async_save", "stall_s": stall.as_secs_f64(),
        "stall_gb_per_s": gb_per_s(state_bytes, stall), "persist_s": persist.as_secs_f64(),
        "shard_bytes": shard_bytes, "persist_gb_per_s": gb_per_s(shard_bytes, persist),
        "stall_runs_s": secs(&stall_t), "persist_runs_s": secs(&persist_t),
    }));
    // Deleting the step that retention drops, after each commit (not in the times above).
    report.push(json!({
        "bench": "retention", "seconds": median(&retention_t).as_secs_f64(),
        "runs_s": secs(&retention_t),
    }));
    report.push(json!({
        "bench": "raw_write_fsync", "bytes": shard_bytes, "seconds": raw.as_secs_f64(),
        "gb_per_s": gb_per_s(shard_bytes, raw), "runs_s": secs(&raw_t),
        "write_chunk_bytes": WRITE_CHUNK,
    }));
    drop(buffers);

    // (e) Restores. Own memory: the rank's kept snapshot, checked against its SHA-256.
    let own = OwnCopy::with_sha256(live.clone(), digest.clone());
    let t = Instant::now();
    let back = tokio::task::block_in_place(|| own.verified()).map_err(anyhow::Error::msg)?;
    let restore_memory = t.elapsed();
    ensure!(back == live, "the own copy differs from the state");
    drop((own, back));

    // A peer: rank 0 pushes its replica to rank 1's replica service over the fabric; restoring
    // fetches it back (the holder copies it out of its store), checks its SHA-256 and decodes.
    let hub = InprocHub::new(2);
    let eps = hub.endpoints();
    let me = eps[0].clone();
    let deadline = Duration::from_secs(600);
    let mut server = ReplicaServer::spawn(Arc::new(eps[1].clone()), vec![0], deadline);
    push_replica(&me, &[1], 0, live.step, encoded).await?;
    let t0 = Instant::now();
    while server.store.read().await.get(0).is_none() {
        ensure!(t0.elapsed() < deadline, "the replica never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let from_peer = fetch_replica(&me, 1, 0, deadline).await?;
    let restore_peer = t.elapsed();
    server.shutdown();
    drop(server);
    ensure!(
        me.rank() == 0 && from_peer == live,
        "the peer's copy differs from the state"
    );
    drop(from_peer);

    // Storage: the rank's shard of the newest checkpoint, verified against the manifest.
    let t = Instant::now();
    let mut back = engine.load_rank(None, 0).await?;
    let restore_storage = t.elapsed();
    ensure!(
        back.step == step,
        "loaded step {}, expected {step}",
        back.step
    );
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
        "restore_memory_s": restore_memory.as_secs_f64(),
        "restore_peer_s": restore_peer.as_secs_f64(),
        "restore_storage_s": restore_storage.as_secs_f64(),
    }}));
    Ok(())
}

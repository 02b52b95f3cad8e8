//! `flotilla bench ckpt`: what a checkpoint costs training, on a real trainer whose state
//! (parameters and AdamW moments) is about N MiB — the default model widened, with as many
//! routed experts as it takes — measured in one run:
//! - the training stall of an asynchronous checkpoint, as `flotilla train` takes it: the step
//!   after the checkpoint boundary keeps the state before it through its out-of-place optimizer
//!   update ([`Trainer::step_with_snapshot`], reusing the previous checkpoint's buffers), and
//!   the snapshot is handed to [`CheckpointEngine::save_async`]. The stall is that step's time
//!   over an ordinary step's, measured in adjacent pairs (the median difference, floored at
//!   zero: below zero it is noise), plus the hand-off. Beside it, the copy the kept snapshot
//!   replaces ([`Snapshot::copy_from`] into touched buffers, split across cores);
//! - a synchronous save of the same state: that copy, then training waits for the commit;
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
use flotilla_actors::trainer::Trainer;
use flotilla_ckpt::format::encode_shard;
use flotilla_ckpt::replica::{fetch_replica, push_replica};
use flotilla_ckpt::shard_io::WRITE_CHUNK;
use flotilla_ckpt::{CheckpointEngine, OwnCopy, ReplicaServer, Snapshot};
use flotilla_runtime::config::Config;
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;
use serde_json::json;

use super::Report;

/// Adjacent (ordinary step, kept step) pairs per round.
const PAIRS: usize = 4;

/// The job config of a trainer with `experts` routed experts per MoE layer: the default model
/// widened to 256 (experts of 256), one token batch of 2 × 16, one GEMM thread per core.
fn config(experts: usize) -> Config {
    let mut c = Config::default();
    let m = &mut c.model;
    m.hidden_size = 256;
    m.intermediate_size = 512;
    m.moe_intermediate_size = 256;
    m.n_routed_experts = experts;
    c.data.batch_size = 2;
    c.data.seq_len = 16;
    c.optimizer.warmup_steps = 1;
    c
}

/// Bytes of a trainer's parameters and moments (three values per parameter once it has
/// stepped).
fn state_bytes(t: &Trainer) -> Result<usize> {
    Ok(3 * t.snapshot().map_err(anyhow::Error::msg)?.nbytes())
}

/// A trainer whose state is about `mib` MiB (at least the smallest model's): the state grows
/// linearly with the expert count, measured at two counts and solved for the rest.
pub fn sized_trainer(mib: usize) -> Result<Trainer> {
    let groups = Config::default().model.n_group;
    let build = |e: usize| Trainer::new(&config(e)).map_err(anyhow::Error::msg);
    let (e0, e1) = (2 * groups, 4 * groups);
    let (b0, b1) = (state_bytes(&build(e0)?)?, state_bytes(&build(e1)?)?);
    let per_expert = (b1 - b0) as f64 / (e1 - e0) as f64;
    let want = (mib << 20) as f64;
    let extra = ((want - b0 as f64) / per_expert).max(0.0) as usize;
    let experts = (e0 + extra).next_multiple_of(groups);
    build(experts)
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
    let mut trainer = tokio::task::block_in_place(|| sized_trainer(size_mib))?;
    let step =
        |t: &mut Trainer| tokio::task::block_in_place(|| t.step()).map_err(anyhow::Error::msg);
    // Two warm-up steps: moments exist from the first, so every checkpoint below keeps them.
    step(&mut trainer)?;
    step(&mut trainer)?;
    let engine = CheckpointEngine::local(work.join("ckpt"), 2);
    let live = trainer.snapshot().map_err(anyhow::Error::msg)?;
    let state_bytes = live.nbytes() as u64;

    // The shard's bytes (what the raw-write baseline writes) and the SHA-256 rate.
    let (encoded, live) = tokio::task::spawn_blocking(move || (encode_shard(&live), live)).await?;
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

    // Snapshot buffers, as the checkpointer keeps them between checkpoints (touched once here,
    // as the first checkpoint of a job touches them).
    let mut kept_buffers: Option<Snapshot> = Some(live.clone());
    let mut copy_buffers = live;
    let mut t_plain = Vec::new();
    let mut t_kept = Vec::new();
    let mut diffs = Vec::new();
    let (mut sync_t, mut copy_t, mut stall_t, mut persist_t, mut raw_t, mut retention_t) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    // Rounds of the three, interleaved, so that a slow moment of a shared disk hits all alike;
    // the medians are reported.
    for round in 0..reps.max(1) {
        // (d) Baseline first in odd rounds (after the saves in even ones), so that neither side
        // always runs on the disk state the other leaves behind.
        if round % 2 == 1 {
            raw_t.push(raw_write(work, &encoded)?);
        }
        // (a) + (c) Asynchronous save as `train` takes it: an ordinary step, then the step that
        // keeps the state before it, in adjacent pairs (the step time is noisy on shared
        // cores); the last pair's snapshot is handed to the background save, the others' feed
        // the next kept step's buffers.
        let mut snap = None;
        for _ in 0..PAIRS {
            let t = Instant::now();
            step(&mut trainer)?;
            let plain = t.elapsed();
            let t = Instant::now();
            let reuse = snap.take().or_else(|| kept_buffers.take());
            let (_, kept_snap) = tokio::task::block_in_place(|| trainer.step_with_snapshot(reuse))
                .map_err(anyhow::Error::msg)?;
            let kept = t.elapsed();
            snap = Some(kept_snap);
            t_plain.push(plain);
            t_kept.push(kept);
            diffs.push(kept.as_secs_f64() - plain.as_secs_f64());
        }
        let snap = snap.context("no kept snapshot")?;
        let t = Instant::now();
        let handle = engine.save_async(vec![snap])?;
        let handoff = t.elapsed();
        let (saved, back, retention) = handle.wait_committed().await?;
        persist_t.push(t.elapsed() - handoff);
        kept_buffers = back.into_iter().next();
        stall_t.push(handoff);
        let t = Instant::now();
        if let Some(r) = retention {
            r.wait().await?;
        }
        retention_t.push(t.elapsed());

        // (b) Synchronous save of the same state: the copy into touched buffers, then training
        // waits for the commit. The source is taken outside the timer.
        let src = trainer.snapshot().map_err(anyhow::Error::msg)?;
        let t = Instant::now();
        tokio::task::block_in_place(|| copy_buffers.copy_from(&src));
        let copy = t.elapsed();
        let (sync, back, retention) = engine
            .save_async(vec![copy_buffers])?
            .wait_committed()
            .await?;
        sync_t.push(t.elapsed());
        copy_t.push(copy);
        copy_buffers = back.into_iter().next().context("no snapshot buffer")?;
        drop(src);
        let t = Instant::now();
        if let Some(r) = retention {
            r.wait().await?;
        }
        retention_t.push(t.elapsed());
        // The same shard but for the metadata (step number, data cursor) and the values of
        // later steps.
        let slack = 64 << 10;
        ensure!(
            saved.bytes.abs_diff(shard_bytes) < slack && sync.bytes.abs_diff(shard_bytes) < slack,
            "the saves wrote {} and {} bytes, the encoded shard is {shard_bytes}",
            saved.bytes,
            sync.bytes
        );

        // (d) Baseline: the same shard bytes written sequentially with fsync, same directory.
        if round % 2 == 0 {
            raw_t.push(raw_write(work, &encoded)?);
        }
    }
    let mut sorted = diffs.clone();
    sorted.sort_by(f64::total_cmp);
    let extra = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let handoff = median(&stall_t);
    let stall = handoff + Duration::from_secs_f64(extra.max(0.0));
    drop((kept_buffers, copy_buffers, encoded));
    // The state now, which the last synchronous save wrote: what every restore must give back.
    let live = trainer.snapshot().map_err(anyhow::Error::msg)?;
    let (encoded, live) = tokio::task::spawn_blocking(move || (encode_shard(&live), live)).await?;
    let encoded = encoded?;
    let digest = flotilla_ckpt::format::sha256_hex(&encoded);
    let (sync_save, persist, raw) = (median(&sync_t), median(&persist_t), median(&raw_t));
    // Beside the medians: on a disk whose speed swings between two levels (burst credit), the
    // fastest of each says what the code achieves against what the disk can do.
    let fastest_persist = persist_t.iter().min().copied().unwrap_or_default();
    let fastest_raw = raw_t.iter().min().copied().unwrap_or_default();
    report.push(json!({
        "bench": "sync_save", "state_bytes": state_bytes, "shard_bytes": shard_bytes,
        "seconds": sync_save.as_secs_f64(), "gb_per_s": gb_per_s(shard_bytes, sync_save),
        "runs_s": secs(&sync_t),
    }));
    report.push(json!({
        "bench": "async_save", "how": "kept by the next step's out-of-place optimizer update",
        "stall_s": stall.as_secs_f64(), "kept_step_over_plain_step_s": extra,
        "kept_minus_plain_runs_s": diffs,
        "handoff_s": handoff.as_secs_f64(),
        "plain_step_runs_s": secs(&t_plain), "kept_step_runs_s": secs(&t_kept),
        "persist_s": persist.as_secs_f64(), "shard_bytes": shard_bytes,
        "persist_gb_per_s": gb_per_s(shard_bytes, persist), "persist_runs_s": secs(&persist_t),
    }));
    // The copy the kept snapshot replaces (what an async save stalled for before).
    report.push(json!({
        "bench": "snapshot_copy", "state_bytes": state_bytes,
        "seconds": median(&copy_t).as_secs_f64(), "gb_per_s": gb_per_s(state_bytes, median(&copy_t)),
        "runs_s": secs(&copy_t),
    }));
    // Deleting the step that retention drops, after each commit (not in the times above).
    report.push(json!({
        "bench": "retention", "seconds": median(&retention_t).as_secs_f64(),
        "runs_s": secs(&retention_t),
    }));
    report.push(json!({
        "bench": "raw_write_fsync", "bytes": shard_bytes, "seconds": raw.as_secs_f64(),
        "gb_per_s": gb_per_s(shard_bytes, raw), "runs_s": secs(&raw_t),
        "fastest_s": fastest_raw.as_secs_f64(),
        "fastest_persist_over_fastest_raw": fastest_raw.as_secs_f64()
            / fastest_persist.as_secs_f64().max(1e-12),
        "write_chunk_bytes": WRITE_CHUNK,
    }));

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
    let back = engine.load_rank(None, 0).await?;
    let restore_storage = t.elapsed();
    ensure!(
        back == live,
        "the stored copy (step {}) differs from the state (step {})",
        back.step,
        live.step
    );
    report.push(json!({
        "bench": "restore", "state_bytes": state_bytes,
        "memory_s": restore_memory.as_secs_f64(), "peer_s": restore_peer.as_secs_f64(),
        "storage_s": restore_storage.as_secs_f64(),
    }));

    report.push(json!({"summary": {
        "async_stall_over_sync_save": stall.as_secs_f64() / sync_save.as_secs_f64(),
        "state_mib": state_bytes as f64 / (1 << 20) as f64,
        "persist_over_raw_write": raw.as_secs_f64() / persist.as_secs_f64(),
        "restore_memory_s": restore_memory.as_secs_f64(),
        "restore_peer_s": restore_peer.as_secs_f64(),
        "restore_storage_s": restore_storage.as_secs_f64(),
    }}));
    Ok(())
}

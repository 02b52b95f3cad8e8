//! `flotilla bench ckpt`: what a checkpoint costs training, on a real job ([`Job`]: one rank,
//! its actor subtree and compute stream, started as `flotilla train` starts it) whose rank state
//! (parameters and AdamW moments) is about N MiB — the default model widened to 256, with as
//! many routed experts as it takes — measured in one run:
//! - the training stall of an asynchronous checkpoint as `flotilla train` takes it
//!   (`checkpoint.mode = "async"`): the rank's snapshot ([`Job::snapshots`]: a device→host copy
//!   of its whole state, taken between steps by a job on its compute stream; training waits for
//!   it), plus the hand-off of the snapshot to the checkpoint coordinator
//!   ([`Checkpointer::save_all`], answered once the coordinator has begun the save and started
//!   its writer actors). The coordinator is the one `flotilla train` runs
//!   ([`ckpt_coordinator::child_spec`] under a `one_for_all` root with the job's
//!   `[supervision]` policy), started here beside the job (a [`Job`] does not hand its own
//!   out), over the engine `flotilla train` builds for a local `checkpoint.dir`
//!   ([`CheckpointEngine::new`] on a [`LocalStorage`]) wrapped to note when the commit happens;
//! - beside it, a synchronous save (`mode = "sync"`) of the state one step later (the same size):
//!   the snapshot, the shard write and the commit (manifest, then `latest`). In `flotilla train`
//!   sync mode also waits for the pruning that follows; that wait is reported apart
//!   (`train_waits_runs_s`);
//! - the background persist's throughput: shard bytes over the time from the hand-off to the
//!   commit (the `latest` pointer written), waited for at once (no step runs beside it, so the
//!   contention of a training job is not in it). This engine encodes the shard into one buffer
//!   while a second thread hashes it, then puts it (temporary file, one `write_all`, fsync,
//!   rename, directory fsync; the put alone is `shard_put_runs_s`). The pruning of old steps
//!   that the coordinator runs after each commit is timed apart (`retention`: from the commit
//!   to the coordinator's answer). Beside it, a raw
//!   sequential write + fsync of the same bytes in the same directory in [`WRITE_CHUNK`] writes
//!   (plain `std::fs`: the baseline sits outside the storage seam on purpose), and the engine's
//!   direct write of the same snapshot ([`CheckpointEngine::local`]: the shard written straight
//!   from the snapshot's buffers in [`WRITE_CHUNK`] writes, hashed on a second thread;
//!   hand-off → commit of [`CheckpointEngine::save_async`]), which `flotilla train` does not use;
//! - restore times: from the rank's own memory (an [`OwnCopy`], hash-checked), from a peer (the
//!   replica pushed to rank 1's [`ReplicaServer`] over the in-process fabric, fetched back and
//!   checked against the source's SHA-256) and from storage (the rank's shard of the newest
//!   step, verified against the manifest); then the state from storage restored into the job
//!   ([`Job::restore`], timed), after which one more step must give the loss, gradient norm and
//!   parameters of the step the job took from that state before.
//!
//! Each of `--reps` rounds runs an ordinary step, the asynchronous save of the state it leaves,
//! the direct write of the same snapshot, another step and the synchronous save, with the raw
//! write before them in odd rounds and after them in even ones (a shared disk is noisy, and
//! neither side should always run on the disk state the other leaves behind). Each record gives
//! the median and every run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use flotilla_actors::checkpoints::Checkpointer;
use flotilla_actors::ckpt_coordinator::{self, Coordinator};
use flotilla_actors::job::{Job, Launch};
use flotilla_ckpt::format::{LATEST, encode_shard, sha256_hex};
use flotilla_ckpt::replica::{fetch_replica, push_replica};
use flotilla_ckpt::shard_io::WRITE_CHUNK;
use flotilla_ckpt::{CheckpointEngine, OwnCopy, ReplicaServer, Snapshot};
use flotilla_runtime::clock::RealClock;
use flotilla_runtime::config::{CheckpointMode, Config};
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::storage::local::LocalStorage;
use flotilla_runtime::storage::sim::SimStorage;
use flotilla_runtime::storage::{BoxFuture, Storage, StorageError};
use flotilla_runtime::supervision::{
    Strategy, Supervisor, SupervisorHandle, SupervisorPolicy, event_channel,
};
use serde_json::json;

use super::Report;

/// Checkpoints kept by the measured engine (as before: each commit from the third on prunes one).
const KEEP: usize = 2;

/// The job config with `experts` routed experts per MoE layer: the default model widened to 256
/// (experts of 256), one token batch of 2 × 16, asynchronous checkpoints switched on (their
/// interval is not used: the bench takes them).
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
    c.metrics.jsonl = false;
    c.checkpoint.interval = 1;
    c.checkpoint.mode = CheckpointMode::Async;
    c.checkpoint.keep = KEEP;
    c
}

/// Start `cfg`'s job (one rank), its run files in memory.
async fn start_job(cfg: Config) -> Result<Job> {
    let storage = Arc::new(SimStorage::unlimited());
    Ok(Job::start(cfg, storage, Arc::new(RealClock), true, Launch::default()).await?)
}

/// The rank's snapshot, taken between steps.
async fn snapshot(job: &Job, step: u64) -> Result<Snapshot> {
    job.snapshots(step)
        .await?
        .into_iter()
        .next()
        .context("the job has no rank")
}

/// Bytes of the rank state of `cfg`'s job once it has stepped (moments included).
async fn state_bytes(cfg: &Config) -> Result<usize> {
    let mut job = start_job(cfg.clone()).await?;
    let bytes = async {
        job.step(0).await?;
        Ok::<_, anyhow::Error>(snapshot(&job, 1).await?.nbytes())
    }
    .await;
    let stopped = job.stop().await;
    let bytes = bytes?;
    stopped?;
    Ok(bytes)
}

/// The config of a job whose rank state is about `mib` MiB (at least the smallest model's): the
/// state grows linearly with the expert count, measured at two counts and solved for the rest.
pub async fn sized_config(mib: usize) -> Result<Config> {
    let groups = Config::default().model.n_group;
    let (e0, e1) = (2 * groups, 4 * groups);
    let (b0, b1) = (
        state_bytes(&config(e0)).await?,
        state_bytes(&config(e1)).await?,
    );
    ensure!(b1 > b0, "the state does not grow with the expert count");
    let per_expert = (b1 - b0) as f64 / (e1 - e0) as f64;
    let want = (mib << 20) as f64;
    let extra = ((want - b0 as f64) / per_expert).max(0.0) as usize;
    Ok(config((e0 + extra).next_multiple_of(groups)))
}

/// What [`Timed`] noted of the last save.
#[derive(Debug, Default, Clone, Copy)]
struct Marks {
    /// When the `latest` pointer was written: the end of the commit.
    committed: Option<Instant>,
    /// Bytes of the last shard put.
    shard_bytes: u64,
    /// How long its put took (write, fsync, rename, directory fsync).
    shard_put: Duration,
}

/// The local storage `flotilla train` checkpoints to, noting when a commit ends and how large
/// the shard was; everything else passes through.
#[derive(Debug)]
struct Timed {
    inner: LocalStorage,
    marks: Mutex<Marks>,
}

impl Timed {
    fn new(root: PathBuf) -> Self {
        Self {
            inner: LocalStorage::new(root),
            marks: Mutex::new(Marks::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Marks) -> T) -> T {
        f(&mut self.marks.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Forget the last save's marks; returns them.
    fn take(&self) -> Marks {
        self.with(std::mem::take)
    }
}

impl Storage for Timed {
    fn put(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), StorageError>> {
        let key = key.to_string();
        Box::pin(async move {
            let n = bytes.len() as u64;
            let t = Instant::now();
            self.inner.put(&key, bytes).await?;
            let took = t.elapsed();
            if key == LATEST {
                let now = Instant::now();
                self.with(|m| m.committed = Some(now));
            } else if key.ends_with(".safetensors") {
                self.with(|m| (m.shard_bytes, m.shard_put) = (n, took));
            }
            Ok(())
        })
    }

    fn append(&self, key: &str, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), StorageError>> {
        self.inner.append(key, bytes)
    }

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Vec<u8>, StorageError>> {
        self.inner.get(key)
    }

    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<Vec<String>, StorageError>> {
        self.inner.list(prefix)
    }

    fn remove(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        self.inner.remove(key)
    }

    fn put_sized(&self, key: &str, len: u64) -> BoxFuture<'_, Result<(), StorageError>> {
        self.inner.put_sized(key, len)
    }
}

/// The checkpoint coordinator under a root supervisor, as the job starts it.
async fn start_coordinator(
    cfg: &Config,
    engine: &CheckpointEngine,
) -> Result<(SupervisorHandle, Coordinator)> {
    let (tx, mut rx) = event_channel();
    // The job writes these to `events.jsonl`; here nobody reads them.
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let child = ckpt_coordinator::child_spec(
        cfg,
        engine.clone(),
        tx.clone(),
        &flotilla_runtime::clock::RealClock,
    )?;
    let spec = SupervisorPolicy::from_supervision(&cfg.supervision)?
        .with_strategy(Strategy::OneForAll)
        .spec()?
        .child(child)
        .observer(tx)
        .with_label("controller");
    let (sup, _join) = Supervisor::spawn(None, spec, None).await?;
    let coordinator = Coordinator::find(&sup).await;
    match coordinator {
        Ok(c) => Ok((sup, c)),
        Err(e) => {
            let _ = sup
                .stop(Duration::from_millis(
                    cfg.supervision.shutdown_timeout_ms.max(1),
                ))
                .await;
            Err(e.into())
        }
    }
}

fn gb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-12) / 1e9
}

/// Write `bytes` to a fresh file in `dir` sequentially and fsync it; the time it took.
fn raw_write_blocking(dir: &Path, bytes: &[u8]) -> Result<Duration> {
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

/// [`raw_write_blocking`] off the async threads.
async fn raw_write(dir: &Path, bytes: &Arc<Vec<u8>>) -> Result<Duration> {
    let (dir, bytes) = (dir.to_path_buf(), Arc::clone(bytes));
    tokio::task::spawn_blocking(move || raw_write_blocking(&dir, &bytes)).await?
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

/// Start the job and the coordinator, measure, stop both (also when measuring failed).
async fn measure(size_mib: usize, reps: usize, work: &Path, report: &mut Report) -> Result<()> {
    let cfg = sized_config(size_mib).await?;
    let mut job = start_job(cfg.clone()).await?;
    let storage = Arc::new(Timed::new(work.join("ckpt")));
    let engine = CheckpointEngine::new(Arc::clone(&storage) as Arc<dyn Storage>, KEEP);
    let (sup, coordinator) = match start_coordinator(&cfg, &engine).await {
        Ok(c) => c,
        Err(e) => {
            let _ = job.stop().await;
            return Err(e);
        }
    };
    let bench = Bench {
        cfg: &cfg,
        storage: &storage,
        engine: &engine,
        coordinator,
        work,
    };
    let result = bench.rounds(&mut job, reps, report).await;
    let sup_stopped = sup
        .stop(Duration::from_millis(
            cfg.supervision.shutdown_timeout_ms.max(1),
        ))
        .await;
    let job_stopped = job.stop().await;
    result?;
    sup_stopped?;
    job_stopped?;
    Ok(())
}

/// What the rounds share.
struct Bench<'a> {
    cfg: &'a Config,
    storage: &'a Timed,
    engine: &'a CheckpointEngine,
    coordinator: Coordinator,
    work: &'a Path,
}

/// One save through the coordinator: from the hand-off to the commit, and from the commit to
/// the coordinator's answer (the pruning).
struct Persisted {
    to_commit: Duration,
    /// The shard's put alone (the rest of `to_commit` is mostly encoding it into one buffer).
    put: Duration,
    pruning: Duration,
}

impl Bench<'_> {
    /// A checkpointer over the coordinator in `mode`, as `flotilla train` makes it.
    fn checkpointer(&self, mode: CheckpointMode) -> Result<Checkpointer> {
        let mut cfg = self.cfg.clone();
        cfg.checkpoint.mode = mode;
        Checkpointer::new(&cfg, self.engine.clone(), self.coordinator.clone())
            .context("checkpoints are off in the bench's config")
    }

    /// Where the save handed off at `from` stands once the coordinator has answered: checks
    /// that it committed one shard of about `shard_bytes`.
    fn persisted(&self, from: Instant, shard_bytes: u64) -> Result<Persisted> {
        let answered = Instant::now();
        let marks = self.storage.take();
        let committed = marks
            .committed
            .context("the save wrote no `latest` pointer")?;
        ensure!(committed >= from, "the commit precedes the save");
        // The same shard but for the metadata (step number, data cursor) and later values.
        let slack = 64 << 10;
        ensure!(
            marks.shard_bytes.abs_diff(shard_bytes) < slack,
            "the save wrote a shard of {} bytes, the encoded shard is {shard_bytes}",
            marks.shard_bytes
        );
        Ok(Persisted {
            to_commit: committed - from,
            put: marks.shard_put,
            pruning: answered.saturating_duration_since(committed),
        })
    }

    async fn rounds(&self, job: &mut Job, reps: usize, report: &mut Report) -> Result<()> {
        let model_config = flotilla_actors::model_config::hf_config_json(&self.cfg.model);
        let model_config = model_config.to_string();
        let mut step = 0u64;
        // Two warm-up steps: the moments exist from the first.
        for _ in 0..2 {
            job.step(step).await?;
            step += 1;
        }
        // The shard's bytes (what the raw-write baseline writes; the checkpointer records the
        // model's config in every snapshot) and the SHA-256 rate.
        let mut live = snapshot(job, step).await?;
        live.model_config = Some(model_config.clone());
        let state_bytes = live.nbytes() as u64;
        let encoded = Arc::new(tokio::task::spawn_blocking(move || encode_shard(&live)).await??);
        let shard_bytes = encoded.len() as u64;
        let t = Instant::now();
        let digest = sha256_hex(&encoded);
        let sha = t.elapsed();
        ensure!(digest.len() == 64);
        report.push(json!({
            "bench": "persist_parts", "sha256_s": sha.as_secs_f64(),
            "sha256_gb_per_s": gb_per_s(shard_bytes, sha),
        }));

        let mut async_ck = self.checkpointer(CheckpointMode::Async)?;
        let mut sync_ck = self.checkpointer(CheckpointMode::Sync)?;
        let direct = CheckpointEngine::local(self.work.join("direct"), 1);
        let (mut step_t, mut snap_t, mut handoff_t, mut stall_t) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut persist_t, mut direct_t, mut retention_t, mut raw_t) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut sync_t, mut sync_wait_t, mut put_t) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..reps.max(1) {
            if round % 2 == 1 {
                raw_t.push(raw_write(self.work, &encoded).await?);
            }
            // An ordinary step, then the asynchronous checkpoint of the state it leaves, as
            // `flotilla train` takes it: the snapshot, the hand-off (training goes on from
            // here), then the background persist, waited for at once.
            let t = Instant::now();
            job.step(step).await?;
            step_t.push(t.elapsed());
            step += 1;
            let t = Instant::now();
            let snaps = job.snapshots(step).await?;
            let snap = t.elapsed();
            let t = Instant::now();
            async_ck.save_all(snaps).await?;
            let handoff = t.elapsed();
            async_ck.finish().await?;
            let p = self.persisted(t, shard_bytes)?;
            snap_t.push(snap);
            handoff_t.push(handoff);
            stall_t.push(snap + handoff);
            persist_t.push(p.to_commit);
            put_t.push(p.put);
            retention_t.push(p.pruning);

            // The same snapshot through the engine's direct write (its pruning untimed).
            let saved = async_ck
                .take_committed()
                .context("the coordinator handed no snapshots back")?;
            let t = Instant::now();
            let (written, back, retention) = direct.save_async(saved)?.wait_committed().await?;
            direct_t.push(t.elapsed());
            drop(back);
            if let Some(r) = retention {
                r.wait().await?;
            }
            ensure!(
                written.bytes.abs_diff(shard_bytes) < 64 << 10,
                "the direct write wrote {} bytes, the encoded shard is {shard_bytes}",
                written.bytes
            );

            // Another step, then the synchronous save of the state it leaves: training waits
            // for the snapshot, the write and the commit (and, in `train`, the pruning).
            job.step(step).await?;
            step += 1;
            let t = Instant::now();
            let snaps = job.snapshots(step).await?;
            snap_t.push(t.elapsed());
            sync_ck.save_all(snaps).await?;
            sync_wait_t.push(t.elapsed());
            let p = self.persisted(t, shard_bytes)?;
            sync_t.push(p.to_commit);
            retention_t.push(p.pruning);
            drop(sync_ck.take_committed());

            if round % 2 == 0 {
                raw_t.push(raw_write(self.work, &encoded).await?);
            }
        }
        drop(encoded);
        let (stall, sync_save) = (median(&stall_t), median(&sync_t));
        let (persist, direct_persist, raw) =
            (median(&persist_t), median(&direct_t), median(&raw_t));
        // Beside the medians: on a disk whose speed swings between two levels (burst credit),
        // the fastest of each says what the code achieves against what the disk can do.
        let fastest = |xs: &[Duration]| xs.iter().min().copied().unwrap_or_default();
        let over_fastest_raw =
            |xs: &[Duration]| fastest(&raw_t).as_secs_f64() / fastest(xs).as_secs_f64().max(1e-12);
        report.push(json!({
            "bench": "async_save",
            "how": "snapshot (device→host copy) + hand-off to the checkpoint coordinator",
            "stall_s": stall.as_secs_f64(), "stall_runs_s": secs(&stall_t),
            "handoff_runs_s": secs(&handoff_t),
            "step_s": median(&step_t).as_secs_f64(), "step_runs_s": secs(&step_t),
            "persist_s": persist.as_secs_f64(), "shard_bytes": shard_bytes,
            "persist_gb_per_s": gb_per_s(shard_bytes, persist), "persist_runs_s": secs(&persist_t),
            "shard_put_runs_s": secs(&put_t),
        }));
        report.push(json!({
            "bench": "sync_save", "how": "snapshot + shard write + commit",
            "state_bytes": state_bytes, "shard_bytes": shard_bytes,
            "seconds": sync_save.as_secs_f64(), "gb_per_s": gb_per_s(shard_bytes, sync_save),
            "runs_s": secs(&sync_t), "train_waits_runs_s": secs(&sync_wait_t),
        }));
        // Every snapshot taken (the asynchronous saves' first, then the synchronous ones').
        report.push(json!({
            "bench": "snapshot", "how": "device→host copy of the rank state, between steps",
            "state_bytes": state_bytes, "seconds": median(&snap_t).as_secs_f64(),
            "gb_per_s": gb_per_s(state_bytes, median(&snap_t)), "runs_s": secs(&snap_t),
        }));
        // The pruning of the step that retention drops, after each commit (not in the times
        // above).
        report.push(json!({
            "bench": "retention", "seconds": median(&retention_t).as_secs_f64(),
            "runs_s": secs(&retention_t),
        }));
        report.push(json!({
            "bench": "persist_direct_write", "used_by_train": false,
            "how": "CheckpointEngine::local: shard written from the snapshot's buffers",
            "seconds": direct_persist.as_secs_f64(),
            "gb_per_s": gb_per_s(shard_bytes, direct_persist), "runs_s": secs(&direct_t),
        }));
        report.push(json!({
            "bench": "raw_write_fsync", "bytes": shard_bytes, "seconds": raw.as_secs_f64(),
            "gb_per_s": gb_per_s(shard_bytes, raw), "runs_s": secs(&raw_t),
            "fastest_s": fastest(&raw_t).as_secs_f64(),
            "fastest_persist_over_fastest_raw": over_fastest_raw(&persist_t),
            "fastest_direct_over_fastest_raw": over_fastest_raw(&direct_t),
            "write_chunk_bytes": WRITE_CHUNK,
        }));

        let restores = self.restores(job, step, model_config).await?;
        report.push(json!({
            "bench": "restore", "state_bytes": state_bytes,
            "memory_s": restores.memory.as_secs_f64(), "peer_s": restores.peer.as_secs_f64(),
            "storage_s": restores.storage.as_secs_f64(),
            "into_job_s": restores.into_job.as_secs_f64(),
        }));

        report.push(json!({"summary": {
            "async_stall_over_sync_save": stall.as_secs_f64() / sync_save.as_secs_f64().max(1e-12),
            "state_mib": state_bytes as f64 / (1 << 20) as f64,
            "persist_over_raw_write": raw.as_secs_f64() / persist.as_secs_f64().max(1e-12),
            "direct_write_over_raw_write":
                raw.as_secs_f64() / direct_persist.as_secs_f64().max(1e-12),
            "restore_memory_s": restores.memory.as_secs_f64(),
            "restore_peer_s": restores.peer.as_secs_f64(),
            "restore_storage_s": restores.storage.as_secs_f64(),
            "restore_into_job_s": restores.into_job.as_secs_f64(),
        }}));
        Ok(())
    }

    /// The restores of the state the last synchronous save wrote (the job's state now, at
    /// `step`), from each source, each checked against it; then the stored one into the job.
    async fn restores(&self, job: &mut Job, step: u64, model_config: String) -> Result<Restores> {
        let mut live = snapshot(job, step).await?;
        live.model_config = Some(model_config);
        let (encoded, live) =
            tokio::task::spawn_blocking(move || (encode_shard(&live), live)).await?;
        let encoded = encoded?;
        let digest = sha256_hex(&encoded);

        // Own memory: the rank's kept snapshot, checked against its SHA-256.
        let own = OwnCopy::with_sha256(live.clone(), digest);
        let t = Instant::now();
        let back = tokio::task::spawn_blocking(move || own.verified())
            .await?
            .map_err(anyhow::Error::msg)?;
        let memory = t.elapsed();
        ensure!(back == live, "the own copy differs from the state");
        drop(back);

        // A peer: rank 0 pushes its replica to rank 1's replica service over the fabric;
        // restoring fetches it back (the holder copies it out of its store), checks its SHA-256
        // and decodes.
        let hub = InprocHub::new(2);
        let eps = hub.endpoints();
        let me = eps[0].clone();
        let deadline = Duration::from_secs(600);
        let mut server = ReplicaServer::spawn(Arc::new(eps[1].clone()), vec![0], deadline);
        push_replica(&me, &[1], 0, live.step, encoded, deadline).await?;
        let t = Instant::now();
        let from_peer = fetch_replica(&me, 1, 0, deadline).await?;
        let peer = t.elapsed();
        server.shutdown();
        drop(server);
        hub.close();
        ensure!(
            me.rank() == 0 && from_peer == live,
            "the peer's copy differs from the state"
        );
        drop(from_peer);

        // Storage: the rank's shard of the newest checkpoint, verified against the manifest.
        let t = Instant::now();
        let stored = self.engine.load_rank(None, 0).await?;
        let storage = t.elapsed();
        ensure!(
            stored == live,
            "the stored copy (step {}) differs from the state (step {})",
            stored.step,
            live.step
        );
        drop(live);

        // Into the job: one step from the state it holds, then the stored state restored (the
        // step undone) and the same step again, which must come out the same.
        let first = job.step(step).await?;
        let first_params = job.params(step + 1).await?;
        let t = Instant::now();
        job.restore(vec![stored]).await?;
        let into_job = t.elapsed();
        let again = job.step(step).await?;
        let again_params = job.params(step + 1).await?;
        let same = |a: &[flotilla_actors::store::StepStats],
                    b: &[flotilla_actors::store::StepStats]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| {
                    x.loss.to_bits() == y.loss.to_bits()
                        && x.grad_norm.to_bits() == y.grad_norm.to_bits()
                })
        };
        ensure!(
            same(&first, &again) && first_params == again_params,
            "the step after restoring the stored state differs from the step the job took from \
             that state (loss {:?} then {:?})",
            first.first().map(|s| s.loss),
            again.first().map(|s| s.loss)
        );
        Ok(Restores {
            memory,
            peer,
            storage,
            into_job,
        })
    }
}

/// How long each restore took.
struct Restores {
    memory: Duration,
    peer: Duration,
    storage: Duration,
    into_job: Duration,
}

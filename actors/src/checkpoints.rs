//! The job's checkpoint schedule: after every `checkpoint.interval` steps, take a snapshot from
//! each rank (on its compute thread) and hand it to the checkpoint coordinator
//! ([`crate::ckpt_coordinator`], whose writer actors persist it through the
//! [`CheckpointEngine`]), waiting for the commit (`mode = "sync"`) or not (`mode = "async"`);
//! and, before the first step, restore the ranks from a checkpoint to resume.
//!
//! In async mode the job stalls only for the snapshots (each rank's device→host copy, taken on
//! its stream between steps); the write goes on while the next steps run, one checkpoint in
//! flight at a time. Every commit is a line of `events.jsonl` (step, bytes, seconds from
//! hand-off to commit, on the job's clock).
//!
//! Checkpoints live under `checkpoint.dir`: a relative directory is a key prefix of the run's
//! storage (so it follows the run to `job.out_dir`, or into simulated storage); an absolute one
//! is a local directory of its own.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_ckpt::{CheckpointEngine, Loaded, Snapshot, Which};
use flotilla_runtime::clock::Clock;
use flotilla_runtime::config::{CheckpointMode, Config, DeviceKind};
use flotilla_runtime::metrics as names;
use flotilla_runtime::storage::Storage;
use flotilla_runtime::storage::local::LocalStorage;
use flotilla_runtime::storage::sim::SimStorage;

use crate::ckpt_coordinator::Coordinator;
use crate::error::JobError;
use crate::rank::RankMsg;

/// Where a resumed job takes its state from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The newest sound checkpoint of this job's `checkpoint.dir` (going back past damaged ones).
    Latest,
    /// That step of this job's `checkpoint.dir`.
    Step(u64),
    /// A local directory: a step directory (`…/step-00000042`), or a checkpoint root (its
    /// newest sound checkpoint).
    Path(PathBuf),
}

fn ckpt_err(e: flotilla_ckpt::CkptError) -> JobError {
    JobError::Checkpoint(e.to_string())
}

/// `checkpoint.dir` as a storage key prefix, when it is relative.
fn relative_key(dir: &Path) -> Result<String, JobError> {
    let mut parts = Vec::new();
    for c in dir.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => {
                return Err(JobError::Config(format!(
                    "checkpoint.dir `{}` must stay inside job.out_dir",
                    dir.display()
                )));
            }
        }
    }
    if parts.is_empty() {
        return Err(JobError::Config("checkpoint.dir is empty".into()));
    }
    Ok(parts.join("/"))
}

/// The engine over this job's `checkpoint.dir`; on the simulated cluster, simulated storage of
/// `[cluster.sim] storage_gbps` (its checkpoints hold shapes only: they are timed, not kept).
pub fn engine_for(
    cfg: &Config,
    run_storage: &Arc<dyn Storage>,
) -> Result<CheckpointEngine, JobError> {
    let c = &cfg.checkpoint;
    if cfg.cluster.device == DeviceKind::Sim {
        let sim = cfg.cluster.sim.clone().unwrap_or_default();
        let storage = SimStorage::new(sim.storage_gbps * 1e9, std::time::Duration::ZERO);
        Ok(CheckpointEngine::with_root(
            Arc::new(storage),
            &relative_key(&c.dir)?,
            c.keep,
        ))
    } else if c.dir.is_absolute() {
        Ok(CheckpointEngine::new(
            Arc::new(LocalStorage::new(c.dir.clone())),
            c.keep,
        ))
    } else {
        Ok(CheckpointEngine::with_root(
            Arc::clone(run_storage),
            &relative_key(&c.dir)?,
            c.keep,
        ))
    }
}

/// Load the checkpoint `from` names (every rank's snapshot, in rank order).
pub async fn load(
    cfg: &Config,
    engine: &CheckpointEngine,
    from: &ResumeFrom,
) -> Result<Loaded, JobError> {
    let verify = cfg.checkpoint.verify_on_load;
    let loaded = match from {
        ResumeFrom::Latest => engine.load_latest_valid(verify).await,
        ResumeFrom::Step(s) => engine.load(Which::Step(*s), verify).await,
        ResumeFrom::Path(p) => {
            let step = p
                .file_name()
                .and_then(|n| flotilla_ckpt::format::parse_step_dir(&n.to_string_lossy()));
            match (step, p.parent()) {
                (Some(s), Some(parent)) => {
                    let e = CheckpointEngine::new(Arc::new(LocalStorage::new(parent)), 1);
                    e.load(Which::Step(s), verify).await
                }
                _ => {
                    let e = CheckpointEngine::new(Arc::new(LocalStorage::new(p.clone())), 1);
                    e.load_latest_valid(verify).await
                }
            }
        }
    };
    let loaded = loaded.map_err(ckpt_err)?;
    if loaded.snapshots.len() != cfg.world_size() {
        return Err(JobError::Checkpoint(format!(
            "step {} holds {} ranks, this job has {}",
            loaded.step,
            loaded.snapshots.len(),
            cfg.world_size()
        )));
    }
    Ok(loaded)
}

/// Checkpoints taken while the job runs.
#[derive(Debug)]
pub struct Checkpointer {
    engine: CheckpointEngine,
    interval: u64,
    mode: CheckpointMode,
    /// Where checkpoints are sent.
    coordinator: Coordinator,
    /// The step of the checkpoint in flight, and when it was handed to the coordinator.
    pending: Option<(u64, Option<tokio::time::Instant>)>,
    /// Where commits are reported (`events.jsonl`), and the clock that times them.
    log: Option<(crate::run_log::RunLog, Arc<dyn Clock>)>,
    /// The snapshots of the last committed checkpoint, handed back by the coordinator, until the
    /// driver takes them ([`Checkpointer::take_committed`]).
    committed: Option<Vec<Snapshot>>,
    /// The model's HF `config.json` text, recorded in every checkpoint so that it can be
    /// exported without the job config.
    model_config: String,
}

impl Checkpointer {
    /// Checkpoints saved by `coordinator`, which writes through `engine`; `None` when
    /// `checkpoint.interval` is 0.
    pub fn new(cfg: &Config, engine: CheckpointEngine, coordinator: Coordinator) -> Option<Self> {
        cfg.checkpoint.enabled().then(|| Self {
            engine,
            interval: cfg.checkpoint.interval,
            mode: cfg.checkpoint.mode,
            coordinator,
            pending: None,
            log: None,
            committed: None,
            model_config: crate::model_config::hf_config_json(&cfg.model).to_string(),
        })
    }

    /// Report every commit as a line of `log`'s `events.jsonl`, timed by `clock`.
    pub(crate) fn with_log(mut self, log: crate::run_log::RunLog, clock: Arc<dyn Clock>) -> Self {
        self.log = Some((log, clock));
        self
    }

    /// Whether a checkpoint is due once `done` steps have been taken.
    pub fn due(&self, done: u64) -> bool {
        done > 0 && done.is_multiple_of(self.interval)
    }

    /// The engine checkpoints are saved to and loaded from.
    pub fn engine(&self) -> &CheckpointEngine {
        &self.engine
    }

    /// The snapshots of the newest committed checkpoint (rank order), once: the driver keeps
    /// them as the ranks' in-memory copies (`rollback.rs`).
    pub fn take_committed(&mut self) -> Option<Vec<Snapshot>> {
        self.committed.take()
    }

    /// Finish the background save if it has finished (without waiting otherwise).
    pub async fn poll(&mut self) -> Result<(), JobError> {
        if self.pending.is_some() && self.coordinator.is_finished().await? {
            self.finish().await?;
        }
        Ok(())
    }

    /// Save the state the rank took (`snapshot`, the stall already paid by the caller).
    pub async fn save(&mut self, snap: Snapshot) -> Result<(), JobError> {
        self.save_all(vec![snap]).await
    }

    /// Save every rank's snapshot of one step as one checkpoint (a shard per rank).
    pub async fn save_all(&mut self, mut snaps: Vec<Snapshot>) -> Result<(), JobError> {
        for snap in &mut snaps {
            snap.model_config = Some(self.model_config.clone());
        }
        // At most one background save in flight: a slow disk slows training down rather than
        // piling snapshots up in memory.
        self.finish().await?;
        let now = self.log.as_ref().map(|(_, clock)| clock.now());
        self.pending = Some((self.coordinator.save(snaps).await?, now));
        if self.mode == CheckpointMode::Sync {
            self.finish().await?;
        }
        Ok(())
    }

    /// Wait for the background save in flight, if any.
    pub async fn finish(&mut self) -> Result<(), JobError> {
        if let Some((step, handed)) = self.pending.take() {
            let saved = self.coordinator.wait().await?.ok_or_else(|| {
                JobError::Checkpoint(format!(
                    "the coordinator holds no checkpoint of step {step}"
                ))
            })?;
            if let (Some((log, clock)), Some(handed)) = (&self.log, handed) {
                let r = &saved.report;
                let line = format!(
                    "committed step {}: {} bytes in {} files, {:.3} s after hand-off",
                    r.step,
                    r.bytes,
                    r.files,
                    clock.elapsed(handed).as_secs_f64()
                );
                event(log, line).await?;
            }
            self.committed = Some(saved.snapshots);
        }
        Ok(())
    }
}

/// Ask every rank for a snapshot (a device→host copy of its state) and hand them to the
/// coordinator; the stall (the snapshots, plus the write in sync mode) is recorded as
/// `CHECKPOINT_STALL_SECONDS`.
pub(crate) async fn checkpoint(
    ck: &mut Checkpointer,
    ranks: &crate::ranks::Ranks,
    clock: &dyn Clock,
    deadline: Duration,
    done: u64,
) -> Result<(), JobError> {
    let t0 = clock.now();
    let snaps = ranks
        .try_all(clock, deadline, done, "snapshot", RankMsg::Snapshot)
        .await?;
    ck.save_all(snaps).await?;
    metrics::histogram!(names::CHECKPOINT_STALL_SECONDS).record(clock.elapsed(t0).as_secs_f64());
    Ok(())
}

/// A line of `events.jsonl` about checkpoints (saves, restores, roll-backs).
pub(crate) async fn event(log: &crate::run_log::RunLog, event: String) -> Result<(), JobError> {
    let line = crate::run_log::EventLine {
        supervisor: "controller".into(),
        child: "checkpoint".into(),
        event,
    };
    Ok(log.event(&line).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_dirs_become_keys_and_may_not_escape() {
        assert_eq!(
            relative_key(Path::new("checkpoints")).ok(),
            Some("checkpoints".into())
        );
        assert_eq!(relative_key(Path::new("./a/b/")).ok(), Some("a/b".into()));
        assert!(relative_key(Path::new("../x")).is_err());
        assert!(relative_key(Path::new(".")).is_err());
    }
}

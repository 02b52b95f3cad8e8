//! Running a training job: start the supervision tree, drive the steps, write the run's files.
//!
//! The tree is the controller's root supervisor (`one_for_all`, since training is a collective
//! act) with the rank actors under it. The driver asks every rank for a step, waits with a
//! deadline (`supervision.peer_timeout_ms`), and turns a failed or silent rank into a
//! [`JobError::RankFailed`] naming the rank and step, never a hang. Every `checkpoint.interval`
//! steps the ranks' state is checkpointed ([`crate::checkpoints`]), and [`train_from`] resumes a
//! job from a checkpoint. Rolling back in-flight on a failure is not done yet: a failed rank ends
//! the job with its report (and the files and checkpoints written so far).

use std::sync::Arc;
use std::time::Duration;

use flotilla_runtime::clock::{Clock, with_deadline};
use flotilla_runtime::config::Config;
use flotilla_runtime::metrics as names;
use flotilla_runtime::storage::Storage;
use flotilla_runtime::supervision::{
    ChildSpec, Restart, Strategy, Supervisor, SupervisorPolicy, event_channel,
};
use ractor::{ActorRef, RpcReplyPort};
use serde::Serialize;

use crate::checkpoints::{self, Checkpointer, ResumeFrom};
use crate::error::JobError;
use crate::rank::{RankActor, RankArgs, RankMsg};
use crate::run_log::RunLog;
use crate::trainer::StepStats;

/// A line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    #[serde(flatten)]
    pub stats: StepStats,
    /// Wall (or virtual) seconds of the step as the controller saw it.
    pub step_seconds: f64,
    pub tokens_per_s: f64,
    /// Achieved GFLOP/s of the model's compute (device-reported FLOPs over step time).
    pub gflops: f64,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub job: String,
    pub steps: u64,
    pub first_loss: f32,
    pub final_loss: f32,
    /// Mean loss over the last 10 steps (less noisy than the last step's).
    pub final_loss_avg10: f32,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub params_sha256: String,
    pub config_hash: String,
}

#[derive(Debug, Serialize)]
struct EventLine {
    supervisor: String,
    child: String,
    event: String,
}

/// Run `cfg.job.steps` steps; `on_step` sees every step's record (for a progress bar).
pub async fn train(
    cfg: Config,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    on_step: &mut (dyn FnMut(&StepRecord) + Send),
) -> Result<Summary, JobError> {
    train_from(cfg, storage, clock, None, on_step).await
}

/// [`train`], resuming from a checkpoint when `resume` names one: the ranks are restored before
/// the first step, and training continues at the checkpoint's step up to `cfg.job.steps` (the
/// run's `metrics.jsonl` and `events.jsonl` are then appended to, not replaced).
pub async fn train_from(
    cfg: Config,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    resume: Option<ResumeFrom>,
    on_step: &mut (dyn FnMut(&StepRecord) + Send),
) -> Result<Summary, JobError> {
    let cfg = Arc::new(cfg);
    let engine = checkpoints::engine_for(&cfg, &storage)?;
    let log = RunLog::new(storage);
    if resume.is_none() {
        log.start().await?;
    }

    let s = &cfg.supervision;
    let policy = SupervisorPolicy::from_numbers(
        s.max_restarts,
        s.within_s,
        s.backoff_ms,
        s.shutdown_timeout_ms,
    )?
    .with_strategy(Strategy::OneForAll);
    let (events_tx, mut events_rx) = event_channel();
    let rank_cfg = Arc::clone(&cfg);
    let spec = policy
        .spec()?
        .child(
            ChildSpec::for_actor("rank-0", move || {
                (
                    RankActor,
                    RankArgs {
                        rank: 0,
                        config: Arc::clone(&rank_cfg),
                    },
                )
            })
            // A failed step cannot be retried without a snapshot to roll back to.
            .with_restart(Restart::Temporary)
            .with_shutdown(policy.child_shutdown()),
        )
        .observer(events_tx)
        .with_label("controller");
    let (sup, sup_join) = Supervisor::spawn(None, spec, None).await?;
    let event_log = log.clone();
    let events = tokio::spawn(async move {
        while let Some(e) = events_rx.recv().await {
            let line = EventLine {
                supervisor: e.supervisor,
                child: e.child,
                event: format!("{:?}", e.event),
            };
            if let Err(err) = event_log.event(&line).await {
                tracing::warn!("cannot write events.jsonl: {err}");
            }
        }
    });

    let result = drive(&cfg, &sup, clock.as_ref(), &log, engine, resume, on_step).await;
    let stop = sup
        .stop(Duration::from_millis(
            cfg.supervision.shutdown_timeout_ms.max(1),
        ))
        .await;
    let _ = sup_join.await;
    let _ = events.await;
    let summary = result?;
    stop?;
    Ok(summary)
}

async fn rank0(
    sup: &flotilla_runtime::supervision::SupervisorHandle,
) -> Result<ActorRef<RankMsg>, JobError> {
    let info = sup.child("rank-0").await?;
    info.cell.map(ActorRef::from).ok_or(JobError::RankFailed {
        rank: 0,
        step: 0,
        why: "not running".into(),
    })
}

pub(crate) async fn call_rank<T: Send + 'static>(
    rank: &ActorRef<RankMsg>,
    clock: &dyn Clock,
    deadline: Duration,
    step: u64,
    msg: impl FnOnce(RpcReplyPort<T>) -> RankMsg,
) -> Result<T, JobError> {
    let failed = |why: String| JobError::RankFailed { rank: 0, step, why };
    let (tx, rx) = ractor::concurrency::oneshot();
    rank.cast(msg(tx.into()))
        .map_err(|e| failed(format!("cannot reach the rank: {e}")))?;
    match with_deadline(clock, deadline, rx).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(failed("the rank stopped without answering".into())),
        Err(after) => Err(failed(format!("no answer within {after:?}"))),
    }
}

/// Restore the rank from the checkpoint `from` names; returns the step to continue at.
async fn resume_rank(
    cfg: &Config,
    rank: &ActorRef<RankMsg>,
    clock: &dyn Clock,
    log: &RunLog,
    engine: &flotilla_ckpt::CheckpointEngine,
    from: &ResumeFrom,
) -> Result<u64, JobError> {
    let deadline = Duration::from_millis(cfg.supervision.peer_timeout_ms);
    let mut loaded = checkpoints::load(cfg, engine, from).await?;
    for why in &loaded.fallbacks {
        checkpoint_event(log, format!("fallback: {why}")).await?;
    }
    let step = loaded.step;
    let snap = loaded
        .snapshots
        .pop()
        .ok_or_else(|| JobError::Checkpoint(format!("step {step} holds no snapshot")))?;
    call_rank(rank, clock, deadline, step, |r| {
        RankMsg::Restore(Box::new(snap), r)
    })
    .await?
    .map_err(|why| JobError::RankFailed {
        rank: 0,
        step,
        why: format!("restore: {why}"),
    })?;
    checkpoint_event(log, format!("resumed at step {step}")).await?;
    Ok(step)
}

/// A line of `events.jsonl` about checkpoints.
async fn checkpoint_event(log: &RunLog, event: String) -> Result<(), JobError> {
    let line = EventLine {
        supervisor: "controller".into(),
        child: "checkpoint".into(),
        event,
    };
    Ok(log.event(&line).await?)
}

async fn drive(
    cfg: &Config,
    sup: &flotilla_runtime::supervision::SupervisorHandle,
    clock: &dyn Clock,
    log: &RunLog,
    engine: flotilla_ckpt::CheckpointEngine,
    resume: Option<ResumeFrom>,
    on_step: &mut (dyn FnMut(&StepRecord) + Send),
) -> Result<Summary, JobError> {
    let rank = rank0(sup).await?;
    let deadline = Duration::from_millis(cfg.supervision.peer_timeout_ms);
    let first = match &resume {
        Some(from) => resume_rank(cfg, &rank, clock, log, &engine, from).await?,
        None => 0,
    };
    let mut ckpt = Checkpointer::new(cfg, engine);
    let started = clock.now();
    let mut losses = Vec::with_capacity(cfg.job.steps as usize);
    let mut tokens = 0u64;
    for step in first..cfg.job.steps {
        let t0 = clock.now();
        let stats = call_rank(&rank, clock, deadline, step, RankMsg::Step)
            .await?
            .map_err(|why| JobError::RankFailed { rank: 0, step, why })?;
        let secs = clock.elapsed(t0).as_secs_f64().max(1e-9);
        tokens += stats.tokens as u64;
        losses.push(stats.loss);
        let rec = StepRecord {
            tokens_per_s: stats.tokens as f64 / secs,
            gflops: stats.device_flops / secs / 1e9,
            step_seconds: secs,
            stats,
        };
        metrics::gauge!(names::TRAIN_LOSS).set(rec.stats.loss as f64);
        metrics::gauge!(names::GRAD_NORM).set(rec.stats.grad_norm);
        metrics::gauge!(names::LEARNING_RATE).set(rec.stats.lr);
        metrics::gauge!(names::TOKENS_PER_SECOND).set(rec.tokens_per_s);
        metrics::counter!(names::STEPS).increment(1);
        metrics::histogram!(names::STEP_SECONDS).record(secs);
        if cfg.metrics.jsonl {
            log.metric(&rec).await?;
        }
        on_step(&rec);
        if let Some(ck) = ckpt.as_mut().filter(|c| c.due(step + 1)) {
            checkpoints::checkpoint(ck, &rank, clock, deadline, step + 1).await?;
        }
    }
    if let Some(ck) = ckpt.as_mut() {
        ck.finish().await?;
    }
    let sha = call_rank(&rank, clock, deadline, cfg.job.steps, RankMsg::ParamsSha256).await?;
    let seconds = clock.elapsed(started).as_secs_f64();
    let tail = &losses[losses.len().saturating_sub(10)..];
    let summary = Summary {
        job: cfg.job.name.clone(),
        steps: cfg.job.steps,
        first_loss: losses.first().copied().unwrap_or(f32::NAN),
        final_loss: losses.last().copied().unwrap_or(f32::NAN),
        final_loss_avg10: if tail.is_empty() {
            f32::NAN
        } else {
            tail.iter().sum::<f32>() / tail.len() as f32
        },
        tokens,
        seconds,
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
        params_sha256: sha,
        config_hash: cfg.hash_hex(),
    };
    log.summary(&summary).await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_runtime::clock::RealClock;
    use flotilla_runtime::storage::sim::SimStorage;

    fn tiny() -> Config {
        let mut c = Config::default();
        c.job.steps = 3;
        c.optimizer.warmup_steps = 1;
        c.data.batch_size = 2;
        c.data.seq_len = 16;
        c.cluster.cpu_threads = Some(1);
        c
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_job_writes_its_files() {
        let storage = Arc::new(SimStorage::new(1e12, Duration::ZERO));
        let mut seen = Vec::new();
        let s = train(
            tiny(),
            storage.clone(),
            Arc::new(RealClock),
            &mut |r: &StepRecord| seen.push(r.stats.step),
        )
        .await
        .expect("job runs");
        assert_eq!(seen, vec![0, 1, 2]);
        assert_eq!(s.steps, 3);
        let metrics = storage.get("metrics.jsonl").await.expect("metrics");
        assert_eq!(metrics.iter().filter(|&&b| b == b'\n').count(), 3);
        let summary = storage.get("summary.json").await.expect("summary");
        assert!(String::from_utf8_lossy(&summary).contains(&s.params_sha256));
        let events = String::from_utf8_lossy(&storage.get("events.jsonl").await.expect("events"))
            .into_owned();
        assert!(
            events.contains("rank-0") && events.contains("Started"),
            "{events}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rank_that_cannot_start_is_reported_not_hung() {
        let mut c = tiny();
        c.data.source = "/no/such/tokens.bin".into();
        let storage = Arc::new(SimStorage::new(1e12, Duration::ZERO));
        let err = train(c, storage, Arc::new(RealClock), &mut |_: &StepRecord| {})
            .await
            .expect_err("the job must fail");
        let text = err.to_string();
        assert!(
            text.contains("rank-0") && text.contains("/no/such/tokens.bin"),
            "{text}"
        );
    }
}

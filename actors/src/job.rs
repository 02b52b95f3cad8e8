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

use flotilla_ckpt::Snapshot;
use flotilla_runtime::clock::{Clock, with_deadline};
use flotilla_runtime::config::Config;
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::metrics as names;
use flotilla_runtime::storage::Storage;
use flotilla_runtime::supervision::{
    ChildSpec, Restart, Strategy, Supervisor, SupervisorPolicy, event_channel,
};
use ractor::{ActorRef, RpcReplyPort};
use serde::Serialize;

use crate::checkpoints::{self, Checkpointer, ResumeFrom};
use crate::error::JobError;
use crate::faults::FaultPlan;
use crate::rank::{RankActor, RankArgs, RankMsg};
use crate::rollback::Recovery;
use crate::run_log::{EventLine, RunLog};
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
    train_with_faults(cfg, storage, clock, resume, None, on_step).await
}

/// [`train_from`] with failures injected by `faults` (tests of the in-flight roll-back).
pub async fn train_with_faults(
    cfg: Config,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    resume: Option<ResumeFrom>,
    faults: Option<Arc<FaultPlan>>,
    on_step: &mut (dyn FnMut(&StepRecord) + Send),
) -> Result<Summary, JobError> {
    let cfg = Arc::new(cfg);
    let engine = checkpoints::engine_for(&cfg, &storage)?;
    let log = RunLog::new(storage);
    if resume.is_none() {
        log.start().await?;
    }

    let s = &cfg.supervision;
    let policy = SupervisorPolicy::from_supervision(s)?.with_strategy(Strategy::OneForAll);
    let (events_tx, mut events_rx) = event_channel();
    // A job of several ranks runs them all in this process over the in-process fabric.
    let world = cfg.world_size();
    let hub = (world > 1).then(|| InprocHub::new(world));
    let mut spec = policy.spec()?;
    for r in 0..world {
        let rank_cfg = Arc::clone(&cfg);
        let fabric: Option<Arc<dyn Fabric>> = hub
            .as_ref()
            .map(|h| Arc::new(h.endpoint(r)) as Arc<dyn Fabric>);
        let faults = faults.clone();
        spec = spec.child(
            ChildSpec::for_actor(&format!("rank-{r}"), move || {
                (
                    RankActor,
                    RankArgs {
                        rank: r,
                        config: Arc::clone(&rank_cfg),
                        fabric: fabric.clone(),
                        faults: faults.clone(),
                    },
                )
            })
            // A failed step is rolled back by the driver (every rank restored from the last
            // checkpoint), not by restarting the actor.
            .with_restart(Restart::Temporary)
            .with_shutdown(policy.child_shutdown()),
        );
    }
    // ckpt-actors wiring (1/2): the checkpoint coordinator and its writers under the root.
    let coordinator = crate::ckpt_coordinator::child_spec(&cfg, engine.clone(), events_tx.clone())?;
    let spec = spec.child(coordinator);
    let spec = spec.observer(events_tx).with_label("controller");
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

    let result = drive(
        &cfg,
        &sup,
        hub.as_deref(),
        clock.as_ref(),
        &log,
        engine,
        resume,
        faults,
        on_step,
    )
    .await;
    if let Some(h) = &hub {
        h.close();
    }
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

/// The job's rank actors, in rank order, and the in-process fabric between them (if several).
pub(crate) struct Ranks<'a> {
    pub(crate) refs: Vec<ActorRef<RankMsg>>,
    hub: Option<&'a InprocHub>,
}

impl Ranks<'_> {
    /// Forget the fabric's failure marks and undelivered messages (a roll-back).
    pub(crate) fn reset_fabric(&self) {
        if let Some(h) = self.hub {
            h.reset();
        }
    }

    /// Ask every rank the same question and wait for every answer within `deadline`. Answers
    /// are taken as they come: a rank that fails, stops or stays silent is marked failed on the
    /// fabric at once, so that peers waiting on it fail now instead of at their own deadline,
    /// and the first failure in time (the culprit, usually) is returned.
    pub(crate) async fn call_all<T: Send + 'static>(
        &self,
        clock: &dyn Clock,
        deadline: Duration,
        step: u64,
        msg: impl Fn(RpcReplyPort<T>) -> RankMsg,
    ) -> Result<Vec<T>, JobError> {
        let builders = self.refs.iter().map(|_| &msg).collect();
        self.gather(clock, deadline, step, builders, |_| None).await
    }

    /// [`Ranks::call_all`] for questions answered with `Result<T, String>`: a rank's own error
    /// becomes a [`JobError::RankFailed`] naming it (and marks it failed on the fabric).
    pub(crate) async fn try_all<T: Send + 'static>(
        &self,
        clock: &dyn Clock,
        deadline: Duration,
        step: u64,
        what: &str,
        msg: impl Fn(RpcReplyPort<Result<T, String>>) -> RankMsg,
    ) -> Result<Vec<T>, JobError> {
        let builders = self.refs.iter().map(|_| &msg).collect();
        self.try_each(clock, deadline, step, what, builders).await
    }

    /// [`Ranks::try_all`] with a message of its own for every rank (`msgs[r]` for rank `r`).
    pub(crate) async fn try_each<
        T: Send + 'static,
        F: FnOnce(RpcReplyPort<Result<T, String>>) -> RankMsg,
    >(
        &self,
        clock: &dyn Clock,
        deadline: Duration,
        step: u64,
        what: &str,
        msgs: Vec<F>,
    ) -> Result<Vec<T>, JobError> {
        let label = |why: &str| {
            if what.is_empty() {
                why.to_string()
            } else {
                format!("{what}: {why}")
            }
        };
        let answers = self
            .gather(clock, deadline, step, msgs, |a: &Result<T, String>| {
                a.as_ref().err().map(|why| label(why))
            })
            .await?;
        answers
            .into_iter()
            .enumerate()
            .map(|(rank, a)| a.map_err(|why| JobError::RankFailed { rank, step, why }))
            .collect()
    }

    async fn gather<T: Send + 'static, F: FnOnce(RpcReplyPort<T>) -> RankMsg>(
        &self,
        clock: &dyn Clock,
        deadline: Duration,
        step: u64,
        msgs: Vec<F>,
        failed: impl Fn(&T) -> Option<String>,
    ) -> Result<Vec<T>, JobError> {
        let n = self.refs.len();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for ((r, actor), msg) in self.refs.iter().enumerate().zip(msgs) {
            let (reply, answer) = ractor::concurrency::oneshot();
            actor
                .cast(msg(reply.into()))
                .map_err(|e| JobError::RankFailed {
                    rank: r,
                    step,
                    why: format!("cannot reach the rank: {e}"),
                })?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send((r, answer.await.ok()));
            });
        }
        drop(tx);
        let started = clock.now();
        let mut slots: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let mut first_err = None;
        let fail = |r: usize, why: String, first_err: &mut Option<JobError>| {
            if let Some(h) = self.hub {
                h.fail_rank(r, why.clone());
            }
            first_err.get_or_insert(JobError::RankFailed { rank: r, step, why });
        };
        for _ in 0..n {
            let left = deadline.saturating_sub(clock.elapsed(started));
            match with_deadline(clock, left, rx.recv()).await {
                Ok(Some((r, Some(v)))) => {
                    if let Some(why) = failed(&v) {
                        fail(r, why, &mut first_err);
                    }
                    slots[r] = Some(v);
                }
                Ok(Some((r, None))) => fail(
                    r,
                    "the rank stopped without answering".into(),
                    &mut first_err,
                ),
                Ok(None) => break,
                Err(after) => {
                    for (r, s) in slots.iter().enumerate() {
                        if s.is_none() {
                            fail(r, format!("no answer within {after:?}"), &mut first_err);
                        }
                    }
                    break;
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(r, s)| {
                s.ok_or_else(|| JobError::RankFailed {
                    rank: r,
                    step,
                    why: "no answer".into(),
                })
            })
            .collect()
    }
}

async fn ranks<'a>(
    sup: &flotilla_runtime::supervision::SupervisorHandle,
    world: usize,
    hub: Option<&'a InprocHub>,
) -> Result<Ranks<'a>, JobError> {
    let mut refs = Vec::with_capacity(world);
    for r in 0..world {
        let info = sup.child(&format!("rank-{r}")).await?;
        refs.push(info.cell.map(ActorRef::from).ok_or(JobError::RankFailed {
            rank: r,
            step: 0,
            why: "not running".into(),
        })?);
    }
    Ok(Ranks { refs, hub })
}

/// Restore every rank from the checkpoint `from` names; returns the step to continue at.
async fn resume_ranks(
    cfg: &Config,
    ranks: &Ranks<'_>,
    clock: &dyn Clock,
    log: &RunLog,
    engine: &flotilla_ckpt::CheckpointEngine,
    from: &ResumeFrom,
) -> Result<u64, JobError> {
    let deadline = Duration::from_millis(cfg.supervision.peer_timeout_ms);
    let loaded = checkpoints::load(cfg, engine, from).await?;
    for why in &loaded.fallbacks {
        checkpoints::event(log, format!("fallback: {why}")).await?;
    }
    let step = loaded.step;
    let mut by_rank: Vec<Option<Snapshot>> = (0..ranks.refs.len()).map(|_| None).collect();
    for snap in loaded.snapshots {
        let r = snap.meta.rank;
        match by_rank.get_mut(r) {
            Some(slot @ None) => *slot = Some(snap),
            _ => {
                return Err(JobError::Checkpoint(format!(
                    "step {step}: a snapshot of rank {r} does not fit a job of {} ranks (or appears twice)",
                    ranks.refs.len()
                )));
            }
        }
    }
    let snaps: Vec<Snapshot> = by_rank
        .into_iter()
        .enumerate()
        .map(|(r, s)| {
            s.ok_or_else(|| {
                JobError::Checkpoint(format!("step {step} holds no snapshot of rank {r}"))
            })
        })
        .collect::<Result<_, _>>()?;
    let msgs = snaps
        .into_iter()
        .map(|snap| move |reply| RankMsg::Restore(Box::new(snap), reply))
        .collect();
    ranks
        .try_each(clock, deadline, step, "restore", msgs)
        .await?;
    checkpoints::event(log, format!("resumed at step {step}")).await?;
    Ok(step)
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    cfg: &Config,
    sup: &flotilla_runtime::supervision::SupervisorHandle,
    hub: Option<&InprocHub>,
    clock: &dyn Clock,
    log: &RunLog,
    engine: flotilla_ckpt::CheckpointEngine,
    resume: Option<ResumeFrom>,
    faults: Option<Arc<FaultPlan>>,
    on_step: &mut (dyn FnMut(&StepRecord) + Send),
) -> Result<Summary, JobError> {
    let ranks = ranks(sup, cfg.world_size(), hub).await?;
    let deadline = Duration::from_millis(cfg.supervision.peer_timeout_ms);
    let first = match &resume {
        Some(from) => resume_ranks(cfg, &ranks, clock, log, &engine, from).await?,
        None => 0,
    };
    // ckpt-actors wiring (2/2): checkpoints go to the coordinator started under `sup`.
    let coordinator = crate::ckpt_coordinator::Coordinator::find(sup).await?;
    let mut ckpt = Checkpointer::new(cfg, engine, coordinator);
    let mut recovery = match ckpt {
        Some(_) => Some(Recovery::new(cfg, faults)?),
        None => None,
    };
    let started = clock.now();
    // Per step taken (a roll-back forgets the steps it undoes).
    let mut losses = Vec::with_capacity(cfg.job.steps as usize);
    let mut step_tokens: Vec<u64> = Vec::with_capacity(cfg.job.steps as usize);
    // A checkpoint of the state before this step is due, to be kept by the step's optimizer.
    let mut keep_due = false;
    let mut step = first;
    while step < cfg.job.steps {
        let t0 = clock.now();
        let answer = match ckpt.as_mut().filter(|_| keep_due) {
            Some(ck) => checkpoints::step_and_checkpoint(ck, &ranks, clock, deadline, step).await,
            None => {
                ranks
                    .try_all(clock, deadline, step, "", RankMsg::Step)
                    .await
            }
        };
        let all = match (answer, ckpt.as_mut(), recovery.as_mut()) {
            (Ok(all), _, _) => all,
            (Err(e), Some(ck), Some(rec)) => {
                // The newest committed checkpoint first becomes the ranks' own copies.
                ck.finish().await?;
                if let Some(snaps) = ck.take_committed() {
                    rec.keep(snaps).await?;
                }
                step = rec
                    .roll_back(e, &ranks, ck.engine(), clock, deadline, log)
                    .await?;
                losses.truncate(step.saturating_sub(first) as usize);
                step_tokens.truncate(step.saturating_sub(first) as usize);
                keep_due = false;
                continue;
            }
            (Err(e), _, _) => return Err(e),
        };
        // Every rank reports the job-wide loss and norm; compute is summed over the ranks.
        let flops: f64 = all.iter().map(|s| s.device_flops).sum();
        let Some(mut stats) = all.into_iter().next() else {
            return Err(JobError::Config("a job with no ranks".into()));
        };
        stats.device_flops = flops;
        let secs = clock.elapsed(t0).as_secs_f64().max(1e-9);
        step_tokens.push(stats.tokens as u64);
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
        keep_due = false;
        if let Some(ck) = ckpt.as_mut().filter(|c| c.due(step + 1)) {
            if ck.keeps_snapshots() && step + 1 < cfg.job.steps {
                keep_due = true;
            } else {
                checkpoints::checkpoint(ck, &ranks, clock, deadline, step + 1).await?;
            }
        }
        // A committed checkpoint becomes the ranks' in-memory copies and replicas (in the
        // background); the copies it replaces serve as the buffers of the next kept snapshot.
        if let (Some(ck), Some(rec)) = (ckpt.as_mut(), recovery.as_mut()) {
            ck.poll().await?;
            if let Some(snaps) = ck.take_committed() {
                rec.keep(snaps).await?;
            }
            let spares = rec.take_spares().await?;
            if !spares.is_empty() {
                ck.set_spares(spares);
            }
        }
        step += 1;
    }
    let tokens: u64 = step_tokens.iter().sum();
    if let Some(ck) = ckpt.as_mut() {
        ck.finish().await?;
    }
    let sha = if ranks.refs.len() == 1 {
        let mut v = ranks
            .call_all(clock, deadline, cfg.job.steps, RankMsg::ParamsSha256)
            .await?;
        v.pop().unwrap_or_default()
    } else {
        let parts = ranks
            .call_all(clock, deadline, cfg.job.steps, RankMsg::CanonicalParams)
            .await?;
        crate::pipeline::job_params_sha256(parts)
    };
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
pub(crate) mod tests {
    use super::*;
    use flotilla_runtime::clock::RealClock;
    use flotilla_runtime::storage::sim::SimStorage;

    /// A three-step job of the default model on tiny batches, one thread.
    pub(crate) fn tiny() -> Config {
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

//! The job driver's loop: a started job's steps, each asked of every rank with a deadline (the
//! hung-step watchdog's when it is on), its record written and shown to the sentinel; the
//! checkpoints every `checkpoint.interval` steps; the roll-back after a rank's failure (in a
//! step or while its state is taken); and the run's summary. [`crate::job`] starts the tree
//! and stops it around this loop.

use std::sync::Arc;
use std::time::Duration;

use flotilla_ckpt::Snapshot;
use flotilla_runtime::clock::Clock;
use flotilla_runtime::config::Config;
use flotilla_runtime::metrics as names;

use crate::anomaly::Observation;
use crate::checkpoints::{self, Checkpointer, ResumeFrom};
use crate::error::JobError;
use crate::job::{Job, StepRecord, Summary, step_deadline};
use crate::rank::RankMsg;
use crate::ranks::Ranks;
use crate::rollback::Recovery;
use crate::run_log::RunLog;

/// The hung-step watchdog's deadline for the next step (`supervision.watchdog_factor`).
#[derive(Debug, Clone, Copy)]
struct Watchdog {
    deadline: Duration,
    factor: f64,
    median_s: f64,
}

/// The watchdog for the next step, once 3 steps have run (never beyond [`step_deadline`]);
/// `step_secs` are the steps' times so far.
fn watchdog(cfg: &Config, step_secs: &[f64]) -> Option<Watchdog> {
    let factor = cfg.supervision.watchdog_factor?;
    if step_secs.len() < 3 {
        return None;
    }
    let mut s = step_secs.to_vec();
    s.sort_by(f64::total_cmp);
    let median_s = s[s.len() / 2];
    let d = Duration::try_from_secs_f64(factor * median_s).ok()?;
    Some(Watchdog {
        deadline: d.min(step_deadline(cfg)),
        factor,
        median_s,
    })
}

/// Restore every rank from the checkpoint `from` names; returns the step to continue at.
async fn resume_ranks(
    cfg: &Config,
    ranks: &Ranks,
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
    let mut by_rank: Vec<Option<Snapshot>> = (0..ranks.len()).map(|_| None).collect();
    for snap in loaded.snapshots {
        let r = snap.meta.rank;
        match by_rank.get_mut(r) {
            Some(slot @ None) => *slot = Some(snap),
            _ => {
                return Err(JobError::Checkpoint(format!(
                    "step {step}: a snapshot of rank {r} does not fit a job of {} ranks (or appears twice)",
                    ranks.len()
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
    let attempt = ranks.attempt;
    let msgs = snaps
        .into_iter()
        .map(|snap| move |reply| RankMsg::Restore(Box::new(snap), attempt, reply))
        .collect();
    ranks
        .try_each(clock, deadline, step, "restore", msgs)
        .await?;
    checkpoints::event(log, format!("resumed at step {step}")).await?;
    Ok(step)
}

/// What every step taken so far gave, in order (a roll-back forgets the steps it undoes).
#[derive(Default)]
struct Taken {
    losses: Vec<f32>,
    tokens: Vec<u64>,
    secs: Vec<f64>,
    bubbles: Vec<f64>,
}

impl Taken {
    /// Keep the first `n` steps.
    fn truncate(&mut self, n: usize) {
        self.losses.truncate(n);
        self.tokens.truncate(n);
        self.secs.truncate(n);
        self.bubbles.truncate(n);
    }
}

/// After `failure`, roll every rank back to the newest checkpoint they hold when checkpoints
/// are on (the newest committed one first becomes their own copies); the step to go on at.
async fn recover(
    failure: JobError,
    ckpt: Option<&mut Checkpointer>,
    recovery: Option<&mut Recovery>,
    ranks: &mut Ranks,
    clock: &dyn Clock,
    deadline: Duration,
    log: &RunLog,
) -> Result<u64, JobError> {
    let (Some(ck), Some(rec)) = (ckpt, recovery) else {
        return Err(failure);
    };
    ck.finish().await?;
    if let Some(snaps) = ck.take_committed() {
        rec.keep(snaps, log).await?;
    }
    rec.roll_back(failure, ranks, ck.engine(), clock, deadline, log)
        .await
}

/// The steps of a started job, with its checkpoints and roll-backs; the summary.
pub(crate) async fn drive(
    job: &mut Job,
    resume: Option<ResumeFrom>,
    on_step: &mut (dyn FnMut(&StepRecord) + Send),
) -> Result<Summary, JobError> {
    let cfg = Arc::clone(&job.cfg);
    let cfg = cfg.as_ref();
    let shared_clock = Arc::clone(&job.clock);
    let clock = shared_clock.as_ref();
    let (ranks, log) = (&mut job.ranks, &job.log);
    let deadline = Duration::from_millis(cfg.supervision.peer_timeout_ms);
    let first = match &resume {
        Some(from) => resume_ranks(cfg, ranks, clock, log, &job.engine, from).await?,
        None => 0,
    };
    let coordinator = crate::ckpt_coordinator::Coordinator::find(&job.sup).await?;
    let mut ckpt = Checkpointer::new(cfg, job.engine.clone(), coordinator)
        .map(|c| c.with_log(log.clone(), Arc::clone(&shared_clock)));
    let mut recovery = match ckpt {
        Some(_) => Some(Recovery::new(cfg, job.faults.clone())?),
        None => None,
    };
    // The state the job starts from is the first in-memory copy, so that a failure before the
    // first checkpoint rolls back to the start instead of ending the job. (Not on the simulated
    // cluster, whose snapshots hold no values.)
    if let Some(rec) = recovery.as_mut()
        && cfg.cluster.device != flotilla_runtime::config::DeviceKind::Sim
    {
        let snaps = ranks
            .try_all(clock, deadline, first, "snapshot", RankMsg::Snapshot)
            .await?;
        rec.keep(snaps, log).await?;
    }
    let mut sentinel = crate::sentinel::SentinelClient::find(&job.sup).await;
    let started = clock.now();
    let mut taken = Taken::default();
    let mut step = first;
    // After a rank's failure: roll every rank back (or end the job), forget the steps undone,
    // and go on at the step rolled back to.
    macro_rules! roll_back {
        ($failure:expr) => {{
            let to = recover(
                $failure,
                ckpt.as_mut(),
                recovery.as_mut(),
                ranks,
                clock,
                deadline,
                log,
            )
            .await?;
            taken.truncate(to.saturating_sub(first) as usize);
            step = to;
            continue;
        }};
    }
    while step < cfg.job.steps {
        let t0 = clock.now();
        let attempt = ranks.attempt;
        let watchdog = watchdog(cfg, &taken.secs);
        let answer = ranks
            .try_all(
                clock,
                watchdog.map_or_else(|| step_deadline(cfg), |w| w.deadline),
                step,
                "",
                |reply| RankMsg::Step(attempt, reply),
            )
            .await
            .map_err(|e| match (e, watchdog) {
                (JobError::RankFailed { rank, step, why }, Some(w))
                    if why.starts_with("no answer within") =>
                {
                    JobError::RankFailed {
                        rank,
                        step,
                        why: format!(
                            "hung: {why} (the watchdog's deadline: {} × the median step, {:.3} s)",
                            w.factor, w.median_s
                        ),
                    }
                }
                (e, _) => e,
            });
        let all = match answer {
            Ok(all) => all,
            Err(e) => {
                roll_back!(e)
            }
        };
        // Every rank reports the job-wide loss and norm; compute is summed over the ranks.
        let (flops, dev_s) = all.iter().fold((0.0, 0.0f64), |(f, s), st| {
            (f + st.device_flops, s.max(st.device_seconds))
        });
        let rank_seconds: Vec<f64> = all.iter().map(|st| st.busy_seconds).collect();
        let busy = rank_seconds.iter().sum::<f64>() / rank_seconds.len().max(1) as f64;
        let Some(mut stats) = all.into_iter().next() else {
            return Err(JobError::Config("a job with no ranks".into()));
        };
        stats.device_flops = flops;
        stats.device_seconds = dev_s;
        if stats.skipped {
            checkpoints::event(
                log,
                format!(
                    "step {step}: update skipped, its batch gave {}",
                    stats.skipped_why.as_deref().unwrap_or("no reason")
                ),
            )
            .await?;
        }
        let secs = clock.elapsed(t0).as_secs_f64().max(1e-9);
        taken.tokens.push(stats.tokens);
        taken.losses.push(stats.loss);
        let rec = StepRecord {
            tokens_per_s: stats.tokens as f64 / secs,
            gflops: stats.device_flops / secs / 1e9,
            step_seconds: secs,
            bubble_fraction: (1.0 - busy / secs).max(0.0),
            stats,
        };
        taken.secs.push(secs);
        taken.bubbles.push(rec.bubble_fraction);
        metrics::gauge!(names::TRAIN_LOSS).set(rec.stats.loss as f64);
        metrics::gauge!(names::GRAD_NORM).set(rec.stats.grad_norm);
        metrics::gauge!(names::LEARNING_RATE).set(rec.stats.lr);
        metrics::gauge!(names::TOKENS_PER_SECOND).set(rec.tokens_per_s);
        metrics::counter!(names::STEPS).increment(1);
        metrics::histogram!(names::STEP_SECONDS).record(secs);
        if cfg.metrics.jsonl {
            log.metric(&rec).await?;
        }
        if let Some(s) = sentinel.as_ref() {
            let o = Observation {
                step,
                loss: rec.stats.loss,
                grad_norm: rec.stats.grad_norm,
                tokens_per_s: rec.tokens_per_s,
                rank_seconds,
                expert_load: rec
                    .stats
                    .expert_load_per_layer
                    .iter()
                    .copied()
                    .enumerate()
                    .collect(),
            };
            if !s.report(o, log).await? {
                sentinel = None;
            }
        }
        on_step(&rec);
        if let Some(ck) = ckpt.as_mut().filter(|c| c.due(step + 1)) {
            // A rank that fails while its state is taken is rolled back as in a step.
            match checkpoints::checkpoint(ck, ranks, clock, deadline, step + 1).await {
                Ok(()) => {}
                Err(e @ JobError::RankFailed { .. }) => {
                    roll_back!(e)
                }
                Err(e) => return Err(e),
            }
        }
        // A committed checkpoint becomes the ranks' in-memory copies and replicas (in the
        // background).
        if let (Some(ck), Some(rec)) = (ckpt.as_mut(), recovery.as_mut()) {
            ck.poll().await?;
            if let Some(snaps) = ck.take_committed() {
                rec.keep(snaps, log).await?;
            }
        }
        step += 1;
    }
    let tokens: u64 = taken.tokens.iter().sum();
    if let Some(ck) = ckpt.as_mut() {
        ck.finish().await?;
    }
    let sha = if cfg.cluster.device == flotilla_runtime::config::DeviceKind::Sim {
        "shape-only".to_string()
    } else {
        let parts = ranks
            .try_all(
                clock,
                deadline,
                cfg.job.steps,
                "parameters",
                RankMsg::CanonicalParams,
            )
            .await?;
        crate::pipeline::job_params_sha256(parts)
    };
    let seconds = clock.elapsed(started).as_secs_f64();
    let traces = ranks
        .try_all(clock, deadline, cfg.job.steps, "trace", RankMsg::Trace)
        .await?;
    log.trace(&traces).await?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let step_s = mean(&taken.secs);
    let sim = cfg.cluster.device == flotilla_runtime::config::DeviceKind::Sim;
    let mfu = if sim {
        let mcfg = crate::model_config::model_config(&cfg.model)?;
        let flops = flotilla_model::flops::step_flops(
            &mcfg,
            cfg.data.batch_size,
            cfg.data.seq_len,
            mcfg.num_nextn_predict_layers,
        );
        let peak = crate::store::sim_profile(cfg).gemm_flops_per_s * cfg.world_size() as f64;
        Some(flops.total() / step_s.max(1e-12) / peak)
    } else {
        None
    };
    let losses = &taken.losses;
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
        virtual_time: sim,
        step_s,
        bubble_fraction: mean(&taken.bubbles),
        mfu,
    };
    log.summary(&summary).await?;
    Ok(summary)
}

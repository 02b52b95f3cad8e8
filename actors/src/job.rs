//! Running a training job: start the supervision tree, drive the steps, write the run's files.
//!
//! The tree (DESIGN.md, "The supervision tree", as far as one process goes):
//!
//! ```text
//! controller        root supervisor, one_for_all (training is a collective act)
//! ├── rank-r × world    each rank's subtree (rank_tree.rs): rank actor, expert shard, stages
//! ├── ckpt-coordinator  the checkpoint coordinator, with a writers' supervisor per checkpoint
//! └── sentinel          with `[sentinel]`: anomaly detection over every step (sentinel.rs)
//! ```
//!
//! The ranks talk over one fabric: in-process channels (`cluster.fabric = "inproc"`), or
//! simulated links on virtual time (`"sim"`, with `cluster.device = "sim"`; the caller runs the
//! job on a paused clock). The driver asks every rank for a step, waits with a deadline
//! (`supervision.peer_timeout_ms`), and turns a failed or silent rank into a
//! [`JobError::RankFailed`] naming the rank and step, never a hang; with checkpoints on, a
//! failed step rolls every rank back to the last checkpoint (`rollback.rs`) and replays, at most
//! `supervision.max_job_restarts` times; a step that hangs (`supervision.watchdog_factor`) is
//! rolled back the same way. A step whose loss or gradient norm is not finite, or (with
//! `[sentinel]`) whose loss spikes, is skipped (no update) and said so in `events.jsonl`; the
//! sentinel, when there is one, sees every step and its findings go there too. Every
//! `checkpoint.interval` steps the ranks' state is checkpointed ([`crate::checkpoints`]), and
//! [`train_from`] resumes a job from a checkpoint.

use std::sync::Arc;
use std::time::Duration;

use flotilla_ckpt::Snapshot;
use flotilla_runtime::clock::Clock;
use flotilla_runtime::config::{Config, FabricKind};
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::fabric::sim::{LinkModel, SimNetwork};
use flotilla_runtime::metrics as names;
use flotilla_runtime::storage::Storage;
use flotilla_runtime::supervision::{
    Strategy, Supervisor, SupervisorHandle, SupervisorPolicy, event_channel,
};
use serde::Serialize;

use crate::anomaly::Observation;
use crate::checkpoints::{self, Checkpointer, ResumeFrom};
use crate::error::JobError;
use crate::faults::FaultPlan;
use crate::links::RankLinks;
use crate::pipeline::{ModelShape, placement};
use crate::rank::RankMsg;
use crate::rank_tree::RankTree;
use crate::ranks::{Fleet, Ranks};
use crate::rollback::Recovery;
use crate::run_log::{EventLine, RunLog};
use crate::store::StepStats;

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
    /// The ranks' mean idle fraction of the step: 1 − busy / step time (their bubble, the
    /// driver's own time between steps included).
    pub bubble_fraction: f64,
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
    /// Wall (or, on the simulated cluster, virtual) seconds of the run.
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// SHA-256 of the parameters (`shape-only` on the simulated device, which holds none).
    pub params_sha256: String,
    pub config_hash: String,
    /// Whether `seconds` is virtual time (the simulated cluster).
    pub virtual_time: bool,
    /// Mean seconds per step.
    pub step_s: f64,
    /// Mean of the steps' `bubble_fraction`.
    pub bubble_fraction: f64,
    /// Model FLOPs utilisation against the simulated device's GEMM peak (the FLOPs of a
    /// dense-equivalent step, `model/src/flops.rs`); absent on a real device, whose peak this
    /// build does not know.
    pub mfu: Option<f64>,
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

/// The fabric between a job's ranks: its hub (failure marks, reset, close) and an endpoint per
/// rank.
pub type Network = (Arc<InprocHub>, Vec<Arc<dyn Fabric>>);

/// The fabric `[cluster] fabric` names between the job's ranks.
fn fabric(cfg: &Config) -> Result<Network, JobError> {
    let world = cfg.world_size();
    Ok(match cfg.cluster.fabric {
        FabricKind::Sim => {
            let sim = cfg.cluster.sim.clone().unwrap_or_default();
            let per_host = cfg.cluster.ranks_per_host.max(1);
            let net = SimNetwork::new(LinkModel {
                host_of: (0..world).map(|r| r / per_host).collect(),
                intra_host_bytes_per_s: sim.intra_host_gbps * 1e9 / 8.0,
                inter_host_bytes_per_s: sim.link_gbps * 1e9 / 8.0,
                latency: Duration::from_secs_f64(sim.link_latency_us.max(0.0) * 1e-6),
            });
            let eps = net
                .endpoints()
                .into_iter()
                .map(|e| Arc::new(e) as Arc<dyn Fabric>)
                .collect();
            (Arc::clone(net.hub()), eps)
        }
        FabricKind::Inproc => {
            let hub = InprocHub::new(world);
            let eps = (0..world)
                .map(|r| Arc::new(hub.endpoint(r)) as Arc<dyn Fabric>)
                .collect();
            (hub, eps)
        }
        FabricKind::Quic => {
            return Err(JobError::Config(
                "cluster.fabric = \"quic\": a job over several processes is not supported yet"
                    .into(),
            ));
        }
    })
}

/// How a job is started besides its config (tests and benchmarks; `train` takes the defaults).
#[derive(Default)]
pub struct Launch {
    /// Failures to inject (tests of recovery).
    pub faults: Option<Arc<FaultPlan>>,
    /// The fabric between the ranks, and its hub, instead of the one the config names (a
    /// benchmark's modelled link).
    pub fabric: Option<Network>,
    /// Stage actions in progress at once per stage actor (default: 3 per sub-batch).
    pub window: Option<usize>,
    /// Called with the rank on each rank's device thread as it starts (a benchmark pins it).
    pub on_device_thread: Option<crate::rank::DeviceThreadHook>,
    /// Ranks that run elsewhere (rank processes, `crate::remote`): their links, whose rank
    /// actors stand in for them, and their fleet. The tree then holds no rank subtrees.
    pub remote: Option<RemoteRanks>,
}

/// Ranks that run in other processes: the links of their stand-in actors, and their fleet.
pub type RemoteRanks = (Vec<Arc<RankLinks>>, Arc<dyn Fleet>);

/// A running job: its supervision tree, the fabric between its ranks, its run files.
pub struct Job {
    pub cfg: Arc<Config>,
    sup: SupervisorHandle,
    sup_join: tokio::task::JoinHandle<()>,
    events: tokio::task::JoinHandle<()>,
    pub(crate) ranks: Ranks,
    pub(crate) log: RunLog,
    engine: flotilla_ckpt::CheckpointEngine,
    pub clock: Arc<dyn Clock>,
    faults: Option<Arc<FaultPlan>>,
}

impl Job {
    /// Start the job's tree: every rank's subtree (each building its model and state on its
    /// device) and the checkpoint coordinator. `fresh` starts the run's files anew (a resumed
    /// job appends to them).
    pub async fn start(
        cfg: Config,
        storage: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        fresh: bool,
        launch: Launch,
    ) -> Result<Job, JobError> {
        let cfg = Arc::new(cfg);
        let engine = checkpoints::engine_for(&cfg, &storage)?;
        let log = RunLog::new(storage);
        if fresh {
            log.start().await?;
        }
        let placement = Arc::new(placement(&cfg)?);
        let shape = Arc::new(ModelShape::of(&cfg, &placement)?);
        let dataset = Arc::new(crate::store::load_dataset(&cfg)?);
        let policy = SupervisorPolicy::from_supervision(&cfg.supervision)?
            .with_strategy(Strategy::OneForAll)
            .on_clock(clock.as_ref());
        let (events_tx, mut events_rx) = event_channel();
        let mut spec = policy.spec()?;
        let (fleet, links) = match launch.remote {
            Some((links, fleet)) => (fleet, links),
            None => {
                let (hub, endpoints) = match launch.fabric {
                    Some(f) => f,
                    None => fabric(&cfg)?,
                };
                if endpoints.len() != cfg.world_size() {
                    return Err(JobError::Config(format!(
                        "a fabric of {} ranks for a job of {}",
                        endpoints.len(),
                        cfg.world_size()
                    )));
                }
                let mut links = Vec::with_capacity(endpoints.len());
                for (r, fabric) in endpoints.into_iter().enumerate() {
                    let tree = RankTree {
                        rank: r,
                        config: Arc::clone(&cfg),
                        placement: Arc::clone(&placement),
                        shape: Arc::clone(&shape),
                        dataset: Arc::clone(&dataset),
                        fabric,
                        clock: Arc::clone(&clock),
                        faults: launch.faults.clone(),
                        window: launch.window.unwrap_or(3 * cfg.parallel.sub_batches.max(1)),
                        on_device_thread: launch.on_device_thread.clone(),
                    };
                    let (child, l) = tree.spec(events_tx.clone())?;
                    spec = spec.child(child);
                    links.push(l);
                }
                (hub as Arc<dyn Fleet>, links)
            }
        };
        let coordinator = crate::ckpt_coordinator::child_spec(
            &cfg,
            engine.clone(),
            events_tx.clone(),
            clock.as_ref(),
        )?;
        let mut spec = spec.child(coordinator);
        if let Some(sentinel) = cfg.sentinel.as_ref().and_then(crate::sentinel::child_spec) {
            spec = spec.child(sentinel);
        }
        let spec = spec.observer(events_tx).with_label("controller");
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
        let (sup, sup_join) = match Supervisor::spawn(None, spec, None).await {
            Ok(s) => s,
            Err(e) => {
                fleet.close();
                let _ = events.await;
                return Err(e.into());
            }
        };
        Ok(Job {
            ranks: Ranks::new(links, fleet),
            cfg,
            sup,
            sup_join,
            events,
            log,
            engine,
            clock,
            faults: launch.faults,
        })
    }

    /// Run one step on every rank (no roll-back on failure); every rank's statistics.
    pub async fn step(&mut self, step: u64) -> Result<Vec<StepStats>, JobError> {
        let deadline = step_deadline(&self.cfg);
        let attempt = self.ranks.attempt;
        self.ranks
            .try_all(self.clock.as_ref(), deadline, step, "", |reply| {
                RankMsg::Step(attempt, reply)
            })
            .await
    }

    /// Every rank's jobs of its last step, in the order they ran (the spans of `trace.json`).
    pub async fn trace(&self, step: u64) -> Result<Vec<Vec<crate::stream::Span>>, JobError> {
        let deadline = self.cfg.supervision.peer_timeout();
        self.ranks
            .try_all(self.clock.as_ref(), deadline, step, "trace", RankMsg::Trace)
            .await
    }

    /// Every rank's snapshot, taken between steps.
    pub async fn snapshots(&self, step: u64) -> Result<Vec<Snapshot>, JobError> {
        let deadline = self.cfg.supervision.peer_timeout();
        self.ranks
            .try_all(
                self.clock.as_ref(),
                deadline,
                step,
                "snapshot",
                RankMsg::Snapshot,
            )
            .await
    }

    /// The whole model's parameters by name, in host memory (each from its canonical holder).
    pub async fn params(&self, step: u64) -> Result<Vec<(String, Vec<f32>)>, JobError> {
        let deadline = self.cfg.supervision.peer_timeout();
        let parts = self
            .ranks
            .try_all(
                self.clock.as_ref(),
                deadline,
                step,
                "parameters",
                RankMsg::CanonicalParams,
            )
            .await?;
        let all: std::collections::BTreeMap<String, Vec<f32>> =
            parts.into_iter().flatten().collect();
        Ok(all.into_iter().collect())
    }

    /// Restore every rank from its snapshot (rank order), as a roll-back does: what a step in
    /// flight left is dropped, and the job goes on as a new attempt.
    pub async fn restore(&mut self, snaps: Vec<Snapshot>) -> Result<(), JobError> {
        let deadline = self.cfg.supervision.peer_timeout();
        let step = snaps.first().map_or(0, |s| s.step);
        self.ranks.next_attempt().await?;
        let attempt = self.ranks.attempt;
        let msgs = snaps
            .into_iter()
            .map(|s| move |reply| RankMsg::Restore(Box::new(s), attempt, reply))
            .collect();
        self.ranks
            .try_each(self.clock.as_ref(), deadline, step, "restore", msgs)
            .await
            .map(|_| ())
    }

    /// Stop the tree (children in reverse order, each within its shutdown timeout).
    pub async fn stop(self) -> Result<(), JobError> {
        self.ranks.close();
        let stop = self
            .sup
            .stop(Duration::from_millis(
                self.cfg.supervision.shutdown_timeout_ms.max(1),
            ))
            .await;
        let _ = self.sup_join.await;
        let _ = self.events.await;
        Ok(stop?)
    }
}

/// How long the driver waits for a step's answers: a backstop. Every wait on a peer inside a
/// step has its own deadline (`supervision.peer_timeout_ms`, in the stage actors and the
/// collectives), which fails the step first, naming the peer; this one only catches a rank
/// whose device never finishes a job.
fn step_deadline(cfg: &Config) -> Duration {
    cfg.supervision.peer_timeout() * 3
}

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

/// [`train_from`] with failures injected by `faults` (tests of the in-flight roll-back).
pub async fn train_with_faults(
    cfg: Config,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    resume: Option<ResumeFrom>,
    faults: Option<Arc<FaultPlan>>,
    on_step: &mut (dyn FnMut(&StepRecord) + Send),
) -> Result<Summary, JobError> {
    let launch = Launch {
        faults,
        ..Launch::default()
    };
    let mut job = Job::start(cfg, storage, clock, resume.is_none(), launch).await?;
    let result = drive(&mut job, resume, on_step).await;
    let stop = job.stop().await;
    let summary = result?;
    stop?;
    Ok(summary)
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
        let storage = Arc::new(SimStorage::unlimited());
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
    async fn a_missing_dataset_is_reported_before_the_ranks_start() {
        let mut c = tiny();
        c.data.source = "/no/such/tokens.bin".into();
        let storage = Arc::new(SimStorage::unlimited());
        let err = train(
            c,
            storage.clone(),
            Arc::new(RealClock),
            &mut |_: &StepRecord| {},
        )
        .await
        .expect_err("the job must fail");
        let text = err.to_string();
        assert!(
            text.starts_with("data:") && text.contains("/no/such/tokens.bin"),
            "{text}"
        );
        // Nothing was started, so nothing was logged as started.
        let events = storage.get("events.jsonl").await.unwrap_or_default();
        assert!(!String::from_utf8_lossy(&events).contains("Started"));
    }
}

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
//! job on a paused clock). The driver (its loop is `driver.rs`) asks every rank for a step,
//! waits with a deadline
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
use flotilla_runtime::storage::Storage;
use flotilla_runtime::supervision::{
    Strategy, Supervisor, SupervisorHandle, SupervisorPolicy, event_channel,
};
use serde::Serialize;

use crate::checkpoints::{self, ResumeFrom};
use crate::error::JobError;
use crate::faults::FaultPlan;
use crate::links::RankLinks;
use crate::pipeline::{ModelShape, placement};
use crate::rank::RankMsg;
use crate::rank_tree::RankTree;
use crate::ranks::{Fleet, Ranks};
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
    pub(crate) sup: SupervisorHandle,
    sup_join: tokio::task::JoinHandle<()>,
    events: tokio::task::JoinHandle<()>,
    pub(crate) ranks: Ranks,
    pub(crate) log: RunLog,
    pub(crate) engine: flotilla_ckpt::CheckpointEngine,
    pub clock: Arc<dyn Clock>,
    pub(crate) faults: Option<Arc<FaultPlan>>,
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
        // A device this binary or machine cannot give is said before any actor starts (in this
        // process's ranks; a multi-process job's ranks check their own).
        if launch.remote.is_none() {
            crate::store::check_device(&cfg)?;
        }
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
pub(crate) fn step_deadline(cfg: &Config) -> Duration {
    cfg.supervision.peer_timeout() * 3
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
    let result = crate::driver::drive(&mut job, resume, on_step).await;
    let stop = job.stop().await;
    let summary = result?;
    stop?;
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

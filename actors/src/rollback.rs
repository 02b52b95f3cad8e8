//! Rolling a job back in flight (TRANSOM's TOL and TCE, in one process): at every committed
//! checkpoint each rank's snapshot becomes its own in-memory copy and is replicated to
//! `checkpoint.replicas - 1` peers on other hosts ([`RankReplicas`]); when a rank's step fails,
//! every rank is restored to that checkpoint from the fastest sound source (own memory → a
//! peer → storage), the fabric's traffic starts afresh, and training goes on from there, at
//! most `supervision.max_job_restarts` times.
//!
//! The rank actors stay up (a failed step is an answer, not a crash); a rank that cannot take
//! its restore (dead, or silent past the deadline) ends the job as before. The replicas travel
//! over a fabric of their own, which outlives the ranks' (as node agents would hold them). A
//! rank that "loses its memory" ([`crate::faults::InjectedFault::lose_memory`]) loses its own
//! copy only; the replicas it holds for its peers stay (a simplification: a real host loss
//! would take them too, and those peers would fall back to storage).
//!
//! A checkpoint of the simulated cluster is shape-only (its snapshots hold no values): it gets
//! no own copies and no replicas (an event says so), and a roll-back to it is refused, naming
//! the failure it would have recovered from.

use std::sync::Arc;
use std::time::Duration;

use flotilla_ckpt::{CheckpointEngine, Snapshot};
use flotilla_runtime::clock::Clock;
use flotilla_runtime::config::Config;
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;

use crate::error::JobError;
use crate::faults::FaultPlan;
use crate::rank::RankMsg;
use crate::ranks::Ranks;
use crate::replicas::{RankReplicas, topology};
use crate::run_log::RunLog;

/// Every rank's own copy and replicas, and what is left of the restart budget.
#[derive(Debug)]
pub(crate) struct Recovery {
    /// One per rank; handed to the background task while a commit's copies are made.
    replicas: Option<Vec<RankReplicas>>,
    /// The background task keeping the newest commit (encoding, hashing and pushing its
    /// snapshots takes a pass over the state, which training need not wait for).
    keeping: Option<tokio::task::JoinHandle<Keeping>>,
    /// The fabric the replicas travel over.
    hub: Arc<InprocHub>,
    faults: Option<Arc<FaultPlan>>,
    restarts_left: u32,
    /// `supervision.max_job_restarts`.
    budget: u32,
    /// The step of the checkpoint every rank holds in its own copy.
    kept: Option<u64>,
    /// The step of the newest committed checkpoint when it is shape-only (nothing kept).
    shape_only: Option<u64>,
}

/// What a background keep gives back: the replicas, and the step kept with the own copies it
/// replaced (or why it failed).
type Keeping = (
    Vec<RankReplicas>,
    Result<(Option<u64>, Vec<Snapshot>), JobError>,
);

impl Recovery {
    /// The recovery of a job with checkpoints (inside a tokio runtime: it starts the replica
    /// services).
    pub(crate) fn new(cfg: &Config, faults: Option<Arc<FaultPlan>>) -> Result<Self, JobError> {
        let topo = topology(cfg)?;
        let world = cfg.world_size();
        let hub = InprocHub::new(world);
        let deadline = Duration::from_millis(cfg.supervision.peer_timeout_ms);
        let replicas = (0..world)
            .map(|r| {
                let fabric: Arc<dyn Fabric> = Arc::new(hub.endpoint(r));
                RankReplicas::new(&topo, cfg.checkpoint.replicas, fabric, deadline)
            })
            .collect();
        Ok(Self {
            replicas: Some(replicas),
            keeping: None,
            hub,
            faults,
            restarts_left: cfg.supervision.max_job_restarts,
            budget: cfg.supervision.max_job_restarts,
            kept: None,
            shape_only: None,
        })
    }

    /// Start keeping a committed checkpoint's snapshots (rank order) as the ranks' own copies
    /// and pushing their replicas, in the background (after the keep before it has finished).
    /// Shape-only snapshots (the simulated cluster's) are not kept: `log` gets an event saying
    /// so, and the checkpoint cannot be rolled back to.
    pub(crate) async fn keep(
        &mut self,
        snaps: Vec<Snapshot>,
        log: &RunLog,
    ) -> Result<(), JobError> {
        let mut replicas = self.settle().await?;
        if let Some(s) = snaps.iter().find(|s| s.is_shape_only()) {
            let step = s.step;
            self.replicas = Some(replicas);
            self.kept = None;
            self.shape_only = Some(step);
            let why = format!(
                "checkpoint of step {step} is shape-only (simulated cluster, no values): no \
                 in-memory copies or peer replicas kept, and no roll-back to it"
            );
            return crate::checkpoints::event(log, why).await;
        }
        self.shape_only = None;
        if snaps.len() != replicas.len() {
            let why = format!("{} snapshots for {} ranks", snaps.len(), replicas.len());
            self.replicas = Some(replicas);
            return Err(JobError::Checkpoint(why));
        }
        self.keeping = Some(tokio::spawn(async move {
            let step = snaps.first().map(|s| s.step);
            let mut old = Vec::new();
            for (r, snap) in replicas.iter_mut().zip(snaps) {
                match r.keep(snap).await {
                    Ok(o) => old.extend(o),
                    Err(e) => return (replicas, Err(e)),
                }
            }
            (replicas, Ok((step, old)))
        }));
        Ok(())
    }

    /// Wait for the keep in flight, if any, and take the replicas back.
    async fn settle(&mut self) -> Result<Vec<RankReplicas>, JobError> {
        if let Some(h) = self.keeping.take() {
            let (replicas, done) = h
                .await
                .map_err(|e| JobError::Checkpoint(format!("keeping the checkpoint: {e}")))?;
            self.replicas = Some(replicas);
            let (step, _replaced) = done?;
            self.kept = step;
        }
        self.replicas
            .take()
            .ok_or_else(|| JobError::Checkpoint("the ranks' copies were lost".into()))
    }

    /// After `failure`, restore every rank to the kept checkpoint and say at which step
    /// training goes on; `failure` itself when there is no checkpoint to go back to, the
    /// restart budget is spent, or a rank cannot be restored.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn roll_back(
        &mut self,
        failure: JobError,
        ranks: &mut Ranks,
        engine: &CheckpointEngine,
        clock: &dyn Clock,
        deadline: Duration,
        log: &RunLog,
    ) -> Result<u64, JobError> {
        let JobError::RankFailed { rank, step, why } = &failure else {
            return Err(failure);
        };
        let mut replicas = self.settle().await?;
        if let Some(at) = self.shape_only.filter(|_| self.restarts_left > 0) {
            self.replicas = Some(replicas);
            return Err(JobError::Checkpoint(format!(
                "cannot roll back after \"{failure}\": the last checkpoint (step {at}) was taken \
                 on the simulated cluster and holds no values (roll-back is not simulated)"
            )));
        }
        let Some(to) = self.kept.filter(|_| self.restarts_left > 0) else {
            self.replicas = Some(replicas);
            if self.kept.is_some() {
                // The budget is spent: say so with the failure that spent it.
                return Err(JobError::RankFailed {
                    rank: *rank,
                    step: *step,
                    why: format!(
                        "{why}; not rolled back: the restart budget \
                         (supervision.max_job_restarts = {}) is spent",
                        self.budget
                    ),
                });
            }
            return Err(failure);
        };
        self.restarts_left -= 1;
        crate::checkpoints::event(
            log,
            format!(
                "rank {rank} failed at step {step} ({why}): rolling every rank back to step {to}"
            ),
        )
        .await?;
        ranks.next_attempt().await?;
        let lost = ranks.lost_memory();
        let mut snaps = Vec::with_capacity(replicas.len());
        for (r, rep) in replicas.iter_mut().enumerate() {
            if lost.contains(&r) || self.faults.as_ref().is_some_and(|f| f.lost_memory(r)) {
                rep.drop_own();
            }
            let restored = match rep.restore(Some(engine), Some(to)).await {
                Ok(r) => r,
                Err(e) => {
                    self.replicas = Some(replicas);
                    return Err(JobError::Checkpoint(format!(
                        "rolling back after \"{failure}\": {e}"
                    )));
                }
            };
            let passed = if restored.rejected.is_empty() {
                String::new()
            } else {
                format!(" (passed over: {})", restored.rejected.join("; "))
            };
            crate::checkpoints::event(
                log,
                format!(
                    "rank {r} restored step {to} from {}{passed}",
                    restored.source
                ),
            )
            .await?;
            snaps.push(restored.snapshot);
        }
        self.replicas = Some(replicas);
        let attempt = ranks.attempt;
        let msgs = snaps
            .into_iter()
            .map(|s| move |reply| RankMsg::Restore(Box::new(s), attempt, reply))
            .collect();
        ranks.try_each(clock, deadline, to, "restore", msgs).await?;
        Ok(to)
    }
}

impl Drop for Recovery {
    fn drop(&mut self) {
        self.hub.close();
    }
}

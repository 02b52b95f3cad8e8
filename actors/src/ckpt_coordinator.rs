//! The checkpoint coordinator actor: takes a checkpoint (every rank's snapshot of one step),
//! has each shard written by a writer actor under a supervisor of its own, and commits the step
//! once every shard is written and checked.
//!
//! ```text
//! controller (root, one_for_all)
//! └── ckpt-coordinator                      temporary
//!     └── ckpt-writers/step-N               one_for_one, one per checkpoint, linked to it
//!         └── writer-0 .. writer-{n-1}      transient
//! ```
//!
//! A save goes: [`CoordinatorMsg::Save`] → [`CheckpointEngine::begin`] (checks the snapshots,
//! takes the commit lock, uncommits a step saved before) → a writers' supervisor whose children
//! write a shard each ([`crate::ckpt_writer`]) and report [`CoordinatorMsg::Written`] → once
//! every rank's record is in, a task runs [`CheckpointEngine::commit`] (checks the records cover
//! the world once; manifest, then `latest`) and [`CheckpointEngine::prune`] (retention) and
//! reports [`CoordinatorMsg::Committed`]. The caller is answered as soon as the writers are
//! started (training does not wait for the writes) and collects the outcome, with the
//! snapshots' buffers, with [`CoordinatorMsg::Wait`]. At most one checkpoint is in flight.
//!
//! A writer whose write fails is restarted by its supervisor and writes the same shard again
//! (each exit and restart is a supervision event, sent to the observer the job gives, so to
//! `events.jsonl`). When the restarts exceed the `[supervision]` restart intensity, the writers'
//! supervisor stops the other writers and fails; the coordinator, linked to it, turns that into
//! the failure of this checkpoint only ([`CheckpointError::WriteFailed`], naming rank, step and
//! storage error): no manifest of the step was written, so the previous committed checkpoint is
//! still the newest, and the next save starts a fresh writers' supervisor.
//!
//! The coordinator is `temporary` under the root: the root's `one_for_all` would otherwise stop
//! the ranks to restart it. If it dies, the [`Coordinator`] calls fail and the job ends with that
//! error.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla_ckpt::format::step_dir;
use flotilla_ckpt::{CheckpointEngine, CkptError, SaveLock, SaveReport, ShardRecord, Snapshot};
use flotilla_runtime::clock::Clock;
use flotilla_runtime::config::{Config, SupervisionConfig};
use flotilla_runtime::supervision::{
    ALL_DONE, ChildSpec, EventSender, ExitReason, Restart, Strategy, Supervisor, SupervisorError,
    SupervisorHandle, SupervisorPolicy,
};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::Semaphore;

use crate::ckpt_writer::{CkptWriter, WriterArgs};

/// The coordinator's child id under the controller's root supervisor.
pub const CHILD_ID: &str = "ckpt-coordinator";

/// Why a checkpoint could not be taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointError {
    /// A shard's writer failed more often than the restart intensity allows.
    #[error(
        "checkpoint of step {step} failed: the shard of rank {rank} was not written \
         (more than {max_restarts} restart(s) within {within_s} s): {why}"
    )]
    WriteFailed {
        step: u64,
        rank: usize,
        max_restarts: u32,
        within_s: f64,
        /// The writer's last error (storage error included).
        why: String,
    },
    /// The writers' supervisor ended otherwise (stopped from outside, or failed itself).
    #[error("checkpoint of step {step} failed: its writers stopped: {why}")]
    WritersLost { step: u64, why: String },
    /// The engine refused or failed a piece of the save (snapshots, commit, retention).
    #[error("checkpoint of step {step} failed: {source}")]
    Engine { step: u64, source: CkptError },
    /// The snapshots are not one step of every rank.
    #[error(transparent)]
    Refused(CkptError),
    /// A save arrived while the previous one is in flight or not yet collected.
    #[error("the checkpoint of step {step} is still in flight or not yet waited for")]
    Busy { step: u64 },
    /// The writers' supervisor could not be started.
    #[error("checkpoint of step {step}: cannot start its writers: {why}")]
    Start { step: u64, why: String },
    /// The coordinator is gone or did not answer.
    #[error("checkpoint coordinator: {0}")]
    Unreachable(String),
}

/// A committed checkpoint: what was written, and the snapshots (their buffers) handed back.
#[derive(Debug)]
pub struct Saved {
    pub report: SaveReport,
    /// In rank order.
    pub snapshots: Vec<Snapshot>,
}

/// The answer to [`CoordinatorMsg::Wait`]: `None` when no checkpoint was in flight.
pub type WaitAnswer = Result<Option<Saved>, CheckpointError>;

/// Messages to the coordinator. Callers use [`Coordinator`]; `Written` comes from the writers
/// and `Committed` from the coordinator's own commit task.
pub enum CoordinatorMsg {
    /// Start a checkpoint of these snapshots (every rank's, one step); answered with the step
    /// once the writers are started.
    Save(Vec<Snapshot>, RpcReplyPort<Result<u64, CheckpointError>>),
    /// Whether no checkpoint is in flight (its outcome may be waiting to be collected).
    IsFinished(RpcReplyPort<bool>),
    /// Wait for the checkpoint in flight and collect its outcome.
    Wait(RpcReplyPort<WaitAnswer>),
    /// A writer wrote its shard.
    Written { step: u64, record: ShardRecord },
    /// The commit task ended.
    Committed {
        step: u64,
        result: Result<SaveReport, CkptError>,
    },
}

/// What the coordinator is started with.
#[derive(Debug, Clone)]
pub struct CoordinatorArgs {
    pub engine: CheckpointEngine,
    /// The writers' supervisor's restart intensity and backoff.
    pub policy: SupervisorPolicy,
    /// Where the writers' supervision events go (the job's `events.jsonl`).
    pub events: Option<EventSender>,
    /// How many shards are written at once (at least 1).
    pub concurrent_writes: usize,
}

/// The writers' policy from `[supervision]`: restart intensity `max_restarts` within
/// `within_s`; backoff from `backoff_ms`, doubling per restart up to `backoff_max_ms`, as the
/// config documents it; children stopped within `shutdown_timeout_ms`; all in `clock`'s time.
pub fn writer_policy(
    s: &SupervisionConfig,
    clock: &dyn Clock,
) -> Result<SupervisorPolicy, SupervisorError> {
    Ok(SupervisorPolicy::from_supervision(s)?
        .with_strategy(Strategy::OneForOne)
        .on_clock(clock))
}

/// The coordinator as a child of the controller's root supervisor (id [`CHILD_ID`],
/// `temporary`). Shards are written one at a time, as the engine's own saves do, so that an
/// asynchronous checkpoint takes no more memory and cores from training than before.
pub fn child_spec(
    cfg: &Config,
    engine: CheckpointEngine,
    events: EventSender,
    clock: &dyn Clock,
) -> Result<ChildSpec, SupervisorError> {
    let policy = writer_policy(&cfg.supervision, clock)?;
    let shutdown = policy.child_shutdown();
    let args = CoordinatorArgs {
        engine,
        policy,
        events: Some(events),
        concurrent_writes: 1,
    };
    Ok(
        ChildSpec::for_actor(CHILD_ID, move || (CkptCoordinator, args.clone()))
            .with_restart(Restart::Temporary)
            .with_shutdown(shutdown),
    )
}

/// A client of the coordinator. Calls have no deadline of their own: the coordinator answers
/// every call (a failed write included) or, if it dies, drops the reply, which fails the call.
#[derive(Debug, Clone)]
pub struct Coordinator {
    actor: ActorRef<CoordinatorMsg>,
}

impl Coordinator {
    pub fn new(actor: ActorRef<CoordinatorMsg>) -> Self {
        Self { actor }
    }

    /// The coordinator started under `sup` by [`child_spec`].
    pub async fn find(sup: &SupervisorHandle) -> Result<Self, CheckpointError> {
        let unreachable = |why: String| CheckpointError::Unreachable(why);
        let info = sup
            .child(CHILD_ID)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        match info.cell {
            Some(cell) if cell.is_message_type_of::<CoordinatorMsg>() == Some(true) => {
                Ok(Self::new(cell.into()))
            }
            Some(_) => Err(unreachable(format!("`{CHILD_ID}` is another actor"))),
            None => Err(unreachable(format!("`{CHILD_ID}` is not running"))),
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<T>) -> CoordinatorMsg,
    ) -> Result<T, CheckpointError> {
        match self.actor.call(build, None).await {
            Ok(CallResult::Success(v)) => Ok(v),
            Ok(CallResult::Timeout) => Err(CheckpointError::Unreachable("no answer".into())),
            Ok(CallResult::SenderError) => Err(CheckpointError::Unreachable(
                "it stopped without answering".into(),
            )),
            Err(_) => Err(CheckpointError::Unreachable("its mailbox is closed".into())),
        }
    }

    /// Start a checkpoint of `snaps`; returns its step once the writers are started.
    pub async fn save(&self, snaps: Vec<Snapshot>) -> Result<u64, CheckpointError> {
        self.call(|r| CoordinatorMsg::Save(snaps, r)).await?
    }

    /// Whether no checkpoint is in flight.
    pub async fn is_finished(&self) -> Result<bool, CheckpointError> {
        self.call(CoordinatorMsg::IsFinished).await
    }

    /// Wait for the checkpoint in flight: its report and snapshots once committed, its error
    /// if it failed, `None` if there was none.
    pub async fn wait(&self) -> WaitAnswer {
        self.call(CoordinatorMsg::Wait).await?
    }
}

/// The coordinator actor.
#[derive(Debug, Default)]
pub struct CkptCoordinator;

/// The checkpoint in flight.
struct Flight {
    step: u64,
    /// The snapshots, in rank order; writers hold them weakly.
    shards: Vec<Arc<Snapshot>>,
    records: BTreeMap<usize, ShardRecord>,
    /// The writers' supervisor, until every shard is written.
    writers: Option<SupervisorHandle>,
    /// The engine's commit lock, until the commit task takes it.
    lock: Option<SaveLock>,
}

/// The coordinator's state.
pub struct CoordinatorState {
    args: CoordinatorArgs,
    slots: Arc<Semaphore>,
    flight: Option<Flight>,
    /// The outcome of the last checkpoint, until it is collected.
    outcome: Option<(u64, Result<Saved, CheckpointError>)>,
    waiter: Option<RpcReplyPort<WaitAnswer>>,
}

impl Actor for CkptCoordinator {
    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<CoordinatorMsg>,
        args: CoordinatorArgs,
    ) -> Result<CoordinatorState, ActorProcessingErr> {
        let slots = Arc::new(Semaphore::new(args.concurrent_writes.max(1)));
        Ok(CoordinatorState {
            args,
            slots,
            flight: None,
            outcome: None,
            waiter: None,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<CoordinatorMsg>,
        msg: CoordinatorMsg,
        st: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoordinatorMsg::Save(snaps, reply) => {
                let _ = reply.send(st.save(&me, snaps).await);
            }
            CoordinatorMsg::IsFinished(reply) => {
                let _ = reply.send(st.flight.is_none());
            }
            CoordinatorMsg::Wait(reply) => {
                if st.flight.is_some() {
                    // One caller collects the outcome; a second one waiting is a misuse.
                    if let Some(old) = st.waiter.replace(reply) {
                        let _ = old.send(Err(CheckpointError::Unreachable(
                            "another caller is waiting for this checkpoint".into(),
                        )));
                    }
                } else {
                    let _ = reply.send(st.outcome.take().map(|(_, r)| r).transpose());
                }
            }
            CoordinatorMsg::Written { step, record } => st.written(&me, step, record),
            CoordinatorMsg::Committed { step, result } => {
                if let Some(f) = st.flight.take_if(|f| f.step == step) {
                    let result = result
                        .map(|report| Saved {
                            report,
                            snapshots: f.shards.into_iter().map(flotilla_ckpt::reclaim).collect(),
                        })
                        .map_err(|source| CheckpointError::Engine { step, source });
                    st.conclude(step, result);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<CoordinatorMsg>,
        evt: SupervisionEvent,
        st: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((who, reason)) = ExitReason::from_supervision_event(&evt) else {
            return Ok(());
        };
        if !st.is_current_writers(who) {
            // An earlier checkpoint's writers' supervisor, ended once its shards were written.
            return Ok(());
        }
        if matches!(&reason, ExitReason::Normal(Some(r)) if r == ALL_DONE) {
            // Every writer exited after sending its record (which may still be on its way
            // here, behind this event): the records finish the checkpoint.
            if let Some(f) = st.flight.as_mut() {
                f.writers = None;
            }
            return Ok(());
        }
        let Some(f) = st.flight.take() else {
            return Ok(());
        };
        let step = f.step;
        let error = match &evt {
            SupervisionEvent::ActorFailed(_, err) => match err.downcast_ref::<SupervisorError>() {
                Some(SupervisorError::IntensityExceeded {
                    child,
                    reason,
                    max_restarts,
                    within,
                    ..
                }) => match child.strip_prefix("writer-").and_then(|r| r.parse().ok()) {
                    Some(rank) => CheckpointError::WriteFailed {
                        step,
                        rank,
                        max_restarts: *max_restarts,
                        within_s: within.as_secs_f64(),
                        why: reason_text(reason),
                    },
                    None => CheckpointError::WritersLost {
                        step,
                        why: err.to_string(),
                    },
                },
                _ => CheckpointError::WritersLost {
                    step,
                    why: err.to_string(),
                },
            },
            _ => CheckpointError::WritersLost {
                step,
                why: reason.to_string(),
            },
        };
        tracing::error!(step, %error, "checkpoint failed");
        // Dropping the flight releases the commit lock and the snapshots; no manifest was written.
        drop(f);
        st.conclude(step, Err(error));
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<CoordinatorMsg>,
        st: &mut CoordinatorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(w) = st.flight.as_mut().and_then(|f| f.writers.take()) {
            let grace = st.args.policy.child_shutdown().grace();
            if let Err(e) = w.stop(grace).await {
                tracing::warn!("checkpoint writers did not stop: {e}");
            }
        }
        Ok(())
    }
}

/// The text of an exit reason without its kind (the writer's own error names what failed).
fn reason_text(reason: &ExitReason) -> String {
    match reason {
        ExitReason::Failed(e) | ExitReason::Escalated(e) | ExitReason::StartFailed(e) => e.clone(),
        other => other.to_string(),
    }
}

impl CoordinatorState {
    fn is_current_writers(&self, who: ActorId) -> bool {
        self.flight
            .as_ref()
            .and_then(|f| f.writers.as_ref())
            .is_some_and(|w| w.cell().get_id() == who)
    }

    /// Start a checkpoint: begin the save, then a writers' supervisor with a writer per rank.
    async fn save(
        &mut self,
        me: &ActorRef<CoordinatorMsg>,
        mut snaps: Vec<Snapshot>,
    ) -> Result<u64, CheckpointError> {
        if let Some(step) = self
            .flight
            .as_ref()
            .map(|f| f.step)
            .or(self.outcome.as_ref().map(|(s, _)| *s))
        {
            return Err(CheckpointError::Busy { step });
        }
        let lock = self
            .args
            .engine
            .begin(&snaps)
            .await
            .map_err(CheckpointError::Refused)?;
        let step = lock.step();
        // `begin` checked that the ranks are 0..n, each once.
        snaps.sort_by_key(|s| s.meta.rank);
        let shards: Vec<Arc<Snapshot>> = snaps.into_iter().map(Arc::new).collect();
        let writers =
            self.start_writers(me, step, &shards)
                .await
                .map_err(|e| CheckpointError::Start {
                    step,
                    why: e.to_string(),
                })?;
        self.flight = Some(Flight {
            step,
            shards,
            records: BTreeMap::new(),
            writers: Some(writers),
            lock: Some(lock),
        });
        Ok(step)
    }

    async fn start_writers(
        &self,
        me: &ActorRef<CoordinatorMsg>,
        step: u64,
        shards: &[Arc<Snapshot>],
    ) -> Result<SupervisorHandle, SupervisorError> {
        let policy = &self.args.policy;
        let mut spec = policy
            .spec()?
            .with_label(format!("ckpt-writers/{}", step_dir(step)))
            .stop_when_done();
        spec.strategy = Strategy::OneForOne;
        if let Some(events) = &self.args.events {
            spec = spec.observer(events.clone());
        }
        for (rank, shard) in shards.iter().enumerate() {
            let args = WriterArgs {
                step,
                rank,
                shard: Arc::downgrade(shard),
                engine: self.args.engine.clone(),
                coordinator: me.clone(),
                slots: Arc::clone(&self.slots),
            };
            let child =
                ChildSpec::for_actor(format!("writer-{rank}"), move || (CkptWriter, args.clone()))
                    .with_restart(Restart::Transient)
                    .with_shutdown(policy.child_shutdown());
            spec = spec.child(child);
        }
        let (writers, _join) = Supervisor::spawn(None, spec, Some(me.get_cell())).await?;
        Ok(writers)
    }

    /// A writer's record: keep it; once every rank's is in, stop the writers and commit.
    fn written(&mut self, me: &ActorRef<CoordinatorMsg>, step: u64, record: ShardRecord) {
        let Some(f) = self.flight.as_mut().filter(|f| f.step == step) else {
            return;
        };
        let rank = record.meta.rank;
        if rank >= f.shards.len() || record.step != step {
            tracing::warn!(step, rank, "a shard record that is not this checkpoint's");
            return;
        }
        f.records.insert(rank, record);
        if f.records.len() < f.shards.len() {
            return;
        }
        // The writers' supervisor ends by itself once the last writer has exited
        // (`stop_when_done`); it is not stopped here, so that every writer's exit is its own.
        f.writers = None;
        let Some(lock) = f.lock.take() else {
            return;
        };
        let records: Vec<ShardRecord> = std::mem::take(&mut f.records).into_values().collect();
        let (engine, me) = (self.args.engine.clone(), me.clone());
        tokio::spawn(async move {
            let result: Result<SaveReport, CkptError> = async {
                let mut report = engine.commit(&lock, records).await?;
                report.removed = engine.prune(lock).await?;
                Ok(report)
            }
            .await;
            // The coordinator may be gone (the job is ending); the commit stands either way.
            let _ = me.cast(CoordinatorMsg::Committed { step, result });
        });
    }

    /// The checkpoint of `step` ended: answer the waiter, or keep the outcome for it.
    fn conclude(&mut self, step: u64, result: Result<Saved, CheckpointError>) {
        match self.waiter.take() {
            Some(w) => {
                let _ = w.send(result.map(Some));
            }
            None => self.outcome = Some((step, result)),
        }
    }
}

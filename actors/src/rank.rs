//! The rank actor: owns one rank's [`Trainer`] on a dedicated compute thread, so that the actor
//! keeps answering supervision and control messages while a long step runs. In a pipeline /
//! expert / data-parallel job it is the rank's *stage actor*: its trainer holds the rank's stages
//! and experts and runs the schedule's actions as activations and gradients arrive over the
//! fabric (see [`crate::pipeline`]).
//!
//! A step request is handed to the thread with its reply port and the handler returns at once;
//! the thread replies when the step is done. If the thread dies (a panic in compute), the reply
//! port is dropped, the caller's call fails, and the next message finds the thread gone and
//! fails the actor, which its supervisor then sees.

use std::sync::Arc;
use std::sync::mpsc;

use flotilla_ckpt::Snapshot;
use flotilla_runtime::config::Config;
use flotilla_runtime::fabric::Fabric;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::faults::FaultPlan;
use crate::trainer::{StepStats, Trainer};

/// Messages to a rank.
#[derive(Debug)]
pub enum RankMsg {
    /// Run one optimizer step; replies with its statistics or why it failed.
    Step(RpcReplyPort<Result<StepStats, String>>),
    /// SHA-256 of the rank's parameters.
    ParamsSha256(RpcReplyPort<String>),
    /// The tensors this rank is the lowest holder of (for the job's parameter hash).
    CanonicalParams(RpcReplyPort<Vec<(String, Vec<f32>)>>),
    /// A copy of the rank's whole training state, taken between steps.
    Snapshot(RpcReplyPort<Result<Snapshot, String>>),
    /// Run one optimizer step and reply with the snapshot of the state before it, kept by the
    /// step's out-of-place optimizer update instead of copied ([`Trainer::step_with_snapshot`]);
    /// the snapshot, if any, is an earlier one whose buffers it may reuse.
    StepWithSnapshot(Option<Box<Snapshot>>, RpcReplyPort<StepAndSnapshot>),
    /// Replace the rank's training state with a snapshot's.
    Restore(Box<Snapshot>, RpcReplyPort<Result<(), String>>),
}

/// The answer to [`RankMsg::StepWithSnapshot`].
pub type StepAndSnapshot = Result<(StepStats, Box<Snapshot>), String>;

enum Work {
    Step(RpcReplyPort<Result<StepStats, String>>),
    StepWithSnapshot(Option<Box<Snapshot>>, RpcReplyPort<StepAndSnapshot>),
    Sha(RpcReplyPort<String>),
    Canonical(RpcReplyPort<Vec<(String, Vec<f32>)>>),
    Snapshot(RpcReplyPort<Result<Snapshot, String>>),
    Restore(Box<Snapshot>, RpcReplyPort<Result<(), String>>),
}

/// Start arguments: which rank, the job's config, and (in a job of several ranks) the rank's
/// fabric endpoint.
#[derive(Debug, Clone)]
pub struct RankArgs {
    pub rank: usize,
    pub config: Arc<Config>,
    pub fabric: Option<Arc<dyn Fabric>>,
    /// Failures to inject (tests of recovery).
    pub faults: Option<Arc<FaultPlan>>,
}

/// The rank actor (its state is the channel to its compute thread).
#[derive(Debug, Default)]
pub struct RankActor;

/// The rank's compute thread handle.
pub struct RankState {
    rank: usize,
    work: mpsc::Sender<Work>,
}

impl Actor for RankActor {
    type Msg = RankMsg;
    type State = RankState;
    type Arguments = RankArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<RankMsg>,
        args: RankArgs,
    ) -> Result<RankState, ActorProcessingErr> {
        let (work, rx) = mpsc::channel::<Work>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let config = Arc::clone(&args.config);
        let (rank, fabric) = (args.rank, args.fabric.clone());
        let faults = args.faults.clone();
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name(format!("rank-{}-compute", args.rank))
            .spawn(move || {
                let trainer = match fabric {
                    None => Trainer::new(&config),
                    Some(f) => crate::pipeline::new_rank(&config, rank, f, rt),
                };
                compute_loop(trainer, rx, ready_tx, Injector { rank, faults })
            })?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(RankState {
                rank: args.rank,
                work,
            }),
            Ok(Err(why)) => Err(format!("rank {} could not start: {why}", args.rank).into()),
            Err(_) => Err(format!("rank {} compute thread died while starting", args.rank).into()),
        }
    }

    async fn handle(
        &self,
        _me: ActorRef<RankMsg>,
        msg: RankMsg,
        st: &mut RankState,
    ) -> Result<(), ActorProcessingErr> {
        let work = match msg {
            RankMsg::Step(reply) => Work::Step(reply),
            RankMsg::ParamsSha256(reply) => Work::Sha(reply),
            RankMsg::CanonicalParams(reply) => Work::Canonical(reply),
            RankMsg::Snapshot(reply) => Work::Snapshot(reply),
            RankMsg::StepWithSnapshot(reuse, reply) => Work::StepWithSnapshot(reuse, reply),
            RankMsg::Restore(snap, reply) => Work::Restore(snap, reply),
        };
        st.work
            .send(work)
            .map_err(|_| format!("rank {}: compute thread is gone", st.rank).into())
    }
}

/// A rank's view of the job's [`FaultPlan`].
struct Injector {
    rank: usize,
    faults: Option<Arc<FaultPlan>>,
}

impl Injector {
    /// Why the step `trainer` is about to take must fail, if a fault is planned for it.
    fn fails(&self, trainer: &Trainer) -> Option<String> {
        let step = trainer.steps_done();
        let f = self.faults.as_ref()?.fire(self.rank, step)?;
        Some(format!(
            "injected failure at step {step}{}",
            if f.lose_memory { " (memory lost)" } else { "" }
        ))
    }
}

fn compute_loop(
    trainer: Result<Trainer, crate::error::JobError>,
    rx: mpsc::Receiver<Work>,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
    injector: Injector,
) {
    let mut trainer = match trainer {
        Ok(t) => {
            let _ = ready.send(Ok(()));
            t
        }
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    // Ends when the actor stops (its sender is dropped).
    while let Ok(w) = rx.recv() {
        match w {
            Work::Step(reply) => {
                let r = match injector.fails(&trainer) {
                    Some(why) => Err(why),
                    None => trainer.step().map_err(|e| e.to_string()),
                };
                let _ = reply.send(r);
            }
            Work::StepWithSnapshot(_, reply) if let Some(why) = injector.fails(&trainer) => {
                let _ = reply.send(Err(why));
            }
            Work::StepWithSnapshot(reuse, reply) => {
                let r = trainer.step_with_snapshot(reuse.map(|b| *b));
                let _ = reply.send(
                    r.map(|(s, snap)| (s, Box::new(snap)))
                        .map_err(|e| e.to_string()),
                );
            }
            Work::Sha(reply) => {
                let _ = reply.send(trainer.params_sha256());
            }
            Work::Canonical(reply) => {
                let _ = reply.send(trainer.canonical_params());
            }
            Work::Snapshot(reply) => {
                let _ = reply.send(trainer.snapshot().map_err(|e| e.to_string()));
            }
            Work::Restore(snap, reply) => {
                let _ = reply.send(trainer.restore(&snap).map_err(|e| e.to_string()));
            }
        }
    }
}

//! The controller's stand-in for a rank actor that lives in a rank process: an actor that takes
//! the same [`RankMsg`]s as the rank actor (so the job driver, its roll-backs and checkpoints
//! run unchanged), sends each question over the rank process's control link, and answers the
//! reply port when the rank's answer comes back.
//!
//! The link behind it changes: a rank process that is restarted dials in again and is attached
//! anew; while none is attached, or when the process exits or its link drops, every question in
//! flight is answered at once with the reason, so the driver never waits on a dead process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use flotilla_ckpt::Snapshot;
use flotilla_ckpt::format::{decode_shard, encode_shard};
use flotilla_runtime::control::ControlTx;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::msg::{Reply, Request, ToRank, decode_tensors};
use crate::rank::{NamedValues, RankMsg};
use crate::store::StepStats;
use crate::stream::Span;

type Port<T> = RpcReplyPort<Result<T, String>>;

/// A question in flight, with the port its answer goes to.
enum Pending {
    Step(Port<StepStats>),
    Snapshot(Port<Snapshot>),
    Restore(Port<()>),
    Params(Port<NamedValues>),
    Trace(Port<Vec<Span>>),
}

impl Pending {
    fn fail(self, why: String) {
        // A port whose asker is gone takes nothing: there is nobody to tell.
        match self {
            Pending::Step(p) => drop(p.send(Err(why))),
            Pending::Snapshot(p) => drop(p.send(Err(why))),
            Pending::Restore(p) => drop(p.send(Err(why))),
            Pending::Params(p) => drop(p.send(Err(why))),
            Pending::Trace(p) => drop(p.send(Err(why))),
        }
    }
}

#[derive(Default)]
struct LineState {
    /// The rank process's link and its generation (bumped at every attach).
    tx: Option<(u64, ControlTx)>,
    generation: u64,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// Why there is no link, once one was lost.
    down: Option<String>,
}

/// One rank's line to its process.
pub struct RankLine {
    pub rank: usize,
    state: Mutex<LineState>,
    /// The step of the rank's last answered step (+1: 0 means none yet), for event lines.
    last_step: AtomicU64,
}

impl std::fmt::Debug for RankLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RankLine({})", self.rank)
    }
}

impl RankLine {
    pub fn new(rank: usize) -> Arc<Self> {
        Arc::new(Self {
            rank,
            state: Mutex::new(LineState {
                down: Some("the rank process has not joined yet".into()),
                ..LineState::default()
            }),
            last_step: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A (re)started rank process joined: its link is the rank's from now on. Returns the
    /// link's generation (see [`Self::detach`]).
    pub fn attach(&self, tx: ControlTx) -> u64 {
        let mut s = self.lock();
        s.generation += 1;
        let generation = s.generation;
        if let Some((_, old)) = s.tx.replace((generation, tx)) {
            old.close("replaced by a newer process of this rank");
        }
        s.down = None;
        s.generation
    }

    /// The rank process is gone (`generation`: only if it is still the attached one; `None`:
    /// whichever is): every question in flight is answered with `why`.
    pub fn detach(&self, generation: Option<u64>, why: &str) -> bool {
        let failed: Vec<Pending> = {
            let mut s = self.lock();
            match (&s.tx, generation) {
                (Some((g, _)), Some(want)) if *g != want => return false,
                (None, _) if s.down.is_some() => return false,
                _ => {}
            }
            if let Some((_, tx)) = s.tx.take() {
                tx.close(why);
            }
            s.down = Some(why.to_owned());
            s.pending.drain().map(|(_, p)| p).collect()
        };
        for p in failed {
            p.fail(format!("rank {}: {why}", self.rank));
        }
        true
    }

    /// Whether a rank process is attached.
    pub fn is_up(&self) -> bool {
        self.lock().tx.is_some()
    }

    /// The attached link, if any.
    pub fn tx(&self) -> Option<ControlTx> {
        self.lock().tx.as_ref().map(|(_, t)| t.clone())
    }

    /// The step the rank works on (its last answered step + 1).
    pub fn step(&self) -> u64 {
        self.last_step.load(Ordering::Relaxed)
    }

    /// The answer to question `id` arrived (with its blob).
    pub fn deliver(&self, id: u64, reply: Reply, blob: Vec<u8>) {
        let Some(p) = self.lock().pending.remove(&id) else {
            // A question already failed (its process was declared gone): nobody waits.
            return;
        };
        let r = self.rank;
        let bad = |what: &str| format!("rank {r} answered a {what} question with another answer");
        match (p, reply) {
            (Pending::Step(port), Reply::Step(a)) => {
                if let Ok(st) = &a {
                    self.last_step.store(st.step + 1, Ordering::Relaxed);
                }
                let _ = port.send(a);
            }
            (Pending::Snapshot(port), Reply::Snapshot(a)) => {
                let _ = port.send(a.and_then(|()| {
                    decode_shard(&blob).map_err(|e| format!("rank {r}'s snapshot: {e}"))
                }));
            }
            (Pending::Restore(port), Reply::Restore(a)) => {
                let _ = port.send(a);
            }
            (Pending::Params(port), Reply::Params(a)) => {
                let _ = port.send(a.and_then(|()| {
                    decode_tensors(&blob).map_err(|e| format!("rank {r}'s parameters: {e}"))
                }));
            }
            (Pending::Trace(port), Reply::Trace(a)) => {
                let _ = port.send(a.map(|v| v.into_iter().map(|s| s.into_span()).collect()));
            }
            (p @ Pending::Step(_), _) => p.fail(bad("step")),
            (p @ Pending::Snapshot(_), _) => p.fail(bad("snapshot")),
            (p @ Pending::Restore(_), _) => p.fail(bad("restore")),
            (p @ Pending::Params(_), _) => p.fail(bad("parameters")),
            (p @ Pending::Trace(_), _) => p.fail(bad("trace")),
        }
    }

    /// Send a question; its answer (or the reason there will be none) goes to its port.
    async fn ask(&self, request: Request, blob: Vec<u8>, pending: Pending) {
        let (id, tx) = {
            let mut s = self.lock();
            let Some((_, tx)) = s.tx.clone() else {
                let why = s.down.clone().unwrap_or_default();
                drop(s);
                pending.fail(format!("rank {}: {why}", self.rank));
                return;
            };
            s.next_id += 1;
            let id = s.next_id;
            s.pending.insert(id, pending);
            (id, tx)
        };
        if let Err(e) = tx.send(&ToRank::Request { id, request }, &blob).await
            && let Some(p) = self.lock().pending.remove(&id)
        {
            p.fail(format!("rank {}: {e}", self.rank));
        }
    }
}

/// The stand-in actor.
#[derive(Debug, Default)]
pub struct RemoteRank;

impl Actor for RemoteRank {
    type Msg = RankMsg;
    type State = Arc<RankLine>;
    type Arguments = Arc<RankLine>;

    async fn pre_start(
        &self,
        _me: ActorRef<RankMsg>,
        line: Arc<RankLine>,
    ) -> Result<Arc<RankLine>, ActorProcessingErr> {
        Ok(line)
    }

    async fn handle(
        &self,
        _me: ActorRef<RankMsg>,
        msg: RankMsg,
        line: &mut Arc<RankLine>,
    ) -> Result<(), ActorProcessingErr> {
        // Each question is sent from a task of its own, so a slow link never holds the others.
        let line = Arc::clone(line);
        match msg {
            RankMsg::Step(attempt, port) => {
                tokio::spawn(async move {
                    line.ask(Request::Step { attempt }, Vec::new(), Pending::Step(port))
                        .await;
                });
            }
            RankMsg::Snapshot(port) => {
                tokio::spawn(async move {
                    line.ask(Request::Snapshot, Vec::new(), Pending::Snapshot(port))
                        .await;
                });
            }
            RankMsg::Restore(snap, attempt, port) => {
                tokio::spawn(async move {
                    match encode_shard(&snap) {
                        Ok(blob) => {
                            line.ask(Request::Restore { attempt }, blob, Pending::Restore(port))
                                .await
                        }
                        Err(e) => {
                            let _ = port.send(Err(format!("encoding the snapshot: {e}")));
                        }
                    }
                });
            }
            RankMsg::CanonicalParams(port) => {
                tokio::spawn(async move {
                    line.ask(Request::CanonicalParams, Vec::new(), Pending::Params(port))
                        .await;
                });
            }
            RankMsg::Trace(port) => {
                tokio::spawn(async move {
                    line.ask(Request::Trace, Vec::new(), Pending::Trace(port))
                        .await;
                });
            }
            // Told by the rank's own children in its process; nothing to do here.
            RankMsg::Restarted(_) | RankMsg::Failure(_) | RankMsg::StepEnded(..) => {}
        }
        Ok(())
    }
}

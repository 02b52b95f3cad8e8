//! A rank process: one rank of a multi-process job, started and supervised by its node agent.
//!
//! It dials the controller, says who it is, and then does what the controller asks, attempt by
//! attempt: bind a fresh QUIC fabric endpoint (`Prepare`), join the mesh of every rank's
//! endpoints and start the rank's subtree, the same [`RankTree`] that `flotilla train` runs in
//! one process (`Peers`), and answer the rank actor's questions (`Request`). A roll-back is a
//! new attempt: the subtree and the fabric of the old one are stopped and built afresh, and the
//! controller then restores the rank's state. Supervision events of the subtree go to the
//! controller for `events.jsonl`. The process exits when the controller says `Stop` or its link
//! is lost (its agent then decides whether to start it again).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_ckpt::format::{decode_shard, encode_shard};
use flotilla_runtime::clock::{Clock, RealClock};
use flotilla_runtime::config::Config;
use flotilla_runtime::control::{self, ControlTx, keys};
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::quic::{QuicFabric, QuicOptions, RankIdentity, tls};
use flotilla_runtime::supervision::{
    Strategy, Supervisor, SupervisorHandle, SupervisorPolicy, event_channel,
};
use ractor::RpcReplyPort;

use super::msg::{Hello, Reply, Request, ToRank, Up, WireSpan, encode_tensors};
use crate::error::JobError;
use crate::links::RankLinks;
use crate::pipeline::{ModelShape, Placement, placement};
use crate::rank::RankMsg;
use crate::rank_tree::RankTree;

/// How a rank process is started (by its agent, `flotilla rank`).
#[derive(Debug, Clone)]
pub struct RankProcessArgs {
    pub config: Config,
    pub job_dir: PathBuf,
    pub controller: SocketAddr,
    pub rank: usize,
    pub agent: usize,
    /// Failures to inject (the debug knob of `flotilla rank`, for tests).
    pub faults: Option<Arc<crate::faults::FaultPlan>>,
}

/// The rank's subtree of one attempt, and the fabric under it.
struct Attempt {
    attempt: u64,
    fabric: Arc<QuicFabric>,
    tree: Option<(
        SupervisorHandle,
        tokio::task::JoinHandle<()>,
        Arc<RankLinks>,
    )>,
}

/// What the rank process keeps for the whole run.
struct Process {
    a: RankProcessArgs,
    cfg: Arc<Config>,
    placement: Arc<Placement>,
    shape: Arc<ModelShape>,
    dataset: Arc<flotilla_model::data::TokenDataset>,
    fabric_id: RankIdentity,
    tx: ControlTx,
    now: Option<Attempt>,
}

fn err(why: impl std::fmt::Display) -> JobError {
    JobError::Processes(why.to_string())
}

/// Run a rank process until the controller says stop (`Ok`) or the link is lost (an error).
pub async fn run(a: RankProcessArgs) -> Result<(), JobError> {
    let cfg = Arc::new(a.config.clone());
    let ca = keys::load_ca(&a.job_dir).map_err(err)?;
    let control_id = ca.issue_named(&tls::rank_name(a.rank)).map_err(err)?;
    let fabric_id = ca.issue(a.rank).map_err(err)?;
    let idle = cfg.supervision.peer_timeout().max(Duration::from_secs(5));
    let link = control::connect(a.controller, &control_id, idle, Duration::from_secs(30))
        .await
        .map_err(err)?;
    let (tx, mut rx, endpoint) = link.split();
    let hello = Up::Hello(Hello::Rank {
        rank: a.rank,
        agent: a.agent,
        pid: std::process::id(),
        config_hash: cfg.hash_hex(),
    });
    tx.send(&hello, &[]).await.map_err(err)?;
    let placement = Arc::new(placement(&cfg)?);
    let shape = Arc::new(ModelShape::of(&cfg, &placement)?);
    let dataset = Arc::new(crate::store::load_dataset(&cfg)?);
    let mut p = Process {
        a,
        cfg,
        placement,
        shape,
        dataset,
        fabric_id,
        tx,
        now: None,
    };
    let result = loop {
        let msg = match rx.recv::<ToRank>().await {
            Ok(Some((m, blob))) => (m, blob),
            Ok(None) => break Err(err("the controller closed the link")),
            Err(e) => break Err(err(e)),
        };
        match msg {
            (ToRank::Stop, _) => break Ok(()),
            (ToRank::Prepare { attempt }, _) => {
                let up = match p.prepare(attempt).await {
                    Ok(port) => Up::Bound { attempt, port },
                    Err(why) => Up::NotReady { attempt, why },
                };
                if let Err(e) = p.tx.send(&up, &[]).await {
                    break Err(err(e));
                }
            }
            (ToRank::Peers { attempt, addrs }, _) => {
                let up = match p.join(attempt, &addrs).await {
                    Ok(()) => Up::Ready { attempt },
                    Err(why) => Up::NotReady { attempt, why },
                };
                if let Err(e) = p.tx.send(&up, &[]).await {
                    break Err(err(e));
                }
            }
            (ToRank::PeerFailed { attempt, rank, why }, _) => {
                if let Some(now) = p.now.as_ref().filter(|n| n.attempt == attempt)
                    && rank != p.a.rank
                {
                    now.fabric.fail_peer(rank, why);
                }
            }
            (ToRank::Request { id, request }, blob) => p.request(id, request, blob),
        }
    };
    p.stop_attempt(result.is_ok()).await;
    p.tx.finish(Duration::from_secs(1)).await;
    p.tx.close("the rank process stopped");
    if let Some(ep) = endpoint {
        let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
    }
    result
}

impl Process {
    /// Stop the subtree and fabric of the attempt before, then bind a fresh endpoint.
    async fn prepare(&mut self, attempt: u64) -> Result<u16, String> {
        self.stop_attempt(false).await;
        let opts = QuicOptions {
            connect_timeout: self.cfg.supervision.peer_timeout(),
            ..QuicOptions::default()
        };
        let listen = SocketAddr::from(([0, 0, 0, 0], 0));
        let world = self.cfg.world_size();
        let fabric = QuicFabric::bind_with_identity(self.fabric_id.clone(), world, listen, opts)
            .await
            .map_err(|e| e.to_string())?;
        let port = fabric.local_addr().map_err(|e| e.to_string())?.port();
        self.now = Some(Attempt {
            attempt,
            fabric: Arc::new(fabric),
            tree: None,
        });
        Ok(port)
    }

    /// Join the mesh of `attempt` and start the rank's subtree on it.
    async fn join(&mut self, attempt: u64, addrs: &[String]) -> Result<(), String> {
        let Some(now) = self.now.as_mut().filter(|n| n.attempt == attempt) else {
            return Err(format!(
                "peers for attempt {attempt}, which was not prepared"
            ));
        };
        let addrs = addrs
            .iter()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|e| format!("peer address {a:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        now.fabric
            .connect_all(&addrs)
            .await
            .map_err(|e| format!("joining the mesh of attempt {attempt}: {e}"))?;
        let clock: Arc<dyn Clock> = Arc::new(RealClock);
        let tree = RankTree {
            rank: self.a.rank,
            config: Arc::clone(&self.cfg),
            placement: Arc::clone(&self.placement),
            shape: Arc::clone(&self.shape),
            dataset: Arc::clone(&self.dataset),
            fabric: Arc::clone(&now.fabric) as Arc<dyn Fabric>,
            clock: Arc::clone(&clock),
            faults: self.a.faults.clone(),
            window: 3 * self.cfg.parallel.sub_batches.max(1),
            on_device_thread: None,
        };
        let (events_tx, mut events_rx) = event_channel();
        let (child, links) = tree.spec(events_tx.clone()).map_err(|e| e.to_string())?;
        let spec = SupervisorPolicy::from_supervision(&self.cfg.supervision)
            .and_then(|p| p.with_strategy(Strategy::OneForAll).spec())
            .map_err(|e| e.to_string())?
            .child(child)
            .observer(events_tx)
            .with_label(format!("rank-process-{}", self.a.rank));
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while let Some(e) = events_rx.recv().await {
                let up = Up::Event {
                    supervisor: e.supervisor,
                    child: e.child,
                    event: format!("{:?}", e.event),
                };
                if tx.send(&up, &[]).await.is_err() {
                    break;
                }
            }
        });
        let (sup, join) = Supervisor::spawn(None, spec, None)
            .await
            .map_err(|e| e.to_string())?;
        now.tree = Some((sup, join, links));
        Ok(())
    }

    /// Stop the current attempt's subtree and its fabric: at the job's end, let the last
    /// sends land first (`graceful`); at a roll-back, close it at once.
    async fn stop_attempt(&mut self, graceful: bool) {
        let Some(now) = self.now.take() else {
            return;
        };
        if !graceful {
            now.fabric.close();
        }
        if let Some((sup, join, _)) = now.tree {
            let t = Duration::from_millis(self.cfg.supervision.shutdown_timeout_ms.max(1));
            let _ = sup.stop(t).await;
            let _ = join.await;
        }
        if graceful {
            now.fabric.shutdown().await;
        }
    }

    /// Ask the rank actor, in a task of its own, and send its answer back.
    fn request(&self, id: u64, request: Request, blob: Vec<u8>) {
        let actor = self
            .now
            .as_ref()
            .and_then(|n| n.tree.as_ref())
            .and_then(|(_, _, links)| links.rank_actor());
        let tx = self.tx.clone();
        let rank = self.a.rank;
        tokio::spawn(async move {
            let (reply, blob) = match actor {
                None => (
                    refuse(&request, "the rank's actors are not running"),
                    Vec::new(),
                ),
                Some(actor) => ask(actor, request, blob).await,
            };
            if let Err(e) = tx.send(&Up::Reply { id, reply }, &blob).await {
                tracing::warn!(rank, "cannot answer the controller: {e}");
            }
        });
    }
}

/// The answer "no" of the kind `request` expects.
fn refuse(request: &Request, why: &str) -> Reply {
    let why = why.to_owned();
    match request {
        Request::Step { .. } => Reply::Step(Err(why)),
        Request::Snapshot => Reply::Snapshot(Err(why)),
        Request::Restore { .. } => Reply::Restore(Err(why)),
        Request::CanonicalParams => Reply::Params(Err(why)),
        Request::Trace => Reply::Trace(Err(why)),
    }
}

/// Put `msg`'s question to the rank actor and wait for its answer.
async fn call<T: Send + 'static>(
    actor: &ractor::ActorRef<RankMsg>,
    msg: impl FnOnce(RpcReplyPort<Result<T, String>>) -> RankMsg,
) -> Result<T, String> {
    let (reply, answer) = ractor::concurrency::oneshot();
    actor
        .cast(msg(reply.into()))
        .map_err(|e| format!("the rank actor: {e}"))?;
    answer
        .await
        .map_err(|_| "the rank actor stopped without answering".to_owned())?
}

/// The rank actor's answer to `request`, and the blob that goes with it.
async fn ask(
    actor: ractor::ActorRef<RankMsg>,
    request: Request,
    blob: Vec<u8>,
) -> (Reply, Vec<u8>) {
    match request {
        Request::Step { attempt } => {
            let a = call(&actor, |r| RankMsg::Step(attempt, r)).await;
            (Reply::Step(a), Vec::new())
        }
        Request::Snapshot => match call(&actor, RankMsg::Snapshot).await {
            Ok(s) => match encode_shard(&s) {
                Ok(b) => (Reply::Snapshot(Ok(())), b),
                Err(e) => (
                    Reply::Snapshot(Err(format!("encoding the snapshot: {e}"))),
                    Vec::new(),
                ),
            },
            Err(e) => (Reply::Snapshot(Err(e)), Vec::new()),
        },
        Request::Restore { attempt } => {
            let a = match decode_shard(&blob) {
                Ok(s) => call(&actor, |r| RankMsg::Restore(Box::new(s), attempt, r)).await,
                Err(e) => Err(format!("the snapshot to restore: {e}")),
            };
            (Reply::Restore(a), Vec::new())
        }
        Request::CanonicalParams => match call(&actor, RankMsg::CanonicalParams).await {
            Ok(t) => (Reply::Params(Ok(())), encode_tensors(&t)),
            Err(e) => (Reply::Params(Err(e)), Vec::new()),
        },
        Request::Trace => {
            let a = call(&actor, RankMsg::Trace).await;
            (
                Reply::Trace(a.map(|v| v.iter().map(WireSpan::from).collect())),
                Vec::new(),
            )
        }
    }
}

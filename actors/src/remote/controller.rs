//! The controller of a multi-process job (TRANSOM's TOL): it listens on the control plane,
//! takes in the node agents and their rank processes, keeps `agents.json` current, notices
//! failures (a rank process's exit, told by its agent at once; an agent's exit or missed
//! heartbeats; a lost link), evicts a lost host and hands its ranks to a spare agent, and
//! forms the ranks' QUIC mesh for every attempt. It is the [`Fleet`] of the job driver, whose
//! rank actors are [`RemoteRank`] stand-ins: the driver's steps, checkpoints and roll-backs are
//! the same as in one process.
//!
//! Every detection and action is a line in `events.jsonl` (`kind`, rank or host, step,
//! reason, action, and the time since the job started) and a Prometheus counter.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flotilla_runtime::config::Config;
use flotilla_runtime::control::{self, ControlLink, ControlListener, ControlTx, keys};
use flotilla_runtime::fabric::quic::tls;
use flotilla_runtime::metrics as names;
use serde::Serialize;
use tokio::sync::watch;

use super::msg::{Hello, ToAgent, ToRank, Up};
use super::proxy::{RankLine, RemoteRank};
use crate::error::JobError;
use crate::links::RankLinks;
use crate::ranks::Fleet;
use crate::run_log::RunLog;

/// A node agent as the controller knows it.
pub(super) struct AgentEntry {
    pub(super) pid: u32,
    pub(super) hostname: String,
    /// The host whose ranks it runs; `None`: a spare.
    pub(super) host: Option<usize>,
    pub(super) tx: ControlTx,
    pub(super) last_seen: Instant,
    pub(super) generation: u64,
}

/// A rank process as the controller knows it.
pub(super) struct RankEntry {
    pub(super) pid: u32,
    pub(super) agent: usize,
    /// The address its link comes from: where its fabric endpoint is reached.
    pub(super) ip: IpAddr,
    pub(super) generation: u64,
    pub(super) bound: Option<(u64, u16)>,
    pub(super) ready: Option<u64>,
    pub(super) not_ready: Option<(u64, String)>,
}

#[derive(Default)]
pub(super) struct Registry {
    pub(super) agents: BTreeMap<usize, AgentEntry>,
    /// Host → the agent running it.
    pub(super) hosts: Vec<Option<usize>>,
    pub(super) ranks: Vec<Option<RankEntry>>,
    pub(super) next_generation: u64,
    /// Hosts whose agent was lost: a spare may take them (at the start, a host waits for its
    /// own agent).
    pub(super) lost_hosts: std::collections::BTreeSet<usize>,
}

/// A line of `events.jsonl` about a process: what was detected or done.
#[derive(Debug, Serialize)]
struct OpsEvent<'a> {
    /// Seconds since the controller started.
    t: f64,
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    rank: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<usize>,
    /// The step in flight.
    step: u64,
    reason: &'a str,
    action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_s: Option<f64>,
}

/// What the controller's tasks share.
pub(crate) struct Shared {
    pub(super) cfg: Arc<Config>,
    pub(super) lines: Vec<Arc<RankLine>>,
    pub(super) reg: Mutex<Registry>,
    pub(super) changed: watch::Sender<u64>,
    pub(super) log: RunLog,
    pub(super) job_dir: PathBuf,
    pub(super) addr: SocketAddr,
    pub(super) started: Instant,
    pub(super) attempt: AtomicU64,
    /// When the last failure was detected (for the rejoin time).
    pub(super) failed_at: Mutex<Option<Instant>>,
    /// The job is over: processes that leave now are not failures.
    pub(super) over: std::sync::atomic::AtomicBool,
    /// Ranks whose host was lost since the roll-back before: their own copies went with it.
    pub(super) lost: Mutex<Vec<usize>>,
}

/// The controller: its listener and the state its tasks share.
pub struct Controller {
    shared: Arc<Shared>,
    listener: Arc<ControlListener>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn err(why: impl std::fmt::Display) -> JobError {
    JobError::Processes(why.to_string())
}

impl Controller {
    /// Listen on `listen` with the CA of `job_dir` and start taking agents and rank processes.
    pub fn start(
        cfg: Arc<Config>,
        job_dir: PathBuf,
        listen: SocketAddr,
        log: RunLog,
    ) -> Result<Controller, JobError> {
        let ca = keys::load_ca(&job_dir).map_err(err)?;
        let id = ca.issue_named(control::CONTROLLER_NAME).map_err(err)?;
        let listener = ControlListener::bind(listen, &id, link_idle(&cfg)).map_err(err)?;
        let addr = listener.local_addr().map_err(err)?;
        let world = cfg.world_size();
        let shared = Arc::new(Shared {
            lines: (0..world).map(RankLine::new).collect(),
            reg: Mutex::new(Registry {
                hosts: vec![None; cfg.cluster.hosts],
                ranks: (0..world).map(|_| None).collect(),
                ..Registry::default()
            }),
            changed: watch::Sender::new(0),
            log,
            job_dir,
            addr,
            started: Instant::now(),
            attempt: AtomicU64::new(0),
            failed_at: Mutex::new(None),
            over: std::sync::atomic::AtomicBool::new(false),
            lost: Mutex::new(Vec::new()),
            cfg,
        });
        let listener = Arc::new(listener);
        let (l, sh) = (Arc::clone(&listener), Arc::clone(&shared));
        let accept = tokio::spawn(async move {
            while let Some(link) = l.accept().await {
                match link {
                    Ok(link) => {
                        tokio::spawn(Arc::clone(&sh).serve(link));
                    }
                    Err(e) => tracing::warn!("controller: refused a peer: {e}"),
                }
            }
        });
        let monitor = tokio::spawn(Arc::clone(&shared).watch_heartbeats());
        Ok(Controller {
            shared,
            listener,
            tasks: vec![accept, monitor],
        })
    }

    /// The address agents dial.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Wait until every rank process has joined and form the mesh of attempt 0.
    pub async fn first_mesh(&self) -> Result<(), JobError> {
        self.shared.mesh(0).await
    }

    /// The job driver's view of the ranks: links whose rank actors are stand-ins, and the
    /// controller as their fleet.
    pub async fn remote_ranks(&self) -> Result<crate::job::RemoteRanks, JobError> {
        let mut links = Vec::new();
        for line in &self.shared.lines {
            let (actor, _) = ractor::Actor::spawn(None, RemoteRank, Arc::clone(line))
                .await
                .map_err(|e| err(format!("the stand-in of rank {}: {e}", line.rank)))?;
            let l = Arc::new(RankLinks::new(line.rank));
            l.set_rank_actor(actor);
            links.push(l);
        }
        Ok((links, Arc::clone(&self.shared) as Arc<dyn Fleet>))
    }

    /// A handle for the launcher, which sees its agent processes exit.
    pub fn handle(&self) -> ControllerHandle {
        ControllerHandle(Arc::clone(&self.shared))
    }

    /// The job is over: tell every rank process and agent to stop, and close the listener.
    pub async fn finish(self) {
        self.shared.over.store(true, Ordering::SeqCst);
        let (ranks, agents) = {
            let reg = self.shared.lock();
            let ranks: Vec<_> = self.shared.lines.iter().filter_map(|l| l.tx()).collect();
            let agents: Vec<_> = reg.agents.values().map(|a| a.tx.clone()).collect();
            (ranks, agents)
        };
        for tx in ranks {
            let _ = tx.send(&ToRank::Stop, &[]).await;
        }
        for tx in &agents {
            let _ = tx.send(&ToAgent::Stop, &[]).await;
        }
        // Each agent closes its link once it has stopped its rank processes.
        let closed = async {
            for tx in &agents {
                tx.closed().await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), closed)
            .await
            .is_err()
        {
            tracing::warn!("some agents did not close their links within 2 s of the stop");
        }
        self.listener.close();
        for t in self.tasks {
            t.abort();
        }
    }
}

/// The certificate name of agent `index`.
pub fn agent_name(index: usize) -> String {
    format!("agent-{index}.flotilla")
}

/// What the launcher of the agents tells the controller.
#[derive(Clone)]
pub struct ControllerHandle(Arc<Shared>);

impl ControllerHandle {
    /// A node agent started by this process exited (`flotilla launch` sees it at once).
    pub fn agent_exited(&self, index: usize, pid: u32, status: &str) {
        let why = format!("agent {index} (pid {pid}) exited: {status}");
        self.0.agent_lost(index, Some(pid), "agent_exit", &why);
    }
}

/// A control link silent this long is dropped.
fn link_idle(cfg: &Config) -> Duration {
    (heartbeat(cfg) * 4).max(Duration::from_secs(5))
}

/// The agents' heartbeat period (`supervision.heartbeat_ms`, default 1 s).
pub fn heartbeat(cfg: &Config) -> Duration {
    Duration::from_millis(cfg.supervision.heartbeat_ms.unwrap_or(1000).max(1))
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// The step in flight (for event lines).
    pub(super) fn step(&self) -> u64 {
        self.lines.iter().map(|l| l.step()).max().unwrap_or(0)
    }

    pub(super) fn host_of(&self, rank: usize) -> usize {
        rank / self.cfg.cluster.ranks_per_host.max(1)
    }

    pub(super) fn ranks_of(&self, host: usize) -> Vec<usize> {
        let per = self.cfg.cluster.ranks_per_host.max(1);
        (host * per..(host + 1) * per).collect()
    }

    /// Write an event line (in the background: callers may hold no lock across it).
    pub(super) fn event(
        &self,
        kind: &str,
        rank: Option<usize>,
        host: Option<usize>,
        reason: &str,
        action: &str,
    ) {
        self.event_d(kind, rank, host, reason, action, None);
    }

    pub(super) fn event_d(
        &self,
        kind: &str,
        rank: Option<usize>,
        host: Option<usize>,
        reason: &str,
        action: &str,
        duration_s: Option<f64>,
    ) {
        let line = OpsEvent {
            t: self.started.elapsed().as_secs_f64(),
            kind,
            rank,
            host,
            step: self.step(),
            reason,
            action,
            duration_s,
        };
        let Ok(value) = serde_json::to_value(&line) else {
            return;
        };
        let log = self.log.clone();
        tokio::spawn(async move {
            if let Err(e) = log.event(&value).await {
                tracing::warn!("cannot write events.jsonl: {e}");
            }
        });
    }

    pub(super) fn failed_now(&self) {
        let mut f = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert_with(Instant::now);
    }

    /// Serve one new link: its hello says whether it is an agent or a rank process.
    async fn serve(self: Arc<Self>, link: ControlLink) {
        let remote = link.remote();
        let ip = remote.ip();
        let (tx, mut rx, _) = link.split();
        let hello = tokio::time::timeout(Duration::from_secs(10), rx.recv::<Up>()).await;
        let hello = match hello {
            Ok(Ok(Some((Up::Hello(h), _)))) => h,
            Ok(Ok(Some((other, _)))) => {
                return refuse(&tx, remote, &format!("{other:?} before a hello"));
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => return refuse(&tx, remote, &e.to_string()),
            Err(_) => return refuse(&tx, remote, "no hello within 10 s"),
        };
        let hash = self.cfg.hash_hex();
        match hello {
            Hello::Agent { config_hash, .. } | Hello::Rank { config_hash, .. }
                if config_hash != hash =>
            {
                refuse(
                    &tx,
                    remote,
                    &format!("its config (hash {config_hash}) is not the job's ({hash})"),
                )
            }
            Hello::Agent { index, .. }
                if index >= self.agent_slots() || !tx.peer_is(&agent_name(index)) =>
            {
                refuse(
                    &tx,
                    remote,
                    &format!("claims agent {index} without its certificate"),
                )
            }
            Hello::Rank { rank, .. }
                if rank >= self.lines.len() || !tx.peer_is(&tls::rank_name(rank)) =>
            {
                refuse(
                    &tx,
                    remote,
                    &format!("claims rank {rank} without its certificate"),
                )
            }
            Hello::Agent {
                index,
                pid,
                hostname,
                ..
            } => {
                self.serve_agent(index, pid, hostname, tx, rx).await;
            }
            Hello::Rank {
                rank, agent, pid, ..
            } => self.serve_rank(rank, agent, pid, ip, tx, rx).await,
        }
    }

    pub(super) fn agent_slots(&self) -> usize {
        self.cfg.cluster.hosts + self.cfg.cluster.spares
    }

    async fn serve_rank(
        self: Arc<Self>,
        rank: usize,
        agent: usize,
        pid: u32,
        ip: IpAddr,
        tx: ControlTx,
        mut rx: control::ControlRx,
    ) {
        let host = self.host_of(rank);
        let runs = self.lock().hosts.get(host).copied().flatten();
        if runs != Some(agent) {
            return refuse(
                &tx,
                rx.remote(),
                &format!("rank {rank} from agent {agent}, but host {host} is run by {runs:?}"),
            );
        }
        let generation = self.lines[rank].attach(tx);
        self.lock().ranks[rank] = Some(RankEntry {
            pid,
            agent,
            ip,
            generation,
            bound: None,
            ready: None,
            not_ready: None,
        });
        self.write_agents_json();
        self.bump();
        let why = loop {
            let (msg, blob) = match rx.recv::<Up>().await {
                Ok(Some(m)) => m,
                Ok(None) => break "closed its link".to_owned(),
                Err(e) => break e.to_string(),
            };
            let mut reg = self.lock();
            let Some(e) = reg.ranks[rank]
                .as_mut()
                .filter(|e| e.generation == generation)
            else {
                break "replaced by a newer process".to_owned();
            };
            match msg {
                Up::Bound { attempt, port } => e.bound = Some((attempt, port)),
                Up::Ready { attempt } => e.ready = Some(attempt),
                Up::NotReady { attempt, why } => e.not_ready = Some((attempt, why)),
                Up::Event {
                    supervisor,
                    child,
                    event,
                } => {
                    drop(reg);
                    let line = crate::run_log::EventLine {
                        supervisor,
                        child,
                        event,
                    };
                    let log = self.log.clone();
                    tokio::spawn(async move { log.event(&line).await });
                    continue;
                }
                Up::Reply { id, reply } => {
                    drop(reg);
                    self.lines[rank].deliver(id, reply, blob);
                    continue;
                }
                other => break format!("sent {other:?}, which rank processes do not send"),
            }
            drop(reg);
            self.bump();
        };
        if self.over.load(Ordering::SeqCst) {
            return;
        }
        if self.lines[rank].detach(Some(generation), &format!("its link: {why}")) {
            metrics::counter!(names::FAILURES, "kind" => "link_lost").increment(1);
            self.failed_now();
            self.broadcast_failed(rank, &why);
            self.event("link_lost", Some(rank), Some(host), &why, "roll back");
        }
        self.bump();
    }

    /// Tell every other rank process that `rank` failed, so that their waits on it end now.
    pub(super) fn broadcast_failed(&self, rank: usize, why: &str) {
        let attempt = self.attempt.load(Ordering::Relaxed);
        for (r, line) in self.lines.iter().enumerate() {
            if r == rank {
                continue;
            }
            if let Some(tx) = line.tx() {
                let msg = ToRank::PeerFailed {
                    attempt,
                    rank,
                    why: why.to_owned(),
                };
                tokio::spawn(async move {
                    let _ = tx.send(&msg, &[]).await;
                });
            }
        }
    }
}

pub(super) fn refuse(tx: &ControlTx, remote: SocketAddr, why: &str) {
    tracing::warn!("controller: refused {remote}: {why}");
    tx.close(why);
}

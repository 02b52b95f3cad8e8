//! A node agent: one per host of a multi-process job. It dials the controller, sends a
//! heartbeat every `supervision.heartbeat_ms`, starts one rank process per rank the controller
//! assigns it, and supervises them: a rank process that exits is reported to the controller at
//! once and started again after the `[supervision]` back-off (the controller rolls the job back
//! and restores the rank). A spare agent waits with no ranks until the controller hands it a
//! lost host's. Rank processes die with their agent (Linux: the parent-death signal), so a lost
//! agent never leaves ranks behind. The agent exits when the controller says stop, or with an
//! error when its link to the controller is lost.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_runtime::config::Config;
use flotilla_runtime::control::{self, keys};
use tokio::sync::mpsc;

use super::controller::heartbeat;
use super::msg::{Hello, ToAgent, Up};
use crate::error::JobError;

/// How an agent is started.
#[derive(Debug, Clone)]
pub struct AgentArgs {
    pub config: Config,
    /// The config file, passed on to the rank processes.
    pub config_path: PathBuf,
    pub job_dir: PathBuf,
    pub controller: SocketAddr,
    /// The agent's index among the job's `hosts + spares` agents.
    pub index: usize,
    /// The `flotilla` executable that runs rank processes.
    pub exe: PathBuf,
}

/// A rank process the agent runs.
struct RankChild {
    pid: u32,
    restarts: u32,
}

/// What the agent's loop hears about.
enum Event {
    Controller(Result<Option<ToAgent>, String>),
    Exited {
        rank: usize,
        pid: u32,
        status: String,
    },
}

fn err(why: impl std::fmt::Display) -> JobError {
    JobError::Processes(why.to_string())
}

/// Run the agent until the controller says stop.
pub async fn run(a: AgentArgs) -> Result<(), JobError> {
    let dir = a.job_dir.clone();
    let ca = tokio::task::spawn_blocking(move || keys::wait_for_ca(&dir, Duration::from_secs(60)))
        .await
        .map_err(err)?
        .map_err(err)?;
    let id = ca
        .issue_named(&super::controller::agent_name(a.index))
        .map_err(err)?;
    let hb = heartbeat(&a.config);
    let idle = (hb * 4).max(Duration::from_secs(5));
    let link = control::connect(a.controller, &id, idle, Duration::from_secs(30))
        .await
        .map_err(err)?;
    let (tx, mut rx, endpoint) = link.split();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let hello = Up::Hello(Hello::Agent {
        index: a.index,
        pid: std::process::id(),
        hostname,
        config_hash: a.config.hash_hex(),
    });
    tx.send(&hello, &[]).await.map_err(err)?;
    let (ev_tx, mut events) = mpsc::unbounded_channel();
    let reader = ev_tx.clone();
    tokio::spawn(async move {
        loop {
            let m = rx
                .recv::<ToAgent>()
                .await
                .map(|m| m.map(|(m, _)| m))
                .map_err(|e| e.to_string());
            let end = !matches!(m, Ok(Some(_)));
            if reader.send(Event::Controller(m)).is_err() || end {
                break;
            }
        }
    });
    let beat = tx.clone();
    let heartbeats = tokio::spawn(async move {
        let mut tick = tokio::time::interval(hb);
        loop {
            tick.tick().await;
            if beat.send(&Up::Heartbeat, &[]).await.is_err() {
                break;
            }
        }
    });
    let mut ranks: BTreeMap<usize, RankChild> = BTreeMap::new();
    let backoff = Duration::from_millis(a.config.supervision.backoff_ms);
    let result = loop {
        let Some(ev) = events.recv().await else {
            break Err(err("the agent's event channel closed"));
        };
        match ev {
            Event::Controller(Ok(Some(ToAgent::Assign { host, ranks: rs }))) => {
                tracing::info!(agent = a.index, host, ?rs, "assigned");
                for r in rs {
                    if ranks.contains_key(&r) {
                        continue;
                    }
                    match spawn_rank(&a, r, &ev_tx) {
                        Ok(pid) => {
                            ranks.insert(r, RankChild { pid, restarts: 0 });
                            let _ = tx.send(&Up::RankStarted { rank: r, pid }, &[]).await;
                        }
                        Err(e) => break_err(&tx, r, &e).await,
                    }
                }
            }
            Event::Controller(Ok(Some(ToAgent::Kill { rank, pid }))) => {
                // Its exit is then reported and it is started again, as after any exit.
                if ranks.get(&rank).is_some_and(|c| c.pid == pid) {
                    tracing::warn!(agent = a.index, rank, pid, "killing a hung rank process");
                    kill(pid);
                }
            }
            Event::Controller(Ok(Some(ToAgent::Stop))) => break Ok(()),
            Event::Controller(Ok(None)) => break Err(err("the controller closed the link")),
            Event::Controller(Err(e)) => {
                break Err(err(format!("the link to the controller: {e}")));
            }
            Event::Exited { rank, pid, status } => {
                let Some(child) = ranks.get_mut(&rank).filter(|c| c.pid == pid) else {
                    continue;
                };
                let _ = tx
                    .send(
                        &Up::RankExited {
                            rank,
                            pid,
                            status: status.clone(),
                        },
                        &[],
                    )
                    .await;
                child.restarts += 1;
                let wait = backoff * 2u32.saturating_pow(child.restarts.min(6) - 1);
                tokio::time::sleep(
                    wait.min(Duration::from_millis(a.config.supervision.backoff_max_ms)),
                )
                .await;
                match spawn_rank(&a, rank, &ev_tx) {
                    Ok(pid) => {
                        if let Some(c) = ranks.get_mut(&rank) {
                            c.pid = pid;
                        }
                        let _ = tx.send(&Up::RankStarted { rank, pid }, &[]).await;
                    }
                    Err(e) => break_err(&tx, rank, &e).await,
                }
            }
        }
    };
    heartbeats.abort();
    for c in ranks.values() {
        kill(c.pid);
    }
    // Close the link for the controller to see (a process that just exits leaves its peer
    // waiting for the idle timeout).
    tx.close("the agent stopped");
    if let Some(ep) = endpoint {
        let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
    }
    result
}

/// Tell the controller a rank process could not be started.
async fn break_err(tx: &control::ControlTx, rank: usize, e: &JobError) {
    let status = format!("could not start: {e}");
    let _ = tx
        .send(
            &Up::RankExited {
                rank,
                pid: 0,
                status,
            },
            &[],
        )
        .await;
}

/// Start rank `rank`'s process (its stderr in `logs/rank-<r>.log` of the job directory) and a
/// thread that reports its exit.
fn spawn_rank(
    a: &AgentArgs,
    rank: usize,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<u32, JobError> {
    let args = [
        "rank".to_owned(),
        "--config".to_owned(),
        a.config_path.display().to_string(),
        "--job-dir".to_owned(),
        a.job_dir.display().to_string(),
        "--controller".to_owned(),
        a.controller.to_string(),
        "--rank".to_owned(),
        rank.to_string(),
        "--agent".to_owned(),
        a.index.to_string(),
    ];
    let child = spawn_flotilla(&a.exe, &a.job_dir, &format!("rank-{rank}.log"), &args)
        .map_err(|e| err(format!("starting rank {rank}: {e}")))?;
    let pid = child.id();
    watch(child, rank, events.clone());
    Ok(pid)
}

/// Start `exe` with `args`, dying with this process, its stderr appended to `logs/<log>` of
/// the job directory.
pub(super) fn spawn_flotilla(
    exe: &Path,
    job_dir: &Path,
    log: &str,
    args: &[String],
) -> Result<Child, String> {
    let logs = job_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let path = logs.join(log);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    die_with_parent(&mut cmd);
    cmd.spawn().map_err(|e| format!("{}: {e}", exe.display()))
}

/// A thread that waits for `child` and reports how it ended.
fn watch(mut child: Child, rank: usize, events: mpsc::UnboundedSender<Event>) {
    let pid = child.id();
    std::thread::spawn(move || {
        let status = match child.wait() {
            Ok(s) => describe(s),
            Err(e) => format!("cannot wait for it: {e}"),
        };
        let _ = events.send(Event::Exited { rank, pid, status });
    });
}

/// An exit status in words ("exit code 1", "killed by signal 9").
pub fn describe(s: std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = s.signal() {
            return format!("killed by signal {sig}");
        }
    }
    match s.code() {
        Some(c) => format!("exit code {c}"),
        None => "ended".to_owned(),
    }
}

/// Have the child killed when this process dies (Linux's parent-death signal).
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
        // which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Kill process `pid` (SIGKILL), if it still runs.
pub fn kill(pid: u32) {
    #[cfg(unix)]
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a pid we started; a pid that is gone gives ESRCH, nothing else.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

//! Running a multi-process job: the controller with the job driver on top
//! ([`run_controller`]), and `flotilla launch`, which also starts the node agents on this
//! machine and restarts one that dies ([`launch`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flotilla_runtime::clock::{Clock, RealClock};
use flotilla_runtime::config::{Config, DeviceKind};
use flotilla_runtime::control::keys;
use flotilla_runtime::storage::Storage;
use tokio::sync::mpsc;

use super::agent::{describe, kill, spawn_flotilla};
use super::controller::Controller;
use crate::driver::drive;
use crate::error::JobError;
use crate::job::{Job, Launch, StepRecord, Summary};
use crate::run_log::RunLog;

fn err(why: impl std::fmt::Display) -> JobError {
    JobError::Processes(why.to_string())
}

/// Check that `cfg` can run as rank processes.
pub fn check(cfg: &Config) -> Result<(), JobError> {
    if cfg.cluster.device == DeviceKind::Sim {
        return Err(JobError::Config(
            "cluster.device = \"sim\": the simulated cluster runs in one process (`flotilla train`), \
             not as rank processes"
                .into(),
        ));
    }
    Ok(())
}

/// Run the controller of a job on `listen` (its CA already in `job_dir`) and drive the job once
/// every rank process has joined; `on_listen` learns the controller's address first. The run's
/// files go to `storage`.
pub async fn run_controller(
    cfg: Config,
    job_dir: PathBuf,
    listen: SocketAddr,
    storage: Arc<dyn Storage>,
    on_listen: impl FnOnce(&Controller),
    on_step: &mut (dyn FnMut(&StepRecord) + Send),
) -> Result<Summary, JobError> {
    check(&cfg)?;
    let log = RunLog::new(Arc::clone(&storage));
    log.start().await?;
    let cfg_arc = Arc::new(cfg.clone());
    let controller = Controller::start(cfg_arc, job_dir, listen, log)?;
    on_listen(&controller);
    let result = async {
        controller.first_mesh().await?;
        let remote = controller.remote_ranks().await?;
        let clock: Arc<dyn Clock> = Arc::new(RealClock);
        let launch = Launch {
            remote: Some(remote),
            ..Launch::default()
        };
        let mut job = Job::start(cfg, storage, clock, false, launch).await?;
        let result = drive(&mut job, None, on_step).await;
        let stop = job.stop().await;
        let summary = result?;
        stop?;
        Ok(summary)
    }
    .await;
    tracing::info!("the job is over: stopping its processes");
    controller.finish().await;
    tracing::info!("every process was told to stop");
    result
}

/// `flotilla launch`: create the job directory and its CA, start the controller on 127.0.0.1
/// and one `flotilla agent` process per host and spare (`exe` is the `flotilla` executable),
/// restart an agent process that exits while the job runs, and drive the job.
pub async fn launch(
    cfg: Config,
    config_path: PathBuf,
    job_dir: PathBuf,
    exe: PathBuf,
    storage: Arc<dyn Storage>,
    on_step: &mut (dyn FnMut(&StepRecord) + Send),
) -> Result<Summary, JobError> {
    check(&cfg)?;
    keys::create_ca(&job_dir).map_err(err)?;
    let agents = cfg.cluster.hosts + cfg.cluster.spares;
    let (exits_tx, mut exits) = mpsc::unbounded_channel::<(usize, u32, String)>();
    let over = Arc::new(AtomicBool::new(false));
    let pids = Arc::new(std::sync::Mutex::new(vec![0u32; agents]));
    let mut watcher = None;
    let budget = cfg.supervision.max_job_restarts;
    let backoff = Duration::from_millis(cfg.supervision.backoff_ms);
    let listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let start_agents = |c: &Controller| {
        let spawner = Spawner {
            exe,
            config_path,
            job_dir: job_dir.clone(),
            controller: c.addr(),
        };
        for i in 0..agents {
            match spawner.spawn(i, &exits_tx, &over) {
                Ok(pid) => pids.lock().unwrap_or_else(|p| p.into_inner())[i] = pid,
                Err(e) => tracing::error!("{e}"),
            }
        }
        // Agent exits reach the controller at once; the agent is started again (a spare
        // takes its host in the meantime), within the job's restart budget.
        let ctl = c.handle();
        let (over, pids) = (Arc::clone(&over), Arc::clone(&pids));
        watcher = Some(tokio::spawn(async move {
            let mut restarts = 0u32;
            while let Some((i, pid, status)) = exits.recv().await {
                if over.load(Ordering::SeqCst) {
                    continue;
                }
                ctl.agent_exited(i, pid, &status);
                if restarts >= budget {
                    tracing::error!("agent {i} exited ({status}); the restart budget is spent");
                    continue;
                }
                restarts += 1;
                metrics::counter!(flotilla_runtime::metrics::RECOVERY_ACTIONS, "action" => "restart_agent")
                    .increment(1);
                tokio::time::sleep(backoff).await;
                match spawner.spawn(i, &exits_tx, &over) {
                    Ok(pid) => pids.lock().unwrap_or_else(|p| p.into_inner())[i] = pid,
                    Err(e) => tracing::error!("restarting agent {i}: {e}"),
                }
            }
        }));
    };
    let result = run_controller(cfg, job_dir.clone(), listen, storage, start_agents, on_step).await;
    over.store(true, Ordering::SeqCst);
    // The agents got `Stop`; give them a moment, then make sure none is left.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for &pid in pids.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        if pid != 0 && alive(pid) {
            kill(pid);
        }
    }
    if let Some(w) = watcher {
        w.abort();
    }
    result
}

/// Whether process `pid` still runs (and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
        .unwrap_or(false)
}

/// Starts `flotilla agent` processes.
struct Spawner {
    exe: PathBuf,
    config_path: PathBuf,
    job_dir: PathBuf,
    controller: SocketAddr,
}

impl Spawner {
    /// Start agent `index` (its stderr in `logs/agent-<i>.log`) and a thread that reports its
    /// exit.
    fn spawn(
        &self,
        index: usize,
        exits: &mpsc::UnboundedSender<(usize, u32, String)>,
        over: &Arc<AtomicBool>,
    ) -> Result<u32, JobError> {
        let args = [
            "agent".to_owned(),
            "--config".to_owned(),
            self.config_path.display().to_string(),
            "--job-dir".to_owned(),
            self.job_dir.display().to_string(),
            "--controller".to_owned(),
            self.controller.to_string(),
            "--index".to_owned(),
            index.to_string(),
        ];
        let mut child = spawn_flotilla(
            &self.exe,
            &self.job_dir,
            &format!("agent-{index}.log"),
            &args,
        )
        .map_err(|e| err(format!("starting agent {index}: {e}")))?;
        let pid = child.id();
        let (exits, over) = (exits.clone(), Arc::clone(over));
        std::thread::spawn(move || {
            let (clean, status) = match child.wait() {
                Ok(s) => (s.success(), describe(s)),
                Err(e) => (false, format!("cannot wait for it: {e}")),
            };
            // An agent exits cleanly only when the controller told it to stop.
            if !clean && !over.load(Ordering::SeqCst) {
                let _ = exits.send((index, pid, status));
            }
        });
        Ok(pid)
    }
}

//! `flotilla launch`, `flotilla agent` and the internal `flotilla rank`: a job whose ranks are
//! processes (`flotilla_actors::remote`).
//!
//! `launch` runs the controller and starts every agent on this machine. `agent` joins a job
//! from its environment: under Slurm (`srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_JOB_ID`,
//! the controller on the first host of `SLURM_NODELIST`), torchrun-style (`RANK`,
//! `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, as Kubernetes jobs set them) or with
//! `--controller ADDR --index N`. Agent 0 of a Slurm or torchrun-style job also runs the
//! controller (it creates the job's CA in the job directory; the others wait for it there).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use flotilla_actors::remote::{agent, launch, rank_process};
use flotilla_runtime::config::Config;
use flotilla_runtime::control::keys;
use flotilla_runtime::storage::local::LocalStorage;

use super::train::print_summary;

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Job config (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Job directory: the run's files, checkpoints, `agents.json`, the processes' logs and the
    /// job's CA (overrides `job.out_dir`; created with mode 0700).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Job config (TOML): the same file as the controller's.
    #[arg(long)]
    pub config: PathBuf,
    /// Job directory, shared by the job's processes (default: `job.out_dir`).
    #[arg(long)]
    pub job_dir: Option<PathBuf>,
    /// The controller's address (`host:port`); without it, the environment names it (Slurm or
    /// torchrun-style), and agent 0 runs it.
    #[arg(long)]
    pub controller: Option<String>,
    /// This agent's index, `0..hosts + spares` (default: `SLURM_PROCID` or `RANK`).
    #[arg(long)]
    pub index: Option<usize>,
}

#[derive(Debug, Args)]
pub struct RankArgs {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub job_dir: PathBuf,
    #[arg(long)]
    pub controller: SocketAddr,
    #[arg(long)]
    pub rank: usize,
    #[arg(long)]
    pub agent: usize,
}

fn load(path: &std::path::Path) -> Result<Config> {
    let cfg = Config::load(path).map_err(|e| anyhow!("{e}"))?;
    cfg.validate().map_err(|e| anyhow!("{e}"))?;
    Ok(cfg)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// `flotilla launch`.
pub fn run_launch(args: LaunchArgs) -> Result<ExitCode> {
    let mut cfg = load(&args.config)?;
    let out = args.out.clone().unwrap_or_else(|| cfg.job.out_dir.clone());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // Every process of the job sets job.out_dir to the job directory it is given, so that
    // their configs (and hashes) agree.
    let out = std::fs::canonicalize(&out).with_context(|| format!("{}", out.display()))?;
    cfg.job.out_dir = out.clone();
    let exe = std::env::current_exe().context("finding the flotilla executable")?;
    let storage = Arc::new(LocalStorage::new(out.clone()));
    let config_path = std::fs::canonicalize(&args.config)
        .with_context(|| format!("{}", args.config.display()))?;
    let mut on_step = |r: &flotilla_actors::StepRecord| {
        tracing::info!(step = r.stats.step + 1, loss = r.stats.loss, "train step");
    };
    let summary = runtime()?.block_on(launch::launch(
        cfg,
        config_path,
        out.clone(),
        exe,
        storage,
        &mut on_step,
    ))?;
    print_summary(&summary, &out);
    Ok(ExitCode::SUCCESS)
}

/// Where an agent finds its job: its index, the number of agents, the controller.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub index: usize,
    /// Agents the launcher started (`SLURM_NTASKS`, `WORLD_SIZE`), when it says.
    pub agents: Option<usize>,
    /// The controller's host and port, when the environment names them.
    pub controller: Option<(String, u16)>,
}

/// The first host of a Slurm node list (`node[01-04,07],gpu2` → `node01`).
pub fn first_node(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find([',', '[']).unwrap_or(list.len());
    let (prefix, rest) = list.split_at(end);
    if let Some(range) = rest.strip_prefix('[') {
        let first = range.split([',', '-', ']']).next()?;
        return Some(format!("{prefix}{first}"));
    }
    (!prefix.is_empty()).then(|| prefix.to_owned())
}

/// Read the job's placement from the environment (`get` looks a variable up).
pub fn placement_from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Placement>> {
    let num = |k: &str| -> Result<Option<usize>> {
        get(k)
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("{k}={v:?} is not a number"))
            })
            .transpose()
    };
    let port = |k: &str| -> Result<Option<u16>> {
        get(k)
            .map(|v| {
                v.trim()
                    .parse::<u16>()
                    .with_context(|| format!("{k}={v:?} is not a port"))
            })
            .transpose()
    };
    if let Some(index) = num("SLURM_PROCID")? {
        let host = get("MASTER_ADDR")
            .or_else(|| get("SLURM_STEP_NODELIST").as_deref().and_then(first_node))
            .or_else(|| get("SLURM_NODELIST").as_deref().and_then(first_node))
            .or_else(|| get("SLURM_LAUNCH_NODE_IPADDR"));
        let job: u64 = get("SLURM_JOB_ID")
            .and_then(|j| j.parse().ok())
            .unwrap_or(0);
        // A port of the job's own, so two jobs on one node do not meet.
        let p = port("MASTER_PORT")?.unwrap_or(20000 + (job % 20000) as u16);
        return Ok(Some(Placement {
            index,
            agents: num("SLURM_NTASKS")?,
            controller: host.map(|h| (h, p)),
        }));
    }
    if let Some(index) = num("RANK")? {
        let host =
            get("MASTER_ADDR").ok_or_else(|| anyhow!("RANK is set but MASTER_ADDR is not"))?;
        let p =
            port("MASTER_PORT")?.ok_or_else(|| anyhow!("RANK is set but MASTER_PORT is not"))?;
        return Ok(Some(Placement {
            index,
            agents: num("WORLD_SIZE")?,
            controller: Some((host, p)),
        }));
    }
    Ok(None)
}

/// Resolve `host:port`, retrying for a while (a controller's host may not resolve at once).
fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    let start = Instant::now();
    loop {
        match (host, port)
            .to_socket_addrs()
            .map(|mut a| a.find(SocketAddr::is_ipv4))
        {
            Ok(Some(a)) => return Ok(a),
            other if start.elapsed() > Duration::from_secs(30) => {
                bail!("cannot resolve the controller's host {host:?}: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `flotilla agent`.
pub fn run_agent(args: AgentArgs) -> Result<ExitCode> {
    let mut cfg = load(&args.config)?;
    let job_dir = args
        .job_dir
        .clone()
        .unwrap_or_else(|| cfg.job.out_dir.clone());
    cfg.job.out_dir = job_dir.clone();
    let env = placement_from_env(|k| std::env::var(k).ok())?;
    let index = args
        .index
        .or(env.as_ref().map(|p| p.index))
        .ok_or_else(|| {
            anyhow!(
                "no agent index: pass --index, or run under srun (SLURM_PROCID) or with RANK set"
            )
        })?;
    let slots = cfg.cluster.hosts + cfg.cluster.spares;
    if index >= slots {
        bail!(
            "agent index {index}: the job has {} hosts + {} spares",
            cfg.cluster.hosts,
            cfg.cluster.spares
        );
    }
    if let Some(n) = env.as_ref().and_then(|p| p.agents).filter(|&n| n != slots) {
        bail!(
            "the launcher started {n} agents, but the config wants cluster.hosts + cluster.spares = {slots}"
        );
    }
    let config_path = std::fs::canonicalize(&args.config)
        .with_context(|| format!("{}", args.config.display()))?;
    let exe = std::env::current_exe().context("finding the flotilla executable")?;
    let rt = runtime()?;
    let (controller, run_here) = match (
        &args.controller,
        env.as_ref().and_then(|p| p.controller.clone()),
    ) {
        (Some(a), _) => {
            let (h, p) = a
                .rsplit_once(':')
                .ok_or_else(|| anyhow!("--controller {a:?}: expected host:port"))?;
            let p = p
                .parse::<u16>()
                .with_context(|| format!("--controller {a:?}: bad port"))?;
            (resolve(h, p)?, false)
        }
        (None, Some((h, p))) => (resolve(&h, p)?, index == 0),
        (None, None) => bail!(
            "no controller: pass --controller ADDR, or run under srun or with MASTER_ADDR/MASTER_PORT set"
        ),
    };
    let a = agent::AgentArgs {
        config: cfg.clone(),
        config_path,
        job_dir: job_dir.clone(),
        controller: if run_here {
            SocketAddr::from(([127, 0, 0, 1], controller.port()))
        } else {
            controller
        },
        index,
        exe,
    };
    if !run_here {
        rt.block_on(agent::run(a))?;
        return Ok(ExitCode::SUCCESS);
    }
    // Agent 0 runs the controller too: the CA first (the other agents wait for it), then the
    // controller's listener, then this agent.
    keys::create_ca(&job_dir).map_err(|e| anyhow!("{e}"))?;
    let storage = Arc::new(LocalStorage::new(job_dir.clone()));
    let summary_dir = job_dir.clone();
    let listen = SocketAddr::from(([0, 0, 0, 0], controller.port()));
    let summary = rt.block_on(async move {
        let agent = tokio::spawn(agent::run(a));
        let mut on_step = |r: &flotilla_actors::StepRecord| {
            tracing::info!(step = r.stats.step + 1, loss = r.stats.loss, "train step");
        };
        let s = launch::run_controller(cfg, job_dir, listen, storage, |_| {}, &mut on_step).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
        s
    })?;
    print_summary(&summary, &summary_dir);
    Ok(ExitCode::SUCCESS)
}

/// The debug knob of rank processes: `FLOTILLA_DEBUG_SLOW_RANK=R:F` makes rank R's device work
/// take F times as long (tests of straggler detection; agents pass their environment on).
const SLOW_RANK: &str = "FLOTILLA_DEBUG_SLOW_RANK";

/// The faults the knob asks of rank `rank`.
fn slow_rank_knob(
    rank: usize,
    value: Option<&str>,
) -> Result<Option<Arc<flotilla_actors::faults::FaultPlan>>> {
    let Some(v) = value else { return Ok(None) };
    let bad = || anyhow!("{SLOW_RANK}={v:?}: expected RANK:FACTOR, e.g. 3:4.0");
    let (r, f) = v.split_once(':').ok_or_else(bad)?;
    let r: usize = r.trim().parse().map_err(|_| bad())?;
    let f: f64 = f.trim().parse().map_err(|_| bad())?;
    if !(f.is_finite() && f >= 1.0) {
        return Err(bad());
    }
    Ok((r == rank)
        .then(|| Arc::new(flotilla_actors::faults::FaultPlan::default().with_slow_rank(r, f))))
}

/// `flotilla rank` (started by an agent).
pub fn run_rank(args: RankArgs) -> Result<ExitCode> {
    let mut cfg = load(&args.config)?;
    cfg.job.out_dir = args.job_dir.clone();
    let a = rank_process::RankProcessArgs {
        config: cfg,
        job_dir: args.job_dir,
        controller: args.controller,
        rank: args.rank,
        agent: args.agent,
        faults: slow_rank_knob(args.rank, std::env::var(SLOW_RANK).ok().as_deref())?,
    };
    runtime()?.block_on(rank_process::run(a))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_slow_rank_knob_is_parsed_or_refused() {
        assert!(slow_rank_knob(1, None).expect("unset").is_none());
        assert!(
            slow_rank_knob(1, Some("2:4"))
                .expect("another rank")
                .is_none()
        );
        let plan = slow_rank_knob(2, Some("2:4.5"))
            .expect("ok")
            .expect("this rank");
        assert_eq!(plan.slowdown(2), Some(4.5));
        for bad in ["2", "x:4", "2:y", "2:0.5", "2:nan"] {
            let e = slow_rank_knob(2, Some(bad)).expect_err(bad);
            assert!(e.to_string().contains("RANK:FACTOR"), "{e}");
        }
    }

    #[test]
    fn slurm_node_lists_give_their_first_host() {
        assert_eq!(first_node("node[01-04,07],gpu2").as_deref(), Some("node01"));
        assert_eq!(first_node("gpu2,gpu3").as_deref(), Some("gpu2"));
        assert_eq!(first_node("localhost").as_deref(), Some("localhost"));
        assert_eq!(first_node("n[7]").as_deref(), Some("n7"));
        assert_eq!(first_node(""), None);
    }

    #[test]
    fn the_environment_places_an_agent() {
        let slurm = [
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "5"),
            ("SLURM_JOB_ID", "42"),
            ("SLURM_NODELIST", "node[1-2]"),
        ];
        let p = placement_from_env(env(&slurm)).expect("ok").expect("slurm");
        assert_eq!(
            p,
            Placement {
                index: 3,
                agents: Some(5),
                controller: Some(("node1".into(), 20042)),
            }
        );
        let torch = [
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let p = placement_from_env(env(&torch))
            .expect("ok")
            .expect("torchrun");
        assert_eq!(p.controller, Some(("10.0.0.1".into(), 29500)));
        assert_eq!((p.index, p.agents), (1, Some(4)));
        assert!(placement_from_env(env(&[])).expect("ok").is_none());
        let bad = placement_from_env(env(&[("RANK", "x")])).expect_err("not a number");
        assert!(bad.to_string().contains("RANK=\"x\""), "{bad}");
        let half = placement_from_env(env(&[("RANK", "0")])).expect_err("no master");
        assert!(half.to_string().contains("MASTER_ADDR"), "{half}");
    }
}

//! Runs the benchmark's jobs side by side, one step of one job at a time, in rounds: so that a
//! drift of the machine (its clock frequency, other load) lands on every job alike.
//!
//! Each job (a config, an [`Overlap`], a free or a modelled link) has its ranks on threads of
//! their own over its own [`DelayNet`], built once. A conductor (the calling thread) gives the
//! turns in rounds; in each round every job runs one step, each round in another order (job `k`
//! of round `i` is `(i + k) mod n`). The first `--warmup` + 2 rounds (at least 3) run every
//! link free; then the jobs' compute and all-to-all bytes in the last three set the modelled
//! links' bandwidth
//! ([`Calibration`]), one more round lets the links settle, and `steps` timed rounds follow.
//! Ranks of jobs not on turn sleep on their job's condition variable; a rank that finishes wakes
//! only the conductor, so nothing wakes on a core that a running rank computes on.
//!
//! Until session 6 the jobs ran one after another, 5 timed steps each; runs of one build then
//! spread by about ±0.08 in the acceptance ratio, mostly because the compute of the free-link
//! runs (the ratio's denominator) drifted by up to 20% between runs of one call.

use std::sync::{Arc, Barrier, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use flotilla_actors::pipeline::{self, Overlap, transport::ExchangeStats};
use flotilla_actors::schedule::Action;
use flotilla_runtime::config::{Config, Schedule};
use flotilla_runtime::fabric::Fabric;
use serde_json::{Value, json};

use super::PipelineArgs;
use super::affinity;
use super::link::{DelayNet, LinkUse, Wire};
use super::trace::RankStep;

/// One job of the benchmark.
pub struct JobSpec<'a> {
    pub name: &'static str,
    pub cfg: &'a Config,
    pub overlap: Overlap,
    /// On the modelled link (bandwidth from the calibration), or on a free link.
    pub link: bool,
    /// Record the last step's profile and the link's messages during it.
    pub profile: bool,
}

/// What the calibration measured, per job: its step (the median over the last three
/// calibration rounds; the first rounds are the coldest) and its busiest rank's all-to-all
/// bytes per step (the most in those rounds).
#[derive(Debug, Clone)]
pub struct Calibration {
    pub step_s: Vec<f64>,
    pub a2a_bytes: Vec<u64>,
}

/// One rank's medians over the timed steps of a run.
#[derive(Debug, Clone, Default)]
pub struct RankRun {
    pub step_s: f64,
    /// The rank's all-to-all transfer time ([`LinkUse::a2a_s`]).
    pub comm_s: f64,
    /// Its egress port's busy time ([`LinkUse::busy_s`]).
    pub comm_egress_s: f64,
    /// [`LinkUse::a2a_bytes`] per step.
    pub a2a_bytes: u64,
    /// EP bytes sent per step (exchange statistics).
    pub ep_bytes: u64,
    pub exchange_wait_s: f64,
    /// The rank's compute: seconds its baton was held.
    pub baton_held_s: f64,
    /// All-to-alls per step.
    pub exchanges: u64,
    /// EP bytes sent per step, counted by the link (a cross-check of `ep_bytes`).
    pub link_bytes: u64,
    /// The executor's busy time and schedule end (last timed step).
    pub busy_s: f64,
    pub schedule_s: f64,
    /// Time in actions that are not F&B pairs (warm-up forwards, drain backwards).
    pub unpaired_s: f64,
    pub peak_activations: usize,
}

/// A job's timed steps.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: &'static str,
    pub schedule: Schedule,
    pub overlap: Overlap,
    pub bytes_per_s: Option<f64>,
    pub ranks: Vec<RankRun>,
    /// Median over steps of the slowest rank's step time.
    pub step_s: f64,
    /// The slowest rank's step time, per timed step (round).
    pub per_step: Vec<f64>,
    pub late_mean_s: f64,
    pub late_max_s: f64,
    /// With `profile`: every rank's last step, and the link's messages during it.
    pub profile: Option<(Vec<RankStep>, Vec<Wire>)>,
}

impl Run {
    pub fn comm_s(&self) -> f64 {
        self.ranks.iter().map(|r| r.comm_s).fold(0.0, f64::max)
    }

    pub fn comm_egress_s(&self) -> f64 {
        self.ranks
            .iter()
            .map(|r| r.comm_egress_s)
            .fold(0.0, f64::max)
    }

    pub fn json(&self) -> Value {
        json!({
            "bench": "pipeline_run", "run": self.name, "schedule": self.schedule.to_string(),
            "overlap": format!("{:?}", self.overlap).to_lowercase(),
            "link_gbytes_per_s": self.bytes_per_s.map(|b| b / 1e9),
            "step_s": self.step_s, "step_s_per_round": self.per_step,
            "comm_s": self.comm_s(), "comm_egress_s": self.comm_egress_s(),
            "delivery_late_mean_us": self.late_mean_s * 1e6,
            "delivery_late_max_us": self.late_max_s * 1e6,
            "per_rank": self.ranks.iter().enumerate().map(|(r, x)| json!({
                "rank": r, "step_s": x.step_s, "comm_s": x.comm_s,
                "comm_egress_s": x.comm_egress_s, "a2a_bytes": x.a2a_bytes, "ep_bytes": x.ep_bytes,
                "link_bytes": x.link_bytes,
                "exchange_wait_s": x.exchange_wait_s, "exchanges": x.exchanges,
                "baton_held_s": x.baton_held_s,
                "busy_s": x.busy_s,
                "schedule_s": x.schedule_s, "unpaired_s": x.unpaired_s,
                "peak_activations": x.peak_activations,
            })).collect::<Vec<_>>(),
        })
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One timed step of one rank.
struct Sample {
    step_s: f64,
    link: LinkUse,
    exchange: ExchangeStats,
}

/// Whose turn it is, and how the turn went.
#[derive(Default)]
struct TurnState {
    /// The job on turn and its step index; `None` between turns.
    turn: Option<(usize, usize)>,
    /// Counts the turns given, so that a rank runs each once.
    given: u64,
    /// Ranks built (or failed to build), and ranks done with the current turn.
    ready: usize,
    done: usize,
    /// A rank failed: the conductor gives no more turns.
    failed: bool,
    stop: bool,
    /// Per job and step: the slowest rank's step time and the largest all-to-all bytes.
    steps: Vec<Vec<(f64, u64)>>,
}

/// The conductor's state, one condition variable per job and one for the conductor.
struct Turns {
    state: Mutex<TurnState>,
    job: Vec<Condvar>,
    conductor: Condvar,
}

impl Turns {
    fn lock(&self) -> MutexGuard<'_, TurnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait on `cv` (the lock's poisoning is ignored: the state stays consistent).
    fn wait<'a>(&self, cv: &Condvar, g: MutexGuard<'a, TurnState>) -> MutexGuard<'a, TurnState> {
        cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    /// Give job `j` the turn for its step `i` and wait until all its `world` ranks are done;
    /// false if a rank failed.
    fn give(&self, j: usize, i: usize, world: usize) -> bool {
        let mut g = self.lock();
        g.turn = Some((j, i));
        g.given += 1;
        g.done = 0;
        self.job[j].notify_all();
        while g.done < world && !g.failed {
            g = self.wait(&self.conductor, g);
        }
        g.turn = None;
        !g.failed
    }

    fn stop(&self) {
        let mut g = self.lock();
        g.stop = true;
        for cv in &self.job {
            cv.notify_all();
        }
    }
}

/// When a rank thread unwinds: fails the rank on its hub (its peers' waits end) and the run
/// (the conductor gives no more turns), so that nothing waits for a thread that is gone.
struct PanicGuard<'a> {
    turns: &'a Turns,
    net: &'a DelayNet,
    rank: usize,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let why = format!("rank {} panicked", self.rank);
            self.net.hub().fail_rank(self.rank, why);
            self.turns.lock().failed = true;
            self.turns.conductor.notify_all();
        }
    }
}

/// Stops every rank thread when the conductor is done, also when it unwinds.
struct StopOnDrop<'a>(&'a Turns);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

type RankResult = Result<(RankRun, Option<RankStep>), String>;

/// Run `jobs` interleaved (see the module doc): [`PipelineArgs::calibration_rounds`], one round
/// to settle, `a.steps` timed. `bandwidth` turns the calibration into the modelled links' bytes
/// per second. Returns the runs in `jobs`' order and that bandwidth.
pub fn run_jobs(
    jobs: &[JobSpec<'_>],
    a: &PipelineArgs,
    bandwidth: impl FnOnce(Calibration) -> Result<f64>,
    rt: &tokio::runtime::Runtime,
) -> Result<(Vec<Run>, f64)> {
    let n = jobs.len();
    let world = jobs.first().map_or(0, |j| j.cfg.world_size());
    if n == 0 || jobs.iter().any(|j| j.cfg.world_size() != world) {
        bail!("internal: the benchmark's jobs must have one world size");
    }
    let latency = Duration::from_secs_f64(a.latency_us.max(0.0) * 1e-6);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let nets: Vec<DelayNet> = (0..n)
        .map(|_| {
            let net = DelayNet::new(world, None, latency, rt.handle().clone());
            // With a core to spare for it (one per rank, one for the tokio workers), the
            // delivery thread spins for its next delivery instead of waking late from a sleep.
            if cores > world + 2 {
                net.spin_for(Duration::from_micros(200));
            }
            net
        })
        .collect();
    let calibration = a.calibration_rounds();
    let first_timed = a.untimed_rounds();
    let total = first_timed + a.steps;
    let turns = Turns {
        state: Mutex::new(TurnState {
            steps: (0..n).map(|_| vec![(0.0, 0); total]).collect(),
            ..TurnState::default()
        }),
        job: (0..n).map(|_| Condvar::new()).collect(),
        conductor: Condvar::new(),
    };
    let cpus = if a.pin {
        affinity::allowed()
    } else {
        Vec::new()
    };
    let turns = &turns;
    let (results, bw) = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (j, spec) in jobs.iter().enumerate() {
            let net = &nets[j];
            let barrier = Arc::new(Barrier::new(world));
            for r in 0..world {
                let fabric: Arc<dyn Fabric> = Arc::new(net.endpoint(r));
                let barrier = barrier.clone();
                let handle = rt.handle().clone();
                let cpu = (!cpus.is_empty()).then(|| cpus[r % cpus.len()]);
                handles.push(s.spawn(move || -> RankResult {
                    let _guard = PanicGuard {
                        turns,
                        net,
                        rank: r,
                    };
                    if let Some(c) = cpu {
                        affinity::pin(c);
                    }
                    let built = pipeline::new_rank(spec.cfg, r, fabric, handle);
                    let fail = |why: String| {
                        net.hub().fail_rank(r, why.clone());
                        let mut g = turns.lock();
                        g.failed = true;
                        turns.conductor.notify_all();
                        why
                    };
                    {
                        let mut g = turns.lock();
                        g.ready += 1;
                        g.failed |= built.is_err();
                        turns.conductor.notify_all();
                    }
                    let mut t = built.map_err(|e| fail(format!("rank {r}: {e}")))?;
                    t.set_overlap(spec.overlap);
                    t.set_turn_order(a.turns);
                    let mut samples = Vec::new();
                    let (mut exchanges, mut last, mut seen) = (0, None, 0);
                    loop {
                        let i = {
                            let mut g = turns.lock();
                            loop {
                                if g.stop {
                                    break None;
                                }
                                match g.turn {
                                    Some((tj, i)) if tj == j && g.given > seen => {
                                        seen = g.given;
                                        break Some(i);
                                    }
                                    _ => g = turns.wait(&turns.job[j], g),
                                }
                            }
                        };
                        let Some(i) = i else { break };
                        let profiled = spec.profile && i + 1 == total;
                        if profiled {
                            t.set_profile(true);
                            if r == 0 {
                                net.record(true);
                            }
                        }
                        barrier.wait();
                        let t0 = Instant::now();
                        let stepped = t.step();
                        let dt = t0.elapsed().as_secs_f64();
                        if let Err(e) = stepped {
                            return Err(fail(format!("rank {r}: {e}")));
                        }
                        if profiled {
                            last = Some(RankStep {
                                start: t0,
                                step_s: dt,
                                events: t.last_profile().to_vec(),
                            });
                        }
                        let link = net.take(r);
                        let ex = t.last_exchange().unwrap_or_default();
                        if i >= first_timed {
                            exchanges = ex.exchanges;
                            samples.push(Sample {
                                step_s: dt,
                                link,
                                exchange: ex,
                            });
                        }
                        let mut g = turns.lock();
                        if let Some(x) = g.steps.get_mut(j).and_then(|v| v.get_mut(i)) {
                            x.0 = x.0.max(dt);
                            x.1 = x.1.max(link.a2a_bytes);
                        }
                        g.done += 1;
                        turns.conductor.notify_all();
                    }
                    let trace = t.last_trace().cloned().unwrap_or_default();
                    Ok((rank_run(&samples, exchanges, &trace), last))
                }));
            }
        }
        let links: Vec<bool> = jobs.iter().map(|j| j.link).collect();
        let stop = StopOnDrop(turns);
        let bw = conduct(turns, world, calibration, total, &nets, &links, bandwidth);
        drop(stop);
        let results: Vec<RankResult> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a rank thread panicked".into()))
            })
            .collect();
        (results, bw)
    });
    let mut errors: Vec<String> = Vec::new();
    let mut runs = Vec::new();
    let mut results = results.into_iter();
    let recorded = std::mem::take(&mut turns.lock().steps);
    for (j, spec) in jobs.iter().enumerate() {
        let mut ranks = Vec::new();
        let mut steps = Vec::new();
        for res in results.by_ref().take(world) {
            match res {
                Ok((rr, last)) => {
                    ranks.push(rr);
                    steps.extend(last);
                }
                Err(e) => errors.push(format!("{}: {e}", spec.name)),
            }
        }
        // The slowest rank's step in each timed round, as the conductor recorded it.
        let per_step: Vec<f64> = recorded
            .get(j)
            .map(|v| v.iter().skip(first_timed).map(|x| x.0).collect())
            .unwrap_or_default();
        let (late_mean_s, late_max_s, _) = nets[j].lateness();
        runs.push(Run {
            name: spec.name,
            schedule: spec.cfg.parallel.schedule,
            overlap: spec.overlap,
            bytes_per_s: None,
            ranks,
            step_s: median(per_step.clone()),
            per_step,
            late_mean_s,
            late_max_s,
            profile: spec.profile.then(|| (steps, nets[j].log())),
        });
    }
    let bw = match bw {
        Ok(bw) if errors.is_empty() => bw,
        Ok(_) => bail!("{}", errors.join("; ")),
        Err(e) if errors.is_empty() => return Err(e),
        Err(e) => bail!("{e}; {}", errors.join("; ")),
    };
    for (run, spec) in runs.iter_mut().zip(jobs) {
        run.bytes_per_s = spec.link.then_some(bw);
    }
    Ok((runs, bw))
}

/// The conductor: `rounds` rounds, the links' bandwidth set after the first `calibration`.
fn conduct(
    turns: &Turns,
    world: usize,
    calibration: usize,
    rounds: usize,
    nets: &[DelayNet],
    links: &[bool],
    bandwidth: impl FnOnce(Calibration) -> Result<f64>,
) -> Result<f64> {
    let n = nets.len();
    {
        let mut g = turns.lock();
        while g.ready < n * world && !g.failed {
            g = turns.wait(&turns.conductor, g);
        }
        if g.failed {
            bail!("a rank failed to start");
        }
    }
    let (mut bw, mut bandwidth) = (None, Some(bandwidth));
    for round in 0..rounds {
        if round == calibration {
            let cal = {
                let g = turns.lock();
                let last = |j: usize| &g.steps[j][calibration.saturating_sub(3)..calibration];
                Calibration {
                    step_s: (0..n)
                        .map(|j| median(last(j).iter().map(|x| x.0).collect()))
                        .collect(),
                    a2a_bytes: (0..n)
                        .map(|j| last(j).iter().map(|x| x.1).max().unwrap_or(0))
                        .collect(),
                }
            };
            let b = bandwidth
                .take()
                .ok_or_else(|| anyhow::anyhow!("internal: calibrated twice"))?(
                cal
            )?;
            for (net, &link) in nets.iter().zip(links) {
                if link {
                    net.set_bandwidth(Some(b));
                }
            }
            bw = Some(b);
        }
        for k in 0..n {
            if !turns.give((round + k) % n, round, world) {
                bail!("a rank failed (see the errors that follow)");
            }
        }
    }
    bw.ok_or_else(|| anyhow::anyhow!("internal: no calibration"))
}

/// A rank's medians over its timed steps, and its executor's last trace.
fn rank_run(samples: &[Sample], exchanges: u64, trace: &pipeline::executor::Trace) -> RankRun {
    let med = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    RankRun {
        step_s: med(&|s| s.step_s),
        comm_s: med(&|s| s.link.a2a_s),
        comm_egress_s: med(&|s| s.link.busy_s),
        a2a_bytes: med(&|s| s.link.a2a_bytes as f64) as u64,
        ep_bytes: med(&|s| s.exchange.bytes_sent as f64) as u64,
        exchange_wait_s: med(&|s| s.exchange.wait_s),
        baton_held_s: med(&|s| s.exchange.baton_held_s),
        exchanges,
        link_bytes: med(&|s| s.link.bytes as f64) as u64,
        busy_s: trace.busy(),
        schedule_s: trace.end(),
        unpaired_s: trace
            .spans
            .iter()
            .filter(|s| !matches!(s.action, Action::FB { .. }))
            .map(|s| s.end - s.start)
            .sum(),
        peak_activations: trace.peak_activations,
    }
}

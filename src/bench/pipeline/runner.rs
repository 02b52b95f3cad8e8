//! Runs the benchmark's jobs side by side, one step of one job at a time, in rounds, so that a
//! drift of the machine (its clock frequency, other load) lands on every job alike.
//!
//! Each job is a [`Job`] of the actor runtime, as `flotilla train` starts it, over a
//! [`DelayNet`] of its own, every rank's device thread pinned to a core (`--no-pin`: not). In
//! each round every job runs one step, each round in another order (job `k` of round `i` is
//! `(i + k) mod n`). The first `--warmup` + 2 rounds (at least 3) run every link free; then the
//! free-link DualPipe job's step and its busiest rank's all-to-all bytes in the last three set
//! the modelled links' bandwidth ([`Calibration`]), one more round lets the links settle, and
//! `--steps` timed rounds follow. A job's step time is the driver's: from asking every rank for
//! the step to the last rank's answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flotilla_actors::job::{Job, Launch};
use flotilla_actors::stream::Span;
use flotilla_runtime::clock::RealClock;
use flotilla_runtime::config::{Config, Schedule};
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::storage::sim::SimStorage;
use serde_json::{Value, json};

use super::PipelineArgs;
use super::affinity;
use super::link::{DelayNet, LinkUse, Wire};

/// One job of the benchmark.
pub struct JobSpec {
    pub name: &'static str,
    pub cfg: Config,
    /// On the modelled link (bandwidth from the calibration), or on a free link.
    pub link: bool,
    /// Stage actions in progress at once per stage actor.
    pub window: usize,
    /// Keep the last timed step's trace and the link's messages during it.
    pub profile: bool,
}

/// What the calibration rounds measured: the free-link DualPipe job's step (the median of the
/// last three rounds; the first are the coldest) and its busiest rank's all-to-all bytes per
/// step (the most in those rounds).
#[derive(Debug, Clone, Copy)]
pub struct Calibration {
    pub step_s: f64,
    pub a2a_bytes: u64,
}

/// One rank's medians over the timed steps of a run.
#[derive(Debug, Clone, Default)]
pub struct RankRun {
    /// Seconds the rank's compute stream was busy.
    pub busy_s: f64,
    /// The rank's all-to-all transfer time on the link ([`LinkUse::a2a_s`]).
    pub comm_s: f64,
    /// Its egress port's busy time ([`LinkUse::busy_s`]).
    pub comm_egress_s: f64,
    /// [`LinkUse::a2a_bytes`] per step.
    pub a2a_bytes: u64,
    /// All-to-all bytes the rank sent per step.
    pub link_bytes: u64,
    /// The most stage sub-batches whose activations it held at once (over the timed steps).
    pub peak_activations: usize,
}

/// A job's timed steps.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: &'static str,
    pub schedule: Schedule,
    pub window: usize,
    pub bytes_per_s: Option<f64>,
    pub ranks: Vec<RankRun>,
    /// Median over the timed steps of the step time.
    pub step_s: f64,
    /// The step time of each timed step (round).
    pub per_step: Vec<f64>,
    pub late_mean_s: f64,
    pub late_max_s: f64,
    /// With `profile`: every rank's jobs of the last step (seconds since its start), and the
    /// link's messages during it (with the instant the step was asked for).
    pub profile: Option<(Vec<Vec<Span>>, Vec<Wire>, Instant)>,
}

impl Run {
    /// The busiest rank's all-to-all time.
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
            "window": self.window,
            "link_gbytes_per_s": self.bytes_per_s.map(|b| b / 1e9),
            "step_s": self.step_s, "step_s_per_round": self.per_step,
            "comm_s": self.comm_s(), "comm_egress_s": self.comm_egress_s(),
            "delivery_late_mean_us": self.late_mean_s * 1e6,
            "delivery_late_max_us": self.late_max_s * 1e6,
            "per_rank": self.ranks.iter().enumerate().map(|(r, x)| json!({
                "rank": r, "busy_s": x.busy_s, "comm_s": x.comm_s,
                "comm_egress_s": x.comm_egress_s, "a2a_bytes": x.a2a_bytes,
                "link_bytes": x.link_bytes, "peak_activations": x.peak_activations,
            })).collect::<Vec<_>>(),
        })
    }
}

/// One step of one job, as measured.
#[derive(Debug, Clone)]
struct Sample {
    step_s: f64,
    busy_s: Vec<f64>,
    link: Vec<LinkUse>,
    peak: Vec<usize>,
}

/// A started job.
struct Live {
    spec: JobSpec,
    job: Job,
    net: Arc<DelayNet>,
    step: u64,
    samples: Vec<Sample>,
    profile: Option<(Vec<Vec<Span>>, Vec<Wire>, Instant)>,
}

impl Live {
    /// Run one step; with `record`, keep the link's messages and the ranks' trace of it.
    async fn step(&mut self, record: bool) -> Result<Sample> {
        let world = self.spec.cfg.world_size();
        if record {
            self.net.record(true);
        }
        let t0 = Instant::now();
        let stats = self
            .job
            .step(self.step)
            .await
            .with_context(|| format!("{}: step {}", self.spec.name, self.step))?;
        let step_s = t0.elapsed().as_secs_f64();
        if record {
            let spans = self.job.trace(self.step).await?;
            self.profile = Some((spans, self.net.log(), t0));
            self.net.record(false);
        }
        self.step += 1;
        Ok(Sample {
            step_s,
            busy_s: stats.iter().map(|s| s.busy_seconds).collect(),
            link: (0..world).map(|r| self.net.take(r)).collect(),
            peak: stats.iter().map(|s| s.peak_activations).collect(),
        })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Start every job, run the rounds, and return each job's timed run and the link's bandwidth
/// (bytes/s) that `calibrate` chose from the calibration (called once).
pub async fn run_jobs(
    specs: Vec<JobSpec>,
    a: &PipelineArgs,
    mut calibrate: impl FnMut(&Calibration) -> Result<f64>,
) -> Result<(Vec<Run>, f64)> {
    let allowed = affinity::allowed();
    let pin: Option<flotilla_actors::rank::DeviceThreadHook> =
        (a.pin && !allowed.is_empty()).then(|| {
            let allowed = allowed.clone();
            Arc::new(move |rank: usize| {
                affinity::pin(allowed[rank % allowed.len()]);
            }) as flotilla_actors::rank::DeviceThreadHook
        });
    let latency = Duration::from_secs_f64(a.latency_us.max(0.0) * 1e-6);
    let mut live = Vec::with_capacity(specs.len());
    for spec in specs {
        let world = spec.cfg.world_size();
        let net = Arc::new(DelayNet::new(
            world,
            None,
            latency,
            tokio::runtime::Handle::current(),
        ));
        // The delivery thread spins for imminent deliveries only where it has a core to spare.
        if allowed.len() > world {
            net.spin_for(Duration::from_micros(200));
        }
        let endpoints: Vec<Arc<dyn Fabric>> = (0..world)
            .map(|r| Arc::new(net.endpoint(r)) as Arc<dyn Fabric>)
            .collect();
        let launch = Launch {
            fabric: Some((Arc::clone(net.hub()), endpoints)),
            window: Some(spec.window),
            on_device_thread: pin.clone(),
            ..Launch::default()
        };
        let job = Job::start(
            spec.cfg.clone(),
            Arc::new(SimStorage::unlimited()),
            Arc::new(RealClock),
            true,
            launch,
        )
        .await
        .with_context(|| format!("starting the job {}", spec.name))?;
        live.push(Live {
            spec,
            job,
            net,
            step: 0,
            samples: Vec::new(),
            profile: None,
        });
    }
    let n = live.len();
    let (calib, timed) = (a.calibration_rounds(), a.steps);
    let rounds = a.untimed_rounds() + timed;
    let mut bandwidth = None;
    for round in 0..rounds {
        if round == calib {
            let Some(free) = live
                .iter()
                .position(|l| l.spec.name == "dualpipe_free_link")
            else {
                bail!("internal: no free-link DualPipe job to calibrate with");
            };
            let last = &live[free].samples[calib.saturating_sub(3)..];
            let c = Calibration {
                step_s: median(last.iter().map(|s| s.step_s).collect()),
                a2a_bytes: last
                    .iter()
                    .flat_map(|s| s.link.iter().map(|u| u.a2a_bytes))
                    .max()
                    .unwrap_or(0),
            };
            let bw = calibrate(&c)?;
            for l in live.iter().filter(|l| l.spec.link) {
                l.net.set_bandwidth(Some(bw));
            }
            bandwidth = Some(bw);
        }
        let last_round = round + 1 == rounds;
        for k in 0..n {
            let l = &mut live[(round + k) % n];
            let record = last_round && l.spec.profile;
            let s = l.step(record).await?;
            l.samples.push(s);
        }
    }
    let bw = bandwidth.context("the calibration never ran (too few rounds)")?;
    let mut runs = Vec::with_capacity(n);
    for l in live {
        let world = l.spec.cfg.world_size();
        let timed_samples = &l.samples[l.samples.len() - timed..];
        let per_rank = |f: &dyn Fn(&Sample, usize) -> f64, r: usize| {
            median(timed_samples.iter().map(|s| f(s, r)).collect())
        };
        let ranks = (0..world)
            .map(|r| RankRun {
                busy_s: per_rank(&|s, r| s.busy_s[r], r),
                comm_s: per_rank(&|s, r| s.link[r].a2a_s, r),
                comm_egress_s: per_rank(&|s, r| s.link[r].busy_s, r),
                a2a_bytes: per_rank(&|s, r| s.link[r].a2a_bytes as f64, r) as u64,
                link_bytes: per_rank(&|s, r| s.link[r].bytes as f64, r) as u64,
                peak_activations: timed_samples.iter().map(|s| s.peak[r]).max().unwrap_or(0),
            })
            .collect();
        let per_step: Vec<f64> = timed_samples.iter().map(|s| s.step_s).collect();
        let (late_mean_s, late_max_s, _) = l.net.lateness();
        runs.push(Run {
            name: l.spec.name,
            schedule: l.spec.cfg.parallel.schedule,
            window: l.spec.window,
            bytes_per_s: l.spec.link.then_some(bw),
            ranks,
            step_s: median(per_step.clone()),
            per_step,
            late_mean_s,
            late_max_s,
            profile: l.profile,
        });
        l.job
            .stop()
            .await
            .with_context(|| format!("stopping the job {}", l.spec.name))?;
    }
    Ok((runs, bw))
}

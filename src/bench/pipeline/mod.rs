//! `flotilla bench pipeline`: does DualPipe hide the expert all-to-all behind compute?
//!
//! The job is `flotilla train`'s ([`flotilla_actors::job::Job`]: the actor tree, a stage actor
//! per (rank, stage) issuing phases on the rank's compute stream, an expert-shard actor per
//! rank): by default the built-in model with four layers (the first dense, one MTP module),
//! DualPipe, pp = 2 × ep = 2 (four ranks, one compute thread each, pinned to a core of its
//! own where there are enough), 32 micro-batches of 8 sequences (`--batch 256`), each run as
//! two sub-batches of 4 (`--sub-batches`, the job's `parallel.sub_batches`: every action of
//! the schedule becomes one per sub-batch, side by side, so more all-to-alls are in flight
//! within the schedule's activation memory). The stages are cut where their all-to-alls
//! balance ([`job::balanced_split`]: layers `[3, 1]` for the default model, whose even split
//! gives the last stage three MoE blocks against one; `--stage-layers` sets it).
//!
//! **Overlap** is the stage actors' doing: after a phase a stage actor posts what it yielded
//! (a MoE layer's dispatch, a finished pass's output) and issues whatever phase of its actions
//! in progress is ready next, so one micro-batch's all-to-all travels while another's phase
//! computes; an F&B pair of DualPipe is two passes (two stage actors of the rank) whose phases
//! interleave on the stream. `--window` caps the actions in progress per stage actor (default
//! 3 per sub-batch; the job's); the `_window_1` run takes one, which leaves only the pairs'
//! interleaving.
//!
//! **The link.** In-process messages are free, so on their own there is nothing to overlap. A
//! [`link::DelayNet`] wraps the hub and models a network link on the *wall* clock for the
//! expert all-to-all (dispatches to the expert shards and combines back, forward and backward:
//! [`flotilla_actors::wire::is_all_to_all`]) only: a message of `b` bytes from `s` occupies
//! `s`'s egress port for `b / bandwidth` (one message at a time, in order, like
//! `runtime/src/fabric/sim.rs` but in real time) and arrives a latency after it has left.
//! `send` returns at once (the CPU is not busy while a NIC moves bytes) and a delivery thread
//! hands the message to the hub at its arrival time. Stage boundaries and the gradient and
//! statistics all-reduces pass straight through.
//!
//! **Communication** of a rank is the time its all-to-alls take on this link alone: for each
//! all-to-all (one tag), the longer of what the rank sends (its port serializes it) and the
//! largest message it receives, summed over the step ([`link::LinkUse::a2a_s`]). The egress
//! port's busy time alone is reported too (`comm_egress_s`).
//!
//! **The runs** (same process, same config and data, each job with ranks and a network of its
//! own), stepped side by side in rounds (`runner.rs`):
//! 1. `dualpipe_free_link`: no delay; its step is the **compute**.
//! 2. `dualpipe_link`: the modelled link, the default window: the headline.
//! 3. `dualpipe_link_window_1`: the same with one action in progress per stage actor.
//! 4. `1f1b_free_link`, `1f1b_link`: 1F1B, one action at a time (window 1, one stage per
//!    rank), so nothing hides its all-to-alls: the reference without overlap.
//!
//! The link's bandwidth is set after the calibration rounds so that the busiest rank's
//! communication ≈ compute × `--comm-over-compute`. The headline is
//! `dualpipe_step_over_max_compute_comm = step(dualpipe_link) / max(compute, communication)`
//! (medians over the timed rounds; `ratio_per_round` gives the spread); 1 would be perfect
//! overlap, `(compute + communication) / max(…)` (2 at the default) none. Peak activations
//! (stage sub-batches held at once, from each rank's forward gate) are reported beside what the
//! DeepSeek-V3 report's table says (1F1B: PP − r on rank r; DualPipe: PP + 1 on every rank),
//! in micro-batches.
//!
//! **Cores.** Each rank's compute thread is pinned to one allowed CPU (`r mod n`; `--no-pin`
//! turns it off): the phases of a rank share one core, as they share one GPU in the report, so
//! overlap can only hide communication, never add compute. With fewer cores than ranks (this
//! project's 2-core machine, four ranks) ranks share cores, and part of what hides
//! communication there is the OS scheduler between ranks: the acceptance numbers come from a
//! 16-core host (`docs/benchmarks.md`). The tokio runtime's two workers (the actors, the
//! fabric) are not pinned.
//!
//! **`--trace FILE`**: the last step of `dualpipe_link` as a Chrome trace (`trace.rs`: every
//! rank's compute stream and its egress port), and a `pipeline_profile` record per rank.

mod affinity;
mod job;
mod link;
mod runner;
mod table;
mod trace;

use job::job_config;
pub use table::print_table;

use runner::{JobSpec, Run};

use anyhow::{Context, Result, anyhow, bail};
use flotilla_actors::pipeline;
use flotilla_actors::schedule::{self, timeline};
use flotilla_runtime::config::Schedule;
use serde_json::json;

use super::Report;

/// The benchmark's job and run lengths.
#[derive(Debug, Clone)]
pub struct PipelineArgs {
    pub pp: usize,
    pub ep: usize,
    pub micro_batches: usize,
    /// Sub-batches per micro-batch (`parallel.sub_batches`).
    pub sub_batches: usize,
    /// Global batch (sequences per step).
    pub batch: usize,
    pub seq: usize,
    pub layers: usize,
    /// The first layers with a dense FFN instead of MoE (the model's `first_k_dense_replace`).
    pub dense_layers: usize,
    /// MTP modules (the model's `num_nextn_predict_layers`).
    pub mtp_depth: usize,
    /// Decoder layers per pipeline stage (`parallel.stage_layers`); empty: [`job::balanced_split`].
    pub stage_layers: Vec<usize>,
    /// Warm-up rounds: with two more they are the calibration ([`Self::calibration_rounds`]).
    pub warmup: usize,
    /// Timed steps per run (the median is reported).
    pub steps: usize,
    /// One-way latency of every modelled message, microseconds.
    pub latency_us: f64,
    /// Modelled communication time as a multiple of compute (1 = equal).
    pub comm_over_compute: f64,
    /// Pin rank `r`'s compute thread to the `r mod n`-th allowed CPU.
    pub pin: bool,
    /// Stage actions in progress at once per stage actor of the DualPipe runs (`None`: the
    /// job's default, 3 per sub-batch).
    pub window: Option<usize>,
    /// Write the last step of the DualPipe run on the link as a Chrome trace here.
    pub trace: Option<std::path::PathBuf>,
}

impl PipelineArgs {
    /// Rounds on free links before the link is set: `warmup + 2`, at least 3 (the link is
    /// calibrated on the last three).
    pub fn calibration_rounds(&self) -> usize {
        (self.warmup + 2).max(3)
    }

    /// Untimed rounds: the calibration and one round for the link to settle.
    pub fn untimed_rounds(&self) -> usize {
        self.calibration_rounds() + 1
    }

    /// The DualPipe runs' window.
    pub fn window(&self) -> usize {
        self.window.unwrap_or(3 * self.sub_batches.max(1))
    }
}

impl Default for PipelineArgs {
    fn default() -> Self {
        PipelineArgs {
            pp: 2,
            ep: 2,
            micro_batches: 32,
            sub_batches: 2,
            batch: 256,
            seq: 128,
            layers: 4,
            dense_layers: 1,
            mtp_depth: 1,
            stage_layers: Vec::new(),
            warmup: 2,
            steps: 5,
            latency_us: 10.0,
            comm_over_compute: 1.0,
            pin: true,
            window: None,
            trace: None,
        }
    }
}

/// Run the benchmark.
pub fn run(a: &PipelineArgs) -> Result<Report> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if a.window == Some(0) {
        bail!("--window must be at least 1");
    }
    let dual = job_config(a, Schedule::DualPipe);
    let one = job_config(a, Schedule::OneFOneB);
    for c in [&dual, &one] {
        c.validate()
            .map_err(|e| anyhow!("the benchmark's job config is invalid: {e}"))?;
    }
    let world = dual.world_size();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let allowed = affinity::allowed();
    let pinned = a.pin && !allowed.is_empty();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;

    let mut report = Report::default();
    report.push(json!({
        "bench": "pipeline_setup", "ranks": world, "cores": cores, "pp": a.pp, "ep": a.ep,
        "dp": 1, "micro_batches": a.micro_batches, "sub_batches": a.sub_batches,
        "batch": a.batch, "seq": a.seq,
        "layers": a.layers, "dense_layers": a.dense_layers, "mtp_depth": a.mtp_depth,
        "stage_layers": dual.parallel.stage_layers,
        "cpu_threads_per_rank": 1, "warmup": a.warmup, "steps": a.steps,
        "latency_us": a.latency_us, "comm_over_compute_target": a.comm_over_compute,
        "pinned": pinned,
        "cores_per_rank": if pinned { (allowed.len() as f64 / world as f64).min(1.0) } else { cores as f64 / world as f64 },
        "window": a.window(),
    }));

    let spec = |name, cfg: &flotilla_runtime::config::Config, link, window, profile| JobSpec {
        name,
        cfg: cfg.clone(),
        link,
        window,
        profile,
    };
    let jobs = vec![
        spec("dualpipe_free_link", &dual, false, a.window(), false),
        spec("dualpipe_link", &dual, true, a.window(), a.trace.is_some()),
        spec("dualpipe_link_window_1", &dual, true, 1, false),
        spec("1f1b_free_link", &one, false, 1, false),
        spec("1f1b_link", &one, true, 1, false),
    ];
    let mut calibration = None;
    let (runs, bw) = rt.block_on(runner::run_jobs(jobs, a, |c| {
        calibration = Some(*c);
        if c.a2a_bytes == 0 {
            bail!("the job sent no expert all-to-all bytes (is ep > 1 and a layer MoE?)");
        }
        Ok(c.a2a_bytes as f64 / (c.step_s * a.comm_over_compute.max(1e-3)))
    }))?;
    let [free, link, window_1, one_free, one_link] = &runs[..] else {
        bail!("internal: {} runs for 5 jobs", runs.len());
    };
    for r in &runs {
        report.push(r.json());
    }
    if let (Some(path), Some((spans, wires, t0))) = (&a.trace, &link.profile) {
        let chrome = trace::chrome(spans, wires, *t0);
        std::fs::write(path, serde_json::to_vec(&chrome)?)
            .with_context(|| format!("writing the trace to {}", path.display()))?;
        for rec in trace::summary(spans, wires) {
            report.push(rec);
        }
    }

    let sched_dual = schedule::build(pipeline::kind_of(Schedule::DualPipe), a.pp, a.micro_batches)
        .map_err(|e| anyhow!("{e}"))?;
    let sched_one = schedule::build(pipeline::kind_of(Schedule::OneFOneB), a.pp, a.micro_batches)
        .map_err(|e| anyhow!("{e}"))?;
    let pp_of = |r: usize| r / a.ep;
    // Peaks in micro-batches: the gate counts sub-batches.
    let sub = a.sub_batches.max(1) as f64;
    let in_micro = |p: usize| p as f64 / sub;
    let peak = |run: &Run| {
        run.ranks
            .iter()
            .map(|x| in_micro(x.peak_activations))
            .collect::<Vec<_>>()
    };
    let compute_s = free.step_s;
    let comm_s = link.comm_s();
    for r in 0..world {
        let pr = pp_of(r);
        report.push(json!({
            "bench": "pipeline_rank", "rank": r, "pp_rank": pr,
            "busy_free_link_s": free.ranks[r].busy_s, "comm_s": link.ranks[r].comm_s,
            "comm_egress_s": link.ranks[r].comm_egress_s,
            "busy_link_s": link.ranks[r].busy_s,
            "peak_activations_1f1b": in_micro(one_link.ranks[r].peak_activations),
            "expected_1f1b": timeline::peak_activations(&sched_one.ranks[pr]),
            "peak_activations_dualpipe": in_micro(link.ranks[r].peak_activations),
            "peak_sub_batches_dualpipe": link.ranks[r].peak_activations,
            "expected_dualpipe": timeline::peak_activations(&sched_dual.ranks[pr]),
        }));
    }
    let ratio = link.step_s / compute_s.max(comm_s);
    // The same ratio per round: each round's jobs ran back to back.
    let by_round: Vec<f64> = (0..a.steps)
        .map(|i| {
            let c = free.per_step.get(i).copied().unwrap_or(f64::NAN);
            link.per_step.get(i).copied().unwrap_or(f64::NAN) / c.max(comm_s)
        })
        .collect();
    report.push(json!({"summary": {
        "dualpipe_step_over_max_compute_comm": ratio,
        "ratio_per_round": by_round,
        "link_gbytes_per_s": bw / 1e9,
        "calibration_compute_s": calibration.map(|c| c.step_s),
        "compute_s": compute_s,
        "comm_s": comm_s,
        "comm_egress_s": link.comm_egress_s(),
        "dualpipe_step_over_max_compute_egress": link.step_s / compute_s.max(link.comm_egress_s()),
        "step_overlap_s": link.step_s,
        "step_window_1_s": window_1.step_s,
        "window_1_step_over_max_compute_comm": window_1.step_s / compute_s.max(comm_s),
        "no_overlap_sum_s": compute_s + comm_s,
        "no_overlap_over_max_compute_comm": (compute_s + comm_s) / compute_s.max(comm_s),
        "step_1f1b_s": one_link.step_s,
        "compute_1f1b_s": one_free.step_s,
        "comm_1f1b_s": one_link.comm_s(),
        "step_1f1b_over_sum": one_link.step_s / (one_free.step_s + one_link.comm_s()),
        "peak_activations_1f1b": peak(one_link),
        "peak_activations_dualpipe": peak(link),
        "expected_peak_1f1b_max": a.pp,
        "expected_peak_dualpipe": a.pp + 1,
        "delivery_late_mean_us": link.late_mean_s * 1e6,
        "ranks": world,
        "cores": cores,
        "pinned": pinned,
    }}));
    Ok(report)
}

//! `flotilla bench pipeline`: does DualPipe hide the expert all-to-all behind compute?
//!
//! The job is the real parallel trainer ([`flotilla_actors::pipeline::new_rank`]): by default the
//! built-in model with four layers (the first dense, one MTP module), DualPipe, pp = 2 × ep = 2
//! (four ranks, one core and one GEMM thread each), 32 micro-batches of 8 sequences (`--batch
//! 256`; with 8 micro-batches, 44% of the compute is in unpaired warm-up and drain actions, see
//! below), each run as two sub-batches of 4 (`--sub-batches`, the job's `parallel.sub_batches`:
//! every action of the schedule becomes one per sub-batch, side by side, on 3 streams per
//! sub-batch; the activation memory stays the schedule's). The stages are cut where their
//! all-to-alls balance ([`job::balanced_split`]: layers
//! `[3, 1]` for the default model, whose even split `[2, 2]` gives the last stage three MoE
//! blocks against one; `--stage-layers` sets it). Every rank runs on its own OS thread over one
//! in-process hub, as in `actors/tests/parallel.rs`, and all ranks step together (a barrier
//! before each step; a rank's step time is from the barrier to its `step()` returning).
//!
//! **The link.** In-process messages are free, so on their own there is nothing to overlap. A
//! [`DelayNet`] wraps the hub and models a network link on the *wall* clock for the expert
//! all-to-all channel ([`EP_CHANNEL`]) only: a message of `b` bytes from `s` occupies `s`'s egress
//! port for `b / bandwidth` (a port sends one message at a time, in order, like
//! `runtime/src/fabric/sim.rs` but in real time) and arrives a latency after it has left. `send`
//! returns at once — the CPU is not busy while a NIC moves bytes — and a delivery thread (one per
//! network, sleeping on a condition variable, which is finer than tokio's 1 ms timer, and
//! spinning for the last 200 µs where the machine has a core to spare for it) hands the
//! message to the hub at its arrival time. Other channels (stage boundaries, gradient and
//! statistics all-reduces) pass straight through. Per (src, dst, tag) order is kept: deliveries
//! are in arrival order, and a port's arrivals never go backwards.
//!
//! **Communication** of a rank is the time its all-to-alls take on this link alone: for each
//! all-to-all (one tag), the longer of what the rank sends (its port serializes it) and the
//! largest message it receives (it cannot go on before that has arrived), summed over the step
//! ([`LinkUse::a2a_s`]). The egress port's busy time alone (`comm_egress_s`) is reported too; it
//! is smaller when the two directions of an exchange carry different bytes (routing is seldom
//! even per micro-batch), and a ratio against it is reported as
//! `dualpipe_step_over_max_compute_egress`.
//!
//! **The runs** (same process, same config, same data, ranks and a network of their own each):
//! 1. DualPipe on a free link (no delay), with the executor's three ways of overlapping
//!    ([`Overlap`]): streams (the default; `--streams` of them), F&B pairs only, and none.
//!    **compute** is the fastest of the three (the conservative choice: the denominator of the
//!    ratio is never inflated by thread oversubscription). The link counts each rank's
//!    all-to-all bytes (in the sense above).
//! 2. DualPipe on the modelled link, without overlap (communication adds to compute), with the
//!    F&B pairs' halves overlapped, and on streams.
//! 3. 1F1B on the same job, free link and modelled link, for reference: one action at a time, so
//!    nothing hides its all-to-alls.
//!
//! The eight jobs run side by side, one step of one job at a time, in rounds (`runner.rs`), so
//! that the machine's drift lands on all of them alike: `--warmup` + 2 calibration rounds (at
//! least 3) on free links, after which the link's bandwidth is set so that the busiest rank's communication ≈
//! compute (its bytes over the calibration's compute, times `--comm-over-compute`), one round to
//! settle, then `--steps` timed rounds (medians reported; `ratio_per_round` gives the spread,
//! each round's step over that round's compute or the run's median communication).
//! Compute and communication of the timed rounds drift from the calibration's by up to ±10%;
//! the ratio's denominator takes the larger.
//!
//! The ratio is `dualpipe_step_over_max_compute_comm = step(DualPipe, overlap) / max(compute,
//! communication)`, communication being the busiest rank's all-to-all time in the same run.
//! Peak activations (stage micro-batches held at once) come from each rank's executor trace,
//! beside what the DeepSeek-V3 report's table says (1F1B: PP on the first rank, PP − r on rank r;
//! DualPipe: PP + 1 on every rank).
//!
//! **Cores.** Each rank thread is pinned to one allowed CPU (`r mod n`; `--no-pin` turns it
//! off), and the executor's streams (or an F&B pair's halves), started by the rank thread,
//! inherit the pin: they share one core, as they share one GPU in the report, so one can only
//! use the core while the others wait for the link. Without pinning, on a machine with spare
//! cores, they would compute in parallel on several cores and "overlap" would also mean "more
//! compute".
//!
//! **What this does and does not show.** The communication is a model (a sleeping NIC), the
//! compute is real. With fewer cores than ranks (this project's 2-core machine: four ranks), ranks
//! share cores: while one rank waits for its link another rank's compute can use the core, so
//! part of what hides communication there is the OS scheduler between ranks, not DualPipe within a
//! rank; on a shared machine other processes' load lands in every number. The output names the
//! cores and ranks. DualPipe's warm-up (forwards only) and drain (backwards only) phases have no
//! pairs (`unpaired_compute_fraction`: about 44% of the compute with 8 micro-batches at pp = 2,
//! 19% with 16, 10% with 32): with F&B pairs only their all-to-alls stay exposed, the streams
//! overlap them with the next forward or backward. Every all-to-all is also a
//! rendezvous: it completes when the slower of the peers has computed its share and its bytes have
//! arrived, so imbalance between EP peers shows as waiting on any link. With uneven stages
//! (the default model's even split) each F&B pair pairs a half with three times the other's
//! all-to-alls, which the lighter half cannot hide — hence the balanced split. The executor's
//! streams take turns on the core (a baton, [`TurnOrder`]): by default the earliest piece of
//! the schedule first, every F and B before every W (`--turns arrival`: first come, first
//! served); the holder computes until it waits, a W also hands over between its layers.
//!
//! Measured (`docs/benchmarks.md`, "Pipeline", session 7, 16-core H200 host): without overlap
//! the step is 0.87–0.95 × compute + communication on dedicated cores (the MoE layer itself
//! computes the shared expert and this rank's own rows while its all-to-alls are in flight);
//! with the defaults the DualPipe step on streams is 1.066 and 1.137 × max(compute,
//! communication) (communication 0.91 × compute in those runs), against 1.15 with one
//! sub-batch in the same call. Without sub-batches (sessions 5–6) it was 1.19–1.37, median
//! 1.22: `--trace` showed each F or B piece's own chain of compute and all-to-alls to be nearly
//! as long as the F&B pair it has to finish within, and two sub-batches halve that chain.
//!
//! **`--trace FILE`**: the last step of the DualPipe streams run on the link as a Chrome trace
//! (`trace.rs`: every rank's streams, their compute and waits, and its egress port), and a
//! `pipeline_profile` record per rank: compute, idle, what the idle core waited for, and the
//! all-to-all waits split by cause (the peer had not sent yet, on the link, after it was due).
//!
//! The delivery thread asks for a timer slack of 1 ns ([`affinity::precise_timers`]): with
//! Linux's default of 50 µs every message arrived about 50 µs late (more than the modelled
//! latency). The JSON reports the measured lateness (`delivery_late_mean_us`): 7–25 µs with
//! the slack alone, 1–4 µs with the spin.

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
use flotilla_actors::pipeline::executor::TurnOrder;
use flotilla_actors::pipeline::{self, Overlap};
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
    /// Pin rank `r` to the `r mod n`-th allowed CPU.
    pub pin: bool,
    /// Streams of the overlapped executor (`None`: [`Overlap::for_sub_batches`]).
    pub streams: Option<usize>,
    /// Which waiting stream gets the compute first.
    pub turns: TurnOrder,
    /// Write the last step of the DualPipe streams run on the link as a Chrome trace here.
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
            streams: None,
            turns: TurnOrder::default(),
            trace: None,
        }
    }
}

/// Run the benchmark.
pub fn run(a: &PipelineArgs) -> Result<Report> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
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

    let streams = a
        .streams
        .map_or(Overlap::for_sub_batches(a.sub_batches), Overlap::Streams);
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
        "threads_per_rank_in_fb_pair": 2,
        "streams_per_rank": match streams { Overlap::Streams(n) => n, _ => 1 },
        "turn_order": format!("{:?}", a.turns).to_lowercase(),
    }));

    // Every job, built once and stepped in rounds (`runner.rs`).
    let spec = |name, cfg, overlap, link, profile| JobSpec {
        name,
        cfg,
        overlap,
        link,
        profile,
    };
    let jobs = [
        // 1. Compute: DualPipe on a free link, in the executor's three ways of overlapping.
        spec("dualpipe_free_link_streams", &dual, streams, false, false),
        spec(
            "dualpipe_free_link_pairs",
            &dual,
            Overlap::Pairs,
            false,
            false,
        ),
        spec(
            "dualpipe_free_link_no_overlap",
            &dual,
            Overlap::Off,
            false,
            false,
        ),
        // 2. The modelled link: no overlap, F&B pairs, streams.
        spec("dualpipe_link_no_overlap", &dual, Overlap::Off, true, false),
        spec("dualpipe_link_pairs", &dual, Overlap::Pairs, true, false),
        spec(
            "dualpipe_link_streams",
            &dual,
            streams,
            true,
            a.trace.is_some(),
        ),
        // 3. 1F1B for reference, one action at a time as its schedule says.
        spec("1f1b_free_link", &one, Overlap::Off, false, false),
        spec("1f1b_link", &one, Overlap::Off, true, false),
    ];
    // The link from the calibration rounds: compute as the ratio's denominator takes it (the
    // fastest of the three free-link DualPipe jobs), the busiest rank's all-to-all bytes.
    let mut calibration = None;
    let (runs, bw) = runner::run_jobs(
        &jobs,
        a,
        |c| {
            // Jobs 0..3: DualPipe on free links.
            let compute = c
                .step_s
                .iter()
                .take(3)
                .copied()
                .fold(f64::INFINITY, f64::min);
            let bytes = c.a2a_bytes.iter().take(3).copied().max().unwrap_or(0);
            calibration = Some(compute);
            if bytes == 0 {
                bail!("the job sent no expert all-to-all bytes (is ep > 1 and a layer MoE?)");
            }
            Ok(bytes as f64 / (compute * a.comm_over_compute.max(1e-3)))
        },
        &rt,
    )?;
    let [
        free_on,
        free_pairs,
        free_off,
        link_off,
        link_pairs,
        link_on,
        one_free,
        one_link,
    ] = &runs[..]
    else {
        bail!("internal: {} runs for 8 jobs", runs.len());
    };
    let compute_s = free_on.step_s.min(free_off.step_s).min(free_pairs.step_s);

    for r in &runs {
        report.push(r.json());
    }
    if let (Some(path), Some((steps, wires))) = (&a.trace, &link_on.profile) {
        let chrome = trace::chrome(steps, wires);
        std::fs::write(path, serde_json::to_vec(&chrome)?)
            .with_context(|| format!("writing the trace to {}", path.display()))?;
        for rec in trace::summary(steps, wires) {
            report.push(rec);
        }
    }

    let sched_dual = schedule::build(pipeline::kind_of(Schedule::DualPipe), a.pp, a.micro_batches)
        .map_err(|e| anyhow!("{e}"))?;
    let sched_one = schedule::build(pipeline::kind_of(Schedule::OneFOneB), a.pp, a.micro_batches)
        .map_err(|e| anyhow!("{e}"))?;
    let pp_of = |r: usize| r / a.ep;
    // Peaks in micro-batches: the executor counts sub-batches.
    let sub = a.sub_batches.max(1) as f64;
    let in_micro = |p: usize| p as f64 / sub;
    let peak = |run: &Run| {
        run.ranks
            .iter()
            .map(|x| in_micro(x.peak_activations))
            .collect::<Vec<_>>()
    };
    for r in 0..world {
        let pr = pp_of(r);
        let compute_r = free_on.ranks[r]
            .step_s
            .min(free_off.ranks[r].step_s)
            .min(free_pairs.ranks[r].step_s);
        let comm_r = link_on.ranks[r].comm_s;
        report.push(json!({
            "bench": "pipeline_rank", "rank": r, "pp_rank": pr,
            "compute_s": compute_r, "comm_s": comm_r,
            "comm_egress_s": link_on.ranks[r].comm_egress_s,
            "step_no_overlap_s": link_off.ranks[r].step_s,
            "step_overlap_s": link_on.ranks[r].step_s,
            "step_pairs_s": link_pairs.ranks[r].step_s,
            "step_over_max_compute_comm": link_on.ranks[r].step_s / compute_r.max(comm_r),
            "exchange_wait_no_overlap_s": link_off.ranks[r].exchange_wait_s,
            "exchange_wait_overlap_s": link_on.ranks[r].exchange_wait_s,
            "step_1f1b_s": one_link.ranks[r].step_s,
            "peak_activations_1f1b": in_micro(one_link.ranks[r].peak_activations),
            "expected_1f1b": timeline::peak_activations(&sched_one.ranks[pr]),
            "peak_activations_dualpipe": in_micro(link_on.ranks[r].peak_activations),
            "peak_sub_batches_dualpipe": link_on.ranks[r].peak_activations,
            "expected_dualpipe": timeline::peak_activations(&sched_dual.ranks[pr]),
        }));
    }
    let comm_s = link_on.comm_s();
    // Of the compute, the share outside F&B pairs: nothing hides its all-to-alls.
    let unpaired = free_off
        .ranks
        .iter()
        .map(|x| x.unpaired_s / x.busy_s.max(1e-12))
        .fold(0.0, f64::max);
    let ratio = link_on.step_s / compute_s.max(comm_s);
    // The same ratio per round: each round's jobs ran back to back.
    let by_round: Vec<f64> = (0..a.steps)
        .map(|i| {
            let c = [free_on, free_pairs, free_off]
                .iter()
                .map(|r| r.per_step.get(i).copied().unwrap_or(f64::NAN))
                .fold(f64::INFINITY, f64::min);
            link_on.per_step.get(i).copied().unwrap_or(f64::NAN) / c.max(comm_s)
        })
        .collect();
    report.push(json!({"summary": {
        "dualpipe_step_over_max_compute_comm": ratio,
        "ratio_per_round": by_round,
        "link_gbytes_per_s": bw / 1e9,
        "calibration_compute_s": calibration,
        "compute_s": compute_s,
        "compute_overlap_free_link_s": free_on.step_s,
        "compute_no_overlap_free_link_s": free_off.step_s,
        "compute_pairs_free_link_s": free_pairs.step_s,
        "comm_s": comm_s,
        "comm_egress_s": link_on.comm_egress_s(),
        "dualpipe_step_over_max_compute_egress": link_on.step_s / compute_s.max(link_on.comm_egress_s()),
        "step_no_overlap_s": link_off.step_s,
        "step_overlap_s": link_on.step_s,
        "step_pairs_s": link_pairs.step_s,
        "pairs_step_over_max_compute_comm": link_pairs.step_s / compute_s.max(comm_s),
        "no_overlap_over_sum": link_off.step_s / (compute_s + link_off.comm_s()),
        "unpaired_compute_fraction": unpaired,
        "step_1f1b_s": one_link.step_s,
        "compute_1f1b_s": one_free.step_s,
        "peak_activations_1f1b": peak(one_link),
        "peak_activations_dualpipe": peak(link_on),
        "expected_peak_1f1b_max": a.pp,
        "expected_peak_dualpipe": a.pp + 1,
        "ranks": world,
        "cores": cores,
        "pinned": pinned,
    }}));
    Ok(report)
}

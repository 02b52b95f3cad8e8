//! `flotilla bench ...`: parse the benchmark flags and print the report.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::bench::actors::{self, ActorBenchArgs};
use crate::bench::step;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Actor messaging (msgs/s, call latency p50/p99) and in-process fabric bandwidth vs memcpy.
    Actors(ActorsArgs),
    /// Checkpoint cost: async stall vs sync save, persist vs raw write+fsync, restore times.
    Ckpt(CkptArgs),
    /// Training-step throughput vs the raw GEMM rate on the same shapes: tokens/s, GFLOP/s and
    /// peak RSS on the CPU; with --device cuda, MFU, peak GPU memory, where the compute thread's
    /// time goes and the ratios against PyTorch (each record printed as soon as it is measured).
    Step(StepArgs),
    /// Collectives over the in-process and QUIC fabrics (time, algbw, busbw) vs memcpy; QUIC vs bare quinn and TCP between two processes.
    Collectives(crate::bench::collectives::CollectivesArgs),
    /// NCCL all-reduce / all-to-all bus bandwidth between this host's GPUs (feature `cuda`).
    #[cfg(feature = "cuda")]
    Nccl(NcclArgs),
    /// DualPipe's compute/all-to-all overlap on a modelled link vs compute and communication alone; 1F1B; peak activations.
    Pipeline(PipelineArgs),
    /// The simulated cluster at scale (default: DeepSeek-V3-shaped, 128 ranks): wall time and peak memory of the simulation beside its virtual step time, bubble and MFU.
    Sim(SimArgs),
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Print JSON lines (the last is the summary).
    #[arg(long)]
    json: bool,
    /// A simulated-cluster config (`cluster.device = "sim"`); default: configs/deepseek-v3-128.toml's job.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Optimizer steps (overrides `job.steps`).
    #[arg(long)]
    steps: Option<u64>,
    /// Write the run's files (metrics, events, summary, trace.json) to this directory.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// Print JSON lines (the last is the summary).
    #[arg(long)]
    json: bool,
    /// Pipeline ranks (even, for DualPipe).
    #[arg(long, default_value_t = 2)]
    pp: usize,
    /// Expert-parallel ranks (at least 2: the all-to-all is what is measured).
    #[arg(long, default_value_t = 2)]
    ep: usize,
    /// Micro-batches per step (even, at least 2·pp).
    #[arg(long, default_value_t = 32)]
    micro_batches: usize,
    /// Each micro-batch runs as this many sub-batches (`parallel.sub_batches`): more all-to-alls
    /// in flight within DualPipe's activation memory.
    #[arg(long, default_value_t = 2,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=8))]
    sub_batches: usize,
    /// Global batch, sequences (divisible by ep · micro-batches · sub-batches).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Sequence length, tokens.
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Decoder layers of the built-in model.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// The first layers with a dense FFN instead of MoE.
    #[arg(long, default_value_t = 1)]
    dense_layers: usize,
    /// MTP modules.
    #[arg(long, default_value_t = 1)]
    mtp_depth: usize,
    /// Decoder layers per pipeline stage, e.g. `3,1` (default: the split that balances the
    /// stages' MoE layers, counting the MTP modules on the last).
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    stage_layers: Vec<usize>,
    /// Warm-up rounds; with two more (at least 3 in all) they calibrate the link, and one more
    /// lets it settle, all untimed.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed rounds, one step of every run each (medians are reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// One-way latency of each modelled all-to-all message, microseconds.
    #[arg(long, default_value_t = 10.0)]
    latency_us: f64,
    /// Modelled communication time as a multiple of compute (the link's bandwidth is set from it).
    #[arg(long, default_value_t = 1.0)]
    comm_over_compute: f64,
    /// Do not pin rank r's compute thread to one core.
    #[arg(long)]
    no_pin: bool,
    /// Stage actions in progress at once per stage actor in the DualPipe runs, 1 to 64
    /// (default: 3 per sub-batch, as `flotilla train`).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    window: Option<usize>,
    /// Write the last step of the DualPipe run on the modelled link to FILE as a Chrome trace
    /// (Perfetto, chrome://tracing); the JSON gains a profile record per rank.
    #[arg(long, value_name = "FILE")]
    trace: Option<std::path::PathBuf>,
}

#[cfg(feature = "cuda")]
#[derive(Debug, Args)]
pub struct NcclArgs {
    /// Print JSON lines.
    #[arg(long)]
    json: bool,
    /// GPUs to use (all when absent).
    #[arg(long)]
    gpus: Option<usize>,
    /// One process per GPU instead of one thread per GPU.
    #[arg(long)]
    procs: bool,
    /// Internal: run as worker rank R of a `--procs` run.
    #[arg(long, hide = true, requires_all = ["world", "nccl_id"])]
    worker_rank: Option<usize>,
    #[arg(long, hide = true)]
    world: Option<usize>,
    #[arg(long, hide = true)]
    nccl_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct CkptArgs {
    /// Print JSON lines (the last is the summary).
    #[arg(long)]
    json: bool,
    /// Size of the synthetic rank state (parameters and AdamW moments), MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: usize,
    /// Rounds of (async save, direct write, sync save, raw write); medians are reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Directory for the checkpoint files and the raw-write baseline (the system temp dir when
    /// absent); a fresh subdirectory is made and removed.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct StepArgs {
    /// Print JSON lines (the last is the summary).
    #[arg(long)]
    json: bool,
    /// Job config whose model and batch to measure (the built-in default when absent).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Run on this device instead of the config's `cluster.device` ("cuda" needs a binary built
    /// with `--features cuda`).
    #[arg(long, value_parser = ["cpu", "cuda"])]
    device: Option<String>,
    /// With --device cuda: `tools/bench/torch_baseline.py`'s JSON output, for the summary's
    /// ratios against PyTorch eager and torch.compile (fp32 master weights with bf16 autocast,
    /// and, from its `--weights bf16` lines, the whole model in bf16).
    #[arg(long)]
    torch: Option<std::path::PathBuf>,
    /// With --device cuda: the GPU's dense bf16 peak in TFLOP/s, MFU's denominator (H100 and
    /// H200 SXM: 989).
    #[arg(long, default_value_t = 989.0)]
    peak_tflops: f64,
    /// With --device cuda: the GPU's memory bandwidth in GB/s, for the kernel table (H100 SXM:
    /// 3350; H200: 4800).
    #[arg(long, default_value_t = 3350.0)]
    peak_gbps: f64,
    /// With --device cuda: also profile one training step (forward+backward, Σg², the clip,
    /// AdamW) kernel by kernel, four times: with the device's defaults (as --expert-gemm
    /// kernel-w --attention fused), then with --expert-gemm batched, kernel and cublas.
    #[arg(long)]
    kernels: bool,
    /// With --device cuda: what runs the routed experts' GEMMs in bf16 for the timed steps:
    /// "kernel-w" (Flotilla's grouped kernel for the weight gradients, cuBLAS' grouped GEMM in
    /// TF32 for the forward and input gradients; the default), "batched" (as kernel-w, but the
    /// forward and input gradients' whole 128-row tiles by cuBLAS' batched GEMM in bf16 and
    /// the rows left over by the kernel), "kernel" (the kernel for all), "cublas" (cuBLAS'
    /// grouped GEMM for all) or "per-expert" (one cuBLAS GEMM per expert).
    #[arg(long, value_parser = ["kernel-w", "batched", "kernel", "cublas", "per-expert"])]
    expert_gemm: Option<String>,
    /// With --device cuda: what runs bf16 attention for the timed steps: "fused" (flash.cu's
    /// kernels; the default) or "cublas" (GEMMs around kept probabilities).
    #[arg(long, value_parser = ["fused", "cublas"])]
    attention: Option<String>,
}

#[derive(Debug, Args)]
pub struct ActorsArgs {
    /// Print JSON lines (the last is the summary).
    #[arg(long)]
    json: bool,
    /// Messages in the throughput test.
    #[arg(long, default_value_t = 1_000_000)]
    messages: usize,
    /// Round trips in the latency test.
    #[arg(long, default_value_t = 20_000)]
    round_trips: usize,
    /// Tensor size for the fabric test, MiB.
    #[arg(long, default_value_t = 64)]
    tensor_mib: usize,
}

pub fn run(cmd: BenchCmd) -> Result<ExitCode> {
    match cmd {
        BenchCmd::Actors(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            let args = ActorBenchArgs {
                messages: a.messages,
                round_trips: a.round_trips,
                tensor_mib: a.tensor_mib,
                ..ActorBenchArgs::default()
            };
            let mut report = rt.block_on(actors::run(&args))?;
            report.print(a.json);
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "cuda")]
        BenchCmd::Nccl(a) => {
            if let (Some(r), Some(w), Some(id)) = (a.worker_rank, a.world, a.nccl_id.as_deref()) {
                crate::bench::nccl::run_worker(r, w, id)?;
            } else {
                crate::bench::nccl::run(a.gpus, a.procs)?.print(a.json);
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Ckpt(a) => {
            anyhow::ensure!(a.size_mib > 0, "--size-mib must be at least 1");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            let dir = a.dir.unwrap_or_else(std::env::temp_dir);
            rt.block_on(crate::bench::ckpt::run(a.size_mib, a.reps, &dir))?
                .print(a.json);
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Collectives(a) => {
            crate::bench::collectives::run(&a)?.print(a.json);
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Pipeline(a) => {
            anyhow::ensure!(
                a.ep >= 2,
                "--ep must be at least 2 (the all-to-all is what is measured)"
            );
            let args = crate::bench::pipeline::PipelineArgs {
                pp: a.pp,
                ep: a.ep,
                micro_batches: a.micro_batches,
                sub_batches: a.sub_batches,
                batch: a.batch,
                seq: a.seq,
                layers: a.layers,
                dense_layers: a.dense_layers,
                mtp_depth: a.mtp_depth,
                stage_layers: a.stage_layers,
                warmup: a.warmup,
                steps: a.steps,
                latency_us: a.latency_us,
                comm_over_compute: a.comm_over_compute,
                pin: !a.no_pin,
                window: a.window,
                trace: a.trace,
            };
            let mut report = crate::bench::pipeline::run(&args)?;
            if a.json {
                report.print(true);
            } else {
                crate::bench::pipeline::print_table(&report);
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Sim(a) => {
            let mut cfg = match &a.config {
                Some(p) => {
                    flotilla_runtime::config::Config::load(p).map_err(|e| anyhow::anyhow!("{e}"))?
                }
                None => flotilla_runtime::config::Config::from_toml_str(
                    include_str!("../../configs/deepseek-v3-128.toml"),
                    "configs/deepseek-v3-128.toml",
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            };
            if let Some(s) = a.steps {
                cfg.job.steps = s;
                cfg.optimizer.warmup_steps = cfg.optimizer.warmup_steps.min(s);
            }
            crate::bench::sim::run(cfg, a.out.as_deref())?.print(a.json);
            Ok(ExitCode::SUCCESS)
        }
        BenchCmd::Step(a) => {
            let cfg = match &a.config {
                Some(p) => {
                    flotilla_runtime::config::Config::load(p).map_err(|e| anyhow::anyhow!("{e}"))?
                }
                None => flotilla_runtime::config::Config::default(),
            };
            let mut cfg = cfg;
            match a.device.as_deref() {
                Some("cuda") => cfg.cluster.device = flotilla_runtime::config::DeviceKind::Cuda,
                Some(_) => cfg.cluster.device = flotilla_runtime::config::DeviceKind::Cpu,
                None => {}
            }
            // The overridden device must still fit the config (a simulated fabric, bf16 on
            // the CPU): the same rules, the same messages as a config file's.
            cfg.validate()
                .map_err(|e| anyhow::anyhow!("bench step --device: {e}"))?;
            let cuda = cfg.cluster.device == flotilla_runtime::config::DeviceKind::Cuda;
            anyhow::ensure!(
                cuda || (a.torch.is_none()
                    && !a.kernels
                    && a.expert_gemm.is_none()
                    && a.attention.is_none()),
                "--torch, --kernels, --expert-gemm and --attention need --device cuda"
            );
            let gpu = step::GpuOptions {
                torch: a.torch.clone(),
                peak_tflops: a.peak_tflops,
                peak_gbps: a.peak_gbps,
                kernels: a.kernels,
                expert_gemm: a.expert_gemm.clone(),
                attention: a.attention.clone(),
            };
            // The bench prints each record as it is measured.
            step::run(&cfg, a.warmup, a.steps, &gpu, a.json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

//! `flotilla bench step`: training-step throughput of a job as `flotilla train` runs it (its
//! actor tree, its compute streams; tokens/s, achieved GFLOP/s, peak memory) beside the raw GEMM
//! rate on the step's own GEMM shapes, measured in the same run: the same GEMM crate and thread
//! count on the CPU, cuBLAS on the GPU (`--device cuda`, which adds MFU, a per-kernel table,
//! the ratios against PyTorch and where the compute thread's time goes: its jobs by kind and
//! each device operation's host time, `step_cuda.rs`).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use flotilla_actors::job::{Job, Launch};
use flotilla_model::device::{Mat, MatMut};
use flotilla_model::flops::{step_flops, step_gemm_shapes};
use flotilla_model::{CpuDevice, Device};
use flotilla_runtime::clock::RealClock;
use flotilla_runtime::config::Config;
use flotilla_runtime::storage::sim::SimStorage;
use serde_json::json;

use super::Report;

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// What the timed steps of a job took.
#[derive(Clone, Debug, Default)]
struct Timed {
    /// Wall seconds per step.
    step_secs: f64,
    /// Tokens trained in all the timed steps.
    tokens: u64,
    /// Per step, the seconds the device reported for its work (on a GPU: from the first
    /// operation to the last of each job, idle gaps inside a job included).
    device_secs: f64,
    /// Per step, the seconds the compute thread spent in jobs: running them (on the CPU), or
    /// issuing them and waiting where one hands a result to the host (on a GPU).
    busy_secs: f64,
    /// The last step's jobs on rank 0, by kind: (what, how many, seconds).
    jobs: Vec<(&'static str, u64, f64)>,
}

/// The jobs of one rank's step, summed by kind (most time first).
fn jobs_by_kind(spans: &[flotilla_actors::stream::Span]) -> Vec<(&'static str, u64, f64)> {
    let mut by: std::collections::BTreeMap<&'static str, (u64, f64)> = Default::default();
    for s in spans {
        let e = by.entry(s.what).or_default();
        e.0 += 1;
        e.1 += s.end - s.start;
    }
    let mut v: Vec<_> = by.into_iter().map(|(w, (n, t))| (w, n, t)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}

/// Runs `warmup` then `steps` steps; `timing` is called as the timed steps begin.
async fn timed(job: &mut Job, warmup: usize, steps: usize, timing: fn()) -> Result<Timed> {
    let mut t = Timed::default();
    for s in 0..warmup + steps {
        if s == warmup {
            timing();
        }
        let start = Instant::now();
        let all = job.step(s as u64).await?;
        if s >= warmup {
            t.step_secs += start.elapsed().as_secs_f64();
            if let Some(r0) = all.first() {
                t.tokens += r0.tokens;
                t.device_secs += r0.device_seconds;
                t.busy_secs += r0.busy_seconds;
            }
        }
    }
    if let Some(last) = (warmup + steps).checked_sub(1) {
        let trace = job.trace(last as u64).await?;
        t.jobs = trace.first().map(|s| jobs_by_kind(s)).unwrap_or_default();
    }
    let n = steps.max(1) as f64;
    t.step_secs /= n;
    t.device_secs /= n;
    t.busy_secs /= n;
    Ok(t)
}

/// `cfg` as the bench runs it: no checkpoints or metrics files, a schedule long enough.
fn bench_config(cfg: &Config, warmup: usize, steps: usize) -> Config {
    let mut cfg = cfg.clone();
    cfg.checkpoint.interval = 0;
    cfg.metrics.jsonl = false;
    // The bench takes the steps itself; `job.steps` only sets the LR schedule's length, kept
    // at least the config's (its warm-up must fit in it).
    cfg.job.steps = cfg.job.steps.max((warmup + steps) as u64);
    cfg
}

/// The job's timed steps (`timing` is called as they begin).
fn timed_job(cfg: &Config, warmup: usize, steps: usize, timing: fn()) -> Result<Timed> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let storage = Arc::new(SimStorage::unlimited());
        let mut job = Job::start(
            cfg.clone(),
            storage,
            Arc::new(RealClock),
            true,
            Launch::default(),
        )
        .await?;
        let r = timed(&mut job, warmup, steps, timing).await;
        job.stop().await?;
        r
    })
}

/// What `--device cuda` adds to the bench (read only by a binary built with `--features cuda`).
#[derive(Clone, Debug, Default)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct GpuOptions {
    /// `tools/bench/torch_baseline.py`'s output, for the ratios.
    pub torch: Option<std::path::PathBuf>,
    /// The GPU's dense bf16 peak, TFLOP/s (MFU's denominator).
    pub peak_tflops: f64,
    /// The GPU's memory bandwidth, GB/s (for the per-kernel table).
    pub peak_gbps: f64,
    /// Also profile one training step kernel by kernel.
    pub kernels: bool,
    /// The timed steps' expert GEMMs ("kernel-w", "batched", "kernel", "cublas", "per-expert"; `None`:
    /// the device's default).
    pub expert_gemm: Option<String>,
    /// The timed steps' attention ("fused", "cublas"; `None`: the device's default).
    pub attention: Option<String>,
}

/// Run `warmup` then `steps` timed training steps of `cfg`'s job, then the GEMM baseline; each
/// record is printed as soon as it is measured (as JSON with `json`).
pub fn run(
    cfg: &Config,
    warmup: usize,
    steps: usize,
    gpu: &GpuOptions,
    json: bool,
) -> Result<Report> {
    ensure!(
        cfg.world_size() == 1,
        "bench step measures one rank: pp = ep = dp = 1"
    );
    if cfg.cluster.device == flotilla_runtime::config::DeviceKind::Cuda {
        return run_cuda(cfg, warmup, steps, gpu, json);
    }
    let cfg = bench_config(cfg, warmup, steps);
    let mut report = Report::live(json);
    let Timed {
        step_secs, tokens, ..
    } = timed_job(&cfg, warmup, steps, || {})?;
    let mcfg = flotilla_actors::model_config::model_config(&cfg.model)?;
    let mtp = mcfg.num_nextn_predict_layers;
    let (batch, seq) = (cfg.data.batch_size, cfg.data.seq_len);
    let flops = step_flops(&mcfg, batch, seq, mtp);
    let step_gflops = flops.total() / step_secs / 1e9;
    let tokens_per_s = tokens as f64 / (step_secs * steps.max(1) as f64);
    report.push(json!({
        "bench": "train_step", "batch": batch, "seq": seq, "steps": steps,
        "step_ms": step_secs * 1e3, "tokens_per_s": tokens_per_s,
        "gemm_flops_per_step": flops.total(), "achieved_gflops": step_gflops,
    }));

    // Baseline: every GEMM of the step, on the same crate and thread count, nothing else.
    let threads = cfg
        .cluster
        .cpu_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dev = CpuDevice::new(threads);
    let shapes = step_gemm_shapes(&mcfg, batch, seq, mtp);
    let mut total_flops = 0.0;
    let mut total_secs = 0.0;
    for s in &shapes {
        let a = dev.upload(&[s.m, s.k], &vec![0.5; s.m * s.k]);
        let b = dev.upload(&[s.k, s.n], &vec![0.25; s.k * s.n]);
        let mut c = dev.zeros(&[s.m, s.n]);
        dev.gemm(MatMut::all(&mut c), Mat::all(&a), Mat::all(&b), false);
        let reps = s.count.max(1) * 3;
        let t = Instant::now();
        for _ in 0..reps {
            dev.gemm(MatMut::all(&mut c), Mat::all(&a), Mat::all(&b), false);
        }
        total_secs += t.elapsed().as_secs_f64();
        total_flops += 2.0 * (s.m * s.n * s.k * reps) as f64;
    }
    let gemm_gflops = total_flops / total_secs.max(1e-12) / 1e9;
    report.push(json!({
        "bench": "raw_gemm_same_shapes", "shapes": shapes.len(), "threads": threads,
        "gflops": gemm_gflops,
    }));
    let rss = peak_rss_mib();
    report.push(json!({"summary": {
        "step_over_gemm": step_gflops / gemm_gflops,
        "tokens_per_s": tokens_per_s,
        "peak_rss_mib": rss,
    }}));
    Ok(report)
}

/// The bench on the GPU: the job's timed steps (its peak pool memory), cuBLAS on the step's
/// GEMM shapes, MFU, the optional per-kernel table and the ratios against PyTorch.
#[cfg(feature = "cuda")]
fn run_cuda(
    cfg: &Config,
    warmup: usize,
    steps: usize,
    gpu: &GpuOptions,
    json: bool,
) -> Result<Report> {
    use super::step_cuda;
    let cfg = bench_config(cfg, warmup, steps);
    let mcfg = flotilla_actors::model_config::model_config(&cfg.model)?;
    let name = step_cuda::gpu_name(&cfg)?;
    let choice = step_cuda::kernel_choice(gpu.expert_gemm.as_deref(), gpu.attention.as_deref())?;
    step_cuda::use_kernels(choice);
    let mut report = Report::live(json);
    step_cuda::reset_peak();
    let timed = timed_job(&cfg, warmup, steps, step_cuda::start_host_timing)?;
    let host = step_cuda::host_times(steps);
    let (step_secs, tokens) = (timed.step_secs, timed.tokens);
    let peak_mib = step_cuda::peak_mib();
    let mtp = mcfg.num_nextn_predict_layers;
    let (batch, seq) = (cfg.data.batch_size, cfg.data.seq_len);
    let flops = step_flops(&mcfg, batch, seq, mtp);
    let tokens_per_s = tokens as f64 / (step_secs * steps.max(1) as f64);
    let achieved = flops.total() / step_secs;
    let mfu = achieved / (gpu.peak_tflops * 1e12);
    report.push(json!({
        "bench": "train_step", "device": "cuda", "gpu": name,
        "precision": cfg.model.precision.as_str(), "batch": batch, "seq": seq, "steps": steps,
        "step_ms": step_secs * 1e3, "tokens_per_s": tokens_per_s,
        "flops_per_step": flops.total(), "achieved_tflops": achieved / 1e12, "mfu": mfu,
        "peak_gpu_mib": peak_mib,
        "gpu_ms_per_step": timed.device_secs * 1e3,
        "compute_thread_ms_per_step": timed.busy_secs * 1e3,
        "expert_gemm": step_cuda::expert_gemm_name(choice),
        "attention": if choice.fused_attention { "fused" } else { "cublas" },
    }));
    // Where the compute thread's time goes: its jobs by kind (the last step), and the device
    // operations' own host time (launching, or waiting for a result the host needs).
    for (what, n, secs) in &timed.jobs {
        report.push(json!({
            "bench": "step_job", "what": what, "jobs": n, "ms": secs * 1e3,
        }));
    }
    for h in host {
        report.push(h);
    }
    let shapes = step_gemm_shapes(&mcfg, batch, seq, mtp);
    let gemm_gflops = step_cuda::raw_gemm(&cfg, &shapes)?;
    report.push(json!({
        "bench": "raw_gemm_same_shapes", "device": "cuda", "shapes": shapes.len(),
        "tflops": gemm_gflops / 1e3,
    }));
    if gpu.kernels {
        // The device's defaults (the experts' W by the bf16 kernel, their forward and B grouped
        // by cuBLAS, fused attention) and, beside them, their forward and B by whole tiles in
        // cuBLAS' batched call, every expert GEMM by the kernel, and all by cuBLAS' grouped
        // call. (The other choices are `--expert-gemm per-expert` and `--attention cublas` for
        // the timed steps.)
        use flotilla_model::device::cuda::ExpertKernel;
        let variants = [
            (ExpertKernel::Weights, true, true),
            (ExpertKernel::Batched, true, true),
            (ExpertKernel::All, true, true),
            (ExpertKernel::Off, true, true),
        ];
        for (expert_kernel, grouped, fused_attention) in variants {
            let v = flotilla_model::device::cuda::KernelChoice {
                expert_kernel,
                grouped,
                fused_attention,
            };
            for mut row in step_cuda::kernel_table(&cfg, &mcfg, gpu.peak_tflops, gpu.peak_gbps, v)?
            {
                row["bench"] = json!("kernel");
                report.push(row);
            }
        }
    }
    let torch = match &gpu.torch {
        Some(p) => step_cuda::torch_rates(p)?,
        None => step_cuda::TorchRates::default(),
    };
    let over = |t: Option<f64>| t.map(|t| tokens_per_s / t);
    report.push(json!({"summary": {
        "gpu": name,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_gpu_mib": peak_mib,
        "step_over_gemm": achieved / (gemm_gflops * 1e9),
        // Against PyTorch in Flotilla's precision (fp32 master weights, bf16 products) …
        "over_torch_eager": over(torch.eager),
        "over_torch_compile": over(torch.compile),
        // … and against PyTorch with the whole model in bf16.
        "over_torch_bf16_weights_eager": over(torch.bf16_eager),
        "over_torch_bf16_weights_compile": over(torch.bf16_compile),
    }}));
    Ok(report)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(
    _cfg: &Config,
    _warmup: usize,
    _steps: usize,
    _gpu: &GpuOptions,
    _json: bool,
) -> Result<Report> {
    anyhow::bail!(
        "bench step --device cuda: this binary was built without the CUDA device; build it with \
         `cargo build --release --features cuda`"
    )
}

//! `flotilla bench step --device cuda` (feature `cuda`): what the GPU side of the step bench adds
//! — cuBLAS on the step's own GEMM shapes as the baseline, a per-kernel profile of one training
//! step of the same model and batch, the memory pool's peak, and the ratios against
//! PyTorch from `tools/bench/torch_baseline.py`'s output.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use flotilla_model::device::cuda::{self, CudaDevice, ExpertKernel, KernelChoice};
use flotilla_model::device::{Mat, MatMut};
use flotilla_model::flops::GemmShape;
use flotilla_model::optim::{AdamW, AdamWConfig, ParamRef, clip_scale};
use flotilla_model::params::Selection;
use flotilla_model::rng::Rng;
use flotilla_model::{Batch, DeepSeekV3, Device, ModelConfig, StepOptions};
use flotilla_runtime::config::Config;
use serde_json::{Value, json};

fn device(cfg: &Config) -> Result<CudaDevice> {
    CudaDevice::new(0, flotilla_actors::store::cuda_precision(cfg))
        .context("starting the CUDA device on GPU 0")
}

/// The kernels for the timed steps from `bench step`'s `--expert-gemm` and `--attention` (the
/// device's defaults where absent).
pub fn kernel_choice(expert_gemm: Option<&str>, attention: Option<&str>) -> Result<KernelChoice> {
    let mut c = KernelChoice::default();
    match expert_gemm {
        None => {}
        Some("kernel-w") => c.expert_kernel = ExpertKernel::Weights,
        Some("kernel") => c.expert_kernel = ExpertKernel::All,
        Some("batched") => c.expert_kernel = ExpertKernel::Batched,
        Some("cublas") => c.expert_kernel = ExpertKernel::Off,
        Some("per-expert") => {
            c.expert_kernel = ExpertKernel::Off;
            c.grouped = false;
        }
        Some(other) => {
            bail!("--expert-gemm {other:?}: kernel-w, kernel, batched, cublas or per-expert")
        }
    }
    match attention {
        None => {}
        Some("fused") => c.fused_attention = true,
        Some("cublas") => c.fused_attention = false,
        Some(other) => bail!("--attention {other:?}: fused or cublas"),
    }
    Ok(c)
}

/// Makes `c` what every CUDA device of this process starts with (the job's devices are made by
/// its actors).
pub fn use_kernels(c: KernelChoice) {
    cuda::set_start_kernels(c);
}

/// `--expert-gemm`'s name for `c`.
pub fn expert_gemm_name(c: KernelChoice) -> &'static str {
    match (c.expert_kernel, c.grouped) {
        (ExpertKernel::All, _) => "kernel",
        (ExpertKernel::Weights, _) => "kernel-w",
        (ExpertKernel::Batched, _) => "batched",
        (ExpertKernel::Off, true) => "cublas",
        (ExpertKernel::Off, false) => "per-expert",
    }
}

/// The name of GPU 0.
pub fn gpu_name(cfg: &Config) -> Result<String> {
    Ok(device(cfg)?.gpu_name().to_owned())
}

/// Switches the device operations' host timing on, and forgets what it counted so far (as the
/// timed steps begin).
pub fn start_host_timing() {
    cuda::set_host_timing(true);
    cuda::take_host_times();
}

/// The operations' host time per step over the timed `steps` (the most expensive first), and
/// host timing off.
pub fn host_times(steps: usize) -> Vec<Value> {
    cuda::set_host_timing(false);
    let n = steps.max(1) as f64;
    cuda::take_host_times()
        .into_iter()
        .take(20)
        .map(|h| {
            json!({
                "bench": "host_op", "op": h.name, "calls_per_step": h.calls as f64 / n,
                "ms_per_step": h.seconds * 1e3 / n,
            })
        })
        .collect()
}

/// Forgets the memory pool's peak (before the timed job).
pub fn reset_peak() {
    cuda::reset_pool_peak(0);
}

/// The memory pool's peak since [`reset_peak`], in MiB.
pub fn peak_mib() -> Option<f64> {
    cuda::pool_peak_bytes(0).map(|b| b as f64 / (1u64 << 20) as f64)
}

/// cuBLAS alone on every GEMM shape of the step (each as often as the step runs it): GFLOP/s.
pub fn raw_gemm(cfg: &Config, shapes: &[GemmShape]) -> Result<f64> {
    let dev = device(cfg)?;
    let mut flops = 0.0;
    let mut secs = 0.0;
    for s in shapes {
        let a = dev.upload(&[s.m, s.k], &vec![0.5; s.m * s.k]);
        let b = dev.upload(&[s.k, s.n], &vec![0.25; s.k * s.n]);
        let mut c = dev.zeros(&[s.m, s.n]);
        dev.gemm(MatMut::all(&mut c), Mat::all(&a), Mat::all(&b), false);
        dev.synchronize();
        let reps = s.count.max(1) * 3;
        let t = Instant::now();
        for _ in 0..reps {
            dev.gemm(MatMut::all(&mut c), Mat::all(&a), Mat::all(&b), false);
        }
        dev.synchronize();
        secs += t.elapsed().as_secs_f64();
        flops += 2.0 * (s.m * s.n * s.k * reps) as f64;
    }
    Ok(flops / secs.max(1e-12) / 1e9)
}

/// One profiled training step of the model on a batch of random tokens (after one untimed one),
/// as the job's store runs it: gradients zeroed, forward+backward, Σg², the clip and AdamW with
/// the job's optimizer settings. Each kernel's calls, time, share of the step, and achieved
/// TFLOP/s or GB/s beside the GPU's peaks (`peak_tflops`, `peak_gbps`).
pub fn kernel_table(
    cfg: &Config,
    mcfg: &ModelConfig,
    peak_tflops: f64,
    peak_gbps: f64,
    v: KernelChoice,
) -> Result<Vec<Value>> {
    let dev = device(cfg)?;
    dev.set_grouped_gemm(v.grouped);
    dev.set_expert_kernel(v.expert_kernel);
    dev.set_fused_attention(v.fused_attention);
    let mut model = DeepSeekV3::init(mcfg, &dev, cfg.job.seed).context("model init")?;
    let (b, t) = (cfg.data.batch_size, cfg.data.seq_len);
    let mut rng = Rng::new(cfg.job.seed);
    let ids: Vec<u32> = (0..b * t)
        .map(|_| (rng.next_u64() % mcfg.vocab_size as u64) as u32)
        .collect();
    let batch = Batch::causal(ids, b, t);
    let opts = StepOptions::from_config(mcfg);
    let mut grads = model.zero_grads(&dev);
    let names: Vec<String> = model.weights.trainable().into_keys().collect();
    let sel = Selection::of(&grads, &names);
    let o = &cfg.optimizer;
    let mut opt = AdamW::new(AdamWConfig {
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weight_decay: o.weight_decay,
    })
    .context("the optimizer settings")?;
    let mut pass = |profile: bool| -> Result<()> {
        dev.set_profiling(profile);
        let mut held = sel.take(&mut grads);
        dev.fill_many(&mut held.iter_mut().collect::<Vec<_>>(), 0.0);
        sel.put_back(&mut grads, held);
        model
            .forward_backward(&dev, &batch, &opts, &mut grads)
            .map_err(|e| anyhow::anyhow!("forward_backward: {e}"))?;
        let norm = dev.sum_squares(&sel.refs(&grads)).sqrt();
        let scale = clip_scale(norm, o.grad_clip);
        let gs = sel.take(&mut grads);
        let mut vs = sel.take(&mut model.weights);
        let mut refs: Vec<ParamRef<'_>> = vs
            .iter_mut()
            .zip(&gs)
            .zip(&names)
            .map(|((value, grad), name)| ParamRef {
                name,
                decay: value.shape().len() >= 2,
                value,
                grad,
            })
            .collect();
        opt.step_scaled(&dev, o.lr, scale, &mut refs)
            .map_err(|e| anyhow::anyhow!("AdamW: {e}"))?;
        sel.put_back(&mut model.weights, vs);
        sel.put_back(&mut grads, gs);
        dev.synchronize();
        Ok(())
    };
    pass(false)?;
    let _ = dev.take_profile();
    pass(true)?;
    let table = dev.take_profile();
    let total: f64 = table.iter().map(|k| k.seconds).sum();
    Ok(table
        .iter()
        .map(|k| {
            let tflops = k.flops / k.seconds.max(1e-12) / 1e12;
            let gbps = k.bytes / k.seconds.max(1e-12) / 1e9;
            json!({
                "kernel": k.name, "expert_gemm": expert_gemm_name(v),
                "fused_attention": v.fused_attention, "calls": k.calls, "ms": k.seconds * 1e3,
                "share": k.seconds / total.max(1e-12),
                "tflops": tflops, "pct_peak_tflops": 100.0 * tflops / peak_tflops,
                "gbps": gbps, "pct_peak_gbps": 100.0 * gbps / peak_gbps,
            })
        })
        .collect())
}

/// PyTorch's tokens/s from `tools/bench/torch_baseline.py`'s output, by the model's weights
/// (`"fp32"`: fp32 master weights with bf16 autocast, Flotilla's bf16 mode; `"bf16"`: the whole
/// model in bf16) and mode (`"eager"`, `"compile"`). A line without `weights` is fp32 (the
/// script's default).
#[derive(Clone, Copy, Debug, Default)]
pub struct TorchRates {
    pub eager: Option<f64>,
    pub compile: Option<f64>,
    pub bf16_eager: Option<f64>,
    pub bf16_compile: Option<f64>,
}

pub fn torch_rates(path: &Path) -> Result<TorchRates> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the PyTorch results {}", path.display()))?;
    let mut r = TorchRates::default();
    for (i, line) in text.lines().enumerate() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v.get("bench").and_then(Value::as_str) != Some("torch_baseline") {
            continue;
        }
        let Some(tps) = v.get("tokens_per_s").and_then(Value::as_f64) else {
            bail!(
                "{}:{}: a torch_baseline line without tokens_per_s",
                path.display(),
                i + 1
            );
        };
        let weights = v.get("weights").and_then(Value::as_str).unwrap_or("fp32");
        let slot = match (weights, v.get("mode").and_then(Value::as_str)) {
            ("fp32", Some("eager")) => &mut r.eager,
            ("fp32", Some("compile")) => &mut r.compile,
            ("bf16", Some("eager")) => &mut r.bf16_eager,
            ("bf16", Some("compile")) => &mut r.bf16_compile,
            (w, m) => bail!(
                "{}:{}: unknown weights {w:?} or mode {m:?}",
                path.display(),
                i + 1
            ),
        };
        *slot = Some(tps);
    }
    if [r.eager, r.compile, r.bf16_eager, r.bf16_compile]
        .iter()
        .all(Option::is_none)
    {
        bail!("{}: no torch_baseline line in it", path.display());
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `--expert-gemm` value names the choice it makes, and a bad one is refused.
    #[test]
    fn expert_gemm_flags_round_trip() {
        for name in ["kernel-w", "batched", "kernel", "cublas", "per-expert"] {
            let c = kernel_choice(Some(name), Some("cublas")).expect("a known value");
            assert_eq!(expert_gemm_name(c), name);
            assert!(!c.fused_attention);
        }
        let c = kernel_choice(None, None).expect("the defaults");
        assert_eq!(c, KernelChoice::default());
        assert!(kernel_choice(Some("cudnn"), None).is_err());
        assert!(kernel_choice(None, Some("flash3")).is_err());
    }
}

//! `flotilla train` with `cluster.device = "cuda"`: without a GPU (or without the feature) it
//! says why in one line; on a GPU (feature `cuda`; the test says "skipped" elsewhere) the
//! default model trained for 200 steps ends within 2% of the CPU run's loss, with f32 and with
//! bf16 GEMMs.

#[cfg(feature = "cuda")]
use super::flotilla_ok;
use super::{flotilla, tmp};

/// `cluster.device = "cuda"` where the binary has no CUDA device (built without the feature)
/// or the machine has no GPU: one line saying which, before anything runs.
#[test]
fn train_on_cuda_without_a_gpu_says_why() {
    #[cfg(feature = "cuda")]
    if flotilla_model::device::cuda::device_count() > 0 {
        eprintln!("train_on_cuda_without_a_gpu_says_why: skipped, this machine has a GPU");
        return;
    }
    let dir = tmp("no-gpu");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let file = dir.join("cuda.toml");
    std::fs::write(&file, "[cluster]\ndevice = \"cuda\"\n").expect("write");
    let out = dir.join("out");
    let run = flotilla(&[
        "train",
        "--config",
        file.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--quiet",
    ]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    let why = if cfg!(feature = "cuda") {
        "the CUDA driver sees no GPU"
    } else {
        "this binary was built without the CUDA device; build it with `cargo build --release \
         --features cuda`"
    };
    assert!(
        err.contains(&format!("cluster.device = \"cuda\": {why}")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.join("summary.json").exists());
}

/// The loss of every step of `metrics.jsonl` in `dir`.
#[cfg(feature = "cuda")]
fn losses(dir: &std::path::Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            v["loss"].as_f64().expect("a loss")
        })
        .collect()
}

/// Trains the default model for `steps` steps with `extra` config text; returns its losses.
#[cfg(feature = "cuda")]
fn train(name: &str, extra: &str, steps: usize) -> Vec<f64> {
    let dir = tmp(name);
    std::fs::create_dir_all(&*dir).expect("scratch dir");
    let cfg = dir.join("job.toml");
    std::fs::write(&cfg, extra).expect("write the config");
    let out = dir.join("out");
    flotilla_ok(&[
        "train",
        "--config",
        cfg.to_str().expect("utf-8 path"),
        "--steps",
        &steps.to_string(),
        "--out",
        out.to_str().expect("utf-8 path"),
        "--quiet",
    ]);
    losses(&out)
}

/// Mean of the last ten losses.
#[cfg(feature = "cuda")]
fn tail(l: &[f64]) -> f64 {
    let t = &l[l.len().saturating_sub(10)..];
    t.iter().sum::<f64>() / t.len() as f64
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_training_tracks_the_cpu_loss_curve() {
    if flotilla_model::device::cuda::device_count() == 0 {
        eprintln!("cuda_training_tracks_the_cpu_loss_curve: skipped, no GPU");
        return;
    }
    let steps = 200;
    let cpu = train("cuda-ref-cpu", "", steps);
    assert_eq!(cpu.len(), steps);
    for (name, precision) in [("cuda-fp32", "fp32"), ("cuda-bf16", "bf16")] {
        let gpu = train(
            name,
            &format!("[model]\nprecision = \"{precision}\"\n[cluster]\ndevice = \"cuda\"\n"),
            steps,
        );
        assert_eq!(gpu.len(), steps, "{precision}: steps");
        let first = (gpu[0] - cpu[0]).abs() / cpu[0];
        let end = (tail(&gpu) - tail(&cpu)).abs() / tail(&cpu);
        println!(
            "{precision}: first loss {:.5} vs cpu {:.5} ({first:.2e}), last-10 mean {:.5} vs {:.5} ({end:.2e})",
            gpu[0],
            cpu[0],
            tail(&gpu),
            tail(&cpu)
        );
        assert!(
            end <= 0.02,
            "{precision}: the loss ends {end:.3} away from the CPU run's"
        );
        assert!(
            tail(&gpu) < gpu[0] * 0.8,
            "{precision}: the loss did not fall"
        );
    }
}

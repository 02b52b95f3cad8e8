//! `flotilla train` on the GPU against the CPU (feature `cuda`; each test says "skipped" and
//! passes where the driver sees no GPU): the default model trained for 200 steps on
//! `cluster.device = "cuda"` ends within 2% of the CPU run's loss, with f32 and with bf16 GEMMs.

use super::{flotilla_ok, tmp};

/// The loss of every step of `metrics.jsonl` in `dir`.
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
fn tail(l: &[f64]) -> f64 {
    let t = &l[l.len().saturating_sub(10)..];
    t.iter().sum::<f64>() / t.len() as f64
}

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

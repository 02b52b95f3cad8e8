//! Benchmarks (ignored by default; run in release):
//! `cargo test -p flotilla-model --release --test gemm_bench -- --ignored --nocapture --test-threads 1`
//!
//! - `compare_gemm_crates`: gemm / matrixmultiply / faer on the default model's GEMM shapes with 2
//!   threads (and 1), the measurement behind the choice recorded in `device/cpu/mod.rs`;
//! - `training_step_vs_raw_gemm`: achieved GFLOP/s of a training step of the default model
//!   (batch 8 × 64) against the raw GEMM rate of the same shapes on the same device.

use std::time::Instant;

use flotilla_model::device::{Mat, MatMut};
use flotilla_model::flops::{GemmShape, step_flops, step_gemm_shapes};
use flotilla_model::rng::Rng;
use flotilla_model::{Batch, CpuDevice, DeepSeekV3, Device, ModelConfig, StepOptions, Tensor};

/// Seconds per call of `f`, after warm-up, over at least 0.2 s.
fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    let mut reps = 1;
    loop {
        let start = Instant::now();
        for _ in 0..reps {
            f();
        }
        let e = start.elapsed().as_secs_f64();
        if e > 0.2 {
            return e / reps as f64;
        }
        reps *= 2;
    }
}

/// The distinct shapes of a default-model step, with their total counts.
fn shapes() -> Vec<GemmShape> {
    let mut merged: Vec<GemmShape> = Vec::new();
    for s in step_gemm_shapes(&ModelConfig::tiny(), 8, 64, 1) {
        match merged
            .iter_mut()
            .find(|m| (m.m, m.n, m.k) == (s.m, s.n, s.k))
        {
            Some(m) => m.count += s.count,
            None => merged.push(s),
        }
    }
    merged
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(n, 1.0)
}

#[test]
#[ignore]
fn compare_gemm_crates() {
    for threads in [2, 1] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        let (mut tg, mut tm, mut tf, mut fl) = (0.0, 0.0, 0.0, 0.0);
        // matrixmultiply reads its thread count from the environment once, at first use.
        println!(
            "threads = {threads} (matrixmultiply: MATMUL_NUM_THREADS={:?})",
            std::env::var("MATMUL_NUM_THREADS").ok()
        );
        for s in shapes() {
            let (m, n, k) = (s.m, s.n, s.k);
            let (a, b) = (rand(m * k, 1), rand(k * n, 2));
            let mut c = vec![0.0f32; m * n];
            let par = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: contiguous row-major buffers of the stated sizes.
            let t_gemm = pool.install(|| {
                time(|| unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        b.as_ptr(),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    )
                })
            });
            // SAFETY: as above.
            let t_mm = time(|| unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    k as isize,
                    1,
                    b.as_ptr(),
                    n as isize,
                    1,
                    0.0,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                )
            });
            let fpar = if threads > 1 {
                faer::Par::rayon(threads)
            } else {
                faer::Par::Seq
            };
            let t_faer = pool.install(|| {
                let av = faer::MatRef::from_row_major_slice(&a, m, k);
                let bv = faer::MatRef::from_row_major_slice(&b, k, n);
                time(|| {
                    let cv = faer::MatMut::from_row_major_slice_mut(&mut c, m, n);
                    faer::linalg::matmul::matmul(cv, faer::Accum::Replace, av, bv, 1.0f32, fpar);
                })
            });
            let f = 2.0 * (m * n * k) as f64;
            let w = s.count as f64;
            tg += w * t_gemm;
            tm += w * t_mm;
            tf += w * t_faer;
            fl += w * f;
            println!(
                "  {m:4}x{k:4}·{k:4}x{n:4} ×{:4}  gemm {:6.1}  matrixmultiply {:6.1}  faer {:6.1} GFLOP/s",
                s.count,
                f / t_gemm / 1e9,
                f / t_mm / 1e9,
                f / t_faer / 1e9
            );
        }
        println!(
            "  step-weighted: gemm {:.1}  matrixmultiply {:.1}  faer {:.1} GFLOP/s",
            fl / tg / 1e9,
            fl / tm / 1e9,
            fl / tf / 1e9
        );
    }
}

#[test]
#[ignore]
fn training_step_vs_raw_gemm() {
    let threads = std::env::var("FLOTILLA_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let dev = CpuDevice::new(threads);
    let cfg = ModelConfig::tiny();
    let model = DeepSeekV3::init(&cfg, &dev, 1).expect("init");
    let (b, t) = (8, 64);
    let batch = Batch::causal(
        (0..b * t)
            .map(|i| ((i * 31 + i / 7) % 256) as u32)
            .collect(),
        b,
        t,
    );
    let opts = StepOptions::from_config(&cfg);
    let mut grads = model.zero_grads(&dev);
    let step = || {
        let mut g = model.zero_grads(&dev);
        model
            .forward_backward(&dev, &batch, &opts, &mut g)
            .expect("step");
    };
    let _ = model.forward_backward(&dev, &batch, &opts, &mut grads);
    let step_s = time(step);
    let _ = dev.take_cost();
    let _ = dev.take_profile();
    step();
    let cost = dev.take_cost();
    for (name, calls, secs) in dev.take_profile() {
        println!("  {name:>24}: {calls:4} calls {:8.3} ms", secs * 1e3);
    }
    let flops = step_flops(&cfg, b, t, model.mtp_depth()).total();

    // Raw rate: the same GEMM shapes, one after the other, on the same device.
    let mut raw_s = 0.0;
    for s in shapes() {
        let a = Tensor::from_host(&[s.m, s.k], rand(s.m * s.k, 3));
        let bt = Tensor::from_host(&[s.k, s.n], rand(s.k * s.n, 4));
        let mut c = dev.zeros(&[s.m, s.n]);
        raw_s += s.count as f64
            * time(|| dev.gemm(MatMut::all(&mut c), Mat::all(&a), Mat::all(&bt), false));
    }
    let achieved = flops / step_s / 1e9;
    let raw = flops / raw_s / 1e9;
    println!(
        "default model, batch {b}x{t}, {threads} threads: {:.1} MFLOP/step",
        flops / 1e6
    );
    println!(
        "  step {:.2} ms -> {achieved:.1} GFLOP/s; raw GEMM on the same shapes {raw:.1} GFLOP/s; ratio {:.0}%",
        step_s * 1e3,
        100.0 * achieved / raw
    );
    println!(
        "  device-measured per step: {} ops, {:.2} ms in ops, of which GEMM {:.2} ms",
        cost.ops,
        1e3 * cost.seconds,
        1e3 * cost.gemm_seconds
    );
    assert!(
        achieved >= 0.5 * raw,
        "training step reaches {achieved:.1} GFLOP/s, below half the raw GEMM rate {raw:.1}"
    );
}

//! TEMPORARY scratch benchmarks (to be deleted).
use std::time::Instant;

use flotilla_model::device::{Mat, MatMut};
use flotilla_model::flops::step_gemm_shapes;
use flotilla_model::rng::Rng;
use flotilla_model::{Batch, CpuDevice, DeepSeekV3, Device, ModelConfig, StepOptions, Tensor};

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
        if e > 0.1 {
            return e / reps as f64;
        }
        reps *= 2;
    }
}

#[test]
#[ignore]
fn scratch_steps() {
    let secs: f64 = std::env::var("SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(5.0);
    let dev = CpuDevice::new(2);
    let cfg = ModelConfig::tiny();
    let model = DeepSeekV3::init(&cfg, &dev, 1).expect("init");
    let (b, t) = (8, 64);
    let batch = Batch::causal((0..b * t).map(|i| ((i * 31 + i / 7) % 256) as u32).collect(), b, t);
    let opts = StepOptions::from_config(&cfg);
    let mut g = model.zero_grads(&dev);
    let start = Instant::now();
    let mut n = 0;
    let mut best = f64::MAX;
    while start.elapsed().as_secs_f64() < secs {
        let s = Instant::now();
        model.forward_backward(&dev, &batch, &opts, &mut g).expect("step");
        best = best.min(s.elapsed().as_secs_f64());
        n += 1;
    }
    let _ = dev.take_cost();
    let _ = dev.take_profile();
    let reps = 20;
    let s = Instant::now();
    for _ in 0..reps {
        model.forward_backward(&dev, &batch, &opts, &mut g).expect("step");
    }
    let avg = s.elapsed().as_secs_f64() / reps as f64;
    let cost = dev.take_cost();
    for (name, calls, secs) in dev.take_profile() {
        println!("  {name:>24}: {:6.1} calls {:8.3} ms", calls as f64 / reps as f64, secs * 1e3 / reps as f64);
    }
    println!("steps {n}, best {:.2} ms, avg {:.2} ms, in ops {:.2} ms, gemm(+attn) {:.2} ms", best * 1e3, avg * 1e3, cost.seconds * 1e3 / reps as f64, cost.gemm_seconds * 1e3 / reps as f64);
}

#[test]
#[ignore]
fn scratch_layouts() {
    let dev = CpuDevice::new(2);
    let mut tot = [0.0f64; 4];
    let mut fl = 0.0;
    for s in step_gemm_shapes(&ModelConfig::tiny(), 8, 64, 1) {
        let (m, n, k) = (s.m, s.n, s.k);
        let a = Tensor::from_host(&[m, k], Rng::new(1).normal_vec(m * k, 1.0));
        let at = Tensor::from_host(&[k, m], Rng::new(1).normal_vec(m * k, 1.0));
        let bb = Tensor::from_host(&[k, n], Rng::new(2).normal_vec(k * n, 1.0));
        let bt = Tensor::from_host(&[n, k], Rng::new(2).normal_vec(k * n, 1.0));
        let mut c = dev.zeros(&[m, n]);
        let t_nn = time(|| dev.gemm(MatMut::all(&mut c), Mat::all(&a), Mat::all(&bb), false));
        let t_nt = time(|| dev.gemm(MatMut::all(&mut c), Mat::all(&a), Mat::all(&bt).t(), false));
        let t_tn = time(|| dev.gemm(MatMut::all(&mut c), Mat::all(&at).t(), Mat::all(&bb), true));
        let f = 2.0 * (m * n * k) as f64;
        let w = s.count as f64;
        tot[0] += w * t_nn;
        tot[1] += w * t_nt;
        tot[2] += w * t_tn;
        fl += w * f;
        println!("{m:4}x{k:4}x{n:4} x{:3}  NN {:6.1} NT {:6.1} TN(acc) {:6.1} GFLOP/s   NN {:7.2} us", s.count, f / t_nn / 1e9, f / t_nt / 1e9, f / t_tn / 1e9, t_nn * 1e6);
    }
    println!("total NN {:.1} NT {:.1} TN {:.1}", fl / tot[0] / 1e9, fl / tot[1] / 1e9, fl / tot[2] / 1e9);
}

#[test]
#[ignore]
fn scratch_attention() {
    use flotilla_model::device::AttnShape;
    for threads in [1, 2] {
        let dev = CpuDevice::new(threads);
        let s = AttnShape { batch: 8, seq: 64, heads: 4, nope: 16, rope: 8, v: 16, scale: 0.2 };
        let n = 512;
        let q = Tensor::from_host(&[n, 4 * 24], Rng::new(1).normal_vec(n * 96, 1.0));
        let kv = Tensor::from_host(&[n, 4 * 32], Rng::new(2).normal_vec(n * 128, 1.0));
        let pe = Tensor::from_host(&[n, 8], Rng::new(3).normal_vec(n * 8, 1.0));
        let dout = Tensor::from_host(&[n, 64], Rng::new(4).normal_vec(n * 64, 1.0));
        let (_, probs) = dev.attention_forward(&q, &kv, &pe, s);
        let tf = time(|| { let _ = dev.attention_forward(&q, &kv, &pe, s); });
        let tb = time(|| { let _ = dev.attention_backward(&q, &kv, &pe, &probs, &dout, s); });
        println!("threads {threads}: fwd {:.1} us, bwd {:.1} us", tf * 1e6, tb * 1e6);
    }
}

fn cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("scratch");
    s.split_whitespace().next().expect("scratch").parse().expect("scratch")
}

/// CPU seconds of the calling thread per call of `f`.
fn cpu_time(mut f: impl FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    let mut reps = 1;
    loop {
        let start = cpu_ns();
        for _ in 0..reps {
            f();
        }
        let e = (cpu_ns() - start) as f64 * 1e-9;
        if e > 0.2 {
            return e / reps as f64;
        }
        reps *= 2;
    }
}

#[test]
#[ignore]
fn scratch_attention_seq() {
    use flotilla_model::device::{AttnShape, attention};
    let s = AttnShape { batch: 1, seq: 64, heads: 4, nope: 16, rope: 8, v: 16, scale: 0.2 };
    let n = 64;
    let q = Rng::new(1).normal_vec(n * 96, 1.0);
    let kv = Rng::new(2).normal_vec(n * 128, 1.0);
    let pe = Rng::new(3).normal_vec(n * 8, 1.0);
    let dout = Rng::new(4).normal_vec(n * 64, 1.0);
    let mut out = vec![0.0; n * 64];
    let mut probs = vec![0.0; 4 * 64 * 64];
    let mut sc = attention::Scratch::new(&s);
    let tf = cpu_time(|| attention::forward_seq(&q, &kv, &pe, &s, &mut out, &mut probs, &mut sc));
    let (mut dq, mut dkv, mut dpe) = (vec![0.0; n * 96], vec![0.0; n * 128], vec![0.0; n * 8]);
    let tb = cpu_time(|| attention::backward_seq(&q, &kv, &pe, &probs, &dout, &s, &mut dq, &mut dkv, &mut dpe, &mut sc));
    println!("per sequence (4 heads): fwd {:.2} us, bwd {:.2} us CPU", tf * 1e6, tb * 1e6);
}

#[test]
#[ignore]
fn scratch_softmax() {
    use flotilla_model::device::vmath;
    #[target_feature(enable = "avx2")]
    fn sm(p: &mut [f32], t: usize, scale: f32, pad: bool) {
        for (i, row) in p.chunks_exact_mut(t).enumerate() {
            let w = if pad { (i + 1).next_multiple_of(8).min(t) } else { i + 1 };
            let (head, rest) = row.split_at_mut(w);
            head[i + 1..].fill(f32::NEG_INFINITY);
            head.iter_mut().for_each(|v| *v *= scale);
            let max = vmath::max(head);
            let inv = 1.0 / vmath::exp_sub_sum(head, max);
            head.iter_mut().for_each(|v| *v *= inv);
            head[i + 1..].fill(0.0);
            rest.fill(0.0);
        }
    }
    let t = 64;
    let src = Rng::new(1).normal_vec(t * t, 3.0);
    let mut p = src.clone();
    for pad in [false, true] {
        let c = cpu_time(|| { p.copy_from_slice(&src); unsafe { sm(&mut p, t, 0.2, pad) } });
        let c0 = cpu_time(|| { p.copy_from_slice(&src); });
        println!("pad {pad}: softmax 64x64: {:.2} us (copy {:.2} us)", c * 1e6, c0 * 1e6);
    }
}

#[inline(always)]
fn exp0(x: f32) -> f32 {
    let e = flotilla_model::device::vmath::exp(x);
    if x < -87.0 { 0.0 } else { e }
}

#[test]
#[ignore]
fn scratch_softmax2() {
    use flotilla_model::device::vmath;
    #[target_feature(enable = "avx2")]
    fn sm(p: &mut [f32], t: usize, scale: f32, mode: u32) {
        for (i, row) in p.chunks_exact_mut(t).enumerate() {
            let w = match mode { 0 => (i + 1).next_multiple_of(8).min(t), _ => t };
            let (head, rest) = row.split_at_mut(w);
            head[i + 1..].fill(f32::NEG_INFINITY);
            let mut acc = [f32::NEG_INFINITY; 8];
            for c in head.chunks_exact_mut(8) {
                for k in 0..8 {
                    c[k] *= scale;
                    acc[k] = if acc[k] > c[k] { acc[k] } else { c[k] };
                }
            }
            let max = acc.iter().fold(f32::NEG_INFINITY, |a, &b| if a > b { a } else { b });
            let mut s = [0.0f32; 8];
            for c in head.chunks_exact_mut(8) {
                for k in 0..8 {
                    c[k] = exp0(c[k] - max);
                    s[k] += c[k];
                }
            }
            let inv = 1.0 / s.iter().sum::<f32>();
            head.iter_mut().for_each(|v| *v *= inv);
            rest.fill(0.0);
        }
    }
    let _ = vmath::exp(0.0);
    let t = 64;
    let src = Rng::new(1).normal_vec(t * t, 3.0);
    let mut p = src.clone();
    for mode in [0, 1] {
        let c = cpu_time(|| { p.copy_from_slice(&src); unsafe { sm(&mut p, t, 0.2, mode) } });
        println!("mode {mode}: softmax 64x64: {:.2} us", c * 1e6);
    }
}

#[test]
#[ignore]
fn scratch_attn_gemms() {
    use flotilla_model::device::gemm::{StridedMut, StridedRef, sgemm_seq};
    let q = Rng::new(1).normal_vec(64 * 96, 1.0);
    let k = Rng::new(2).normal_vec(64 * 24, 1.0);
    let kv = Rng::new(2).normal_vec(64 * 128, 1.0);
    let mut p = vec![0.0f32; 64 * 64];
    let mut out = vec![0.0f32; 64 * 64];
    let ts = cpu_time(|| sgemm_seq(64, 64, 24, StridedMut { data: &mut p, off: 0, rs: 64, cs: 1 }, StridedRef { data: &q, off: 24, rs: 96, cs: 1 }, StridedRef { data: &k, off: 0, rs: 1, cs: 24 }, false));
    let tsn = cpu_time(|| sgemm_seq(64, 64, 24, StridedMut { data: &mut p, off: 0, rs: 64, cs: 1 }, StridedRef { data: &q, off: 24, rs: 96, cs: 1 }, StridedRef { data: &k, off: 0, rs: 64, cs: 1 }, false));
    let tpv = cpu_time(|| sgemm_seq(64, 16, 64, StridedMut { data: &mut out, off: 16, rs: 64, cs: 1 }, StridedRef { data: &p, off: 0, rs: 64, cs: 1 }, StridedRef { data: &kv, off: 48, rs: 128, cs: 1 }, false));
    println!("S (B col-major) {:.2} us, S (B row-major) {:.2} us, PV {:.2} us", ts * 1e6, tsn * 1e6, tpv * 1e6);
}

#[test]
#[ignore]
fn scratch_phases() {
    use flotilla_model::StageSpec;
    let dev = CpuDevice::new(2);
    let cfg = ModelConfig::tiny();
    let model = DeepSeekV3::init(&cfg, &dev, 1).expect("init");
    let (b, t) = (8, 64);
    let batch = Batch::causal((0..b * t).map(|i| ((i * 31 + i / 7) % 256) as u32).collect(), b, t);
    let opts = StepOptions::from_config(&cfg);
    let mut g = model.zero_grads(&dev);
    let spec = StageSpec::whole(&cfg);
    let mut best = [f64::MAX; 3];
    for _ in 0..300 {
        let s0 = Instant::now();
        let (_, mut cache) = model.stage_forward(&dev, &spec, &batch, None, &opts).expect("scratch");
        let s1 = Instant::now();
        model.stage_backward_input(&dev, &mut cache, None);
        let s2 = Instant::now();
        model.stage_backward_weight(&dev, cache, &mut g);
        let s3 = Instant::now();
        best[0] = best[0].min((s1 - s0).as_secs_f64());
        best[1] = best[1].min((s2 - s1).as_secs_f64());
        best[2] = best[2].min((s3 - s2).as_secs_f64());
    }
    println!("best: forward {:.2} ms, B {:.2} ms, W {:.2} ms", best[0] * 1e3, best[1] * 1e3, best[2] * 1e3);
}

#[test]
#[ignore]
fn scratch_first_steps() {
    let dev = CpuDevice::new(2);
    let cfg = ModelConfig::tiny();
    let model = DeepSeekV3::init(&cfg, &dev, 1).expect("init");
    let (b, t) = (8, 64);
    let batch = Batch::causal((0..b * t).map(|i| ((i * 31 + i / 7) % 256) as u32).collect(), b, t);
    let opts = StepOptions::from_config(&cfg);
    let mut g = model.zero_grads(&dev);
    let mut v = Vec::new();
    for _ in 0..30 {
        let s = Instant::now();
        model.forward_backward(&dev, &batch, &opts, &mut g).expect("step");
        v.push(format!("{:.1}", s.elapsed().as_secs_f64() * 1e3));
    }
    println!("first steps ms: {}", v.join(" "));
}

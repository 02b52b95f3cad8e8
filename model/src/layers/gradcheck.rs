//! Finite-difference checking of backward passes (tests only).
//!
//! Central differences in f32 with step `EPS = 1e-2` on inputs of order 1, against the objective
//! `L = Σ y ⊙ R` (R a fixed random projection, so `dy = R`) accumulated in f64. Truncation error is
//! O(EPS²) and rounding error about 1e-7·√n / EPS, so a sampled-gradient relative error
//! `‖numeric − analytic‖ / ‖analytic‖` below [`TOL`] = 1e-2 is a pass; a wrong backward is off by O(1).

use crate::config::ModelConfig;
use crate::device::Device;
use crate::device::cpu::CpuDevice;
use crate::rng::Rng;
use crate::tensor::Tensor;

pub const EPS: f32 = 1e-2;
pub const TOL: f64 = 1e-2;

pub fn dev() -> CpuDevice {
    CpuDevice::new(1)
}

/// A host tensor of N(0, std²) values.
pub fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
    Tensor::from_host(
        shape,
        Rng::new(seed).normal_vec(shape.iter().product(), std),
    )
}

/// `Σ y ⊙ r` in f64.
pub fn project(y: &Tensor, r: &Tensor) -> f64 {
    y.h()
        .iter()
        .zip(r.h())
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum()
}

/// A small config for layer tests (tiny model, fewer heads / narrower).
pub fn small_config() -> ModelConfig {
    let mut c = ModelConfig::tiny();
    c.hidden_size = 16;
    c.num_attention_heads = 2;
    c.num_key_value_heads = Some(2);
    c.q_lora_rank = Some(12);
    c.kv_lora_rank = 8;
    c.qk_nope_head_dim = 4;
    c.qk_rope_head_dim = 4;
    c.v_head_dim = 6;
    c.intermediate_size = 20;
    c.moe_intermediate_size = 8;
    c.initializer_range = 0.3;
    c
}

/// Checks `analytic` (the gradient of `loss` w.r.t. the tensor `get(state)`) on up to `samples`
/// components by central differences. A `loss` that returns NaN marks a perturbation that changed a
/// discrete decision (e.g. which experts the router chose); such components are skipped. Panics with a report when the relative error exceeds TOL.
pub fn check<T>(
    label: &str,
    state: &mut T,
    get: fn(&mut T) -> &mut Tensor,
    loss: impl Fn(&T) -> f64,
    analytic: &Tensor,
    samples: usize,
) {
    let ana = analytic.h().to_vec();
    let n = ana.len();
    let step = (n / samples.max(1)).max(1);
    let idx: Vec<usize> = (0..n)
        .step_by(step)
        .take(samples)
        .map(|i| (i * 7 + 3) % n)
        .collect();
    let (mut num2, mut den2) = (0.0f64, 0.0f64);
    let mut worst = (0usize, 0.0f64, 0.0f64);
    for &i in &idx {
        let orig = get(state).h()[i];
        get(state).hm()[i] = orig + EPS;
        let lp = loss(state);
        get(state).hm()[i] = orig - EPS;
        let lm = loss(state);
        get(state).hm()[i] = orig;
        if !lp.is_finite() || !lm.is_finite() {
            continue; // the perturbation flipped a discrete decision (the loss said so with NaN)
        }
        let numeric = (lp - lm) / (2.0 * EPS as f64);
        let d = numeric - ana[i] as f64;
        num2 += d * d;
        den2 += (ana[i] as f64).powi(2);
        if d.abs() > worst.1.abs() {
            worst = (i, d, numeric);
        }
    }
    let rel = num2.sqrt() / den2.sqrt().max(1e-12);
    assert!(
        rel < TOL,
        "{label}: finite-difference relative error {rel:.3e} over {} components (worst index {}: numeric {:.6e}, analytic {:.6e})",
        idx.len(),
        worst.0,
        worst.2,
        ana[worst.0]
    );
    assert!(
        den2 > 0.0,
        "{label}: analytic gradient is zero on every sampled component"
    );
}

/// A zeroed host tensor shaped like `t`.
pub fn zeros_like(dev: &CpuDevice, t: &Tensor) -> Tensor {
    dev.zeros(t.shape())
}

/// RoPE table for `cfg` on `dev` for `seq` positions.
pub fn rope_table(cfg: &ModelConfig, dev: &CpuDevice, seq: usize) -> Tensor {
    crate::layers::rope::table(cfg, dev, seq).expect("valid rope config")
}

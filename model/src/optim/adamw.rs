//! AdamW (decoupled weight decay) with PyTorch's `torch.optim.AdamW` semantics, on named slices.
//!
//! For each parameter `p` with gradient `g`, at that parameter's step `t` (1 for its first
//! update), learning rate `lr`, and hyperparameters `β1, β2, ε, λ` (see the PyTorch documentation
//! of `AdamW`, `amsgrad = False`, `maximize = False`):
//!
//! ```text
//! p ← p · (1 − lr·λ)                 only if the caller marked the parameter `decay`
//! m ← m + (1 − β1)·(g − m)           i.e. β1·m + (1 − β1)·g, PyTorch's `lerp_`
//! v ← β2·v + (1 − β2)·g²
//! p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
//! ```
//!
//! As in PyTorch, the scalars (`1 − lr·λ`, the bias corrections, the step size) are computed in
//! `f64` and rounded to `f32`, and the element-wise arithmetic is `f32`. The moments `m` and `v`
//! start at zero and live in a [`BTreeMap`] keyed by parameter name, so iteration order (and so
//! every checkpoint) is deterministic. Each parameter counts its own steps, like PyTorch's
//! per-parameter `state["step"]`: a parameter first seen at a later step starts its bias
//! correction afresh. Whether a parameter is decayed (usually not for norms and biases) is the
//! caller's choice, through [`ParamRef::decay`].
//!
//! The moments are tensors on the same device as the parameters: a step is one
//! [`Device::adamw`] over every parameter, and the host sees the moments only when a checkpoint
//! exports them ([`AdamW::export_state`]). A step is all-or-nothing: every parameter is checked
//! (lengths, duplicates, state shape) before any is changed, so a failed step leaves parameters
//! and state untouched.

use std::collections::{BTreeMap, BTreeSet};

use super::OptimError;
use super::kernel::Coef;
use crate::device::{AdamWArgs, Device};
use crate::tensor::Tensor;

/// AdamW's hyperparameters. The defaults are PyTorch's (`β = (0.9, 0.999)`, `ε = 1e-8`,
/// `weight_decay = 0.01`); [`AdamWConfig::deepseek_v3`] gives the DeepSeek-V3 report's.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Decay rate of the first moment, in `[0, 1)`.
    pub beta1: f64,
    /// Decay rate of the second moment, in `[0, 1)`.
    pub beta2: f64,
    /// Added to the denominator for numerical stability, `> 0`.
    pub eps: f64,
    /// Decoupled weight decay coefficient `λ`, `>= 0` (applied as `p ← p·(1 − lr·λ)`).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// The DeepSeek-V3 report's settings: `β1 = 0.9, β2 = 0.95, weight_decay = 0.1` (ε = 1e-8).
    #[must_use]
    pub const fn deepseek_v3() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }

    /// Checks the ranges given on the fields.
    pub fn validate(&self) -> Result<(), OptimError> {
        let bad = |m: String| Err(OptimError::Config(m));
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(format!("{name} is {beta}; it must be in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!(
                "eps is {}; it must be positive and finite",
                self.eps
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay is {}; it must be non-negative and finite",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// One parameter handed to [`AdamW::step`]: its name (the key of its state), its values (updated
/// in place), its gradient (same number of elements), and whether weight decay applies to it.
#[derive(Debug)]
pub struct ParamRef<'a> {
    /// The parameter's name, for example a HuggingFace tensor name.
    pub name: &'a str,
    /// The values, updated in place.
    pub value: &'a mut Tensor,
    /// The gradient, as long as `value`.
    pub grad: &'a Tensor,
    /// Apply decoupled weight decay (usually false for norms and biases).
    pub decay: bool,
}

/// One parameter's optimizer state in host memory (PyTorch's `state[p]`), for checkpoints.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamState {
    /// How many updates this parameter has received (the `t` of its bias correction).
    pub step: u64,
    /// First moment `m` (PyTorch's `exp_avg`).
    pub exp_avg: Vec<f32>,
    /// Second moment `v` (PyTorch's `exp_avg_sq`).
    pub exp_avg_sq: Vec<f32>,
}

/// The optimizer's whole state in host memory, for checkpoints: the number of steps taken and
/// each parameter's [`ParamState`], by name.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWState {
    /// Calls to [`AdamW::step`] that succeeded.
    pub steps: u64,
    /// Per-parameter moments, ordered by name.
    pub params: BTreeMap<String, ParamState>,
}

/// One parameter's moments on the device.
#[derive(Clone, Debug)]
struct Moments {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over named parameters on a device (see the module documentation for the update).
#[derive(Clone, Debug)]
pub struct AdamW {
    config: AdamWConfig,
    steps: u64,
    params: BTreeMap<String, Moments>,
}

impl AdamW {
    /// An optimizer with no state yet.
    pub fn new(config: AdamWConfig) -> Result<Self, OptimError> {
        config.validate()?;
        Ok(Self {
            config,
            steps: 0,
            params: BTreeMap::new(),
        })
    }

    /// The hyperparameters.
    #[must_use]
    pub const fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Calls to [`AdamW::step`] that succeeded.
    #[must_use]
    pub const fn steps(&self) -> u64 {
        self.steps
    }

    /// How many updates parameter `name` has received, if it has state.
    #[must_use]
    pub fn param_steps(&self, name: &str) -> Option<u64> {
        self.params.get(name).map(|m| m.step)
    }

    /// The whole state in host memory, for a checkpoint (`None` on a device that holds no
    /// values).
    pub fn export_state(&self, dev: &dyn Device) -> Option<AdamWState> {
        let mut params = BTreeMap::new();
        for (name, m) in &self.params {
            params.insert(
                name.clone(),
                ParamState {
                    step: m.step,
                    exp_avg: dev.download(&m.exp_avg)?,
                    exp_avg_sq: dev.download(&m.exp_avg_sq)?,
                },
            );
        }
        Some(AdamWState {
            steps: self.steps,
            params,
        })
    }

    /// Replaces the whole state with `state` (from a checkpoint), uploaded to `dev`; bit-exact,
    /// so that the next steps equal those of the optimizer that exported it. Fails, changing
    /// nothing, if a parameter's two moments differ in length.
    pub fn import_state(&mut self, dev: &dyn Device, state: AdamWState) -> Result<(), OptimError> {
        for (name, p) in &state.params {
            if p.exp_avg.len() != p.exp_avg_sq.len() {
                return Err(OptimError::BadState {
                    name: name.clone(),
                    reason: format!(
                        "exp_avg has {} elements but exp_avg_sq has {}",
                        p.exp_avg.len(),
                        p.exp_avg_sq.len()
                    ),
                });
            }
        }
        self.steps = state.steps;
        self.params = state
            .params
            .into_iter()
            .map(|(name, p)| {
                let n = [p.exp_avg.len()];
                let m = Moments {
                    step: p.step,
                    exp_avg: dev.upload(&n, &p.exp_avg),
                    exp_avg_sq: dev.upload(&n, &p.exp_avg_sq),
                };
                (name, m)
            })
            .collect();
        Ok(())
    }

    /// One AdamW update of every parameter in `params` with learning rate `lr` (from the
    /// schedule), on `dev`. Parameters seen for the first time get zero moments. Fails,
    /// changing nothing, if a value and its gradient differ in length, a name repeats, or a
    /// parameter's length differs from its stored state.
    pub fn step(
        &mut self,
        dev: &dyn Device,
        lr: f64,
        params: &mut [ParamRef<'_>],
    ) -> Result<(), OptimError> {
        self.step_scaled(dev, lr, 1.0, params)
    }

    /// [`AdamW::step`] on the gradients times `grad_scale` (the clip's coefficient), scaled as
    /// they are read: the same bits as scaling them in memory first, one pass over them fewer.
    /// The gradients themselves are left as they are.
    pub fn step_scaled(
        &mut self,
        dev: &dyn Device,
        lr: f64,
        grad_scale: f32,
        params: &mut [ParamRef<'_>],
    ) -> Result<(), OptimError> {
        if !(grad_scale.is_finite() && grad_scale > 0.0) {
            return Err(OptimError::Config(format!(
                "gradient scale {grad_scale}: it must be positive and finite"
            )));
        }
        self.check(lr, params)?;
        for p in params.iter() {
            if !self.params.contains_key(p.name) {
                let n = [p.value.numel()];
                let fresh = Moments {
                    step: 0,
                    exp_avg: dev.zeros(&n),
                    exp_avg_sq: dev.zeros(&n),
                };
                self.params.insert(p.name.to_owned(), fresh);
            }
        }
        let config = self.config;
        let mut by_name: std::collections::HashMap<&str, &mut Moments> = self
            .params
            .iter_mut()
            .map(|(n, m)| (n.as_str(), m))
            .collect();
        let mut args = Vec::with_capacity(params.len());
        for p in params.iter_mut() {
            let m = by_name
                .remove(p.name)
                .ok_or_else(|| OptimError::DuplicateName(p.name.to_owned()))?;
            m.step += 1;
            args.push(AdamWArgs {
                coef: Coef::new(config, lr, m.step, p.decay).with_grad_scale(grad_scale),
                value: &mut *p.value,
                grad: p.grad,
                exp_avg: &mut m.exp_avg,
                exp_avg_sq: &mut m.exp_avg_sq,
            });
        }
        dev.adamw(&mut args);
        self.steps += 1;
        Ok(())
    }

    /// Check a step's arguments: the learning rate, lengths, duplicate names, state shapes.
    fn check(&self, lr: f64, params: &[ParamRef<'_>]) -> Result<(), OptimError> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(OptimError::Config(format!(
                "learning rate is {lr}; it must be non-negative and finite"
            )));
        }
        let mut names = BTreeSet::new();
        for p in params {
            if p.value.numel() != p.grad.numel() {
                return Err(OptimError::GradLength {
                    name: p.name.to_owned(),
                    value_len: p.value.numel(),
                    grad_len: p.grad.numel(),
                });
            }
            if !names.insert(p.name) {
                return Err(OptimError::DuplicateName(p.name.to_owned()));
            }
            if let Some(s) = self.params.get(p.name)
                && s.exp_avg.numel() != p.value.numel()
            {
                return Err(OptimError::StateLength {
                    name: p.name.to_owned(),
                    param_len: p.value.numel(),
                    state_len: s.exp_avg.numel(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cpu::CpuDevice;

    fn close(a: &[f32], b: &[f64], tol: f64) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(&x, &y)| (f64::from(x) - y).abs() <= tol * y.abs().max(1.0))
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_host(&[v.len()], v.to_vec())
    }

    fn one_step(
        dev: &dyn Device,
        opt: &mut AdamW,
        lr: f64,
        name: &str,
        value: &mut Tensor,
        grad: &[f32],
        decay: bool,
    ) {
        let grad = t(grad);
        let mut params = [ParamRef {
            name,
            value,
            grad: &grad,
            decay,
        }];
        opt.step(dev, lr, &mut params).expect("step");
    }

    fn host(x: &Tensor) -> &[f32] {
        x.host().unwrap_or_default()
    }

    #[test]
    fn matches_hand_computed_single_element() {
        // p = 1, β = (0.9, 0.999), ε = 1e-8, λ = 0.01, lr = 0.1, grads 0.5 then −0.25.
        // Step 1: p = 0.999; m = 0.05; v = 0.00025; m̂ = 0.5, √v̂ = 0.5;
        //         p = 0.999 − 0.1·0.5/(0.5 + 1e-8) = 0.899000002.
        // Step 2: p = 0.899·0.999 = 0.898101; m = 0.02; v = 0.00031225;
        //         p = 0.898101 − (0.1/0.19)·0.02/(√0.00031225/√0.001999 + 1e-8) = 0.871467299.
        let d = CpuDevice::new(1);
        let mut opt = AdamW::new(AdamWConfig::default()).expect("adamw");
        let mut p = t(&[1.0]);
        one_step(&d, &mut opt, 0.1, "w", &mut p, &[0.5], true);
        assert!(close(host(&p), &[0.899_000_002], 1e-7), "{p:?}");
        one_step(&d, &mut opt, 0.1, "w", &mut p, &[-0.25], true);
        assert!(close(host(&p), &[0.871_467_298_705_846_3], 1e-7), "{p:?}");
        let s = opt.export_state(&d).expect("state");
        let s = &s.params["w"];
        assert_eq!(s.step, 2);
        assert!(close(&s.exp_avg, &[0.02], 1e-6) && close(&s.exp_avg_sq, &[0.000_312_25], 1e-6));
    }

    #[test]
    fn matches_reference_with_deepseek_settings_and_changing_lr() {
        // Derived in f64 from PyTorch's documented algorithm (β = (0.9, 0.95), λ = 0.1).
        let grads = [[0.1f32, -0.2, 0.0], [0.3, 0.1, -1e-3], [-0.05, 0.4, 2.0]];
        let lrs = [1e-2, 5e-3, 1e-3];
        let decayed = [
            [0.489_500_001_000_000, -1.488_500_000_5, 1.998],
            [
                0.484_711_790_501_984_76,
                -1.486_413_903_344_857_1,
                2.000_675_748_696_445_5,
            ],
            [
                0.484_061_081_285_68,
                -1.486_716_084_688_109,
                1.999_852_738_560_646,
            ],
        ];
        let undecayed = [
            [0.490_000_001_000_000, -1.490_000_000_5, 2.0],
            [
                0.485_456_540_502_484_7,
                -1.488_658_153_345_107,
                2.003_674_748_696_445_5,
            ],
            [
                0.484_854_302_465_230_15,
                -1.489_108_976_078_693_3,
                2.003_051_806_135_516,
            ],
        ];
        let d = CpuDevice::new(1);
        for (decay, expected) in [(true, decayed), (false, undecayed)] {
            let mut opt = AdamW::new(AdamWConfig::deepseek_v3()).expect("adamw");
            let mut p = t(&[0.5, -1.5, 2.0]);
            for ((g, lr), want) in grads.iter().zip(lrs).zip(expected) {
                one_step(&d, &mut opt, lr, "layer.weight", &mut p, g, decay);
                assert!(
                    close(host(&p), &want, 2e-7),
                    "decay {decay}: {p:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn first_step_moves_by_lr_times_sign() {
        // With no decay, the first update is lr·g/(|g| + ε/…) ≈ lr·sign(g) whatever |g| is.
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        let d = CpuDevice::new(1);
        let mut opt = AdamW::new(cfg).expect("adamw");
        let mut p = t(&[0.0; 4]);
        one_step(
            &d,
            &mut opt,
            0.01,
            "x",
            &mut p,
            &[1e3, -1e-3, 5.0, -0.5],
            true,
        );
        assert!(close(host(&p), &[-0.01, 0.01, -0.01, 0.01], 1e-4), "{p:?}");
    }

    #[test]
    fn per_parameter_step_counts_like_pytorch() {
        let d = CpuDevice::new(1);
        let mut opt = AdamW::new(AdamWConfig::default()).expect("adamw");
        let (mut a, mut b) = (t(&[1.0]), t(&[1.0]));
        one_step(&d, &mut opt, 0.1, "a", &mut a, &[1.0], false);
        one_step(&d, &mut opt, 0.1, "a", &mut a, &[1.0], false);
        one_step(&d, &mut opt, 0.1, "b", &mut b, &[1.0], false);
        assert_eq!(opt.steps(), 3);
        assert_eq!(opt.param_steps("a"), Some(2));
        // b's first update is bias-corrected as a first step: exactly lr·sign(g) (up to ε).
        assert!(close(host(&b), &[0.9], 1e-6), "{b:?}");
    }

    #[test]
    fn export_import_round_trip_is_bitwise() {
        let d = CpuDevice::new(1);
        let grads = |k: usize| -> (Tensor, Tensor) {
            let a: Vec<f32> = (0..5)
                .map(|i| ((i * 7 + k * 3) % 11) as f32 * 0.37 - 1.9)
                .collect();
            let b: Vec<f32> = (0..3)
                .map(|i| ((i + k) % 4) as f32 * -0.11 + 0.05)
                .collect();
            (t(&a), t(&b))
        };
        let run = |opt: &mut AdamW, a: &mut Tensor, b: &mut Tensor, k: usize| {
            let (ga, gb) = grads(k);
            let mut params = [
                ParamRef {
                    name: "model.layers.0.mlp.weight",
                    value: a,
                    grad: &ga,
                    decay: true,
                },
                ParamRef {
                    name: "model.norm.weight",
                    value: b,
                    grad: &gb,
                    decay: false,
                },
            ];
            opt.step(&d, 1e-3 * (k as f64 + 1.0), &mut params)
                .expect("step");
        };
        let cfg = AdamWConfig::deepseek_v3();
        let mut straight = AdamW::new(cfg).expect("adamw");
        let (mut a1, mut b1) = (t(&[0.3; 5]), t(&[1.0; 3]));
        for k in 0..4 {
            run(&mut straight, &mut a1, &mut b1, k);
        }
        let exported = straight.export_state(&d).expect("state");
        // Through JSON (serde) and back, as a checkpoint would.
        let json = serde_json::to_string(&exported).unwrap_or_default();
        let restored: AdamWState = serde_json::from_str(&json).expect("json");
        let bits = |s: &AdamWState| -> Vec<u32> {
            s.params
                .values()
                .flat_map(|p| p.exp_avg.iter().chain(&p.exp_avg_sq).map(|x| x.to_bits()))
                .collect()
        };
        assert_eq!(bits(&restored), bits(&exported));
        assert_eq!(restored, exported);
        let mut resumed = AdamW::new(cfg).expect("adamw");
        resumed.import_state(&d, restored).expect("import");
        let (mut a2, mut b2) = (a1.clone(), b1.clone());
        for k in 4..8 {
            run(&mut straight, &mut a1, &mut b1, k);
            run(&mut resumed, &mut a2, &mut b2, k);
        }
        let to_bits = |v: &Tensor| host(v).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(to_bits(&a1), to_bits(&a2));
        assert_eq!(to_bits(&b1), to_bits(&b2));
        let (r, s) = (
            resumed.export_state(&d).expect("state"),
            straight.export_state(&d).expect("state"),
        );
        assert_eq!(bits(&r), bits(&s));
        assert_eq!(resumed.steps(), 8);
        let names: Vec<&String> = r.params.keys().collect();
        assert_eq!(names, ["model.layers.0.mlp.weight", "model.norm.weight"]);
    }

    #[test]
    fn bad_steps_change_nothing() {
        let d = CpuDevice::new(1);
        let mut opt = AdamW::new(AdamWConfig::default()).expect("adamw");
        let mut a = t(&[1.0, 2.0]);
        let mut b = t(&[3.0]);
        one_step(&d, &mut opt, 0.1, "a", &mut a, &[0.1, 0.1], true);
        let before = (host(&a).to_vec(), opt.export_state(&d));
        let msg = |r: Result<(), OptimError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let (g2, g12) = (t(&[0.1, 0.1]), t(&[0.1, 0.2]));
        let mut p = [
            ParamRef {
                name: "a",
                value: &mut a,
                grad: &g2,
                decay: true,
            },
            ParamRef {
                name: "b",
                value: &mut b,
                grad: &g12,
                decay: true,
            },
        ];
        assert!(
            msg(opt.step(&d, 0.1, &mut p)).contains("\"b\": value has 1 elements but grad has 2")
        );
        let mut c = t(&[0.0; 2]);
        let mut p = [
            ParamRef {
                name: "a",
                value: &mut a,
                grad: &g2,
                decay: true,
            },
            ParamRef {
                name: "a",
                value: &mut c,
                grad: &g12,
                decay: true,
            },
        ];
        assert!(msg(opt.step(&d, 0.1, &mut p)).contains("more than once"));
        let mut short = t(&[1.0]);
        let g1 = t(&[0.1]);
        let mut p = [ParamRef {
            name: "a",
            value: &mut short,
            grad: &g1,
            decay: true,
        }];
        assert!(msg(opt.step(&d, 0.1, &mut p)).contains("optimizer state has 2"));
        let mut p = [ParamRef {
            name: "a",
            value: &mut a,
            grad: &g2,
            decay: true,
        }];
        assert!(msg(opt.step(&d, f64::NAN, &mut p)).contains("learning rate"));
        assert_eq!((host(&a).to_vec(), opt.export_state(&d)), before);
        assert_eq!(host(&b), [3.0]);
    }

    #[test]
    fn invalid_config_and_state_are_rejected() {
        let bad = |c: AdamWConfig| {
            AdamW::new(c)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(
            bad(AdamWConfig {
                beta1: 1.0,
                ..AdamWConfig::default()
            })
            .contains("beta1")
        );
        assert!(
            bad(AdamWConfig {
                beta2: -0.1,
                ..AdamWConfig::default()
            })
            .contains("beta2")
        );
        assert!(
            bad(AdamWConfig {
                eps: 0.0,
                ..AdamWConfig::default()
            })
            .contains("eps")
        );
        assert!(
            bad(AdamWConfig {
                weight_decay: f64::NAN,
                ..AdamWConfig::default()
            })
            .contains("weight_decay")
        );
        let mut state = AdamWState::default();
        state.params.insert(
            "w".into(),
            ParamState {
                step: 1,
                exp_avg: vec![0.0; 2],
                exp_avg_sq: vec![0.0],
            },
        );
        let d = CpuDevice::new(1);
        let err = AdamW::new(AdamWConfig::default())
            .expect("adamw")
            .import_state(&d, state)
            .err()
            .map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("\"w\""));
    }

    /// Several threads of the device give the bits of one.
    #[test]
    fn threads_do_not_change_the_bits() {
        let sizes = [1usize << 20, 300_001, 7, 1 << 19];
        let fill = |n: usize, seed: usize| -> Tensor {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1000.0 - 1.0)
                .collect();
            Tensor::from_host(&[n], v)
        };
        let names: Vec<String> = (0..sizes.len()).map(|i| format!("p{i}")).collect();
        let run = |threads: usize| {
            let d = CpuDevice::new(threads);
            let mut opt = AdamW::new(AdamWConfig::default()).expect("adamw");
            let mut values: Vec<Tensor> = sizes.iter().map(|&n| fill(n, 1)).collect();
            let grads: Vec<Tensor> = sizes.iter().map(|&n| fill(n, 2)).collect();
            for _ in 0..2 {
                let mut refs: Vec<ParamRef<'_>> = values
                    .iter_mut()
                    .zip(&grads)
                    .zip(&names)
                    .map(|((value, grad), name)| ParamRef {
                        name,
                        value,
                        grad,
                        decay: true,
                    })
                    .collect();
                opt.step(&d, 1e-3, &mut refs).expect("step");
            }
            let v: Vec<Vec<u32>> = values
                .iter()
                .map(|x| host(x).iter().map(|f| f.to_bits()).collect())
                .collect();
            (v, opt.export_state(&d))
        };
        assert_eq!(run(1), run(4));
    }

    /// A step on gradients scaled as they are read gives the bits of one on gradients scaled in
    /// memory first, and leaves the gradients as they were; a scale that is not positive and
    /// finite is refused.
    #[test]
    fn a_scaled_step_is_a_step_on_scaled_gradients() {
        let d = CpuDevice::new(2);
        let g: Vec<f32> = (0..257).map(|i| (i as f32 * 0.37).sin()).collect();
        let v0: Vec<f32> = (0..257).map(|i| (i as f32 * 0.11).cos()).collect();
        let s = 0.3172_f32;
        let scaled: Vec<f32> = g.iter().map(|x| x * s).collect();
        let run = |grad: &[f32], scale: f32| {
            let mut opt = AdamW::new(AdamWConfig::default()).expect("adamw");
            let mut value = t(&v0);
            let grad = t(grad);
            for _ in 0..3 {
                let mut refs = [ParamRef {
                    name: "w",
                    value: &mut value,
                    grad: &grad,
                    decay: true,
                }];
                opt.step_scaled(&d, 1e-3, scale, &mut refs).expect("step");
            }
            assert!(host(&grad).iter().all(|x| x.is_finite()));
            let bits: Vec<u32> = host(&value).iter().map(|x| x.to_bits()).collect();
            (bits, host(&grad).to_vec())
        };
        let (a, ga) = run(&g, s);
        let (b, _) = run(&scaled, 1.0);
        assert_eq!(a, b);
        assert_eq!(ga, g, "the gradients are not scaled in memory");
        let mut opt = AdamW::new(AdamWConfig::default()).expect("adamw");
        let mut value = t(&v0);
        let grad = t(&g);
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let mut refs = [ParamRef {
                name: "w",
                value: &mut value,
                grad: &grad,
                decay: true,
            }];
            assert!(opt.step_scaled(&d, 1e-3, bad, &mut refs).is_err());
        }
    }
}

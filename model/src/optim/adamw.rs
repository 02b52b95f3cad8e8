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
//! A step is all-or-nothing: every parameter is checked (lengths, duplicates, state shape)
//! before any is changed, so a failed step leaves parameters and state untouched.

use std::collections::{BTreeMap, BTreeSet};

use super::OptimError;
use super::kernel::{self, Coef};

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
/// in place), its gradient (same length), and whether weight decay applies to it.
#[derive(Debug)]
pub struct ParamRef<'a> {
    /// The parameter's name, for example a HuggingFace tensor name.
    pub name: &'a str,
    /// The values, updated in place.
    pub value: &'a mut [f32],
    /// The gradient, as long as `value`.
    pub grad: &'a [f32],
    /// Apply decoupled weight decay (usually false for norms and biases).
    pub decay: bool,
}

/// Where [`AdamW::step_out_of_place`] puts one parameter's update: `value` receives the new
/// values; `exp_avg` and `exp_avg_sq` (any contents, the parameter's length) are exchanged with
/// the optimizer's moments, so that they come back holding the moments from before the step.
#[derive(Debug)]
pub struct Spare<'a> {
    /// Receives the new values.
    pub value: &'a mut [f32],
    /// Comes back holding the first moment from before the step.
    pub exp_avg: &'a mut Vec<f32>,
    /// Comes back holding the second moment from before the step.
    pub exp_avg_sq: &'a mut Vec<f32>,
}

/// One parameter's optimizer state (PyTorch's `state[p]`).
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

/// The optimizer's whole state, for checkpoints: the number of steps taken and each parameter's
/// [`ParamState`], by name.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWState {
    /// Calls to [`AdamW::step`] that succeeded.
    pub steps: u64,
    /// Per-parameter moments, ordered by name.
    pub params: BTreeMap<String, ParamState>,
}

/// AdamW over named `f32` parameters (see the module documentation for the exact update).
#[derive(Clone, Debug)]
pub struct AdamW {
    config: AdamWConfig,
    state: AdamWState,
    /// Threads a step may use (1: the caller's alone).
    threads: usize,
}

impl AdamW {
    /// An optimizer with no state yet.
    pub fn new(config: AdamWConfig) -> Result<Self, OptimError> {
        Self::from_state(config, AdamWState::default())
    }

    /// An optimizer that continues from exported state (see [`AdamW::import_state`]).
    pub fn from_state(config: AdamWConfig, state: AdamWState) -> Result<Self, OptimError> {
        config.validate()?;
        let mut opt = Self {
            config,
            state: AdamWState::default(),
            threads: 1,
        };
        opt.import_state(state)?;
        Ok(opt)
    }

    /// Let a step spread its update over up to `threads` threads (large tensors are split into
    /// pieces); the results are the same bits whatever the count.
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Threads a step may use.
    #[must_use]
    pub const fn threads(&self) -> usize {
        self.threads
    }

    /// The hyperparameters.
    #[must_use]
    pub const fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Calls to [`AdamW::step`] that succeeded.
    #[must_use]
    pub const fn steps(&self) -> u64 {
        self.state.steps
    }

    /// The state of parameter `name`, if it has been updated (or imported).
    #[must_use]
    pub fn param_state(&self, name: &str) -> Option<&ParamState> {
        self.state.params.get(name)
    }

    /// The whole state, borrowed (for writing a checkpoint without a copy).
    #[must_use]
    pub const fn state(&self) -> &AdamWState {
        &self.state
    }

    /// A copy of the whole state, for a checkpoint.
    #[must_use]
    pub fn export_state(&self) -> AdamWState {
        self.state.clone()
    }

    /// Replaces the whole state with `state` (from a checkpoint); bit-exact, so that the next
    /// steps equal those of the optimizer that exported it. Fails, changing nothing, if a
    /// parameter's two moments differ in length.
    pub fn import_state(&mut self, state: AdamWState) -> Result<(), OptimError> {
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
        self.state = state;
        Ok(())
    }

    /// One AdamW update of every parameter in `params` with learning rate `lr` (from the
    /// schedule). Parameters seen for the first time get zero moments. Fails, changing nothing,
    /// if a value and its gradient differ in length, a name repeats, or a parameter's length
    /// differs from its stored state.
    pub fn step(&mut self, lr: f64, params: &mut [ParamRef<'_>]) -> Result<(), OptimError> {
        self.check(lr, params)?;
        let (c, threads) = (self.config, self.threads);
        let mut states = self.states_for(params)?;
        let mut pieces = Vec::new();
        for (p, st) in params.iter_mut().zip(states.iter_mut()) {
            st.step += 1;
            let k = Coef::new(c, lr, st.step, p.decay);
            let moments = st
                .exp_avg
                .chunks_mut(kernel::PIECE)
                .zip(st.exp_avg_sq.chunks_mut(kernel::PIECE));
            let values = p
                .value
                .chunks_mut(kernel::PIECE)
                .zip(p.grad.chunks(kernel::PIECE));
            for ((value, grad), (m, v)) in values.zip(moments) {
                pieces.push(kernel::Piece::InPlace {
                    k,
                    value,
                    grad,
                    m,
                    v,
                });
            }
        }
        kernel::run(pieces, threads);
        drop(states);
        self.state.steps += 1;
        Ok(())
    }

    /// The same update as [`AdamW::step`], bit for bit, but out of place: each parameter's new
    /// values go into `spares[i].value` (its `params[i].value` is only read), and the new
    /// moments replace the optimizer's by exchange, so that afterwards `spares[i].exp_avg` and
    /// `exp_avg_sq` hold the moments from before the step. Together with `params[i].value`,
    /// the spares then hold the whole state before the step without a byte copied: a
    /// checkpoint snapshot for free. A parameter seen for the first time hands back zero
    /// moments. Fails, changing nothing, as [`AdamW::step`] does, or when a spare's length
    /// differs from its parameter's.
    pub fn step_out_of_place(
        &mut self,
        lr: f64,
        params: &[ParamRef<'_>],
        spares: &mut [Spare<'_>],
    ) -> Result<(), OptimError> {
        self.check(lr, params)?;
        if spares.len() != params.len() {
            return Err(OptimError::Config(format!(
                "{} spare buffers for {} parameters",
                spares.len(),
                params.len()
            )));
        }
        for (p, s) in params.iter().zip(spares.iter()) {
            let n = p.value.len();
            for (what, len) in [
                ("value", s.value.len()),
                ("exp_avg", s.exp_avg.len()),
                ("exp_avg_sq", s.exp_avg_sq.len()),
            ] {
                if len != n {
                    return Err(OptimError::BadState {
                        name: p.name.to_owned(),
                        reason: format!("spare {what} has {len} elements, the parameter {n}"),
                    });
                }
            }
        }
        let (c, threads) = (self.config, self.threads);
        let mut states = self.states_for(params)?;
        let mut pieces = Vec::new();
        for ((p, s), st) in params.iter().zip(spares.iter_mut()).zip(states.iter_mut()) {
            st.step += 1;
            let k = Coef::new(c, lr, st.step, p.decay);
            let old = p
                .value
                .chunks(kernel::PIECE)
                .zip(st.exp_avg.chunks(kernel::PIECE))
                .zip(st.exp_avg_sq.chunks(kernel::PIECE));
            let new = s
                .value
                .chunks_mut(kernel::PIECE)
                .zip(s.exp_avg.chunks_mut(kernel::PIECE))
                .zip(s.exp_avg_sq.chunks_mut(kernel::PIECE));
            for ((((value, m), v), ((nv, nm), ns)), grad) in
                old.zip(new).zip(p.grad.chunks(kernel::PIECE))
            {
                pieces.push(kernel::Piece::OutOfPlace {
                    k,
                    old: kernel::Old { value, m, v },
                    grad,
                    new: kernel::New {
                        value: nv,
                        m: nm,
                        v: ns,
                    },
                });
            }
        }
        kernel::run(pieces, threads);
        for (st, s) in states.iter_mut().zip(spares.iter_mut()) {
            std::mem::swap(&mut st.exp_avg, s.exp_avg);
            std::mem::swap(&mut st.exp_avg_sq, s.exp_avg_sq);
        }
        drop(states);
        self.state.steps += 1;
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
            if p.value.len() != p.grad.len() {
                return Err(OptimError::GradLength {
                    name: p.name.to_owned(),
                    value_len: p.value.len(),
                    grad_len: p.grad.len(),
                });
            }
            if !names.insert(p.name) {
                return Err(OptimError::DuplicateName(p.name.to_owned()));
            }
            if let Some(s) = self.state.params.get(p.name)
                && s.exp_avg.len() != p.value.len()
            {
                return Err(OptimError::StateLength {
                    name: p.name.to_owned(),
                    param_len: p.value.len(),
                    state_len: s.exp_avg.len(),
                });
            }
        }
        Ok(())
    }

    /// The states of `params`, in their order, created with zero moments at step 0 for those
    /// seen for the first time (the names are distinct: [`AdamW::check`]).
    fn states_for(&mut self, params: &[ParamRef<'_>]) -> Result<Vec<&mut ParamState>, OptimError> {
        for p in params {
            if !self.state.params.contains_key(p.name) {
                let n = p.value.len();
                let fresh = ParamState {
                    step: 0,
                    exp_avg: vec![0.0; n],
                    exp_avg_sq: vec![0.0; n],
                };
                self.state.params.insert(p.name.to_owned(), fresh);
            }
        }
        let mut by_name: std::collections::HashMap<&str, &mut ParamState> = self
            .state
            .params
            .iter_mut()
            .map(|(n, s)| (n.as_str(), s))
            .collect();
        params
            .iter()
            .map(|p| {
                by_name
                    .remove(p.name)
                    .ok_or_else(|| OptimError::DuplicateName(p.name.to_owned()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f64], tol: f64) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(&x, &y)| (f64::from(x) - y).abs() <= tol * y.abs().max(1.0))
    }

    fn one_step(
        opt: &mut AdamW,
        lr: f64,
        name: &str,
        value: &mut [f32],
        grad: &[f32],
        decay: bool,
    ) {
        let mut params = [ParamRef {
            name,
            value,
            grad,
            decay,
        }];
        opt.step(lr, &mut params).expect("step");
    }

    #[test]
    fn matches_hand_computed_single_element() {
        // p = 1, β = (0.9, 0.999), ε = 1e-8, λ = 0.01, lr = 0.1, grads 0.5 then −0.25.
        // Step 1: p = 0.999; m = 0.05; v = 0.00025; m̂ = 0.5, √v̂ = 0.5;
        //         p = 0.999 − 0.1·0.5/(0.5 + 1e-8) = 0.899000002.
        // Step 2: p = 0.899·0.999 = 0.898101; m = 0.02; v = 0.00031225;
        //         p = 0.898101 − (0.1/0.19)·0.02/(√0.00031225/√0.001999 + 1e-8) = 0.871467299.
        let mut opt = AdamW::new(AdamWConfig::default()).expect("adamw");
        let mut p = [1.0f32];
        one_step(&mut opt, 0.1, "w", &mut p, &[0.5], true);
        assert!(close(&p, &[0.899_000_002], 1e-7), "{p:?}");
        one_step(&mut opt, 0.1, "w", &mut p, &[-0.25], true);
        assert!(close(&p, &[0.871_467_298_705_846_3], 1e-7), "{p:?}");
        let s = opt.param_state("w").expect("state");
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
        for (decay, expected) in [(true, decayed), (false, undecayed)] {
            let mut opt = AdamW::new(AdamWConfig::deepseek_v3()).expect("adamw");
            let mut p = [0.5f32, -1.5, 2.0];
            for ((g, lr), want) in grads.iter().zip(lrs).zip(expected) {
                one_step(&mut opt, lr, "layer.weight", &mut p, g, decay);
                assert!(close(&p, &want, 2e-7), "decay {decay}: {p:?} vs {want:?}");
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
        let mut opt = AdamW::new(cfg).expect("adamw");
        let mut p = [0.0f32; 4];
        one_step(&mut opt, 0.01, "x", &mut p, &[1e3, -1e-3, 5.0, -0.5], true);
        assert!(close(&p, &[-0.01, 0.01, -0.01, 0.01], 1e-4), "{p:?}");
    }

    #[test]
    fn per_parameter_step_counts_like_pytorch() {
        let mut opt = AdamW::new(AdamWConfig::default()).expect("adamw");
        let (mut a, mut b) = ([1.0f32], [1.0f32]);
        one_step(&mut opt, 0.1, "a", &mut a, &[1.0], false);
        one_step(&mut opt, 0.1, "a", &mut a, &[1.0], false);
        one_step(&mut opt, 0.1, "b", &mut b, &[1.0], false);
        assert_eq!(opt.steps(), 3);
        assert_eq!(opt.param_state("a").map(|s| s.step), Some(2));
        // b's first update is bias-corrected as a first step: exactly lr·sign(g) (up to ε).
        assert!(close(&b, &[0.9], 1e-6), "{b:?}");
    }

    #[test]
    fn export_import_round_trip_is_bitwise() {
        let grads = |k: usize| -> (Vec<f32>, Vec<f32>) {
            let a = (0..5)
                .map(|i| ((i * 7 + k * 3) % 11) as f32 * 0.37 - 1.9)
                .collect();
            let b = (0..3)
                .map(|i| ((i + k) % 4) as f32 * -0.11 + 0.05)
                .collect();
            (a, b)
        };
        let run = |opt: &mut AdamW, a: &mut Vec<f32>, b: &mut Vec<f32>, k: usize| {
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
            opt.step(1e-3 * (k as f64 + 1.0), &mut params)
                .expect("step");
        };
        let cfg = AdamWConfig::deepseek_v3();
        let mut straight = AdamW::new(cfg).expect("adamw");
        let (mut a1, mut b1) = (vec![0.3f32; 5], vec![1.0f32; 3]);
        for k in 0..4 {
            run(&mut straight, &mut a1, &mut b1, k);
        }
        let exported = straight.export_state();
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
        let mut resumed = AdamW::from_state(cfg, restored).expect("from_state");
        let (mut a2, mut b2) = (a1.clone(), b1.clone());
        for k in 4..8 {
            run(&mut straight, &mut a1, &mut b1, k);
            run(&mut resumed, &mut a2, &mut b2, k);
        }
        let to_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(to_bits(&a1), to_bits(&a2));
        assert_eq!(to_bits(&b1), to_bits(&b2));
        assert_eq!(bits(resumed.state()), bits(straight.state()));
        assert_eq!(resumed.steps(), 8);
        let names: Vec<&String> = resumed.state().params.keys().collect();
        assert_eq!(names, ["model.layers.0.mlp.weight", "model.norm.weight"]);
    }

    #[test]
    fn bad_steps_change_nothing() {
        let mut opt = AdamW::new(AdamWConfig::default()).expect("adamw");
        let mut a = [1.0f32, 2.0];
        let mut b = [3.0f32];
        one_step(&mut opt, 0.1, "a", &mut a, &[0.1, 0.1], true);
        let before = (a, opt.export_state());
        let msg = |r: Result<(), OptimError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let mut p = [
            ParamRef {
                name: "a",
                value: &mut a,
                grad: &[0.1, 0.1],
                decay: true,
            },
            ParamRef {
                name: "b",
                value: &mut b,
                grad: &[0.1, 0.2],
                decay: true,
            },
        ];
        assert!(msg(opt.step(0.1, &mut p)).contains("\"b\": value has 1 elements but grad has 2"));
        let mut c = [0.0f32; 2];
        let mut p = [
            ParamRef {
                name: "a",
                value: &mut a,
                grad: &[0.1, 0.1],
                decay: true,
            },
            ParamRef {
                name: "a",
                value: &mut c,
                grad: &[0.1, 0.2],
                decay: true,
            },
        ];
        assert!(msg(opt.step(0.1, &mut p)).contains("more than once"));
        let mut short = [1.0f32];
        let mut p = [ParamRef {
            name: "a",
            value: &mut short,
            grad: &[0.1],
            decay: true,
        }];
        assert!(msg(opt.step(0.1, &mut p)).contains("optimizer state has 2"));
        let mut p = [ParamRef {
            name: "a",
            value: &mut a,
            grad: &[0.1, 0.1],
            decay: true,
        }];
        assert!(msg(opt.step(f64::NAN, &mut p)).contains("learning rate"));
        assert_eq!((a, opt.export_state()), before);
        assert_eq!(b, [3.0]);
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
        let err = AdamW::from_state(AdamWConfig::default(), state)
            .err()
            .map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("\"w\""));
    }

    /// One out-of-place step of the single parameter `w`, decayed.
    fn step_into(
        opt: &mut AdamW,
        value: &mut [f32],
        grad: &[f32],
        spare: (&mut [f32], &mut Vec<f32>, &mut Vec<f32>),
    ) -> Result<(), OptimError> {
        let params = [ParamRef {
            name: "w",
            value,
            grad,
            decay: true,
        }];
        let mut spares = [Spare {
            value: spare.0,
            exp_avg: spare.1,
            exp_avg_sq: spare.2,
        }];
        opt.step_out_of_place(5e-3, &params, &mut spares)
    }

    #[test]
    fn out_of_place_step_equals_step_and_hands_back_the_old_state() {
        let mut a = AdamW::new(AdamWConfig::deepseek_v3()).expect("adamw");
        let mut pa = vec![0.5f32, -1.5, 2.0, 0.25];
        let g = [0.1f32, -0.2, 0.0, 3.0];
        one_step(&mut a, 1e-2, "w", &mut pa, &g, true);
        let mut b = a.clone();
        let mut pb = pa.clone();
        let before = (pa.clone(), a.param_state("w").cloned().expect("state"));
        one_step(&mut a, 5e-3, "w", &mut pa, &g, true);

        let (mut nv, mut m, mut v) = (vec![9.0f32; 4], vec![7.0f32; 4], vec![7.0f32; 4]);
        step_into(&mut b, &mut pb, &g, (&mut nv, &mut m, &mut v)).expect("step");
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&nv), bits(&pa), "new values");
        assert_eq!(b.export_state(), a.export_state(), "new state");
        assert_eq!(bits(&pb), bits(&before.0), "the old values were read only");
        assert_eq!(
            (m, v),
            (before.1.exp_avg, before.1.exp_avg_sq),
            "old moments"
        );

        // A spare of the wrong length fails the step and changes nothing.
        let (mut short, mut m2, mut v2) = (vec![0.0f32; 3], vec![0.0f32; 4], vec![0.0f32; 4]);
        let state = b.export_state();
        let err = step_into(&mut b, &mut pb, &g, (&mut short, &mut m2, &mut v2))
            .expect_err("short spare");
        assert!(err.to_string().contains("spare value has 3"), "{err}");
        assert_eq!(b.export_state(), state);
    }

    /// Several threads give the bits of one, in place and out of place.
    #[test]
    fn threads_do_not_change_the_bits() {
        let sizes = [1usize << 20, 300_001, 7, 1 << 19];
        let fill = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1000.0 - 1.0)
                .collect()
        };
        let names: Vec<String> = (0..sizes.len()).map(|i| format!("p{i}")).collect();
        let run = |threads: usize| {
            let mut opt = AdamW::new(AdamWConfig::default())
                .expect("adamw")
                .with_threads(threads);
            let mut values: Vec<Vec<f32>> = sizes.iter().map(|&n| fill(n, 1)).collect();
            let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| fill(n, 2)).collect();
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
            opt.step(1e-3, &mut refs).expect("step");
            let mut spares: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = sizes
                .iter()
                .map(|&n| (vec![0.0; n], vec![0.0; n], vec![0.0; n]))
                .collect();
            let mut sp: Vec<Spare<'_>> = spares
                .iter_mut()
                .map(|(value, exp_avg, exp_avg_sq)| Spare {
                    value,
                    exp_avg,
                    exp_avg_sq,
                })
                .collect();
            opt.step_out_of_place(1e-3, &refs, &mut sp).expect("step");
            drop((sp, refs));
            let new: Vec<Vec<f32>> = spares.into_iter().map(|s| s.0).collect();
            (values, new, opt.export_state())
        };
        let bits = |v: &[Vec<f32>]| {
            v.iter()
                .map(|x| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        let (one_v, one_n, one_s) = run(1);
        let (four_v, four_n, four_s) = run(4);
        assert_eq!(bits(&one_v), bits(&four_v));
        assert_eq!(bits(&one_n), bits(&four_n));
        assert_eq!(one_s, four_s);
    }
}

//! The DeepSeek-V3 router (HF `DeepseekV3TopkRouter` + `route_tokens_to_experts`), the
//! sequence-wise balance loss, and auxiliary-loss-free balancing (report §2.1.2).
//!
//! `s = σ(x W_gateᵀ)`; experts are *chosen* on `s + e_score_correction_bias` with group-limited
//! top-k; the combine weights are the *unbiased* `s` of the chosen experts (normalised, scaled), so
//! gradients reach `W_gate` through the weights only. The bias is a buffer, moved between steps by
//! [`bias_update`] from the load each expert received. The gate's GEMMs stay in f32 whatever
//! the device's precision ([`crate::device::Device::gemm_full_precision`]).

use crate::config::ModelConfig;
use crate::device::{Mat, MatMut};
use crate::device::{RouterSpec, Tensor};
use crate::layers::Ctx;
use crate::layers::linear::Linear;
use crate::params::{Kind, Params};

#[derive(Clone, Debug)]
pub struct Router {
    /// `[n_routed_experts, hidden]` (HF `mlp.gate.weight`).
    pub gate: Linear,
    /// `[n_routed_experts]` (HF `mlp.gate.e_score_correction_bias`, a buffer).
    pub e_score_correction_bias: Tensor,
    pub spec: RouterSpec,
}

/// What routing decided for a batch, and what backward needs.
#[derive(Debug)]
pub struct RouterCache {
    /// `σ(logits)`, `[n, E]`.
    pub scores: Tensor,
    /// Chosen experts, `n·k` (token-major).
    pub topk: Vec<u32>,
    /// Gradient of the balance loss w.r.t. the logits (when the loss is on).
    pub d_balance: Option<Tensor>,
    /// Value of the sequence-wise balance loss (0 when off).
    pub balance_loss: f32,
}

/// Gradient of the router logits, from B for W.
#[derive(Debug)]
pub struct RouterDys {
    pub d_logits: Tensor,
}

impl Router {
    pub fn init(
        dev: &dyn crate::device::Device,
        cfg: &ModelConfig,
        prefix: &str,
        seed: u64,
    ) -> Router {
        let e = cfg.n_routed_experts;
        Router {
            gate: Linear::init(
                dev,
                &format!("{prefix}weight"),
                e,
                cfg.hidden_size,
                cfg.initializer_range,
                seed,
            ),
            e_score_correction_bias: dev.zeros(&[e]),
            spec: RouterSpec {
                n_experts: e,
                top_k: cfg.num_experts_per_tok,
                n_group: cfg.n_group,
                topk_group: cfg.topk_group,
                norm_topk_prob: cfg.norm_topk_prob,
                scaling: cfg.routed_scaling_factor as f32,
            },
        }
    }

    /// Routes `x` (`[n, hidden]`): returns the combine weights `[n·k, 1]` and the cache.
    pub fn forward(&self, ctx: &Ctx<'_>, x: &Tensor) -> (Tensor, RouterCache) {
        let dev = ctx.dev;
        let w = &self.gate.weight;
        let mut logits = dev.empty(&[x.rows(), w.rows()]);
        dev.gemm_full_precision(
            MatMut::all(&mut logits),
            Mat::all(x),
            Mat::all(w).t(),
            false,
        );
        let out = dev.router_forward(&logits, &self.e_score_correction_bias, self.spec);
        let (balance_loss, d_balance) = if ctx.balance_alpha > 0.0 {
            let (l, d) = dev.balance_loss(
                &out.scores,
                &out.topk,
                self.spec,
                ctx.seq,
                ctx.balance_alpha,
            );
            (l, Some(d))
        } else {
            (0.0, None)
        };
        (
            out.weights,
            RouterCache {
                scores: out.scores,
                topk: out.topk,
                d_balance,
                balance_loss,
            },
        )
    }

    /// B: from the combine-weight gradient `[n·k, 1]` to `dx` (the balance-loss gradient is added).
    pub fn backward_input(
        &self,
        ctx: &Ctx<'_>,
        c: &RouterCache,
        d_weights: &Tensor,
    ) -> (Tensor, RouterDys) {
        let dev = ctx.dev;
        let mut d_logits = dev.router_backward(&c.scores, &c.topk, d_weights, self.spec);
        if let Some(db) = &c.d_balance {
            dev.add_assign(&mut d_logits, db);
        }
        let w = &self.gate.weight;
        let mut dx = dev.empty(&[d_logits.rows(), w.cols()]);
        dev.gemm_full_precision(
            MatMut::all(&mut dx),
            Mat::all(&d_logits),
            Mat::all(w),
            false,
        );
        (dx, RouterDys { d_logits })
    }

    /// W: `dW_gate += d_logitsᵀ x`.
    pub fn backward_weight(&self, ctx: &Ctx<'_>, x: &Tensor, dys: &RouterDys, g: &mut Router) {
        ctx.dev.gemm_full_precision(
            MatMut::all(&mut g.gate.weight),
            Mat::all(&dys.d_logits).t(),
            Mat::all(x),
            true,
        );
    }

    /// Moves the bias by [`bias_update`] for the given per-expert loads.
    pub fn update_bias(&mut self, dev: &dyn crate::device::Device, counts: &[u64], gamma: f32) {
        let delta = bias_update(counts, gamma);
        let delta = dev.upload(&[delta.len()], &delta);
        dev.add_assign(&mut self.e_score_correction_bias, &delta);
    }
}

/// Auxiliary-loss-free balancing (report §2.1.2): each expert's bias moves by
/// `−γ · sign(load − mean load)`, where the loads are token counts over the global batch.
pub fn bias_update(counts: &[u64], gamma: f32) -> Vec<f32> {
    let mean = counts.iter().sum::<u64>() as f64 / counts.len().max(1) as f64;
    counts
        .iter()
        .map(|&c| {
            let d = c as f64 - mean;
            if d > 0.0 {
                -gamma
            } else if d < 0.0 {
                gamma
            } else {
                0.0
            }
        })
        .collect()
}

/// Per-expert token counts of one MoE layer for one forward.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertLoad {
    /// Decoder layer index (MTP layers count from `num_hidden_layers`).
    pub layer: usize,
    /// Tokens routed to each expert.
    pub counts: Vec<u64>,
}

impl ExpertLoad {
    /// `max load / mean load` (1 is perfect balance).
    pub fn max_over_mean(&self) -> f32 {
        let max = self.counts.iter().copied().max().unwrap_or(0) as f64;
        let mean = self.counts.iter().sum::<u64>() as f64 / self.counts.len().max(1) as f64;
        if mean == 0.0 {
            1.0
        } else {
            (max / mean) as f32
        }
    }

    /// Adds another batch's counts (same layer).
    pub fn accumulate(&mut self, other: &ExpertLoad) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }
}

impl Params for Router {
    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(&str, &'a Tensor, Kind)) {
        self.gate.visit(p, f);
        f(
            &format!("{p}e_score_correction_bias"),
            &self.e_score_correction_bias,
            Kind::Buffer,
        );
    }
    fn visit_mut(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut Tensor, Kind)) {
        self.gate.visit_mut(p, f);
        f(
            &format!("{p}e_score_correction_bias"),
            &mut self.e_score_correction_bias,
            Kind::Buffer,
        );
    }
    fn for_each_tensor<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        self.gate.for_each_tensor(f);
        f(&self.e_score_correction_bias);
    }
    fn for_each_tensor_mut(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        self.gate.for_each_tensor_mut(f);
        f(&mut self.e_score_correction_bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;
    use crate::layers::gradcheck::{check, dev, project, randn, rope_table, small_config};
    use crate::layers::moe::plan_dispatch;

    #[test]
    fn router_and_balance_loss_backward_match_finite_differences() {
        let d = dev();
        let mut cfg = small_config();
        cfg.n_routed_experts = 6;
        cfg.n_group = 3;
        cfg.topk_group = 2;
        cfg.num_experts_per_tok = 2;
        let (b, t) = (2, 7);
        let rope = rope_table(&cfg, &d, t);
        for (alpha, norm) in [(0.0, true), (0.5, true), (0.5, false)] {
            cfg.norm_topk_prob = norm;
            let ctx = Ctx {
                dev: &d,
                batch: b,
                seq: t,
                rope: &rope,
                balance_alpha: alpha,
            };
            let mut router = Router::init(&d, &cfg, "g.", 3);
            router.e_score_correction_bias = randn(&[6], 8, 0.05);
            let x = randn(&[b * t, cfg.hidden_size], 1, 1.0);
            let r = randn(&[b * t * 2, 1], 2, 1.0);
            let (_, c) = router.forward(&ctx, &x);
            let (dx, dys) = router.backward_input(&ctx, &c, &r);
            let mut g = Router::init(&d, &cfg, "g.", 3);
            g.gate.weight = d.zeros(g.gate.weight.shape());
            router.backward_weight(&ctx, &x, &dys, &mut g);
            let chosen = c.topk.clone();
            let mut st = (router, x);
            let loss = |s: &(Router, Tensor)| {
                let (w, c) = s.0.forward(&ctx, &s.1);
                if c.topk != chosen {
                    return f64::NAN;
                }
                project(&w, &r) + c.balance_loss as f64
            };
            let label = format!("router (alpha {alpha}, norm {norm})");
            check(&format!("{label} dx"), &mut st, |s| &mut s.1, loss, &dx, 40);
            check(
                &format!("{label} dW"),
                &mut st,
                |s| &mut s.0.gate.weight,
                loss,
                &g.gate.weight,
                40,
            );
        }
    }

    #[test]
    fn bias_update_moves_against_the_load() {
        assert_eq!(bias_update(&[10, 2, 6, 6], 0.5), vec![-0.5, 0.5, 0.0, 0.0]);
    }

    #[test]
    fn bias_updates_drive_an_unbalanced_router_toward_balance() {
        let d = dev();
        let mut cfg = small_config();
        cfg.n_routed_experts = 8;
        cfg.n_group = 2;
        cfg.topk_group = 2;
        cfg.num_experts_per_tok = 2;
        let (b, t) = (4, 32);
        let rope = rope_table(&cfg, &d, t);
        let ctx = Ctx {
            dev: &d,
            batch: b,
            seq: t,
            rope: &rope,
            balance_alpha: 0.0,
        };
        let mut router = Router::init(&d, &cfg, "g.", 11);
        // Tokens share a common direction, and experts 0 and 1 are aligned with it: they win.
        let mut x = randn(&[b * t, cfg.hidden_size], 1, 0.3);
        x.hm()
            .chunks_exact_mut(cfg.hidden_size)
            .for_each(|row| row[0] += 1.0);
        let w = router.gate.weight.hm();
        w[0] = 2.0;
        w[cfg.hidden_size] = 1.5;
        let imbalance = |r: &Router| {
            let (_, c) = r.forward(&ctx, &x);
            let counts = plan_dispatch(&c.topk, 8, 2).counts();
            (
                ExpertLoad {
                    layer: 0,
                    counts: counts.clone(),
                }
                .max_over_mean(),
                counts,
            )
        };
        let (first, _) = imbalance(&router);
        assert!(
            first > 2.0,
            "the router should start unbalanced, max/mean {first}"
        );
        let mut history = vec![first];
        for _ in 0..60 {
            let (_, counts) = imbalance(&router);
            router.update_bias(&d, &counts, 0.01);
            history.push(imbalance(&router).0);
        }
        let last = *history.last().unwrap_or(&first);
        assert!(last < 1.3, "max/mean load should approach 1: {history:?}");
        assert!(
            history[20] < first && last <= history[20],
            "load imbalance should fall: {history:?}"
        );
    }
}

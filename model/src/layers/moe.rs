//! DeepSeekMoE (HF `DeepseekV3MoE`): shared expert(s) + routed experts, with dispatch and combine
//! as explicit functions.
//!
//! ```text
//! weights, topk = router(x)
//! plan          = plan_dispatch(topk)          tokens → per-expert contiguous row ranges
//! xe            = dispatch(x, plan)            [n·k, d], grouped by expert   (EP: all-to-all here)
//! ye[rows_e]    = expert_e(xe[rows_e])         one batched GEMM chain per expert
//! y             = combine(ye, weights, plan)   Σ_j w_j · ye                   (EP: all-to-all back)
//!               + shared_experts(x)
//! ```
//! Expert parallelism later sends `xe`'s per-expert row ranges to the ranks owning those experts;
//! [`DispatchPlan::counts`] are the all-to-all split sizes.

use crate::config::ModelConfig;
use crate::device::Device;
use crate::layers::Ctx;
use crate::layers::mlp::{Mlp, MlpCache, MlpDys};
use crate::layers::router::{ExpertLoad, Router, RouterCache, RouterDys};
use crate::params::{Kind, Params};
use crate::tensor::Tensor;

/// How the `n·k` (token, choice) slots map onto expert-grouped rows.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchPlan {
    /// Rows of expert `e` are `offsets[e] .. offsets[e+1]`.
    pub offsets: Vec<usize>,
    /// For each dispatched row, the token it came from.
    pub token_of_row: Vec<u32>,
    /// For each dispatched row, its slot `token·k + j` in the router output.
    pub slot_of_row: Vec<u32>,
}

impl DispatchPlan {
    /// Rows sent to each expert.
    pub fn counts(&self) -> Vec<u64> {
        self.offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as u64)
            .collect()
    }

    pub fn rows(&self, e: usize) -> std::ops::Range<usize> {
        self.offsets[e]..self.offsets[e + 1]
    }
}

/// Groups the router's choices by expert (a stable counting sort: tokens keep their order).
pub fn plan_dispatch(topk: &[u32], n_experts: usize, top_k: usize) -> DispatchPlan {
    let mut offsets = vec![0usize; n_experts + 1];
    for &e in topk {
        offsets[e as usize + 1] += 1;
    }
    for e in 0..n_experts {
        offsets[e + 1] += offsets[e];
    }
    let mut next = offsets.clone();
    let mut token_of_row = vec![0u32; topk.len()];
    let mut slot_of_row = vec![0u32; topk.len()];
    for (slot, &e) in topk.iter().enumerate() {
        let r = next[e as usize];
        next[e as usize] += 1;
        token_of_row[r] = (slot / top_k) as u32;
        slot_of_row[r] = slot as u32;
    }
    DispatchPlan {
        offsets,
        token_of_row,
        slot_of_row,
    }
}

/// Tokens → expert-grouped rows: `xe[r] = x[token_of_row[r]]`.
pub fn dispatch(dev: &dyn Device, x: &Tensor, plan: &DispatchPlan) -> Tensor {
    dev.gather_rows(x, &plan.token_of_row)
}

/// Expert-grouped rows → tokens: `y[t] = Σ_{r: token(r)=t} w_perm[r] · ye[r]`, with `w_perm` the
/// combine weights in row order (`[rows, 1]`).
pub fn combine(
    dev: &dyn Device,
    ye: &Tensor,
    w_perm: &Tensor,
    plan: &DispatchPlan,
    n_tokens: usize,
) -> Tensor {
    let mut weighted = dev.copy(ye);
    dev.scale_rows(&mut weighted, w_perm);
    let mut y = dev.zeros(&[n_tokens, ye.cols()]);
    dev.scatter_add_rows(&mut y, &weighted, &plan.token_of_row);
    y
}

/// Backward of [`combine`]: returns `(d_ye, d_w_perm)`.
pub fn combine_backward(
    dev: &dyn Device,
    dy: &Tensor,
    ye: &Tensor,
    w_perm: &Tensor,
    plan: &DispatchPlan,
) -> (Tensor, Tensor) {
    let mut d_ye = dev.gather_rows(dy, &plan.token_of_row);
    let d_w = dev.rows_dot(&d_ye, ye);
    dev.scale_rows(&mut d_ye, w_perm);
    (d_ye, d_w)
}

/// Backward of [`dispatch`]: `dx[t] = Σ_{r: token(r)=t} d_xe[r]`.
pub fn dispatch_backward(
    dev: &dyn Device,
    d_xe: &Tensor,
    plan: &DispatchPlan,
    n_tokens: usize,
) -> Tensor {
    let mut dx = dev.zeros(&[n_tokens, d_xe.cols()]);
    dev.scatter_add_rows(&mut dx, d_xe, &plan.token_of_row);
    dx
}

#[derive(Clone, Debug)]
pub struct Moe {
    pub experts: Vec<Mlp>,
    pub gate: Router,
    pub shared_experts: Mlp,
    /// Decoder layer index (for load reports).
    pub layer: usize,
}

/// Activations of a MoE forward.
#[derive(Debug)]
pub struct MoeCache {
    pub router: RouterCache,
    pub plan: DispatchPlan,
    xe: Tensor,
    experts: MlpCache,
    ye: Tensor,
    w_perm: Tensor,
    shared: MlpCache,
}

/// Output-gradients for the W pass.
#[derive(Debug)]
pub struct MoeDys {
    d_ye: Tensor,
    d_g: Tensor,
    d_u: Tensor,
    router: RouterDys,
    shared: MlpDys,
}

impl Moe {
    pub fn init(dev: &dyn Device, cfg: &ModelConfig, prefix: &str, layer: usize, seed: u64) -> Moe {
        let (d, w, std) = (
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.initializer_range,
        );
        Moe {
            experts: (0..cfg.n_routed_experts)
                .map(|j| Mlp::init(dev, &format!("{prefix}experts.{j}."), d, w, std, seed))
                .collect(),
            gate: Router::init(dev, cfg, &format!("{prefix}gate."), seed),
            shared_experts: Mlp::init(
                dev,
                &format!("{prefix}shared_experts."),
                d,
                w * cfg.n_shared_experts,
                std,
                seed,
            ),
            layer,
        }
    }

    pub fn forward(&self, ctx: &Ctx<'_>, x: &Tensor) -> (Tensor, MoeCache) {
        let dev = ctx.dev;
        let n = x.rows();
        // The routed experts and the shared expert are independent until their outputs are
        // summed: the device runs them side by side.
        let mut routed_out = None;
        let mut routed = || {
            let (weights, router) = self.gate.forward(ctx, x);
            let plan = plan_dispatch(&router.topk, self.experts.len(), self.gate.spec.top_k);
            let xe = dispatch(dev, x, &plan);

            let rows = xe.rows();
            let width = self.experts.first().map_or(0, Mlp::width);
            // Every row belongs to exactly one expert, so the per-expert GEMMs overwrite these fully.
            let (mut g, mut u) = (dev.empty(&[rows, width]), dev.empty(&[rows, width]));
            for (e, expert) in self.experts.iter().enumerate() {
                expert.forward_gate_up_rows(dev, &xe, plan.rows(e), &mut g, &mut u);
            }
            let h = dev.swiglu_forward(&g, &u);
            let mut ye = dev.empty(&[rows, x.cols()]);
            for (e, expert) in self.experts.iter().enumerate() {
                expert
                    .down_proj
                    .forward_rows(dev, &h, plan.rows(e), &mut ye);
            }

            let w_perm = dev.gather_rows(&weights, &plan.slot_of_row);
            let y = combine(dev, &ye, &w_perm, &plan, n);
            routed_out = Some((y, router, plan, xe, MlpCache { g, u, h }, ye, w_perm));
        };
        let mut shared_out = None;
        let mut shared = || shared_out = Some(self.shared_experts.forward(dev, x));
        dev.join(&mut routed, &mut shared);
        let (mut y, router, plan, xe, experts, ye, w_perm) =
            routed_out.expect("the routed experts ran");
        let (ys, shared) = shared_out.expect("the shared expert ran");
        dev.add_assign(&mut y, &ys);
        (
            y,
            MoeCache {
                router,
                plan,
                xe,
                experts,
                ye,
                w_perm,
                shared,
            },
        )
    }

    /// Tokens each expert received in this forward.
    pub fn load(&self, c: &MoeCache) -> ExpertLoad {
        ExpertLoad {
            layer: self.layer,
            counts: c.plan.counts(),
        }
    }

    /// B: `dx` from `dy`.
    pub fn backward_input(&self, ctx: &Ctx<'_>, c: &MoeCache, dy: &Tensor) -> (Tensor, MoeDys) {
        let dev = ctx.dev;
        let n = dy.rows();
        // As in forward: the routed experts' B beside the shared expert's.
        let mut routed_out = None;
        let mut routed = || {
            let (d_ye, d_w_perm) = combine_backward(dev, dy, &c.ye, &c.w_perm, &c.plan);

            let mut d_h = dev.empty(c.experts.h.shape());
            for (e, expert) in self.experts.iter().enumerate() {
                expert
                    .down_proj
                    .backward_input_rows(dev, &d_ye, c.plan.rows(e), &mut d_h, false);
            }
            let (d_g, d_u) = dev.swiglu_backward(&c.experts.g, &c.experts.u, &d_h);
            let mut d_xe = dev.empty(c.xe.shape());
            for (e, expert) in self.experts.iter().enumerate() {
                expert
                    .gate_proj
                    .backward_input_rows(dev, &d_g, c.plan.rows(e), &mut d_xe, false);
                expert
                    .up_proj
                    .backward_input_rows(dev, &d_u, c.plan.rows(e), &mut d_xe, true);
            }
            let mut dx = dispatch_backward(dev, &d_xe, &c.plan, n);

            let mut d_weights = dev.zeros(&[c.router.topk.len(), 1]);
            dev.scatter_add_rows(&mut d_weights, &d_w_perm, &c.plan.slot_of_row);
            let (dx_router, router) = self.gate.backward_input(ctx, &c.router, &d_weights);
            dev.add_assign(&mut dx, &dx_router);
            routed_out = Some((dx, d_ye, d_g, d_u, router));
        };
        let mut shared_out = None;
        let mut shared =
            || shared_out = Some(self.shared_experts.backward_input(dev, &c.shared, dy));
        dev.join(&mut routed, &mut shared);
        let (mut dx, d_ye, d_g, d_u, router) = routed_out.expect("the routed experts' B ran");
        let (dx_shared, shared) = shared_out.expect("the shared expert's B ran");
        dev.add_assign(&mut dx, &dx_shared);
        (
            dx,
            MoeDys {
                d_ye,
                d_g,
                d_u,
                router,
                shared,
            },
        )
    }

    /// W: expert, router and shared-expert weight gradients.
    pub fn backward_weight(
        &self,
        ctx: &Ctx<'_>,
        x: &Tensor,
        c: &MoeCache,
        dys: &MoeDys,
        g: &mut Moe,
    ) {
        let dev = ctx.dev;
        for (e, (expert, ge)) in self.experts.iter().zip(g.experts.iter_mut()).enumerate() {
            let r = c.plan.rows(e);
            if r.is_empty() {
                continue;
            }
            expert.down_proj.backward_weight_rows(
                dev,
                &c.experts.h,
                &dys.d_ye,
                r.clone(),
                &mut ge.down_proj,
            );
            expert.gate_proj.backward_weight_rows(
                dev,
                &c.xe,
                &dys.d_g,
                r.clone(),
                &mut ge.gate_proj,
            );
            expert
                .up_proj
                .backward_weight_rows(dev, &c.xe, &dys.d_u, r, &mut ge.up_proj);
        }
        self.gate.backward_weight(ctx, x, &dys.router, &mut g.gate);
        self.shared_experts
            .backward_weight(dev, x, &c.shared, &dys.shared, &mut g.shared_experts);
    }
}

impl Params for Moe {
    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(&str, &'a Tensor, Kind)) {
        for (j, e) in self.experts.iter().enumerate() {
            e.visit(&format!("{p}experts.{j}."), f);
        }
        self.gate.visit(&format!("{p}gate."), f);
        self.shared_experts.visit(&format!("{p}shared_experts."), f);
    }
    fn visit_mut(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut Tensor, Kind)) {
        for (j, e) in self.experts.iter_mut().enumerate() {
            e.visit_mut(&format!("{p}experts.{j}."), f);
        }
        self.gate.visit_mut(&format!("{p}gate."), f);
        self.shared_experts
            .visit_mut(&format!("{p}shared_experts."), f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck::{check, dev, project, randn, rope_table, small_config};
    use crate::layers::zeros_like;

    #[test]
    fn plan_groups_rows_by_expert_in_token_order() {
        let plan = plan_dispatch(&[2, 0, 1, 2, 0, 1], 3, 2);
        assert_eq!(plan.offsets, vec![0, 2, 4, 6]);
        assert_eq!(plan.token_of_row, vec![0, 2, 1, 2, 0, 1]);
        assert_eq!(plan.slot_of_row, vec![1, 4, 2, 5, 0, 3]);
        assert_eq!(plan.counts(), vec![2, 2, 2]);
    }

    #[test]
    fn moe_backward_matches_finite_differences_with_balance_loss() {
        let d = dev();
        let mut cfg = small_config();
        cfg.n_routed_experts = 8;
        cfg.n_group = 4;
        cfg.topk_group = 2;
        cfg.num_experts_per_tok = 3;
        cfg.n_shared_experts = 2;
        let (b, t) = (2, 6);
        let rope = rope_table(&cfg, &d, t);
        let ctx = Ctx {
            dev: &d,
            batch: b,
            seq: t,
            rope: &rope,
            balance_alpha: 0.3,
        };
        let x = randn(&[b * t, cfg.hidden_size], 1, 1.0);
        let mut moe = Moe::init(&d, &cfg, "m.", 1, 9);
        moe.gate.e_score_correction_bias = randn(&[8], 4, 0.05);
        let r = randn(&[b * t, cfg.hidden_size], 3, 1.0);
        let (_, c) = moe.forward(&ctx, &x);
        assert!(c.router.balance_loss > 0.0);
        let (dx, dys) = moe.backward_input(&ctx, &c, &r);
        let mut g = zeros_like(&moe, &d);
        moe.backward_weight(&ctx, &x, &c, &dys, &mut g);
        let busy = (0..8).max_by_key(|&e| c.plan.rows(e).len()).unwrap_or(0);
        let chosen = c.router.topk.clone();
        let mut st = (moe, x, busy);
        let loss = |s: &(Moe, Tensor, usize)| {
            let (y, c) = s.0.forward(&ctx, &s.1);
            if c.router.topk != chosen {
                return f64::NAN;
            }
            project(&y, &r) + c.router.balance_loss as f64
        };
        check("moe dx", &mut st, |s| &mut s.1, loss, &dx, 40);
        check(
            "moe router W_gate",
            &mut st,
            |s| &mut s.0.gate.gate.weight,
            loss,
            &g.gate.gate.weight,
            40,
        );
        check(
            "moe shared up",
            &mut st,
            |s| &mut s.0.shared_experts.up_proj.weight,
            loss,
            &g.shared_experts.up_proj.weight,
            20,
        );
        let e = busy;
        check(
            "moe expert gate",
            &mut st,
            |s| &mut s.0.experts[s.2].gate_proj.weight,
            loss,
            &g.experts[e].gate_proj.weight,
            20,
        );
        check(
            "moe expert down",
            &mut st,
            |s| &mut s.0.experts[s.2].down_proj.weight,
            loss,
            &g.experts[e].down_proj.weight,
            20,
        );
    }
}

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
//! Expert parallelism: with an [`ExpertExchange`] of size `P > 1` in [`Ctx::ep`], this rank runs
//! only its share of the routed experts ([`crate::layers::expert_exchange::experts_of`]). `xe`'s
//! per-peer row ranges go to the expert-owners with their per-expert counts (`Dispatch`) and the
//! outputs come back in `xe`'s order (`Combine`); B sends `d_ye` out (`GradDispatch`) and `d_xe`
//! back (`GradCombine`); see `moe/ep.rs`. Each exchange is posted, then waited for, with
//! independent work in between: the shared expert's forward during the dispatch, its B during
//! the gradient dispatch, the router's B during the gradient combine (as DeepSeek-V3 overlaps the
//! shared expert with the dispatch). This rank's own rows for its own experts never enter the
//! exchange: its experts run on them apart from the peers' rows, during the combine (forward)
//! and the gradient combine (B), after the peers' rows have gone back. The router, the
//! shared experts, the balance loss and [`Moe::load`] stay on the token-owner; the experts'
//! activations and output-gradients stay on the expert-owner, whose W is local. Without an
//! exchange (or with `P = 1`) every expert runs here on `xe` itself, exactly as before EP.

mod dispatch;
mod ep;
mod experts;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_ep;

pub use dispatch::{
    DispatchPlan, combine, combine_backward, dispatch, dispatch_backward, plan_dispatch,
};

use crate::config::ModelConfig;
use crate::device::Device;
use crate::layers::Ctx;
use crate::layers::expert_exchange::{ExchangePhase, ExpertExchange};
use crate::layers::mlp::{Mlp, MlpCache, MlpDys};
use crate::layers::router::{ExpertLoad, Router, RouterCache, RouterDys};
use crate::params::{Kind, Params};
use crate::tensor::Tensor;
use ep::EpRoute;
use experts::{ExpertDys, ExpertRows};

#[derive(Clone, Debug)]
pub struct Moe {
    /// All `E` routed experts. Under EP only this rank's share is read; the others may be
    /// shape-only placeholders ([`Tensor::shape_only`]).
    pub experts: Vec<Mlp>,
    pub gate: Router,
    pub shared_experts: Mlp,
    /// Decoder layer index (for load reports, and the EP exchange's layer id).
    pub layer: usize,
}

/// Activations of a MoE forward.
#[derive(Debug)]
pub struct MoeCache {
    pub router: RouterCache,
    pub plan: DispatchPlan,
    /// The rows this rank's experts ran on: `xe` itself, or (EP) the rows peers sent here.
    experts: ExpertRows,
    /// EP: this rank's own rows for its own experts (they never leave the rank).
    own_experts: Option<ExpertRows>,
    /// EP: how rows moved between token-owners and expert-owners (`None`: every expert local).
    route: Option<EpRoute>,
    /// The experts' outputs in `xe`'s row order.
    ye: Tensor,
    w_perm: Tensor,
    shared: MlpCache,
}

/// Output-gradients for the W pass.
#[derive(Debug)]
pub struct MoeDys {
    experts: ExpertDys,
    own_experts: Option<ExpertDys>,
    router: RouterDys,
    shared: MlpDys,
}

/// The EP group the layer exchanges over, when there is one of more than one rank.
fn ep_group<'a>(ctx: &Ctx<'a>) -> Option<&'a dyn ExpertExchange> {
    ctx.ep.filter(|x| x.size() > 1)
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
        if let Some(ex) = ep_group(ctx) {
            return self.forward_ep(ctx, x, ex);
        }
        let dev = ctx.dev;
        let n = x.rows();
        let n_experts = self.experts.len();
        // The routed experts and the shared expert are independent until their outputs are
        // summed: the device runs them side by side.
        let mut routed_out = None;
        let mut routed = || {
            let (weights, router) = self.gate.forward(ctx, x);
            let plan = plan_dispatch(&router.topk, n_experts, self.gate.spec.top_k);
            let xe = dispatch(dev, x, &plan);
            let offsets = plan.offsets.clone();
            let (ye, experts) = ExpertRows::forward(dev, &self.experts, 0..n_experts, offsets, xe);
            let w_perm = dev.gather_rows(&weights, &plan.slot_of_row);
            let y = combine(dev, &ye, &w_perm, &plan, n);
            routed_out = Some((y, router, plan, experts, None, ye, w_perm));
        };
        let mut shared_out = None;
        let mut shared = || shared_out = Some(self.shared_experts.forward(dev, x));
        dev.join(&mut routed, &mut shared);
        let (mut y, router, plan, experts, route, ye, w_perm) =
            routed_out.expect("the routed experts ran");
        let (ys, shared) = shared_out.expect("the shared expert ran");
        dev.add_assign(&mut y, &ys);
        (
            y,
            MoeCache {
                router,
                plan,
                experts,
                own_experts: None,
                route,
                ye,
                w_perm,
                shared,
            },
        )
    }

    /// Forward under EP. The shared expert computes while the dispatch is on the wire, and this
    /// rank's experts on its own rows while the combine is (the combine's sums are the same as
    /// without EP, in the same order).
    fn forward_ep(&self, ctx: &Ctx<'_>, x: &Tensor, ex: &dyn ExpertExchange) -> (Tensor, MoeCache) {
        let dev = ctx.dev;
        let n_experts = self.experts.len();
        let (weights, router) = self.gate.forward(ctx, x);
        let plan = plan_dispatch(&router.topk, n_experts, self.gate.spec.top_k);
        let xe = dispatch(dev, x, &plan);
        let posted = EpRoute::post_dispatch(ex, dev, self.layer, &plan, n_experts, &xe);
        let own = posted.own_rows(&plan);
        let x_own = own.take(dev, &xe);
        drop(xe);
        let (ys, shared) = self.shared_experts.forward(dev, x);
        let (route, local, xl) = posted.wait(ex, dev);
        let (yl, experts) = ExpertRows::forward(dev, &self.experts, local.ids, local.offsets, xl);
        route.post_to_tokens(ex, dev, ExchangePhase::Combine, &yl);
        drop(yl);
        let (y_own, own_experts) = ExpertRows::forward(
            dev,
            &self.experts,
            own.experts.ids,
            own.experts.offsets,
            x_own,
        );
        let w_perm = dev.gather_rows(&weights, &plan.slot_of_row);
        let ye = route.wait_to_tokens(ex, dev, ExchangePhase::Combine, &y_own);
        drop(y_own);
        let mut y = combine(dev, &ye, &w_perm, &plan, x.rows());
        dev.add_assign(&mut y, &ys);
        (
            y,
            MoeCache {
                router,
                plan,
                experts,
                own_experts: Some(own_experts),
                route: Some(route),
                ye,
                w_perm,
                shared,
            },
        )
    }

    /// Tokens each expert received in this forward (all `E` experts, from this rank's tokens).
    pub fn load(&self, c: &MoeCache) -> ExpertLoad {
        ExpertLoad {
            layer: self.layer,
            counts: c.plan.counts(),
        }
    }

    /// B: `dx` from `dy`. A forward that ran under EP needs the same group in `ctx.ep` here
    /// (panics otherwise: a programming error).
    pub fn backward_input(&self, ctx: &Ctx<'_>, c: &MoeCache, dy: &Tensor) -> (Tensor, MoeDys) {
        if let Some(route) = &c.route {
            let ex =
                ep_group(ctx).expect("Moe::backward_input: forward ran under EP, B has no group");
            return self.backward_input_ep(ctx, c, dy, route, ex);
        }
        let dev = ctx.dev;
        let n = dy.rows();
        // As in forward: the routed experts' B beside the shared expert's.
        let mut routed_out = None;
        let mut routed = || {
            let (d_ye, d_w_perm) = combine_backward(dev, dy, &c.ye, &c.w_perm, &c.plan);
            let (d_xe, experts) = c.experts.backward_input(dev, &self.experts, d_ye);
            let mut dx = dispatch_backward(dev, &d_xe, &c.plan, n);

            let (dx_router, router) = self.router_backward_input(ctx, c, &d_w_perm);
            dev.add_assign(&mut dx, &dx_router);
            routed_out = Some((dx, experts, router));
        };
        let mut shared_out = None;
        let mut shared =
            || shared_out = Some(self.shared_experts.backward_input(dev, &c.shared, dy));
        dev.join(&mut routed, &mut shared);
        let (mut dx, experts, router) = routed_out.expect("the routed experts' B ran");
        let (dx_shared, shared) = shared_out.expect("the shared expert's B ran");
        dev.add_assign(&mut dx, &dx_shared);
        (
            dx,
            MoeDys {
                experts,
                own_experts: None,
                router,
                shared,
            },
        )
    }

    /// The router's B, from the gradient of the permuted combine weights.
    fn router_backward_input(
        &self,
        ctx: &Ctx<'_>,
        c: &MoeCache,
        d_w_perm: &Tensor,
    ) -> (Tensor, RouterDys) {
        let dev = ctx.dev;
        let mut d_weights = dev.zeros(&[c.router.topk.len(), 1]);
        dev.scatter_add_rows(&mut d_weights, d_w_perm, &c.plan.slot_of_row);
        self.gate.backward_input(ctx, &c.router, &d_weights)
    }

    /// B under EP: the shared expert's B while the output gradients travel to the experts, this
    /// rank's experts' B on its own rows and the router's while the input gradients travel back
    /// (the sums in the same order as without EP).
    fn backward_input_ep(
        &self,
        ctx: &Ctx<'_>,
        c: &MoeCache,
        dy: &Tensor,
        route: &EpRoute,
        ex: &dyn ExpertExchange,
    ) -> (Tensor, MoeDys) {
        let dev = ctx.dev;
        let (d_ye, d_w_perm) = combine_backward(dev, dy, &c.ye, &c.w_perm, &c.plan);
        route.post_to_experts(ex, dev, ExchangePhase::GradDispatch, &d_ye);
        let d_y_own = route.take_own(dev, &d_ye);
        drop(d_ye);
        let (dx_shared, shared) = self.shared_experts.backward_input(dev, &c.shared, dy);
        let d_yl = route.wait_to_experts(ex, dev, ExchangePhase::GradDispatch);
        let (d_xl, experts) = c.experts.backward_input(dev, &self.experts, d_yl);
        route.post_to_tokens(ex, dev, ExchangePhase::GradCombine, &d_xl);
        drop(d_xl);
        let own = c
            .own_experts
            .as_ref()
            .map(|o| o.backward_input(dev, &self.experts, d_y_own));
        let (dx_router, router) = self.router_backward_input(ctx, c, &d_w_perm);
        let none;
        let d_x_own = match &own {
            Some((d, _)) => d,
            None => {
                none = dev.zeros(&[0, dy.cols()]);
                &none
            }
        };
        let d_xe = route.wait_to_tokens(ex, dev, ExchangePhase::GradCombine, d_x_own);
        let mut dx = dispatch_backward(dev, &d_xe, &c.plan, dy.rows());
        dev.add_assign(&mut dx, &dx_router);
        dev.add_assign(&mut dx, &dx_shared);
        (
            dx,
            MoeDys {
                experts,
                own_experts: own.map(|(_, d)| d),
                router,
                shared,
            },
        )
    }

    /// W: expert, router and shared-expert weight gradients. Under EP only this rank's experts
    /// get gradients (from every source's rows); the other experts' gradients are not touched.
    pub fn backward_weight(
        &self,
        ctx: &Ctx<'_>,
        x: &Tensor,
        c: &MoeCache,
        dys: &MoeDys,
        g: &mut Moe,
    ) {
        let dev = ctx.dev;
        c.experts
            .backward_weight(dev, &self.experts, &dys.experts, &mut g.experts);
        if let (Some(own), Some(d)) = (&c.own_experts, &dys.own_experts) {
            own.backward_weight(dev, &self.experts, d, &mut g.experts);
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

//! DeepSeekMoE (HF `DeepseekV3MoE`): shared expert(s) + routed experts, split at its two
//! communication points into the phases that the DeepSeek-V3 report overlaps (§3.2.1, Fig. 4).
//!
//! ```text
//! token-owner                                  expert-owner (every EP index, this one included)
//! route:   weights, topk = router(x)
//!          plan = plan_dispatch(topk)          tokens → per-expert contiguous rows
//!          xe   = dispatch(x, plan)            cut by EP index ─── dispatch ───► shard::forward:
//! shared_forward(x)   (while the rows travel)                                   expert GEMMs
//! combine: ye   = rows back, in xe's order  ◄──────────── combine ───────────── per source
//!          y    = Σ_j w_j · ye  + shared(x)
//! ```
//! B the same way in reverse: [`Moe::combine_backward`] yields the output-gradient rows for the
//! expert-owners (gradient dispatch), [`Moe::shared_backward`] runs while they travel,
//! [`Moe::route_backward`] takes the input-gradient rows back (gradient combine) and finishes
//! with the router's B. W: the router and the shared expert here ([`Moe::backward_weight`]), the
//! routed experts on their owner ([`shard::backward_weight`]). These functions never wait: who
//! runs them moves the parts between token-owners and expert-owners. Under EP rank `i` owns the
//! experts [`EpGroup::mine`]; the rest of the layer stays on the token-owner. Without EP
//! (a group of one) the only part is `xe` itself, and the rows come back unchanged in order.

mod dispatch;
mod experts;
pub mod shard;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_ep;

pub use dispatch::{
    DispatchPlan, combine, combine_backward, dispatch, dispatch_backward, plan_dispatch,
};
pub use shard::{DispatchPart, ShardCache, ShardError};

use crate::config::ModelConfig;
use crate::device::Device;
use crate::layers::Ctx;
use crate::layers::ep::EpGroup;
use crate::layers::mlp::{Mlp, MlpCache, MlpDys};
use crate::layers::router::{ExpertLoad, Router, RouterCache, RouterDys};
use crate::params::{Kind, Params};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct Moe {
    /// All `E` routed experts. Under EP only this rank's share is read; the others may be
    /// shape-only placeholders ([`Tensor::shape_only`]).
    pub experts: Vec<Mlp>,
    pub gate: Router,
    pub shared_experts: Mlp,
    /// Decoder layer index (for load reports and the exchange's layer id).
    pub layer: usize,
}

/// Why what came back from the expert-owners does not fit the layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoeError {
    #[error("layer {layer}: {got} parts came back from an EP group of {want}")]
    Parts {
        layer: usize,
        got: usize,
        want: usize,
    },
    #[error("layer {layer}: EP index {index} sent back {got} rows for the {want} it was sent")]
    Rows {
        layer: usize,
        index: usize,
        got: usize,
        want: usize,
    },
}

/// What [`Moe::route`] leaves for [`Moe::combine`].
#[derive(Debug)]
pub struct MoeRouted {
    router: RouterCache,
    plan: DispatchPlan,
    /// Combine weights `[n·k, 1]`, token-major.
    weights: Tensor,
    /// `xe` rows `send[p] .. send[p + 1]` went to EP index `p` (length `P + 1`).
    send: Vec<usize>,
}

/// Activations of a MoE forward, on the token-owner.
#[derive(Debug)]
pub struct MoeCache {
    pub router: RouterCache,
    pub plan: DispatchPlan,
    /// The experts' outputs in `xe`'s row order.
    ye: Tensor,
    w_perm: Tensor,
    shared: MlpCache,
    send: Vec<usize>,
}

/// Output-gradients for the W pass (the router and the shared expert; the routed experts keep
/// theirs on their owner).
#[derive(Debug)]
pub struct MoeDys {
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

    /// Routed experts of the layer (`E`).
    pub fn n_experts(&self) -> usize {
        self.experts.len()
    }

    /// Forward, token-owner, first phase: routes `x` and cuts the dispatched rows into one
    /// part per EP index (`parts[p]` goes to index `p`, this rank's own part included).
    pub fn route(&self, ctx: &Ctx<'_>, x: &Tensor, ep: EpGroup) -> (MoeRouted, Vec<DispatchPart>) {
        let dev = ctx.dev;
        let n_experts = self.experts.len();
        let (weights, router) = self.gate.forward(ctx, x);
        let plan = plan_dispatch(&router.topk, n_experts, self.gate.spec.top_k);
        let xe = dispatch(dev, x, &plan);
        let size = ep.size.max(1);
        let row = |e: usize| plan.offsets.get(e).copied().unwrap_or(0);
        let send: Vec<usize> = (0..size)
            .map(|p| row(ep.experts_of(n_experts, p).start))
            .chain([row(n_experts)])
            .collect();
        let counts = plan.counts();
        let counts_of = |p: usize| counts[ep.experts_of(n_experts, p)].to_vec();
        let parts = if size == 1 {
            vec![DispatchPart {
                counts: counts_of(0),
                rows: xe,
            }]
        } else {
            let sizes: Vec<usize> = send.windows(2).map(|w| w[1] - w[0]).collect();
            dev.split_rows(&xe, &sizes)
                .into_iter()
                .enumerate()
                .map(|(p, rows)| DispatchPart {
                    counts: counts_of(p),
                    rows,
                })
                .collect()
        };
        (
            MoeRouted {
                router,
                plan,
                weights,
                send,
            },
            parts,
        )
    }

    /// Forward of the shared expert(s) on the layer's input (independent of the routed part:
    /// it runs while the dispatch travels).
    pub fn shared_forward(&self, dev: &dyn Device, x: &Tensor) -> (Tensor, MlpCache) {
        self.shared_experts.forward(dev, x)
    }

    /// Forward, token-owner, last phase: `back[p]` is what EP index `p` sent back (its experts'
    /// outputs on the rows it was sent, in that order), `shared` the shared expert's forward;
    /// returns the layer's output (`[n, hidden]`, `n` tokens) and its cache.
    pub fn combine(
        &self,
        ctx: &Ctx<'_>,
        r: MoeRouted,
        back: Vec<Tensor>,
        shared: (Tensor, MlpCache),
        n: usize,
    ) -> Result<(Tensor, MoeCache), MoeError> {
        let dev = ctx.dev;
        let ye = self.join_parts(dev, &r.send, back)?;
        let w_perm = dev.gather_rows(&r.weights, &r.plan.slot_of_row);
        let mut y = combine(dev, &ye, &w_perm, &r.plan, n);
        let (ys, shared) = shared;
        dev.add_assign(&mut y, &ys);
        Ok((
            y,
            MoeCache {
                router: r.router,
                plan: r.plan,
                ye,
                w_perm,
                shared,
                send: r.send,
            },
        ))
    }

    /// The parts that came back from each EP index, checked against what was sent and put in
    /// `xe`'s row order.
    fn join_parts(
        &self,
        dev: &dyn Device,
        send: &[usize],
        mut back: Vec<Tensor>,
    ) -> Result<Tensor, MoeError> {
        let layer = self.layer;
        let want = send.len().saturating_sub(1);
        if back.len() != want {
            return Err(MoeError::Parts {
                layer,
                got: back.len(),
                want,
            });
        }
        let hidden = self.gate.gate.weight.cols();
        for (index, (t, w)) in back.iter().zip(send.windows(2)).enumerate() {
            let rows = w[1] - w[0];
            if t.rows() != rows || (rows > 0 && t.cols() != hidden) {
                return Err(MoeError::Rows {
                    layer,
                    index,
                    got: t.rows(),
                    want: rows,
                });
            }
        }
        Ok(if back.len() == 1 {
            back.remove(0)
        } else {
            let refs: Vec<&Tensor> = back.iter().collect();
            dev.concat_rows(&refs, hidden)
        })
    }

    /// Tokens each expert received in this forward (all `E` experts, from this rank's tokens).
    pub fn load(&self, c: &MoeCache) -> ExpertLoad {
        ExpertLoad {
            layer: self.layer,
            counts: c.plan.counts(),
        }
    }

    /// B, token-owner, first phase: from the output-gradient `dy`, the gradients of the rows
    /// the expert-owners sent back (`parts[p]` for EP index `p`), and the gradient of the
    /// combine weights, which [`Moe::route_backward`] needs.
    pub fn combine_backward(
        &self,
        ctx: &Ctx<'_>,
        c: &MoeCache,
        dy: &Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let dev = ctx.dev;
        let (d_ye, d_w_perm) = combine_backward(dev, dy, &c.ye, &c.w_perm, &c.plan);
        let parts = if c.send.len() <= 2 {
            vec![d_ye]
        } else {
            let sizes: Vec<usize> = c.send.windows(2).map(|w| w[1] - w[0]).collect();
            dev.split_rows(&d_ye, &sizes)
        };
        (d_w_perm, parts)
    }

    /// B of the shared expert(s) (runs while the gradient dispatch travels).
    pub fn shared_backward(&self, dev: &dyn Device, c: &MoeCache, dy: &Tensor) -> (Tensor, MlpDys) {
        self.shared_experts.backward_input(dev, &c.shared, dy)
    }

    /// B, token-owner, last phase: `back[p]` is the gradient of the rows sent to EP index `p`;
    /// with the combine-weight gradient and the shared expert's B, the layer's input gradient.
    pub fn route_backward(
        &self,
        ctx: &Ctx<'_>,
        c: &MoeCache,
        d_w_perm: &Tensor,
        back: Vec<Tensor>,
        shared: (Tensor, MlpDys),
    ) -> Result<(Tensor, MoeDys), MoeError> {
        let dev = ctx.dev;
        let d_xe = self.join_parts(dev, &c.send, back)?;
        let mut dx = dispatch_backward(dev, &d_xe, &c.plan, c.router.scores.rows());
        drop(d_xe);
        let mut d_weights = dev.zeros(&[c.router.topk.len(), 1]);
        dev.scatter_add_rows(&mut d_weights, d_w_perm, &c.plan.slot_of_row);
        let (dx_router, router) = self.gate.backward_input(ctx, &c.router, &d_weights);
        dev.add_assign(&mut dx, &dx_router);
        let (dx_shared, shared) = shared;
        dev.add_assign(&mut dx, &dx_shared);
        Ok((dx, MoeDys { router, shared }))
    }

    /// W on the token-owner: the router's and the shared expert's weight gradients (the routed
    /// experts' are their owner's: [`shard::backward_weight`]).
    pub fn backward_weight(
        &self,
        ctx: &Ctx<'_>,
        x: &Tensor,
        c: &MoeCache,
        dys: &MoeDys,
        g: &mut Moe,
    ) {
        let dev = ctx.dev;
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
    fn for_each_tensor<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        for e in &self.experts {
            e.for_each_tensor(f);
        }
        self.gate.for_each_tensor(f);
        self.shared_experts.for_each_tensor(f);
    }
    fn for_each_tensor_mut(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        for e in &mut self.experts {
            e.for_each_tensor_mut(f);
        }
        self.gate.for_each_tensor_mut(f);
        self.shared_experts.for_each_tensor_mut(f);
    }
}

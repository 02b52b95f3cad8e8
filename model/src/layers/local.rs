//! Every routed expert on this rank: what a single rank does between a MoE layer's dispatch and
//! its combine (and between the gradient dispatch and combine), keeping the experts'
//! activations for B and W. The single-rank drivers of the model ([`crate::model`]) and the
//! layer tests use it; a parallel job runs the same [`crate::layers::moe::shard`] functions on
//! the expert-owner instead.

use std::collections::BTreeMap;

use crate::device::Device;
use crate::layers::Ctx;
use crate::layers::block::{Back, Block, BlockCache, BlockDys, Front};
use crate::layers::ep::EpGroup;
use crate::layers::moe::{DispatchPart, Moe, ShardCache, ShardError, shard};
use crate::tensor::Tensor;

/// The expert activations of one micro-batch, by MoE layer.
#[derive(Debug, Default)]
pub struct LocalExperts {
    caches: BTreeMap<usize, ShardCache>,
}

impl LocalExperts {
    /// Runs every expert of `moe` on the rows of a dispatch of the group of one.
    pub fn forward(
        &mut self,
        dev: &dyn Device,
        moe: &Moe,
        parts: Vec<DispatchPart>,
    ) -> Result<Vec<Tensor>, ShardError> {
        let hidden = moe.shared_experts.down_proj.out_features();
        let (out, cache) = shard::forward(dev, &moe.experts, 0..moe.n_experts(), hidden, parts)?;
        self.caches.insert(moe.layer, cache);
        Ok(out)
    }

    /// The experts' B of `moe`'s layer, from the gradients of the rows they sent back.
    pub fn backward_input(
        &mut self,
        dev: &dyn Device,
        moe: &Moe,
        grads: Vec<Tensor>,
    ) -> Result<Vec<Tensor>, ShardError> {
        let cache = self
            .caches
            .get_mut(&moe.layer)
            .ok_or(ShardError::NoForward)?;
        shard::backward_input(dev, &moe.experts, cache, grads)
    }

    /// The experts' W of `moe`'s layer into `grads` (its gradient copy).
    pub fn backward_weight(
        &mut self,
        dev: &dyn Device,
        moe: &Moe,
        grads: &mut Moe,
    ) -> Result<(), ShardError> {
        let cache = self
            .caches
            .remove(&moe.layer)
            .ok_or(ShardError::NoBackward)?;
        shard::backward_weight(dev, cache, &mut grads.experts)
    }
}

/// Panics with the error: local experts get exactly what their own layer dispatched, so a
/// mismatch is a programming error.
fn must<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("local experts: {e}"))
}

impl Block {
    /// The whole forward of the layer with its routed experts on this rank.
    pub fn forward_local(
        &self,
        ctx: &Ctx<'_>,
        x: Tensor,
        experts: &mut LocalExperts,
    ) -> (Tensor, BlockCache) {
        match self.front(ctx, x, EpGroup::ALONE) {
            Front::Done(y, c) => (y, *c),
            Front::Dispatch(mut p, parts) => {
                let moe = self.moe().expect("a dispatch comes from a MoE layer");
                let back = must(experts.forward(ctx.dev, moe, parts));
                self.shared(ctx, &mut p);
                must(self.finish(ctx, *p, back))
            }
        }
    }

    /// The whole B of the layer with its routed experts on this rank.
    pub fn backward_input_local(
        &self,
        ctx: &Ctx<'_>,
        c: &BlockCache,
        d_out: Tensor,
        experts: &mut LocalExperts,
    ) -> (Tensor, BlockDys) {
        match self.back_front(ctx, c, d_out) {
            Back::Done(dx, dys) => (dx, *dys),
            Back::Dispatch(mut p, parts) => {
                let moe = self.moe().expect("a dispatch comes from a MoE layer");
                let back = must(experts.backward_input(ctx.dev, moe, parts));
                self.back_shared(ctx, c, &mut p);
                must(self.back_finish(ctx, c, *p, back))
            }
        }
    }

    /// The whole W of the layer (its routed experts' included) into `g`.
    pub fn backward_weight_local(
        &self,
        ctx: &Ctx<'_>,
        c: &BlockCache,
        dys: &BlockDys,
        g: &mut Block,
        experts: &mut LocalExperts,
    ) {
        self.backward_weight(ctx, c, dys, g);
        if let (Some(m), Some(gm)) = (self.moe(), g.moe_mut()) {
            must(experts.backward_weight(ctx.dev, m, gm));
        }
    }
}

//! A decoder layer (HF `DeepseekV3DecoderLayer`): pre-norm MLA and pre-norm FFN, each residual.
//!
//! ```text
//! h   = x + self_attn(input_layernorm(x))
//! out = h + mlp(post_attention_layernorm(h))      mlp: dense SwiGLU or DeepSeekMoE
//! ```
//! A MoE layer's forward and B are split at the expert exchange ([`crate::layers::moe`]):
//! [`Block::front`] runs up to the dispatch, [`Block::shared`] while it travels,
//! [`Block::finish`] after the combine; B likewise ([`Block::back_front`],
//! [`Block::back_shared`], [`Block::back_finish`]). A dense layer is done in one phase.

use crate::config::ModelConfig;
use crate::device::Device;
use crate::layers::Ctx;
use crate::layers::ep::EpGroup;
use crate::layers::mla::{Mla, MlaCache, MlaDys};
use crate::layers::mlp::{Mlp, MlpCache, MlpDys};
use crate::layers::moe::{DispatchPart, Moe, MoeCache, MoeDys, MoeError, MoeRouted};
use crate::layers::rmsnorm::{RmsNorm, RmsNormCache};
use crate::layers::router::ExpertLoad;
use crate::params::{Kind, Params};
use crate::tensor::Tensor;

/// The feed-forward part of a layer.
#[derive(Clone, Debug)]
pub enum Ffn {
    Dense(Mlp),
    Moe(Box<Moe>),
}

#[derive(Clone, Debug)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Mla,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Ffn,
}

#[derive(Debug)]
pub enum FfnCache {
    Dense(MlpCache),
    Moe(Box<MoeCache>),
}

#[derive(Debug)]
pub enum FfnDys {
    Dense(MlpDys),
    Moe(Box<MoeDys>),
}

/// Everything a layer's backward needs; owns the layer's input.
#[derive(Debug)]
pub struct BlockCache {
    x: Tensor,
    norm1: RmsNormCache,
    y1: Tensor,
    attn: MlaCache,
    h: Tensor,
    norm2: RmsNormCache,
    y2: Tensor,
    pub ffn: FfnCache,
}

/// Output-gradients from B for W.
#[derive(Debug)]
pub struct BlockDys {
    dy1: Tensor,
    attn: MlaDys,
    dy2: Tensor,
    ffn: FfnDys,
}

/// A decoder layer's forward up to its first communication point.
#[derive(Debug)]
pub enum Front {
    /// The layer is done (a dense layer has no communication).
    Done(Tensor, Box<BlockCache>),
    /// A MoE layer: `parts` go to the expert-owners (one per EP index); [`Block::shared`] runs
    /// while they travel, [`Block::finish`] takes what comes back.
    Dispatch(Box<MoePending>, Vec<DispatchPart>),
}

/// A MoE layer's forward between its dispatch and its combine.
#[derive(Debug)]
pub struct MoePending {
    x: Tensor,
    norm1: RmsNormCache,
    y1: Tensor,
    attn: MlaCache,
    h: Tensor,
    norm2: RmsNormCache,
    y2: Tensor,
    routed: MoeRouted,
    shared: Option<(Tensor, MlpCache)>,
}

/// A decoder layer's B up to its first communication point.
#[derive(Debug)]
pub enum Back {
    /// The layer's B is done: its input gradient and what W needs.
    Done(Tensor, Box<BlockDys>),
    /// A MoE layer: `parts` (gradients of the rows each EP index sent back) go to the
    /// expert-owners; [`Block::back_shared`] runs while they travel, [`Block::back_finish`] takes
    /// the gradients of the dispatched rows that come back.
    Dispatch(Box<MoeGradPending>, Vec<Tensor>),
}

/// A MoE layer's B between its gradient dispatch and its gradient combine.
#[derive(Debug)]
pub struct MoeGradPending {
    d_out: Tensor,
    d_w_perm: Tensor,
    shared: Option<(Tensor, MlpDys)>,
}

fn moe_of(f: &Ffn) -> Option<&Moe> {
    match f {
        Ffn::Moe(m) => Some(m),
        Ffn::Dense(_) => None,
    }
}

impl Block {
    /// Layer `layer` (an index ≥ `num_hidden_layers` is an MTP module's block); `prefix` e.g.
    /// `"model.layers.3."`.
    pub fn init(
        dev: &dyn Device,
        cfg: &ModelConfig,
        prefix: &str,
        layer: usize,
        seed: u64,
    ) -> Block {
        let eps = cfg.rms_norm_eps as f32;
        let mlp = if cfg.is_moe_layer(layer) {
            Ffn::Moe(Box::new(Moe::init(
                dev,
                cfg,
                &format!("{prefix}mlp."),
                layer,
                seed,
            )))
        } else {
            Ffn::Dense(Mlp::init(
                dev,
                &format!("{prefix}mlp."),
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.initializer_range,
                seed,
            ))
        };
        Block {
            input_layernorm: RmsNorm::init(dev, cfg.hidden_size, eps),
            self_attn: Mla::init(dev, cfg, &format!("{prefix}self_attn."), seed),
            post_attention_layernorm: RmsNorm::init(dev, cfg.hidden_size, eps),
            mlp,
        }
    }

    /// The layer's MoE, if it has one.
    pub fn moe(&self) -> Option<&Moe> {
        moe_of(&self.mlp)
    }

    /// The layer's MoE, mutably, if it has one.
    pub fn moe_mut(&mut self) -> Option<&mut Moe> {
        match &mut self.mlp {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        }
    }

    /// Forward up to the dispatch: the attention half and, for a dense layer, the whole layer;
    /// for a MoE layer the routing, whose rows go to the EP group `ep`.
    pub fn front(&self, ctx: &Ctx<'_>, x: Tensor, ep: EpGroup) -> Front {
        let dev = ctx.dev;
        let (y1, norm1) = self.input_layernorm.forward(dev, &x);
        let (mut h, attn) = self.self_attn.forward(ctx, &y1);
        dev.add_assign(&mut h, &x);
        let (y2, norm2) = self.post_attention_layernorm.forward(dev, &h);
        match &self.mlp {
            Ffn::Dense(m) => {
                let (mut out, c) = m.forward(dev, &y2);
                dev.add_assign(&mut out, &h);
                let cache = BlockCache {
                    x,
                    norm1,
                    y1,
                    attn,
                    h,
                    norm2,
                    y2,
                    ffn: FfnCache::Dense(c),
                };
                Front::Done(out, Box::new(cache))
            }
            Ffn::Moe(m) => {
                let (routed, parts) = m.route(ctx, &y2, ep);
                let pending = MoePending {
                    x,
                    norm1,
                    y1,
                    attn,
                    h,
                    norm2,
                    y2,
                    routed,
                    shared: None,
                };
                Front::Dispatch(Box::new(pending), parts)
            }
        }
    }

    /// The shared expert of a MoE layer whose dispatch is on its way.
    pub fn shared(&self, ctx: &Ctx<'_>, p: &mut MoePending) {
        if let Some(m) = self.moe() {
            p.shared = Some(m.shared_forward(ctx.dev, &p.y2));
        }
    }

    /// Forward after the combine: `back[p]` came back from EP index `p`.
    pub fn finish(
        &self,
        ctx: &Ctx<'_>,
        p: MoePending,
        back: Vec<Tensor>,
    ) -> Result<(Tensor, BlockCache), MoeError> {
        let dev = ctx.dev;
        let m = self
            .moe()
            .expect("Block::finish on a dense layer (its forward needs no combine)");
        let shared = match p.shared {
            Some(s) => s,
            None => m.shared_forward(dev, &p.y2),
        };
        let (mut out, c) = m.combine(ctx, p.routed, back, shared, p.h.rows())?;
        dev.add_assign(&mut out, &p.h);
        Ok((
            out,
            BlockCache {
                x: p.x,
                norm1: p.norm1,
                y1: p.y1,
                attn: p.attn,
                h: p.h,
                norm2: p.norm2,
                y2: p.y2,
                ffn: FfnCache::Moe(Box::new(c)),
            },
        ))
    }

    /// Router load of this layer's forward (`None` for a dense layer).
    pub fn load(&self, c: &BlockCache) -> Option<ExpertLoad> {
        match (&self.mlp, &c.ffn) {
            (Ffn::Moe(m), FfnCache::Moe(mc)) => Some(m.load(mc)),
            _ => None,
        }
    }

    /// Sequence-wise balance loss of this layer's forward (0 for a dense layer or when off).
    pub fn balance_loss(&self, c: &BlockCache) -> f32 {
        match &c.ffn {
            FfnCache::Moe(mc) => mc.router.balance_loss,
            FfnCache::Dense(_) => 0.0,
        }
    }

    /// B up to the gradient dispatch (for a dense layer, the whole B).
    pub fn back_front(&self, ctx: &Ctx<'_>, c: &BlockCache, d_out: Tensor) -> Back {
        match (&self.mlp, &c.ffn) {
            (Ffn::Dense(m), FfnCache::Dense(mc)) => {
                let (dy2, dys) = m.backward_input(ctx.dev, mc, &d_out);
                let (dx, dys) = self.attn_backward(ctx, c, dy2, &d_out, FfnDys::Dense(dys));
                Back::Done(dx, Box::new(dys))
            }
            (Ffn::Moe(m), FfnCache::Moe(mc)) => {
                let (d_w_perm, parts) = m.combine_backward(ctx, mc, &d_out);
                let pending = MoeGradPending {
                    d_out,
                    d_w_perm,
                    shared: None,
                };
                Back::Dispatch(Box::new(pending), parts)
            }
            _ => unreachable!("block cache does not match the layer"),
        }
    }

    /// The shared expert's B of a MoE layer whose gradient dispatch is on its way.
    pub fn back_shared(&self, ctx: &Ctx<'_>, c: &BlockCache, p: &mut MoeGradPending) {
        if let (Some(m), FfnCache::Moe(mc)) = (self.moe(), &c.ffn) {
            p.shared = Some(m.shared_backward(ctx.dev, mc, &p.d_out));
        }
    }

    /// B after the gradient combine: `back[p]` is the gradient of the rows sent to EP index `p`.
    pub fn back_finish(
        &self,
        ctx: &Ctx<'_>,
        c: &BlockCache,
        p: MoeGradPending,
        back: Vec<Tensor>,
    ) -> Result<(Tensor, BlockDys), MoeError> {
        let (m, mc) = match (self.moe(), &c.ffn) {
            (Some(m), FfnCache::Moe(mc)) => (m, mc),
            _ => unreachable!("Block::back_finish on a dense layer"),
        };
        let shared = match p.shared {
            Some(s) => s,
            None => m.shared_backward(ctx.dev, mc, &p.d_out),
        };
        let (dy2, dys) = m.route_backward(ctx, mc, &p.d_w_perm, back, shared)?;
        Ok(self.attn_backward(ctx, c, dy2, &p.d_out, FfnDys::Moe(Box::new(dys))))
    }

    /// B of the layer's first half, from the FFN's input gradient `dy2`.
    fn attn_backward(
        &self,
        ctx: &Ctx<'_>,
        c: &BlockCache,
        dy2: Tensor,
        d_out: &Tensor,
        ffn: FfnDys,
    ) -> (Tensor, BlockDys) {
        let dev = ctx.dev;
        let mut dh = self
            .post_attention_layernorm
            .backward_input(dev, &c.h, &c.norm2, &dy2);
        dev.add_assign(&mut dh, d_out);
        let (dy1, attn) = self.self_attn.backward_input(ctx, &c.attn, &dh);
        let mut dx = self
            .input_layernorm
            .backward_input(dev, &c.x, &c.norm1, &dy1);
        dev.add_assign(&mut dx, &dh);
        (
            dx,
            BlockDys {
                dy1,
                attn,
                dy2,
                ffn,
            },
        )
    }

    /// W: accumulates the layer's weight gradients into `g` (a MoE layer's routed experts get
    /// theirs on their owner: [`crate::layers::moe::shard::backward_weight`]).
    pub fn backward_weight(&self, ctx: &Ctx<'_>, c: &BlockCache, dys: &BlockDys, g: &mut Block) {
        let dev = ctx.dev;
        let Block {
            input_layernorm: g_in,
            self_attn: g_attn,
            post_attention_layernorm: g_post,
            mlp: g_mlp,
        } = g;
        // The FFN's and the attention's W touch disjoint gradients: the device runs them side
        // by side.
        let mut ffn = || {
            match (&self.mlp, &mut *g_mlp, &c.ffn, &dys.ffn) {
                (Ffn::Dense(m), Ffn::Dense(gm), FfnCache::Dense(mc), FfnDys::Dense(d)) => {
                    m.backward_weight(dev, &c.y2, mc, d, gm)
                }
                (Ffn::Moe(m), Ffn::Moe(gm), FfnCache::Moe(mc), FfnDys::Moe(d)) => {
                    m.backward_weight(ctx, &c.y2, mc, d, gm)
                }
                _ => unreachable!("block gradients do not match the layer"),
            }
            self.post_attention_layernorm
                .backward_weight(dev, &c.h, &c.norm2, &dys.dy2, g_post);
        };
        let mut attn = || {
            self.self_attn
                .backward_weight(ctx, &c.y1, &c.attn, &dys.attn, g_attn);
            self.input_layernorm
                .backward_weight(dev, &c.x, &c.norm1, &dys.dy1, g_in);
        };
        dev.join(&mut ffn, &mut attn);
    }
}

impl Params for Block {
    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(&str, &'a Tensor, Kind)) {
        self.input_layernorm
            .visit(&format!("{p}input_layernorm."), f);
        self.self_attn.visit(&format!("{p}self_attn."), f);
        self.post_attention_layernorm
            .visit(&format!("{p}post_attention_layernorm."), f);
        match &self.mlp {
            Ffn::Dense(m) => m.visit(&format!("{p}mlp."), f),
            Ffn::Moe(m) => m.visit(&format!("{p}mlp."), f),
        }
    }
    fn visit_mut(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut Tensor, Kind)) {
        self.input_layernorm
            .visit_mut(&format!("{p}input_layernorm."), f);
        self.self_attn.visit_mut(&format!("{p}self_attn."), f);
        self.post_attention_layernorm
            .visit_mut(&format!("{p}post_attention_layernorm."), f);
        match &mut self.mlp {
            Ffn::Dense(m) => m.visit_mut(&format!("{p}mlp."), f),
            Ffn::Moe(m) => m.visit_mut(&format!("{p}mlp."), f),
        }
    }
    fn for_each_tensor<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        self.input_layernorm.for_each_tensor(f);
        self.self_attn.for_each_tensor(f);
        self.post_attention_layernorm.for_each_tensor(f);
        match &self.mlp {
            Ffn::Dense(m) => m.for_each_tensor(f),
            Ffn::Moe(m) => m.for_each_tensor(f),
        }
    }
    fn for_each_tensor_mut(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        self.input_layernorm.for_each_tensor_mut(f);
        self.self_attn.for_each_tensor_mut(f);
        self.post_attention_layernorm.for_each_tensor_mut(f);
        match &mut self.mlp {
            Ffn::Dense(m) => m.for_each_tensor_mut(f),
            Ffn::Moe(m) => m.for_each_tensor_mut(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck::{check, dev, project, randn, rope_table, small_config};
    use crate::layers::local::LocalExperts;
    use crate::layers::zeros_like;

    fn run(layer: usize) {
        let d = dev();
        let cfg = small_config();
        let (b, t) = (2, 4);
        let rope = rope_table(&cfg, &d, t);
        let ctx = Ctx {
            dev: &d,
            batch: b,
            seq: t,
            rope: &rope,
            balance_alpha: 0.0,
        };
        let x = randn(&[b * t, cfg.hidden_size], 1, 1.0);
        let block = Block::init(&d, &cfg, "l.", layer, 4);
        let r = randn(&[b * t, cfg.hidden_size], 3, 1.0);
        let mut ex = LocalExperts::default();
        let (_, c) = block.forward_local(&ctx, x.clone(), &mut ex);
        let (dx, dys) = block.backward_input_local(&ctx, &c, r.clone(), &mut ex);
        let mut g = zeros_like(&block, &d);
        block.backward_weight_local(&ctx, &c, &dys, &mut g, &mut ex);
        let mut st = (block, x);
        let loss = |s: &(Block, Tensor)| {
            let y =
                s.0.forward_local(&ctx, s.1.clone(), &mut LocalExperts::default());
            project(&y.0, &r)
        };
        check("block dx", &mut st, |s| &mut s.1, loss, &dx, 40);
        check(
            "block input_layernorm",
            &mut st,
            |s| &mut s.0.input_layernorm.weight,
            loss,
            &g.input_layernorm.weight,
            16,
        );
        check(
            "block post_attention_layernorm",
            &mut st,
            |s| &mut s.0.post_attention_layernorm.weight,
            loss,
            &g.post_attention_layernorm.weight,
            16,
        );
        check(
            "block o_proj",
            &mut st,
            |s| &mut s.0.self_attn.o_proj.weight,
            loss,
            &g.self_attn.o_proj.weight,
            20,
        );
    }

    #[test]
    fn dense_block_backward_matches_finite_differences() {
        run(0);
    }

    #[test]
    fn moe_block_backward_matches_finite_differences() {
        run(1);
    }
}

//! A decoder layer (HF `DeepseekV3DecoderLayer`): pre-norm MLA and pre-norm FFN, each residual.
//!
//! ```text
//! h   = x + self_attn(input_layernorm(x))
//! out = h + mlp(post_attention_layernorm(h))      mlp: dense SwiGLU or DeepSeekMoE
//! ```

use crate::config::ModelConfig;
use crate::device::Device;
use crate::layers::Ctx;
use crate::layers::mla::{Mla, MlaCache, MlaDys};
use crate::layers::mlp::{Mlp, MlpCache, MlpDys};
use crate::layers::moe::{Moe, MoeCache, MoeDys};
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
enum FfnDys {
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

    pub fn forward(&self, ctx: &Ctx<'_>, x: Tensor) -> (Tensor, BlockCache) {
        let dev = ctx.dev;
        let (y1, norm1) = self.input_layernorm.forward(dev, &x);
        let (mut h, attn) = self.self_attn.forward(ctx, &y1);
        dev.add_assign(&mut h, &x);
        let (y2, norm2) = self.post_attention_layernorm.forward(dev, &h);
        let (mut out, ffn) = match &self.mlp {
            Ffn::Dense(m) => {
                let (o, c) = m.forward(dev, &y2);
                (o, FfnCache::Dense(c))
            }
            Ffn::Moe(m) => {
                let (o, c) = m.forward(ctx, &y2);
                (o, FfnCache::Moe(Box::new(c)))
            }
        };
        dev.add_assign(&mut out, &h);
        (
            out,
            BlockCache {
                x,
                norm1,
                y1,
                attn,
                h,
                norm2,
                y2,
                ffn,
            },
        )
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

    /// B: `dx` from `d_out`.
    pub fn backward_input(
        &self,
        ctx: &Ctx<'_>,
        c: &BlockCache,
        d_out: &Tensor,
    ) -> (Tensor, BlockDys) {
        let dev = ctx.dev;
        let (dy2, ffn) = match (&self.mlp, &c.ffn) {
            (Ffn::Dense(m), FfnCache::Dense(mc)) => {
                let (d, dys) = m.backward_input(dev, mc, d_out);
                (d, FfnDys::Dense(dys))
            }
            (Ffn::Moe(m), FfnCache::Moe(mc)) => {
                let (d, dys) = m.backward_input(ctx, mc, d_out);
                (d, FfnDys::Moe(Box::new(dys)))
            }
            _ => unreachable!("block cache does not match the layer"),
        };
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

    /// W: accumulates the layer's weight gradients into `g`.
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck::{check, dev, project, randn, rope_table, small_config};
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
            ep: None,
        };
        let x = randn(&[b * t, cfg.hidden_size], 1, 1.0);
        let block = Block::init(&d, &cfg, "l.", layer, 4);
        let r = randn(&[b * t, cfg.hidden_size], 3, 1.0);
        let (_, c) = block.forward(&ctx, x.clone());
        let (dx, dys) = block.backward_input(&ctx, &c, &r);
        let mut g = zeros_like(&block, &d);
        block.backward_weight(&ctx, &c, &dys, &mut g);
        let mut st = (block, x);
        let loss = |s: &(Block, Tensor)| project(&s.0.forward(&ctx, s.1.clone()).0, &r);
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

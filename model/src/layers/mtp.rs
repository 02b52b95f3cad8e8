//! Multi-token prediction module `k` (DeepSeek-V3 report §2.2), in the checkpoint layout.
//!
//! ```text
//! h'_k = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_{k-1})])     (d × 2d; embedding half first, as the
//!                                                             released checkpoint / vLLM / SGLang do)
//! h_k  = block_k(h'_k)                                         (a full decoder layer)
//! P_k  = lm_head(shared_head.norm(h_k))                        (shared output head)
//! ```
//! `h_0` is the main model's last hidden state before its final norm; the embedding and `lm_head`
//! are the main model's. Parameters live under `model.layers.{num_hidden_layers + k - 1}.`:
//! `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and the block's usual names.

use crate::config::ModelConfig;
use crate::device::Device;
use crate::layers::Ctx;
use crate::layers::block::{Block, BlockCache, BlockDys};
use crate::layers::linear::Linear;
use crate::layers::rmsnorm::{RmsNorm, RmsNormCache};
use crate::params::{Kind, Params};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct MtpLayer {
    pub enorm: RmsNorm,
    pub hnorm: RmsNorm,
    /// `[d, 2d]`.
    pub eh_proj: Linear,
    pub block: Block,
    /// `shared_head.norm`.
    pub shared_head_norm: RmsNorm,
}

/// Activations of the part before the block (owns the embedding input).
#[derive(Debug)]
pub struct MtpPre {
    emb: Tensor,
    e_norm: RmsNormCache,
    h_norm: RmsNormCache,
    cat: Tensor,
}

/// Activations of one MTP module (`h_{k-1}` is kept by the caller).
#[derive(Debug)]
pub struct MtpCache {
    pub pre: MtpPre,
    pub block: BlockCache,
}

#[derive(Debug)]
pub struct MtpDys {
    d_cat_e: Tensor,
    d_cat_h: Tensor,
    d_z: Tensor,
    block: BlockDys,
}

impl MtpLayer {
    /// Module for decoder-layer index `layer` (`num_hidden_layers + k - 1`).
    pub fn init(dev: &dyn Device, cfg: &ModelConfig, layer: usize, seed: u64) -> MtpLayer {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps as f32);
        let prefix = format!("model.layers.{layer}.");
        MtpLayer {
            enorm: RmsNorm::init(dev, d, eps),
            hnorm: RmsNorm::init(dev, d, eps),
            eh_proj: Linear::init(
                dev,
                &format!("{prefix}eh_proj.weight"),
                d,
                2 * d,
                cfg.initializer_range,
                seed,
            ),
            block: Block::init(dev, cfg, &prefix, layer, seed),
            shared_head_norm: RmsNorm::init(dev, d, eps),
        }
    }

    /// Forward up to the module's block: `z = eh_proj([enorm(emb); hnorm(h_prev)])`, the block's
    /// input, from `h_prev = h_{k-1}` and `emb = Emb(t_{i+k})`.
    pub fn pre(&self, ctx: &Ctx<'_>, h_prev: &Tensor, emb: Tensor) -> (Tensor, MtpPre) {
        let dev = ctx.dev;
        let d = emb.cols();
        let (e_n, e_norm) = self.enorm.forward(dev, &emb);
        let (h_n, h_norm) = self.hnorm.forward(dev, h_prev);
        let mut cat = dev.empty(&[emb.rows(), 2 * d]);
        dev.write_cols(&mut cat, 0, &e_n);
        dev.write_cols(&mut cat, d, &h_n);
        let z = self.eh_proj.forward(dev, &cat);
        (
            z,
            MtpPre {
                emb,
                e_norm,
                h_norm,
                cat,
            },
        )
    }

    /// B of the part before the block, from the gradient of the block's input: returns
    /// `(d h_prev, d emb)` and what W needs.
    pub fn pre_backward(
        &self,
        ctx: &Ctx<'_>,
        h_prev: &Tensor,
        c: &MtpCache,
        d_z: Tensor,
        block: BlockDys,
    ) -> (Tensor, Tensor, MtpDys) {
        let dev = ctx.dev;
        let d = c.pre.emb.cols();
        let d_cat = self.eh_proj.backward_input(dev, &d_z);
        let d_cat_e = dev.slice_cols(&d_cat, 0..d);
        let d_cat_h = dev.slice_cols(&d_cat, d..2 * d);
        let d_emb = self
            .enorm
            .backward_input(dev, &c.pre.emb, &c.pre.e_norm, &d_cat_e);
        let d_prev = self
            .hnorm
            .backward_input(dev, h_prev, &c.pre.h_norm, &d_cat_h);
        (
            d_prev,
            d_emb,
            MtpDys {
                d_cat_e,
                d_cat_h,
                d_z,
                block,
            },
        )
    }

    /// W: weight gradients of the module (not of the shared embedding / head, nor of its block's
    /// routed experts, which are their owner's).
    pub fn backward_weight(
        &self,
        ctx: &Ctx<'_>,
        h_prev: &Tensor,
        c: &MtpCache,
        dys: &MtpDys,
        g: &mut MtpLayer,
    ) {
        let dev = ctx.dev;
        self.block
            .backward_weight(ctx, &c.block, &dys.block, &mut g.block);
        self.eh_proj
            .backward_weight(dev, &c.pre.cat, &dys.d_z, &mut g.eh_proj);
        self.enorm
            .backward_weight(dev, &c.pre.emb, &c.pre.e_norm, &dys.d_cat_e, &mut g.enorm);
        self.hnorm
            .backward_weight(dev, h_prev, &c.pre.h_norm, &dys.d_cat_h, &mut g.hnorm);
    }
}

impl Params for MtpLayer {
    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(&str, &'a Tensor, Kind)) {
        self.enorm.visit(&format!("{p}enorm."), f);
        self.hnorm.visit(&format!("{p}hnorm."), f);
        self.eh_proj.visit(&format!("{p}eh_proj."), f);
        self.shared_head_norm
            .visit(&format!("{p}shared_head.norm."), f);
        self.block.visit(p, f);
    }
    fn visit_mut(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut Tensor, Kind)) {
        self.enorm.visit_mut(&format!("{p}enorm."), f);
        self.hnorm.visit_mut(&format!("{p}hnorm."), f);
        self.eh_proj.visit_mut(&format!("{p}eh_proj."), f);
        self.shared_head_norm
            .visit_mut(&format!("{p}shared_head.norm."), f);
        self.block.visit_mut(p, f);
    }
    fn for_each_tensor<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        self.enorm.for_each_tensor(f);
        self.hnorm.for_each_tensor(f);
        self.eh_proj.for_each_tensor(f);
        self.shared_head_norm.for_each_tensor(f);
        self.block.for_each_tensor(f);
    }
    fn for_each_tensor_mut(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        self.enorm.for_each_tensor_mut(f);
        self.hnorm.for_each_tensor_mut(f);
        self.eh_proj.for_each_tensor_mut(f);
        self.shared_head_norm.for_each_tensor_mut(f);
        self.block.for_each_tensor_mut(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck::{check, dev, project, randn, rope_table, small_config};
    use crate::layers::local::LocalExperts;
    use crate::layers::zeros_like;

    #[test]
    fn mtp_backward_matches_finite_differences() {
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
        let h = randn(&[b * t, cfg.hidden_size], 1, 1.0);
        let emb = randn(&[b * t, cfg.hidden_size], 2, 1.0);
        let m = MtpLayer::init(&d, &cfg, 2, 6);
        let r = randn(&[b * t, cfg.hidden_size], 3, 1.0);
        let forward = |m: &MtpLayer, h: &Tensor, emb: Tensor, ex: &mut LocalExperts| {
            let (z, pre) = m.pre(&ctx, h, emb);
            let (y, block) = m.block.forward_local(&ctx, z, ex);
            (y, MtpCache { pre, block })
        };
        let mut ex = LocalExperts::default();
        let (_, c) = forward(&m, &h, emb.clone(), &mut ex);
        let (d_z, block_dys) = m
            .block
            .backward_input_local(&ctx, &c.block, r.clone(), &mut ex);
        let (dh, demb, dys) = m.pre_backward(&ctx, &h, &c, d_z, block_dys);
        let mut g = zeros_like(&m, &d);
        m.backward_weight(&ctx, &h, &c, &dys, &mut g);
        if let (Some(bm), Some(gm)) = (m.block.moe(), g.block.moe_mut()) {
            ex.backward_weight(&d, bm, gm).expect("experts' W");
        }
        let mut st = (m, h, emb);
        let loss = |s: &(MtpLayer, Tensor, Tensor)| {
            let y = forward(&s.0, &s.1, s.2.clone(), &mut LocalExperts::default());
            project(&y.0, &r)
        };
        check("mtp d h_prev", &mut st, |s| &mut s.1, loss, &dh, 30);
        check("mtp d emb", &mut st, |s| &mut s.2, loss, &demb, 30);
        check(
            "mtp eh_proj",
            &mut st,
            |s| &mut s.0.eh_proj.weight,
            loss,
            &g.eh_proj.weight,
            30,
        );
        check(
            "mtp enorm",
            &mut st,
            |s| &mut s.0.enorm.weight,
            loss,
            &g.enorm.weight,
            16,
        );
        check(
            "mtp hnorm",
            &mut st,
            |s| &mut s.0.hnorm.weight,
            loss,
            &g.hnorm.weight,
            16,
        );
    }
}

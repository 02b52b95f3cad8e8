//! Multi-head Latent Attention, exactly as HF `DeepseekV3Attention`.
//!
//! ```text
//! q      = q_b_proj(q_a_layernorm(q_a_proj(x)))     (or q_proj(x) when q_lora_rank is unset)
//!          per head: [q_nope | q_pe], RoPE on q_pe
//! kva    = kv_a_proj_with_mqa(x) = [c_kv | k_pe],   RoPE on k_pe (one per token, shared by heads)
//! kv     = kv_b_proj(kv_a_layernorm(c_kv))          per head: [k_nope | v]
//! o      = softmax(scale · [q_nope|q_pe]·[k_nope|k_pe]ᵀ, causal) · v
//! y      = o_proj(o)
//! ```

use crate::config::ModelConfig;
use crate::device::{AttnShape, Device, RopeSpec};
use crate::layers::Ctx;
use crate::layers::linear::Linear;
use crate::layers::rmsnorm::{RmsNorm, RmsNormCache};
use crate::layers::rope;
use crate::params::{Kind, Params};
use crate::tensor::Tensor;

/// The query path: low-rank with its own norm, or a plain projection.
#[derive(Clone, Debug)]
pub enum QProj {
    LowRank {
        q_a_proj: Linear,
        q_a_layernorm: RmsNorm,
        q_b_proj: Linear,
    },
    Full {
        q_proj: Linear,
    },
}

#[derive(Clone, Debug)]
pub struct Mla {
    pub q: QProj,
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: RmsNorm,
    pub kv_b_proj: Linear,
    pub o_proj: Linear,
    /// Dimensions (not parameters).
    pub dims: MlaDims,
}

#[derive(Clone, Copy, Debug)]
pub struct MlaDims {
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub kv_lora: usize,
    pub scale: f32,
    pub interleave: bool,
}

/// Activations MLA's backward needs (the input `x` is kept by the caller).
#[derive(Debug)]
pub struct MlaCache {
    /// Low-rank query path: `q_a_proj(x)`, its norm state, and the normed value.
    qa: Option<(Tensor, RmsNormCache, Tensor)>,
    /// Query after RoPE, `[n, H·(nope+rope)]`.
    q: Tensor,
    /// `c_kv` (before `kv_a_layernorm`) and its norm state, and the normed value.
    ckv: Tensor,
    ckv_norm: RmsNormCache,
    ckv_n: Tensor,
    /// `kv_b_proj` output, `[n, H·(nope+v)]`.
    kv: Tensor,
    /// `k_pe` after RoPE, `[n, rope]`.
    k_pe: Tensor,
    /// What the device keeps for attention's backward (see [`Device::attention_forward`]).
    saved: Tensor,
    /// Attention output before `o_proj`, `[n, H·v]`.
    o: Tensor,
}

/// Output-gradients of MLA's weight-bearing parts, from B for W.
#[derive(Debug)]
pub struct MlaDys {
    d_out: Tensor,
    d_kv: Tensor,
    d_ckv_n: Tensor,
    d_kva: Tensor,
    d_q: Tensor,
    /// Low-rank query path: gradients of `q_a_layernorm`'s output and of `q_a_proj`'s output.
    d_qa: Option<(Tensor, Tensor)>,
}

impl Mla {
    pub fn init(dev: &dyn Device, cfg: &ModelConfig, prefix: &str, seed: u64) -> Mla {
        let (d, h, std) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.initializer_range,
        );
        let eps = cfg.rms_norm_eps as f32;
        let lin = |name: &str, o: usize, i: usize| {
            Linear::init(dev, &format!("{prefix}{name}.weight"), o, i, std, seed)
        };
        let q = match cfg.q_lora_rank {
            Some(r) => QProj::LowRank {
                q_a_proj: lin("q_a_proj", r, d),
                q_a_layernorm: RmsNorm::init(dev, r, eps),
                q_b_proj: lin("q_b_proj", h * cfg.qk_head_dim(), r),
            },
            None => QProj::Full {
                q_proj: lin("q_proj", h * cfg.qk_head_dim(), d),
            },
        };
        Mla {
            q,
            kv_a_proj_with_mqa: lin(
                "kv_a_proj_with_mqa",
                cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                d,
            ),
            kv_a_layernorm: RmsNorm::init(dev, cfg.kv_lora_rank, eps),
            kv_b_proj: lin(
                "kv_b_proj",
                h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                cfg.kv_lora_rank,
            ),
            o_proj: lin("o_proj", d, h * cfg.v_head_dim),
            dims: MlaDims {
                heads: h,
                nope: cfg.qk_nope_head_dim,
                rope: cfg.qk_rope_head_dim,
                v: cfg.v_head_dim,
                kv_lora: cfg.kv_lora_rank,
                scale: rope::softmax_scale(cfg).unwrap_or((cfg.qk_head_dim() as f32).powf(-0.5)),
                interleave: cfg.rope_interleave,
            },
        }
    }

    fn shape(&self, ctx: &Ctx<'_>) -> AttnShape {
        let d = &self.dims;
        AttnShape {
            batch: ctx.batch,
            seq: ctx.seq,
            heads: d.heads,
            nope: d.nope,
            rope: d.rope,
            v: d.v,
            scale: d.scale,
        }
    }

    fn q_spec(&self, seq: usize) -> RopeSpec {
        let d = &self.dims;
        RopeSpec {
            seq_len: seq,
            heads: d.heads,
            head_stride: d.nope + d.rope,
            offset: d.nope,
            dim: d.rope,
            interleave: d.interleave,
        }
    }

    fn k_spec(&self, seq: usize) -> RopeSpec {
        let d = &self.dims;
        RopeSpec {
            seq_len: seq,
            heads: 1,
            head_stride: d.rope,
            offset: 0,
            dim: d.rope,
            interleave: d.interleave,
        }
    }

    pub fn forward(&self, ctx: &Ctx<'_>, x: &Tensor) -> (Tensor, MlaCache) {
        let dev = ctx.dev;
        // The query path and the key/value path are independent: the device runs them side by side.
        let mut q_out = None;
        let mut q_path = || {
            let (mut q, qa) = match &self.q {
                QProj::LowRank {
                    q_a_proj,
                    q_a_layernorm,
                    q_b_proj,
                } => {
                    let qa = q_a_proj.forward(dev, x);
                    let (qa_n, qa_norm) = q_a_layernorm.forward(dev, &qa);
                    (q_b_proj.forward(dev, &qa_n), Some((qa, qa_norm, qa_n)))
                }
                QProj::Full { q_proj } => (q_proj.forward(dev, x), None),
            };
            dev.rope(&mut q, ctx.rope, self.q_spec(ctx.seq), false);
            q_out = Some((q, qa));
        };
        let mut kv_out = None;
        let mut kv_path = || {
            let kva = self.kv_a_proj_with_mqa.forward(dev, x);
            let kl = self.dims.kv_lora;
            let ckv = dev.slice_cols(&kva, 0..kl);
            let mut k_pe = dev.slice_cols(&kva, kl..kl + self.dims.rope);
            dev.rope(&mut k_pe, ctx.rope, self.k_spec(ctx.seq), false);
            let (ckv_n, ckv_norm) = self.kv_a_layernorm.forward(dev, &ckv);
            let kv = self.kv_b_proj.forward(dev, &ckv_n);
            kv_out = Some((ckv, k_pe, ckv_n, ckv_norm, kv));
        };
        dev.join(&mut q_path, &mut kv_path);
        let (q, qa) = q_out.expect("the query path ran");
        let (ckv, k_pe, ckv_n, ckv_norm, kv) = kv_out.expect("the key/value path ran");

        let (o, saved) = dev.attention_forward(&q, &kv, &k_pe, self.shape(ctx));
        let y = self.o_proj.forward(dev, &o);
        (
            y,
            MlaCache {
                qa,
                q,
                ckv,
                ckv_norm,
                ckv_n,
                kv,
                k_pe,
                saved,
                o,
            },
        )
    }

    /// B: `dx` from `dy`, plus what W needs.
    pub fn backward_input(&self, ctx: &Ctx<'_>, c: &MlaCache, dy: &Tensor) -> (Tensor, MlaDys) {
        let dev = ctx.dev;
        let d_o = self.o_proj.backward_input(dev, dy);
        let (mut d_q, d_kv, mut d_kpe) =
            dev.attention_backward(&c.q, &c.kv, &c.k_pe, &c.o, &c.saved, &d_o, self.shape(ctx));
        // The key/value path's B and the query path's B are independent until their input
        // gradients are summed: the device runs them side by side.
        let mut kv_out = None;
        let mut kv_path = || {
            dev.rope(&mut d_kpe, ctx.rope, self.k_spec(ctx.seq), true);
            let d_ckv_n = self.kv_b_proj.backward_input(dev, &d_kv);
            let d_ckv = self
                .kv_a_layernorm
                .backward_input(dev, &c.ckv, &c.ckv_norm, &d_ckv_n);
            let mut d_kva = dev.empty(&[d_ckv.rows(), self.dims.kv_lora + self.dims.rope]);
            dev.write_cols(&mut d_kva, 0, &d_ckv);
            dev.write_cols(&mut d_kva, self.dims.kv_lora, &d_kpe);
            let dx = self.kv_a_proj_with_mqa.backward_input(dev, &d_kva);
            kv_out = Some((dx, d_ckv_n, d_kva));
        };
        let mut q_out = None;
        let mut q_path = || {
            dev.rope(&mut d_q, ctx.rope, self.q_spec(ctx.seq), true);
            q_out = Some(match (&self.q, &c.qa) {
                (
                    QProj::LowRank {
                        q_a_proj,
                        q_a_layernorm,
                        q_b_proj,
                    },
                    Some((qa, qa_norm, _)),
                ) => {
                    let d_qa_n = q_b_proj.backward_input(dev, &d_q);
                    let d_qa = q_a_layernorm.backward_input(dev, qa, qa_norm, &d_qa_n);
                    (q_a_proj.backward_input(dev, &d_qa), Some((d_qa_n, d_qa)))
                }
                (QProj::Full { q_proj }, None) => (q_proj.backward_input(dev, &d_q), None),
                _ => unreachable!("MLA cache does not match the query path"),
            });
        };
        dev.join(&mut kv_path, &mut q_path);
        let (mut dx, d_ckv_n, d_kva) = kv_out.expect("the key/value path ran");
        let (dx_q, d_qa) = q_out.expect("the query path ran");
        dev.add_assign(&mut dx, &dx_q);
        (
            dx,
            MlaDys {
                d_out: dev.copy(dy),
                d_kv,
                d_ckv_n,
                d_kva,
                d_q,
                d_qa,
            },
        )
    }

    /// W: accumulates every weight gradient into `g`.
    pub fn backward_weight(
        &self,
        ctx: &Ctx<'_>,
        x: &Tensor,
        c: &MlaCache,
        dys: &MlaDys,
        g: &mut Mla,
    ) {
        let dev = ctx.dev;
        self.o_proj
            .backward_weight(dev, &c.o, &dys.d_out, &mut g.o_proj);
        self.kv_b_proj
            .backward_weight(dev, &c.ckv_n, &dys.d_kv, &mut g.kv_b_proj);
        self.kv_a_layernorm.backward_weight(
            dev,
            &c.ckv,
            &c.ckv_norm,
            &dys.d_ckv_n,
            &mut g.kv_a_layernorm,
        );
        self.kv_a_proj_with_mqa
            .backward_weight(dev, x, &dys.d_kva, &mut g.kv_a_proj_with_mqa);
        match (&self.q, &mut g.q, &c.qa, &dys.d_qa) {
            (
                QProj::LowRank {
                    q_a_proj,
                    q_a_layernorm,
                    q_b_proj,
                },
                QProj::LowRank {
                    q_a_proj: ga,
                    q_a_layernorm: gn,
                    q_b_proj: gb,
                },
                Some((qa, qa_norm, qa_n)),
                Some((d_qa_n, d_qa)),
            ) => {
                q_b_proj.backward_weight(dev, qa_n, &dys.d_q, gb);
                q_a_layernorm.backward_weight(dev, qa, qa_norm, d_qa_n, gn);
                q_a_proj.backward_weight(dev, x, d_qa, ga);
            }
            (QProj::Full { q_proj }, QProj::Full { q_proj: gq }, None, None) => {
                q_proj.backward_weight(dev, x, &dys.d_q, gq)
            }
            _ => unreachable!("MLA gradients do not match the query path"),
        }
    }
}

impl Params for Mla {
    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(&str, &'a Tensor, Kind)) {
        match &self.q {
            QProj::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                q_a_proj.visit(&format!("{p}q_a_proj."), f);
                q_a_layernorm.visit(&format!("{p}q_a_layernorm."), f);
                q_b_proj.visit(&format!("{p}q_b_proj."), f);
            }
            QProj::Full { q_proj } => q_proj.visit(&format!("{p}q_proj."), f),
        }
        self.kv_a_proj_with_mqa
            .visit(&format!("{p}kv_a_proj_with_mqa."), f);
        self.kv_a_layernorm.visit(&format!("{p}kv_a_layernorm."), f);
        self.kv_b_proj.visit(&format!("{p}kv_b_proj."), f);
        self.o_proj.visit(&format!("{p}o_proj."), f);
    }
    fn visit_mut(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut Tensor, Kind)) {
        match &mut self.q {
            QProj::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                q_a_proj.visit_mut(&format!("{p}q_a_proj."), f);
                q_a_layernorm.visit_mut(&format!("{p}q_a_layernorm."), f);
                q_b_proj.visit_mut(&format!("{p}q_b_proj."), f);
            }
            QProj::Full { q_proj } => q_proj.visit_mut(&format!("{p}q_proj."), f),
        }
        self.kv_a_proj_with_mqa
            .visit_mut(&format!("{p}kv_a_proj_with_mqa."), f);
        self.kv_a_layernorm
            .visit_mut(&format!("{p}kv_a_layernorm."), f);
        self.kv_b_proj.visit_mut(&format!("{p}kv_b_proj."), f);
        self.o_proj.visit_mut(&format!("{p}o_proj."), f);
    }
    fn for_each_tensor<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        match &self.q {
            QProj::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                q_a_proj.for_each_tensor(f);
                q_a_layernorm.for_each_tensor(f);
                q_b_proj.for_each_tensor(f);
            }
            QProj::Full { q_proj } => q_proj.for_each_tensor(f),
        }
        self.kv_a_proj_with_mqa.for_each_tensor(f);
        self.kv_a_layernorm.for_each_tensor(f);
        self.kv_b_proj.for_each_tensor(f);
        self.o_proj.for_each_tensor(f);
    }
    fn for_each_tensor_mut(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        match &mut self.q {
            QProj::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                q_a_proj.for_each_tensor_mut(f);
                q_a_layernorm.for_each_tensor_mut(f);
                q_b_proj.for_each_tensor_mut(f);
            }
            QProj::Full { q_proj } => q_proj.for_each_tensor_mut(f),
        }
        self.kv_a_proj_with_mqa.for_each_tensor_mut(f);
        self.kv_a_layernorm.for_each_tensor_mut(f);
        self.kv_b_proj.for_each_tensor_mut(f);
        self.o_proj.for_each_tensor_mut(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck::{check, dev, project, randn, rope_table, small_config};
    use crate::layers::zeros_like;

    fn run(cfg: &ModelConfig) {
        let d = dev();
        let (b, t) = (2, 5);
        let rope = rope_table(cfg, &d, t);
        let ctx = Ctx {
            dev: &d,
            batch: b,
            seq: t,
            rope: &rope,
            balance_alpha: 0.0,
        };
        let x = randn(&[b * t, cfg.hidden_size], 1, 1.0);
        let mla = Mla::init(&d, cfg, "a.", 5);
        let r = randn(&[b * t, cfg.hidden_size], 3, 1.0);
        let (_, c) = mla.forward(&ctx, &x);
        let (dx, dys) = mla.backward_input(&ctx, &c, &r);
        let mut g = zeros_like(&mla, &d);
        mla.backward_weight(&ctx, &x, &c, &dys, &mut g);
        let mut st = (mla, x);
        let loss = |s: &(Mla, Tensor)| project(&s.0.forward(&ctx, &s.1).0, &r);
        check("mla dx", &mut st, |s| &mut s.1, loss, &dx, 40);
        check(
            "mla o_proj",
            &mut st,
            |s| &mut s.0.o_proj.weight,
            loss,
            &g.o_proj.weight,
            20,
        );
        check(
            "mla kv_b_proj",
            &mut st,
            |s| &mut s.0.kv_b_proj.weight,
            loss,
            &g.kv_b_proj.weight,
            20,
        );
        check(
            "mla kv_a_layernorm",
            &mut st,
            |s| &mut s.0.kv_a_layernorm.weight,
            loss,
            &g.kv_a_layernorm.weight,
            8,
        );
        check(
            "mla kv_a_proj",
            &mut st,
            |s| &mut s.0.kv_a_proj_with_mqa.weight,
            loss,
            &g.kv_a_proj_with_mqa.weight,
            30,
        );
        match &g.q {
            QProj::LowRank {
                q_a_proj,
                q_a_layernorm,
                q_b_proj,
            } => {
                fn qa(s: &mut (Mla, Tensor)) -> &mut Tensor {
                    match &mut s.0.q {
                        QProj::LowRank { q_a_proj, .. } => &mut q_a_proj.weight,
                        QProj::Full { q_proj } => &mut q_proj.weight,
                    }
                }
                fn qn(s: &mut (Mla, Tensor)) -> &mut Tensor {
                    match &mut s.0.q {
                        QProj::LowRank { q_a_layernorm, .. } => &mut q_a_layernorm.weight,
                        QProj::Full { q_proj } => &mut q_proj.weight,
                    }
                }
                fn qb(s: &mut (Mla, Tensor)) -> &mut Tensor {
                    match &mut s.0.q {
                        QProj::LowRank { q_b_proj, .. } => &mut q_b_proj.weight,
                        QProj::Full { q_proj } => &mut q_proj.weight,
                    }
                }
                check("mla q_a_proj", &mut st, qa, loss, &q_a_proj.weight, 20);
                check(
                    "mla q_a_layernorm",
                    &mut st,
                    qn,
                    loss,
                    &q_a_layernorm.weight,
                    12,
                );
                check("mla q_b_proj", &mut st, qb, loss, &q_b_proj.weight, 20);
            }
            QProj::Full { q_proj } => {
                fn q(s: &mut (Mla, Tensor)) -> &mut Tensor {
                    match &mut s.0.q {
                        QProj::LowRank { q_b_proj, .. } => &mut q_b_proj.weight,
                        QProj::Full { q_proj } => &mut q_proj.weight,
                    }
                }
                check("mla q_proj", &mut st, q, loss, &q_proj.weight, 30);
            }
        }
    }

    #[test]
    fn mla_low_rank_q_backward_matches_finite_differences() {
        run(&small_config());
    }

    #[test]
    fn mla_plain_q_without_interleave_backward_matches_finite_differences() {
        let mut cfg = small_config();
        cfg.q_lora_rank = None;
        cfg.rope_interleave = false;
        run(&cfg);
    }
}

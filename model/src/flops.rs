//! FLOP counting for throughput reports: the matrix products of one training step, analytically.
//!
//! Counts `2·m·n·k` for every GEMM of forward, B and W (attention's per-(sequence, head) products
//! included, as full T×T blocks like the kernels compute them); element-wise work is not counted
//! (the MFU convention). Routed experts are assumed perfectly balanced (`n·k` rows spread evenly),
//! which is exactly what the simulated device's synthetic routing produces, so
//! `SimDevice`'s `gemm_flops` for a step equals [`step_flops`]`.total()`.

use crate::config::ModelConfig;

/// One GEMM shape `[m, k] · [k, n]` occurring `count` times in a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub count: usize,
}

impl GemmShape {
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k * self.count) as f64
    }
}

/// FLOPs of one training step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepFlops {
    pub forward: f64,
    /// B and W together.
    pub backward: f64,
    /// Tokens in the step.
    pub tokens: usize,
}

impl StepFlops {
    pub fn total(&self) -> f64 {
        self.forward + self.backward
    }
    pub fn per_token(&self) -> f64 {
        self.total() / self.tokens.max(1) as f64
    }
}

/// Collects the forward GEMMs; `backward` gets B (`[m,n]·[n,k]`) and W (`[n,m]·[m,k]`) of each
/// linear, and the attention backward products.
#[derive(Default)]
struct Shapes {
    forward: Vec<GemmShape>,
    backward: Vec<GemmShape>,
}

impl Shapes {
    /// A linear layer `in → out` on `rows` rows, `count` times.
    fn linear(&mut self, rows: usize, input: usize, output: usize, count: usize) {
        if rows == 0 || count == 0 {
            return;
        }
        self.forward.push(GemmShape {
            m: rows,
            n: output,
            k: input,
            count,
        });
        self.backward.push(GemmShape {
            m: rows,
            n: input,
            k: output,
            count,
        });
        self.backward.push(GemmShape {
            m: output,
            n: input,
            k: rows,
            count,
        });
    }

    fn attention(&mut self, cfg: &ModelConfig, batch: usize, seq: usize) {
        let (t, c) = (seq, batch * cfg.num_attention_heads);
        let (nope, rope, v) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim);
        let g = |m, n, k| GemmShape { m, n, k, count: c };
        self.forward
            .extend([g(t, t, nope), g(t, t, rope), g(t, v, t)]);
        self.backward.extend([
            g(t, t, v),
            g(t, v, t),
            g(t, nope, t),
            g(t, rope, t),
            g(t, nope, t),
            g(t, rope, t),
        ]);
    }

    fn block(&mut self, cfg: &ModelConfig, layer: usize, batch: usize, seq: usize) {
        let (n, d, h) = (batch * seq, cfg.hidden_size, cfg.num_attention_heads);
        match cfg.q_lora_rank {
            Some(r) => {
                self.linear(n, d, r, 1);
                self.linear(n, r, h * cfg.qk_head_dim(), 1);
            }
            None => self.linear(n, d, h * cfg.qk_head_dim(), 1),
        }
        self.linear(n, d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, 1);
        self.linear(
            n,
            cfg.kv_lora_rank,
            h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            1,
        );
        self.attention(cfg, batch, seq);
        self.linear(n, h * cfg.v_head_dim, d, 1);
        if cfg.is_moe_layer(layer) {
            let (e, w) = (cfg.n_routed_experts, cfg.moe_intermediate_size);
            self.linear(n, d, e, 1);
            let rows = n * cfg.num_experts_per_tok;
            let (base, extra) = (rows / e, rows % e);
            for (r, count) in [(base + 1, extra), (base, e - extra)] {
                self.linear(r, d, w, 2 * count);
                self.linear(r, w, d, count);
            }
            let ws = w * cfg.n_shared_experts;
            self.linear(n, d, ws, 2);
            self.linear(n, ws, d, 1);
        } else {
            self.linear(n, d, cfg.intermediate_size, 2);
            self.linear(n, cfg.intermediate_size, d, 1);
        }
    }
}

fn shapes(cfg: &ModelConfig, batch: usize, seq: usize, mtp_depth: usize) -> Shapes {
    let mut s = Shapes::default();
    let n = batch * seq;
    for i in 0..cfg.num_hidden_layers {
        s.block(cfg, i, batch, seq);
    }
    s.linear(n, cfg.hidden_size, cfg.vocab_size, 1);
    for k in 0..mtp_depth {
        s.linear(n, 2 * cfg.hidden_size, cfg.hidden_size, 1);
        s.block(cfg, cfg.num_hidden_layers + k, batch, seq);
        s.linear(n, cfg.hidden_size, cfg.vocab_size, 1);
    }
    s
}

/// Every GEMM of one training step (forward, B and W) for `batch × seq` tokens with `mtp_depth`
/// MTP modules, for measuring the raw GEMM rate on the model's own shapes.
pub fn step_gemm_shapes(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    mtp_depth: usize,
) -> Vec<GemmShape> {
    let s = shapes(cfg, batch, seq, mtp_depth);
    s.forward.into_iter().chain(s.backward).collect()
}

/// FLOPs of one training step (cheap: a walk over the config).
pub fn step_flops(cfg: &ModelConfig, batch: usize, seq: usize, mtp_depth: usize) -> StepFlops {
    let s = shapes(cfg, batch, seq, mtp_depth);
    StepFlops {
        forward: s.forward.iter().map(GemmShape::flops).sum(),
        backward: s.backward.iter().map(GemmShape::flops).sum(),
        tokens: batch * seq,
    }
}

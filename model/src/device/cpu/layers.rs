//! The CPU device's layer kernels: RMSNorm, SwiGLU, RoPE, attention, the router and its
//! balance loss, cross-entropy (the bodies behind its `Device` methods of the same names; the
//! arithmetic is in `device/kernels.rs` and `device/attention.rs`).

use super::super::cost;
use super::super::{AttnShape, RopeSpec, RouterOut, RouterSpec, attention, kernels};
use super::CpuDevice;
use crate::tensor::Tensor;

impl CpuDevice {
    pub(super) fn rmsnorm_forward_op(&self, x: &Tensor, w: &Tensor, eps: f32) -> (Tensor, Tensor) {
        assert_eq!(
            x.cols(),
            w.numel(),
            "rmsnorm {:?} with weight {:?}",
            x.shape(),
            w.shape()
        );
        self.timed(
            "rmsnorm_forward",
            cost::elementwise(x.numel(), 4.0, 2.0),
            || {
                let mut y = self.buf(x.numel());
                let mut rstd = self.buf(x.rows());
                let (xd, wd, c) = (x.h(), w.h(), x.cols());
                if self.split_worth(xd.len()) {
                    let r = x.rows() / 2;
                    let (y0, y1) = y.split_at_mut(r * c);
                    let (r0, r1) = rstd.split_at_mut(r);
                    let (x0, x1) = xd.split_at(r * c);
                    self.split2(
                        || kernels::rmsnorm_forward(x0, wd, eps, y0, r0),
                        || kernels::rmsnorm_forward(x1, wd, eps, y1, r1),
                    );
                } else {
                    kernels::rmsnorm_forward(xd, wd, eps, &mut y, &mut rstd);
                }
                (self.wrap(x.shape(), y), self.wrap(&[x.rows(), 1], rstd))
            },
        )
    }

    pub(super) fn rmsnorm_backward_input_op(
        &self,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
    ) -> Tensor {
        self.timed(
            "rmsnorm_backward_input",
            cost::elementwise(x.numel(), 8.0, 3.0),
            || {
                let mut dx = self.buf(x.numel());
                let (xd, wd, rd, dyd, c) = (x.h(), w.h(), rstd.h(), dy.h(), x.cols());
                if self.split_worth(xd.len()) {
                    let r = x.rows() / 2;
                    let (dx0, dx1) = dx.split_at_mut(r * c);
                    let (x0, x1) = xd.split_at(r * c);
                    let (dy0, dy1) = dyd.split_at(r * c);
                    let (r0, r1) = rd.split_at(r);
                    self.split2(
                        || kernels::rmsnorm_backward_input(x0, wd, r0, dy0, dx0),
                        || kernels::rmsnorm_backward_input(x1, wd, r1, dy1, dx1),
                    );
                } else {
                    kernels::rmsnorm_backward_input(xd, wd, rd, dyd, &mut dx);
                }
                self.wrap(x.shape(), dx)
            },
        )
    }

    pub(super) fn rmsnorm_backward_weight_op(
        &self,
        x: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        dw: &mut Tensor,
    ) {
        self.timed(
            "rmsnorm_backward_weight",
            cost::elementwise(x.numel(), 3.0, 2.0),
            || kernels::rmsnorm_backward_weight(x.h(), rstd.h(), dy.h(), dw.hm()),
        )
    }

    pub(super) fn swiglu_forward_op(&self, gate: &Tensor, up: &Tensor) -> Tensor {
        assert_eq!(gate.shape(), up.shape(), "swiglu");
        self.timed(
            "swiglu_forward",
            cost::elementwise(gate.numel(), 6.0, 3.0),
            || {
                let mut h = self.buf(gate.numel());
                let (g, u) = (gate.h(), up.h());
                if self.split_worth(h.len()) {
                    let (h0, h1) = h.split_at_mut(g.len() / 2);
                    let (g0, g1) = g.split_at(h0.len());
                    let (u0, u1) = u.split_at(h0.len());
                    self.split2(
                        || kernels::swiglu_forward(g0, u0, h0),
                        || kernels::swiglu_forward(g1, u1, h1),
                    );
                } else {
                    kernels::swiglu_forward(g, u, &mut h);
                }
                self.wrap(gate.shape(), h)
            },
        )
    }

    pub(super) fn swiglu_backward_op(
        &self,
        gate: &Tensor,
        up: &Tensor,
        dh: &Tensor,
    ) -> (Tensor, Tensor) {
        self.timed(
            "swiglu_backward",
            cost::elementwise(gate.numel(), 10.0, 5.0),
            || {
                let mut dg = self.buf(gate.numel());
                let mut du = self.buf(gate.numel());
                let (g, u, d) = (gate.h(), up.h(), dh.h());
                if self.split_worth(g.len()) {
                    let mid = g.len() / 2;
                    let (dg0, dg1) = dg.split_at_mut(mid);
                    let (du0, du1) = du.split_at_mut(mid);
                    let ((g0, g1), (u0, u1), (d0, d1)) =
                        (g.split_at(mid), u.split_at(mid), d.split_at(mid));
                    self.split2(
                        || kernels::swiglu_backward(g0, u0, d0, dg0, du0),
                        || kernels::swiglu_backward(g1, u1, d1, dg1, du1),
                    );
                } else {
                    kernels::swiglu_backward(g, u, d, &mut dg, &mut du);
                }
                (self.wrap(gate.shape(), dg), self.wrap(gate.shape(), du))
            },
        )
    }

    pub(super) fn rope_op(&self, x: &mut Tensor, table: &Tensor, spec: RopeSpec, inverse: bool) {
        let cols = x.cols();
        assert!(
            spec.offset + (spec.heads - 1) * spec.head_stride + spec.dim <= cols,
            "rope spec {spec:?} on {:?}",
            x.shape()
        );
        self.timed(
            "rope",
            cost::elementwise(x.rows() * spec.heads * spec.dim, 3.0, 2.0),
            || kernels::rope(x.hm(), cols, table.h(), spec, inverse),
        )
    }

    pub(super) fn attention_forward_op(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor) {
        let (t, h) = (s.seq, s.heads);
        let n = s.batch * t;
        assert!(
            q.numel() == n * h * (s.nope + s.rope)
                && kv.numel() == n * h * (s.nope + s.v)
                && k_pe.numel() == n * s.rope
        );
        self.timed("attention_forward", cost::attention_forward(&s), || {
            let mut out = self.buf(n * h * s.v);
            let mut probs = self.buf(s.batch * h * t * t);
            let inputs = (q.h(), kv.h(), k_pe.h());
            attention::forward_batch(self.pool(), self.threads, inputs, &s, &mut out, &mut probs);
            (
                self.wrap(&[n, h * s.v], out),
                self.wrap(&[s.batch, h, t, t], probs),
            )
        })
    }

    pub(super) fn attention_backward_op(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        probs: &Tensor,
        dout: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor, Tensor) {
        let (t, h) = (s.seq, s.heads);
        let n = s.batch * t;
        let (qw, kvw) = (h * (s.nope + s.rope), h * (s.nope + s.v));
        self.timed("attention_backward", cost::attention_backward(&s), || {
            let mut dq = self.buf(n * qw);
            let mut dkv = self.buf(n * kvw);
            let mut dpe = self.buf(n * s.rope);
            let inputs = (q.h(), kv.h(), k_pe.h(), probs.h(), dout.h());
            let grads = (&mut dq[..], &mut dkv[..], &mut dpe[..]);
            attention::backward_batch(self.pool(), self.threads, inputs, &s, grads);
            (
                self.wrap(q.shape(), dq),
                self.wrap(kv.shape(), dkv),
                self.wrap(k_pe.shape(), dpe),
            )
        })
    }

    pub(super) fn router_forward_op(
        &self,
        logits: &Tensor,
        bias: &Tensor,
        spec: RouterSpec,
    ) -> RouterOut {
        let n = logits.rows();
        assert_eq!(
            logits.cols(),
            spec.n_experts,
            "router logits {:?}",
            logits.shape()
        );
        self.timed(
            "router_forward",
            cost::elementwise(logits.numel(), 8.0 + spec.top_k as f64, 2.0),
            || {
                let mut scores = self.buf(logits.numel());
                let mut topk = vec![0u32; n * spec.top_k];
                let mut weights = self.buf(n * spec.top_k);
                kernels::router_forward(
                    logits.h(),
                    bias.h(),
                    spec,
                    &mut scores,
                    &mut topk,
                    &mut weights,
                );
                RouterOut {
                    scores: self.wrap(logits.shape(), scores),
                    topk,
                    weights: self.wrap(&[n * spec.top_k, 1], weights),
                }
            },
        )
    }

    pub(super) fn router_backward_op(
        &self,
        scores: &Tensor,
        topk: &[u32],
        dweights: &Tensor,
        spec: RouterSpec,
    ) -> Tensor {
        self.timed(
            "router_backward",
            cost::elementwise(scores.numel(), 2.0, 2.0),
            || {
                let mut d = self.buf(scores.numel());
                kernels::router_backward(scores.h(), topk, dweights.h(), spec, &mut d);
                self.wrap(scores.shape(), d)
            },
        )
    }

    pub(super) fn balance_loss_op(
        &self,
        scores: &Tensor,
        topk: &[u32],
        spec: RouterSpec,
        seq_len: usize,
        alpha: f32,
    ) -> (f32, Tensor) {
        self.timed(
            "balance_loss",
            cost::elementwise(scores.numel(), 10.0, 3.0),
            || {
                let mut d = self.buf(scores.numel());
                let loss = kernels::balance_loss(scores.h(), topk, spec, seq_len, alpha, &mut d);
                (loss, self.wrap(scores.shape(), d))
            },
        )
    }

    pub(super) fn cross_entropy_op(
        &self,
        logits: &Tensor,
        targets: &[i64],
        grad_scale: f32,
    ) -> (f32, Tensor) {
        assert_eq!(
            logits.rows(),
            targets.len(),
            "cross_entropy {:?} with {} targets",
            logits.shape(),
            targets.len()
        );
        self.timed(
            "cross_entropy",
            cost::elementwise(logits.numel(), 5.0, 2.0),
            || {
                let mut d = self.buf(logits.numel());
                let (l, v) = (logits.h(), logits.cols());
                let loss = if self.split_worth(l.len()) {
                    let r = targets.len() / 2;
                    let (d0, d1) = d.split_at_mut(r * v);
                    let (l0, l1) = l.split_at(r * v);
                    let (t0, t1) = targets.split_at(r);
                    let (mut a, mut b) = (0.0, 0.0);
                    self.split2(
                        || a = kernels::cross_entropy(l0, v, t0, grad_scale, d0),
                        || b = kernels::cross_entropy(l1, v, t1, grad_scale, d1),
                    );
                    a + b
                } else {
                    kernels::cross_entropy(l, v, targets, grad_scale, &mut d)
                };
                (loss, self.wrap(logits.shape(), d))
            },
        )
    }
}

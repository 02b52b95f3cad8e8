//! Causal MLA attention on the GPU: cuBLAS strided-batched GEMMs over the heads of each
//! sequence, reading `q`, `v`, `dout` in place through their strides, and the causal softmax
//! kernels of `kernels.cu` on the kept `[B, H, T, T]` probabilities.
//!
//! Only `K = [k_nope | k_pe]` is gathered into a `[B, H, T, nope+rope]` scratch (k_pe is shared
//! by every head), so that `S = Q Kᵀ`, `dQ = dS K` and `dK = dSᵀ Q` are one GEMM each over the
//! whole head dimension. The math is the CPU's (`device/attention.rs`).

use super::blas::Batched;
use super::module::{Arg, over, per_row};
use super::{CudaDevice, cost};
use crate::device::AttnShape;
use crate::tensor::Tensor;

/// Widths of one attention call.
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    dqk: usize,
    dkv: usize,
    qw: usize,
    kvw: usize,
    ow: usize,
}

impl Dims {
    fn of(s: &AttnShape) -> Dims {
        let (dqk, dkv) = (s.nope + s.rope, s.nope + s.v);
        Dims {
            b: s.batch,
            t: s.seq,
            h: s.heads,
            dqk,
            dkv,
            qw: s.heads * dqk,
            kvw: s.heads * dkv,
            ow: s.heads * s.v,
        }
    }
}

const F: u64 = 4;

impl CudaDevice {
    /// `K [B, H, T, nope+rope]` from `kv`'s k_nope columns and the shared `k_pe`.
    fn gather_keys(&self, kv: &Tensor, k_pe: &Tensor, s: &AttnShape, d: &Dims) -> Tensor {
        let k = self.out(&[d.b, d.h, d.t, d.dqk]);
        let dims = [Arg::I(d.b as i32), Arg::I(d.t as i32), Arg::I(d.h as i32)];
        let n = d.b * d.h * d.t;
        let mut a = vec![
            Arg::P(self.ptr(kv)),
            Arg::I(d.kvw as i32),
            Arg::I(d.dkv as i32),
            Arg::I(0),
            Arg::P(self.ptr(&k)),
            Arg::I(d.dqk as i32),
            Arg::I(0),
            Arg::I(s.nope as i32),
        ];
        a.extend(dims);
        self.run("to_heads", over(n * s.nope), &a);
        let mut a = vec![
            Arg::P(self.ptr(k_pe)),
            Arg::I(s.rope as i32),
            Arg::I(0),
            Arg::I(0),
            Arg::P(self.ptr(&k)),
            Arg::I(d.dqk as i32),
            Arg::I(s.nope as i32),
            Arg::I(s.rope as i32),
        ];
        a.extend(dims);
        self.run("to_heads", over(n * s.rope), &a);
        k
    }

    /// For each sequence `b`, a batch over the heads: `f(b)` gives the call.
    fn per_sequence(&self, d: &Dims, f: impl Fn(usize) -> Batched) {
        for b in 0..d.b {
            self.blas.batched(self, &f(b), self.precision);
        }
    }

    pub(super) fn attn_forward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor) {
        let d = Dims::of(&s);
        let n = d.b * d.t;
        assert!(
            q.numel() == n * d.qw && kv.numel() == n * d.kvw && k_pe.numel() == n * s.rope,
            "attention_forward: q {:?}, kv {:?}, k_pe {:?} for {s:?}",
            q.shape(),
            kv.shape(),
            k_pe.shape()
        );
        let out = self.out(&[n, d.ow]);
        let probs = self.out(&[d.b, d.h, d.t, d.t]);
        self.op("attention_forward", cost::attention_forward(&s), || {
            if d.b * d.h * d.t == 0 {
                return;
            }
            let k = self.gather_keys(kv, k_pe, &s, &d);
            let (qp, kp, pp) = (self.ptr(q), self.ptr(&k), self.ptr(&probs));
            let (kvp, op) = (self.ptr(kv), self.ptr(&out));
            let tt = d.t * d.t;
            // S = Q Kᵀ
            self.per_sequence(&d, |b| Batched {
                m: d.t,
                n: d.t,
                k: d.dqk,
                a: qp + (b * d.t * d.qw) as u64 * F,
                a_trans: false,
                a_cols: d.qw,
                a_stride: d.dqk,
                b: kp + (b * d.h * d.t * d.dqk) as u64 * F,
                b_trans: true,
                b_cols: d.dqk,
                b_stride: d.t * d.dqk,
                c: pp + (b * d.h * tt) as u64 * F,
                c_ld: d.t,
                c_stride: tt,
                count: d.h,
                accumulate: false,
            });
            self.run(
                "causal_softmax",
                per_row(d.b * d.h * d.t, 256),
                &[Arg::P(pp), Arg::I(d.t as i32), Arg::F(s.scale)],
            );
            // O = P V
            self.per_sequence(&d, |b| Batched {
                m: d.t,
                n: s.v,
                k: d.t,
                a: pp + (b * d.h * tt) as u64 * F,
                a_trans: false,
                a_cols: d.t,
                a_stride: tt,
                b: kvp + (b * d.t * d.kvw + s.nope) as u64 * F,
                b_trans: false,
                b_cols: d.kvw,
                b_stride: d.dkv,
                c: op + (b * d.t * d.ow) as u64 * F,
                c_ld: d.ow,
                c_stride: s.v,
                count: d.h,
                accumulate: false,
            });
        });
        (out, probs)
    }

    pub(super) fn attn_backward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        probs: &Tensor,
        dout: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor, Tensor) {
        let d = Dims::of(&s);
        let n = d.b * d.t;
        assert!(
            probs.numel() == d.b * d.h * d.t * d.t && dout.numel() == n * d.ow,
            "attention_backward: probs {:?}, dout {:?} for {s:?}",
            probs.shape(),
            dout.shape()
        );
        let dq = self.out(&[n, d.qw]);
        let dkv = self.out(&[n, d.kvw]);
        let dk_pe = self.out(&[n, s.rope]);
        self.op("attention_backward", cost::attention_backward(&s), || {
            if d.b * d.h * d.t == 0 {
                return;
            }
            let k = self.gather_keys(kv, k_pe, &s, &d);
            let ds = self.out(&[d.b, d.h, d.t, d.t]);
            let dk = self.out(&[d.b, d.h, d.t, d.dqk]);
            let (qp, kp, pp, dsp, dkp) = (
                self.ptr(q),
                self.ptr(&k),
                self.ptr(probs),
                self.ptr(&ds),
                self.ptr(&dk),
            );
            let (kvp, dop, dqp, dkvp) =
                (self.ptr(kv), self.ptr(dout), self.ptr(&dq), self.ptr(&dkv));
            let tt = d.t * d.t;
            // dP = dO Vᵀ
            self.per_sequence(&d, |b| Batched {
                m: d.t,
                n: d.t,
                k: s.v,
                a: dop + (b * d.t * d.ow) as u64 * F,
                a_trans: false,
                a_cols: d.ow,
                a_stride: s.v,
                b: kvp + (b * d.t * d.kvw + s.nope) as u64 * F,
                b_trans: true,
                b_cols: d.kvw,
                b_stride: d.dkv,
                c: dsp + (b * d.h * tt) as u64 * F,
                c_ld: d.t,
                c_stride: tt,
                count: d.h,
                accumulate: false,
            });
            self.run(
                "causal_softmax_bwd",
                per_row(d.b * d.h * d.t, 256),
                &[Arg::P(pp), Arg::P(dsp), Arg::I(d.t as i32), Arg::F(s.scale)],
            );
            // dV = Pᵀ dO, straight into dkv's v columns.
            self.per_sequence(&d, |b| Batched {
                m: d.t,
                n: s.v,
                k: d.t,
                a: pp + (b * d.h * tt) as u64 * F,
                a_trans: true,
                a_cols: d.t,
                a_stride: tt,
                b: dop + (b * d.t * d.ow) as u64 * F,
                b_trans: false,
                b_cols: d.ow,
                b_stride: s.v,
                c: dkvp + (b * d.t * d.kvw + s.nope) as u64 * F,
                c_ld: d.kvw,
                c_stride: d.dkv,
                count: d.h,
                accumulate: false,
            });
            // dQ = dS K, straight into dq.
            self.per_sequence(&d, |b| Batched {
                m: d.t,
                n: d.dqk,
                k: d.t,
                a: dsp + (b * d.h * tt) as u64 * F,
                a_trans: false,
                a_cols: d.t,
                a_stride: tt,
                b: kp + (b * d.h * d.t * d.dqk) as u64 * F,
                b_trans: false,
                b_cols: d.dqk,
                b_stride: d.t * d.dqk,
                c: dqp + (b * d.t * d.qw) as u64 * F,
                c_ld: d.qw,
                c_stride: d.dqk,
                count: d.h,
                accumulate: false,
            });
            // dK = dSᵀ Q, into the [B, H, T, nope+rope] scratch.
            self.per_sequence(&d, |b| Batched {
                m: d.t,
                n: d.dqk,
                k: d.t,
                a: dsp + (b * d.h * tt) as u64 * F,
                a_trans: true,
                a_cols: d.t,
                a_stride: tt,
                b: qp + (b * d.t * d.qw) as u64 * F,
                b_trans: false,
                b_cols: d.qw,
                b_stride: d.dqk,
                c: dkp + (b * d.h * d.t * d.dqk) as u64 * F,
                c_ld: d.dqk,
                c_stride: d.t * d.dqk,
                count: d.h,
                accumulate: false,
            });
            self.keys_grad_from_heads(&dk, &dkv, &dk_pe, &s);
        });
        (dq, dkv, dk_pe)
    }

    /// From the `[B, H, T, nope+rope]` key gradient `dk`: its k_nope part into `dkv`'s k_nope
    /// columns, its k_pe part summed over the heads (which share k_pe) into `dk_pe`.
    pub(super) fn keys_grad_from_heads(
        &self,
        dk: &Tensor,
        dkv: &Tensor,
        dk_pe: &Tensor,
        s: &AttnShape,
    ) {
        let d = Dims::of(s);
        let n = d.b * d.t;
        let dkp = self.ptr(dk);
        let dims = [Arg::I(d.b as i32), Arg::I(d.t as i32), Arg::I(d.h as i32)];
        let mut a = vec![
            Arg::P(dkp),
            Arg::I(d.dqk as i32),
            Arg::I(0),
            Arg::P(self.ptr(dkv)),
            Arg::I(d.kvw as i32),
            Arg::I(d.dkv as i32),
            Arg::I(0),
            Arg::I(s.nope as i32),
        ];
        a.extend(dims);
        self.run("from_heads", over(n * d.h * s.nope), &a);
        let mut a = vec![
            Arg::P(dkp),
            Arg::I(d.dqk as i32),
            Arg::I(s.nope as i32),
            Arg::P(self.ptr(dk_pe)),
            Arg::I(s.rope as i32),
        ];
        a.extend(dims);
        self.run("sum_heads", over(n * s.rope), &a);
    }
}

//! Whole-tensor operations of the CUDA device for the training state: scaling, Σg², AdamW and
//! the gradient buckets (pack/unpack).

use cudarc::driver::DevicePtr;

use super::module::{Arg, BLOCK, over, per_row};
use super::{CudaDevice, cost};
use crate::device::AdamWArgs;
use crate::optim::SQ_PIECE;
use crate::tensor::Tensor;

impl CudaDevice {
    pub(super) fn scale_all(&self, t: &mut Tensor, s: f32) {
        let n = t.numel();
        self.op("scale", cost::elementwise(n, 1.0, 2.0), || {
            self.run(
                "scale_f32",
                over(n),
                &[Arg::P(self.ptr(t)), Arg::F(s), Arg::L(n as i64)],
            )
        });
    }

    /// `Σ t²` in f64: one f64 per piece of [`SQ_PIECE`] values on the GPU, the pieces summed on
    /// the host in order (per tensor, then over the tensors), so the bits do not depend on
    /// timing.
    pub(super) fn sum_sq(&self, ts: &[&Tensor]) -> f64 {
        let n: usize = ts.iter().map(|t| t.numel()).sum();
        let pieces: Vec<usize> = ts.iter().map(|t| t.numel().div_ceil(SQ_PIECE)).collect();
        let total: usize = pieces.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let sums = self
            .stream
            .alloc_zeros::<f64>(total)
            .unwrap_or_else(|e| panic!("CUDA allocation failed: {e}"));
        self.op("sum_squares", cost::elementwise(n, 2.0, 1.0), || {
            let (base, _g) = sums.device_ptr(&self.stream);
            let mut at = 0usize;
            for (t, &p) in ts.iter().zip(&pieces) {
                if p > 0 {
                    self.run(
                        "sum_squares_pieces",
                        per_row(p, BLOCK),
                        &[
                            Arg::P(self.ptr(t)),
                            Arg::L(t.numel() as i64),
                            Arg::I(SQ_PIECE as i32),
                            Arg::P(base + (at * 8) as u64),
                        ],
                    );
                }
                at += p;
            }
        });
        let host = self
            .stream
            .clone_dtoh(&sums)
            .unwrap_or_else(|e| panic!("CUDA download failed: {e}"));
        let mut rest = &host[..];
        pieces
            .iter()
            .map(|&p| {
                let (mine, tail) = rest.split_at(p);
                rest = tail;
                mine.iter().sum::<f64>()
            })
            .sum()
    }

    pub(super) fn adamw_all(&self, params: &mut [AdamWArgs<'_>]) {
        let n = params.iter().map(|p| p.grad.numel()).sum();
        self.op("adamw", cost::elementwise(n, 12.0, 7.0), || {
            for p in params.iter_mut() {
                let len = p.grad.numel();
                assert!(
                    p.value.numel() == len
                        && p.exp_avg.numel() == len
                        && p.exp_avg_sq.numel() == len,
                    "adamw: value {:?}, grad {:?}",
                    p.value.shape(),
                    p.grad.shape()
                );
                let k = p.coef;
                self.run(
                    "adamw_f32",
                    over(len),
                    &[
                        Arg::P(self.ptr(p.value)),
                        Arg::P(self.ptr(p.grad)),
                        Arg::P(self.ptr(p.exp_avg)),
                        Arg::P(self.ptr(p.exp_avg_sq)),
                        Arg::L(len as i64),
                        Arg::I(k.decay.is_some() as i32),
                        Arg::F(k.decay.unwrap_or(1.0)),
                        Arg::I(k.lerp_small as i32),
                        Arg::F(k.w1),
                        Arg::F(k.beta2),
                        Arg::F(k.w2),
                        Arg::F(k.eps),
                        Arg::F(k.bc2_sqrt),
                        Arg::F(k.step_size),
                    ],
                );
            }
        });
    }

    pub(super) fn pack_all(&self, ts: &[&Tensor], scale: f32) -> Tensor {
        let n: usize = ts.iter().map(|t| t.numel()).sum();
        let out = self.out(&[n]);
        self.op("pack", cost::elementwise(n, 1.0, 2.0), || {
            let base = self.ptr(&out);
            let mut at = 0usize;
            for t in ts {
                let len = t.numel();
                if len > 0 {
                    self.run(
                        "scaled_copy",
                        over(len),
                        &[
                            Arg::P(base + (at * 4) as u64),
                            Arg::P(self.ptr(t)),
                            Arg::F(scale),
                            Arg::L(len as i64),
                        ],
                    );
                }
                at += len;
            }
        });
        out
    }

    pub(super) fn unpack_all(&self, flat: &Tensor, ts: &mut [&mut Tensor]) {
        let n: usize = ts.iter().map(|t| t.numel()).sum();
        assert_eq!(n, flat.numel(), "unpack: {} values for {n}", flat.numel());
        self.op("unpack", cost::copy(n), || {
            let base = self.ptr(flat);
            let mut at = 0usize;
            for t in ts.iter_mut() {
                let len = t.numel();
                self.copy_raw(self.ptr(t), base + (at * 4) as u64, len);
                at += len;
            }
        });
    }
}

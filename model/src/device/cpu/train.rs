//! The CPU device's operations on the training state: fill, scale, Σg², AdamW and the
//! gradient buckets (the bodies behind its `Device` methods of the same names).

use super::super::AdamWArgs;
use super::super::cost;
use super::{CpuDevice, PAR_MIN_WHOLE, PIECE};
use crate::optim::kernel;
use crate::par::run_pieces;
use crate::tensor::Tensor;

impl CpuDevice {
    pub(super) fn fill_op(&self, t: &mut Tensor, value: f32) {
        let n = t.numel();
        self.timed("fill", cost::elementwise(n, 0.0, 1.0), || {
            let pieces: Vec<&mut [f32]> = t.hm().chunks_mut(PIECE).collect();
            run_pieces(
                pieces,
                self.threads,
                PAR_MIN_WHOLE,
                |p| p.len(),
                |p| p.fill(value),
            );
        })
    }

    pub(super) fn scale_op(&self, t: &mut Tensor, s: f32) {
        let n = t.numel();
        self.timed("scale", cost::elementwise(n, 1.0, 2.0), || {
            let pieces: Vec<&mut [f32]> = t.hm().chunks_mut(PIECE).collect();
            run_pieces(
                pieces,
                self.threads,
                PAR_MIN_WHOLE,
                |p| p.len(),
                |p| p.iter_mut().for_each(|x| *x *= s),
            );
        })
    }

    pub(super) fn sum_squares_op(&self, ts: &[&Tensor]) -> f64 {
        let n = ts.iter().map(|t| t.numel()).sum();
        self.timed("sum_squares", cost::elementwise(n, 2.0, 1.0), || {
            let slices: Vec<&[f32]> = ts.iter().map(|t| t.h()).collect();
            crate::optim::sum_of_squares_on(&slices, self.threads)
        })
    }

    pub(super) fn adamw_op(&self, params: &mut [AdamWArgs<'_>]) {
        let n = params.iter().map(|p| p.grad.numel()).sum();
        self.timed("adamw", cost::elementwise(n, 12.0, 7.0), || {
            let mut pieces = Vec::new();
            for p in params.iter_mut() {
                let k = p.coef;
                let moments = p
                    .exp_avg
                    .hm()
                    .chunks_mut(kernel::PIECE)
                    .zip(p.exp_avg_sq.hm().chunks_mut(kernel::PIECE));
                let values = p
                    .value
                    .hm()
                    .chunks_mut(kernel::PIECE)
                    .zip(p.grad.h().chunks(kernel::PIECE));
                for ((value, grad), (m, v)) in values.zip(moments) {
                    pieces.push(kernel::Piece {
                        k,
                        value,
                        grad,
                        m,
                        v,
                    });
                }
            }
            kernel::run(pieces, self.threads);
        })
    }

    pub(super) fn pack_op(&self, ts: &[&Tensor], scale: f32) -> Tensor {
        let n: usize = ts.iter().map(|t| t.numel()).sum();
        self.timed("pack", cost::elementwise(n, 1.0, 2.0), || {
            let mut out = self.out(&[n]);
            let mut at = 0;
            let o = out.hm();
            for t in ts {
                let v = t.h();
                for (d, s) in o[at..at + v.len()].iter_mut().zip(v) {
                    *d = s * scale;
                }
                at += v.len();
            }
            out
        })
    }

    pub(super) fn unpack_op(&self, flat: &Tensor, ts: &mut [&mut Tensor]) {
        let n: usize = ts.iter().map(|t| t.numel()).sum();
        assert_eq!(n, flat.numel(), "unpack: {} values for {n}", flat.numel());
        self.timed("unpack", cost::copy(n), || {
            let src = flat.h();
            let mut at = 0;
            for t in ts.iter_mut() {
                let d = t.hm();
                d.copy_from_slice(&src[at..at + d.len()]);
                at += d.len();
            }
        })
    }
}

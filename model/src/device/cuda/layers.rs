//! The layer kernels of the CUDA device: RMSNorm, SwiGLU, RoPE, the router and its balance loss,
//! cross-entropy. Each issues the `kernels.cu` kernel of the same name; the host math they follow
//! is `device/kernels.rs`.

use cudarc::driver::{DevicePtr, LaunchConfig};

use super::module::{Arg, BLOCK, over, per_row};
use super::profile::host_timed;
use super::{CudaDevice, cost};
use crate::device::{Device, RopeSpec, RouterOut, RouterSpec};
use crate::tensor::Tensor;

/// Rows per partial sum of the RMSNorm weight gradient.
const WEIGHT_GRAD_ROWS: usize = 64;

impl CudaDevice {
    pub(super) fn rmsnorm_fwd(&self, x: &Tensor, w: &Tensor, eps: f32) -> (Tensor, Tensor) {
        let d = x.cols();
        assert_eq!(
            d,
            w.numel(),
            "rmsnorm {:?} with weight {:?}",
            x.shape(),
            w.shape()
        );
        let y = self.out(x.shape());
        let rstd = self.out(&[x.rows(), 1]);
        self.op(
            "rmsnorm_forward",
            cost::elementwise(x.numel(), 4.0, 3.0),
            || {
                if x.rows() == 0 {
                    return;
                }
                self.run(
                    "rmsnorm_fwd",
                    per_row(x.rows(), BLOCK),
                    &[
                        Arg::P(self.ptr(x)),
                        Arg::P(self.ptr(w)),
                        Arg::P(self.ptr(&y)),
                        Arg::P(self.ptr(&rstd)),
                        Arg::I(d as i32),
                        Arg::F(eps),
                    ],
                )
            },
        );
        (y, rstd)
    }

    pub(super) fn rmsnorm_bwd_input(
        &self,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
    ) -> Tensor {
        let dx = self.out(x.shape());
        self.op(
            "rmsnorm_backward_input",
            cost::elementwise(x.numel(), 7.0, 4.0),
            || {
                if x.rows() == 0 {
                    return;
                }
                self.run(
                    "rmsnorm_bwd_input",
                    per_row(x.rows(), BLOCK),
                    &[
                        Arg::P(self.ptr(x)),
                        Arg::P(self.ptr(w)),
                        Arg::P(self.ptr(rstd)),
                        Arg::P(self.ptr(dy)),
                        Arg::P(self.ptr(&dx)),
                        Arg::I(x.cols() as i32),
                    ],
                )
            },
        );
        dx
    }

    /// `dw += Σ_rows dy ⊙ x · rstd`: partial sums over blocks of rows, then their column sums in
    /// order (no atomics: the same bits every run).
    pub(super) fn rmsnorm_bwd_weight(
        &self,
        x: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        dw: &mut Tensor,
    ) {
        let (rows, d) = (x.rows(), x.cols());
        // At most 65535 chunks (the grid's y limit).
        let per = WEIGHT_GRAD_ROWS.max(rows.div_ceil(65535));
        let chunks = rows.div_ceil(per);
        self.op(
            "rmsnorm_backward_weight",
            cost::elementwise(x.numel(), 3.0, 2.0),
            || {
                if rows == 0 || d == 0 {
                    return;
                }
                let partial = self.alloc(chunks * d);
                let (pp, _g) = partial.device_ptr(&self.stream);
                let col_blocks = d.div_ceil(BLOCK as usize) as u32;
                self.run(
                    "rmsnorm_bwd_weight_partial",
                    cudarc::driver::LaunchConfig {
                        grid_dim: (col_blocks, chunks as u32, 1),
                        block_dim: (BLOCK, 1, 1),
                        shared_mem_bytes: 0,
                    },
                    &[
                        Arg::P(self.ptr(x)),
                        Arg::P(self.ptr(rstd)),
                        Arg::P(self.ptr(dy)),
                        Arg::P(pp),
                        Arg::L(rows as i64),
                        Arg::I(d as i32),
                        Arg::I(per as i32),
                    ],
                );
                self.run(
                    "add_column_sums",
                    over(d),
                    &[
                        Arg::P(pp),
                        Arg::I(chunks as i32),
                        Arg::I(d as i32),
                        Arg::P(self.ptr(dw)),
                    ],
                );
            },
        );
    }

    pub(super) fn swiglu_fwd(&self, gate: &Tensor, up: &Tensor) -> Tensor {
        assert_eq!(gate.shape(), up.shape(), "swiglu");
        let h = self.out(gate.shape());
        let n = gate.numel();
        self.op("swiglu_forward", cost::elementwise(n, 6.0, 3.0), || {
            self.run(
                "swiglu_fwd",
                over(n),
                &[
                    Arg::P(self.ptr(gate)),
                    Arg::P(self.ptr(up)),
                    Arg::P(self.ptr(&h)),
                    Arg::L(n as i64),
                ],
            )
        });
        h
    }

    pub(super) fn swiglu_bwd(&self, gate: &Tensor, up: &Tensor, dh: &Tensor) -> (Tensor, Tensor) {
        let (dg, du) = (self.out(gate.shape()), self.out(gate.shape()));
        let n = gate.numel();
        self.op("swiglu_backward", cost::elementwise(n, 10.0, 5.0), || {
            self.run(
                "swiglu_bwd",
                over(n),
                &[
                    Arg::P(self.ptr(gate)),
                    Arg::P(self.ptr(up)),
                    Arg::P(self.ptr(dh)),
                    Arg::P(self.ptr(&dg)),
                    Arg::P(self.ptr(&du)),
                    Arg::L(n as i64),
                ],
            )
        });
        (dg, du)
    }

    pub(super) fn rope_apply(&self, x: &mut Tensor, table: &Tensor, spec: RopeSpec, inverse: bool) {
        assert!(
            spec.dim <= 256 && spec.dim.is_multiple_of(2),
            "rope: {} rotary channels (the kernel takes an even number up to 256)",
            spec.dim
        );
        assert!(
            spec.heads == 0
                || spec.offset + (spec.heads - 1) * spec.head_stride + spec.dim <= x.cols(),
            "rope: {spec:?} reaches past {} columns",
            x.cols()
        );
        let rows = x.rows();
        let h = spec.dim / 2;
        if h == 0 || rows * spec.heads == 0 {
            return;
        }
        // Whole (row, head) units per block, one thread per rotated pair.
        let per = (256 / h).max(1);
        let units = rows * spec.heads;
        let cfg = LaunchConfig {
            grid_dim: (units.div_ceil(per).min(1 << 20) as u32, 1, 1),
            block_dim: ((per * h) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.op(
            "rope",
            cost::elementwise(rows * spec.heads * spec.dim, 3.0, 2.0),
            || {
                self.run(
                    "rope",
                    cfg,
                    &[
                        Arg::P(self.ptr(x)),
                        Arg::I(x.cols() as i32),
                        Arg::P(self.ptr(table)),
                        Arg::I(spec.seq_len as i32),
                        Arg::I(spec.heads as i32),
                        Arg::I(spec.head_stride as i32),
                        Arg::I(spec.offset as i32),
                        Arg::I(spec.dim as i32),
                        Arg::I(spec.interleave as i32),
                        Arg::I(inverse as i32),
                        Arg::L(rows as i64),
                    ],
                )
            },
        );
    }

    /// The router; its top-k indices come back to the host (they decide the experts' shapes):
    /// the one wait for the GPU in a forward pass.
    pub(super) fn router_fwd(&self, logits: &Tensor, bias: &Tensor, spec: RouterSpec) -> RouterOut {
        let (e, k) = (spec.n_experts, spec.top_k);
        assert!(
            e <= 256
                && (1..=64).contains(&spec.n_group)
                && spec.topk_group <= spec.n_group
                && k <= e
                && e.is_multiple_of(spec.n_group)
                && logits.cols() == e,
            "router: {e} experts in {} groups (the kernel takes up to 256 in up to 64)",
            spec.n_group
        );
        let n = logits.rows();
        let scores = self.out(&[n, e]);
        let weights = self.out(&[n * k, 1]);
        let topk_dev = self
            .stream
            .alloc_zeros::<u32>((n * k).max(1))
            .unwrap_or_else(|err| panic!("CUDA allocation failed: {err}"));
        self.op("router_forward", cost::elementwise(n * e, 8.0, 2.0), || {
            let (tp, _g) = topk_dev.device_ptr(&self.stream);
            // A thread per token, in blocks of a warp so that the few thousand tokens of a
            // batch spread over every SM.
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (n.div_ceil(32).max(1) as u32, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            self.run(
                "router_fwd",
                cfg,
                &[
                    Arg::P(self.ptr(logits)),
                    Arg::P(self.ptr(bias)),
                    Arg::I(e as i32),
                    Arg::I(k as i32),
                    Arg::I(spec.n_group as i32),
                    Arg::I(spec.topk_group as i32),
                    Arg::I(spec.norm_topk_prob as i32),
                    Arg::F(spec.scaling),
                    Arg::P(self.ptr(&scores)),
                    Arg::P(tp),
                    Arg::P(self.ptr(&weights)),
                    Arg::L(n as i64),
                ],
            )
        });
        let mut topk = host_timed("download", || {
            self.stream
                .clone_dtoh(&topk_dev)
                .unwrap_or_else(|err| panic!("CUDA download failed: {err}"))
        });
        topk.truncate(n * k);
        RouterOut {
            scores,
            topk,
            weights,
        }
    }

    pub(super) fn router_bwd(
        &self,
        scores: &Tensor,
        topk: &[u32],
        dweights: &Tensor,
        spec: RouterSpec,
    ) -> Tensor {
        let n = scores.rows();
        let dl = self.out(&[n, spec.n_experts]);
        self.op(
            "router_backward",
            cost::elementwise(n * spec.n_experts, 2.0, 2.0),
            || {
                if n == 0 {
                    return;
                }
                let idx = self.upload_any(topk);
                let (ip, _g) = idx.device_ptr(&self.stream);
                self.run(
                    "router_bwd",
                    over(n),
                    &[
                        Arg::P(self.ptr(scores)),
                        Arg::P(ip),
                        Arg::P(self.ptr(dweights)),
                        Arg::I(spec.n_experts as i32),
                        Arg::I(spec.top_k as i32),
                        Arg::I(spec.norm_topk_prob as i32),
                        Arg::F(spec.scaling),
                        Arg::P(self.ptr(&dl)),
                        Arg::L(n as i64),
                    ],
                )
            },
        );
        dl
    }

    /// The sequence-wise balance loss: per-sequence statistics on the GPU, the per-sequence
    /// losses summed on the host.
    pub(super) fn balance(
        &self,
        scores: &Tensor,
        topk: &[u32],
        spec: RouterSpec,
        seq_len: usize,
        alpha: f32,
    ) -> (f32, Tensor) {
        let (e, k) = (spec.n_experts, spec.top_k);
        let n = scores.rows();
        let n_seq = n / seq_len.max(1);
        let dl = self.zeros(&[n, e]);
        let loss = self.op("balance_loss", cost::elementwise(n * e, 6.0, 3.0), || {
            if n_seq == 0 {
                return 0.0;
            }
            let idx = self.upload_any(topk);
            let (ip, _g) = idx.device_ptr(&self.stream);
            let denom = self.alloc(n);
            let f = self.alloc(n_seq * e);
            let losses = self.alloc(n_seq);
            let (dp, _g1) = denom.device_ptr(&self.stream);
            let (fp, _g2) = f.device_ptr(&self.stream);
            let (lp, _g3) = losses.device_ptr(&self.stream);
            let sp = self.ptr(scores);
            self.run(
                "row_sums",
                over(n),
                &[Arg::P(sp), Arg::P(dp), Arg::I(e as i32), Arg::L(n as i64)],
            );
            self.run(
                "balance_stats",
                per_row(n_seq, BLOCK),
                &[
                    Arg::P(sp),
                    Arg::P(dp),
                    Arg::P(ip),
                    Arg::I(e as i32),
                    Arg::I(k as i32),
                    Arg::I(seq_len as i32),
                    Arg::F(alpha),
                    Arg::P(fp),
                    Arg::P(lp),
                ],
            );
            self.run(
                "balance_grad",
                over(n_seq * seq_len),
                &[
                    Arg::P(sp),
                    Arg::P(dp),
                    Arg::P(fp),
                    Arg::I(e as i32),
                    Arg::I(seq_len as i32),
                    Arg::F(alpha),
                    Arg::I(n_seq as i32),
                    Arg::P(self.ptr(&dl)),
                    Arg::L((n_seq * seq_len) as i64),
                ],
            );
            let per_seq = host_timed("download", || {
                self.stream
                    .clone_dtoh(&losses)
                    .unwrap_or_else(|err| panic!("CUDA download failed: {err}"))
            });
            per_seq.iter().sum::<f32>() / n_seq as f32
        });
        (loss, dl)
    }

    /// Fused softmax cross-entropy; the per-row losses are summed on the host in f64.
    pub(super) fn ce(&self, logits: &Tensor, targets: &[i64], grad_scale: f32) -> (f32, Tensor) {
        let (rows, v) = (logits.rows(), logits.cols());
        assert!(
            targets.len() == rows && targets.iter().all(|&t| t < v as i64),
            "cross_entropy: {} targets for {rows} rows of {v} logits",
            targets.len()
        );
        let dl = self.out(logits.shape());
        let loss = self.op(
            "cross_entropy",
            cost::elementwise(rows * v, 5.0, 2.0),
            || {
                if rows == 0 {
                    return 0.0;
                }
                let tg = self.upload_any(targets);
                let (tp, _g) = tg.device_ptr(&self.stream);
                let per_row_loss = self.alloc(rows);
                let (lp, _g2) = per_row_loss.device_ptr(&self.stream);
                self.run(
                    "cross_entropy",
                    per_row(rows, 512),
                    &[
                        Arg::P(self.ptr(logits)),
                        Arg::P(tp),
                        Arg::I(v as i32),
                        Arg::F(grad_scale),
                        Arg::P(self.ptr(&dl)),
                        Arg::P(lp),
                    ],
                );
                let l = host_timed("download", || {
                    self.stream
                        .clone_dtoh(&per_row_loss)
                        .unwrap_or_else(|err| panic!("CUDA download failed: {err}"))
                });
                l.iter().map(|&x| f64::from(x)).sum::<f64>() as f32
            },
        );
        (loss, dl)
    }
}

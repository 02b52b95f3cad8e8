//! The CUDA device's copies, gathers and scatters (the element-wise and row operations of the
//! `Device` trait): row and column copies, the expert dispatch's gathers, and scatter-adds in
//! the CPU's order, sorted by destination on the host (no atomics).

use std::ops::Range;

use cudarc::driver::DevicePtr;

use super::module::{Arg, over};
use super::{CudaDevice, cost};
use crate::tensor::Tensor;

impl CudaDevice {
    pub(super) fn fill_n(&self, t: &mut Tensor, value: f32) {
        let n = t.numel();
        let p = self.ptr(t);
        self.run(
            "fill_f32",
            over(n),
            &[Arg::P(p), Arg::F(value), Arg::L(n as i64)],
        );
    }

    /// `dst[:, dst_col0..+width] = src[:, src_col0..+width]`.
    pub(super) fn copy_cols(
        &self,
        src: &Tensor,
        src_col0: usize,
        dst: &Tensor,
        dst_col0: usize,
        width: usize,
    ) {
        let rows = src.rows();
        self.run(
            "copy_cols",
            over(rows * width),
            &[
                Arg::P(self.ptr(src)),
                Arg::I(src.cols() as i32),
                Arg::I(src_col0 as i32),
                Arg::P(self.ptr(dst)),
                Arg::I(dst.cols() as i32),
                Arg::I(dst_col0 as i32),
                Arg::I(width as i32),
                Arg::L(rows as i64),
            ],
        );
    }

    /// Device-to-device copy of `n` floats between raw pointers.
    pub(super) fn copy_raw(&self, dst: u64, src: u64, n: usize) {
        if n == 0 {
            return;
        }
        self.ctx
            .bind_to_thread()
            .unwrap_or_else(|e| panic!("CUDA context: {e}"));
        // SAFETY: both ranges lie inside live allocations of this context (callers' bounds).
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, n * 4, self.stream.cu_stream())
        }
        .unwrap_or_else(|e| panic!("CUDA copy failed: {e}"));
    }

    pub(super) fn copy_op(&self, t: &Tensor) -> Tensor {
        let out = self.out(t.shape());
        self.op("copy", cost::copy(t.numel()), || {
            self.copy_raw(self.ptr(&out), self.ptr(t), t.numel())
        });
        out
    }

    pub(super) fn add_assign_op(&self, dst: &mut Tensor, src: &Tensor) {
        let n = dst.numel();
        assert_eq!(
            n,
            src.numel(),
            "add_assign {:?} += {:?}",
            dst.shape(),
            src.shape()
        );
        self.op("add_assign", cost::elementwise(n, 1.0, 3.0), || {
            self.run(
                "add_assign_f32",
                over(n),
                &[
                    Arg::P(self.ptr(dst)),
                    Arg::P(self.ptr(src)),
                    Arg::L(n as i64),
                ],
            )
        });
    }

    pub(super) fn slice_cols_op(&self, src: &Tensor, cols: Range<usize>) -> Tensor {
        assert!(
            cols.end <= src.cols(),
            "slice_cols {cols:?} of {:?}",
            src.shape()
        );
        let out = self.out(&[src.rows(), cols.len()]);
        self.op("slice_cols", cost::copy(out.numel()), || {
            self.copy_cols(src, cols.start, &out, 0, cols.len())
        });
        out
    }

    pub(super) fn write_cols_op(&self, dst: &mut Tensor, col0: usize, src: &Tensor) {
        assert!(
            src.rows() == dst.rows() && col0 + src.cols() <= dst.cols(),
            "write_cols {:?} at {col0} into {:?}",
            src.shape(),
            dst.shape()
        );
        self.op("write_cols", cost::copy(src.numel()), || {
            self.copy_cols(src, 0, dst, col0, src.cols())
        });
    }

    pub(super) fn gather_rows_op(&self, src: &Tensor, index: &[u32]) -> Tensor {
        let c = src.cols();
        assert!(
            index.iter().all(|&i| (i as usize) < src.rows()),
            "gather_rows: an index beyond {} rows",
            src.rows()
        );
        let out = self.out(&[index.len(), c]);
        self.op("gather_rows", cost::copy(index.len() * c), || {
            if index.is_empty() || c == 0 {
                return;
            }
            let idx = self.upload_any(index);
            let (ip, _g) = idx.device_ptr(&self.stream);
            self.run(
                "gather_rows",
                over(index.len() * c),
                &[
                    Arg::P(self.ptr(src)),
                    Arg::P(ip),
                    Arg::P(self.ptr(&out)),
                    Arg::L(index.len() as i64),
                    Arg::I(c as i32),
                ],
            );
        });
        out
    }

    pub(super) fn concat_rows_op(&self, parts: &[&Tensor], cols: usize) -> Tensor {
        assert!(
            parts.iter().all(|p| p.cols() == cols),
            "concat_rows: parts of another width than {cols}"
        );
        let rows = parts.iter().map(|p| p.rows()).sum::<usize>();
        let out = self.out(&[rows, cols]);
        self.op("concat_rows", cost::copy(rows * cols), || {
            let base = self.ptr(&out);
            let mut at = 0usize;
            for p in parts {
                self.copy_raw(base + (at * 4) as u64, self.ptr(p), p.numel());
                at += p.numel();
            }
        });
        out
    }

    pub(super) fn split_rows_op(&self, t: &Tensor, rows: &[usize]) -> Vec<Tensor> {
        assert_eq!(rows.iter().sum::<usize>(), t.rows(), "split_rows {rows:?}");
        let c = t.cols();
        self.op("split_rows", cost::copy(t.numel()), || {
            let base = self.ptr(t);
            let mut at = 0usize;
            rows.iter()
                .map(|&r| {
                    let out = self.out(&[r, c]);
                    self.copy_raw(self.ptr(&out), base + (at * 4) as u64, r * c);
                    at += r * c;
                    out
                })
                .collect()
        })
    }

    pub(super) fn scatter_add_rows_op(&self, dst: &mut Tensor, src: &Tensor, index: &[u32]) {
        let c = dst.cols();
        assert!(
            src.cols() == c
                && src.rows() == index.len()
                && index.iter().all(|&i| (i as usize) < dst.rows()),
            "scatter_add_rows {:?} -> {:?}",
            src.shape(),
            dst.shape()
        );
        self.op(
            "scatter_add_rows",
            cost::elementwise(src.numel(), 1.0, 3.0),
            || {
                if index.is_empty() || c == 0 {
                    return;
                }
                let (dsts, offs, srcs) = sorted_scatter(index);
                let (d, o, s) = (
                    self.upload_any(&dsts),
                    self.upload_any(&offs),
                    self.upload_any(&srcs),
                );
                let (dp, _g1) = d.device_ptr(&self.stream);
                let (op, _g2) = o.device_ptr(&self.stream);
                let (sp, _g3) = s.device_ptr(&self.stream);
                self.run(
                    "scatter_add_sorted",
                    over(dsts.len() * c),
                    &[
                        Arg::P(self.ptr(dst)),
                        Arg::P(self.ptr(src)),
                        Arg::P(dp),
                        Arg::P(op),
                        Arg::P(sp),
                        Arg::I(dsts.len() as i32),
                        Arg::I(c as i32),
                    ],
                );
            },
        );
    }

    pub(super) fn scale_rows_op(&self, x: &mut Tensor, s: &Tensor) {
        assert_eq!(
            s.numel(),
            x.rows(),
            "scale_rows {:?} by {:?}",
            x.shape(),
            s.shape()
        );
        let n = x.numel();
        self.op("scale_rows", cost::elementwise(n, 1.0, 2.0), || {
            self.run(
                "scale_rows",
                over(n),
                &[
                    Arg::P(self.ptr(x)),
                    Arg::P(self.ptr(s)),
                    Arg::L(x.rows() as i64),
                    Arg::I(x.cols() as i32),
                ],
            )
        });
    }

    pub(super) fn rows_dot_op(&self, a: &Tensor, b: &Tensor) -> Tensor {
        assert_eq!(a.shape(), b.shape(), "rows_dot");
        let out = self.out(&[a.rows(), 1]);
        self.op("rows_dot", cost::elementwise(a.numel(), 2.0, 2.0), || {
            self.run(
                "rows_dot",
                over(a.rows() * 32),
                &[
                    Arg::P(self.ptr(a)),
                    Arg::P(self.ptr(b)),
                    Arg::P(self.ptr(&out)),
                    Arg::L(a.rows() as i64),
                    Arg::I(a.cols() as i32),
                ],
            )
        });
        out
    }

    /// [`Device::combine_rows`] in one pass: each destination row sums its source rows (sorted
    /// by destination on the host, as the scatter's), scaled on the way, and is written once.
    ///
    /// [`Device::combine_rows`]: crate::device::Device::combine_rows
    pub(super) fn combine_rows_op(
        &self,
        src: &Tensor,
        s: Option<&Tensor>,
        index: &[u32],
        rows: usize,
    ) -> Tensor {
        let c = src.cols();
        assert!(
            src.rows() == index.len()
                && index.iter().all(|&i| (i as usize) < rows)
                && s.is_none_or(|s| s.numel() == src.rows()),
            "combine_rows {:?} into {rows} rows",
            src.shape()
        );
        let out = self.out(&[rows, c]);
        let reads = if s.is_some() { 2.0 } else { 1.0 };
        self.op(
            "combine_rows",
            cost::Work {
                flops: (src.numel() as f64) * reads,
                bytes: 4.0 * (src.numel() as f64 + (rows * c) as f64),
                gemm: false,
            },
            || {
                if rows == 0 || c == 0 {
                    return;
                }
                let plan = crate::layers::moe::plan_dispatch(index, rows, 1);
                let offs: Vec<i32> = plan.offsets.iter().map(|&o| o as i32).collect();
                let srcs: Vec<i32> = plan.token_of_row.iter().map(|&r| r as i32).collect();
                let (o, r) = (self.upload_any(&offs), self.upload_any(&srcs));
                let (op, _g1) = o.device_ptr(&self.stream);
                let (rp, _g2) = r.device_ptr(&self.stream);
                self.run(
                    "combine_rows",
                    over(rows * c),
                    &[
                        Arg::P(self.ptr(src)),
                        Arg::P(s.map_or(0, |s| self.ptr(s))),
                        Arg::P(op),
                        Arg::P(rp),
                        Arg::P(self.ptr(&out)),
                        Arg::L(rows as i64),
                        Arg::I(c as i32),
                    ],
                );
            },
        );
        out
    }

    /// [`Device::combine_rows_backward`] in one pass over `src`'s rows (a warp each).
    ///
    /// [`Device::combine_rows_backward`]: crate::device::Device::combine_rows_backward
    pub(super) fn combine_rows_backward_op(
        &self,
        dy: &Tensor,
        src: &Tensor,
        s: &Tensor,
        index: &[u32],
    ) -> (Tensor, Tensor) {
        let (n, c) = (src.rows(), src.cols());
        assert!(
            dy.cols() == c
                && index.len() == n
                && s.numel() == n
                && index.iter().all(|&i| (i as usize) < dy.rows()),
            "combine_rows_backward: dy {:?}, src {:?}, {} indices",
            dy.shape(),
            src.shape(),
            index.len()
        );
        let (d_src, d_s) = (self.out(&[n, c]), self.out(&[n, 1]));
        self.op(
            "combine_rows_backward",
            cost::Work {
                flops: 3.0 * (n * c) as f64,
                bytes: 4.0 * 3.0 * (n * c) as f64,
                gemm: false,
            },
            || {
                if n == 0 {
                    return;
                }
                let idx = self.upload_any(index);
                let (ip, _g) = idx.device_ptr(&self.stream);
                self.run(
                    "combine_rows_bwd",
                    over(n * 32),
                    &[
                        Arg::P(self.ptr(dy)),
                        Arg::P(self.ptr(src)),
                        Arg::P(self.ptr(s)),
                        Arg::P(ip),
                        Arg::P(self.ptr(&d_src)),
                        Arg::P(self.ptr(&d_s)),
                        Arg::L(n as i64),
                        Arg::I(c as i32),
                    ],
                );
            },
        );
        (d_src, d_s)
    }
}

/// The host rows of a scatter sorted by destination (stable): `(destinations, offsets, sources)`
/// for the `scatter_add_sorted` kernel, so that each row sums its sources in the CPU's order.
fn sorted_scatter(index: &[u32]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    // The experts' stable counting sort, with each destination row as an "expert" of one slot
    // per source row.
    let rows = index.iter().max().map_or(0, |&m| m as usize + 1);
    let plan = crate::layers::moe::plan_dispatch(index, rows, 1);
    let (mut dsts, mut offs) = (Vec::new(), Vec::new());
    for r in 0..rows {
        if !plan.rows(r).is_empty() {
            dsts.push(r as i32);
            offs.push(plan.offsets[r] as i32);
        }
    }
    offs.push(index.len() as i32);
    let srcs = plan.token_of_row.iter().map(|&s| s as i32).collect();
    (dsts, offs, srcs)
}

#[cfg(test)]
mod tests {
    use super::sorted_scatter;

    #[test]
    fn a_sorted_scatter_keeps_each_rows_sources_in_order() {
        let (d, o, s) = sorted_scatter(&[2, 0, 2, 1, 0]);
        assert_eq!(d, vec![0, 1, 2]);
        assert_eq!(o, vec![0, 2, 3, 5]);
        assert_eq!(s, vec![1, 4, 3, 0, 2]);
        let (d, o, s) = sorted_scatter(&[]);
        assert!(d.is_empty() && s.is_empty());
        assert_eq!(o, vec![0]);
    }
}

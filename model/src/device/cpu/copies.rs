//! The CPU device's copies, gathers, scatter-adds and row-wise operations (the bodies behind
//! its `Device` methods of the same names).

use std::ops::Range;

use super::super::cost;
use super::CpuDevice;
use crate::tensor::Tensor;

impl CpuDevice {
    pub(super) fn add_assign_op(&self, dst: &mut Tensor, src: &Tensor) {
        assert_eq!(
            dst.numel(),
            src.numel(),
            "add_assign {:?} += {:?}",
            dst.shape(),
            src.shape()
        );
        self.timed(
            "add_assign",
            cost::elementwise(dst.numel(), 1.0, 3.0),
            || {
                let add = |d: &mut [f32], s: &[f32]| {
                    for (d, s) in d.iter_mut().zip(s) {
                        *d += s;
                    }
                };
                let (d, s) = (dst.hm(), src.h());
                if self.split_worth(d.len()) {
                    let (d0, d1) = d.split_at_mut(d.len() / 2);
                    let (s0, s1) = s.split_at(d0.len());
                    self.split2(|| add(d0, s0), || add(d1, s1));
                } else {
                    add(d, s);
                }
            },
        )
    }

    pub(super) fn slice_cols_op(&self, src: &Tensor, cols: Range<usize>) -> Tensor {
        let (r, c, w) = (src.rows(), src.cols(), cols.len());
        assert!(cols.end <= c, "slice_cols {cols:?} of {:?}", src.shape());
        self.timed("slice_cols", cost::copy(r * w), || {
            let mut out = self.out(&[r, w]);
            for (o, row) in out
                .hm()
                .chunks_exact_mut(w.max(1))
                .zip(src.h().chunks_exact(c))
            {
                o.copy_from_slice(&row[cols.clone()]);
            }
            out
        })
    }

    pub(super) fn write_cols_op(&self, dst: &mut Tensor, col0: usize, src: &Tensor) {
        let (c, w) = (dst.cols(), src.cols());
        assert!(
            dst.rows() == src.rows() && col0 + w <= c,
            "write_cols {:?} at {col0} into {:?}",
            src.shape(),
            dst.shape()
        );
        self.timed("write_cols", cost::copy(src.numel()), || {
            for (d, s) in dst.hm().chunks_exact_mut(c).zip(src.h().chunks_exact(w)) {
                d[col0..col0 + w].copy_from_slice(s);
            }
        })
    }

    pub(super) fn gather_rows_op(&self, src: &Tensor, index: &[u32]) -> Tensor {
        let c = src.cols();
        self.timed("gather_rows", cost::copy(index.len() * c), || {
            let s = src.h();
            let mut out = self.out(&[index.len(), c]);
            for (o, &i) in out.hm().chunks_exact_mut(c.max(1)).zip(index) {
                o.copy_from_slice(&s[i as usize * c..(i as usize + 1) * c]);
            }
            out
        })
    }

    pub(super) fn concat_rows_op(&self, parts: &[&Tensor], cols: usize) -> Tensor {
        assert!(
            parts.iter().all(|p| p.cols() == cols),
            "concat_rows: parts of another width than {cols}"
        );
        let rows = parts.iter().map(|p| p.rows()).sum::<usize>();
        self.timed("concat_rows", cost::copy(rows * cols), || {
            let mut out = self.out(&[rows, cols]);
            let mut at = 0;
            let o = out.hm();
            for p in parts {
                let v = p.h();
                o[at..at + v.len()].copy_from_slice(v);
                at += v.len();
            }
            out
        })
    }

    pub(super) fn split_rows_op(&self, t: &Tensor, rows: &[usize]) -> Vec<Tensor> {
        assert_eq!(rows.iter().sum::<usize>(), t.rows(), "split_rows {rows:?}");
        let c = t.cols();
        self.timed("split_rows", cost::copy(t.numel()), || {
            let src = t.h();
            let mut at = 0;
            rows.iter()
                .map(|&r| {
                    let mut out = self.out(&[r, c]);
                    out.hm().copy_from_slice(&src[at..at + r * c]);
                    at += r * c;
                    out
                })
                .collect()
        })
    }

    pub(super) fn scatter_add_rows_op(&self, dst: &mut Tensor, src: &Tensor, index: &[u32]) {
        let c = dst.cols();
        assert!(
            src.cols() == c && src.rows() == index.len(),
            "scatter_add_rows {:?} -> {:?}",
            src.shape(),
            dst.shape()
        );
        self.timed(
            "scatter_add_rows",
            cost::elementwise(src.numel(), 1.0, 3.0),
            || {
                let d = dst.hm();
                for (row, &i) in src.h().chunks_exact(c).zip(index) {
                    for (dv, sv) in d[i as usize * c..(i as usize + 1) * c].iter_mut().zip(row) {
                        *dv += sv;
                    }
                }
            },
        )
    }

    pub(super) fn scale_rows_op(&self, x: &mut Tensor, s: &Tensor) {
        let c = x.cols();
        assert_eq!(
            s.numel(),
            x.rows(),
            "scale_rows {:?} by {:?}",
            x.shape(),
            s.shape()
        );
        self.timed("scale_rows", cost::elementwise(x.numel(), 1.0, 2.0), || {
            for (row, sv) in x.hm().chunks_exact_mut(c).zip(s.h()) {
                row.iter_mut().for_each(|v| *v *= sv);
            }
        })
    }

    pub(super) fn rows_dot_op(&self, a: &Tensor, b: &Tensor) -> Tensor {
        let c = a.cols();
        assert_eq!(a.shape(), b.shape(), "rows_dot");
        self.timed("rows_dot", cost::elementwise(a.numel(), 2.0, 2.0), || {
            let mut out = self.out(&[a.rows(), 1]);
            for ((o, x), y) in out
                .hm()
                .iter_mut()
                .zip(a.h().chunks_exact(c))
                .zip(b.h().chunks_exact(c))
            {
                *o = x.iter().zip(y).map(|(p, q)| p * q).sum();
            }
            out
        })
    }
}

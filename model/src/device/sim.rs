//! The simulated device: tensors carry shapes only, no arithmetic happens, and every operation's
//! cost is computed from a [`SimProfile`] (roofline: `launch + max(flops / rate, bytes / bandwidth)`).
//!
//! Data-dependent results are synthesised: the router assigns token `t`'s `j`-th choice to expert
//! `(t·k + j) mod E` (perfectly balanced, distinct experts per token), and losses are 0.

use std::ops::Range;
use std::sync::Mutex;

use super::cost::{self, Work};
use super::{AdamWArgs, AttnShape, Cost, Device, Mat, MatMut, RopeSpec, RouterOut, RouterSpec};
use crate::tensor::Tensor;

/// Speeds of the simulated accelerator.
#[derive(Clone, Debug, PartialEq)]
pub struct SimProfile {
    /// FLOP/s of matrix products.
    pub gemm_flops_per_s: f64,
    /// FLOP/s of element-wise kernels.
    pub vector_flops_per_s: f64,
    /// Device memory bandwidth, bytes/s.
    pub bytes_per_s: f64,
    /// Fixed overhead of each operation (kernel launch), seconds.
    pub launch_s: f64,
}

impl SimProfile {
    /// Roughly an NVIDIA H200 in bf16 with a realistic efficiency (dense GEMM ~600 TFLOP/s achieved,
    /// 60 TFLOP/s vector, 4.0 TB/s achieved HBM bandwidth, 4 µs per launch).
    pub fn h200() -> SimProfile {
        SimProfile {
            gemm_flops_per_s: 600e12,
            vector_flops_per_s: 60e12,
            bytes_per_s: 4.0e12,
            launch_s: 4e-6,
        }
    }
}

/// A device that only models cost.
pub struct SimDevice {
    profile: SimProfile,
    cost: Mutex<Cost>,
}

impl std::fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimDevice {{ {:?} }}", self.profile)
    }
}

impl SimDevice {
    pub fn new(profile: SimProfile) -> SimDevice {
        SimDevice {
            profile,
            cost: Mutex::new(Cost::default()),
        }
    }

    pub fn profile(&self) -> &SimProfile {
        &self.profile
    }

    fn charge(&self, w: Work) {
        let p = &self.profile;
        let rate = if w.gemm {
            p.gemm_flops_per_s
        } else {
            p.vector_flops_per_s
        };
        let secs = p.launch_s + (w.flops / rate).max(w.bytes / p.bytes_per_s);
        let mut c = self.cost.lock().unwrap_or_else(|e| e.into_inner());
        c.add(&Cost {
            flops: w.flops,
            bytes: w.bytes,
            seconds: secs,
            gemm_flops: if w.gemm { w.flops } else { 0.0 },
            gemm_seconds: if w.gemm { secs } else { 0.0 },
            ops: 1,
        });
    }
}

fn so(shape: &[usize]) -> Tensor {
    Tensor::shape_only(shape)
}

impl Device for SimDevice {
    fn name(&self) -> String {
        "sim".to_string()
    }

    fn take_cost(&self) -> Cost {
        std::mem::take(&mut *self.cost.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn zeros(&self, shape: &[usize]) -> Tensor {
        so(shape)
    }

    fn empty(&self, shape: &[usize]) -> Tensor {
        so(shape)
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "upload {shape:?}"
        );
        self.charge(cost::copy(data.len()));
        so(shape)
    }

    fn normal(&self, shape: &[usize], _rng: &mut crate::rng::Rng, _std: f64) -> Tensor {
        so(shape)
    }

    fn download(&self, _t: &Tensor) -> Option<Vec<f32>> {
        None
    }

    fn copy(&self, t: &Tensor) -> Tensor {
        self.charge(cost::copy(t.numel()));
        so(t.shape())
    }

    fn gemm(&self, c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
        let (m, k) = a.dims();
        let (k2, n) = b.dims();
        assert_eq!(
            k,
            k2,
            "gemm: inner dimensions {:?} vs {:?}",
            a.dims(),
            b.dims()
        );
        assert_eq!((c.rows.len(), c.t.cols()), (m, n), "gemm: output shape");
        self.charge(cost::gemm(m, n, k, accumulate));
    }

    fn add_assign(&self, dst: &mut Tensor, src: &Tensor) {
        assert_eq!(dst.numel(), src.numel(), "add_assign");
        self.charge(cost::elementwise(dst.numel(), 1.0, 3.0));
    }

    fn slice_cols(&self, src: &Tensor, cols: Range<usize>) -> Tensor {
        assert!(cols.end <= src.cols(), "slice_cols");
        self.charge(cost::copy(src.rows() * cols.len()));
        so(&[src.rows(), cols.len()])
    }

    fn write_cols(&self, dst: &mut Tensor, col0: usize, src: &Tensor) {
        assert!(
            dst.rows() == src.rows() && col0 + src.cols() <= dst.cols(),
            "write_cols"
        );
        self.charge(cost::copy(src.numel()));
    }

    fn gather_rows(&self, src: &Tensor, index: &[u32]) -> Tensor {
        self.charge(cost::copy(index.len() * src.cols()));
        so(&[index.len(), src.cols()])
    }

    fn concat_rows(&self, parts: &[&Tensor], cols: usize) -> Tensor {
        assert!(parts.iter().all(|p| p.cols() == cols), "concat_rows");
        let rows = parts.iter().map(|p| p.rows()).sum::<usize>();
        self.charge(cost::copy(rows * cols));
        so(&[rows, cols])
    }

    fn split_rows(&self, t: &Tensor, rows: &[usize]) -> Vec<Tensor> {
        assert_eq!(rows.iter().sum::<usize>(), t.rows(), "split_rows");
        self.charge(cost::copy(t.numel()));
        rows.iter().map(|&r| so(&[r, t.cols()])).collect()
    }

    fn scatter_add_rows(&self, dst: &mut Tensor, src: &Tensor, index: &[u32]) {
        assert!(
            src.cols() == dst.cols() && src.rows() == index.len(),
            "scatter_add_rows"
        );
        self.charge(cost::elementwise(src.numel(), 1.0, 3.0));
    }

    fn scale_rows(&self, x: &mut Tensor, s: &Tensor) {
        assert_eq!(s.numel(), x.rows(), "scale_rows");
        self.charge(cost::elementwise(x.numel(), 1.0, 2.0));
    }

    fn rows_dot(&self, a: &Tensor, b: &Tensor) -> Tensor {
        assert_eq!(a.shape(), b.shape(), "rows_dot");
        self.charge(cost::elementwise(a.numel(), 2.0, 2.0));
        so(&[a.rows(), 1])
    }

    fn embedding_forward(&self, table: &Tensor, ids: &[u32]) -> Tensor {
        self.gather_rows(table, ids)
    }

    fn embedding_backward(&self, ids: &[u32], dy: &Tensor, dtable: &mut Tensor) {
        self.scatter_add_rows(dtable, dy, ids)
    }

    fn rmsnorm_forward(&self, x: &Tensor, w: &Tensor, _eps: f32) -> (Tensor, Tensor) {
        assert_eq!(x.cols(), w.numel(), "rmsnorm");
        self.charge(cost::elementwise(x.numel(), 4.0, 2.0));
        (so(x.shape()), so(&[x.rows(), 1]))
    }

    fn rmsnorm_backward_input(
        &self,
        x: &Tensor,
        _w: &Tensor,
        _rstd: &Tensor,
        _dy: &Tensor,
    ) -> Tensor {
        self.charge(cost::elementwise(x.numel(), 8.0, 3.0));
        so(x.shape())
    }

    fn rmsnorm_backward_weight(&self, x: &Tensor, _rstd: &Tensor, _dy: &Tensor, _dw: &mut Tensor) {
        self.charge(cost::elementwise(x.numel(), 3.0, 2.0));
    }

    fn swiglu_forward(&self, gate: &Tensor, up: &Tensor) -> Tensor {
        assert_eq!(gate.shape(), up.shape(), "swiglu");
        self.charge(cost::elementwise(gate.numel(), 6.0, 3.0));
        so(gate.shape())
    }

    fn swiglu_backward(&self, gate: &Tensor, _up: &Tensor, _dh: &Tensor) -> (Tensor, Tensor) {
        self.charge(cost::elementwise(gate.numel(), 10.0, 5.0));
        (so(gate.shape()), so(gate.shape()))
    }

    fn rope(&self, x: &mut Tensor, _table: &Tensor, spec: RopeSpec, _inverse: bool) {
        self.charge(cost::elementwise(
            x.rows() * spec.heads * spec.dim,
            3.0,
            2.0,
        ));
    }

    fn attention_forward(
        &self,
        _q: &Tensor,
        _kv: &Tensor,
        _k_pe: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor) {
        self.charge(cost::attention_forward(&s));
        (
            so(&[s.batch * s.seq, s.heads * s.v]),
            so(&[s.batch, s.heads, s.seq, s.seq]),
        )
    }

    fn attention_backward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        _out: &Tensor,
        _p: &Tensor,
        _dout: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor, Tensor) {
        self.charge(cost::attention_backward(&s));
        (so(q.shape()), so(kv.shape()), so(k_pe.shape()))
    }

    fn router_forward(&self, logits: &Tensor, _bias: &Tensor, spec: RouterSpec) -> RouterOut {
        let n = logits.rows();
        self.charge(cost::elementwise(
            logits.numel(),
            8.0 + spec.top_k as f64,
            2.0,
        ));
        let k = spec.top_k;
        let topk = (0..n * k).map(|i| (i % spec.n_experts) as u32).collect();
        RouterOut {
            scores: so(logits.shape()),
            topk,
            weights: so(&[n * k, 1]),
        }
    }

    fn router_backward(
        &self,
        scores: &Tensor,
        _topk: &[u32],
        _dw: &Tensor,
        _spec: RouterSpec,
    ) -> Tensor {
        self.charge(cost::elementwise(scores.numel(), 2.0, 2.0));
        so(scores.shape())
    }

    fn balance_loss(
        &self,
        scores: &Tensor,
        _topk: &[u32],
        _spec: RouterSpec,
        _seq: usize,
        _alpha: f32,
    ) -> (f32, Tensor) {
        self.charge(cost::elementwise(scores.numel(), 10.0, 3.0));
        (0.0, so(scores.shape()))
    }

    fn cross_entropy(&self, logits: &Tensor, targets: &[i64], _grad_scale: f32) -> (f32, Tensor) {
        assert_eq!(logits.rows(), targets.len(), "cross_entropy");
        self.charge(cost::elementwise(logits.numel(), 5.0, 2.0));
        (0.0, so(logits.shape()))
    }

    fn fill(&self, t: &mut Tensor, _value: f32) {
        self.charge(cost::elementwise(t.numel(), 0.0, 1.0));
    }

    fn scale(&self, t: &mut Tensor, _s: f32) {
        self.charge(cost::elementwise(t.numel(), 1.0, 2.0));
    }

    fn sum_squares(&self, ts: &[&Tensor]) -> f64 {
        let n = ts.iter().map(|t| t.numel()).sum();
        self.charge(cost::elementwise(n, 2.0, 1.0));
        0.0
    }

    fn adamw(&self, params: &mut [AdamWArgs<'_>]) {
        let n = params.iter().map(|p| p.grad.numel()).sum();
        self.charge(cost::elementwise(n, 12.0, 7.0));
    }

    fn pack(&self, ts: &[&Tensor], _scale: f32) -> Tensor {
        let n = ts.iter().map(|t| t.numel()).sum();
        self.charge(cost::elementwise(n, 1.0, 2.0));
        so(&[n])
    }

    fn unpack(&self, flat: &Tensor, ts: &mut [&mut Tensor]) {
        let n: usize = ts.iter().map(|t| t.numel()).sum();
        assert_eq!(n, flat.numel(), "unpack");
        self.charge(cost::copy(n));
    }

    fn write(&self, t: &mut Tensor, data: &[f32]) {
        assert_eq!(t.numel(), data.len(), "write");
        self.charge(cost::copy(data.len()));
    }

    fn take_values(&self, _t: Tensor) -> Option<Vec<f32>> {
        None
    }

    fn adopt(&self, shape: &[usize], _values: Option<Vec<f32>>) -> Tensor {
        so(shape)
    }
}

//! The Device seam: every tensor operation the layers need, each reporting what it cost.
//!
//! Layer code is written once against `&dyn Device` and runs unchanged on
//! - [`cpu::CpuDevice`]: f32 on the host, multithreaded GEMM, wall-clock measured per op;
//! - [`sim::SimDevice`]: shapes only, no arithmetic, cost computed from a [`sim::SimProfile`];
//! - [`cuda::CudaDevice`] (feature `cuda`): tensors in GPU memory, cuBLAS GEMM and NVRTC-compiled
//!   kernels, cost from CUDA events.
//!
//! The operations are kernels, not a tensor algebra (the llm.c / candle-backend style): GEMM on
//! row ranges of 2-D views, and fused forward/backward kernels for RMSNorm, SwiGLU, RoPE, MLA
//! attention, the router, the balance loss and cross-entropy, plus the row gather/scatter that
//! expert dispatch and combine need. Data-dependent control (routing indices, losses) comes back to
//! the host as plain values; the simulator synthesises balanced routing and reports zero losses.
//!
//! Every operation adds its [`Cost`] to the device's running total; the caller (the actor that ran
//! a step) drains it with [`Device::take_cost`] and advances its clock by `seconds`.
//! Shape mismatches and tensors from another device are programming errors and panic.

pub mod attention;
pub mod cost;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemm;
pub mod kernels;
pub mod pool;
pub mod sim;
pub mod vmath;

use std::fmt;
use std::ops::Range;

pub use crate::tensor::Tensor;

/// What a run of device operations cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// Floating-point operations performed (or modelled).
    pub flops: f64,
    /// Bytes read and written in device memory (modelled from the operands' sizes).
    pub bytes: f64,
    /// Seconds the operations took: measured on real devices, computed on the simulator.
    pub seconds: f64,
    /// The part of `flops` done by GEMMs (matrix products, including attention's).
    pub gemm_flops: f64,
    /// The part of `seconds` spent in GEMMs.
    pub gemm_seconds: f64,
    /// Number of operations (kernel launches).
    pub ops: u64,
}

impl Cost {
    /// Adds another cost to this one.
    pub fn add(&mut self, o: &Cost) {
        self.flops += o.flops;
        self.bytes += o.bytes;
        self.seconds += o.seconds;
        self.gemm_flops += o.gemm_flops;
        self.gemm_seconds += o.gemm_seconds;
        self.ops += o.ops;
    }
}

/// A read-only 2-D view of rows `rows` of a tensor (seen as `rows() x cols()`), optionally transposed.
#[derive(Clone)]
pub struct Mat<'a> {
    pub t: &'a Tensor,
    pub rows: Range<usize>,
    pub trans: bool,
}

impl<'a> Mat<'a> {
    /// The whole tensor as a matrix.
    pub fn all(t: &'a Tensor) -> Mat<'a> {
        Mat {
            t,
            rows: 0..t.rows(),
            trans: false,
        }
    }
    /// Rows `r` of the tensor.
    pub fn rows(t: &'a Tensor, r: Range<usize>) -> Mat<'a> {
        Mat {
            t,
            rows: r,
            trans: false,
        }
    }
    /// The transpose of this view.
    pub fn t(mut self) -> Mat<'a> {
        self.trans = !self.trans;
        self
    }
    /// (rows, cols) of the view after the optional transpose.
    pub fn dims(&self) -> (usize, usize) {
        let (r, c) = (self.rows.len(), self.t.cols());
        if self.trans { (c, r) } else { (r, c) }
    }
}

/// A mutable 2-D view of rows `rows` of a tensor.
pub struct MatMut<'a> {
    pub t: &'a mut Tensor,
    pub rows: Range<usize>,
}

impl<'a> MatMut<'a> {
    /// The whole tensor as a matrix.
    pub fn all(t: &'a mut Tensor) -> MatMut<'a> {
        let rows = 0..t.rows();
        MatMut { t, rows }
    }
    /// Rows `r` of the tensor.
    pub fn rows(t: &'a mut Tensor, r: Range<usize>) -> MatMut<'a> {
        MatMut { t, rows: r }
    }
}

/// Where the rotary part sits inside each row, for [`Device::rope`].
#[derive(Clone, Copy, Debug)]
pub struct RopeSpec {
    /// Sequence length: row `r` has position `r % seq_len`.
    pub seq_len: usize,
    /// Number of rotary slots per row (heads).
    pub heads: usize,
    /// Columns between consecutive heads.
    pub head_stride: usize,
    /// Column of the first rotary channel inside a head.
    pub offset: usize,
    /// Rotary channels per head (even).
    pub dim: usize,
    /// HF `rope_interleave`: de-interleave adjacent pairs before rotating (output stays de-interleaved).
    pub interleave: bool,
}

/// Dimensions of MLA attention, for [`Device::attention_forward`] / [`Device::attention_backward`].
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    /// Softmax scale (HF `self.scaling`).
    pub scale: f32,
}

/// The router's hyper-parameters, for [`Device::router_forward`] / [`Device::router_backward`].
#[derive(Clone, Copy, Debug)]
pub struct RouterSpec {
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub scaling: f32,
}

/// What the router kernel returns.
#[derive(Debug)]
pub struct RouterOut {
    /// `sigmoid(logits)`, `[n, n_experts]`.
    pub scores: Tensor,
    /// Chosen experts, `n * top_k` values in host memory (token-major).
    pub topk: Vec<u32>,
    /// Combine weights of the chosen experts, `[n * top_k, 1]` (same order as `topk`).
    pub weights: Tensor,
}

/// A compute device. Object-safe: layers take `&dyn Device`.
pub trait Device: Send + Sync + fmt::Debug {
    /// A short name ("cpu", "sim", "cuda:0").
    fn name(&self) -> String;

    /// Drains the cost accumulated since the last call.
    fn take_cost(&self) -> Cost;

    /// Runs two independent pieces of work that issue operations on this device (e.g. the W
    /// passes of different layers): concurrently where the device can (the CPU device on its
    /// threads), else `a` then `b`. Each must leave the other's outputs alone; the cost
    /// accumulated meanwhile counts the wall-clock time of the pair, not the sum.
    fn join(&self, a: &mut (dyn FnMut() + Send), b: &mut (dyn FnMut() + Send)) {
        a();
        b();
    }

    /// Runs `f` (which issues operations on this device) on the device's own host threads, where
    /// it has some, so that the [`Device::join`]s inside are cheap; else on the calling thread.
    fn on_device_threads(&self, f: &mut (dyn FnMut() + Send)) {
        f();
    }

    // ---- memory -------------------------------------------------------------------------------

    /// A tensor of zeros.
    fn zeros(&self, shape: &[usize]) -> Tensor;
    /// A tensor whose contents are unspecified: the caller overwrites every element (e.g. a GEMM
    /// output). On the CPU a recycled buffer; on CUDA an allocation without a memset.
    fn empty(&self, shape: &[usize]) -> Tensor;
    /// A tensor holding host values `data` (the simulator keeps only the shape).
    fn upload(&self, shape: &[usize], data: &[f32]) -> Tensor;
    /// A tensor of values drawn from N(0, std²) by `rng` (parameter initialisation); a device
    /// without values keeps the shape and draws nothing.
    fn normal(&self, shape: &[usize], rng: &mut crate::rng::Rng, std: f64) -> Tensor {
        self.upload(shape, &rng.normal_vec(shape.iter().product(), std))
    }
    /// The values of a tensor in host memory; `None` on a device that holds no values.
    fn download(&self, t: &Tensor) -> Option<Vec<f32>>;

    /// A copy of `t` on this device.
    fn copy(&self, t: &Tensor) -> Tensor;

    // ---- GEMM ---------------------------------------------------------------------------------

    /// `c = a · b` (or `c += a · b` when `accumulate`), on 2-D views with optional transposes.
    fn gemm(&self, c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool);

    /// [`Device::gemm`] kept in f32 whatever the device's precision: the router's gate, whose
    /// rounding would flip which experts a token goes to (as the DeepSeek-V3 report keeps it).
    fn gemm_full_precision(&self, c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
        self.gemm(c, a, b, accumulate)
    }

    /// The experts' GEMMs on their row blocks: for each group `i`,
    /// `c[rows[i]] (+)= a[rows[i]] · op(ws[i])`, `op` the transpose when `trans_w`. The row
    /// ranges are disjoint. One GEMM per group unless the device has a grouped GEMM.
    fn gemm_rows_grouped(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        ws: &[&Tensor],
        rows: &[Range<usize>],
        trans_w: bool,
        accumulate: bool,
    ) {
        gemm_rows_each(self, c, a, ws, rows, trans_w, accumulate)
    }

    /// The experts' weight gradients: for each group `i` with rows,
    /// `gs[i] += dy[rows[i]]ᵀ · x[rows[i]]`. One GEMM per group unless the device has a grouped
    /// GEMM.
    fn gemm_weight_grouped(
        &self,
        gs: &mut [&mut Tensor],
        dy: &Tensor,
        x: &Tensor,
        rows: &[Range<usize>],
    ) {
        gemm_weight_each(self, gs, dy, x, rows)
    }

    // ---- element-wise and copies --------------------------------------------------------------

    /// `dst += src` (same number of elements).
    fn add_assign(&self, dst: &mut Tensor, src: &Tensor);
    /// Columns `cols` of every row, as a new `[rows, cols.len()]` tensor.
    fn slice_cols(&self, src: &Tensor, cols: Range<usize>) -> Tensor;
    /// `dst[:, col0 .. col0 + src.cols()] = src`.
    fn write_cols(&self, dst: &mut Tensor, col0: usize, src: &Tensor);
    /// `out[r] = src[index[r]]`: a `[index.len(), src.cols()]` tensor.
    fn gather_rows(&self, src: &Tensor, index: &[u32]) -> Tensor;
    /// The rows of `parts` one after the other (all with the same number of columns, `cols`,
    /// which is also the width of the result when `parts` is empty).
    fn concat_rows(&self, parts: &[&Tensor], cols: usize) -> Tensor;
    /// `t` cut into consecutive row blocks of `rows[i]` rows each (the sizes sum to `t.rows()`).
    fn split_rows(&self, t: &Tensor, rows: &[usize]) -> Vec<Tensor>;
    /// `dst[index[r]] += src[r]` for every row `r` of `src`.
    fn scatter_add_rows(&self, dst: &mut Tensor, src: &Tensor, index: &[u32]);
    /// `x[r] *= s[r]` with `s` of shape `[x.rows(), 1]`.
    fn scale_rows(&self, x: &mut Tensor, s: &Tensor);
    /// `out[r] = dot(a[r], b[r])`, shape `[a.rows(), 1]`.
    fn rows_dot(&self, a: &Tensor, b: &Tensor) -> Tensor;
    /// The experts' combine: `y[t] = Σ_{r: index[r] = t} s[r] · src[r]` over `rows` rows (zero
    /// where no row points), each `t` summing its rows in index order; `s` is `[src.rows(), 1]`,
    /// or `None` for a plain sum (the dispatch's backward). The default composes the row
    /// operations above; a device may fuse them into one pass.
    fn combine_rows(&self, src: &Tensor, s: Option<&Tensor>, index: &[u32], rows: usize) -> Tensor {
        let mut y = self.zeros(&[rows, src.cols()]);
        match s {
            Some(s) => {
                let mut weighted = self.copy(src);
                self.scale_rows(&mut weighted, s);
                self.scatter_add_rows(&mut y, &weighted, index);
            }
            None => self.scatter_add_rows(&mut y, src, index),
        }
        y
    }
    /// [`Device::combine_rows`]' backward for `y`'s gradient `dy`: `(d_src, d_s)` with
    /// `d_src[r] = s[r] · dy[index[r]]` and `d_s[r] = dot(dy[index[r]], src[r])`.
    fn combine_rows_backward(
        &self,
        dy: &Tensor,
        src: &Tensor,
        s: &Tensor,
        index: &[u32],
    ) -> (Tensor, Tensor) {
        let mut d_src = self.gather_rows(dy, index);
        let d_s = self.rows_dot(&d_src, src);
        self.scale_rows(&mut d_src, s);
        (d_src, d_s)
    }

    // ---- layer kernels ------------------------------------------------------------------------

    /// `table[ids[r]]` for each id: `[ids.len(), table.cols()]`.
    fn embedding_forward(&self, table: &Tensor, ids: &[u32]) -> Tensor;
    /// `dtable[ids[r]] += dy[r]`.
    fn embedding_backward(&self, ids: &[u32], dy: &Tensor, dtable: &mut Tensor);
    /// RMSNorm over the last dimension: returns `(y, rstd)` with `rstd` of shape `[rows, 1]`.
    fn rmsnorm_forward(&self, x: &Tensor, w: &Tensor, eps: f32) -> (Tensor, Tensor);
    /// Gradient of RMSNorm with respect to its input.
    fn rmsnorm_backward_input(&self, x: &Tensor, w: &Tensor, rstd: &Tensor, dy: &Tensor) -> Tensor;
    /// `dw += Σ_rows dy ⊙ x · rstd`.
    fn rmsnorm_backward_weight(&self, x: &Tensor, rstd: &Tensor, dy: &Tensor, dw: &mut Tensor);
    /// `silu(gate) ⊙ up`.
    fn swiglu_forward(&self, gate: &Tensor, up: &Tensor) -> Tensor;
    /// `(dgate, dup)` from `dh`.
    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dh: &Tensor) -> (Tensor, Tensor);
    /// Rotates the rotary channels of `x` in place (`inverse`: apply the transpose, for backward).
    /// `table` is `[seq_len, dim]`: cos in the first `dim/2` columns, sin in the rest.
    fn rope(&self, x: &mut Tensor, table: &Tensor, spec: RopeSpec, inverse: bool);
    /// Causal MLA attention. `q`: `[n, H*(nope+rope)]` (rope part rotated), `kv`: `[n, H*(nope+v)]`
    /// (k_nope then v per head), `k_pe`: `[n, rope]` (rotated, shared by all heads).
    /// Returns `(out [n, H*v], saved)`: `saved` is what this device's backward reads besides
    /// the inputs and `out` (the CPU's: the probabilities `[B, H, T, T]`; a fused kernel's: each
    /// query row's log-sum-exp `[B, H, T]`).
    fn attention_forward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor);
    /// Gradients `(dq, dkv, dk_pe)` of attention from `dout`; `out` and `saved` are what
    /// [`Device::attention_forward`] returned for these inputs.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        out: &Tensor,
        saved: &Tensor,
        dout: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor, Tensor);
    /// Sigmoid router with bias-adjusted, group-limited top-k selection (DeepSeek-V3 / HF semantics).
    fn router_forward(&self, logits: &Tensor, bias: &Tensor, spec: RouterSpec) -> RouterOut;
    /// Gradient of the combine weights with respect to the router logits, `[n, n_experts]`.
    fn router_backward(
        &self,
        scores: &Tensor,
        topk: &[u32],
        dweights: &Tensor,
        spec: RouterSpec,
    ) -> Tensor;
    /// Sequence-wise balance loss `α Σ_i f_i P_i` averaged over sequences of `seq_len` tokens
    /// (DeepSeek-V3 report eq. 17-20): returns the loss and its gradient w.r.t. the router logits.
    fn balance_loss(
        &self,
        scores: &Tensor,
        topk: &[u32],
        spec: RouterSpec,
        seq_len: usize,
        alpha: f32,
    ) -> (f32, Tensor);
    /// Fused softmax cross-entropy: returns `(Σ loss over targets ≥ 0, dlogits)` where
    /// `dlogits = grad_scale · (softmax − onehot)` on rows with a target and 0 elsewhere.
    fn cross_entropy(&self, logits: &Tensor, targets: &[i64], grad_scale: f32) -> (f32, Tensor);

    // ---- training state: whole tensors ---------------------------------------------------

    /// `t[i] = value` for every element (zeroing gradients).
    fn fill(&self, t: &mut Tensor, value: f32);
    /// `t[i] *= s` for every element (averaging, clipping).
    fn scale(&self, t: &mut Tensor, s: f32);
    /// [`Device::fill`] on every tensor of `ts` (a device may do them in one launch).
    fn fill_many(&self, ts: &mut [&mut Tensor], value: f32) {
        for t in ts.iter_mut() {
            self.fill(t, value);
        }
    }
    /// [`Device::scale`] on every tensor of `ts` (a device may do them in one launch).
    fn scale_many(&self, ts: &mut [&mut Tensor], s: f32) {
        for t in ts.iter_mut() {
            self.scale(t, s);
        }
    }
    /// `Σ t[i]²` over every tensor, in f64, summed in fixed pieces of
    /// [`crate::optim::SQ_PIECE`] values: the same bits however the device splits the work
    /// (0 on a device without values).
    fn sum_squares(&self, ts: &[&Tensor]) -> f64;
    /// One AdamW update of every parameter in `params` ([`crate::optim::adamw`] says exactly
    /// what is computed).
    fn adamw(&self, params: &mut [AdamWArgs<'_>]);
    /// `ts` one after the other in one flat `[Σ numel]` tensor, each value times `scale` (a
    /// bucket of gradients for an all-reduce).
    fn pack(&self, ts: &[&Tensor], scale: f32) -> Tensor;
    /// The inverse of [`Device::pack`] without the scale: `flat`'s values back into `ts`.
    fn unpack(&self, flat: &Tensor, ts: &mut [&mut Tensor]);
    /// Overwrite every element of `t` with host values `data` (restoring a snapshot).
    fn write(&self, t: &mut Tensor, data: &[f32]);
    /// The tensor's values moved out of it, for the fabric (no copy on the CPU); `None` on a
    /// device without values.
    fn take_values(&self, t: Tensor) -> Option<Vec<f32>>;
    /// A tensor of this device from values that came off the fabric (moved in, no copy on the
    /// CPU); `values` is `None`, or ignored, on a device without values. A programming error
    /// (panic) when the values do not fill `shape`.
    fn adopt(&self, shape: &[usize], values: Option<Vec<f32>>) -> Tensor;
}

/// [`Device::gemm_rows_grouped`] as one GEMM per group (its default, and a device's fallback).
pub fn gemm_rows_each<D: Device + ?Sized>(
    dev: &D,
    c: &mut Tensor,
    a: &Tensor,
    ws: &[&Tensor],
    rows: &[Range<usize>],
    trans_w: bool,
    accumulate: bool,
) {
    for (w, r) in ws.iter().zip(rows) {
        let wm = if trans_w {
            Mat::all(w).t()
        } else {
            Mat::all(w)
        };
        dev.gemm(
            MatMut::rows(c, r.clone()),
            Mat::rows(a, r.clone()),
            wm,
            accumulate,
        );
    }
}

/// [`Device::gemm_weight_grouped`] as one GEMM per group with rows.
pub fn gemm_weight_each<D: Device + ?Sized>(
    dev: &D,
    gs: &mut [&mut Tensor],
    dy: &Tensor,
    x: &Tensor,
    rows: &[Range<usize>],
) {
    for (g, r) in gs.iter_mut().zip(rows) {
        if !r.is_empty() {
            dev.gemm(
                MatMut::all(g),
                Mat::rows(dy, r.clone()).t(),
                Mat::rows(x, r.clone()),
                true,
            );
        }
    }
}

/// One parameter's AdamW update, for [`Device::adamw`].
pub struct AdamWArgs<'a> {
    pub value: &'a mut Tensor,
    pub grad: &'a Tensor,
    /// First moment (PyTorch's `exp_avg`), updated in place.
    pub exp_avg: &'a mut Tensor,
    /// Second moment (`exp_avg_sq`), updated in place.
    pub exp_avg_sq: &'a mut Tensor,
    /// The update's scalars at the parameter's step.
    pub coef: crate::optim::Coef,
}

//! The CPU device: f32 on the host, GEMM from `faer` on the device's own rayon thread pool.
//!
//! Wall-clock time is read here and only here (`std::time::Instant` around each operation): this
//! is the real-world side of the Device seam, the simulator computes the same quantity instead.
//!
//! # GEMM choice (measured)
//!
//! Measured on the model's shapes (hidden 64, 512 tokens, experts of width 32, attention blocks
//! 64×64×24) with 2 threads on the 2-core development machine, release build, GFLOP/s:
//!
//! | threads | gemm 0.18 | matrixmultiply 0.3 | faer 0.24 |
//! | --- | --- | --- | --- |
//! | 2 (`Rayon(2)` / `MATMUL_NUM_THREADS` / `Par::rayon(2)`) | 38.1 | 37.3 | 17.6 |
//! | 1 | 52.9 | 56.5 | **85.7** |
//!
//! (step-weighted over the 36 distinct shapes of a training step, machine shared with other
//! builds; an earlier run on a quieter machine: 2 threads 74.9 / 77.9 / 46.6, 1 thread
//! 67.1 / 85.5 / 119.2). On these small shapes no crate gains from a second thread — the
//! split and wake-up cost more than the work — and single-threaded faer is fastest by 1.5-2×.
//! Chosen: **faer**, single-threaded below [`super::gemm::PAR_MIN_MACS`] multiply-adds (all of the default
//! model's GEMMs) and `Par::rayon(threads)` above; the device's threads are used by attention,
//! which runs sequences in parallel. The whole default-model training step (batch 8×64, 2
//! threads) measured 15-20 ms = 25-33 GFLOP/s against 70-88 GFLOP/s raw GEMM on the same shapes
//! (29-40 %, `training_step_vs_raw_gemm`), after the buffer cache ([`super::pool`]) and the
//! `vzeroupper` fix below.
//!
//! # Using both threads (measured)
//!
//! Profiling that step (`perf`, `take_profile`) showed libm `expf` and scalar element-wise loops
//! at ~25 % of the samples and the second thread idle outside attention. Now: the element-wise
//! kernels run on [`super::vmath`] (polynomial `exp`, 8-lane reductions, AVX2 when present), the
//! attention softmax skips the scalar tails and each head does one `Q Kᵀ` / `dS K` / `dSᵀ Q` GEMM
//! over `nope + rope`; the model runs a step on the pool ([`Device::on_device_threads`]) and
//! splits independent work with [`Device::join`] (W of the layers beside W of the head, main loss
//! beside the MTP modules, MLA's query beside its key/value path, routed beside shared experts),
//! and large element-wise kernels split their rows between the two threads. `flotilla bench step`
//! on 2 pinned cores of a quiet host: 10.6-12.3 ms → 5.9-7.5 ms per step, 39-49 % → 56-78 % of
//! the raw GEMM rate (noisy; the shared development machine scatters far more).
//!
//! Re-measure with
//! `cargo test -p flotilla-model --release --test gemm_bench -- --ignored --nocapture --test-threads 1`.
//!
//! This file holds the device, its thread pool, memory, timing and GEMM; the other operations'
//! bodies are beside it: `copies.rs` (copies, gathers, scatter-adds, row-wise), `layers.rs` (the
//! layer kernels) and `train.rs` (the training state).

mod copies;
mod layers;
mod train;

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::cost::{self, Work};
use super::gemm::{PAR_MIN_MACS, StridedMut, StridedRef, sgemm};
use super::pool::BufferPool;
use super::{AdamWArgs, AttnShape, Cost, Device, Mat, MatMut, RopeSpec, RouterOut, RouterSpec};
use crate::tensor::Tensor;

/// The host CPU as a device.
pub struct CpuDevice {
    threads: usize,
    /// The device's host threads.
    pool: rayon::ThreadPool,
    buffers: Arc<BufferPool>,
    /// Cost and profile, under one lock (one lock per operation).
    stats: Mutex<Stats>,
    /// Depth of the [`Device::join`]s in progress.
    joins: AtomicUsize,
}

impl std::fmt::Debug for CpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuDevice {{ threads: {} }}", self.threads)
    }
}

impl CpuDevice {
    /// A CPU device whose GEMMs and attention use `threads` threads (at least 1).
    pub fn new(threads: usize) -> CpuDevice {
        let threads = threads.max(1);
        CpuDevice {
            threads,
            pool: device_pool(threads),
            buffers: Arc::new(BufferPool::new(DEFAULT_CACHE_BYTES)),
            stats: Mutex::new(Stats::default()),
            joins: AtomicUsize::new(0),
        }
    }

    fn pool(&self) -> &rayon::ThreadPool {
        &self.pool
    }

    /// The device's cache of freed host buffers (see [`BufferPool`]).
    pub fn buffers(&self) -> &BufferPool {
        &self.buffers
    }

    /// A tensor whose every element the caller will overwrite (recycled buffer, stale values).
    fn out(&self, shape: &[usize]) -> Tensor {
        Tensor::from_pool(
            shape,
            self.buffers.take(shape.iter().product()),
            &self.buffers,
        )
    }

    /// A host vector for a kernel to fill completely, to be wrapped with [`Self::wrap`].
    fn buf(&self, n: usize) -> Vec<f32> {
        self.buffers.take(n)
    }

    fn wrap(&self, shape: &[usize], v: Vec<f32>) -> Tensor {
        Tensor::from_pool(shape, v, &self.buffers)
    }

    /// Runs `a` and `b` on two threads of the pool: from a pool thread with `rayon::join` (`b`
    /// is only handed over if the other thread is free to take it: no waiting), from any other
    /// thread through the pool (the caller waits).
    fn split2(&self, a: impl FnOnce() + Send, b: impl FnOnce() + Send) {
        if self.pool().current_thread_index().is_some() {
            rayon::join(a, b);
        } else {
            self.pool().join(a, b);
        }
    }

    /// Whether an element-wise kernel over `n` values is worth splitting across two threads:
    /// from a pool thread (inside [`Device::on_device_threads`]) a split costs about a
    /// microsecond and an unused half is run by the caller, from other threads it is a hand-off.
    fn split_worth(&self, n: usize) -> bool {
        self.threads > 1
            && (n >= PAR_MIN_ELEMS_OUTSIDE
                || (n >= PAR_MIN_ELEMS && self.pool().current_thread_index().is_some()))
    }

    /// Number of threads the device computes with.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Drains the per-operation profile: `(name, calls, seconds)` sorted by name.
    pub fn take_profile(&self) -> Vec<(&'static str, u64, f64)> {
        let p = std::mem::take(&mut self.stats().profile);
        p.into_iter().map(|(k, (n, s))| (k, n, s)).collect()
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f`, measures it, and records `work` with the measured time under `name`.
    fn timed<R>(&self, name: &'static str, work: Work, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let r = f();
        let secs = start.elapsed().as_secs_f64();
        let mut st = self.stats();
        let e = st.profile.entry(name).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += secs;
        st.cost.add(&Cost {
            flops: work.flops,
            bytes: work.bytes,
            seconds: secs,
            gemm_flops: if work.gemm { work.flops } else { 0.0 },
            gemm_seconds: if work.gemm { secs } else { 0.0 },
            ops: 1,
        });
        r
    }
}

/// Element-wise kernels over at least this many values run on two threads when called from the
/// device's pool (see `CpuDevice::split_worth`)...
const PAR_MIN_ELEMS: usize = 1 << 14;
/// ...and over at least this many from any other thread.
const PAR_MIN_ELEMS_OUTSIDE: usize = 1 << 17;

/// What the device has accounted since it was last drained.
#[derive(Debug, Default)]
struct Stats {
    cost: Cost,
    /// Seconds and calls per operation name, for finding where a step's time goes.
    profile: BTreeMap<&'static str, (u64, f64)>,
}

/// Values per piece when a whole-tensor kernel (fill, scale) is dealt out to threads.
const PIECE: usize = 1 << 16;
/// Below this many values, a whole-tensor kernel runs on the calling thread alone.
const PAR_MIN_WHOLE: usize = 1 << 20;

/// Default bound of the buffer cache (1 GiB).
pub const DEFAULT_CACHE_BYTES: usize = 1 << 30;

/// The device's rayon threads (with `threads = 1` its one thread stays idle: the calling thread
/// computes, see [`Device::on_device_threads`]).
fn device_pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("flotilla-cpu-{i}"))
        .build()
        .expect("cannot start the CPU device's threads")
}

impl Device for CpuDevice {
    fn name(&self) -> String {
        format!("cpu({} threads)", self.threads)
    }

    fn take_cost(&self) -> Cost {
        std::mem::take(&mut self.stats().cost)
    }

    fn join(&self, a: &mut (dyn FnMut() + Send), b: &mut (dyn FnMut() + Send)) {
        if self.threads < 2 {
            a();
            b();
            return;
        }
        // The outermost join of a nest corrects the cost: its operations, on both threads,
        // summed their own times, and the whole nest took `wall`.
        let outer = self.joins.fetch_add(1, Ordering::SeqCst) == 0;
        let before = self.stats().cost;
        let start = Instant::now();
        self.split2(a, b);
        let wall = start.elapsed().as_secs_f64();
        self.joins.fetch_sub(1, Ordering::SeqCst);
        if outer {
            let c = &mut self.stats().cost;
            let inside = c.seconds - before.seconds;
            if inside > wall {
                let gemm_inside = c.gemm_seconds - before.gemm_seconds;
                c.seconds = before.seconds + wall;
                c.gemm_seconds = before.gemm_seconds + gemm_inside * (wall / inside);
            }
        }
    }

    fn on_device_threads(&self, f: &mut (dyn FnMut() + Send)) {
        if self.threads < 2 || self.pool().current_thread_index().is_some() {
            f()
        } else {
            self.pool().install(f)
        }
    }

    fn zeros(&self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        self.timed("zeros", cost::elementwise(n, 0.0, 1.0), || {
            let mut t = self.out(shape);
            t.hm().fill(0.0);
            t
        })
    }

    fn empty(&self, shape: &[usize]) -> Tensor {
        self.out(shape)
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> Tensor {
        self.timed("upload", cost::copy(data.len()), || {
            let mut t = self.out(shape);
            t.hm().copy_from_slice(data);
            t
        })
    }

    fn download(&self, t: &Tensor) -> Option<Vec<f32>> {
        t.host().map(|v| v.to_vec())
    }

    fn copy(&self, t: &Tensor) -> Tensor {
        self.timed("copy", cost::copy(t.numel()), || {
            let mut out = self.out(t.shape());
            out.hm().copy_from_slice(t.h());
            out
        })
    }

    fn gemm(&self, c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
        let (m, k) = a.dims();
        let (k2, n) = b.dims();
        let c_cols = c.t.cols();
        assert_eq!(
            k,
            k2,
            "gemm: inner dimensions {:?} vs {:?}",
            a.dims(),
            b.dims()
        );
        assert_eq!(
            (c.rows.len(), c_cols),
            (m, n),
            "gemm: output is {}x{c_cols}, product is {m}x{n}",
            c.rows.len()
        );
        let view = |mm: &Mat<'_>| {
            let cols = mm.t.cols();
            let (rs, cs) = if mm.trans { (1, cols) } else { (cols, 1) };
            (mm.rows.start * cols, rs, cs)
        };
        let (a_off, a_rs, a_cs) = view(&a);
        let (b_off, b_rs, b_cs) = view(&b);
        let c_off = c.rows.start * c_cols;
        // Inside a `join` the other thread has its own half of the work: a GEMM split across
        // both would wait at faer's barriers for it (measured: spinning there took 5 % of a step).
        let threads = if self.joins.load(Ordering::Relaxed) > 0 {
            1
        } else {
            self.threads
        };
        self.timed("gemm", cost::gemm(m, n, k, accumulate), || {
            let mut run = || {
                sgemm(
                    m,
                    n,
                    k,
                    StridedMut {
                        data: c.t.hm(),
                        off: c_off,
                        rs: c_cols,
                        cs: 1,
                    },
                    StridedRef {
                        data: a.t.h(),
                        off: a_off,
                        rs: a_rs,
                        cs: a_cs,
                    },
                    StridedRef {
                        data: b.t.h(),
                        off: b_off,
                        rs: b_rs,
                        cs: b_cs,
                    },
                    accumulate,
                    threads,
                )
            };
            // Small products run on the calling thread: handing them to the pool costs more
            // than they take.
            if threads > 1 && m * n * k >= PAR_MIN_MACS {
                self.pool().install(run)
            } else {
                run()
            }
        })
    }

    fn add_assign(&self, dst: &mut Tensor, src: &Tensor) {
        self.add_assign_op(dst, src)
    }

    fn slice_cols(&self, src: &Tensor, cols: Range<usize>) -> Tensor {
        self.slice_cols_op(src, cols)
    }

    fn write_cols(&self, dst: &mut Tensor, col0: usize, src: &Tensor) {
        self.write_cols_op(dst, col0, src)
    }

    fn gather_rows(&self, src: &Tensor, index: &[u32]) -> Tensor {
        self.gather_rows_op(src, index)
    }

    fn concat_rows(&self, parts: &[&Tensor], cols: usize) -> Tensor {
        self.concat_rows_op(parts, cols)
    }

    fn split_rows(&self, t: &Tensor, rows: &[usize]) -> Vec<Tensor> {
        self.split_rows_op(t, rows)
    }

    fn scatter_add_rows(&self, dst: &mut Tensor, src: &Tensor, index: &[u32]) {
        self.scatter_add_rows_op(dst, src, index)
    }

    fn scale_rows(&self, x: &mut Tensor, s: &Tensor) {
        self.scale_rows_op(x, s)
    }

    fn rows_dot(&self, a: &Tensor, b: &Tensor) -> Tensor {
        self.rows_dot_op(a, b)
    }

    fn embedding_forward(&self, table: &Tensor, ids: &[u32]) -> Tensor {
        self.gather_rows(table, ids)
    }

    fn embedding_backward(&self, ids: &[u32], dy: &Tensor, dtable: &mut Tensor) {
        self.scatter_add_rows(dtable, dy, ids)
    }

    fn rmsnorm_forward(&self, x: &Tensor, w: &Tensor, eps: f32) -> (Tensor, Tensor) {
        self.rmsnorm_forward_op(x, w, eps)
    }

    fn rmsnorm_backward_input(&self, x: &Tensor, w: &Tensor, rstd: &Tensor, dy: &Tensor) -> Tensor {
        self.rmsnorm_backward_input_op(x, w, rstd, dy)
    }

    fn rmsnorm_backward_weight(&self, x: &Tensor, rstd: &Tensor, dy: &Tensor, dw: &mut Tensor) {
        self.rmsnorm_backward_weight_op(x, rstd, dy, dw)
    }

    fn swiglu_forward(&self, gate: &Tensor, up: &Tensor) -> Tensor {
        self.swiglu_forward_op(gate, up)
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dh: &Tensor) -> (Tensor, Tensor) {
        self.swiglu_backward_op(gate, up, dh)
    }

    fn rope(&self, x: &mut Tensor, table: &Tensor, spec: RopeSpec, inverse: bool) {
        self.rope_op(x, table, spec, inverse)
    }

    fn attention_forward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor) {
        self.attention_forward_op(q, kv, k_pe, s)
    }

    fn attention_backward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        _out: &Tensor,
        probs: &Tensor,
        dout: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor, Tensor) {
        self.attention_backward_op(q, kv, k_pe, probs, dout, s)
    }

    fn router_forward(&self, logits: &Tensor, bias: &Tensor, spec: RouterSpec) -> RouterOut {
        self.router_forward_op(logits, bias, spec)
    }

    fn router_backward(
        &self,
        scores: &Tensor,
        topk: &[u32],
        dweights: &Tensor,
        spec: RouterSpec,
    ) -> Tensor {
        self.router_backward_op(scores, topk, dweights, spec)
    }

    fn balance_loss(
        &self,
        scores: &Tensor,
        topk: &[u32],
        spec: RouterSpec,
        seq_len: usize,
        alpha: f32,
    ) -> (f32, Tensor) {
        self.balance_loss_op(scores, topk, spec, seq_len, alpha)
    }

    fn cross_entropy(&self, logits: &Tensor, targets: &[i64], grad_scale: f32) -> (f32, Tensor) {
        self.cross_entropy_op(logits, targets, grad_scale)
    }

    fn fill(&self, t: &mut Tensor, value: f32) {
        self.fill_op(t, value)
    }

    fn scale(&self, t: &mut Tensor, s: f32) {
        self.scale_op(t, s)
    }

    fn sum_squares(&self, ts: &[&Tensor]) -> f64 {
        self.sum_squares_op(ts)
    }

    fn adamw(&self, params: &mut [AdamWArgs<'_>]) {
        self.adamw_op(params)
    }

    fn pack(&self, ts: &[&Tensor], scale: f32) -> Tensor {
        self.pack_op(ts, scale)
    }

    fn unpack(&self, flat: &Tensor, ts: &mut [&mut Tensor]) {
        self.unpack_op(flat, ts)
    }

    fn write(&self, t: &mut Tensor, data: &[f32]) {
        assert_eq!(t.numel(), data.len(), "write {:?}", t.shape());
        self.timed("write", cost::copy(data.len()), || {
            t.hm().copy_from_slice(data)
        })
    }

    fn take_values(&self, t: Tensor) -> Option<Vec<f32>> {
        t.into_host()
    }

    fn adopt(&self, shape: &[usize], values: Option<Vec<f32>>) -> Tensor {
        let n = shape.iter().product::<usize>();
        match values {
            Some(v) => {
                assert_eq!(v.len(), n, "adopt: {} values for {shape:?}", v.len());
                self.wrap(shape, v)
            }
            None => self.zeros(shape),
        }
    }
}

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

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::cost::{self, Work};
use super::gemm::{PAR_MIN_MACS, StridedMut, StridedRef, sgemm};
use super::pool::BufferPool;
use super::{
    AdamWArgs, AttnShape, Cost, Device, Mat, MatMut, RopeSpec, RouterOut, RouterSpec, attention,
    kernels,
};
use crate::optim::kernel;
use crate::par::run_pieces;
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

    fn slice_cols(&self, src: &Tensor, cols: Range<usize>) -> Tensor {
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

    fn write_cols(&self, dst: &mut Tensor, col0: usize, src: &Tensor) {
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

    fn gather_rows(&self, src: &Tensor, index: &[u32]) -> Tensor {
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

    fn concat_rows(&self, parts: &[&Tensor], cols: usize) -> Tensor {
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

    fn split_rows(&self, t: &Tensor, rows: &[usize]) -> Vec<Tensor> {
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

    fn scatter_add_rows(&self, dst: &mut Tensor, src: &Tensor, index: &[u32]) {
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

    fn scale_rows(&self, x: &mut Tensor, s: &Tensor) {
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

    fn rows_dot(&self, a: &Tensor, b: &Tensor) -> Tensor {
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

    fn embedding_forward(&self, table: &Tensor, ids: &[u32]) -> Tensor {
        self.gather_rows(table, ids)
    }

    fn embedding_backward(&self, ids: &[u32], dy: &Tensor, dtable: &mut Tensor) {
        self.scatter_add_rows(dtable, dy, ids)
    }

    fn rmsnorm_forward(&self, x: &Tensor, w: &Tensor, eps: f32) -> (Tensor, Tensor) {
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

    fn rmsnorm_backward_input(&self, x: &Tensor, w: &Tensor, rstd: &Tensor, dy: &Tensor) -> Tensor {
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

    fn rmsnorm_backward_weight(&self, x: &Tensor, rstd: &Tensor, dy: &Tensor, dw: &mut Tensor) {
        self.timed(
            "rmsnorm_backward_weight",
            cost::elementwise(x.numel(), 3.0, 2.0),
            || kernels::rmsnorm_backward_weight(x.h(), rstd.h(), dy.h(), dw.hm()),
        )
    }

    fn swiglu_forward(&self, gate: &Tensor, up: &Tensor) -> Tensor {
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

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dh: &Tensor) -> (Tensor, Tensor) {
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

    fn rope(&self, x: &mut Tensor, table: &Tensor, spec: RopeSpec, inverse: bool) {
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

    fn attention_forward(
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

    fn attention_backward(
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

    fn router_forward(&self, logits: &Tensor, bias: &Tensor, spec: RouterSpec) -> RouterOut {
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

    fn router_backward(
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

    fn balance_loss(
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

    fn cross_entropy(&self, logits: &Tensor, targets: &[i64], grad_scale: f32) -> (f32, Tensor) {
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

    fn fill(&self, t: &mut Tensor, value: f32) {
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

    fn scale(&self, t: &mut Tensor, s: f32) {
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

    fn sum_squares(&self, ts: &[&Tensor]) -> f64 {
        let n = ts.iter().map(|t| t.numel()).sum();
        self.timed("sum_squares", cost::elementwise(n, 2.0, 1.0), || {
            let slices: Vec<&[f32]> = ts.iter().map(|t| t.h()).collect();
            crate::optim::sum_of_squares_on(&slices, self.threads)
        })
    }

    fn adamw(&self, params: &mut [AdamWArgs<'_>]) {
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

    fn pack(&self, ts: &[&Tensor], scale: f32) -> Tensor {
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

    fn unpack(&self, flat: &Tensor, ts: &mut [&mut Tensor]) {
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

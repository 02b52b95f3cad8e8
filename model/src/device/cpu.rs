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
//! GEMM_TABLE_PLACEHOLDER
//!
//! Re-measure with `cargo test -p flotilla-model --release --test gemm_bench -- --ignored --nocapture`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Instant;

use super::cost::{self, Work};
use super::{AttnShape, Cost, Device, Mat, MatMut, RopeSpec, RouterOut, RouterSpec, attention, kernels};
use crate::tensor::Tensor;

/// The host CPU as a device.
pub struct CpuDevice {
    threads: usize,
    pool: rayon::ThreadPool,
    cost: Mutex<Cost>,
    /// Seconds and calls per operation name, for finding where a step's time goes.
    profile: Mutex<BTreeMap<&'static str, (u64, f64)>>,
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
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("flotilla-cpu-{i}"))
            .build()
            .expect("cannot start the CPU device's threads");
        CpuDevice { threads, pool, cost: Mutex::new(Cost::default()), profile: Mutex::new(BTreeMap::new()) }
    }

    /// Number of threads the device computes with.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Drains the per-operation profile: `(name, calls, seconds)` sorted by name.
    pub fn take_profile(&self) -> Vec<(&'static str, u64, f64)> {
        let p = std::mem::take(&mut *self.profile.lock().unwrap_or_else(|e| e.into_inner()));
        p.into_iter().map(|(k, (n, s))| (k, n, s)).collect()
    }

    /// Runs `f`, measures it, and records `work` with the measured time under `name`.
    fn timed<R>(&self, name: &'static str, work: Work, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let r = f();
        let secs = start.elapsed().as_secs_f64();
        {
            let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
            let e = p.entry(name).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += secs;
        }
        let mut c = self.cost.lock().unwrap_or_else(|e| e.into_inner());
        c.add(&Cost {
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

/// Below this many multiply-adds a GEMM runs on one thread: on the model's small shapes faer's
/// parallel split costs more than it saves (see the measurements above).
pub const PAR_MIN_MACS: usize = 1 << 21;

/// A read-only strided matrix inside a host slice: element (i, j) is `data[off + i*rs + j*cs]`.
pub struct StridedRef<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

/// A mutable strided matrix inside a host slice.
pub struct StridedMut<'a> {
    pub data: &'a mut [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

fn check(len: usize, off: usize, rows: usize, cols: usize, rs: usize, cs: usize, what: &str) {
    if rows == 0 || cols == 0 {
        return;
    }
    let last = off + (rows - 1) * rs + (cols - 1) * cs;
    assert!(last < len, "gemm: {what} view ({rows}x{cols}, off {off}, strides {rs},{cs}) exceeds buffer of {len}");
}

/// `c (+)= a · b` with `c: m×n`, `a: m×k`, `b: k×n`, all strided, on `threads` threads of the
/// current rayon pool (1 = the calling thread only).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(m: usize, n: usize, k: usize, c: StridedMut<'_>, a: StridedRef<'_>, b: StridedRef<'_>, accumulate: bool, threads: usize) {
    check(c.data.len(), c.off, m, n, c.rs, c.cs, "c");
    check(a.data.len(), a.off, m, k, a.rs, a.cs, "a");
    check(b.data.len(), b.off, k, n, b.rs, b.cs, "b");
    if m == 0 || n == 0 {
        return;
    }
    let par = if threads > 1 && m * n * k >= PAR_MIN_MACS { faer::Par::rayon(threads) } else { faer::Par::Seq };
    let accum = if accumulate { faer::Accum::Add } else { faer::Accum::Replace };
    // SAFETY: every element each view can reach was bounds-checked above; `c` is a unique borrow
    // and cannot alias `a` or `b` (shared borrows); strides are non-negative and fit in isize.
    unsafe {
        let cm = faer::MatMut::from_raw_parts_mut(c.data.as_mut_ptr().add(c.off), m, n, c.rs as isize, c.cs as isize);
        let am = faer::MatRef::from_raw_parts(a.data.as_ptr().add(a.off), m, k, a.rs as isize, a.cs as isize);
        let bm = faer::MatRef::from_raw_parts(b.data.as_ptr().add(b.off), k, n, b.rs as isize, b.cs as isize);
        faer::linalg::matmul::matmul(cm, accum, am, bm, 1.0f32, par);
    }
    clear_upper_simd_state();
}

/// Clears the upper halves of the AVX registers after faer's AVX/AVX-512 kernels (`vzeroupper`).
///
/// Without it, the SSE-encoded code that runs next on the same thread (libm's `expf` in softmax,
/// SiLU and cross-entropy) pays the dirty-upper-state penalty: measured 10-20× slower
/// element-wise kernels on the development machine (Xeon with AVX-512).
fn clear_upper_simd_state() {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx")]
        fn zeroupper() {
            std::arch::x86_64::_mm256_zeroupper();
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU supports AVX (checked just above).
            unsafe { zeroupper() }
        }
    }
}

/// Single-threaded [`sgemm`] (used inside kernels that are already parallel).
pub fn sgemm_seq(m: usize, n: usize, k: usize, c: StridedMut<'_>, a: StridedRef<'_>, b: StridedRef<'_>, accumulate: bool) {
    sgemm(m, n, k, c, a, b, accumulate, 1)
}

/// Splits `0..n` into at most `parts` contiguous ranges of near-equal size.
fn split(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts).map(|p| (p * n / parts)..((p + 1) * n / parts)).collect()
}

impl Device for CpuDevice {
    fn name(&self) -> String {
        format!("cpu({} threads)", self.threads)
    }

    fn take_cost(&self) -> Cost {
        std::mem::take(&mut *self.cost.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn zeros(&self, shape: &[usize]) -> Tensor {
        Tensor::from_host(shape, vec![0.0; shape.iter().product()])
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> Tensor {
        Tensor::from_host(shape, data.to_vec())
    }

    fn download(&self, t: &Tensor) -> Option<Vec<f32>> {
        t.host().map(|v| v.to_vec())
    }

    fn copy(&self, t: &Tensor) -> Tensor {
        self.timed("copy", cost::copy(t.numel()), || t.clone())
    }

    fn gemm(&self, c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
        let (m, k) = a.dims();
        let (k2, n) = b.dims();
        let c_cols = c.t.cols();
        assert_eq!(k, k2, "gemm: inner dimensions {:?} vs {:?}", a.dims(), b.dims());
        assert_eq!((c.rows.len(), c_cols), (m, n), "gemm: output is {}x{c_cols}, product is {m}x{n}", c.rows.len());
        let view = |mm: &Mat<'_>| {
            let cols = mm.t.cols();
            let (rs, cs) = if mm.trans { (1, cols) } else { (cols, 1) };
            (mm.rows.start * cols, rs, cs)
        };
        let (a_off, a_rs, a_cs) = view(&a);
        let (b_off, b_rs, b_cs) = view(&b);
        let c_off = c.rows.start * c_cols;
        let threads = self.threads;
        self.timed("gemm", cost::gemm(m, n, k, accumulate), || {
            let mut run = || {
                sgemm(
                    m,
                    n,
                    k,
                    StridedMut { data: c.t.hm(), off: c_off, rs: c_cols, cs: 1 },
                    StridedRef { data: a.t.h(), off: a_off, rs: a_rs, cs: a_cs },
                    StridedRef { data: b.t.h(), off: b_off, rs: b_rs, cs: b_cs },
                    accumulate,
                    threads,
                )
            };
            // Small products run on the calling thread: handing them to the pool costs more
            // than they take.
            if threads > 1 && m * n * k >= PAR_MIN_MACS { self.pool.install(run) } else { run() }
        })
    }

    fn add_assign(&self, dst: &mut Tensor, src: &Tensor) {
        assert_eq!(dst.numel(), src.numel(), "add_assign {:?} += {:?}", dst.shape(), src.shape());
        self.timed("add_assign", cost::elementwise(dst.numel(), 1.0, 3.0), || {
            for (d, s) in dst.hm().iter_mut().zip(src.h()) {
                *d += s;
            }
        })
    }

    fn slice_cols(&self, src: &Tensor, cols: Range<usize>) -> Tensor {
        let (r, c, w) = (src.rows(), src.cols(), cols.len());
        assert!(cols.end <= c, "slice_cols {cols:?} of {:?}", src.shape());
        self.timed("slice_cols", cost::copy(r * w), || {
            let mut out = Vec::with_capacity(r * w);
            for row in src.h().chunks_exact(c) {
                out.extend_from_slice(&row[cols.clone()]);
            }
            Tensor::from_host(&[r, w], out)
        })
    }

    fn write_cols(&self, dst: &mut Tensor, col0: usize, src: &Tensor) {
        let (c, w) = (dst.cols(), src.cols());
        assert!(dst.rows() == src.rows() && col0 + w <= c, "write_cols {:?} at {col0} into {:?}", src.shape(), dst.shape());
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
            let mut out = Vec::with_capacity(index.len() * c);
            for &i in index {
                out.extend_from_slice(&s[i as usize * c..(i as usize + 1) * c]);
            }
            Tensor::from_host(&[index.len(), c], out)
        })
    }

    fn scatter_add_rows(&self, dst: &mut Tensor, src: &Tensor, index: &[u32]) {
        let c = dst.cols();
        assert!(src.cols() == c && src.rows() == index.len(), "scatter_add_rows {:?} -> {:?}", src.shape(), dst.shape());
        self.timed("scatter_add_rows", cost::elementwise(src.numel(), 1.0, 3.0), || {
            let d = dst.hm();
            for (row, &i) in src.h().chunks_exact(c).zip(index) {
                for (dv, sv) in d[i as usize * c..(i as usize + 1) * c].iter_mut().zip(row) {
                    *dv += sv;
                }
            }
        })
    }

    fn scale_rows(&self, x: &mut Tensor, s: &Tensor) {
        let c = x.cols();
        assert_eq!(s.numel(), x.rows(), "scale_rows {:?} by {:?}", x.shape(), s.shape());
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
            let out: Vec<f32> =
                a.h().chunks_exact(c).zip(b.h().chunks_exact(c)).map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum()).collect();
            Tensor::from_host(&[a.rows(), 1], out)
        })
    }

    fn embedding_forward(&self, table: &Tensor, ids: &[u32]) -> Tensor {
        self.gather_rows(table, ids)
    }

    fn embedding_backward(&self, ids: &[u32], dy: &Tensor, dtable: &mut Tensor) {
        self.scatter_add_rows(dtable, dy, ids)
    }

    fn rmsnorm_forward(&self, x: &Tensor, w: &Tensor, eps: f32) -> (Tensor, Tensor) {
        assert_eq!(x.cols(), w.numel(), "rmsnorm {:?} with weight {:?}", x.shape(), w.shape());
        self.timed("rmsnorm_forward", cost::elementwise(x.numel(), 4.0, 2.0), || {
            let mut y = vec![0.0; x.numel()];
            let mut rstd = vec![0.0; x.rows()];
            kernels::rmsnorm_forward(x.h(), w.h(), eps, &mut y, &mut rstd);
            (Tensor::from_host(x.shape(), y), Tensor::from_host(&[x.rows(), 1], rstd))
        })
    }

    fn rmsnorm_backward_input(&self, x: &Tensor, w: &Tensor, rstd: &Tensor, dy: &Tensor) -> Tensor {
        self.timed("rmsnorm_backward_input", cost::elementwise(x.numel(), 8.0, 3.0), || {
            let mut dx = vec![0.0; x.numel()];
            kernels::rmsnorm_backward_input(x.h(), w.h(), rstd.h(), dy.h(), &mut dx);
            Tensor::from_host(x.shape(), dx)
        })
    }

    fn rmsnorm_backward_weight(&self, x: &Tensor, rstd: &Tensor, dy: &Tensor, dw: &mut Tensor) {
        self.timed("rmsnorm_backward_weight", cost::elementwise(x.numel(), 3.0, 2.0), || {
            kernels::rmsnorm_backward_weight(x.h(), rstd.h(), dy.h(), dw.hm())
        })
    }

    fn swiglu_forward(&self, gate: &Tensor, up: &Tensor) -> Tensor {
        assert_eq!(gate.shape(), up.shape(), "swiglu");
        self.timed("swiglu_forward", cost::elementwise(gate.numel(), 6.0, 3.0), || {
            let mut h = vec![0.0; gate.numel()];
            kernels::swiglu_forward(gate.h(), up.h(), &mut h);
            Tensor::from_host(gate.shape(), h)
        })
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dh: &Tensor) -> (Tensor, Tensor) {
        self.timed("swiglu_backward", cost::elementwise(gate.numel(), 10.0, 5.0), || {
            let mut dg = vec![0.0; gate.numel()];
            let mut du = vec![0.0; gate.numel()];
            kernels::swiglu_backward(gate.h(), up.h(), dh.h(), &mut dg, &mut du);
            (Tensor::from_host(gate.shape(), dg), Tensor::from_host(gate.shape(), du))
        })
    }

    fn rope(&self, x: &mut Tensor, table: &Tensor, spec: RopeSpec, inverse: bool) {
        let cols = x.cols();
        assert!(spec.offset + (spec.heads - 1) * spec.head_stride + spec.dim <= cols, "rope spec {spec:?} on {:?}", x.shape());
        self.timed("rope", cost::elementwise(x.rows() * spec.heads * spec.dim, 3.0, 2.0), || {
            kernels::rope(x.hm(), cols, table.h(), spec, inverse)
        })
    }

    fn attention_forward(&self, q: &Tensor, kv: &Tensor, k_pe: &Tensor, s: AttnShape) -> (Tensor, Tensor) {
        let (t, h) = (s.seq, s.heads);
        let n = s.batch * t;
        assert!(q.numel() == n * h * (s.nope + s.rope) && kv.numel() == n * h * (s.nope + s.v) && k_pe.numel() == n * s.rope);
        self.timed("attention_forward", cost::attention_forward(&s), || {
            let mut out = vec![0.0; n * h * s.v];
            let mut probs = vec![0.0; s.batch * h * t * t];
            let (qd, kvd, ped) = (q.h(), kv.h(), k_pe.h());
            let (qw, kvw) = (h * (s.nope + s.rope), h * (s.nope + s.v));
            let mut jobs: Vec<(usize, &mut [f32], &mut [f32])> =
                out.chunks_mut(t * h * s.v).zip(probs.chunks_mut(h * t * t)).enumerate().map(|(b, (o, p))| (b, o, p)).collect();
            let groups = split(jobs.len(), self.threads);
            self.pool.scope(|sc| {
                let mut rest: &mut [(usize, &mut [f32], &mut [f32])] = &mut jobs;
                for g in &groups {
                    let (mine, tail) = rest.split_at_mut(g.len());
                    rest = tail;
                    sc.spawn(move |_| {
                        for (b, o, p) in mine.iter_mut() {
                            let rows = *b * t..(*b + 1) * t;
                            attention::forward_seq(
                                &qd[rows.start * qw..rows.end * qw],
                                &kvd[rows.start * kvw..rows.end * kvw],
                                &ped[rows.start * s.rope..rows.end * s.rope],
                                &s,
                                o,
                                p,
                            );
                        }
                    });
                }
            });
            (Tensor::from_host(&[n, h * s.v], out), Tensor::from_host(&[s.batch, h, t, t], probs))
        })
    }

    fn attention_backward(&self, q: &Tensor, kv: &Tensor, k_pe: &Tensor, probs: &Tensor, dout: &Tensor, s: AttnShape) -> (Tensor, Tensor, Tensor) {
        let (t, h) = (s.seq, s.heads);
        let n = s.batch * t;
        let (qw, kvw, ow) = (h * (s.nope + s.rope), h * (s.nope + s.v), h * s.v);
        self.timed("attention_backward", cost::attention_backward(&s), || {
            let mut dq = vec![0.0; n * qw];
            let mut dkv = vec![0.0; n * kvw];
            let mut dpe = vec![0.0; n * s.rope];
            let (qd, kvd, ped, pd, dod) = (q.h(), kv.h(), k_pe.h(), probs.h(), dout.h());
            type Job<'a> = (usize, &'a mut [f32], &'a mut [f32], &'a mut [f32]);
            let mut jobs: Vec<Job<'_>> = dq
                .chunks_mut(t * qw)
                .zip(dkv.chunks_mut(t * kvw))
                .zip(dpe.chunks_mut(t * s.rope))
                .enumerate()
                .map(|(b, ((a, c), d))| (b, a, c, d))
                .collect();
            let groups = split(jobs.len(), self.threads);
            self.pool.scope(|sc| {
                let mut rest: &mut [Job<'_>] = &mut jobs;
                for g in &groups {
                    let (mine, tail) = rest.split_at_mut(g.len());
                    rest = tail;
                    sc.spawn(move |_| {
                        let mut scratch = attention::Scratch::new(t);
                        for (b, dqb, dkvb, dpeb) in mine.iter_mut() {
                            let r = *b * t..(*b + 1) * t;
                            attention::backward_seq(
                                &qd[r.start * qw..r.end * qw],
                                &kvd[r.start * kvw..r.end * kvw],
                                &ped[r.start * s.rope..r.end * s.rope],
                                &pd[*b * h * t * t..(*b + 1) * h * t * t],
                                &dod[r.start * ow..r.end * ow],
                                &s,
                                dqb,
                                dkvb,
                                dpeb,
                                &mut scratch,
                            );
                        }
                    });
                }
            });
            (Tensor::from_host(q.shape(), dq), Tensor::from_host(kv.shape(), dkv), Tensor::from_host(k_pe.shape(), dpe))
        })
    }

    fn router_forward(&self, logits: &Tensor, bias: &Tensor, spec: RouterSpec) -> RouterOut {
        let n = logits.rows();
        assert_eq!(logits.cols(), spec.n_experts, "router logits {:?}", logits.shape());
        self.timed("router_forward", cost::elementwise(logits.numel(), 8.0 + spec.top_k as f64, 2.0), || {
            let mut scores = vec![0.0; logits.numel()];
            let mut topk = vec![0u32; n * spec.top_k];
            let mut weights = vec![0.0; n * spec.top_k];
            kernels::router_forward(logits.h(), bias.h(), spec, &mut scores, &mut topk, &mut weights);
            RouterOut {
                scores: Tensor::from_host(logits.shape(), scores),
                topk,
                weights: Tensor::from_host(&[n * spec.top_k, 1], weights),
            }
        })
    }

    fn router_backward(&self, scores: &Tensor, topk: &[u32], dweights: &Tensor, spec: RouterSpec) -> Tensor {
        self.timed("router_backward", cost::elementwise(scores.numel(), 2.0, 2.0), || {
            let mut d = vec![0.0; scores.numel()];
            kernels::router_backward(scores.h(), topk, dweights.h(), spec, &mut d);
            Tensor::from_host(scores.shape(), d)
        })
    }

    fn balance_loss(&self, scores: &Tensor, topk: &[u32], spec: RouterSpec, seq_len: usize, alpha: f32) -> (f32, Tensor) {
        self.timed("balance_loss", cost::elementwise(scores.numel(), 10.0, 3.0), || {
            let mut d = vec![0.0; scores.numel()];
            let loss = kernels::balance_loss(scores.h(), topk, spec, seq_len, alpha, &mut d);
            (loss, Tensor::from_host(scores.shape(), d))
        })
    }

    fn cross_entropy(&self, logits: &Tensor, targets: &[i64], grad_scale: f32) -> (f32, Tensor) {
        assert_eq!(logits.rows(), targets.len(), "cross_entropy {:?} with {} targets", logits.shape(), targets.len());
        self.timed("cross_entropy", cost::elementwise(logits.numel(), 5.0, 2.0), || {
            let mut d = vec![0.0; logits.numel()];
            let loss = kernels::cross_entropy(logits.h(), logits.cols(), targets, grad_scale, &mut d);
            (loss, Tensor::from_host(logits.shape(), d))
        })
    }
}

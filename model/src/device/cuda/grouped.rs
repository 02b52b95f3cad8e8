//! The routed experts' GEMMs as one grouped GEMM per projection (one problem per expert, since
//! each has its own row count), instead of a GEMM per expert.
//!
//! Each call is cuBLAS' `cublasGemmGroupedBatchedEx` (its per-problem pointers go to the GPU;
//! sizes, transposes and scalars stay on the host) or `gemm.cu`'s `grouped_gemm_bf16` (operands
//! rounded to bf16, f32 accumulation; its problem table goes to the GPU in one upload), as
//! [`ExpertKernel`] chooses; [`ExpertKernel::Batched`] also gives whole 128-row tiles of the
//! forward and input gradients to cuBLAS' `cublasGemmBatchedEx` in bf16. The default, from the
//! issue's config on an H100 (`docs/benchmarks.md`, session 14, with the kernel's previous
//! version, which built fragments straight from f32 shared memory): the kernel for the weight
//! gradients (15.2 ms per pass where cuBLAS took 25.4), cuBLAS for the forward and input
//! gradients (14.3 ms where the kernel took 27.4). The kernel's present version (each step's
//! tiles rounded once to bf16, fragments by `ldmatrix`) passed `cuda_ops` on an H100 in session
//! 15 but has not been timed; neither has `Batched`. cuBLAS 13.0
//! groups neither `CUBLAS_COMPUTE_32F_FAST_16BF` on f32 operands nor bf16 operands (`CUDA_R_16BF`
//! A and B with an f32 C): both answer `CUBLAS_STATUS_NOT_SUPPORTED` on an H100, so in bf16
//! precision cuBLAS' grouped call rounds to TF32. Where cuBLAS refuses the call (older library),
//! the device falls back to one GEMM per expert for the rest of the process and says so once
//! on stderr.

use std::ops::Range;
use std::sync::atomic::Ordering;

use cudarc::cublas::sys::{self as blas_sys, cublasOperation_t, cudaDataType};
use cudarc::driver::DevicePtr;

use super::blas::op_of;
use super::{CudaDevice, cost};
use crate::device::{gemm_rows_each, gemm_weight_each};
use crate::tensor::Tensor;

/// The kernel's dynamic shared memory in bytes: `gemm.cu`'s `GG_SMEM` (four stages of two
/// 128 × 36 f32 tiles, and two copies of two 128 × 40 bf16 tiles), 184 KiB.
/// [`super::module::Kernels::load`] raises the kernel's limit to it.
pub(super) const KERNEL_SMEM: u32 = 2 * 4 * 128 * 36 * 4 + 2 * 2 * 128 * 40 * 2;

/// Which of the experts' GEMMs (in bf16 precision) `gemm.cu`'s grouped kernel runs; cuBLAS'
/// grouped GEMM in TF32 runs the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExpertKernel {
    /// None: cuBLAS for all (the baseline).
    Off,
    /// The weight gradients only.
    Weights,
    /// The forward, input-gradient and weight-gradient GEMMs.
    All,
    /// The weight gradients, and of the forward and input-gradient GEMMs the rows left over
    /// after each expert's whole tiles of [`TILE_ROWS`] rows, which cuBLAS' batched GEMM takes
    /// (`cublasGemmBatchedEx`: one size for every problem, bf16 products of the f32 operands,
    /// as the model's other GEMMs).
    Batched,
}

/// The rows of one problem of cuBLAS' batched call under [`ExpertKernel::Batched`].
pub(super) const TILE_ROWS: usize = 128;

/// One problem of a grouped call, row-major: `C (m × n) (+)= op(A) (m × k) · op(B) (k × n)`.
struct Problem {
    a: u64,
    a_trans: bool,
    lda: usize,
    b: u64,
    b_trans: bool,
    ldb: usize,
    c: u64,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
}

impl Problem {
    /// Whether `gemm.cu` can read it: it loads four f32 at a time along each operand's
    /// contiguous direction, so those extents and the leading dimensions are multiples of 4 and
    /// the operands 16-byte aligned.
    fn suits_kernel(&self) -> bool {
        let a_run = if self.a_trans { self.m } else { self.k };
        let b_run = if self.b_trans { self.k } else { self.n };
        [a_run, b_run, self.lda, self.ldb]
            .iter()
            .all(|v| v.is_multiple_of(4))
            && self.a.is_multiple_of(16)
            && self.b.is_multiple_of(16)
    }
}

impl CudaDevice {
    /// Whether the experts' GEMMs are grouped (default) or issued one per expert.
    pub fn set_grouped_gemm(&self, on: bool) {
        self.grouped.store(on, Ordering::Relaxed);
    }

    /// Whether the experts' GEMMs are grouped now (false after cuBLAS refused a call).
    pub fn grouped_gemm(&self) -> bool {
        self.grouped.load(Ordering::Relaxed)
    }

    /// Whether cuBLAS takes [`ExpertKernel::Batched`]'s whole tiles (false after it refused a
    /// call; the tiles then go to the grouped calls).
    pub fn batched_gemm(&self) -> bool {
        self.batched.load(Ordering::Relaxed)
    }

    /// Which of the experts' bf16 GEMMs take `gemm.cu`'s kernel instead of cuBLAS' grouped GEMM
    /// in TF32 (the baseline it is measured against). No effect in fp32 precision.
    pub fn set_expert_kernel(&self, which: ExpertKernel) {
        self.expert_kernel.store(which as u8, Ordering::Relaxed);
    }

    /// Whether the experts' weight gradients (`weight`) or other GEMMs are grouped in one launch
    /// now (by the kernel or by cuBLAS).
    fn grouping(&self, weight: bool) -> bool {
        self.own_kernel(weight) || self.grouped.load(Ordering::Relaxed)
    }

    /// Whether the kernel takes (some of) the experts' weight gradients (`weight`) or their
    /// other GEMMs.
    fn own_kernel(&self, weight: bool) -> bool {
        let which = self.expert_kernel.load(Ordering::Relaxed);
        self.precision == super::Precision::Bf16
            && which != ExpertKernel::Off as u8
            && (weight || which != ExpertKernel::Weights as u8)
    }

    /// Issues `ps` as one grouped GEMM, by the kernel where the device uses it for this kind
    /// (`weight`) and every operand suits it; false if cuBLAS refused it (nothing was issued).
    fn grouped(&self, ps: &[Problem], accumulate: bool, weight: bool) -> bool {
        if ps.is_empty() {
            return true;
        }
        if self.own_kernel(weight) && ps.iter().all(Problem::suits_kernel) {
            let tiles = !weight
                && self.expert_kernel.load(Ordering::Relaxed) == ExpertKernel::Batched as u8;
            if !tiles {
                self.grouped_kernel(ps, accumulate);
                return true;
            }
            if let Some(rest) = self.batched_tiles(ps, accumulate) {
                self.grouped_kernel(&rest, accumulate);
                return true;
            }
        }
        // A problem the kernel cannot read goes to cuBLAS' grouped GEMM only where that is on
        // (else, or after cuBLAS refused, the caller issues one GEMM per expert).
        if !self.grouped.load(Ordering::Relaxed) {
            return false;
        }
        self.ctx
            .bind_to_thread()
            .unwrap_or_else(|e| panic!("CUDA context: {e}"));
        // Column-major, as in blas.rs: Cᵀ = op(B)ᵀ · op(A)ᵀ, so B's pointer and flag come first.
        let ta: Vec<cublasOperation_t> = ps.iter().map(|p| op_of(p.b_trans)).collect();
        let tb: Vec<cublasOperation_t> = ps.iter().map(|p| op_of(p.a_trans)).collect();
        let m: Vec<i32> = ps.iter().map(|p| p.n as i32).collect();
        let n: Vec<i32> = ps.iter().map(|p| p.m as i32).collect();
        let k: Vec<i32> = ps.iter().map(|p| p.k as i32).collect();
        let lda: Vec<i32> = ps.iter().map(|p| p.ldb as i32).collect();
        let ldb: Vec<i32> = ps.iter().map(|p| p.lda as i32).collect();
        let ldc: Vec<i32> = ps.iter().map(|p| p.ldc as i32).collect();
        let alpha = vec![1.0f32; ps.len()];
        let beta = vec![if accumulate { 1.0f32 } else { 0.0 }; ps.len()];
        let sizes = vec![1i32; ps.len()];
        let mut ptrs: Vec<u64> = ps.iter().map(|p| p.b).collect();
        ptrs.extend(ps.iter().map(|p| p.a));
        ptrs.extend(ps.iter().map(|p| p.c));
        let dev_ptrs = self.upload_any(&ptrs);
        let (base, _g) = dev_ptrs.device_ptr(&self.stream);
        let g = ps.len() as u64;
        let compute = match self.precision {
            super::Precision::Fp32 => blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            super::Precision::Bf16 => blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        };
        // SAFETY: every host array has one entry per group and lives past the call; the pointer
        // arrays are in device memory (three blocks of `g` pointers), each pointing into a live
        // allocation that covers its problem; the scalars are host floats.
        let status = unsafe {
            blas_sys::cublasGemmGroupedBatchedEx(
                self.blas.handle(),
                ta.as_ptr(),
                tb.as_ptr(),
                m.as_ptr(),
                n.as_ptr(),
                k.as_ptr(),
                alpha.as_ptr().cast(),
                base as *const *const _,
                cudaDataType::CUDA_R_32F,
                lda.as_ptr(),
                (base + 8 * g) as *const *const _,
                cudaDataType::CUDA_R_32F,
                ldb.as_ptr(),
                beta.as_ptr().cast(),
                (base + 16 * g) as *const *mut _,
                cudaDataType::CUDA_R_32F,
                ldc.as_ptr(),
                ps.len() as i32,
                sizes.as_ptr(),
                compute,
            )
        };
        if status == blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return true;
        }
        if self.grouped.swap(false, Ordering::Relaxed) {
            eprintln!(
                "flotilla: cuBLAS grouped GEMM refused ({status:?}, {:?}); the experts run one GEMM each",
                self.precision
            );
        }
        false
    }

    /// The whole [`TILE_ROWS`]-row tiles of the row problems `ps` (all with the same `n`, `k`,
    /// weight transpose and leading dimensions, as [`CudaDevice::rows_grouped`] makes them) as
    /// one `cublasGemmBatchedEx` with bf16 products; returns the problems of the rows left over,
    /// or `None` if cuBLAS refused the call (nothing was issued; the device then stops asking).
    fn batched_tiles(&self, ps: &[Problem], accumulate: bool) -> Option<Vec<Problem>> {
        let p0 = ps.first()?;
        let uniform = ps.iter().all(|p| {
            !p.a_trans
                && (p.n, p.k, p.lda, p.ldb, p.ldc, p.b_trans)
                    == (p0.n, p0.k, p0.lda, p0.ldb, p0.ldc, p0.b_trans)
        });
        if !uniform || !self.batched.load(Ordering::Relaxed) {
            return None;
        }
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        let mut rest = Vec::new();
        for p in ps {
            let whole = p.m / TILE_ROWS;
            for i in 0..whole {
                let r = (i * TILE_ROWS) as u64;
                a.push(p.a + r * p.lda as u64 * 4);
                b.push(p.b);
                c.push(p.c + r * p.ldc as u64 * 4);
            }
            let done = whole * TILE_ROWS;
            if done < p.m {
                rest.push(Problem {
                    a: p.a + (done * p.lda * 4) as u64,
                    c: p.c + (done * p.ldc * 4) as u64,
                    m: p.m - done,
                    ..*p
                });
            }
        }
        if a.is_empty() {
            return Some(rest);
        }
        self.ctx
            .bind_to_thread()
            .unwrap_or_else(|e| panic!("CUDA context: {e}"));
        let count = a.len();
        // Column-major, as in blas.rs: Cᵀ = op(B)ᵀ · Aᵀ, so B's pointers come first.
        let mut ptrs = b;
        ptrs.extend(a);
        ptrs.extend(c);
        let dev_ptrs = self.upload_any(&ptrs);
        let (base, _g) = dev_ptrs.device_ptr(&self.stream);
        let g = count as u64;
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        // SAFETY: the pointer arrays are in device memory (three blocks of `count` pointers),
        // each into a live allocation that covers its tile (whole tiles lie inside their
        // problem's rows); the scalars are host floats that outlive the call.
        let status = unsafe {
            blas_sys::cublasGemmBatchedEx(
                self.blas.handle(),
                op_of(p0.b_trans),
                cublasOperation_t::CUBLAS_OP_N,
                p0.n as i32,
                TILE_ROWS as i32,
                p0.k as i32,
                (&alpha as *const f32).cast(),
                base as *const *const _,
                cudaDataType::CUDA_R_32F,
                p0.ldb as i32,
                (base + 8 * g) as *const *const _,
                cudaDataType::CUDA_R_32F,
                p0.lda as i32,
                (&beta as *const f32).cast(),
                (base + 16 * g) as *const *mut _,
                cudaDataType::CUDA_R_32F,
                p0.ldc as i32,
                count as i32,
                super::blas::compute_of(self.precision),
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if status == blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Some(rest);
        }
        if self.batched.swap(false, Ordering::Relaxed) {
            eprintln!(
                "flotilla: cuBLAS batched GEMM refused ({status:?}); the experts' tiles go to the grouped calls"
            );
        }
        None
    }

    pub(super) fn rows_grouped(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        ws: &[&Tensor],
        rows: &[Range<usize>],
        trans_w: bool,
        accumulate: bool,
    ) {
        let (ac, cc) = (a.cols(), c.cols());
        for w in ws {
            let (k, n) = if trans_w {
                (w.cols(), w.rows())
            } else {
                (w.rows(), w.cols())
            };
            assert!(
                (k, n) == (ac, cc),
                "grouped GEMM: a weight {:?} for rows of {ac} into {cc} columns",
                w.shape()
            );
        }
        let work = rows
            .iter()
            .zip(ws)
            .fold(cost::Work::default(), |mut w, (r, wt)| {
                let k = if trans_w { wt.cols() } else { wt.rows() };
                let n = if trans_w { wt.rows() } else { wt.cols() };
                let g = cost::gemm(r.len(), n, k, accumulate);
                w.flops += g.flops;
                w.bytes += g.bytes;
                w.gemm = true;
                w
            });
        let done = self.grouping(false)
            && self.op("gemm_grouped", work, || {
                let ps: Vec<Problem> = rows
                    .iter()
                    .zip(ws)
                    .filter(|(r, _)| !r.is_empty())
                    .map(|(r, w)| Problem {
                        a: self.ptr(a) + (r.start * ac * 4) as u64,
                        a_trans: false,
                        lda: ac,
                        b: self.ptr(w),
                        b_trans: trans_w,
                        ldb: w.cols(),
                        c: self.ptr(c) + (r.start * cc * 4) as u64,
                        ldc: cc,
                        m: r.len(),
                        n: cc,
                        k: ac,
                    })
                    .collect();
                self.grouped(&ps, accumulate, false)
            });
        if !done {
            gemm_rows_each(self, c, a, ws, rows, trans_w, accumulate);
        }
    }

    pub(super) fn weight_grouped(
        &self,
        gs: &mut [&mut Tensor],
        dy: &Tensor,
        x: &Tensor,
        rows: &[Range<usize>],
    ) {
        let (dc, xc) = (dy.cols(), x.cols());
        assert!(
            gs.iter().all(|g| g.shape() == [dc, xc]),
            "grouped W: gradients for {dc} x {xc}"
        );
        let work = rows.iter().fold(cost::Work::default(), |mut w, r| {
            let g = cost::gemm(dc, xc, r.len(), true);
            w.flops += g.flops;
            w.bytes += g.bytes;
            w.gemm = true;
            w
        });
        let done = self.grouping(true)
            && self.op("gemm_grouped_weight", work, || {
                let ps: Vec<Problem> = rows
                    .iter()
                    .zip(gs.iter())
                    .filter(|(r, _)| !r.is_empty())
                    .map(|(r, g)| Problem {
                        a: self.ptr(dy) + (r.start * dc * 4) as u64,
                        a_trans: true,
                        lda: dc,
                        b: self.ptr(x) + (r.start * xc * 4) as u64,
                        b_trans: false,
                        ldb: xc,
                        c: self.ptr(g),
                        ldc: xc,
                        m: dc,
                        n: xc,
                        k: r.len(),
                    })
                    .collect();
                self.grouped(&ps, true, true)
            });
        if !done {
            gemm_weight_each(self, gs, dy, x, rows);
        }
    }

    /// `ps` as one launch of `grouped_gemm_bf16`: its problem table (`GemmProblem` of
    /// `gemm.cu`, 72 bytes each, in tile order) goes to the GPU in one upload.
    fn grouped_kernel(&self, ps: &[Problem], accumulate: bool) {
        const TILE: usize = 128;
        let mut table = Vec::with_capacity(ps.len() * 72);
        let mut tiles = 0usize;
        for p in ps {
            for v in [p.a, p.b, p.c] {
                table.extend(v.to_le_bytes());
            }
            for v in [p.lda, p.ldb, p.ldc] {
                table.extend((v as i64).to_le_bytes());
            }
            let fields = [p.m, p.n, p.k, p.a_trans as usize, p.b_trans as usize, tiles];
            for v in fields {
                table.extend((v as i32).to_le_bytes());
            }
            tiles += p.m.div_ceil(TILE) * p.n.div_ceil(TILE);
        }
        if tiles == 0 {
            return;
        }
        let table = self.upload_any(&table);
        let (base, _g) = table.device_ptr(&self.stream);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (tiles as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: KERNEL_SMEM,
        };
        self.run(
            "grouped_gemm_bf16",
            cfg,
            &[
                super::module::Arg::P(base),
                super::module::Arg::I(ps.len() as i32),
                super::module::Arg::I(accumulate as i32),
            ],
        );
    }
}

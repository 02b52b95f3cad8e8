//! GEMMs through cuBLAS on row-major views: the one place that knows cuBLAS is column-major.
//!
//! A row-major `r × c` matrix is, to cuBLAS, its column-major transpose with leading dimension
//! `c`. So `C = op(A) · op(B)` (row-major) is issued as `Cᵀ = op(B)ᵀ · op(A)ᵀ` (column-major):
//! the operands swap, the transpose flags stay with their matrices, `m` and `n` swap.

use std::sync::Arc;

use cudarc::cublas::result as cublas;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasHandle_t, cublasOperation_t, cudaDataType,
};
use cudarc::driver::CudaStream;

use super::super::{Mat, MatMut};
use super::{CudaDevice, CudaError, Precision};

/// A cuBLAS handle bound to the device's stream.
pub(super) struct Blas {
    handle: cublasHandle_t,
    ctx: Arc<cudarc::driver::CudaContext>,
}

// SAFETY: the handle is used only by the device that owns it, whose operations are issued one at
// a time to one stream; cuBLAS handles may move between host threads.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: created in `Blas::new` and destroyed once.
        let _ = unsafe { cublas::destroy_handle(self.handle) };
    }
}

/// Whether the cuBLAS loaded has `cublasGemmGroupedBatchedEx` (12.5 and later).
pub(super) fn has_grouped_gemm() -> bool {
    use cudarc::cublas::sys::{cublasGetProperty, cublasStatus_t, libraryPropertyType};
    let version = |p: libraryPropertyType| -> Option<i32> {
        // cudarc panics when the library or the symbol is missing.
        std::panic::catch_unwind(move || {
            let mut v = 0i32;
            // SAFETY: `cublasGetProperty` writes one int; it needs no handle.
            let status = unsafe { cublasGetProperty(p, &mut v) };
            (status == cublasStatus_t::CUBLAS_STATUS_SUCCESS).then_some(v)
        })
        .ok()
        .flatten()
    };
    match (
        version(libraryPropertyType::MAJOR_VERSION),
        version(libraryPropertyType::MINOR_VERSION),
    ) {
        (Some(major), Some(minor)) => (major, minor) >= (12, 5),
        _ => false,
    }
}

/// One operand as cuBLAS sees it: pointer, transpose flag, leading dimension.
struct Operand {
    ptr: u64,
    op: cublasOperation_t,
    ld: i32,
}

fn operand(dev: &CudaDevice, m: &Mat<'_>) -> Operand {
    let cols = m.t.cols();
    Operand {
        ptr: dev.ptr(m.t) + (m.rows.start * cols * 4) as u64,
        op: if m.trans {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        },
        ld: cols.max(1) as i32,
    }
}

/// A strided batch of row-major products `C_i = op(A_i) · op(B_i)`, for attention.
pub(super) struct Batched {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub a_trans: bool,
    pub a_cols: usize,
    pub a_stride: usize,
    pub b: u64,
    pub b_trans: bool,
    pub b_cols: usize,
    pub b_stride: usize,
    pub c: u64,
    /// Leading dimension of C (its row length in memory).
    pub c_ld: usize,
    pub c_stride: usize,
    pub count: usize,
    pub accumulate: bool,
}

/// cuBLAS's transpose flag.
pub(super) fn op_of(t: bool) -> cublasOperation_t {
    if t {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// The cuBLAS compute type of a precision (plain and strided-batched GEMMs).
pub(super) fn compute_of(p: Precision) -> cublasComputeType_t {
    match p {
        Precision::Fp32 => cublasComputeType_t::CUBLAS_COMPUTE_32F,
        Precision::Bf16 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
    }
}

impl Blas {
    pub(super) fn new(stream: &Arc<CudaStream>) -> Result<Blas, CudaError> {
        stream
            .context()
            .bind_to_thread()
            .map_err(CudaError::driver("binding the context"))?;
        let handle = cublas::create_handle().map_err(|e| CudaError::Blas(format!("{e:?}")))?;
        // SAFETY: a live handle and the device's live stream.
        unsafe { cublas::set_stream(handle, stream.cu_stream() as _) }
            .map_err(|e| CudaError::Blas(format!("{e:?}")))?;
        Ok(Blas {
            handle,
            ctx: stream.context().clone(),
        })
    }

    /// The raw handle (for the grouped GEMM of `grouped.rs`).
    pub(super) fn handle(&self) -> cublasHandle_t {
        self.handle
    }

    /// `c (+)= a · b` on row-major views (shapes checked by the caller).
    pub(super) fn gemm(
        &self,
        dev: &CudaDevice,
        c: MatMut<'_>,
        a: Mat<'_>,
        b: Mat<'_>,
        accumulate: bool,
        precision: Precision,
    ) {
        let (m, k) = a.dims();
        let n = b.dims().1;
        if m == 0 || n == 0 {
            return;
        }
        let c_ptr = dev.ptr(c.t) + (c.rows.start * n * 4) as u64;
        if k == 0 {
            if !accumulate {
                dev.run(
                    "fill_f32",
                    super::module::over(m * n),
                    &[
                        super::Arg::P(c_ptr),
                        super::Arg::F(0.0),
                        super::Arg::L((m * n) as i64),
                    ],
                );
            }
            return;
        }
        let (oa, ob) = (operand(dev, &a), operand(dev, &b));
        self.batched(
            dev,
            &Batched {
                m,
                n,
                k,
                a: oa.ptr,
                a_trans: oa.op == cublasOperation_t::CUBLAS_OP_T,
                a_cols: oa.ld as usize,
                a_stride: 0,
                b: ob.ptr,
                b_trans: ob.op == cublasOperation_t::CUBLAS_OP_T,
                b_cols: ob.ld as usize,
                b_stride: 0,
                c: c_ptr,
                c_ld: n,
                c_stride: 0,
                count: 1,
                accumulate,
            },
            precision,
        );
    }

    /// A strided batch of row-major GEMMs (`count` = 1 is a plain GEMM).
    pub(super) fn batched(&self, dev: &CudaDevice, g: &Batched, precision: Precision) {
        dev.ctx
            .bind_to_thread()
            .unwrap_or_else(|e| panic!("CUDA context: {e}"));
        let alpha = 1.0f32;
        let beta = if g.accumulate { 1.0f32 } else { 0.0f32 };
        // Column-major: Cᵀ (n × m, ld c_ld) = op(B)ᵀ (n × k) · op(A)ᵀ (k × m).
        // SAFETY: the pointers are live device allocations covering every matrix of the batch
        // (the callers' shapes), alpha/beta are host scalars that outlive the call.
        unsafe {
            cublas::gemm_strided_batched_ex(
                self.handle,
                op_of(g.b_trans),
                op_of(g.a_trans),
                g.n as i32,
                g.m as i32,
                g.k as i32,
                (&alpha as *const f32).cast(),
                g.b as *const _,
                cudaDataType::CUDA_R_32F,
                g.b_cols as i32,
                g.b_stride as i64,
                g.a as *const _,
                cudaDataType::CUDA_R_32F,
                g.a_cols as i32,
                g.a_stride as i64,
                (&beta as *const f32).cast(),
                g.c as *mut _,
                cudaDataType::CUDA_R_32F,
                g.c_ld as i32,
                g.c_stride as i64,
                g.count as i32,
                compute_of(precision),
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .unwrap_or_else(|e| {
            panic!(
                "cuBLAS GEMM {}x{}x{} (batch {}) failed: {e:?}",
                g.m, g.n, g.k, g.count
            )
        });
    }
}

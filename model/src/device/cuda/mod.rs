//! The CUDA device (feature `cuda`): every tensor in GPU memory, GEMMs through cuBLAS, every
//! other operation a CUDA C kernel of `kernels.cu` compiled by NVRTC at run time.
//!
//! One device is one GPU context and one compute stream; every operation is issued to that
//! stream and returns without waiting, except those whose result the trait hands to the host
//! (the router's top-k indices, which decide the expert shapes; the losses; Σg²; downloads).
//! Memory comes from the driver's stream-ordered pool (`cuMemAllocAsync`), whose release
//! threshold is raised so that freed blocks stay cached for the next step: the caching
//! allocator. cudarc's per-allocation event tracking is off, since all work is on one stream.
//!
//! Costs: FLOPs and bytes are counted per operation as on the CPU ([`super::cost`]); seconds
//! are the GPU time between the first operation after a [`Device::take_cost`] and the next
//! one, read from CUDA events once the GPU has passed them ([`Device::take_cost`] does not
//! wait). With [`CudaDevice::set_profiling`] every operation is bracketed by
//! its own events and [`CudaDevice::take_profile`] gives each kernel's time (the per-kernel
//! table of `docs/benchmarks.md`).
//!
//! Precision ([`Precision`]): tensors and the optimizer are f32; `Fp32` GEMMs are plain f32
//! (`cublasSgemm`), `Bf16` GEMMs round their inputs to bf16 on the tensor cores and accumulate in
//! f32 (`CUBLAS_COMPUTE_32F_FAST_16BF`).

mod attention;
mod blas;
mod copies;
mod flash;
mod grouped;
mod layers;
mod module;
mod pool;
mod profile;
mod staging;
mod train;

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::cost::{self, Work};
use super::{AdamWArgs, AttnShape, Cost, Device, Mat, MatMut, RopeSpec, RouterOut, RouterSpec};
use crate::tensor::Tensor;
pub use grouped::ExpertKernel;
use module::{Arg, Kernels, launch};
use pool::keep_freed_memory;
pub use pool::{pool_peak_bytes, reset_pool_peak};
pub use profile::{HostTime, KernelTime, set_host_timing, take_host_times};
use profile::{Stats, host_timed};

/// What can go wrong while a CUDA device starts.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A driver call failed (no GPU, no driver, out of memory...).
    #[error("CUDA {what}: {why}")]
    Driver { what: &'static str, why: String },
    /// NVRTC refused `kernels.cu`.
    #[error("NVRTC could not compile kernels.cu: {0}")]
    Compile(String),
    /// cuBLAS could not start.
    #[error("cuBLAS: {0}")]
    Blas(String),
}

impl CudaError {
    pub(crate) fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
        move |e| CudaError::Driver {
            what,
            why: e.to_string(),
        }
    }
}

/// Which implementations a [`CudaDevice`] starts with for the experts' GEMMs and attention
/// (each device can change its own afterwards: `set_expert_kernel`, `set_grouped_gemm`,
/// `set_fused_attention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelChoice {
    /// Which bf16 expert GEMMs `gemm.cu`'s grouped kernel runs.
    pub expert_kernel: ExpertKernel,
    /// The others by cuBLAS' grouped GEMM (else one cuBLAS GEMM per expert).
    pub grouped: bool,
    /// bf16 attention by `flash.cu`'s fused kernels where the head dims fit (else cuBLAS around
    /// kept probabilities).
    pub fused_attention: bool,
}

impl Default for KernelChoice {
    /// The fastest measured on the config (`docs/benchmarks.md`).
    fn default() -> Self {
        KernelChoice {
            expert_kernel: ExpertKernel::Weights,
            grouped: true,
            fused_attention: true,
        }
    }
}

static START_CHOICE: Mutex<Option<KernelChoice>> = Mutex::new(None);

/// What every [`CudaDevice`] made after this call starts with, in this process (how `flotilla
/// bench step` runs a training job's devices with other kernels).
pub fn set_start_kernels(choice: KernelChoice) {
    *START_CHOICE.lock().unwrap_or_else(|e| e.into_inner()) = Some(choice);
}

fn start_kernels() -> KernelChoice {
    START_CHOICE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_default()
}

/// How GEMMs round their inputs (everything else is f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32 inputs, f32 arithmetic.
    Fp32,
    /// Inputs rounded to bf16 on the tensor cores, f32 accumulation and output.
    Bf16,
}

/// One GPU as a device.
pub struct CudaDevice {
    // Dropped in this order: the cuBLAS handle before the stream it is bound to.
    blas: blas::Blas,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Kernels,
    precision: Precision,
    stats: Mutex<Stats>,
    gpu_name: String,
    /// Whether the experts' GEMMs are grouped (`grouped.rs`).
    grouped: AtomicBool,
    /// Whether cuBLAS takes `ExpertKernel::Batched`'s tiles (false after it refused a call).
    batched: AtomicBool,
    /// Which of the experts' bf16 GEMMs take `gemm.cu`'s grouped kernel (`grouped.rs`): an
    /// [`ExpertKernel`] as u8.
    expert_kernel: std::sync::atomic::AtomicU8,
    /// Whether bf16 attention takes the fused kernels (`flash.rs`) where they fit.
    fused_attention: AtomicBool,
    flash: flash::FlashCache,
    /// Pinned host memory that uploads pass through.
    staging: Mutex<staging::Staging>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice {{ ordinal: {}, gpu: {:?}, precision: {:?} }}",
            self.ctx.ordinal(),
            self.gpu_name,
            self.precision
        )
    }
}

/// Number of GPUs the driver sees (0 without a driver or a GPU).
pub fn device_count() -> usize {
    // cudarc loads the driver library lazily and panics where there is none: look first.
    // SAFETY: loading libcuda runs its initialisers, as any CUDA program does.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    std::panic::catch_unwind(CudaContext::device_count)
        .ok()
        .and_then(|r| r.ok())
        .map_or(0, |n| n.max(0) as usize)
}

impl CudaDevice {
    /// A device on GPU `ordinal` with its own stream, cuBLAS handle and kernels.
    pub fn new(ordinal: usize, precision: Precision) -> Result<CudaDevice, CudaError> {
        if device_count() <= ordinal {
            return Err(CudaError::Driver {
                what: "device",
                why: format!(
                    "no GPU {ordinal}: the driver sees {} (is libcuda.so on the library path?)",
                    device_count()
                ),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(CudaError::driver("context"))?;
        // SAFETY: no slice of this context exists yet; all its work goes to one stream, so the
        // per-slice events that order work between streams are not needed.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        let stream = ctx.new_stream().map_err(CudaError::driver("stream"))?;
        let blas = blas::Blas::new(&stream)?;
        let k = Kernels::load(&ctx)?;
        let staging = Mutex::new(staging::Staging::new(&ctx)?);
        let gpu_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let choice = start_kernels();
        Ok(CudaDevice {
            ctx,
            stream,
            blas,
            k,
            precision,
            stats: Mutex::new(Stats::default()),
            gpu_name,
            grouped: AtomicBool::new(choice.grouped && blas::has_grouped_gemm()),
            batched: AtomicBool::new(true),
            expert_kernel: std::sync::atomic::AtomicU8::new(choice.expert_kernel as u8),
            fused_attention: AtomicBool::new(choice.fused_attention),
            flash: flash::FlashCache::default(),
            staging,
        })
    }

    /// The GPU's name as the driver gives it.
    pub fn gpu_name(&self) -> &str {
        &self.gpu_name
    }

    /// Waits until every operation issued so far has finished.
    pub fn synchronize(&self) {
        self.stream
            .synchronize()
            .unwrap_or_else(|e| panic!("CUDA stream failed: {e}"));
    }

    // ---- helpers for the operation files --------------------------------------------------

    /// A device pointer to `t`'s values (`t` must be this kind of device's tensor).
    fn ptr(&self, t: &Tensor) -> u64 {
        let s = t.cuda().unwrap_or_else(|| {
            panic!("CUDA kernel given a tensor that is not in GPU memory: {t:?}")
        });
        let (p, _no_sync) = s.device_ptr(&self.stream);
        p
    }

    /// An uninitialised allocation of `n` f32s (at least one: the driver may refuse empty
    /// allocations, so an empty tensor holds one unused value).
    fn alloc(&self, n: usize) -> CudaSlice<f32> {
        // SAFETY: the callers overwrite every element before reading (see `Device::empty`).
        unsafe { self.stream.alloc::<f32>(n.max(1)) }
            .unwrap_or_else(|e| panic!("CUDA allocation of {n} floats failed: {e}"))
    }

    fn out(&self, shape: &[usize]) -> Tensor {
        Tensor::from_cuda(shape, self.alloc(shape.iter().product()))
    }

    /// Host values `data` (of any device type) as a new GPU buffer, through the pinned ring
    /// (`staging.rs`) so that the host does not wait for the stream.
    fn upload_any<T>(&self, data: &[T]) -> CudaSlice<T>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        if data.is_empty() {
            return self
                .stream
                .alloc_zeros::<T>(1)
                .unwrap_or_else(|e| panic!("CUDA allocation failed: {e}"));
        }
        host_timed("upload", || {
            // SAFETY: every element is written by the copy below before anything reads it.
            let mut dst = unsafe { self.stream.alloc::<T>(data.len()) }
                .unwrap_or_else(|e| panic!("CUDA allocation of an upload failed: {e}"));
            // SAFETY: `T` is one of the plain numeric types the device uploads (f32, u32, u8,
            // u64: no padding, every bit pattern valid), so its bytes are readable as `u8`.
            let bytes = unsafe {
                std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data))
            };
            let staged = {
                let (p, _no_sync) = dst.device_ptr_mut(&self.stream);
                let mut ring = self.staging.lock().unwrap_or_else(|e| e.into_inner());
                ring.upload(&self.stream, p, bytes)
                    .unwrap_or_else(|e| panic!("CUDA upload failed: {e}"))
            };
            if !staged {
                self.stream
                    .memcpy_htod(data, &mut dst)
                    .unwrap_or_else(|e| panic!("CUDA upload failed: {e}"));
            }
            dst
        })
    }

    fn run(&self, name: &'static str, cfg: cudarc::driver::LaunchConfig, args: &[Arg]) {
        launch(&self.stream, self.k.get(name), cfg, args);
    }

    /// Issues `f` as operation `name` doing `work`: counted, and timed when profiling.
    fn op<R>(&self, name: &'static str, work: Work, f: impl FnOnce() -> R) -> R {
        let token = self.stats().begin(&self.ctx, &self.stream, name);
        let r = host_timed(name, f);
        self.stats().end(&self.stream, token, work);
        r
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether bf16 attention takes the fused kernels of `flash.cu` (the default where the head
    /// dims fit) or the cuBLAS GEMMs around a kept `[B, H, T, T]` probability tensor. A
    /// backward follows what its forward did, whatever this says then.
    pub fn set_fused_attention(&self, on: bool) {
        self.fused_attention
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether attention of shape `s` takes the fused kernels now.
    fn fused(&self, s: &AttnShape) -> bool {
        self.precision == Precision::Bf16
            && self
                .fused_attention
                .load(std::sync::atomic::Ordering::Relaxed)
            && flash::fits(s)
    }

    /// Whether every operation is timed on its own (slower: two events per operation).
    pub fn set_profiling(&self, on: bool) {
        self.stats().profiling = on;
    }

    /// Each kernel's calls, GPU seconds, FLOPs and bytes since the last call (waits for the
    /// stream), sorted by time.
    pub fn take_profile(&self) -> Vec<KernelTime> {
        self.synchronize();
        self.stats().take_profile()
    }
}

impl CudaDevice {
    /// Operation `name`: `c (+)= a · b` in `precision`.
    fn gemm_at(
        &self,
        name: &'static str,
        c: MatMut<'_>,
        a: Mat<'_>,
        b: Mat<'_>,
        accumulate: bool,
        precision: Precision,
    ) {
        let (m, k) = a.dims();
        let (k2, n) = b.dims();
        assert!(
            k == k2 && c.rows.len() == m && c.t.cols() == n,
            "{name}: c {:?}[{:?}] = a {:?} · b {:?}",
            c.t.shape(),
            c.rows,
            a.dims(),
            b.dims()
        );
        self.op(name, cost::gemm(m, n, k, accumulate), || {
            self.blas.gemm(self, c, a, b, accumulate, precision)
        });
    }
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        format!("cuda:{} ({})", self.ctx.ordinal(), self.gpu_name)
    }

    fn take_cost(&self) -> Cost {
        self.stats().take_cost(&self.stream)
    }

    // ---- memory -------------------------------------------------------------------------

    fn zeros(&self, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let s = self.stream.alloc_zeros::<f32>(n.max(1));
        Tensor::from_cuda(
            shape,
            s.unwrap_or_else(|e| panic!("CUDA allocation failed: {e}")),
        )
    }

    fn empty(&self, shape: &[usize]) -> Tensor {
        self.out(shape)
    }

    fn upload(&self, shape: &[usize], data: &[f32]) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "upload {shape:?}"
        );
        Tensor::from_cuda(shape, self.upload_any(data))
    }

    fn download(&self, t: &Tensor) -> Option<Vec<f32>> {
        let s = t.cuda()?;
        if t.numel() == 0 {
            return Some(Vec::new());
        }
        Some(host_timed("download", || {
            self.stream
                .clone_dtoh(&s.slice(0..t.numel()))
                .unwrap_or_else(|e| panic!("CUDA download failed: {e}"))
        }))
    }

    fn copy(&self, t: &Tensor) -> Tensor {
        self.copy_op(t)
    }

    // ---- GEMM -----------------------------------------------------------------------------

    fn gemm(&self, c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
        self.gemm_at("gemm", c, a, b, accumulate, self.precision)
    }

    fn gemm_full_precision(&self, c: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
        self.gemm_at("gemm f32", c, a, b, accumulate, Precision::Fp32)
    }

    fn gemm_rows_grouped(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        ws: &[&Tensor],
        rows: &[Range<usize>],
        trans_w: bool,
        accumulate: bool,
    ) {
        self.rows_grouped(c, a, ws, rows, trans_w, accumulate)
    }

    fn gemm_weight_grouped(
        &self,
        gs: &mut [&mut Tensor],
        dy: &Tensor,
        x: &Tensor,
        rows: &[Range<usize>],
    ) {
        self.weight_grouped(gs, dy, x, rows)
    }

    // ---- element-wise and copies ----------------------------------------------------------

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

    fn combine_rows(&self, src: &Tensor, s: Option<&Tensor>, index: &[u32], rows: usize) -> Tensor {
        self.combine_rows_op(src, s, index, rows)
    }

    fn combine_rows_backward(
        &self,
        dy: &Tensor,
        src: &Tensor,
        s: &Tensor,
        index: &[u32],
    ) -> (Tensor, Tensor) {
        self.combine_rows_backward_op(dy, src, s, index)
    }

    // ---- layer kernels (layers.rs, attention.rs) -------------------------------------------

    fn embedding_forward(&self, table: &Tensor, ids: &[u32]) -> Tensor {
        self.gather_rows(table, ids)
    }

    fn embedding_backward(&self, ids: &[u32], dy: &Tensor, dtable: &mut Tensor) {
        self.scatter_add_rows(dtable, dy, ids)
    }

    fn rmsnorm_forward(&self, x: &Tensor, w: &Tensor, eps: f32) -> (Tensor, Tensor) {
        self.rmsnorm_fwd(x, w, eps)
    }

    fn rmsnorm_backward_input(&self, x: &Tensor, w: &Tensor, rstd: &Tensor, dy: &Tensor) -> Tensor {
        self.rmsnorm_bwd_input(x, w, rstd, dy)
    }

    fn rmsnorm_backward_weight(&self, x: &Tensor, rstd: &Tensor, dy: &Tensor, dw: &mut Tensor) {
        self.rmsnorm_bwd_weight(x, rstd, dy, dw)
    }

    fn swiglu_forward(&self, gate: &Tensor, up: &Tensor) -> Tensor {
        self.swiglu_fwd(gate, up)
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dh: &Tensor) -> (Tensor, Tensor) {
        self.swiglu_bwd(gate, up, dh)
    }

    fn rope(&self, x: &mut Tensor, table: &Tensor, spec: RopeSpec, inverse: bool) {
        self.rope_apply(x, table, spec, inverse)
    }

    fn attention_forward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor) {
        if self.fused(&s) {
            self.flash_forward(q, kv, k_pe, s)
        } else {
            self.attn_forward(q, kv, k_pe, s)
        }
    }

    fn attention_backward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        out: &Tensor,
        saved: &Tensor,
        dout: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor, Tensor) {
        if saved.shape().len() == 3 {
            self.flash_backward(q, kv, k_pe, out, saved, dout, s)
        } else {
            self.attn_backward(q, kv, k_pe, saved, dout, s)
        }
    }

    fn router_forward(&self, logits: &Tensor, bias: &Tensor, spec: RouterSpec) -> RouterOut {
        self.router_fwd(logits, bias, spec)
    }

    fn router_backward(
        &self,
        scores: &Tensor,
        topk: &[u32],
        dweights: &Tensor,
        spec: RouterSpec,
    ) -> Tensor {
        self.router_bwd(scores, topk, dweights, spec)
    }

    fn balance_loss(
        &self,
        scores: &Tensor,
        topk: &[u32],
        spec: RouterSpec,
        seq_len: usize,
        alpha: f32,
    ) -> (f32, Tensor) {
        self.balance(scores, topk, spec, seq_len, alpha)
    }

    fn cross_entropy(&self, logits: &Tensor, targets: &[i64], grad_scale: f32) -> (f32, Tensor) {
        self.ce(logits, targets, grad_scale)
    }

    // ---- training state (train.rs) --------------------------------------------------------

    fn fill(&self, t: &mut Tensor, value: f32) {
        self.op("fill", cost::elementwise(t.numel(), 0.0, 1.0), || {
            self.fill_n(t, value)
        });
    }

    fn scale(&self, t: &mut Tensor, s: f32) {
        self.scale_all(t, s)
    }

    fn fill_many(&self, ts: &mut [&mut Tensor], value: f32) {
        self.fill_many_op(ts, value)
    }

    fn scale_many(&self, ts: &mut [&mut Tensor], s: f32) {
        self.scale_many_op(ts, s)
    }

    fn sum_squares(&self, ts: &[&Tensor]) -> f64 {
        self.sum_sq(ts)
    }

    fn adamw(&self, params: &mut [AdamWArgs<'_>]) {
        self.adamw_all(params)
    }

    fn pack(&self, ts: &[&Tensor], scale: f32) -> Tensor {
        self.pack_all(ts, scale)
    }

    fn unpack(&self, flat: &Tensor, ts: &mut [&mut Tensor]) {
        self.unpack_all(flat, ts)
    }

    fn write(&self, t: &mut Tensor, data: &[f32]) {
        assert_eq!(t.numel(), data.len(), "write {:?}", t.shape());
        *t = self.upload(t.shape(), data);
    }

    fn take_values(&self, t: Tensor) -> Option<Vec<f32>> {
        self.download(&t)
    }

    fn adopt(&self, shape: &[usize], values: Option<Vec<f32>>) -> Tensor {
        let n = shape.iter().product::<usize>();
        match values {
            Some(v) => {
                assert_eq!(v.len(), n, "adopt: {} values for {shape:?}", v.len());
                self.upload(shape, &v)
            }
            None => self.zeros(shape),
        }
    }
}

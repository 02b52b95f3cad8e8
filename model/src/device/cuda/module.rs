//! The CUDA C kernels of `kernels.cu`: compiled by NVRTC once per process (per GPU
//! architecture) and loaded into each device's context as one module.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

use super::CudaError;

/// The kernels' source, compiled at run time (nothing needs nvcc at build time): the
/// element-wise, reduction and layout kernels, then the tensor-core helpers and the experts'
/// grouped GEMM.
pub const SOURCE: &str = concat!(
    include_str!("kernels.cu"),
    "\n",
    include_str!("tensor_core.cuh"),
    "\n",
    include_str!("gemm.cu")
);

/// Every `extern "C"` kernel of [`SOURCE`] (`model/tests/kernel_names.rs` checks that the two
/// agree, and that every kernel the device launches by name is here).
const NAMES: &[&str] = &[
    "fill_f32",
    "scale_f32",
    "add_assign_f32",
    "mt_fill",
    "mt_scale",
    "mt_pack",
    "mt_unpack",
    "mt_sum_squares",
    "mt_adamw",
    "copy_cols",
    "gather_rows",
    "scatter_add_sorted",
    "scale_rows",
    "rows_dot",
    "combine_rows",
    "combine_rows_bwd",
    "rmsnorm_fwd",
    "rmsnorm_bwd_input",
    "rmsnorm_bwd_weight_partial",
    "add_column_sums",
    "swiglu_fwd",
    "swiglu_bwd",
    "rope",
    "to_heads",
    "from_heads",
    "sum_heads",
    "causal_softmax",
    "causal_softmax_bwd",
    "router_fwd",
    "router_bwd",
    "row_sums",
    "balance_stats",
    "balance_grad",
    "cross_entropy",
    "grouped_gemm_bf16",
];

/// PTX text by compute capability: one NVRTC compilation per architecture per process.
fn ptx_cache() -> &'static Mutex<HashMap<(i32, i32), String>> {
    static CACHE: OnceLock<Mutex<HashMap<(i32, i32), String>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn ptx_for(cc: (i32, i32)) -> Result<String, CudaError> {
    let mut cache = ptx_cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(&cc) {
        return Ok(p.clone());
    }
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{}{}", cc.0, cc.1),
            "--std=c++17".into(),
        ],
        name: Some("flotilla_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| CudaError::Compile(format!("{e:?}")))?
        .to_src();
    cache.insert(cc, ptx.clone());
    Ok(ptx)
}

/// The loaded kernels of one context, by name.
pub struct Kernels {
    by_name: HashMap<&'static str, CudaFunction>,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernels({} loaded)", self.by_name.len())
    }
}

impl Kernels {
    /// Compiles (or takes from the process's cache) and loads every kernel into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Kernels, CudaError> {
        let cc = ctx
            .compute_capability()
            .map_err(CudaError::driver("compute capability"))?;
        let module = ctx
            .load_module(Ptx::from_src(ptx_for(cc)?))
            .map_err(CudaError::driver("loading the kernels"))?;
        let mut by_name = HashMap::new();
        for &n in NAMES {
            let f = module
                .load_function(n)
                .map_err(CudaError::driver("loading a kernel"))?;
            by_name.insert(n, f);
        }
        // The grouped GEMM asks for more than the default 48 KiB of dynamic shared memory.
        let attr = cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let gemm: &CudaFunction = by_name
            .get("grouped_gemm_bf16")
            .ok_or_else(|| CudaError::Compile("no grouped_gemm_bf16 in kernels.cu".into()))?;
        gemm.set_attribute(attr, super::grouped::KERNEL_SMEM as i32)
            .map_err(CudaError::driver("shared memory size of the grouped GEMM"))?;
        Ok(Kernels { by_name })
    }

    /// The kernel called `name` (one of [`NAMES`]: anything else is a programming error).
    pub fn get(&self, name: &str) -> &CudaFunction {
        self.by_name
            .get(name)
            .unwrap_or_else(|| panic!("no CUDA kernel {name:?} in kernels.cu"))
    }
}

/// One kernel argument.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device pointer.
    P(u64),
    /// `int`.
    I(i32),
    /// `long long`.
    L(i64),
    /// `float`.
    F(f32),
}

/// Launches `f` on `stream` with `args` in order (panics on a launch error: a programming error
/// or a lost device, which the supervisor handles as a failed rank).
pub fn launch(
    stream: &Arc<cudarc::driver::CudaStream>,
    f: &CudaFunction,
    cfg: LaunchConfig,
    args: &[Arg],
) {
    let mut b = stream.launch_builder(f);
    for a in args {
        match a {
            Arg::P(p) => b.arg(p),
            Arg::I(i) => b.arg(i),
            Arg::L(l) => b.arg(l),
            Arg::F(x) => b.arg(x),
        };
    }
    // SAFETY: every kernel of kernels.cu takes exactly the arguments its caller in cuda/*.rs
    // passes, in order, and the pointers are live allocations of the sizes the launch covers.
    unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("CUDA kernel launch failed: {e}"));
}

/// Threads per block of the element-wise kernels.
pub const BLOCK: u32 = 256;

/// A grid-stride launch over `n` items.
pub fn over(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` per row, `rows` rows.
pub fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

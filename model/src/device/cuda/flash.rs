//! Fused causal attention in bf16 (`flash.cu`): the forward keeps each query row's log-sum-exp
//! instead of the `[B, H, T, T]` probabilities, and backward recomputes them tile by tile.
//!
//! `flash.cu` is compiled by NVRTC for each head shape (heads, nope, rope, v) on first use and
//! cached per process; each device loads the shapes it meets. Taken in bf16 precision where the
//! head dims fit the kernels' register budget ([`fits`]), which is the default
//! ([`CudaDevice::set_fused_attention`] turns it off); everything else takes the cuBLAS path of
//! `attention.rs`.
//!
//! On the config on an H100 (`docs/benchmarks.md`, session 14) a forward + backward took
//! 5.1 + 18.2 ms (the cuBLAS path: 14.6 + 25.8 in the session's other call), and a whole step
//! 119.1 ms against the cuBLAS path's 134.8 in the same call, with 9 GiB less memory;
//! `cuda_ops.rs` checks it against the CPU on the GPU, `model/tests/kernel_sim.rs` against
//! double-precision attention on the CPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

use super::module::{Arg, launch};
use super::{CudaDevice, cost};
use crate::device::AttnShape;
use crate::tensor::Tensor;

/// The fused kernels behind the tensor-core helpers they use.
const SOURCE: &str = concat!(
    include_str!("tensor_core.cuh"),
    "\n",
    include_str!("flash.cu")
);

/// Queries per block of `flash_fwd` and `flash_bwd_q`, keys per block of `flash_bwd_kv` (and
/// what the packed operands' rows are rounded up to). As in `flash.cu`.
const BQ: usize = 64;
const THREADS: u32 = 128;

/// The widest heads the kernels take: their accumulators live in registers.
const MAX_QK: usize = 192;
const MAX_V: usize = 128;

fn round16(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Whether the fused kernels take attention of shape `s`.
pub(super) fn fits(s: &AttnShape) -> bool {
    s.heads > 0 && round16(s.nope + s.rope) <= MAX_QK && round16(s.v) <= MAX_V && s.v > 0
}

/// What one compilation is specialised for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct HeadShape {
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
}

impl HeadShape {
    fn of(s: &AttnShape) -> HeadShape {
        HeadShape {
            heads: s.heads,
            nope: s.nope,
            rope: s.rope,
            v: s.v,
        }
    }

    /// Packed widths: the head dims rounded up to 16.
    fn widths(&self) -> (usize, usize) {
        (round16(self.nope + self.rope), round16(self.v))
    }

    /// Dynamic shared memory (bytes) of each kernel: 128 rows of keys (or queries) and 128 of
    /// values (or output gradients), each row padded by 8 bf16 (`flash.cu`).
    fn smem(&self) -> u32 {
        let (dqk, dv) = self.widths();
        (2 * 128 * (dqk + 8 + dv + 8)) as u32
    }
}

/// PTX by (compute capability, head shape).
type PtxCache = Mutex<HashMap<((i32, i32), HeadShape), String>>;

fn ptx_for(cc: (i32, i32), h: HeadShape) -> String {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(&(cc, h)) {
        return p.clone();
    }
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{}{}", cc.0, cc.1),
            "--std=c++17".into(),
            format!("-DHEADS={}", h.heads),
            format!("-DNOPE={}", h.nope),
            format!("-DROPE={}", h.rope),
            format!("-DDV={}", h.v),
        ],
        name: Some("flotilla_flash.cu".into()),
        ..Default::default()
    };
    // The source is ours and the shape passed `fits`: a refusal is a programming error.
    let ptx = compile_ptx_with_opts(SOURCE, opts)
        .unwrap_or_else(|e| panic!("NVRTC could not compile flash.cu for {h:?}: {e:?}"))
        .to_src();
    cache.insert((cc, h), ptx.clone());
    ptx
}

/// The fused kernels of one head shape, loaded into one context.
pub(super) struct FlashKernels {
    fwd: CudaFunction,
    delta: CudaFunction,
    bwd_kv: CudaFunction,
    bwd_q: CudaFunction,
    pack: CudaFunction,
    smem: u32,
}

impl FlashKernels {
    fn load(ctx: &Arc<CudaContext>, h: HeadShape) -> FlashKernels {
        let fail = |what: &str, e: cudarc::driver::DriverError| -> ! {
            panic!("CUDA: loading the fused attention kernels ({what}) failed: {e}")
        };
        let cc = ctx
            .compute_capability()
            .unwrap_or_else(|e| fail("compute capability", e));
        let module = ctx
            .load_module(Ptx::from_src(ptx_for(cc, h)))
            .unwrap_or_else(|e| fail("module", e));
        let f = |n: &str| {
            module
                .load_function(n)
                .unwrap_or_else(|e| fail("function", e))
        };
        let smem = h.smem();
        let k = FlashKernels {
            fwd: f("flash_fwd"),
            delta: f("flash_bwd_delta"),
            bwd_kv: f("flash_bwd_kv"),
            bwd_q: f("flash_bwd_q"),
            pack: f("flash_pack"),
            smem,
        };
        let attr = CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        for func in [&k.fwd, &k.bwd_kv, &k.bwd_q] {
            func.set_attribute(attr, smem as i32)
                .unwrap_or_else(|e| fail("shared memory size", e));
        }
        k
    }
}

/// Each device's loaded shapes.
#[derive(Default)]
pub(super) struct FlashCache(Mutex<HashMap<HeadShape, Arc<FlashKernels>>>);

impl std::fmt::Debug for FlashCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlashCache")
    }
}

/// One block per (sequence, head) and block of BQ queries or keys.
fn grid(s: &AttnShape, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((s.batch * s.heads) as u32, s.seq.div_ceil(BQ) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// Where each head's part of an operand lies in its f32 tensor, for `flash_pack`: columns
/// `first..first + width` of head `h` at `h · head_stride` in rows of `row_stride`, except that
/// the columns from `split` on come from `k_pe` (the keys' shared rotary part) where given.
struct Slice {
    src: u64,
    k_pe: Option<u64>,
    row_stride: usize,
    head_stride: usize,
    first: usize,
    width: usize,
    split: usize,
}

impl Slice {
    /// Columns `first..first + width` of each head's `head_stride` columns, from one tensor.
    fn heads(src: u64, s: &AttnShape, head_stride: usize, first: usize, width: usize) -> Slice {
        Slice {
            src,
            k_pe: None,
            row_stride: s.heads * head_stride,
            head_stride,
            first,
            width,
            split: width,
        }
    }
}

impl CudaDevice {
    fn flash_kernels(&self, s: &AttnShape) -> Arc<FlashKernels> {
        let h = HeadShape::of(s);
        let mut map = self.flash.0.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(h)
            .or_insert_with(|| Arc::new(FlashKernels::load(&self.ctx, h)))
            .clone()
    }

    /// `(out [B·T, H·v], lse [B, H, T])`.
    pub(super) fn flash_forward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor) {
        let n = s.batch * s.seq;
        let out = self.out(&[n, s.heads * s.v]);
        let lse = self.out(&[s.batch, s.heads, s.seq]);
        self.op("attention_forward", cost::attention_forward(&s), || {
            if n * s.heads == 0 {
                return;
            }
            let k = self.flash_kernels(&s);
            let (qp, kp, vp) = (
                self.pack_q(&k, q, &s),
                self.pack_k(&k, kv, k_pe, &s),
                self.pack_v(&k, kv, &s),
            );
            let args = [
                Arg::P(self.ptr(&qp)),
                Arg::P(self.ptr(&kp)),
                Arg::P(self.ptr(&vp)),
                Arg::P(self.ptr(&out)),
                Arg::P(self.ptr(&lse)),
                Arg::I(s.batch as i32),
                Arg::I(s.seq as i32),
                Arg::I(padded(s.seq) as i32),
                Arg::F(s.scale * std::f32::consts::LOG2_E),
            ];
            launch(&self.stream, &k.fwd, grid(&s, k.smem), &args);
        });
        (out, lse)
    }

    /// `(dq, dkv, dk_pe)` from the forward's `out` and `lse`. Packs q, k and v again rather
    /// than keep the forward's packed copies alive until backward (a pass over each, against
    /// their memory for every layer in flight).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_backward(
        &self,
        q: &Tensor,
        kv: &Tensor,
        k_pe: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
        s: AttnShape,
    ) -> (Tensor, Tensor, Tensor) {
        let n = s.batch * s.seq;
        let dqk = s.nope + s.rope;
        let dq = self.out(&[n, s.heads * dqk]);
        let dkv = self.out(&[n, s.heads * (s.nope + s.v)]);
        let dk_pe = self.out(&[n, s.rope]);
        self.op("attention_backward", cost::attention_backward(&s), || {
            if n * s.heads == 0 {
                return;
            }
            let k = self.flash_kernels(&s);
            let rows = s.batch * s.heads * s.seq;
            let delta = self.out(&[rows]);
            let dk = self.out(&[s.batch, s.heads, s.seq, dqk]);
            launch(
                &self.stream,
                &k.delta,
                super::module::over(rows * 32),
                &[
                    Arg::P(self.ptr(out)),
                    Arg::P(self.ptr(dout)),
                    Arg::P(self.ptr(&delta)),
                    Arg::I(s.batch as i32),
                    Arg::I(s.seq as i32),
                ],
            );
            let dvp = HeadShape::of(&s).widths().1;
            let dop = self.pack(&k, Slice::heads(self.ptr(dout), &s, s.v, 0, s.v), dvp, &s);
            let (qp, kp, vp) = (
                self.pack_q(&k, q, &s),
                self.pack_k(&k, kv, k_pe, &s),
                self.pack_v(&k, kv, &s),
            );
            let common = [
                Arg::P(self.ptr(&qp)),
                Arg::P(self.ptr(&kp)),
                Arg::P(self.ptr(&vp)),
                Arg::P(self.ptr(&dop)),
                Arg::P(self.ptr(lse)),
                Arg::P(self.ptr(&delta)),
            ];
            let tail = [
                Arg::I(s.batch as i32),
                Arg::I(s.seq as i32),
                Arg::I(padded(s.seq) as i32),
                Arg::F(s.scale),
                Arg::F(s.scale * std::f32::consts::LOG2_E),
            ];
            let mut a = common.to_vec();
            a.extend([Arg::P(self.ptr(&dk)), Arg::P(self.ptr(&dkv))]);
            a.extend(tail);
            launch(&self.stream, &k.bwd_kv, grid(&s, k.smem), &a);
            let mut a = common.to_vec();
            a.push(Arg::P(self.ptr(&dq)));
            a.extend(tail);
            launch(&self.stream, &k.bwd_q, grid(&s, k.smem), &a);
            self.keys_grad_from_heads(&dk, &dkv, &dk_pe, &s);
        });
        (dq, dkv, dk_pe)
    }

    /// `flash_pack`: one operand as bf16 `[B·H, padded T, width]` (in an f32 tensor of half
    /// as many values).
    fn pack(&self, k: &FlashKernels, from: Slice, width: usize, s: &AttnShape) -> Tensor {
        let tp = padded(s.seq);
        let pairs = s.batch * s.heads * tp * width / 2;
        let dst = self.out(&[pairs]);
        let args = [
            Arg::P(self.ptr(&dst)),
            Arg::P(from.src),
            Arg::P(from.k_pe.unwrap_or(from.src)),
            Arg::I(from.row_stride as i32),
            Arg::I(from.head_stride as i32),
            Arg::I(from.first as i32),
            Arg::I(from.width as i32),
            Arg::I(from.split as i32),
            Arg::I(width as i32),
            Arg::I(s.batch as i32),
            Arg::I(s.seq as i32),
            Arg::I(tp as i32),
        ];
        launch(&self.stream, &k.pack, super::module::over(pairs), &args);
        dst
    }

    /// The queries: each head's `nope + rope` columns of `q`.
    fn pack_q(&self, k: &FlashKernels, q: &Tensor, s: &AttnShape) -> Tensor {
        let dqk = s.nope + s.rope;
        let from = Slice::heads(self.ptr(q), s, dqk, 0, dqk);
        self.pack(k, from, HeadShape::of(s).widths().0, s)
    }

    /// The keys: each head's k_nope columns of `kv`, then the shared `k_pe`.
    fn pack_k(&self, k: &FlashKernels, kv: &Tensor, k_pe: &Tensor, s: &AttnShape) -> Tensor {
        let from = Slice {
            k_pe: Some(self.ptr(k_pe)),
            width: s.nope + s.rope,
            split: s.nope,
            ..Slice::heads(self.ptr(kv), s, s.nope + s.v, 0, s.nope)
        };
        self.pack(k, from, HeadShape::of(s).widths().0, s)
    }

    /// The values: each head's v columns of `kv`.
    fn pack_v(&self, k: &FlashKernels, kv: &Tensor, s: &AttnShape) -> Tensor {
        let from = Slice::heads(self.ptr(kv), s, s.nope + s.v, s.nope, s.v);
        self.pack(k, from, HeadShape::of(s).widths().1, s)
    }
}

/// `t` rounded up to a whole number of query blocks.
fn padded(t: usize) -> usize {
    t.div_ceil(BQ) * BQ
}

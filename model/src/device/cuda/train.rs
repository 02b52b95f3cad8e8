//! The training state's operations: scaling one tensor, and those over many tensors in one
//! launch (zeroing and clipping the gradients, packing them into a bucket and back, Σg²,
//! AdamW), which issued one kernel per tensor (about 1,500 each on the model) and left
//! the GPU waiting for the host.
//!
//! Each call uploads one table (pointers, lengths, chunk starts and flat offsets per tensor; the
//! layout is in `kernels.cu`, "many tensors in one launch") and launches one kernel whose blocks
//! take the tensors' chunks in turn. Each value gets the same arithmetic as in the one-tensor
//! kernels, and Σg²'s pieces are the same pieces summed in the same order, so the bits do not
//! change.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

use super::module::{Arg, BLOCK, over};
use super::{CudaDevice, cost};
use crate::device::AdamWArgs;
use crate::optim::SQ_PIECE;
use crate::tensor::Tensor;

/// Values per chunk of the element-wise launches.
const CHUNK: usize = 1 << 14;

/// A coefficient set's bits (equal bits: one launch; no decay differs from every decay).
fn bits(k: &crate::optim::Coef) -> [u64; 9] {
    let f = |x: f32| u64::from(x.to_bits());
    [
        k.decay.map_or(0, |d| 1 << 32 | f(d)),
        u64::from(k.lerp_small),
        f(k.w1),
        f(k.beta2),
        f(k.w2),
        f(k.eps),
        f(k.bc2_sqrt),
        f(k.step_size),
        f(k.grad_scale),
    ]
}

/// A launch's table on the GPU, and how many chunks it covers.
struct Table {
    words: CudaSlice<u64>,
    tensors: usize,
    chunks: usize,
}

impl CudaDevice {
    pub(super) fn scale_all(&self, t: &mut Tensor, s: f32) {
        let n = t.numel();
        self.op("scale", cost::elementwise(n, 1.0, 2.0), || {
            self.run(
                "scale_f32",
                over(n),
                &[Arg::P(self.ptr(t)), Arg::F(s), Arg::L(n as i64)],
            )
        });
    }

    /// The table of `lists` (each a pointer per tensor) over tensors of `lens` values, cut in
    /// chunks of `chunk`; `None` when there is nothing to do.
    fn table(&self, lists: &[Vec<u64>], lens: &[usize], chunk: usize) -> Option<Table> {
        let t = lens.len();
        let mut words: Vec<u64> = Vec::with_capacity(lists.len() * t + 3 * t + 1);
        for l in lists {
            assert_eq!(
                l.len(),
                t,
                "multi-tensor table: a list of {} for {t}",
                l.len()
            );
            words.extend_from_slice(l);
        }
        words.extend(lens.iter().map(|&n| n as u64));
        let mut first = 0usize;
        for &n in lens {
            words.push(first as u64);
            first += n.div_ceil(chunk);
        }
        words.push(first as u64);
        let mut off = 0usize;
        for &n in lens {
            words.push(off as u64);
            off += n;
        }
        (first > 0).then(|| Table {
            words: self.upload_any(&words),
            tensors: t,
            chunks: first,
        })
    }

    /// Launches `kernel` over `table` with `args` after its three own (table, T, chunk).
    fn launch_table(&self, kernel: &'static str, table: &Table, chunk: usize, args: &[Arg]) {
        let (p, _g) = table.words.device_ptr(&self.stream);
        let mut all = vec![
            Arg::P(p),
            Arg::I(table.tensors as i32),
            Arg::L(chunk as i64),
        ];
        all.extend_from_slice(args);
        let cfg = LaunchConfig {
            grid_dim: (table.chunks.min(1 << 20) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        self.run(kernel, cfg, &all);
    }

    fn ptrs(&self, ts: &[&Tensor]) -> Vec<u64> {
        ts.iter().map(|t| self.ptr(t)).collect()
    }

    pub(super) fn fill_many_op(&self, ts: &mut [&mut Tensor], value: f32) {
        self.in_place_many(ts, "fill", "mt_fill", value, |n| {
            cost::elementwise(n, 0.0, 1.0)
        });
    }

    pub(super) fn scale_many_op(&self, ts: &mut [&mut Tensor], s: f32) {
        self.in_place_many(ts, "scale", "mt_scale", s, |n| {
            cost::elementwise(n, 1.0, 2.0)
        });
    }

    /// Operation `name`: `kernel` with one f32 argument over every tensor of `ts`, in place.
    fn in_place_many(
        &self,
        ts: &mut [&mut Tensor],
        name: &'static str,
        kernel: &'static str,
        x: f32,
        work: fn(usize) -> cost::Work,
    ) {
        let ts: Vec<&Tensor> = ts.iter().map(|t| &**t).collect();
        let lens: Vec<usize> = ts.iter().map(|t| t.numel()).collect();
        self.op(name, work(lens.iter().sum()), || {
            if let Some(tab) = self.table(&[self.ptrs(&ts)], &lens, CHUNK) {
                self.launch_table(kernel, &tab, CHUNK, &[Arg::F(x)]);
            }
        });
    }

    /// The tensors one after the other in a new flat tensor, times `scale`.
    pub(super) fn pack_all(&self, ts: &[&Tensor], scale: f32) -> Tensor {
        let lens: Vec<usize> = ts.iter().map(|t| t.numel()).collect();
        let n: usize = lens.iter().sum();
        let out = self.out(&[n]);
        self.op("pack", cost::elementwise(n, 1.0, 2.0), || {
            if let Some(tab) = self.table(&[self.ptrs(ts)], &lens, CHUNK) {
                let flat = Arg::P(self.ptr(&out));
                self.launch_table("mt_pack", &tab, CHUNK, &[flat, Arg::F(scale)]);
            }
        });
        out
    }

    /// The inverse of [`CudaDevice::pack_all`] (without the scale).
    pub(super) fn unpack_all(&self, flat: &Tensor, ts: &mut [&mut Tensor]) {
        let lens: Vec<usize> = ts.iter().map(|t| t.numel()).collect();
        let n: usize = lens.iter().sum();
        assert_eq!(n, flat.numel(), "unpack: {} values for {n}", flat.numel());
        let ts: Vec<&Tensor> = ts.iter().map(|t| &**t).collect();
        self.op("unpack", cost::copy(n), || {
            if let Some(tab) = self.table(&[self.ptrs(&ts)], &lens, CHUNK) {
                self.launch_table("mt_unpack", &tab, CHUNK, &[Arg::P(self.ptr(flat))]);
            }
        });
    }

    /// `Σ t²` in f64: one f64 per piece of [`SQ_PIECE`] values on the GPU, the pieces summed on
    /// the host in order (per tensor, then over the tensors), so the bits do not depend on
    /// timing.
    pub(super) fn sum_sq(&self, ts: &[&Tensor]) -> f64 {
        let lens: Vec<usize> = ts.iter().map(|t| t.numel()).collect();
        let n: usize = lens.iter().sum();
        let pieces: Vec<usize> = lens.iter().map(|l| l.div_ceil(SQ_PIECE)).collect();
        let Some(tab) = self.table(&[self.ptrs(ts)], &lens, SQ_PIECE) else {
            return 0.0;
        };
        let sums = self
            .stream
            .alloc_zeros::<f64>(tab.chunks)
            .unwrap_or_else(|e| panic!("CUDA allocation failed: {e}"));
        self.op("sum_squares", cost::elementwise(n, 2.0, 1.0), || {
            let (out, _g) = sums.device_ptr(&self.stream);
            self.launch_table("mt_sum_squares", &tab, SQ_PIECE, &[Arg::P(out)]);
        });
        let host = super::profile::host_timed("download", || {
            self.stream
                .clone_dtoh(&sums)
                .unwrap_or_else(|e| panic!("CUDA download failed: {e}"))
        });
        let mut rest = &host[..];
        pieces
            .iter()
            .map(|&p| {
                let (mine, tail) = rest.split_at(p);
                rest = tail;
                mine.iter().sum::<f64>()
            })
            .sum()
    }

    /// AdamW on every parameter: one launch per distinct set of coefficients (those with weight
    /// decay and those without).
    pub(super) fn adamw_all(&self, params: &mut [AdamWArgs<'_>]) {
        let n = params.iter().map(|p| p.grad.numel()).sum();
        for p in params.iter() {
            let len = p.grad.numel();
            assert!(
                p.value.numel() == len && p.exp_avg.numel() == len && p.exp_avg_sq.numel() == len,
                "adamw: value {:?}, grad {:?}",
                p.value.shape(),
                p.grad.shape()
            );
        }
        self.op("adamw", cost::elementwise(n, 12.0, 7.0), || {
            let mut done = vec![false; params.len()];
            for i in 0..params.len() {
                if done[i] {
                    continue;
                }
                let k = params[i].coef;
                let same: Vec<usize> = (i..params.len())
                    .filter(|&j| !done[j] && bits(&params[j].coef) == bits(&k))
                    .collect();
                let mut lists: Vec<Vec<u64>> =
                    (0..4).map(|_| Vec::with_capacity(same.len())).collect();
                let mut lens = Vec::with_capacity(same.len());
                for &j in &same {
                    done[j] = true;
                    let p = &params[j];
                    lists[0].push(self.ptr(p.value));
                    lists[1].push(self.ptr(p.grad));
                    lists[2].push(self.ptr(p.exp_avg));
                    lists[3].push(self.ptr(p.exp_avg_sq));
                    lens.push(p.grad.numel());
                }
                let Some(tab) = self.table(&lists, &lens, CHUNK) else {
                    continue;
                };
                self.launch_table(
                    "mt_adamw",
                    &tab,
                    CHUNK,
                    &[
                        Arg::I(k.decay.is_some() as i32),
                        Arg::F(k.decay.unwrap_or(1.0)),
                        Arg::I(k.lerp_small as i32),
                        Arg::F(k.w1),
                        Arg::F(k.beta2),
                        Arg::F(k.w2),
                        Arg::F(k.eps),
                        Arg::F(k.bc2_sqrt),
                        Arg::F(k.step_size),
                        Arg::F(k.grad_scale),
                    ],
                );
            }
        });
    }
}

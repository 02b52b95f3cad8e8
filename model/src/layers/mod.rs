//! The DeepSeek-V3 layers, one per file, each with an explicit `forward`, `backward_input` (B: the
//! gradient with respect to the input) and `backward_weight` (W: weight gradients accumulated into a
//! gradient copy of the layer), so that pipeline schedules can run W later than B.
//!
//! Conventions shared by all layers:
//! - activations are `[n, width]` tensors, `n = batch · seq` token rows, sequence-major;
//! - a layer never stores its input: the caller owns it and passes it again to `backward_*`;
//!   everything else backward needs is in the layer's cache struct returned by `forward`;
//! - composite layers' `backward_input` returns the output-gradients their weight-bearing parts need
//!   (a `…Dys` struct), consumed by `backward_weight`;
//! - gradients are held in a value of the layer's own type (`grads: &mut Self`) with zeroed tensors.

pub mod block;
pub mod embedding;
pub mod ep;
#[cfg(test)]
pub mod gradcheck;
pub mod linear;
pub mod local;
pub mod loss;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod mtp;
pub mod rmsnorm;
pub mod rope;
pub mod router;

use crate::device::Device;
use crate::tensor::Tensor;

/// Per-step context that layers need besides their weights.
pub struct Ctx<'a> {
    pub dev: &'a dyn Device,
    /// Sequences in the micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// RoPE cos/sin table for positions `0..seq` (see [`rope::table`]).
    pub rope: &'a Tensor,
    /// Sequence-wise balance-loss weight α (0: off).
    pub balance_alpha: f32,
}

impl Ctx<'_> {
    /// Token rows `batch · seq`.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// A zeroed copy of a layer's tensors on `dev`, for accumulating gradients.
pub fn zeros_like<P: crate::params::Params + Clone>(p: &P, dev: &dyn Device) -> P {
    let mut g = p.clone();
    g.visit_mut("", &mut |_, t, _| *t = dev.zeros(t.shape()));
    g
}

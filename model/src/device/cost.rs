//! Analytic FLOP and byte counts of every device operation, shared by all devices.
//!
//! The CPU device pairs these counts with the wall-clock time it measures; the simulator turns them
//! into seconds with its profile. Keeping one definition makes the two worlds report the same work.

use super::AttnShape;

/// Work done by one operation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Work {
    pub flops: f64,
    pub bytes: f64,
    /// True for matrix products (counted into `Cost::gemm_*`).
    pub gemm: bool,
}

const F32: f64 = 4.0;

/// `c[m,n] (+)= a[m,k] · b[k,n]`.
pub fn gemm(m: usize, n: usize, k: usize, accumulate: bool) -> Work {
    let (m, n, k) = (m as f64, n as f64, k as f64);
    let c_traffic = if accumulate { 2.0 } else { 1.0 };
    Work {
        flops: 2.0 * m * n * k,
        bytes: F32 * (m * k + k * n + c_traffic * m * n),
        gemm: true,
    }
}

/// An element-wise or row-wise kernel over `elems` elements doing `flops_per` FLOPs each and
/// touching `passes` arrays of that size.
pub fn elementwise(elems: usize, flops_per: f64, passes: f64) -> Work {
    Work {
        flops: elems as f64 * flops_per,
        bytes: F32 * elems as f64 * passes,
        gemm: false,
    }
}

/// A pure copy / gather / scatter of `elems` elements.
pub fn copy(elems: usize) -> Work {
    elementwise(elems, 0.0, 2.0)
}

/// MLA attention forward: `S = Q Kᵀ`, softmax, `O = P V` per (batch, head), full T×T blocks.
/// Only the matrix-product FLOPs are counted (the MFU convention); the softmax is in the bytes.
pub fn attention_forward(s: &AttnShape) -> Work {
    let bh = (s.batch * s.heads) as f64;
    let t = s.seq as f64;
    let dqk = (s.nope + s.rope) as f64;
    let dv = s.v as f64;
    let n = (s.batch * s.seq) as f64;
    let h = s.heads as f64;
    Work {
        flops: bh * (2.0 * t * t * dqk + 2.0 * t * t * dv),
        bytes: F32 * (n * h * dqk + n * h * (s.nope as f64 + dv) + n * h * dv + bh * t * t),
        gemm: true,
    }
}

/// MLA attention backward: `dP = dO Vᵀ`, `dV = Pᵀ dO`, `dQ = dS K`, `dK = dSᵀ Q`.
pub fn attention_backward(s: &AttnShape) -> Work {
    let f = attention_forward(s);
    let bh = (s.batch * s.heads) as f64;
    let t = s.seq as f64;
    let dqk = (s.nope + s.rope) as f64;
    let dv = s.v as f64;
    Work {
        flops: bh * (4.0 * t * t * dv + 4.0 * t * t * dqk),
        bytes: 2.0 * f.bytes,
        gemm: true,
    }
}

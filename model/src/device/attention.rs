//! Causal MLA attention on the host, one sequence at a time, on strided GEMMs.
//!
//! For each head `h` of a sequence (`T` rows): `Q = [q_nope | q_pe]`, `K = [k_nope | k_pe]` with
//! `k_pe` shared by all heads, `S = scale · Q Kᵀ` (two GEMMs, the nope and rope parts), causal
//! softmax → `P` (kept for backward), `O = P V`. The operands are read in place through strides;
//! nothing is concatenated. Sequences are independent, so the device runs them on separate threads.

use super::AttnShape;
use super::cpu::{StridedMut, StridedRef, sgemm_seq};

/// Forward for one sequence: `q`, `kv`, `k_pe`, `out` are that sequence's rows; `probs` is
/// `[H, T, T]`.
pub fn forward_seq(q: &[f32], kv: &[f32], k_pe: &[f32], s: &AttnShape, out: &mut [f32], probs: &mut [f32]) {
    let (t, dqk, dkv) = (s.seq, s.nope + s.rope, s.nope + s.v);
    let (qs, kvs, os) = (s.heads * dqk, s.heads * dkv, s.heads * s.v);
    for h in 0..s.heads {
        let p = &mut probs[h * t * t..(h + 1) * t * t];
        // S = Q_nope K_nopeᵀ + Q_pe K_peᵀ
        sgemm_seq(
            t, t, s.nope,
            StridedMut { data: p, off: 0, rs: t, cs: 1 },
            StridedRef { data: q, off: h * dqk, rs: qs, cs: 1 },
            StridedRef { data: kv, off: h * dkv, rs: 1, cs: kvs },
            false,
        );
        sgemm_seq(
            t, t, s.rope,
            StridedMut { data: p, off: 0, rs: t, cs: 1 },
            StridedRef { data: q, off: h * dqk + s.nope, rs: qs, cs: 1 },
            StridedRef { data: k_pe, off: 0, rs: 1, cs: s.rope },
            true,
        );
        for (i, row) in p.chunks_exact_mut(t).enumerate() {
            let valid = &mut row[..=i];
            let mut max = f32::NEG_INFINITY;
            for v in valid.iter_mut() {
                *v *= s.scale;
                max = max.max(*v);
            }
            let mut sum = 0.0f32;
            for v in valid.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            valid.iter_mut().for_each(|v| *v *= inv);
            row[i + 1..].iter_mut().for_each(|v| *v = 0.0);
        }
        // O = P V
        sgemm_seq(
            t, s.v, t,
            StridedMut { data: out, off: h * s.v, rs: os, cs: 1 },
            StridedRef { data: p, off: 0, rs: t, cs: 1 },
            StridedRef { data: kv, off: h * dkv + s.nope, rs: kvs, cs: 1 },
            false,
        );
    }
}

/// Scratch buffers reused across heads of one sequence.
pub struct Scratch {
    dp: Vec<f32>,
}

impl Scratch {
    pub fn new(t: usize) -> Scratch {
        Scratch { dp: vec![0.0; t * t] }
    }
}

/// Gradients for one sequence: writes `dq`, `dkv` (both fully) and `dk_pe` (overwritten, summed
/// over heads).
#[allow(clippy::too_many_arguments)]
pub fn backward_seq(
    q: &[f32],
    kv: &[f32],
    k_pe: &[f32],
    probs: &[f32],
    dout: &[f32],
    s: &AttnShape,
    dq: &mut [f32],
    dkv: &mut [f32],
    dk_pe: &mut [f32],
    scratch: &mut Scratch,
) {
    let (t, dqk, dkv_w) = (s.seq, s.nope + s.rope, s.nope + s.v);
    let (qs, kvs, os) = (s.heads * dqk, s.heads * dkv_w, s.heads * s.v);
    for h in 0..s.heads {
        let p = &probs[h * t * t..(h + 1) * t * t];
        let dp = &mut scratch.dp;
        // dP = dO Vᵀ
        sgemm_seq(
            t, t, s.v,
            StridedMut { data: dp, off: 0, rs: t, cs: 1 },
            StridedRef { data: dout, off: h * s.v, rs: os, cs: 1 },
            StridedRef { data: kv, off: h * dkv_w + s.nope, rs: 1, cs: kvs },
            false,
        );
        // dV = Pᵀ dO
        sgemm_seq(
            t, s.v, t,
            StridedMut { data: dkv, off: h * dkv_w + s.nope, rs: kvs, cs: 1 },
            StridedRef { data: p, off: 0, rs: 1, cs: t },
            StridedRef { data: dout, off: h * s.v, rs: os, cs: 1 },
            false,
        );
        // dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))   (zero above the diagonal since P is)
        for (i, (dprow, prow)) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
            let dot: f32 = dprow[..=i].iter().zip(&prow[..=i]).map(|(a, b)| a * b).sum();
            for (d, pv) in dprow[..=i].iter_mut().zip(&prow[..=i]) {
                *d = s.scale * pv * (*d - dot);
            }
            dprow[i + 1..].iter_mut().for_each(|v| *v = 0.0);
        }
        let ds = &scratch.dp;
        // dQ_nope = dS K_nope ; dQ_pe = dS K_pe
        sgemm_seq(
            t, s.nope, t,
            StridedMut { data: dq, off: h * dqk, rs: qs, cs: 1 },
            StridedRef { data: ds, off: 0, rs: t, cs: 1 },
            StridedRef { data: kv, off: h * dkv_w, rs: kvs, cs: 1 },
            false,
        );
        sgemm_seq(
            t, s.rope, t,
            StridedMut { data: dq, off: h * dqk + s.nope, rs: qs, cs: 1 },
            StridedRef { data: ds, off: 0, rs: t, cs: 1 },
            StridedRef { data: k_pe, off: 0, rs: s.rope, cs: 1 },
            false,
        );
        // dK_nope = dSᵀ Q_nope ; dK_pe += dSᵀ Q_pe
        sgemm_seq(
            t, s.nope, t,
            StridedMut { data: dkv, off: h * dkv_w, rs: kvs, cs: 1 },
            StridedRef { data: ds, off: 0, rs: 1, cs: t },
            StridedRef { data: q, off: h * dqk, rs: qs, cs: 1 },
            false,
        );
        sgemm_seq(
            t, s.rope, t,
            StridedMut { data: dk_pe, off: 0, rs: s.rope, cs: 1 },
            StridedRef { data: ds, off: 0, rs: 1, cs: t },
            StridedRef { data: q, off: h * dqk + s.nope, rs: qs, cs: 1 },
            h > 0,
        );
    }
}

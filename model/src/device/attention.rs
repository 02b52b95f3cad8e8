//! Causal MLA attention on the host, one sequence at a time, on strided GEMMs.
//!
//! For each head `h` of a sequence (`T` rows): `Q = [q_nope | q_pe]` (contiguous in `q`),
//! `K = [k_nope | k_pe]` with `k_pe` shared by all heads, `S = scale · Q Kᵀ`, causal softmax → `P`
//! (kept for backward), `O = P V`. `K` is gathered once per head into a small `[T, nope+rope]`
//! scratch so that `S = Q Kᵀ`, `dQ = dS K` and `dK = dSᵀ Q` are one GEMM each over the whole head
//! dimension instead of a nope and a rope GEMM (measured: the rope-width products, k or n = 8,
//! ran at a third of the others' rate). Everything else is read in place through strides.
//! Sequences are independent, so [`forward_batch`] and [`backward_batch`] run them on separate
//! threads of the device's pool.

use super::AttnShape;
use super::gemm::{StridedMut, StridedRef, sgemm_seq};
use super::vmath::{self, simd_kernel};

/// `q`, `kv`, `k_pe` of a whole batch (rows as in [`forward_seq`], sequences one after another).
pub type Inputs<'a> = (&'a [f32], &'a [f32], &'a [f32]);

/// What [`backward_batch`] reads: `q`, `kv`, `k_pe`, the kept `probs` and `dout`.
pub type BackwardInputs<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32], &'a [f32]);

/// Forward of every sequence of the batch, the sequences dealt out over `threads` tasks of
/// `pool`: `out` `[batch·T, heads·v]` and `probs` `[batch, heads, T, T]`.
pub fn forward_batch(
    pool: &rayon::ThreadPool,
    threads: usize,
    (q, kv, k_pe): Inputs<'_>,
    s: &AttnShape,
    out: &mut [f32],
    probs: &mut [f32],
) {
    let (t, h) = (s.seq, s.heads);
    let (qw, kvw) = (h * (s.nope + s.rope), h * (s.nope + s.v));
    let mut jobs: Vec<(usize, &mut [f32], &mut [f32])> = out
        .chunks_mut(t * h * s.v)
        .zip(probs.chunks_mut(h * t * t))
        .enumerate()
        .map(|(b, (o, p))| (b, o, p))
        .collect();
    let groups = split(jobs.len(), threads);
    pool.scope(|sc| {
        let mut rest: &mut [(usize, &mut [f32], &mut [f32])] = &mut jobs;
        for g in &groups {
            let (mine, tail) = rest.split_at_mut(g.len());
            rest = tail;
            sc.spawn(move |_| {
                let mut scratch = Scratch::new(s);
                for (b, o, p) in mine.iter_mut() {
                    let rows = *b * t..(*b + 1) * t;
                    forward_seq(
                        &q[rows.start * qw..rows.end * qw],
                        &kv[rows.start * kvw..rows.end * kvw],
                        &k_pe[rows.start * s.rope..rows.end * s.rope],
                        s,
                        o,
                        p,
                        &mut scratch,
                    );
                }
            });
        }
    });
}

/// Backward of every sequence of the batch, dealt out as in [`forward_batch`]: from `q`, `kv`,
/// `k_pe`, the kept `probs` and `dout`, the gradients `(dq, dkv, dk_pe)`.
pub fn backward_batch(
    pool: &rayon::ThreadPool,
    threads: usize,
    (q, kv, k_pe, probs, dout): BackwardInputs<'_>,
    s: &AttnShape,
    (dq, dkv, dpe): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let (t, h) = (s.seq, s.heads);
    let (qw, kvw, ow) = (h * (s.nope + s.rope), h * (s.nope + s.v), h * s.v);
    type Job<'a> = (usize, &'a mut [f32], &'a mut [f32], &'a mut [f32]);
    let mut jobs: Vec<Job<'_>> = dq
        .chunks_mut(t * qw)
        .zip(dkv.chunks_mut(t * kvw))
        .zip(dpe.chunks_mut(t * s.rope))
        .enumerate()
        .map(|(b, ((a, c), d))| (b, a, c, d))
        .collect();
    let groups = split(jobs.len(), threads);
    pool.scope(|sc| {
        let mut rest: &mut [Job<'_>] = &mut jobs;
        for g in &groups {
            let (mine, tail) = rest.split_at_mut(g.len());
            rest = tail;
            sc.spawn(move |_| {
                let mut scratch = Scratch::new(s);
                for (b, dqb, dkvb, dpeb) in mine.iter_mut() {
                    let r = *b * t..(*b + 1) * t;
                    backward_seq(
                        &q[r.start * qw..r.end * qw],
                        &kv[r.start * kvw..r.end * kvw],
                        &k_pe[r.start * s.rope..r.end * s.rope],
                        &probs[*b * h * t * t..(*b + 1) * h * t * t],
                        &dout[r.start * ow..r.end * ow],
                        s,
                        dqb,
                        dkvb,
                        dpeb,
                        &mut scratch,
                    );
                }
            });
        }
    });
}

/// Splits `0..n` into at most `parts` contiguous ranges of near-equal size.
fn split(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts)
        .map(|p| (p * n / parts)..((p + 1) * n / parts))
        .collect()
}

/// Scratch buffers reused across the heads (and sequences) one thread works on.
pub struct Scratch {
    /// `[T, nope+rope]`: one head's keys, `[k_nope | k_pe]`.
    k: Vec<f32>,
    /// `[T, nope+rope]`: one head's key gradient.
    dk: Vec<f32>,
    /// `[T, T]`: `dP`, then `dS`.
    dp: Vec<f32>,
}

impl Scratch {
    pub fn new(s: &AttnShape) -> Scratch {
        let (t, dqk) = (s.seq, s.nope + s.rope);
        Scratch {
            k: vec![0.0; t * dqk],
            dk: vec![0.0; t * dqk],
            dp: vec![0.0; t * t],
        }
    }
}

/// Gathers head `h`'s keys `[k_nope | k_pe]` of one sequence into `k` (`[T, nope+rope]`).
fn gather_keys(kv: &[f32], k_pe: &[f32], s: &AttnShape, h: usize, k: &mut [f32]) {
    let (dqk, dkv) = (s.nope + s.rope, s.nope + s.v);
    let kvs = s.heads * dkv;
    for (j, (krow, kvrow)) in k
        .chunks_exact_mut(dqk)
        .zip(kv.chunks_exact(kvs))
        .enumerate()
    {
        krow[..s.nope].copy_from_slice(&kvrow[h * dkv..h * dkv + s.nope]);
        krow[s.nope..].copy_from_slice(&k_pe[j * s.rope..(j + 1) * s.rope]);
    }
}

/// Columns of row `i` a softmax kernel works on: the causal part `0..=i`, rounded up to whole
/// 8-lane chunks (so that no scalar tail runs), at most `t`.
fn padded(i: usize, t: usize) -> usize {
    (i + 1).next_multiple_of(8).min(t)
}

simd_kernel! {
    /// In place on `[T, T]` scores: `P = softmax(scale · S)` over the causal part of each row
    /// (columns `0..=i` of row `i`), zero above the diagonal.
    fn softmax_causal(p: &mut [f32], t: usize, scale: f32) {
        for (i, row) in p.chunks_exact_mut(t).enumerate() {
            let (head, rest) = row.split_at_mut(padded(i, t));
            // The padding past the diagonal becomes e^-∞ = 0.
            head[i + 1..].fill(f32::NEG_INFINITY);
            head.iter_mut().for_each(|v| *v *= scale);
            let max = vmath::max(head);
            let inv = 1.0 / vmath::exp_sub_sum(head, max);
            head.iter_mut().for_each(|v| *v *= inv);
            head[i + 1..].fill(0.0);
            rest.fill(0.0);
        }
    }
}

simd_kernel! {
    /// In place on `[T, T]`: `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`, zero above the diagonal
    /// (`P` is zero there, so the padded columns contribute nothing).
    fn softmax_backward(dp: &mut [f32], p: &[f32], t: usize, scale: f32) {
        for (i, (dprow, prow)) in dp.chunks_exact_mut(t).zip(p.chunks_exact(t)).enumerate() {
            let w = padded(i, t);
            let (head, rest) = dprow.split_at_mut(w);
            let pv = &prow[..w];
            let dot = vmath::dot(head, pv);
            for (d, pv) in head.iter_mut().zip(pv) {
                *d = scale * pv * (*d - dot);
            }
            rest.fill(0.0);
        }
    }
}

/// Forward for one sequence: `q`, `kv`, `k_pe`, `out` are that sequence's rows; `probs` is
/// `[H, T, T]`.
pub fn forward_seq(
    q: &[f32],
    kv: &[f32],
    k_pe: &[f32],
    s: &AttnShape,
    out: &mut [f32],
    probs: &mut [f32],
    scratch: &mut Scratch,
) {
    let (t, dqk, dkv) = (s.seq, s.nope + s.rope, s.nope + s.v);
    let (qs, kvs, os) = (s.heads * dqk, s.heads * dkv, s.heads * s.v);
    for h in 0..s.heads {
        let p = &mut probs[h * t * t..(h + 1) * t * t];
        gather_keys(kv, k_pe, s, h, &mut scratch.k);
        // S = Q Kᵀ
        sgemm_seq(
            t,
            t,
            dqk,
            StridedMut {
                data: p,
                off: 0,
                rs: t,
                cs: 1,
            },
            StridedRef {
                data: q,
                off: h * dqk,
                rs: qs,
                cs: 1,
            },
            StridedRef {
                data: &scratch.k,
                off: 0,
                rs: 1,
                cs: dqk,
            },
            false,
        );
        softmax_causal(p, t, s.scale);
        // O = P V
        sgemm_seq(
            t,
            s.v,
            t,
            StridedMut {
                data: out,
                off: h * s.v,
                rs: os,
                cs: 1,
            },
            StridedRef {
                data: p,
                off: 0,
                rs: t,
                cs: 1,
            },
            StridedRef {
                data: kv,
                off: h * dkv + s.nope,
                rs: kvs,
                cs: 1,
            },
            false,
        );
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
        gather_keys(kv, k_pe, s, h, &mut scratch.k);
        let dp = &mut scratch.dp;
        // dP = dO Vᵀ
        sgemm_seq(
            t,
            t,
            s.v,
            StridedMut {
                data: dp,
                off: 0,
                rs: t,
                cs: 1,
            },
            StridedRef {
                data: dout,
                off: h * s.v,
                rs: os,
                cs: 1,
            },
            StridedRef {
                data: kv,
                off: h * dkv_w + s.nope,
                rs: 1,
                cs: kvs,
            },
            false,
        );
        // dV = Pᵀ dO
        sgemm_seq(
            t,
            s.v,
            t,
            StridedMut {
                data: dkv,
                off: h * dkv_w + s.nope,
                rs: kvs,
                cs: 1,
            },
            StridedRef {
                data: p,
                off: 0,
                rs: 1,
                cs: t,
            },
            StridedRef {
                data: dout,
                off: h * s.v,
                rs: os,
                cs: 1,
            },
            false,
        );
        softmax_backward(dp, p, t, s.scale);
        let ds = &scratch.dp;
        // dQ = dS K
        sgemm_seq(
            t,
            dqk,
            t,
            StridedMut {
                data: dq,
                off: h * dqk,
                rs: qs,
                cs: 1,
            },
            StridedRef {
                data: ds,
                off: 0,
                rs: t,
                cs: 1,
            },
            StridedRef {
                data: &scratch.k,
                off: 0,
                rs: dqk,
                cs: 1,
            },
            false,
        );
        // dK = dSᵀ Q, then split: k_nope's part into dkv, k_pe's summed over heads.
        sgemm_seq(
            t,
            dqk,
            t,
            StridedMut {
                data: &mut scratch.dk,
                off: 0,
                rs: dqk,
                cs: 1,
            },
            StridedRef {
                data: ds,
                off: 0,
                rs: 1,
                cs: t,
            },
            StridedRef {
                data: q,
                off: h * dqk,
                rs: qs,
                cs: 1,
            },
            false,
        );
        for (j, (dkrow, dkvrow)) in scratch
            .dk
            .chunks_exact(dqk)
            .zip(dkv.chunks_exact_mut(kvs))
            .enumerate()
        {
            dkvrow[h * dkv_w..h * dkv_w + s.nope].copy_from_slice(&dkrow[..s.nope]);
            let perow = &mut dk_pe[j * s.rope..(j + 1) * s.rope];
            if h == 0 {
                perow.copy_from_slice(&dkrow[s.nope..]);
            } else {
                for (d, g) in perow.iter_mut().zip(&dkrow[s.nope..]) {
                    *d += g;
                }
            }
        }
    }
}

//! CPU kernels on host slices: the arithmetic behind [`super::cpu::CpuDevice`].
//!
//! Each function is the host version of one device kernel and is written to be read next to its
//! math: RMSNorm, SwiGLU, RoPE, the router and its balance loss, cross-entropy. MLA attention lives
//! in `attention.rs` beside this file because it drives the GEMM.

use super::vmath::{self, simd_kernel};
use super::{RopeSpec, RouterSpec};

simd_kernel! {
    /// RMSNorm forward over rows of width `d`: `y = w ⊙ x · rstd`, `rstd = 1/sqrt(mean(x²) + eps)`.
    pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
        let d = w.len();
        for ((xr, yr), rs) in x
            .chunks_exact(d)
            .zip(y.chunks_exact_mut(d))
            .zip(rstd.iter_mut())
        {
            let ms = vmath::dot(xr, xr) / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            *rs = r;
            for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                *yv = wv * (xv * r);
            }
        }
    }
}

simd_kernel! {
    /// RMSNorm input gradient: with `x̂ = x·rstd` and `g = dy ⊙ w`, `dx = rstd (g − x̂ · mean(g ⊙ x̂))`.
    pub fn rmsnorm_backward_input(x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32], dx: &mut [f32]) {
        let d = w.len();
        for (((xr, dyr), dxr), r) in x
            .chunks_exact(d)
            .zip(dy.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
            .zip(rstd)
        {
            let dot = vmath::dot3(xr, dyr, w) * r;
            let mean = dot / d as f32;
            for (((dxv, xv), gv), wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                *dxv = r * (gv * wv - xv * r * mean);
            }
        }
    }
}

simd_kernel! {
    /// RMSNorm weight gradient: `dw += Σ_rows dy ⊙ x · rstd`.
    pub fn rmsnorm_backward_weight(x: &[f32], rstd: &[f32], dy: &[f32], dw: &mut [f32]) {
        let d = dw.len();
        for ((xr, dyr), r) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(rstd) {
            for ((dwv, xv), gv) in dw.iter_mut().zip(xr).zip(dyr) {
                *dwv += gv * xv * r;
            }
        }
    }
}

use vmath::sigmoid;

simd_kernel! {
    /// `h = silu(g) ⊙ u` with `silu(g) = g·σ(g)`.
    pub fn swiglu_forward(g: &[f32], u: &[f32], h: &mut [f32]) {
        for ((hv, gv), uv) in h.iter_mut().zip(g).zip(u) {
            *hv = gv * sigmoid(*gv) * uv;
        }
    }
}

simd_kernel! {
    /// `dg = dh ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))`, `du = dh ⊙ silu(g)`.
    pub fn swiglu_backward(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for ((((dgv, duv), gv), uv), dhv) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dh) {
            let s = sigmoid(*gv);
            *duv = dhv * gv * s;
            *dgv = dhv * uv * s * (1.0 + gv * (1.0 - s));
        }
    }
}

simd_kernel! {
    /// Rotary embedding in place (HF `rotate_half` form, after de-interleaving when `spec.interleave`).
    ///
    /// Per head, with `x_d` the (de-interleaved) channels, `h = dim/2`, `c, s` from `table[pos]`:
    /// forward `y[i] = x_d[i]c_i − x_d[h+i]s_i`, `y[h+i] = x_d[h+i]c_i + x_d[i]s_i`; the output stays
    /// de-interleaved. `inverse` applies the transpose (the backward pass) and re-interleaves.
    pub fn rope(x: &mut [f32], cols: usize, table: &[f32], spec: RopeSpec, inverse: bool) {
        let d = spec.dim;
        let h = d / 2;
        let mut tmp = vec![0.0f32; d];
        for (r, row) in x.chunks_exact_mut(cols).enumerate() {
            let pos = r % spec.seq_len;
            let (cos, sin) = table[pos * d..(pos + 1) * d].split_at(h);
            for head in 0..spec.heads {
                let base = head * spec.head_stride + spec.offset;
                let v = &mut row[base..base + d];
                if !inverse {
                    if spec.interleave {
                        for i in 0..h {
                            tmp[i] = v[2 * i];
                            tmp[h + i] = v[2 * i + 1];
                        }
                    } else {
                        tmp.copy_from_slice(v);
                    }
                    for i in 0..h {
                        v[i] = tmp[i] * cos[i] - tmp[h + i] * sin[i];
                        v[h + i] = tmp[h + i] * cos[i] + tmp[i] * sin[i];
                    }
                } else {
                    for i in 0..h {
                        tmp[i] = v[i] * cos[i] + v[h + i] * sin[i];
                        tmp[h + i] = v[h + i] * cos[i] - v[i] * sin[i];
                    }
                    if spec.interleave {
                        for i in 0..h {
                            v[2 * i] = tmp[i];
                            v[2 * i + 1] = tmp[h + i];
                        }
                    } else {
                        v.copy_from_slice(&tmp);
                    }
                }
            }
        }
    }
}

simd_kernel! {
    /// Router forward for all tokens (see [`super::Device::router_forward`]).
    ///
    /// `s = σ(logits)`; choice scores `s + bias`; groups scored by the sum of their top-2 choice scores,
    /// the best `topk_group` groups kept and the others' scores set to 0.0; top-k of the result; the
    /// weights are the unbiased `s` of the chosen experts, normalised by their sum (+1e-20) when
    /// `norm_topk_prob`, times `scaling`.
    pub fn router_forward(
        logits: &[f32],
        bias: &[f32],
        spec: RouterSpec,
        scores: &mut [f32],
        topk: &mut [u32],
        weights: &mut [f32],
    ) {
        let e = spec.n_experts;
        let k = spec.top_k;
        let gsize = e / spec.n_group;
        let mut choice = vec![0.0f32; e];
        let mut group_score = vec![0.0f32; spec.n_group];
        let mut kept = vec![false; spec.n_group];
        for (t, lrow) in logits.chunks_exact(e).enumerate() {
            let srow = &mut scores[t * e..(t + 1) * e];
            for ((sv, lv), (cv, bv)) in srow.iter_mut().zip(lrow).zip(choice.iter_mut().zip(bias)) {
                *sv = sigmoid(*lv);
                *cv = *sv + bv;
            }
            for (g, gs) in group_score.iter_mut().enumerate() {
                let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in &choice[g * gsize..(g + 1) * gsize] {
                    if v > a {
                        b = a;
                        a = v;
                    } else if v > b {
                        b = v;
                    }
                }
                *gs = if gsize >= 2 { a + b } else { a };
            }
            kept.iter_mut().for_each(|v| *v = false);
            for _ in 0..spec.topk_group {
                let best = argmax_where(&group_score, |g| !kept[g]);
                kept[best] = true;
            }
            for (i, cv) in choice.iter_mut().enumerate() {
                if !kept[i / gsize] {
                    *cv = 0.0;
                }
            }
            let idx = &mut topk[t * k..(t + 1) * k];
            for j in 0..k {
                let best = argmax_where(&choice, |i| !idx[..j].contains(&(i as u32)));
                idx[j] = best as u32;
            }
            let w = &mut weights[t * k..(t + 1) * k];
            for (wv, &i) in w.iter_mut().zip(idx.iter()) {
                *wv = srow[i as usize];
            }
            if spec.norm_topk_prob {
                let denom = w.iter().sum::<f32>() + 1e-20;
                w.iter_mut().for_each(|v| *v /= denom);
            }
            w.iter_mut().for_each(|v| *v *= spec.scaling);
        }
    }
}

/// Index of the largest value among those allowed (first one on ties).
fn argmax_where(v: &[f32], allowed: impl Fn(usize) -> bool) -> usize {
    let mut best = usize::MAX;
    for (i, &x) in v.iter().enumerate() {
        if allowed(i) && (best == usize::MAX || x > v[best]) {
            best = i;
        }
    }
    best
}

/// Router backward: from `dweights` (`[n*k]`) to `dlogits` (`[n, E]`), through the optional
/// normalisation `w_j = c·s_j / (Σ_chosen s + 1e-20)` and the sigmoid.
pub fn router_backward(
    scores: &[f32],
    topk: &[u32],
    dweights: &[f32],
    spec: RouterSpec,
    dlogits: &mut [f32],
) {
    let e = spec.n_experts;
    let k = spec.top_k;
    dlogits.iter_mut().for_each(|v| *v = 0.0);
    for (t, srow) in scores.chunks_exact(e).enumerate() {
        let idx = &topk[t * k..(t + 1) * k];
        let dw = &dweights[t * k..(t + 1) * k];
        let drow = &mut dlogits[t * e..(t + 1) * e];
        if spec.norm_topk_prob {
            let sum = idx.iter().map(|&i| srow[i as usize]).sum::<f32>() + 1e-20;
            let dot: f32 = idx.iter().zip(dw).map(|(&i, g)| g * srow[i as usize]).sum();
            for (&i, g) in idx.iter().zip(dw) {
                let s = srow[i as usize];
                let ds = spec.scaling * (g / sum - dot / (sum * sum));
                drow[i as usize] += ds * s * (1.0 - s);
            }
        } else {
            for (&i, g) in idx.iter().zip(dw) {
                let s = srow[i as usize];
                drow[i as usize] += spec.scaling * g * s * (1.0 - s);
            }
        }
    }
}

/// Sequence-wise balance loss and its logits gradient (DeepSeek-V3 report eq. 17-20).
///
/// Per sequence of `t` tokens: `s'_{i,t} = s_{i,t} / Σ_j s_{j,t}`, `P_i = (1/T) Σ_t s'_{i,t}`,
/// `f_i = E/(K T) · #{t : i chosen at t}`, `L = α Σ_i f_i P_i`; averaged over the sequences.
/// `f` carries no gradient. Returns the loss and writes `dL/dlogits` into `dlogits`.
pub fn balance_loss(
    scores: &[f32],
    topk: &[u32],
    spec: RouterSpec,
    seq_len: usize,
    alpha: f32,
    dlogits: &mut [f32],
) -> f32 {
    let e = spec.n_experts;
    let k = spec.top_k;
    let n = scores.len() / e;
    let n_seq = n / seq_len;
    let tf = seq_len as f32;
    let mut loss = 0.0f32;
    let mut f = vec![0.0f32; e];
    let mut p = vec![0.0f32; e];
    for b in 0..n_seq {
        let rows = b * seq_len..(b + 1) * seq_len;
        f.iter_mut().for_each(|v| *v = 0.0);
        p.iter_mut().for_each(|v| *v = 0.0);
        for t in rows.clone() {
            for &i in &topk[t * k..(t + 1) * k] {
                f[i as usize] += 1.0;
            }
            let srow = &scores[t * e..(t + 1) * e];
            let denom: f32 = srow.iter().sum();
            for (pv, sv) in p.iter_mut().zip(srow) {
                *pv += sv / denom / tf;
            }
        }
        f.iter_mut().for_each(|v| *v *= e as f32 / (k as f32 * tf));
        loss += alpha * f.iter().zip(&p).map(|(a, b)| a * b).sum::<f32>();
        // g_i = dL/ds'_{i,t} is the same for every t of the sequence.
        let g: Vec<f32> = f
            .iter()
            .map(|fi| alpha * fi / (tf * n_seq as f32))
            .collect();
        for t in rows {
            let srow = &scores[t * e..(t + 1) * e];
            let denom: f32 = srow.iter().sum();
            let gs: f32 = g.iter().zip(srow).map(|(gi, si)| gi * si / denom).sum();
            for ((dv, gi), si) in dlogits[t * e..(t + 1) * e].iter_mut().zip(&g).zip(srow) {
                let ds = (gi - gs) / denom;
                *dv = ds * si * (1.0 - si);
            }
        }
    }
    loss / n_seq.max(1) as f32
}

simd_kernel! {
    /// Fused softmax cross-entropy over rows of width `v`; returns the summed loss of rows whose target
    /// is ≥ 0 and writes `grad_scale · (softmax − onehot)` (zero rows for ignored targets).
    pub fn cross_entropy(
        logits: &[f32],
        v: usize,
        targets: &[i64],
        grad_scale: f32,
        dlogits: &mut [f32],
    ) -> f32 {
        let mut loss = 0.0f64;
        for ((row, drow), &tgt) in logits
            .chunks_exact(v)
            .zip(dlogits.chunks_exact_mut(v))
            .zip(targets)
        {
            if tgt < 0 {
                drow.iter_mut().for_each(|d| *d = 0.0);
                continue;
            }
            let max = vmath::max(row);
            for (d, x) in drow.iter_mut().zip(row) {
                *d = vmath::exp(x - max);
            }
            let sum = vmath::sum(drow);
            let tgt = tgt as usize;
            loss += (sum.ln() + max - row[tgt]) as f64;
            let inv = grad_scale / sum;
            drow.iter_mut().for_each(|d| *d *= inv);
            drow[tgt] -= grad_scale;
        }
        loss as f32
    }
}

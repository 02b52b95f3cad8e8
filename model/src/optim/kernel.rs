//! AdamW's element-wise update, in place (an ordinary step) and out of place (a step that
//! leaves the values from before it untouched, so that a checkpoint can keep them without a
//! copy). Both evaluate the same `f32` expressions in the same order, so they give the same bits.
//!
//! The out-of-place loop writes three fresh buffers; ordinary stores would first read every
//! destination line into the cache, three extra streams of memory traffic on top of the
//! in-place update's seven (measured: 75% slower). On x86-64 with AVX it uses streaming
//! (non-temporal) stores instead, so both variants move the same bytes: out of place then takes
//! 7–12% longer than in place over 1 GiB of state when the three destinations share their
//! offset from a 32-byte boundary and none lies within 64 bytes of a source modulo 4 KiB, and
//! about a third longer otherwise (16-byte stores, or "4K aliasing"). Callers that choose the
//! destination buffers choose them so (`actors/src/kept_snapshot.rs`).

use super::AdamWConfig;

/// The scalars of one parameter's update at its step `t`, rounded to `f32` as PyTorch does.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Coef {
    /// `1 − lr·λ` when the parameter is decayed.
    decay: Option<f32>,
    /// Which of `torch.lerp`'s two formulas the first moment uses.
    lerp_small: bool,
    w1: f32,
    beta2: f32,
    w2: f32,
    eps: f32,
    bc2_sqrt: f32,
    step_size: f32,
}

impl Coef {
    /// The scalars for learning rate `lr` at the parameter's step `t` (1 for its first update).
    pub(crate) fn new(c: AdamWConfig, lr: f64, t: u64, decay: bool) -> Coef {
        // Bias corrections in f64 with `powf`, like PyTorch's Python-float `beta ** step`.
        let t = t as f64;
        let bias_correction1 = 1.0 - c.beta1.powf(t);
        let bias_correction2 = 1.0 - c.beta2.powf(t);
        Coef {
            decay: (decay && c.weight_decay != 0.0).then_some((1.0 - lr * c.weight_decay) as f32),
            lerp_small: 1.0 - c.beta1 < 0.5,
            w1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            w2: (1.0 - c.beta2) as f32,
            eps: c.eps as f32,
            bc2_sqrt: bias_correction2.sqrt() as f32,
            step_size: (lr / bias_correction1) as f32,
        }
    }

    /// One element: `(p, g, m, v)` → `(p', m', v')`.
    #[inline(always)]
    fn apply(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let p = match self.decay {
            Some(d) => p * d,
            None => p,
        };
        // torch.lerp(m, g, w1), including its two-sided formula.
        let m = if self.lerp_small {
            m + self.w1 * (g - m)
        } else {
            g - (g - m) * (1.0 - self.w1)
        };
        let v = v * self.beta2 + self.w2 * g * g;
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        (p + -self.step_size * (m / denom), m, v)
    }
}

/// Update `value`, `m` and `v` in place (all as long as `grad`).
pub(crate) fn in_place(k: &Coef, value: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    let moments = m.iter_mut().zip(v.iter_mut());
    for ((p, &g), (m, v)) in value.iter_mut().zip(grad).zip(moments) {
        (*p, *m, *v) = k.apply(*p, g, *m, *v);
    }
}

/// The old values of one parameter, read by [`out_of_place`].
pub(crate) struct Old<'a> {
    pub value: &'a [f32],
    pub m: &'a [f32],
    pub v: &'a [f32],
}

/// Buffers the new values are written into.
pub(crate) struct New<'a> {
    pub value: &'a mut [f32],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
}

/// Write the updated `old` into `new` (every slice as long as `grad`); `old` is not changed.
pub(crate) fn out_of_place(k: &Coef, old: Old<'_>, grad: &[f32], mut new: New<'_>) {
    let n = grad.len();
    debug_assert!(
        [old.value.len(), old.m.len(), old.v.len()]
            .iter()
            .all(|&l| l == n)
    );
    debug_assert!(
        [new.value.len(), new.m.len(), new.v.len()]
            .iter()
            .all(|&l| l == n)
    );
    #[cfg(target_arch = "x86_64")]
    {
        if n >= STREAM_MIN && std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: AVX is present (checked above); the slices are as long as `grad`.
            unsafe { out_of_place_avx(k, &old, grad, new) };
            return;
        }
    }
    scalar(k, &old, grad, &mut new, 0, n);
}

/// Values per piece of work dealt out to threads (a multiple of 8, so pieces keep their
/// buffers' 32-byte offsets).
pub(crate) const PIECE: usize = 1 << 18;

/// A range of one parameter's update.
pub(crate) enum Piece<'a> {
    InPlace {
        k: Coef,
        value: &'a mut [f32],
        grad: &'a [f32],
        m: &'a mut [f32],
        v: &'a mut [f32],
    },
    OutOfPlace {
        k: Coef,
        old: Old<'a>,
        grad: &'a [f32],
        new: New<'a>,
    },
}

impl Piece<'_> {
    fn len(&self) -> usize {
        match self {
            Piece::InPlace { grad, .. } | Piece::OutOfPlace { grad, .. } => grad.len(),
        }
    }

    fn run(self) {
        match self {
            Piece::InPlace {
                k,
                value,
                grad,
                m,
                v,
            } => in_place(&k, value, grad, m, v),
            Piece::OutOfPlace { k, old, grad, new } => out_of_place(&k, old, grad, new),
        }
    }
}

/// Run `pieces` on up to `threads` threads ([`crate::par::run_pieces`]); small steps run here
/// alone. The results do not depend on the split.
pub(crate) fn run(pieces: Vec<Piece<'_>>, threads: usize) {
    crate::par::run_pieces(pieces, threads, 4 * PIECE, Piece::len, Piece::run);
}

/// How [`out_of_place_avx`] stores its results.
#[derive(Clone, Copy)]
enum Store {
    Stream32,
    Stream16,
    Plain,
}

/// Below this many values the out-of-place update uses ordinary stores.
const STREAM_MIN: usize = 1 << 14;

/// Elements `from..to` of [`out_of_place`] with ordinary stores.
fn scalar(k: &Coef, old: &Old<'_>, grad: &[f32], new: &mut New<'_>, from: usize, to: usize) {
    let r = from..to;
    let dst = new.value[r.clone()]
        .iter_mut()
        .zip(&mut new.m[r.clone()])
        .zip(&mut new.v[r.clone()]);
    let src = old.value[r.clone()]
        .iter()
        .zip(&grad[r.clone()])
        .zip(old.m[r.clone()].iter().zip(&old.v[r]));
    for (((p, m), v), ((&op, &g), (&om, &ov))) in dst.zip(src) {
        (*p, *m, *v) = k.apply(op, g, om, ov);
    }
}

/// [`out_of_place`] eight elements at a time with streaming stores: 32-byte ones when the three
/// destinations share their offset from a 32-byte boundary, 16-byte ones when they share it
/// from a 16-byte boundary (any two heap buffers of f32 do), ordinary unaligned stores
/// otherwise.
///
/// # Safety
/// The CPU must support AVX, and every slice must be as long as `grad`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn out_of_place_avx(k: &Coef, old: &Old<'_>, grad: &[f32], mut new: New<'_>) {
    use std::arch::x86_64::*;
    let n = grad.len();
    let same = |b: usize| {
        let off = |p: *const f32| p as usize % b;
        let o = off(new.value.as_ptr());
        o == off(new.m.as_ptr()) && o == off(new.v.as_ptr())
    };
    let store = if same(32) {
        Store::Stream32
    } else if same(16) {
        Store::Stream16
    } else {
        Store::Plain
    };
    let head = match store {
        Store::Stream32 => new.value.as_ptr().align_offset(32).min(n),
        Store::Stream16 => new.value.as_ptr().align_offset(16).min(n),
        Store::Plain => 0,
    };
    let body = (n - head) / 8 * 8;
    scalar(k, old, grad, &mut new, 0, head);
    let (np, nm, nv) = (
        new.value.as_mut_ptr(),
        new.m.as_mut_ptr(),
        new.v.as_mut_ptr(),
    );
    let splat = _mm256_set1_ps;
    let (w1, beta2, w2, eps) = (splat(k.w1), splat(k.beta2), splat(k.w2), splat(k.eps));
    let (bc2, neg_step, one_minus_w1) = (splat(k.bc2_sqrt), splat(-k.step_size), splat(1.0 - k.w1));
    let decay = k.decay.map(|d| _mm256_set1_ps(d));
    let mut i = head;
    while i < head + body {
        // SAFETY: i + 8 ≤ head + body ≤ n for every slice; loads are unaligned; streaming
        // stores land on the boundaries `store` names (the body starts aligned, steps 32 bytes).
        unsafe {
            let g = _mm256_loadu_ps(grad.as_ptr().add(i));
            let mut p = _mm256_loadu_ps(old.value.as_ptr().add(i));
            let m = _mm256_loadu_ps(old.m.as_ptr().add(i));
            let v = _mm256_loadu_ps(old.v.as_ptr().add(i));
            if let Some(d) = decay {
                p = _mm256_mul_ps(p, d);
            }
            let gm = _mm256_sub_ps(g, m);
            let m = if k.lerp_small {
                _mm256_add_ps(m, _mm256_mul_ps(w1, gm))
            } else {
                _mm256_sub_ps(g, _mm256_mul_ps(gm, one_minus_w1))
            };
            let v = _mm256_add_ps(
                _mm256_mul_ps(v, beta2),
                _mm256_mul_ps(_mm256_mul_ps(w2, g), g),
            );
            let denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2), eps);
            let p = _mm256_add_ps(p, _mm256_mul_ps(neg_step, _mm256_div_ps(m, denom)));
            for (dst, x) in [(np.add(i), p), (nm.add(i), m), (nv.add(i), v)] {
                match store {
                    Store::Stream32 => _mm256_stream_ps(dst, x),
                    Store::Stream16 => {
                        _mm_stream_ps(dst, _mm256_castps256_ps128(x));
                        _mm_stream_ps(dst.add(4), _mm256_extractf128_ps::<1>(x));
                    }
                    Store::Plain => _mm256_storeu_ps(dst, x),
                }
            }
        }
        i += 8;
    }
    // Order the streaming stores before anything that follows.
    _mm_sfence();
    scalar(k, old, grad, &mut new, head + body, n);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32, positive: bool) -> Vec<f32> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let f = (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                if positive { f.abs() * 1e-3 } else { f }
            })
            .collect()
    }

    /// Out of place gives the in-place update's bits, whatever the lengths and alignments, with
    /// and without decay, for both of `torch.lerp`'s formulas; the old values stay as they were.
    #[test]
    fn out_of_place_matches_in_place_bit_for_bit() {
        let configs = [
            AdamWConfig::default(),
            AdamWConfig {
                beta1: 0.3,
                ..AdamWConfig::deepseek_v3()
            },
        ];
        for (ci, c) in configs.into_iter().enumerate() {
            for n in [
                1usize,
                7,
                100,
                STREAM_MIN - 1,
                STREAM_MIN + 13,
                3 * STREAM_MIN + 5,
            ] {
                // Destinations at one offset from a 32-byte boundary, at one from a 16-byte one
                // only (offsets in values: 4 = 16 bytes), or at different ones.
                for (offs, decay) in [
                    ([0usize, 0, 0], true),
                    ([1, 1, 1], false),
                    ([0, 4, 0], false),
                    ([0, 1, 3], true),
                ] {
                    let k = Coef::new(c, 1e-3, 3 + ci as u64, decay);
                    let (p, g) = (values(n, 1, false), values(n, 2, false));
                    let (m, v) = (values(n, 3, false), values(n, 4, true));
                    let (mut pi, mut mi, mut vi) = (p.clone(), m.clone(), v.clone());
                    in_place(&k, &mut pi, &g, &mut mi, &mut vi);
                    let stride = (n + 8).next_multiple_of(8);
                    let mut buf = vec![0.0f32; 3 * stride + 8];
                    let (bp, rest) = buf.split_at_mut(stride);
                    let (bm, bv) = rest.split_at_mut(stride);
                    let [a, b, d] = offs;
                    let new = New {
                        value: &mut bp[a..a + n],
                        m: &mut bm[b..b + n],
                        v: &mut bv[d..d + n],
                    };
                    let (p0, m0, v0) = (p.clone(), m.clone(), v.clone());
                    out_of_place(
                        &k,
                        Old {
                            value: &p,
                            m: &m,
                            v: &v,
                        },
                        &g,
                        new,
                    );
                    assert!(p == p0 && m == m0 && v == v0, "the old values changed");
                    let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&pi), bits(&bp[a..a + n]), "p, n {n}, offsets {offs:?}");
                    assert_eq!(bits(&mi), bits(&bm[b..b + n]), "m, n {n}, offsets {offs:?}");
                    assert_eq!(bits(&vi), bits(&bv[d..d + n]), "v, n {n}, offsets {offs:?}");
                }
            }
        }
    }
}

//! Vectorisable f32 math for the CPU kernels: a polynomial `exp`, sigmoid, and 8-lane reductions,
//! plus `simd_kernel!`, which compiles a kernel body twice (baseline x86-64 and AVX2) and picks
//! the AVX2 copy at run time when the CPU has it.
//!
//! Why (measured on the default model's training step, 2-core Xeon with AVX-512): libm's scalar
//! `expf` was the largest single symbol of the step after faer's micro-kernels (11 % of samples,
//! from SiLU, the attention softmax and cross-entropy), and the element-wise loops around it were
//! scalar because float reductions in source order cannot be vectorised. Here `exp` is branch-free
//! (LLVM vectorises the loops that call it) and sums/maxima/dots accumulate in 8 lanes, so they
//! vectorise too. The lane order is fixed, so results do not depend on which copy runs.
//!
//! Accuracy: [`exp`] is the Cephes `expf` polynomial (relative error below 4e-7 on the range that
//! matters, checked in the tests below); the golden comparisons allow 1e-4 on logits and 1e-3 on
//! gradients.

/// Defines `$vis fn $name(args) -> ret`, whose body is compiled both for the baseline target and
/// with AVX2 enabled; the AVX2 copy runs when the CPU supports it. Bodies must be safe code.
macro_rules! simd_kernel {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// Lanes of the reductions below.
const L: usize = 8;

/// `e^x` for f32 without a libm call (Cephes `expf`): `x = n ln2 + r`, `e^r` by a degree-6
/// polynomial, `2^n` by building the exponent bits. Below −87 the result is 0 (`e^-87` ≈ 1.6e-38:
/// no subnormals, which cost a micro-code assist each), above 88 it is `e^88`; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x0 = x;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = x - n * C1 - n * C2;
    let r2 = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    p = p * r2 + r + 1.0;
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    if x0 < -87.0 { 0.0 } else { p * scale }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Folds 8 lanes into one value, pairwise.
#[inline(always)]
fn fold(acc: [f32; L], f: impl Fn(f32, f32) -> f32) -> f32 {
    let a = [
        f(acc[0], acc[4]),
        f(acc[1], acc[5]),
        f(acc[2], acc[6]),
        f(acc[3], acc[7]),
    ];
    f(f(a[0], a[2]), f(a[1], a[3]))
}

/// `Σ x`, accumulated in 8 lanes.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; L];
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            acc[i] += c[i];
        }
    }
    for (a, v) in acc.iter_mut().zip(rest) {
        *a += v;
    }
    fold(acc, |a, b| a + b)
}

/// `Σ a ⊙ b`, accumulated in 8 lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    for ((s, x), y) in acc.iter_mut().zip(ra).zip(rb) {
        *s += x * y;
    }
    fold(acc, |a, b| a + b)
}

/// `Σ a ⊙ b ⊙ c`, accumulated in 8 lanes.
#[inline(always)]
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0.0f32; L];
    let (ca, cb, cc) = (a.chunks_exact(L), b.chunks_exact(L), c.chunks_exact(L));
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for i in 0..L {
            acc[i] += x[i] * y[i] * z[i];
        }
    }
    for (((s, x), y), z) in acc.iter_mut().zip(ra).zip(rb).zip(rc) {
        *s += x * y * z;
    }
    fold(acc, |a, b| a + b)
}

/// `max x` (−∞ for an empty slice), in 8 lanes.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; L];
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    // Plain compares (no NaN bookkeeping): they compile to single max instructions. A NaN input
    // may be skipped here, but it reaches the caller's result through the values themselves.
    let gt = |a: f32, b: f32| if a > b { a } else { b };
    for c in chunks {
        for i in 0..L {
            acc[i] = gt(acc[i], c[i]);
        }
    }
    for (a, v) in acc.iter_mut().zip(rest) {
        *a = gt(*a, *v);
    }
    fold(acc, gt)
}

/// `x[i] = e^(x[i] − m)` in place; returns `Σ` of the results.
#[inline(always)]
pub fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    // Two simple loops: the loop vectoriser handles the first, the 8-lane sum the second (one
    // fused loop was left scalar by the SLP vectoriser).
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    sum(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        assert!(sigmoid(-200.0) < 1e-37 && sigmoid(200.0) == 1.0);
        assert!(exp(88.5).is_finite() && sigmoid(f32::NAN).is_nan());
    }

    #[test]
    fn reductions_match_sequential_ones() {
        let v: Vec<f32> = (0..37).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..37).map(|i| ((i * 3) % 5) as f32 * 0.5).collect();
        assert_eq!(sum(&v), v.iter().sum::<f32>());
        assert_eq!(max(&v), 5.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let d: f32 = v.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert_eq!(dot(&v, &w), d);
        let d3: f32 = v.iter().zip(&w).map(|(a, b)| a * b * b).sum();
        assert_eq!(dot3(&v, &w, &w), d3);
        let mut e = v.clone();
        let s = exp_sub_sum(&mut e, 5.0);
        let want: f64 = v.iter().map(|x| ((*x - 5.0) as f64).exp()).sum();
        assert!(((s as f64 - want) / want).abs() < 1e-6);
    }
}

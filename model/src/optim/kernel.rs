//! AdamW's element-wise update in place, on host slices: what the CPU device's
//! [`crate::device::Device::adamw`] runs, in pieces dealt out to its threads (the same bits
//! whatever the split).

use super::AdamWConfig;

/// The scalars of one parameter's update at its step `t`, rounded to `f32` as PyTorch does.
#[derive(Clone, Copy, Debug)]
pub struct Coef {
    /// `1 − lr·λ` when the parameter is decayed.
    pub(crate) decay: Option<f32>,
    /// Which of `torch.lerp`'s two formulas the first moment uses.
    pub(crate) lerp_small: bool,
    pub(crate) w1: f32,
    pub(crate) beta2: f32,
    pub(crate) w2: f32,
    pub(crate) eps: f32,
    pub(crate) bc2_sqrt: f32,
    pub(crate) step_size: f32,
    /// The gradient clip's coefficient, applied to each gradient value as it is read (1: none).
    pub(crate) grad_scale: f32,
}

impl Coef {
    /// The scalars for learning rate `lr` at the parameter's step `t` (1 for its first update).
    pub fn new(c: AdamWConfig, lr: f64, t: u64, decay: bool) -> Coef {
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
            grad_scale: 1.0,
        }
    }

    /// The same scalars with each gradient value multiplied by `s` before the update (the
    /// clip's coefficient; the same bits as scaling the gradients first, which it saves a pass
    /// over memory).
    pub fn with_grad_scale(self, s: f32) -> Coef {
        Coef {
            grad_scale: s,
            ..self
        }
    }

    /// One element: `(p, g, m, v)` → `(p', m', v')`.
    #[inline(always)]
    fn apply(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let g = g * self.grad_scale;
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

/// Values per piece of work dealt out to threads (a multiple of 8).
pub(crate) const PIECE: usize = 1 << 18;

/// A range of one parameter's update.
pub(crate) struct Piece<'a> {
    pub k: Coef,
    pub value: &'a mut [f32],
    pub grad: &'a [f32],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
}

/// Run `pieces` on up to `threads` threads ([`crate::par::run_pieces`]); small steps run here
/// alone. The results do not depend on the split.
pub(crate) fn run(pieces: Vec<Piece<'_>>, threads: usize) {
    crate::par::run_pieces(
        pieces,
        threads,
        4 * PIECE,
        |p| p.grad.len(),
        |p| in_place(&p.k, p.value, p.grad, p.m, p.v),
    );
}

//! The language-model loss head: final RMSNorm → `lm_head` → cross-entropy, with HF shifting.
//!
//! HF's causal-LM loss compares `logits[:, t]` with `labels[:, t+1]` (labels are shifted inside the
//! model), ignores label -100 and averages over the remaining positions. MTP depth `k` reuses this
//! head with its own norm and targets shifted by `k + 1`.

use crate::device::Device;
use crate::layers::linear::Linear;
use crate::layers::rmsnorm::{RmsNorm, RmsNormCache};
use crate::tensor::Tensor;

/// Label value that is ignored (HF `ignore_index`).
pub const IGNORE: i64 = -100;

/// `target[b, t] = labels[b, t + shift]` when `t + shift < seq`, else [`IGNORE`].
pub fn shifted_targets(labels: &[i64], batch: usize, seq: usize, shift: usize) -> Vec<i64> {
    let mut out = vec![IGNORE; batch * seq];
    for b in 0..batch {
        for t in 0..seq.saturating_sub(shift) {
            out[b * seq + t] = labels[b * seq + t + shift];
        }
    }
    out
}

/// Activations of one loss head.
#[derive(Debug)]
pub struct LmLossCache {
    y: Tensor,
    norm: RmsNormCache,
    d_logits: Tensor,
    /// Logits `[n, vocab]`, kept when asked for.
    pub logits: Option<Tensor>,
    /// Mean cross-entropy over the counted targets (0 on the simulator).
    pub loss: f32,
    /// Number of targets that were not ignored.
    pub count: usize,
}

/// Output-gradient of the norm, from B for W (`d_logits` stays in the cache).
#[derive(Debug)]
pub struct LmLossDys {
    d_y: Tensor,
}

/// Forward of the head on hidden states `h`; `weight` scales the gradient (1 for the main loss,
/// λ/D for an MTP depth). The gradient of the *mean* loss is prepared here (fused softmax-CE).
pub fn forward(
    dev: &dyn Device,
    norm: &RmsNorm,
    lm_head: &Linear,
    h: &Tensor,
    targets: &[i64],
    weight: f32,
    keep_logits: bool,
) -> LmLossCache {
    let (y, nc) = norm.forward(dev, h);
    let logits = lm_head.forward(dev, &y);
    let count = targets.iter().filter(|&&t| t >= 0).count();
    let scale = if count > 0 {
        weight / count as f32
    } else {
        0.0
    };
    let (sum, d_logits) = dev.cross_entropy(&logits, targets, scale);
    let loss = if count > 0 { sum / count as f32 } else { 0.0 };
    LmLossCache {
        y,
        norm: nc,
        d_logits,
        logits: keep_logits.then_some(logits),
        loss,
        count,
    }
}

/// B: gradient of `weight · loss` w.r.t. `h`.
pub fn backward_input(
    dev: &dyn Device,
    norm: &RmsNorm,
    lm_head: &Linear,
    h: &Tensor,
    c: &LmLossCache,
) -> (Tensor, LmLossDys) {
    let d_y = lm_head.backward_input(dev, &c.d_logits);
    let dh = norm.backward_input(dev, h, &c.norm, &d_y);
    (dh, LmLossDys { d_y })
}

/// W: gradients of the norm weight and `lm_head`.
#[allow(clippy::too_many_arguments)]
pub fn backward_weight(
    dev: &dyn Device,
    norm: &RmsNorm,
    lm_head: &Linear,
    h: &Tensor,
    c: &LmLossCache,
    dys: &LmLossDys,
    g_norm: &mut RmsNorm,
    g_lm_head: &mut Linear,
) {
    lm_head.backward_weight(dev, &c.y, &c.d_logits, g_lm_head);
    norm.backward_weight(dev, h, &c.norm, &dys.d_y, g_norm);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck::{check, dev, randn};

    #[test]
    fn shifting_follows_hf() {
        assert_eq!(
            shifted_targets(&[1, 2, 3, 4, 5, 6], 2, 3, 1),
            vec![2, 3, IGNORE, 5, 6, IGNORE]
        );
        assert_eq!(
            shifted_targets(&[1, 2, 3], 1, 3, 2),
            vec![3, IGNORE, IGNORE]
        );
    }

    #[test]
    fn loss_head_backward_matches_finite_differences() {
        let d = dev();
        let h = randn(&[6, 8], 1, 1.0);
        let norm = RmsNorm {
            weight: randn(&[8], 2, 1.0),
            eps: 1e-6,
        };
        let head = Linear {
            weight: randn(&[11, 8], 3, 0.5),
        };
        let targets = [3i64, IGNORE, 0, 10, 7, IGNORE];
        let c = forward(&d, &norm, &head, &h, &targets, 1.0, false);
        assert_eq!(c.count, 4);
        let (dh, dys) = backward_input(&d, &norm, &head, &h, &c);
        let mut gn = RmsNorm {
            weight: d.zeros(&[8]),
            eps: 1e-6,
        };
        let mut gh = Linear {
            weight: d.zeros(&[11, 8]),
        };
        backward_weight(&d, &norm, &head, &h, &c, &dys, &mut gn, &mut gh);
        let mut st = (norm, head, h);
        let loss = |s: &(RmsNorm, Linear, Tensor)| {
            forward(&d, &s.0, &s.1, &s.2, &targets, 1.0, false).loss as f64
        };
        check("loss dh", &mut st, |s| &mut s.2, loss, &dh, 48);
        check(
            "loss norm",
            &mut st,
            |s| &mut s.0.weight,
            loss,
            &gn.weight,
            8,
        );
        check(
            "loss lm_head",
            &mut st,
            |s| &mut s.1.weight,
            loss,
            &gh.weight,
            40,
        );
    }
}

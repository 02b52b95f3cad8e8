//! Rotary position embedding tables (HF `rope_type` "default" and "yarn") and the softmax scale.
//!
//! The table for positions `0..seq` is `[seq, dim]`: `cos(pos·inv_freq_i)·a` in the first `dim/2`
//! columns and `sin(pos·inv_freq_i)·a` in the rest, `a` the YaRN attention factor (1 for default).
//! The rotation itself is the device kernel [`crate::device::Device::rope`]; MLA applies it to the
//! rope part of q and k (after HF's de-interleave when `rope_interleave`).
//! Frequencies are computed in f32 like transformers does.

use crate::config::{ConfigError, ModelConfig, Rope};
use crate::device::Device;
use crate::tensor::Tensor;

/// HF `yarn_get_mscale`.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// Inverse frequencies (`dim/2` of them) and the attention factor applied to cos/sin.
pub fn inv_freq(cfg: &ModelConfig) -> Result<(Vec<f32>, f32), ConfigError> {
    let dim = cfg.qk_rope_head_dim;
    let half = dim / 2;
    let pos_freqs = |theta: f64| -> Vec<f32> {
        (0..half)
            .map(|i| (theta as f32).powf((2 * i) as f32 / dim as f32))
            .collect()
    };
    match cfg.rope()? {
        Rope::Default { theta } => Ok((pos_freqs(theta).iter().map(|p| 1.0 / p).collect(), 1.0)),
        Rope::Yarn {
            theta,
            factor,
            original_max_position_embeddings: orig,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            attention_factor,
            truncate,
        } => {
            let attention = match attention_factor {
                Some(a) => a,
                None => match (mscale, mscale_all_dim) {
                    (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                        yarn_get_mscale(factor, m) / yarn_get_mscale(factor, ma)
                    }
                    _ => yarn_get_mscale(factor, 1.0),
                },
            };
            let correction_dim = |rot: f64| {
                dim as f64 * (orig as f64 / (rot * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
            if truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let mut high = high.min(dim as f64 - 1.0);
            if low == high {
                high += 0.001;
            }
            let pf = pos_freqs(theta);
            let inv = (0..half)
                .map(|i| {
                    let ramp =
                        (((i as f32) - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                    let extrap_factor = 1.0 - ramp;
                    let extrap = 1.0 / pf[i];
                    let interp = 1.0 / (factor as f32 * pf[i]);
                    interp * (1.0 - extrap_factor) + extrap * extrap_factor
                })
                .collect();
            Ok((inv, attention as f32))
        }
    }
}

/// The softmax scale of MLA: `qk_head_dim^-0.5`, times `mscale²` under YaRN when `mscale_all_dim`
/// is set (`mscale = yarn_get_mscale(factor, mscale_all_dim)`), as HF `DeepseekV3Attention` does.
pub fn softmax_scale(cfg: &ModelConfig) -> Result<f32, ConfigError> {
    let mut s = (cfg.qk_head_dim() as f64).powf(-0.5);
    if let Rope::Yarn {
        factor,
        mscale_all_dim: Some(ma),
        ..
    } = cfg.rope()?
        && ma != 0.0
    {
        let m = yarn_get_mscale(factor, ma);
        s *= m * m;
    }
    Ok(s as f32)
}

/// Builds the `[seq, dim]` cos/sin table on `dev`.
pub fn table(cfg: &ModelConfig, dev: &dyn Device, seq: usize) -> Result<Tensor, ConfigError> {
    let (inv, a) = inv_freq(cfg)?;
    let dim = cfg.qk_rope_head_dim;
    let half = dim / 2;
    let mut t = vec![0.0f32; seq * dim];
    for pos in 0..seq {
        for (i, f) in inv.iter().enumerate() {
            let angle = (pos as f32 * f) as f64;
            t[pos * dim + i] = angle.cos() as f32 * a;
            t[pos * dim + half + i] = angle.sin() as f32 * a;
        }
    }
    Ok(dev.upload(&[seq, dim], &t))
}

//! RMSNorm (HF `DeepseekV3RMSNorm`): `y = w ⊙ x / sqrt(mean(x²) + eps)`.

use crate::device::Device;
use crate::params::{Kind, Params};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

/// What backward needs besides the input: `1/rms` per row, `[n, 1]`.
#[derive(Debug)]
pub struct RmsNormCache {
    pub rstd: Tensor,
}

impl RmsNorm {
    /// Weight 1 (HF init).
    pub fn init(dev: &dyn Device, dim: usize, eps: f32) -> RmsNorm {
        RmsNorm {
            weight: dev.upload(&[dim], &vec![1.0; dim]),
            eps,
        }
    }

    pub fn forward(&self, dev: &dyn Device, x: &Tensor) -> (Tensor, RmsNormCache) {
        let (y, rstd) = dev.rmsnorm_forward(x, &self.weight, self.eps);
        (y, RmsNormCache { rstd })
    }

    /// B: `dx` from `dy`.
    pub fn backward_input(
        &self,
        dev: &dyn Device,
        x: &Tensor,
        cache: &RmsNormCache,
        dy: &Tensor,
    ) -> Tensor {
        dev.rmsnorm_backward_input(x, &self.weight, &cache.rstd, dy)
    }

    /// W: `dw += Σ dy ⊙ x̂`.
    pub fn backward_weight(
        &self,
        dev: &dyn Device,
        x: &Tensor,
        cache: &RmsNormCache,
        dy: &Tensor,
        grad: &mut RmsNorm,
    ) {
        dev.rmsnorm_backward_weight(x, &cache.rstd, dy, &mut grad.weight)
    }
}

impl Params for RmsNorm {
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, &'a Tensor, Kind)) {
        f(&format!("{prefix}weight"), &self.weight, Kind::Weight);
    }
    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, Kind)) {
        f(&format!("{prefix}weight"), &mut self.weight, Kind::Weight);
    }
    fn for_each_tensor<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        f(&self.weight);
    }
    fn for_each_tensor_mut(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        f(&mut self.weight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck::{check, dev, project, randn};

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let d = dev();
        let x = randn(&[5, 8], 1, 1.0);
        let norm = RmsNorm {
            weight: randn(&[8], 2, 1.0),
            eps: 1e-6,
        };
        let r = randn(&[5, 8], 3, 1.0);
        let (_, c) = norm.forward(&d, &x);
        let dx = norm.backward_input(&d, &x, &c, &r);
        let mut g = RmsNorm {
            weight: d.zeros(&[8]),
            eps: 1e-6,
        };
        norm.backward_weight(&d, &x, &c, &r, &mut g);
        let mut st = (norm, x);
        let loss = |s: &(RmsNorm, Tensor)| project(&s.0.forward(&d, &s.1).0, &r);
        check("rmsnorm dx", &mut st, |s| &mut s.1, loss, &dx, 40);
        check(
            "rmsnorm dw",
            &mut st,
            |s| &mut s.0.weight,
            loss,
            &g.weight,
            8,
        );
    }
}

//! Linear layer without bias (`y = x Wᵀ`, `W` is `[out, in]` as in HF `nn.Linear`).

use crate::device::{Device, Mat, MatMut};
use crate::params::{Kind, Params};
use crate::rng::Rng;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
}

impl Linear {
    /// `W ~ N(0, std²)` from the named stream of `seed`.
    pub fn init(
        dev: &dyn Device,
        name: &str,
        out_f: usize,
        in_f: usize,
        std: f64,
        seed: u64,
    ) -> Linear {
        Linear {
            weight: dev.normal(&[out_f, in_f], &mut Rng::for_name(seed, name), std),
        }
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// `y = x Wᵀ`.
    pub fn forward(&self, dev: &dyn Device, x: &Tensor) -> Tensor {
        let mut y = dev.empty(&[x.rows(), self.out_features()]);
        dev.gemm(
            MatMut::all(&mut y),
            Mat::all(x),
            Mat::all(&self.weight).t(),
            false,
        );
        y
    }

    /// B: `dx = dy W`.
    pub fn backward_input(&self, dev: &dyn Device, dy: &Tensor) -> Tensor {
        let mut dx = dev.empty(&[dy.rows(), self.weight.cols()]);
        dev.gemm(
            MatMut::all(&mut dx),
            Mat::all(dy),
            Mat::all(&self.weight),
            false,
        );
        dx
    }

    /// W: `dW += dyᵀ x`.
    pub fn backward_weight(&self, dev: &dyn Device, x: &Tensor, dy: &Tensor, grad: &mut Linear) {
        dev.gemm(
            MatMut::all(&mut grad.weight),
            Mat::all(dy).t(),
            Mat::all(x),
            true,
        );
    }
}

impl Params for Linear {
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
    fn linear_backward_matches_finite_differences() {
        let d = dev();
        let x = randn(&[6, 5], 1, 1.0);
        let lin = Linear {
            weight: randn(&[4, 5], 2, 0.5),
        };
        let r = randn(&[6, 4], 3, 1.0);
        let dx = lin.backward_input(&d, &r);
        let mut g = Linear {
            weight: d.zeros(&[4, 5]),
        };
        lin.backward_weight(&d, &x, &r, &mut g);
        let mut st = (lin, x);
        let loss = |s: &(Linear, Tensor)| project(&s.0.forward(&d, &s.1), &r);
        check("linear dx", &mut st, |s| &mut s.1, loss, &dx, 30);
        check(
            "linear dW",
            &mut st,
            |s| &mut s.0.weight,
            loss,
            &g.weight,
            20,
        );
    }
}

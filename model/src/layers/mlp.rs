//! SwiGLU MLP (HF `DeepseekV3MLP`): `y = down_proj(silu(gate_proj(x)) ⊙ up_proj(x))`.
//!
//! Used as the dense FFN of the first `first_k_dense_replace` layers, as the shared expert(s)
//! (width `n_shared_experts · moe_intermediate_size`) and as each routed expert. The `_rows`
//! variants run on one expert's row range of a dispatched batch.

use crate::device::Device;
use crate::layers::linear::Linear;
use crate::params::{Kind, Params};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// Activations of one MLP call: gate and up projections and their SwiGLU product.
#[derive(Debug)]
pub struct MlpCache {
    pub g: Tensor,
    pub u: Tensor,
    pub h: Tensor,
}

/// Output-gradients of the three projections, from B for W.
#[derive(Debug)]
pub struct MlpDys {
    pub dy: Tensor,
    pub dg: Tensor,
    pub du: Tensor,
}

impl Mlp {
    pub fn init(
        dev: &dyn Device,
        prefix: &str,
        hidden: usize,
        width: usize,
        std: f64,
        seed: u64,
    ) -> Mlp {
        let lin = |name: &str, o, i| {
            Linear::init(dev, &format!("{prefix}{name}.weight"), o, i, std, seed)
        };
        Mlp {
            gate_proj: lin("gate_proj", width, hidden),
            up_proj: lin("up_proj", width, hidden),
            down_proj: lin("down_proj", hidden, width),
        }
    }

    pub fn width(&self) -> usize {
        self.gate_proj.out_features()
    }

    pub fn forward(&self, dev: &dyn Device, x: &Tensor) -> (Tensor, MlpCache) {
        let g = self.gate_proj.forward(dev, x);
        let u = self.up_proj.forward(dev, x);
        let h = dev.swiglu_forward(&g, &u);
        let y = self.down_proj.forward(dev, &h);
        (y, MlpCache { g, u, h })
    }

    /// B: `dx` from `dy`.
    pub fn backward_input(&self, dev: &dyn Device, c: &MlpCache, dy: &Tensor) -> (Tensor, MlpDys) {
        let dh = self.down_proj.backward_input(dev, dy);
        let (dg, du) = dev.swiglu_backward(&c.g, &c.u, &dh);
        let mut dx = self.gate_proj.backward_input(dev, &dg);
        dev.add_assign(&mut dx, &self.up_proj.backward_input(dev, &du));
        (
            dx,
            MlpDys {
                dy: dev.copy(dy),
                dg,
                du,
            },
        )
    }

    /// W: accumulates the three weight gradients.
    pub fn backward_weight(
        &self,
        dev: &dyn Device,
        x: &Tensor,
        c: &MlpCache,
        dys: &MlpDys,
        g: &mut Mlp,
    ) {
        self.down_proj
            .backward_weight(dev, &c.h, &dys.dy, &mut g.down_proj);
        self.gate_proj
            .backward_weight(dev, x, &dys.dg, &mut g.gate_proj);
        self.up_proj
            .backward_weight(dev, x, &dys.du, &mut g.up_proj);
    }
}

impl Params for Mlp {
    fn visit<'a>(&'a self, p: &str, f: &mut dyn FnMut(&str, &'a Tensor, Kind)) {
        self.gate_proj.visit(&format!("{p}gate_proj."), f);
        self.up_proj.visit(&format!("{p}up_proj."), f);
        self.down_proj.visit(&format!("{p}down_proj."), f);
    }
    fn visit_mut(&mut self, p: &str, f: &mut dyn FnMut(&str, &mut Tensor, Kind)) {
        self.gate_proj.visit_mut(&format!("{p}gate_proj."), f);
        self.up_proj.visit_mut(&format!("{p}up_proj."), f);
        self.down_proj.visit_mut(&format!("{p}down_proj."), f);
    }
    fn for_each_tensor<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        self.gate_proj.for_each_tensor(f);
        self.up_proj.for_each_tensor(f);
        self.down_proj.for_each_tensor(f);
    }
    fn for_each_tensor_mut(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        self.gate_proj.for_each_tensor_mut(f);
        self.up_proj.for_each_tensor_mut(f);
        self.down_proj.for_each_tensor_mut(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gradcheck::{check, dev, project, randn};
    use crate::layers::zeros_like;

    #[test]
    fn mlp_backward_matches_finite_differences() {
        let d = dev();
        let x = randn(&[6, 8], 1, 1.0);
        let mlp = Mlp::init(&d, "m.", 8, 12, 0.4, 7);
        let r = randn(&[6, 8], 3, 1.0);
        let (_, c) = mlp.forward(&d, &x);
        let (dx, dys) = mlp.backward_input(&d, &c, &r);
        let mut g = zeros_like(&mlp, &d);
        mlp.backward_weight(&d, &x, &c, &dys, &mut g);
        let mut st = (mlp, x);
        let loss = |s: &(Mlp, Tensor)| project(&s.0.forward(&d, &s.1).0, &r);
        check("mlp dx", &mut st, |s| &mut s.1, loss, &dx, 30);
        check(
            "mlp d gate",
            &mut st,
            |s| &mut s.0.gate_proj.weight,
            loss,
            &g.gate_proj.weight,
            20,
        );
        check(
            "mlp d up",
            &mut st,
            |s| &mut s.0.up_proj.weight,
            loss,
            &g.up_proj.weight,
            20,
        );
        check(
            "mlp d down",
            &mut st,
            |s| &mut s.0.down_proj.weight,
            loss,
            &g.down_proj.weight,
            20,
        );
    }
}

//! Token embedding: `x[r] = table[ids[r]]`. No input gradient (the input is token ids).

use crate::device::Device;
use crate::params::{Kind, Params};
use crate::rng::Rng;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct Embedding {
    /// `[vocab, hidden]`.
    pub weight: Tensor,
}

impl Embedding {
    pub fn init(
        dev: &dyn Device,
        name: &str,
        vocab: usize,
        dim: usize,
        std: f64,
        seed: u64,
    ) -> Embedding {
        Embedding {
            weight: dev.normal(&[vocab, dim], &mut Rng::for_name(seed, name), std),
        }
    }

    pub fn forward(&self, dev: &dyn Device, ids: &[u32]) -> Tensor {
        dev.embedding_forward(&self.weight, ids)
    }

    /// W: `dtable[ids[r]] += dy[r]`.
    pub fn backward_weight(
        &self,
        dev: &dyn Device,
        ids: &[u32],
        dy: &Tensor,
        grad: &mut Embedding,
    ) {
        dev.embedding_backward(ids, dy, &mut grad.weight)
    }
}

impl Params for Embedding {
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
    fn embedding_backward_matches_finite_differences() {
        let d = dev();
        let ids = [3u32, 1, 3, 0, 2];
        let emb = Embedding {
            weight: randn(&[4, 6], 1, 1.0),
        };
        let r = randn(&[5, 6], 2, 1.0);
        let mut g = Embedding {
            weight: d.zeros(&[4, 6]),
        };
        emb.backward_weight(&d, &ids, &r, &mut g);
        let mut st = emb;
        let loss = |s: &Embedding| project(&s.forward(&d, &ids), &r);
        check(
            "embedding dW",
            &mut st,
            |s| &mut s.weight,
            loss,
            &g.weight,
            24,
        );
    }
}

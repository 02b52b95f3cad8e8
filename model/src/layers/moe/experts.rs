//! The routed experts on expert-grouped rows: one GEMM chain per expert over its row range.
//!
//! Without EP the rows are the dispatched `xe` and every expert runs here; with EP they are the
//! rows peers sent to this rank (`xl`) and only this rank's experts run. Either way the experts'
//! activations and output-gradients stay here, for W.

use std::ops::Range;

use crate::device::Device;
use crate::layers::mlp::{Mlp, MlpCache};
use crate::tensor::Tensor;

/// The rows the experts of this rank ran on, and their activations.
#[derive(Debug)]
pub(super) struct ExpertRows {
    /// Global ids of the experts that ran here (all of them, or this rank's EP share).
    ids: Range<usize>,
    /// Rows of expert `ids.start + j` are `offsets[j] .. offsets[j + 1]`.
    offsets: Vec<usize>,
    /// The input rows, `[offsets.last(), hidden]`.
    x: Tensor,
    /// Gate and up projections and their SwiGLU product, per row.
    act: MlpCache,
}

/// Output-gradients of the experts' three projections (rows as in [`ExpertRows`]), from B for W.
#[derive(Debug)]
pub(super) struct ExpertDys {
    d_y: Tensor,
    d_g: Tensor,
    d_u: Tensor,
}

impl ExpertRows {
    fn rows(&self, j: usize) -> Range<usize> {
        self.offsets[j]..self.offsets[j + 1]
    }

    /// Runs experts `ids` (indices into `experts`) on `x`, grouped by `offsets` (which must cover
    /// every row of `x`): returns the output rows and what backward needs.
    pub(super) fn forward(
        dev: &dyn Device,
        experts: &[Mlp],
        ids: Range<usize>,
        offsets: Vec<usize>,
        x: Tensor,
    ) -> (Tensor, ExpertRows) {
        debug_assert_eq!(offsets.len(), ids.len() + 1);
        debug_assert_eq!(offsets.last().copied(), Some(x.rows()));
        let rows = x.rows();
        let width = experts.first().map_or(0, Mlp::width);
        let span = |j: usize| offsets[j]..offsets[j + 1];
        // Every row belongs to exactly one expert, so the per-expert GEMMs overwrite these fully.
        let (mut g, mut u) = (dev.empty(&[rows, width]), dev.empty(&[rows, width]));
        for (j, e) in ids.clone().enumerate() {
            experts[e].forward_gate_up_rows(dev, &x, span(j), &mut g, &mut u);
        }
        let h = dev.swiglu_forward(&g, &u);
        let mut y = dev.empty(&[rows, x.cols()]);
        for (j, e) in ids.clone().enumerate() {
            experts[e].down_proj.forward_rows(dev, &h, span(j), &mut y);
        }
        let this = ExpertRows {
            ids,
            offsets,
            x,
            act: MlpCache { g, u, h },
        };
        (y, this)
    }

    /// B: the gradient of the input rows from `d_y`, the gradient of the output rows.
    pub(super) fn backward_input(
        &self,
        dev: &dyn Device,
        experts: &[Mlp],
        d_y: Tensor,
    ) -> (Tensor, ExpertDys) {
        let mut d_h = dev.empty(self.act.h.shape());
        for (j, e) in self.ids.clone().enumerate() {
            experts[e]
                .down_proj
                .backward_input_rows(dev, &d_y, self.rows(j), &mut d_h, false);
        }
        let (d_g, d_u) = dev.swiglu_backward(&self.act.g, &self.act.u, &d_h);
        let mut d_x = dev.empty(self.x.shape());
        for (j, e) in self.ids.clone().enumerate() {
            let expert = &experts[e];
            expert
                .gate_proj
                .backward_input_rows(dev, &d_g, self.rows(j), &mut d_x, false);
            expert
                .up_proj
                .backward_input_rows(dev, &d_u, self.rows(j), &mut d_x, true);
        }
        (d_x, ExpertDys { d_y, d_g, d_u })
    }

    /// W: accumulates the weight gradients of the experts that ran here into `grads` (indexed
    /// like `experts`); the other experts' gradients are not touched.
    pub(super) fn backward_weight(
        &self,
        dev: &dyn Device,
        experts: &[Mlp],
        dys: &ExpertDys,
        grads: &mut [Mlp],
    ) {
        for (j, e) in self.ids.clone().enumerate() {
            let r = self.rows(j);
            if r.is_empty() {
                continue;
            }
            let (expert, ge) = (&experts[e], &mut grads[e]);
            expert.down_proj.backward_weight_rows(
                dev,
                &self.act.h,
                &dys.d_y,
                r.clone(),
                &mut ge.down_proj,
            );
            expert.gate_proj.backward_weight_rows(
                dev,
                &self.x,
                &dys.d_g,
                r.clone(),
                &mut ge.gate_proj,
            );
            expert
                .up_proj
                .backward_weight_rows(dev, &self.x, &dys.d_u, r, &mut ge.up_proj);
        }
    }
}

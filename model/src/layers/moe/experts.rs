//! The routed experts on expert-grouped rows: each projection is one grouped GEMM over the
//! experts' row ranges ([`Device::gemm_rows_grouped`], [`Device::gemm_weight_grouped`]).
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
    /// The row range of every expert that ran here.
    fn spans(&self) -> Vec<Range<usize>> {
        spans(&self.offsets)
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
        let sp = spans(&offsets);
        let mine = &experts[ids.clone()];
        // Every row belongs to exactly one expert, so the grouped GEMMs overwrite these fully.
        let (mut g, mut u) = (dev.empty(&[rows, width]), dev.empty(&[rows, width]));
        dev.gemm_rows_grouped(
            &mut g,
            &x,
            &weights(mine, |m| &m.gate_proj.weight),
            &sp,
            true,
            false,
        );
        dev.gemm_rows_grouped(
            &mut u,
            &x,
            &weights(mine, |m| &m.up_proj.weight),
            &sp,
            true,
            false,
        );
        let h = dev.swiglu_forward(&g, &u);
        let mut y = dev.empty(&[rows, x.cols()]);
        dev.gemm_rows_grouped(
            &mut y,
            &h,
            &weights(mine, |m| &m.down_proj.weight),
            &sp,
            true,
            false,
        );
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
        let sp = self.spans();
        let mine = &experts[self.ids.clone()];
        let mut d_h = dev.empty(self.act.h.shape());
        dev.gemm_rows_grouped(
            &mut d_h,
            &d_y,
            &weights(mine, |m| &m.down_proj.weight),
            &sp,
            false,
            false,
        );
        let (d_g, d_u) = dev.swiglu_backward(&self.act.g, &self.act.u, &d_h);
        let mut d_x = dev.empty(self.x.shape());
        dev.gemm_rows_grouped(
            &mut d_x,
            &d_g,
            &weights(mine, |m| &m.gate_proj.weight),
            &sp,
            false,
            false,
        );
        dev.gemm_rows_grouped(
            &mut d_x,
            &d_u,
            &weights(mine, |m| &m.up_proj.weight),
            &sp,
            false,
            true,
        );
        (d_x, ExpertDys { d_y, d_g, d_u })
    }

    /// W: accumulates the weight gradients of the experts that ran here into `grads` (indexed
    /// like the layer's experts); the other experts' gradients are not touched.
    pub(super) fn backward_weight(&self, dev: &dyn Device, dys: &ExpertDys, grads: &mut [Mlp]) {
        let sp = self.spans();
        let mine = &mut grads[self.ids.clone()];
        let mut down: Vec<&mut Tensor> = mine.iter_mut().map(|m| &mut m.down_proj.weight).collect();
        dev.gemm_weight_grouped(&mut down, &dys.d_y, &self.act.h, &sp);
        let mut gate: Vec<&mut Tensor> = mine.iter_mut().map(|m| &mut m.gate_proj.weight).collect();
        dev.gemm_weight_grouped(&mut gate, &dys.d_g, &self.x, &sp);
        let mut up: Vec<&mut Tensor> = mine.iter_mut().map(|m| &mut m.up_proj.weight).collect();
        dev.gemm_weight_grouped(&mut up, &dys.d_u, &self.x, &sp);
    }
}

/// `offsets` (n + 1 boundaries) as n row ranges.
fn spans(offsets: &[usize]) -> Vec<Range<usize>> {
    offsets.windows(2).map(|w| w[0]..w[1]).collect()
}

/// One projection's weight of each expert.
fn weights<'a>(experts: &'a [Mlp], f: impl Fn(&'a Mlp) -> &'a Tensor) -> Vec<&'a Tensor> {
    experts.iter().map(f).collect()
}

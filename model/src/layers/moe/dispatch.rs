//! Dispatch and combine: the router's (token, choice) slots regrouped as expert-contiguous rows,
//! and back. Pure index bookkeeping plus gathers/scatters on the device.

use crate::device::Device;
use crate::tensor::Tensor;

/// How the `n·k` (token, choice) slots map onto expert-grouped rows.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchPlan {
    /// Rows of expert `e` are `offsets[e] .. offsets[e+1]`.
    pub offsets: Vec<usize>,
    /// For each dispatched row, the token it came from.
    pub token_of_row: Vec<u32>,
    /// For each dispatched row, its slot `token·k + j` in the router output.
    pub slot_of_row: Vec<u32>,
}

impl DispatchPlan {
    /// Rows sent to each expert.
    pub fn counts(&self) -> Vec<u64> {
        self.offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as u64)
            .collect()
    }

    pub fn rows(&self, e: usize) -> std::ops::Range<usize> {
        self.offsets[e]..self.offsets[e + 1]
    }
}

/// Groups the router's choices by expert (a stable counting sort: tokens keep their order).
pub fn plan_dispatch(topk: &[u32], n_experts: usize, top_k: usize) -> DispatchPlan {
    let mut offsets = vec![0usize; n_experts + 1];
    for &e in topk {
        offsets[e as usize + 1] += 1;
    }
    for e in 0..n_experts {
        offsets[e + 1] += offsets[e];
    }
    let mut next = offsets.clone();
    let mut token_of_row = vec![0u32; topk.len()];
    let mut slot_of_row = vec![0u32; topk.len()];
    for (slot, &e) in topk.iter().enumerate() {
        let r = next[e as usize];
        next[e as usize] += 1;
        token_of_row[r] = (slot / top_k) as u32;
        slot_of_row[r] = slot as u32;
    }
    DispatchPlan {
        offsets,
        token_of_row,
        slot_of_row,
    }
}

/// Tokens → expert-grouped rows: `xe[r] = x[token_of_row[r]]`.
pub fn dispatch(dev: &dyn Device, x: &Tensor, plan: &DispatchPlan) -> Tensor {
    dev.gather_rows(x, &plan.token_of_row)
}

/// Expert-grouped rows → tokens: `y[t] = Σ_{r: token(r)=t} w_perm[r] · ye[r]`, with `w_perm` the
/// combine weights in row order (`[rows, 1]`).
pub fn combine(
    dev: &dyn Device,
    ye: &Tensor,
    w_perm: &Tensor,
    plan: &DispatchPlan,
    n_tokens: usize,
) -> Tensor {
    dev.combine_rows(ye, Some(w_perm), &plan.token_of_row, n_tokens)
}

/// Backward of [`combine`]: returns `(d_ye, d_w_perm)`.
pub fn combine_backward(
    dev: &dyn Device,
    dy: &Tensor,
    ye: &Tensor,
    w_perm: &Tensor,
    plan: &DispatchPlan,
) -> (Tensor, Tensor) {
    dev.combine_rows_backward(dy, ye, w_perm, &plan.token_of_row)
}

/// Backward of [`dispatch`]: `dx[t] = Σ_{r: token(r)=t} d_xe[r]`.
pub fn dispatch_backward(
    dev: &dyn Device,
    d_xe: &Tensor,
    plan: &DispatchPlan,
    n_tokens: usize,
) -> Tensor {
    dev.combine_rows(d_xe, None, &plan.token_of_row, n_tokens)
}

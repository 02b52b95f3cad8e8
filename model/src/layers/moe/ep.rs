//! Expert parallelism inside the MoE layer: how rows move between token-owners and expert-owners.
//!
//! Peer `p`'s experts are a contiguous range of expert ids, hence a contiguous row range of the
//! dispatched `xe`: that range goes to `p`. The expert-owner concatenates what it receives in
//! source order and regroups it by local expert (within an expert: source rank order, then the
//! source's token order) into `xl`, with one device gather (`perm`); the way back is the inverse
//! gather (`inv`) and a split per source, and the token-owner concatenates in peer order, which
//! is `xe`'s row order again. A failed exchange may return buffers of any length: missing values
//! read as zeros, extra ones are dropped, nothing indexes out of bounds.

use std::ops::Range;

use crate::device::Device;
use crate::layers::expert_exchange::{ExchangePhase, ExpertExchange, experts_of};
use crate::layers::moe::dispatch::DispatchPlan;
use crate::tensor::Tensor;

/// One MoE layer's EP traffic for one micro-batch, fixed by the exchanged counts in forward and
/// reused by B.
#[derive(Debug)]
pub(super) struct EpRoute {
    layer: usize,
    hidden: usize,
    /// Token-owner: `xe` rows `send[p] .. send[p + 1]` go to peer `p` (length `P + 1`).
    send: Vec<usize>,
    /// Expert-owner: rows received from each source `q`.
    recv: Vec<usize>,
    /// Expert-owner: `xl[i] = received[perm[i]]`, `received` the sources' rows concatenated.
    perm: Vec<u32>,
    /// Expert-owner: `received[r] = xl[inv[r]]`.
    inv: Vec<u32>,
}

/// This rank's share of the experts and how its local rows are grouped.
pub(super) struct LocalExperts {
    /// Global ids of this rank's experts.
    pub ids: Range<usize>,
    /// Rows of local expert `j` in `xl` are `offsets[j] .. offsets[j + 1]`.
    pub offsets: Vec<usize>,
}

impl EpRoute {
    /// Exchanges the per-expert row counts of `plan` (over all `n_experts`) with the group and
    /// plans the row movements.
    pub(super) fn exchange_counts(
        ex: &dyn ExpertExchange,
        layer: usize,
        plan: &DispatchPlan,
        n_experts: usize,
        hidden: usize,
    ) -> (EpRoute, LocalExperts) {
        let size = ex.size().max(1);
        let groups: Vec<Range<usize>> = (0..size).map(|p| experts_of(n_experts, size, p)).collect();
        let mine = experts_of(n_experts, size, ex.index());
        let row = |e: usize| plan.offsets.get(e).copied().unwrap_or(0);
        let sent_counts = groups
            .iter()
            .map(|g| {
                g.clone()
                    .map(|e| row(e + 1).saturating_sub(row(e)) as u32)
                    .collect()
            })
            .collect();
        let send: Vec<usize> = groups
            .iter()
            .map(|g| row(g.start))
            .chain([row(n_experts)])
            .collect();

        // counts[q][j]: rows source q sends for local expert j (missing entries read as 0).
        let got = ex.counts(layer, sent_counts);
        let counts: Vec<Vec<usize>> = (0..size)
            .map(|q| {
                (0..mine.len())
                    .map(|j| got.get(q).and_then(|c| c.get(j)).map_or(0, |&c| c as usize))
                    .collect()
            })
            .collect();
        let recv: Vec<usize> = counts.iter().map(|c| c.iter().sum()).collect();
        let mut offsets = vec![0usize; mine.len() + 1];
        for j in 0..mine.len() {
            offsets[j + 1] = offsets[j] + counts.iter().map(|c| c[j]).sum::<usize>();
        }
        // Start of (source q, local expert j) in the received concatenation.
        let mut start = vec![vec![0usize; mine.len()]; size];
        let mut at = 0;
        for (q, c) in counts.iter().enumerate() {
            for (j, &n) in c.iter().enumerate() {
                start[q][j] = at;
                at += n;
            }
        }
        let mut perm = Vec::with_capacity(at);
        for j in 0..mine.len() {
            for q in 0..size {
                perm.extend((start[q][j]..start[q][j] + counts[q][j]).map(|r| r as u32));
            }
        }
        let mut inv = vec![0u32; at];
        for (i, &r) in perm.iter().enumerate() {
            inv[r as usize] = i as u32;
        }
        (
            EpRoute {
                layer,
                hidden,
                send,
                recv,
                perm,
                inv,
            },
            LocalExperts { ids: mine, offsets },
        )
    }

    /// Token-owner rows (`xe` order) → this rank's expert rows (`xl` order), over `phase`.
    pub(super) fn to_experts(
        &self,
        ex: &dyn ExpertExchange,
        dev: &dyn Device,
        phase: ExchangePhase,
        t: &Tensor,
    ) -> Tensor {
        let send_rows: Vec<usize> = self.send.windows(2).map(|w| w[1] - w[0]).collect();
        let received = self.all_to_all(ex, dev, phase, t, &send_rows, &self.recv);
        dev.gather_rows(&received, &self.perm)
    }

    /// This rank's expert rows (`xl` order) → token-owner rows (`xe` order), over `phase`.
    pub(super) fn to_tokens(
        &self,
        ex: &dyn ExpertExchange,
        dev: &dyn Device,
        phase: ExchangePhase,
        t: &Tensor,
    ) -> Tensor {
        let by_source = dev.gather_rows(t, &self.inv);
        let back_rows: Vec<usize> = self.send.windows(2).map(|w| w[1] - w[0]).collect();
        self.all_to_all(ex, dev, phase, &by_source, &self.recv, &back_rows)
    }

    /// Sends consecutive row blocks of `t` (`send_rows[p]` rows to peer `p`) and returns what
    /// arrives (`recv_rows[q]` rows from peer `q`) concatenated in peer order, as a device tensor.
    fn all_to_all(
        &self,
        ex: &dyn ExpertExchange,
        dev: &dyn Device,
        phase: ExchangePhase,
        t: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Tensor {
        let h = self.hidden;
        // A device without values (the simulator) sends zeros of the right sizes.
        let host = dev.download(t).unwrap_or_else(|| vec![0.0; t.numel()]);
        let mut at = 0;
        let send = send_rows
            .iter()
            .map(|&n| {
                let (a, b) = (at.min(host.len()), (at + n * h).min(host.len()));
                at += n * h;
                let mut v = host[a..b].to_vec();
                v.resize(n * h, 0.0);
                v
            })
            .collect();
        drop(host);
        let recv_lens: Vec<usize> = recv_rows.iter().map(|&n| n * h).collect();
        let got = ex.rows(self.layer, phase, send, &recv_lens);
        let total: usize = recv_lens.iter().sum();
        let mut out = Vec::with_capacity(total);
        for (q, &len) in recv_lens.iter().enumerate() {
            let part = got.get(q).map_or(&[][..], Vec::as_slice);
            let part = &part[..len.min(part.len())];
            out.extend_from_slice(part);
            out.resize(out.len() + (len - part.len()), 0.0);
        }
        let rows: usize = recv_rows.iter().sum();
        dev.upload(&[rows, h], &out)
    }
}

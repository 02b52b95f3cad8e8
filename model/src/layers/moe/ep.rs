//! Expert parallelism inside the MoE layer: how rows move between token-owners and expert-owners.
//!
//! Peer `p`'s experts are a contiguous range of expert ids, hence a contiguous row range of the
//! dispatched `xe`: that range goes to `p`. The expert-owner concatenates what it receives in
//! source order and regroups it by local expert (within an expert: source rank order, then the
//! source's token order) into `xl`, with one device gather (`perm`); the way back is the inverse
//! gather (`inv`) and a split per source, and the token-owner concatenates in peer order, which
//! is `xe`'s row order again. The dispatch message to a peer starts with the row counts of its
//! experts, so the expert-owner learns what it receives from the message itself. Every exchange
//! is posted and waited for separately, so that the layer can compute meanwhile. This rank's own
//! rows never enter the exchange (its message to itself is empty): they are `xe`'s rows of this
//! rank's experts, which the layer runs on apart from the peers' rows
//! ([`PostedDispatch::own_rows`]), so that their compute overlaps an exchange in flight. A
//! failed exchange may return buffers of any length: missing values read as zeros, extra ones
//! are dropped, counts are cut to the rows that came, nothing indexes out of bounds.

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
    /// This rank's index in the EP group.
    me: usize,
    /// Token-owner: `xe` rows `send[p] .. send[p + 1]` go to peer `p` (length `P + 1`).
    send: Vec<usize>,
    /// Expert-owner: rows received from each source `q` (none from itself).
    recv: Vec<usize>,
    /// Expert-owner: `xl[i] = received[perm[i]]`, `received` the sources' rows concatenated.
    perm: Vec<u32>,
    /// Expert-owner: `received[r] = xl[inv[r]]`.
    inv: Vec<u32>,
}

/// This rank's share of the experts and how rows are grouped for them.
pub(super) struct LocalExperts {
    /// Global ids of this rank's experts.
    pub ids: Range<usize>,
    /// Rows of local expert `j` are `offsets[j] .. offsets[j + 1]`.
    pub offsets: Vec<usize>,
}

/// This rank's own rows for its own experts: `xe`'s rows `rows`, grouped as `experts` says.
pub(super) struct OwnRows {
    pub rows: Range<usize>,
    pub experts: LocalExperts,
}

impl OwnRows {
    /// The rows of `t` (in `xe`'s row order) that stay on this rank.
    pub(super) fn take(&self, dev: &dyn Device, t: &Tensor) -> Tensor {
        take_rows(dev, t, self.rows.clone())
    }
}

/// Rows `rows` of `t`, as a tensor of their own.
fn take_rows(dev: &dyn Device, t: &Tensor, rows: Range<usize>) -> Tensor {
    let idx: Vec<u32> = rows.map(|r| r as u32).collect();
    dev.gather_rows(t, &idx)
}

/// A dispatch posted by the token-owner, to be completed by [`PostedDispatch::wait`].
pub(super) struct PostedDispatch {
    layer: usize,
    hidden: usize,
    /// EP group size and this rank's index in it.
    size: usize,
    me: usize,
    n_experts: usize,
    /// `xe` rows `send[p] .. send[p + 1]` went to peer `p`.
    send: Vec<usize>,
}

impl EpRoute {
    /// Token-owner: starts the dispatch of `xe` (grouped by expert as `plan` says, over all
    /// `n_experts`). Peer `p` gets one message: the row counts of its experts, then their rows.
    /// The counts travel with the rows, so a forward meets its peers twice (dispatch, combine),
    /// not three times. This rank's own rows stay: see [`PostedDispatch::own_rows`].
    pub(super) fn post_dispatch(
        ex: &dyn ExpertExchange,
        dev: &dyn Device,
        layer: usize,
        plan: &DispatchPlan,
        n_experts: usize,
        xe: &Tensor,
    ) -> PostedDispatch {
        let size = ex.size().max(1);
        let me = ex.index();
        let hidden = xe.cols();
        let groups: Vec<Range<usize>> = (0..size).map(|p| experts_of(n_experts, size, p)).collect();
        let row = |e: usize| plan.offsets.get(e).copied().unwrap_or(0);
        let send: Vec<usize> = groups
            .iter()
            .map(|g| row(g.start))
            .chain([row(n_experts)])
            .collect();
        // A device without values (the simulator) sends zeros of the right sizes.
        let host = dev.download(xe).unwrap_or_else(|| vec![0.0; xe.numel()]);
        let messages = groups
            .iter()
            .enumerate()
            .map(|(p, g)| {
                if p == me {
                    return Vec::new();
                }
                let (a, b) = (send[p] * hidden, send[p + 1] * hidden);
                let mut m = Vec::with_capacity(g.len() + (b - a));
                m.extend(g.clone().map(|e| row(e + 1).saturating_sub(row(e)) as f32));
                m.extend_from_slice(&host[a.min(host.len())..b.min(host.len())]);
                m.resize(g.len() + (b - a), 0.0);
                m
            })
            .collect();
        drop(host);
        ex.post(layer, ExchangePhase::Dispatch, messages);
        PostedDispatch {
            layer,
            hidden,
            size,
            me,
            n_experts,
            send,
        }
    }
}

impl PostedDispatch {
    /// The rows of `xe` that this rank's own experts run on, grouped by expert (`plan` as given
    /// to [`EpRoute::post_dispatch`]).
    pub(super) fn own_rows(&self, plan: &DispatchPlan) -> OwnRows {
        let rows = self.send[self.me]..self.send[self.me + 1];
        let ids = experts_of(self.n_experts, self.size, self.me);
        let row = |e: usize| plan.offsets.get(e).copied().unwrap_or(rows.start);
        let offsets = (ids.start..=ids.end)
            .map(|e| row(e).clamp(rows.start, rows.end) - rows.start)
            .collect();
        OwnRows {
            rows,
            experts: LocalExperts { ids, offsets },
        }
    }

    /// Expert-owner: completes the dispatch of the peers' rows. Returns the route both ways,
    /// this rank's experts with the peers' row ranges, and the rows they run on (`xl`, grouped
    /// by local expert). A source's counts are cut to the rows it actually sent (a failed
    /// exchange sends none).
    pub(super) fn wait(
        self,
        ex: &dyn ExpertExchange,
        dev: &dyn Device,
    ) -> (EpRoute, LocalExperts, Tensor) {
        let size = self.size;
        let h = self.hidden;
        let mine = experts_of(self.n_experts, size, self.me);
        let got = ex.wait(self.layer, ExchangePhase::Dispatch);
        // counts[q][j]: rows source q sent for local expert j (none from this rank).
        let mut counts = vec![vec![0usize; mine.len()]; size];
        let mut received = Vec::new();
        for (q, c) in counts.iter_mut().enumerate() {
            if q == self.me {
                continue;
            }
            let part = got.get(q).map_or(&[][..], Vec::as_slice);
            let header = mine.len().min(part.len());
            let rows = &part[header..];
            let mut left = rows.len() / h.max(1);
            for (j, n) in c.iter_mut().enumerate() {
                // `as` saturates and reads NaN as 0: a garbled count cannot index out of bounds.
                *n = (part.get(j).copied().unwrap_or(0.0).max(0.0) as usize).min(left);
                left -= *n;
            }
            let n: usize = c.iter().sum();
            received.extend_from_slice(&rows[..n * h]);
        }
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
        let xr = dev.upload(&[at, h], &received);
        let xl = dev.gather_rows(&xr, &perm);
        (
            EpRoute {
                layer: self.layer,
                hidden: h,
                me: self.me,
                send: self.send,
                recv,
                perm,
                inv,
            },
            LocalExperts { ids: mine, offsets },
            xl,
        )
    }
}

impl EpRoute {
    /// The rows of `t` (in `xe`'s row order) for this rank's own experts.
    pub(super) fn take_own(&self, dev: &dyn Device, t: &Tensor) -> Tensor {
        take_rows(dev, t, self.send[self.me]..self.send[self.me + 1])
    }

    /// Token-owner rows (`xe` order) → the peers' expert rows (`xl` order) over `phase`:
    /// starts the exchange; [`EpRoute::wait_to_experts`] completes it. This rank's own rows
    /// are not sent.
    pub(super) fn post_to_experts(
        &self,
        ex: &dyn ExpertExchange,
        dev: &dyn Device,
        phase: ExchangePhase,
        t: &Tensor,
    ) {
        let ranges: Vec<Range<usize>> = self
            .send
            .windows(2)
            .enumerate()
            .map(|(p, w)| if p == self.me { 0..0 } else { w[0]..w[1] })
            .collect();
        self.post_rows(ex, dev, phase, t, &ranges);
    }

    /// Completes [`EpRoute::post_to_experts`].
    pub(super) fn wait_to_experts(
        &self,
        ex: &dyn ExpertExchange,
        dev: &dyn Device,
        phase: ExchangePhase,
    ) -> Tensor {
        let received = self.wait_rows(ex, dev, phase, &self.recv, None);
        dev.gather_rows(&received, &self.perm)
    }

    /// This rank's expert rows (`xl` order) → token-owner rows (`xe` order) over `phase`:
    /// starts the exchange; [`EpRoute::wait_to_tokens`] completes it.
    pub(super) fn post_to_tokens(
        &self,
        ex: &dyn ExpertExchange,
        dev: &dyn Device,
        phase: ExchangePhase,
        t: &Tensor,
    ) {
        let by_source = dev.gather_rows(t, &self.inv);
        let mut at = 0;
        let ranges: Vec<Range<usize>> = self
            .recv
            .iter()
            .map(|&n| {
                at += n;
                at - n..at
            })
            .collect();
        self.post_rows(ex, dev, phase, &by_source, &ranges);
    }

    /// Completes [`EpRoute::post_to_tokens`]: the rows in `xe`'s order, this rank's own
    /// (`own`, as [`OwnRows`] says) in their place.
    pub(super) fn wait_to_tokens(
        &self,
        ex: &dyn ExpertExchange,
        dev: &dyn Device,
        phase: ExchangePhase,
        own: &Tensor,
    ) -> Tensor {
        let back_rows: Vec<usize> = self.send.windows(2).map(|w| w[1] - w[0]).collect();
        self.wait_rows(ex, dev, phase, &back_rows, Some(own))
    }

    /// Sends row ranges of `t`: `ranges[p]` to peer `p`.
    fn post_rows(
        &self,
        ex: &dyn ExpertExchange,
        dev: &dyn Device,
        phase: ExchangePhase,
        t: &Tensor,
        ranges: &[Range<usize>],
    ) {
        let h = self.hidden;
        // A device without values (the simulator) sends zeros of the right sizes.
        let host = dev.download(t).unwrap_or_else(|| vec![0.0; t.numel()]);
        let send = ranges
            .iter()
            .map(|r| {
                let n = r.len() * h;
                let (a, b) = ((r.start * h).min(host.len()), (r.end * h).min(host.len()));
                let mut v = host[a..b].to_vec();
                v.resize(n, 0.0);
                v
            })
            .collect();
        drop(host);
        ex.post(self.layer, phase, send);
    }

    /// What arrives for `phase` (`recv_rows[q]` rows from peer `q`), concatenated in peer
    /// order, as a device tensor; with `own`, this rank's part is `own` instead.
    fn wait_rows(
        &self,
        ex: &dyn ExpertExchange,
        dev: &dyn Device,
        phase: ExchangePhase,
        recv_rows: &[usize],
        own: Option<&Tensor>,
    ) -> Tensor {
        let h = self.hidden;
        let recv_lens: Vec<usize> = recv_rows.iter().map(|&n| n * h).collect();
        let got = ex.wait(self.layer, phase);
        let own = own.map(|t| dev.download(t).unwrap_or_else(|| vec![0.0; t.numel()]));
        let total: usize = recv_lens.iter().sum();
        let mut out = Vec::with_capacity(total);
        for (q, &len) in recv_lens.iter().enumerate() {
            let part = match &own {
                Some(v) if q == self.me => v.as_slice(),
                _ => got.get(q).map_or(&[][..], Vec::as_slice),
            };
            let part = &part[..len.min(part.len())];
            out.extend_from_slice(part);
            out.resize(out.len() + (len - part.len()), 0.0);
        }
        let rows: usize = recv_rows.iter().sum();
        dev.upload(&[rows, h], &out)
    }
}

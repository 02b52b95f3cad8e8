//! The expert-parallel (EP) group as a MoE layer sees it: how many ranks share the routed
//! experts and which of them this rank is.
//!
//! Rank `i` of `P` owns the routed experts [`experts_of`]`(E, P, i)`. The model holds no fabric
//! and never waits for a message: a MoE layer's phases return what must be sent to each EP
//! index and take what came back (see [`crate::layers::moe`]); whoever runs the phases (an actor
//! over the fabric, or [`crate::stage::LocalExperts`] on one rank) moves the tensors between them.

use std::ops::Range;

/// The EP group of a rank: `size` ranks, this one at `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EpGroup {
    pub size: usize,
    pub index: usize,
}

impl EpGroup {
    /// No expert parallelism: every routed expert on this rank.
    pub const ALONE: EpGroup = EpGroup { size: 1, index: 0 };

    /// The routed experts (of `n_experts`) that EP index `p` owns.
    pub fn experts_of(&self, n_experts: usize, p: usize) -> Range<usize> {
        experts_of(n_experts, self.size, p)
    }

    /// The routed experts this rank owns.
    pub fn mine(&self, n_experts: usize) -> Range<usize> {
        experts_of(n_experts, self.size, self.index)
    }
}

/// The routed experts EP rank `rank` of `ranks` owns: `rank·E/P .. (rank+1)·E/P`.
pub fn experts_of(n_experts: usize, ranks: usize, rank: usize) -> Range<usize> {
    let ranks = ranks.max(1);
    let rank = rank.min(ranks - 1);
    rank * n_experts / ranks..(rank + 1) * n_experts / ranks
}

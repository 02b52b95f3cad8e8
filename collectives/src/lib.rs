//! Collective communication over the fabric seam: communicators and their algorithms.
//!
//! A [`Communicator`] is one rank's handle on a group of ranks (the whole job, or a pipeline /
//! expert / data-parallel group given as global ranks) over an `Arc<dyn Fabric>`. Its collectives
//! work on owned `Vec<f32>` buffers, or bf16 ones as raw bits `Vec<u16>` ([`bf16`]: the same
//! operations with a `_bf16` suffix), moved through the fabric where possible, or on shape-only
//! buffers, a length without values ([`shape_only`]: the same operations with an `_absent`
//! suffix, the same messages with sizes counted as f32, for the simulated cluster):
//!
//! - [`Communicator::all_reduce`] with [`ReduceOp`] `Sum | Avg | Max` and [`Algo`]
//!   `Ring | Tree | Star | Auto` ([`ring`]: reduce-scatter + all-gather over n uneven chunks;
//!   [`tree`]: double binary tree, each tree carrying half of the buffer; [`star`]: for ranks
//!   of one process, every buffer moved to rank 0, reduced there in place, moved back),
//! - [`Communicator::reduce_scatter`], [`Communicator::all_gather`], [`Communicator::broadcast`],
//!   [`Communicator::all_to_all_v`] (uneven and empty per-peer parts), [`Communicator::barrier`],
//! - point-to-point [`Communicator::send`] / [`Communicator::recv`] ([`p2p`]),
//! - [`HfReduce`]: the hierarchical all-reduce of Fire-Flyer AI-HPC ([`hfreduce`]): ranks of a
//!   host reduce in shared host memory ([`HostReducer`]), host leaders all-reduce over a
//!   communicator, chunk-pipelined.
//!
//! Failures never hang: every receive has the configured deadline, and a rank that gives up on
//! an operation tells every peer why, so the whole group fails together, naming the rank at fault
//! ([`CommError::culprit`]).

mod absent;
pub mod all_to_all;
pub mod bf16;
pub mod communicator;
pub mod elem;
pub mod error;
pub mod hfreduce;
mod hfreduce_host;
mod kernels;
#[cfg(feature = "cuda")]
pub mod nccl;
#[cfg(feature = "cuda")]
pub mod nccl_bufs;
mod op;
pub mod p2p;
pub mod perf;
pub mod ring;
pub mod shape_only;
pub mod star;
pub mod tree;
mod wire;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_absent;
#[cfg(test)]
mod tests_absent_faults;
#[cfg(test)]
mod tests_bf16;
#[cfg(test)]
mod tests_faults;
#[cfg(test)]
mod tests_hfreduce;

use std::time::Duration;

pub use communicator::Communicator;
pub use elem::{from_bf16, to_bf16};
pub use error::CommError;
pub use flotilla_runtime::fabric::Rank;
pub use hfreduce::{HfReduce, HostReducer};

/// How elements are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the group size.
    Avg,
    Max,
}

impl ReduceOp {
    pub(crate) fn code(self) -> u32 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Avg => 1,
            ReduceOp::Max => 2,
        }
    }

    /// Fold `other` into `acc` element-wise (`Avg` sums; [`ReduceOp::finish`] divides).
    pub(crate) fn combine(self, acc: &mut [f32], other: &[f32]) {
        match self {
            ReduceOp::Sum | ReduceOp::Avg => {
                for (a, b) in acc.iter_mut().zip(other) {
                    *a += *b;
                }
            }
            ReduceOp::Max => {
                for (a, b) in acc.iter_mut().zip(other) {
                    *a = a.max(*b);
                }
            }
        }
    }

    /// Turn a fully combined buffer into the result (`Avg`: divide by the group size).
    pub(crate) fn finish(self, buf: &mut [f32], group: usize) {
        if self == ReduceOp::Avg {
            let n = group as f32;
            for x in buf.iter_mut() {
                *x /= n;
            }
        }
    }
}

/// Which all-reduce algorithm to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algo {
    /// Reduce-scatter + all-gather around a ring: bandwidth-optimal, 2(n−1) latency steps.
    Ring,
    /// Double binary tree: 2·log2(n) latency steps, for small messages.
    Tree,
    /// Every buffer moved to group rank 0, reduced there in place on several threads, moved
    /// back: the least memory traffic when all ranks share one process (in-process fabric).
    Star,
    /// Tree below [`CommConfig::tree_threshold_bytes`]; star at or above
    /// [`CommConfig::star_threshold_bytes`] on an in-process fabric; ring otherwise.
    Auto,
}

/// Deadlines and algorithm choice of a communicator.
#[derive(Debug, Clone, PartialEq)]
pub struct CommConfig {
    /// How long one receive waits for a peer.
    pub deadline: Duration,
    /// After a deadline passes, how long to wait for a sign of life (a peer that is itself
    /// stuck says so) before blaming the silent peer. Errors come within `deadline + grace`.
    pub grace: Duration,
    /// `Auto` all-reduces of fewer bytes than this use the tree.
    pub tree_threshold_bytes: usize,
    /// Every member's fabric endpoint lives in this process and moves buffers without copying
    /// (the in-process fabric): large all-reduces and reduce-scatters then use [`Algo::Star`].
    pub in_process: bool,
    /// With `in_process`, all-reduces (`Auto`) and reduce-scatters of at least this many bytes
    /// use the star.
    pub star_threshold_bytes: usize,
}

impl Default for CommConfig {
    fn default() -> Self {
        Self::with_deadline(Duration::from_secs(30))
    }
}

impl CommConfig {
    /// A configuration with `deadline`, a grace of a tenth of it, the 64 KiB tree threshold,
    /// not in-process (with a 4 MiB star threshold once [`CommConfig::in_process`] is set:
    /// on the 2-core development machine the ring is faster at 1 MiB, the star at 4 MiB).
    pub fn with_deadline(deadline: Duration) -> Self {
        CommConfig {
            deadline,
            grace: deadline / 10,
            tree_threshold_bytes: 64 * 1024,
            in_process: false,
            star_threshold_bytes: 4 << 20,
        }
    }

    /// The same configuration for ranks that share this process over the in-process fabric.
    pub fn in_process(mut self) -> Self {
        self.in_process = true;
        self
    }

    /// From the job config: a peer silent for `peer_timeout_ms` is declared dead.
    pub fn from_supervision(s: &flotilla_runtime::config::SupervisionConfig) -> Self {
        Self::with_deadline(s.peer_timeout())
    }
}

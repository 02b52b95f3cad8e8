//! Why a collective or point-to-point operation failed; every variant names the rank involved.
//!
//! Ranks in errors are *global* ranks (what the fabric and `fail_rank` use), not indices within
//! a communicator's group.

use std::time::Duration;

use flotilla_runtime::fabric::{FabricError, Rank};

/// The error of a communicator operation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// The fabric reports `rank` as failed (dead process, evicted host).
    #[error("{op}: rank {rank} has failed: {why}")]
    PeerFailed {
        op: &'static str,
        rank: Rank,
        why: String,
    },
    /// `rank` sent nothing within the deadline (plus grace) and gave no sign of life.
    #[error("{op}: rank {rank} did not answer within {after:?}")]
    Timeout {
        op: &'static str,
        rank: Rank,
        after: Duration,
    },
    /// A peer's buffer does not have the length this rank's has.
    #[error("{op}: rank {peer} has {theirs} elements but rank {me} has {ours}")]
    SizeMismatch {
        op: &'static str,
        me: Rank,
        peer: Rank,
        ours: usize,
        theirs: usize,
    },
    /// A peer runs a different operation (or reduction, or algorithm) at the same point.
    #[error("{op}: rank {peer} is running {theirs} while rank {me} runs {ours}")]
    OpMismatch {
        op: &'static str,
        me: Rank,
        peer: Rank,
        ours: String,
        theirs: String,
    },
    /// A peer gave up on this operation and told us why; `culprit` is the rank at fault when
    /// one is known.
    #[error("{op}: aborted by rank {by}: {reason}")]
    Aborted {
        op: &'static str,
        by: Rank,
        culprit: Option<Rank>,
        reason: String,
    },
    /// The caller passed arguments this operation cannot run with.
    #[error("{op}: invalid argument: {why}")]
    InvalidArgument { op: &'static str, why: String },
    /// The group given to a communicator is not usable.
    #[error("invalid group {ranks:?}: {why}")]
    BadGroup { ranks: Vec<Rank>, why: String },
    /// A message from `peer` could not be understood.
    #[error("{op}: bad message from rank {peer}: {why}")]
    BadMessage {
        op: &'static str,
        peer: Rank,
        why: String,
    },
    /// Any other fabric failure while talking to `peer`.
    #[error("{op}: fabric error with rank {peer}: {source}")]
    Fabric {
        op: &'static str,
        peer: Rank,
        #[source]
        source: FabricError,
    },
    /// An earlier collective failed; the communicator must be rebuilt.
    #[error("the communicator is unusable after an earlier failure: {0}")]
    Poisoned(Box<CommError>),
}

impl CommError {
    /// The rank at fault, when the failure can be pinned on one.
    pub fn culprit(&self) -> Option<Rank> {
        match self {
            CommError::PeerFailed { rank, .. } | CommError::Timeout { rank, .. } => Some(*rank),
            CommError::Aborted { culprit, .. } => *culprit,
            CommError::BadMessage { peer, .. } | CommError::Fabric { peer, .. } => Some(*peer),
            CommError::Poisoned(inner) => inner.culprit(),
            CommError::SizeMismatch { .. }
            | CommError::OpMismatch { .. }
            | CommError::InvalidArgument { .. }
            | CommError::BadGroup { .. } => None,
        }
    }

    /// The reason to pass on to peers: a forwarded abort keeps the original reason.
    pub(crate) fn reason(&self) -> String {
        match self {
            CommError::Aborted { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }

    /// Turn a fabric error from talking to `peer` into a communicator error.
    pub(crate) fn from_fabric(op: &'static str, peer: Rank, e: FabricError) -> Self {
        match e {
            FabricError::PeerFailed { rank, why } => CommError::PeerFailed { op, rank, why },
            FabricError::Timeout { src, after, .. } => CommError::Timeout {
                op,
                rank: src,
                after,
            },
            source => CommError::Fabric { op, peer, source },
        }
    }
}

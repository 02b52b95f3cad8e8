//! The fabric seam: tagged point-to-point messages between ranks.
//!
//! A [`Fabric`] is one rank's endpoint. Messages are matched by (source rank, [`Tag`]) and are
//! FIFO per (source, destination, tag). Tensors travel as typed buffers ([`Payload`]) that an
//! in-process fabric moves without copying; a network fabric frames them as bytes. Every receive
//! has a deadline, and a peer known to have failed makes a receive from it fail at once, so a
//! collective built on the fabric never hangs on a dead rank.
//!
//! Implementations sit side by side: [`inproc`] (channels, zero-copy), [`quic`] (ranks in other
//! processes or hosts, over QUIC with mutual TLS from a per-job CA) and [`sim`] (the in-process
//! fabric behind modelled links with latency, bandwidth and contention on virtual time).

pub mod inproc;
pub mod quic;
pub mod sim;

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::clock::BoxFuture;

/// A rank's index in the job, `0..world`.
pub type Rank = usize;

/// What a message is about: a channel (one per communicator or subsystem) and a tag within it
/// (e.g. a collective's sequence number and step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tag {
    pub channel: u32,
    pub tag: u64,
}

impl Tag {
    pub const fn new(channel: u32, tag: u64) -> Self {
        Self { channel, tag }
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.channel, self.tag)
    }
}

/// A message body. Buffers are owned, so an in-process send moves them (no copy).
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// f32 tensor data.
    F32(Vec<f32>),
    /// bf16 tensor data as raw bits.
    Bf16(Vec<u16>),
    /// Opaque bytes (encoded control messages, serialized state).
    Bytes(Vec<u8>),
    /// A device tensor with integer metadata (see [`TensorMsg`]).
    Tensor(TensorMsg),
}

/// A device tensor on the wire: integer metadata (a shape, per-expert row counts: exact at any
/// size) and the values. In process the values move; over QUIC they are framed; a tensor of the
/// simulated device has no values, only its size, which simulated links charge all the same.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMsg {
    pub meta: Vec<u64>,
    pub values: Values,
}

/// The values of a [`TensorMsg`].
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// f32 values in host memory.
    F32(Vec<f32>),
    /// No values: a shape-only tensor of this many bytes (the simulated device).
    Absent { bytes: u64 },
    /// A value that stays in this process, of this many bytes: a device tensor that a rank
    /// hands to its own actors without a copy to the host. An in-process fabric moves it; a
    /// network fabric refuses to send it.
    Local { bytes: u64, value: LocalValue },
}

/// A value of any type moved through an in-process fabric ([`Values::Local`]). Cloning the
/// message shares the value; the first [`LocalValue::take`] gets it.
#[derive(Clone)]
pub struct LocalValue(Arc<Mutex<Option<Box<dyn Any + Send>>>>);

impl LocalValue {
    pub fn new<T: Any + Send>(value: T) -> LocalValue {
        LocalValue(Arc::new(Mutex::new(Some(Box::new(value)))))
    }

    /// The value, or why not: it is not a `T`, or it was taken already (a cloned message).
    pub fn take<T: Any>(&self) -> Result<T, &'static str> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take().map(|b| b.downcast::<T>()) {
            Some(Ok(v)) => Ok(*v),
            Some(Err(other)) => {
                *slot = Some(other);
                Err("an in-process value of another type")
            }
            None => Err("an in-process value that was already taken"),
        }
    }
}

impl PartialEq for LocalValue {
    fn eq(&self, other: &LocalValue) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for LocalValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalValue")
    }
}

impl Values {
    /// Size of the values in bytes (modelled for [`Values::Absent`]).
    pub fn byte_len(&self) -> u64 {
        match self {
            Values::F32(v) => v.len() as u64 * 4,
            Values::Absent { bytes } | Values::Local { bytes, .. } => *bytes,
        }
    }
}

impl Payload {
    /// Size of the body in bytes (a shape-only tensor counts the bytes it stands for).
    pub fn byte_len(&self) -> usize {
        match self {
            Payload::F32(v) => v.len() * 4,
            Payload::Bf16(v) => v.len() * 2,
            Payload::Bytes(v) => v.len(),
            Payload::Tensor(t) => {
                t.meta.len() * 8 + usize::try_from(t.values.byte_len()).unwrap_or(usize::MAX)
            }
        }
    }

    /// The f32 buffer, or an error naming what arrived instead.
    pub fn into_f32(self) -> Result<Vec<f32>, FabricError> {
        match self {
            Payload::F32(v) => Ok(v),
            other => Err(FabricError::WrongPayload {
                expected: "f32",
                got: other.kind(),
            }),
        }
    }

    /// The tensor, or an error naming what arrived instead.
    pub fn into_tensor(self) -> Result<TensorMsg, FabricError> {
        match self {
            Payload::Tensor(t) => Ok(t),
            other => Err(FabricError::WrongPayload {
                expected: "tensor",
                got: other.kind(),
            }),
        }
    }

    /// The bytes buffer, or an error naming what arrived instead.
    pub fn into_bytes(self) -> Result<Vec<u8>, FabricError> {
        match self {
            Payload::Bytes(v) => Ok(v),
            other => Err(FabricError::WrongPayload {
                expected: "bytes",
                got: other.kind(),
            }),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Payload::F32(_) => "f32",
            Payload::Bf16(_) => "bf16",
            Payload::Bytes(_) => "bytes",
            Payload::Tensor(_) => "tensor",
        }
    }
}

/// Why a fabric operation failed. Every variant names the peer involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FabricError {
    #[error("rank {rank} is outside the job of {world} ranks")]
    NoSuchRank { rank: Rank, world: usize },
    #[error("receive from rank {src} (tag {tag}) timed out after {after:?}")]
    Timeout {
        src: Rank,
        tag: Tag,
        after: Duration,
    },
    #[error("rank {rank} has failed: {why}")]
    PeerFailed { rank: Rank, why: String },
    #[error("the fabric is shut down")]
    Closed,
    #[error("expected a {expected} payload, got {got}")]
    WrongPayload {
        expected: &'static str,
        got: &'static str,
    },
    #[error("transport error with rank {rank}: {why}")]
    Transport { rank: Rank, why: String },
}

/// One rank's endpoint on the fabric.
pub trait Fabric: Send + Sync + std::fmt::Debug {
    /// This endpoint's rank.
    fn rank(&self) -> Rank;
    /// Number of ranks in the job.
    fn world(&self) -> usize;
    /// Send `payload` to `dst` under `tag`. Completes when the fabric has taken the message
    /// (in-process: at once; simulated: after the modelled transfer).
    fn send(&self, dst: Rank, tag: Tag, payload: Payload)
    -> BoxFuture<'_, Result<(), FabricError>>;
    /// Receive the next message from `src` under `tag`, waiting at most `deadline`.
    fn recv(
        &self,
        src: Rank,
        tag: Tag,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Payload, FabricError>>;
    /// Every message to this rank on `channel`, from any source, from now on (and those already
    /// waiting), in arrival order and FIFO per (source, tag), instead of through
    /// [`Fabric::recv`]; and every peer marked failed meanwhile. One subscriber per channel: a
    /// second subscription replaces the first. The inbox closes when the fabric does.
    fn subscribe(&self, channel: u32) -> Result<Inbox, FabricError>;
}

/// What a channel's subscriber receives ([`Fabric::subscribe`]).
#[derive(Debug)]
pub enum Delivery {
    /// A message from `src` under `tag`.
    Message {
        src: Rank,
        tag: Tag,
        payload: Payload,
    },
    /// `rank` has failed: nothing more will come from it.
    PeerFailed { rank: Rank, why: String },
}

/// A channel subscription's receiving end.
pub type Inbox = tokio::sync::mpsc::UnboundedReceiver<Delivery>;

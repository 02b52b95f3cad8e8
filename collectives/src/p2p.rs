//! Point-to-point sends and receives within a communicator's group (pipeline activations).
//!
//! They are not collective: they take no sequence number, so they may run concurrently with each
//! other and with collectives on the same group. [`P2p`] is a cloneable handle
//! ([`Communicator::p2p`]) for doing so while the communicator itself is busy; the
//! communicator's own [`Communicator::send`] / [`Communicator::recv`] go through one. A message
//! goes under the tag `1 << 63 | tag` on the communicator's channel, raw (no trailer: the buffer
//! moves as is), and messages with the same (peer, tag) arrive in the order they were sent.

use std::sync::Arc;
use std::time::Duration;

use flotilla_runtime::fabric::{Fabric, Rank, Tag};

use crate::communicator::Communicator;
use crate::elem::Elem;
use crate::error::CommError;
use crate::op::payload_kind;

const P2P_BIT: u64 = 1 << 63;

/// Point-to-point messaging within a communicator's group; peers are group indices.
#[derive(Debug, Clone)]
pub struct P2p {
    fabric: Arc<dyn Fabric>,
    ranks: Arc<[Rank]>,
    me: usize,
    channel: u32,
    deadline: Duration,
}

impl P2p {
    pub(crate) fn new(
        fabric: Arc<dyn Fabric>,
        ranks: Arc<[Rank]>,
        me: usize,
        channel: u32,
        deadline: Duration,
    ) -> Self {
        P2p {
            fabric,
            ranks,
            me,
            channel,
            deadline,
        }
    }

    fn peer(&self, op: &'static str, peer: usize) -> Result<Rank, CommError> {
        self.ranks
            .get(peer)
            .copied()
            .ok_or_else(|| CommError::InvalidArgument {
                op,
                why: format!("peer {peer} outside a group of {}", self.ranks.len()),
            })
    }

    fn tag(&self, tag: u32) -> Tag {
        Tag::new(self.channel, P2P_BIT | u64::from(tag))
    }

    pub(crate) async fn send_t<T: Elem>(
        &self,
        peer: usize,
        tag: u32,
        buf: Vec<T>,
    ) -> Result<(), CommError> {
        let dst = self.peer("send", peer)?;
        self.fabric
            .send(dst, self.tag(tag), T::wrap(buf))
            .await
            .map_err(|e| CommError::from_fabric("send", dst, e))
    }

    pub(crate) async fn recv_t<T: Elem>(&self, peer: usize, tag: u32) -> Result<Vec<T>, CommError> {
        let src = self.peer("recv", peer)?;
        match self.fabric.recv(src, self.tag(tag), self.deadline).await {
            Ok(p) => T::unwrap(p).map_err(|p| CommError::BadMessage {
                op: "recv",
                peer: src,
                why: format!(
                    "a {} payload where {} was expected",
                    payload_kind(&p),
                    T::NAME
                ),
            }),
            Err(e) => Err(CommError::from_fabric("recv", src, e)),
        }
    }

    pub(crate) async fn recv_exact_t<T: Elem>(
        &self,
        peer: usize,
        tag: u32,
        len: usize,
    ) -> Result<Vec<T>, CommError> {
        let v = self.recv_t::<T>(peer, tag).await?;
        if v.len() == len {
            Ok(v)
        } else {
            Err(CommError::SizeMismatch {
                op: "recv",
                me: self.ranks[self.me],
                peer: self.ranks[peer],
                ours: len,
                theirs: v.len(),
            })
        }
    }

    /// Send `buf` to group rank `peer` under `tag`.
    pub async fn send(&self, peer: usize, tag: u32, buf: Vec<f32>) -> Result<(), CommError> {
        self.send_t(peer, tag, buf).await
    }

    /// Receive the next buffer from group rank `peer` under `tag`, within the deadline.
    pub async fn recv(&self, peer: usize, tag: u32) -> Result<Vec<f32>, CommError> {
        self.recv_t(peer, tag).await
    }

    /// Receive from `peer` under `tag` a buffer that must have `len` elements.
    pub async fn recv_exact(
        &self,
        peer: usize,
        tag: u32,
        len: usize,
    ) -> Result<Vec<f32>, CommError> {
        self.recv_exact_t(peer, tag, len).await
    }
}

impl Communicator {
    /// Send `buf` to group rank `peer` under `tag` (see [`P2p::send`]).
    pub async fn send(&self, peer: usize, tag: u32, buf: Vec<f32>) -> Result<(), CommError> {
        self.p2p().send(peer, tag, buf).await
    }

    /// Receive the next buffer from group rank `peer` under `tag` (see [`P2p::recv`]).
    pub async fn recv(&self, peer: usize, tag: u32) -> Result<Vec<f32>, CommError> {
        self.p2p().recv(peer, tag).await
    }

    /// Receive a buffer of exactly `len` elements (see [`P2p::recv_exact`]).
    pub async fn recv_exact(
        &self,
        peer: usize,
        tag: u32,
        len: usize,
    ) -> Result<Vec<f32>, CommError> {
        self.p2p().recv_exact(peer, tag, len).await
    }
}

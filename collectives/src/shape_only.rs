//! Shape-only collectives: every operation of the communicator on buffers that have a length and
//! no values (the simulated device's tensors), with an `_absent` suffix.
//!
//! They run the same algorithm as the f32 operation of the same length (the same `Algo`
//! choice, with shape-only buffers counted as f32 by [`Communicator::pick`]), with the same
//! peers, the same number of messages and the same message sizes in bytes, **counted as f32**: a
//! shape-only message is a `Payload::Tensor` with `Values::Absent { bytes }` that stands for the
//! bytes of the f32 message, trailer included, so a simulated link charges it exactly the same
//! time. Nothing is allocated for the values: a
//! buffer of a billion elements costs its messages and nothing else.
//!
//! Failures follow the same protocol as the f32 operations (deadlines, stuck and abort notices,
//! a failed or silent peer named, the communicator poisoned after an error). Shape-only and
//! valued messages never mix: a shape-only message where f32 (or bf16) is expected, or the
//! reverse, is a [`CommError::BadMessage`] naming the sender.
//!
//! The results are lengths: what the f32 operation's result buffer would hold.
//!
//! # Wire form
//!
//! A raw buffer (point-to-point) is `meta: []`, `bytes: 4·len`. A data frame stands for an f32
//! frame, `4·len + 12` bytes (the f32 trailer is three elements), and carries its trailer in the
//! metadata, whose words count 8 bytes each toward that size:
//!
//! - `meta: [kind | total << 32]`, `bytes: 4·len + 4`, when the sender's total length fits in
//!   32 bits;
//! - `meta: [kind, total, len]`, `bytes: 4·len − 12`, otherwise (exact from 3 elements on; the
//!   algorithms never send fewer elements of a buffer of 2^32 or more).
//!
//! The f32 path sends a full buffer of 16384 elements or more (no spare room for its trailer) raw
//! after a 13-byte header message instead, one message and one byte more; shape-only buffers
//! model buffers with room for the trailer (as every chunk of the ring has, and every buffer that
//! the algorithms copy), so they always go as one frame. The f32 operations send such a full
//! buffer where they send the caller's own buffer (star, all-to-all, the first all-gather step),
//! and the upper half of a double-binary-tree all-reduce of 32768 elements or more.

use crate::absent::{Absent, absent};
use crate::p2p::P2p;
use crate::{Algo, CommError, Communicator, ReduceOp};

impl Communicator {
    /// [`Communicator::all_reduce`] of a shape-only buffer of `len` elements.
    pub async fn all_reduce_absent(
        &mut self,
        len: usize,
        op: ReduceOp,
        algo: Algo,
    ) -> Result<(), CommError> {
        self.all_reduce_t(absent(len), op, algo).await.map(drop)
    }

    /// [`Communicator::reduce_scatter`] of a shape-only buffer of `len` elements (a multiple of
    /// the group size); returns the length of this rank's chunk.
    pub async fn reduce_scatter_absent(
        &mut self,
        len: usize,
        op: ReduceOp,
    ) -> Result<usize, CommError> {
        self.reduce_scatter_t(absent(len), op)
            .await
            .map(|v| v.len())
    }

    /// [`Communicator::all_gather`] of shape-only chunks of `chunk_len` elements (all of one
    /// length); returns the gathered length.
    pub async fn all_gather_absent(&mut self, chunk_len: usize) -> Result<usize, CommError> {
        self.all_gather_t(absent(chunk_len), None)
            .await
            .map(|v| v.len())
    }

    /// [`Communicator::broadcast`] of a shape-only buffer of `len` elements (the same length on
    /// every rank).
    pub async fn broadcast_absent(&mut self, len: usize, root: usize) -> Result<(), CommError> {
        self.broadcast_t(absent(len), root).await.map(drop)
    }

    /// [`Communicator::all_to_all_v`] of shape-only parts: `send_lens[j]` elements go to group
    /// rank `j`; returns the length of the part each rank sent here.
    pub async fn all_to_all_v_absent(
        &mut self,
        send_lens: &[usize],
    ) -> Result<Vec<usize>, CommError> {
        let send: Vec<Vec<Absent>> = send_lens.iter().map(|&l| absent(l)).collect();
        let got = self.all_to_all_v_t(send).await?;
        Ok(got.iter().map(Vec::len).collect())
    }

    /// [`Communicator::send`] of a shape-only buffer of `len` elements.
    pub async fn send_absent(&self, peer: usize, tag: u32, len: usize) -> Result<(), CommError> {
        self.p2p().send_absent(peer, tag, len).await
    }

    /// [`Communicator::recv`] of a shape-only buffer; returns its length.
    pub async fn recv_absent(&self, peer: usize, tag: u32) -> Result<usize, CommError> {
        self.p2p().recv_absent(peer, tag).await
    }

    /// [`Communicator::recv_exact`] of a shape-only buffer of `len` elements.
    pub async fn recv_exact_absent(
        &self,
        peer: usize,
        tag: u32,
        len: usize,
    ) -> Result<(), CommError> {
        self.p2p().recv_exact_absent(peer, tag, len).await
    }
}

impl P2p {
    /// [`P2p::send`] of a shape-only buffer of `len` elements (`4·len` bytes on the wire).
    pub async fn send_absent(&self, peer: usize, tag: u32, len: usize) -> Result<(), CommError> {
        self.send_t(peer, tag, absent(len)).await
    }

    /// [`P2p::recv`] of a shape-only buffer; returns its length.
    pub async fn recv_absent(&self, peer: usize, tag: u32) -> Result<usize, CommError> {
        self.recv_t::<Absent>(peer, tag).await.map(|v| v.len())
    }

    /// [`P2p::recv_exact`] of a shape-only buffer of `len` elements.
    pub async fn recv_exact_absent(
        &self,
        peer: usize,
        tag: u32,
        len: usize,
    ) -> Result<(), CommError> {
        self.recv_exact_t::<Absent>(peer, tag, len).await.map(drop)
    }
}

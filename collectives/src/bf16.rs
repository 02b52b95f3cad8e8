//! bf16 collectives: every operation of the communicator on bf16 buffers held as raw bits
//! (`Vec<u16>`, as [`half::bf16::to_bits`] gives them; [`crate::to_bf16`] / [`crate::from_bf16`]
//! convert), travelling as `Payload::Bf16` on the fabric.
//!
//! Reductions accumulate in f32 and round to nearest-even once per hop (see [`crate::elem`]):
//! a ring rounds n−1 times per element, a tree once per level, the star once per folded
//! buffer; `Avg` divides the rounded sum in f32 and rounds once more. Messages of one element
//! type are never mixed with the other: a peer sending f32 where bf16 is expected is a bad
//! message naming it.

use crate::p2p::P2p;
use crate::{Algo, CommError, Communicator, ReduceOp};

impl Communicator {
    /// [`Communicator::all_reduce`] on bf16 bits.
    pub async fn all_reduce_bf16(
        &mut self,
        buf: Vec<u16>,
        op: ReduceOp,
        algo: Algo,
    ) -> Result<Vec<u16>, CommError> {
        self.all_reduce_t(buf, op, algo).await
    }

    /// [`Communicator::reduce_scatter`] on bf16 bits.
    pub async fn reduce_scatter_bf16(
        &mut self,
        buf: Vec<u16>,
        op: ReduceOp,
    ) -> Result<Vec<u16>, CommError> {
        self.reduce_scatter_t(buf, op).await
    }

    /// [`Communicator::all_gather`] on bf16 bits.
    pub async fn all_gather_bf16(&mut self, chunk: Vec<u16>) -> Result<Vec<u16>, CommError> {
        self.all_gather_t(chunk, None).await
    }

    /// [`Communicator::all_gather_into`] on bf16 bits.
    pub async fn all_gather_into_bf16(
        &mut self,
        chunk: Vec<u16>,
        out: Vec<u16>,
    ) -> Result<Vec<u16>, CommError> {
        self.all_gather_t(chunk, Some(out)).await
    }

    /// [`Communicator::broadcast`] on bf16 bits.
    pub async fn broadcast_bf16(
        &mut self,
        buf: Vec<u16>,
        root: usize,
    ) -> Result<Vec<u16>, CommError> {
        self.broadcast_t(buf, root).await
    }

    /// [`Communicator::all_to_all_v`] on bf16 bits.
    pub async fn all_to_all_v_bf16(
        &mut self,
        send: Vec<Vec<u16>>,
    ) -> Result<Vec<Vec<u16>>, CommError> {
        self.all_to_all_v_t(send).await
    }

    /// [`Communicator::send`] of bf16 bits.
    pub async fn send_bf16(&self, peer: usize, tag: u32, buf: Vec<u16>) -> Result<(), CommError> {
        self.p2p().send_t(peer, tag, buf).await
    }

    /// [`Communicator::recv`] of bf16 bits.
    pub async fn recv_bf16(&self, peer: usize, tag: u32) -> Result<Vec<u16>, CommError> {
        self.p2p().recv_t(peer, tag).await
    }
}

impl P2p {
    /// [`P2p::send`] of bf16 bits.
    pub async fn send_bf16(&self, peer: usize, tag: u32, buf: Vec<u16>) -> Result<(), CommError> {
        self.send_t(peer, tag, buf).await
    }

    /// [`P2p::recv`] of bf16 bits.
    pub async fn recv_bf16(&self, peer: usize, tag: u32) -> Result<Vec<u16>, CommError> {
        self.recv_t(peer, tag).await
    }

    /// [`P2p::recv_exact`] of bf16 bits.
    pub async fn recv_exact_bf16(
        &self,
        peer: usize,
        tag: u32,
        len: usize,
    ) -> Result<Vec<u16>, CommError> {
        self.recv_exact_t(peer, tag, len).await
    }
}

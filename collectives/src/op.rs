//! The per-operation context that gives the algorithms tagged, framed, failure-aware sends and
//! receives of any element type ([`Elem`]).
//!
//! Tags: every collective takes the next sequence number of its communicator and sends all its
//! messages under `Tag { channel, tag: seq << 8 | lane }` (lanes separate concurrent streams of
//! one operation, e.g. the two trees of a double binary tree). FIFO per (source, tag) orders the
//! messages within a lane. Point-to-point messages use the top bit of the tag (see [`crate::p2p`]).
//!
//! Data frames carry the operation's kind (operation, algorithm, reduction, root) and the
//! sender's total buffer length (see [`crate::wire`]), so that a peer running a different
//! operation or holding a buffer of another size is reported, naming it, instead of silently
//! mixing data; a buffer of the other element type is a bad message.
//!
//! Failure protocol: when a receive passes its deadline, the rank tells every peer that it is
//! stuck and waits a grace period for the silent peer; a peer that is itself stuck answers with
//! its own notice, so only the rank directly waiting on a stalled one blames it. A rank that
//! fails an operation for any reason (dead peer, timeout, mismatch, abort received) sends every
//! peer an abort naming the culprit, so the whole group errors out together.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_runtime::fabric::{Fabric, FabricError, Payload, Rank, Tag, Values};

use crate::elem::{Elem, Pool, Unframed};
use crate::error::CommError;
use crate::wire::{Control, frame, kind};

/// The per-operation context handed to the algorithms.
pub(crate) struct Op {
    pub(crate) fabric: Arc<dyn Fabric>,
    pub(crate) ranks: Arc<[Rank]>,
    pub(crate) me: usize,
    pub(crate) channel: u32,
    pub(crate) seq: u64,
    pub(crate) lanes: u8,
    pub(crate) name: &'static str,
    pub(crate) kind: u32,
    pub(crate) deadline: Duration,
    pub(crate) grace: Duration,
    pub(crate) stuck_sent: AtomicBool,
    /// The communicator's spare buffers, lent for the operation.
    pub(crate) pool: Mutex<Pool>,
}

impl Op {
    /// Group size.
    pub(crate) fn size(&self) -> usize {
        self.ranks.len()
    }

    /// This rank's index in the group.
    pub(crate) fn me(&self) -> usize {
        self.me
    }

    /// The global rank of group index `i`.
    pub(crate) fn global(&self, i: usize) -> Rank {
        self.ranks[i]
    }

    fn tag(&self, lane: u8) -> Tag {
        Tag::new(self.channel, (self.seq << 8) | u64::from(lane))
    }

    /// An error for a local argument problem.
    pub(crate) fn invalid(&self, why: impl Into<String>) -> CommError {
        CommError::InvalidArgument {
            op: self.name,
            why: why.into(),
        }
    }

    /// An empty buffer with room for `len` elements and a trailer (a spare one when possible).
    pub(crate) fn take<T: Elem>(&self, len: usize) -> Vec<T> {
        self.lock_pool().take(len + T::TRAILER)
    }

    /// A copy of `s` with room for a trailer, in a spare buffer when possible.
    pub(crate) fn copy<T: Elem>(&self, s: &[T]) -> Vec<T> {
        let mut v = self.take(s.len());
        v.extend_from_slice(s);
        v
    }

    /// Keep `v` as a spare for the next operations.
    pub(crate) fn give<T: Elem>(&self, v: Vec<T>) {
        self.lock_pool().give(v);
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        // The pool holds plain buffers; a panic elsewhere cannot leave it inconsistent.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Send `data` to group index `peer` on `lane`, framed with this rank's `total` length.
    pub(crate) async fn send<T: Elem>(
        &self,
        peer: usize,
        lane: u8,
        data: Vec<T>,
        total: usize,
    ) -> Result<(), CommError> {
        let dst = self.global(peer);
        let (header, body) = frame(data, self.kind, total);
        if let Some(h) = header {
            self.fabric
                .send(dst, self.tag(lane), h)
                .await
                .map_err(|e| CommError::from_fabric(self.name, dst, e))?;
        }
        self.fabric
            .send(dst, self.tag(lane), body)
            .await
            .map_err(|e| CommError::from_fabric(self.name, dst, e))
    }

    /// Receive the next frame from group index `peer` on `lane`. With `expect_total`, the
    /// sender's total length must equal it.
    pub(crate) async fn recv<T: Elem>(
        &self,
        peer: usize,
        lane: u8,
        expect_total: Option<usize>,
    ) -> Result<Vec<T>, CommError> {
        let src = self.global(peer);
        let tag = self.tag(lane);
        let (data, kind, total) = match self.receive(src, tag).await? {
            Ok(p) => match T::unframe(p) {
                Unframed::Frame { data, kind, total } => (data, kind, total),
                Unframed::Malformed(why) => return Err(self.bad(src, why)),
                Unframed::Other(p) => return Err(self.wrong_type::<T>(src, &p)),
            },
            Err(Control::Header { kind, total }) => match self.receive(src, tag).await? {
                Ok(p) => match T::unwrap(p) {
                    Ok(data) => (data, kind, total),
                    Err(p) => return Err(self.wrong_type::<T>(src, &p)),
                },
                Err(Control::Header { .. }) => return Err(self.bad(src, "two data headers")),
                Err(c) => return Err(self.control(src, tag, c).await),
            },
            Err(c) => return Err(self.control(src, tag, c).await),
        };
        self.check_frame(src, kind, total, expect_total)?;
        Ok(data)
    }

    /// One message from `src`: a data payload (anything but bytes), or a control message.
    /// Applies the deadline and the stuck protocol.
    async fn receive(&self, src: Rank, tag: Tag) -> Result<Result<Payload, Control>, CommError> {
        let msg = match self.fabric.recv(src, tag, self.deadline).await {
            Ok(p) => p,
            Err(FabricError::Timeout { .. }) => {
                self.announce_stuck(src).await;
                let timeout = || CommError::Timeout {
                    op: self.name,
                    rank: src,
                    after: self.deadline + self.grace,
                };
                match self.fabric.recv(src, tag, self.grace).await {
                    // Data (or its header) arriving after we told everyone we were stuck
                    // counts as silence.
                    Ok(Payload::Bytes(b)) => match Control::decode(&b) {
                        Ok(Control::Header { .. }) => return Err(timeout()),
                        _ => Payload::Bytes(b),
                    },
                    Ok(_) | Err(FabricError::Timeout { .. }) => return Err(timeout()),
                    Err(e) => return Err(CommError::from_fabric(self.name, src, e)),
                }
            }
            Err(e) => return Err(CommError::from_fabric(self.name, src, e)),
        };
        match msg {
            Payload::Bytes(b) => match Control::decode(&b) {
                Ok(c) => Ok(Err(c)),
                Err(why) => Err(self.bad(src, why)),
            },
            data => Ok(Ok(data)),
        }
    }

    fn wrong_type<T: Elem>(&self, src: Rank, got: &Payload) -> CommError {
        self.bad(
            src,
            format!(
                "a {} payload where {} was expected",
                payload_kind(got),
                T::NAME
            ),
        )
    }

    fn bad(&self, peer: Rank, why: impl Into<String>) -> CommError {
        CommError::BadMessage {
            op: self.name,
            peer,
            why: why.into(),
        }
    }

    fn check_frame(
        &self,
        src: Rank,
        kind: u32,
        total: u64,
        expect_total: Option<usize>,
    ) -> Result<(), CommError> {
        if kind != self.kind {
            return Err(CommError::OpMismatch {
                op: self.name,
                me: self.global(self.me),
                peer: src,
                ours: kind::name(self.kind),
                theirs: kind::name(kind),
            });
        }
        if let Some(ours) = expect_total
            && ours as u64 != total
        {
            return Err(CommError::SizeMismatch {
                op: self.name,
                me: self.global(self.me),
                peer: src,
                ours,
                theirs: total as usize,
            });
        }
        Ok(())
    }

    /// Check that a received segment has the length this rank computed for it.
    pub(crate) fn check_len<T>(
        &self,
        peer: usize,
        got: &[T],
        want: usize,
    ) -> Result<(), CommError> {
        if got.len() == want {
            Ok(())
        } else {
            Err(self.bad(
                self.global(peer),
                format!("segment of {} elements, expected {want}", got.len()),
            ))
        }
    }

    /// A control message arrived from `src` where data was expected: turn it into the error.
    async fn control(&self, src: Rank, tag: Tag, c: Control) -> CommError {
        match c {
            Control::Header { .. } => self.bad(src, "a data header where data was expected"),
            Control::Abort { culprit, reason } => self.aborted(src, culprit, reason),
            Control::Stuck { waiting_on } => {
                // `src` is alive but stuck itself: tell our own waiters, then wait for its verdict.
                self.announce_stuck(src).await;
                match self.fabric.recv(src, tag, self.deadline).await {
                    Ok(Payload::Bytes(b)) => match Control::decode(&b) {
                        Ok(Control::Abort { culprit, reason }) => {
                            self.aborted(src, culprit, reason)
                        }
                        Ok(Control::Stuck { .. }) => self.bad(src, "two stuck notices"),
                        Ok(Control::Header { .. }) => self.bad(src, "data after a stuck notice"),
                        Err(why) => self.bad(src, why),
                    },
                    Ok(_) => self.bad(src, "data after a stuck notice"),
                    Err(FabricError::Timeout { .. }) => CommError::Timeout {
                        op: self.name,
                        rank: waiting_on,
                        after: self.deadline * 2,
                    },
                    Err(e) => CommError::from_fabric(self.name, src, e),
                }
            }
        }
    }

    fn aborted(&self, by: Rank, culprit: Option<Rank>, reason: String) -> CommError {
        CommError::Aborted {
            op: self.name,
            by,
            culprit,
            reason,
        }
    }

    /// Send `msg` to every peer on every lane, ignoring failures (this is the failure path).
    async fn tell_everyone(&self, msg: &Control) {
        for peer in (0..self.size()).filter(|&p| p != self.me) {
            for lane in 0..self.lanes {
                let _ = self
                    .fabric
                    .send(self.global(peer), self.tag(lane), msg.encode())
                    .await;
            }
        }
    }

    /// Tell every peer, once, that this rank is stuck waiting on `waiting_on`.
    async fn announce_stuck(&self, waiting_on: Rank) {
        if !self.stuck_sent.swap(true, Ordering::AcqRel) {
            self.tell_everyone(&Control::Stuck { waiting_on }).await;
        }
    }

    /// Tell every peer that this rank gives up on the operation, and why.
    pub(crate) async fn abort(&self, err: &CommError) {
        tracing::debug!(op = self.name, seq = self.seq, %err, "collective failed");
        let msg = Control::Abort {
            culprit: err.culprit(),
            reason: err.reason(),
        };
        self.tell_everyone(&msg).await;
    }
}

/// What kind of payload `p` is, for error messages.
pub(crate) fn payload_kind(p: &Payload) -> &'static str {
    match p {
        Payload::F32(_) => "f32",
        Payload::Bf16(_) => "bf16",
        Payload::Bytes(_) => "bytes",
        Payload::Tensor(t) => match t.values {
            Values::Absent { .. } => "shape-only",
            Values::F32(_) => "f32 tensor",
            Values::Local { .. } => "in-process tensor",
        },
    }
}

//! The communicator: a group of ranks over the fabric, and the per-operation context that gives
//! the algorithms tagged, framed, failure-aware sends and receives.
//!
//! Tags: every collective takes the next sequence number of its communicator and sends all its
//! messages under `Tag { channel, tag: seq << 8 | lane }` (lanes separate concurrent streams of
//! one operation, e.g. the two trees of a double binary tree). FIFO per (source, tag) orders the
//! messages within a lane. Point-to-point messages use the top bit of the tag (see [`crate::p2p`]).
//!
//! Data frames are `Payload::F32` with a three-word trailer: the operation's kind (operation,
//! algorithm, reduction, root) and the sender's total buffer length, so that a peer running a
//! different operation or holding a buffer of another size is reported, naming it, instead of
//! silently mixing data.
//!
//! Failure protocol: when a receive passes its deadline, the rank tells every peer that it is
//! stuck and waits a grace period for the silent peer; a peer that is itself stuck answers with
//! its own notice, so only the rank directly waiting on a stalled one blames it. A rank that
//! fails an operation for any reason (dead peer, timeout, mismatch, abort received) sends every
//! peer an abort naming the culprit, so the whole group errors out together.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flotilla_runtime::fabric::{Fabric, FabricError, Payload, Rank, Tag};

use crate::error::CommError;
use crate::wire::{Control, TRAILER, frame, kind};
use crate::{Algo, CommConfig, ReduceOp, all_to_all, ring, tree};

/// The per-operation context handed to the algorithms.
pub(crate) struct Op {
    fabric: Arc<dyn Fabric>,
    ranks: Arc<[Rank]>,
    me: usize,
    channel: u32,
    seq: u64,
    lanes: u8,
    pub(crate) name: &'static str,
    kind: u32,
    deadline: Duration,
    grace: Duration,
    stuck_sent: AtomicBool,
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

    /// Send `data` to group index `peer` on `lane`, framed with this rank's `total` length.
    pub(crate) async fn send(
        &self,
        peer: usize,
        lane: u8,
        data: Vec<f32>,
        total: usize,
    ) -> Result<(), CommError> {
        let dst = self.global(peer);
        self.fabric
            .send(dst, self.tag(lane), frame(data, self.kind, total))
            .await
            .map_err(|e| CommError::from_fabric(self.name, dst, e))
    }

    /// Receive the next frame from group index `peer` on `lane`. With `expect_total`, the
    /// sender's total length must equal it.
    pub(crate) async fn recv(
        &self,
        peer: usize,
        lane: u8,
        expect_total: Option<usize>,
    ) -> Result<Vec<f32>, CommError> {
        let src = self.global(peer);
        let tag = self.tag(lane);
        let msg = match self.fabric.recv(src, tag, self.deadline).await {
            Ok(p) => p,
            Err(FabricError::Timeout { .. }) => {
                self.announce_stuck(src).await;
                match self.fabric.recv(src, tag, self.grace).await {
                    Ok(p @ Payload::Bytes(_)) => p,
                    // Silent, or data arriving after we told everyone we were stuck.
                    Ok(_) | Err(FabricError::Timeout { .. }) => {
                        return Err(CommError::Timeout {
                            op: self.name,
                            rank: src,
                            after: self.deadline + self.grace,
                        });
                    }
                    Err(e) => return Err(CommError::from_fabric(self.name, src, e)),
                }
            }
            Err(e) => return Err(CommError::from_fabric(self.name, src, e)),
        };
        match msg {
            Payload::F32(v) => self.unframe(src, v, expect_total),
            Payload::Bytes(b) => Err(self.control(src, tag, &b).await),
            Payload::Bf16(_) => Err(self.bad(src, "a bf16 payload where f32 was expected")),
        }
    }

    fn bad(&self, peer: Rank, why: impl Into<String>) -> CommError {
        CommError::BadMessage {
            op: self.name,
            peer,
            why: why.into(),
        }
    }

    fn unframe(
        &self,
        src: Rank,
        mut v: Vec<f32>,
        expect_total: Option<usize>,
    ) -> Result<Vec<f32>, CommError> {
        let Some(body) = v.len().checked_sub(TRAILER) else {
            return Err(self.bad(src, "frame shorter than its trailer"));
        };
        let t = &v[body..];
        let kind = t[0].to_bits();
        let total = (u64::from(t[2].to_bits()) << 32 | u64::from(t[1].to_bits())) as usize;
        v.truncate(body);
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
            && ours != total
        {
            return Err(CommError::SizeMismatch {
                op: self.name,
                me: self.global(self.me),
                peer: src,
                ours,
                theirs: total,
            });
        }
        Ok(v)
    }

    /// Check that a received segment has the length this rank computed for it.
    pub(crate) fn check_len(&self, peer: usize, got: &[f32], want: usize) -> Result<(), CommError> {
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
    async fn control(&self, src: Rank, tag: Tag, b: &[u8]) -> CommError {
        match Control::decode(b) {
            Err(why) => self.bad(src, why),
            Ok(Control::Abort { culprit, reason }) => self.aborted(src, culprit, reason),
            Ok(Control::Stuck { waiting_on }) => {
                // `src` is alive but stuck itself: tell our own waiters, then wait for its verdict.
                self.announce_stuck(src).await;
                match self.fabric.recv(src, tag, self.deadline).await {
                    Ok(Payload::Bytes(b)) => match Control::decode(&b) {
                        Ok(Control::Abort { culprit, reason }) => {
                            self.aborted(src, culprit, reason)
                        }
                        Ok(Control::Stuck { .. }) => self.bad(src, "two stuck notices"),
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

/// One rank's handle on a group of ranks.
#[derive(Debug)]
pub struct Communicator {
    fabric: Arc<dyn Fabric>,
    ranks: Arc<[Rank]>,
    me: usize,
    channel: u32,
    seq: u64,
    cfg: CommConfig,
    poisoned: Option<CommError>,
}

impl Communicator {
    /// A communicator over `ranks` (global ranks, in group order; must include this fabric
    /// endpoint's rank) on fabric `channel`. Every member must build it with the same ranks and
    /// channel, and communicators whose groups overlap must use different channels.
    pub fn new(
        fabric: Arc<dyn Fabric>,
        ranks: Vec<Rank>,
        channel: u32,
        cfg: CommConfig,
    ) -> Result<Self, CommError> {
        let bad = |why: String| CommError::BadGroup {
            ranks: ranks.clone(),
            why,
        };
        if let Some(&r) = ranks.iter().find(|&&r| r >= fabric.world()) {
            return Err(bad(format!(
                "rank {r} is outside the job of {}",
                fabric.world()
            )));
        }
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!("rank {} appears twice", w[0])));
        }
        if ranks.len() >= 1 << 24 {
            return Err(bad("more than 2^24 ranks".into()));
        }
        let Some(me) = ranks.iter().position(|&r| r == fabric.rank()) else {
            return Err(bad(format!(
                "this rank ({}) is not a member",
                fabric.rank()
            )));
        };
        Ok(Communicator {
            fabric,
            ranks: ranks.into(),
            me,
            channel,
            seq: 0,
            cfg,
            poisoned: None,
        })
    }

    /// A communicator over the whole job.
    pub fn world(fabric: Arc<dyn Fabric>, channel: u32, cfg: CommConfig) -> Self {
        let me = fabric.rank();
        let world = fabric.world();
        Communicator {
            fabric,
            ranks: (0..world).collect(),
            me,
            channel,
            seq: 0,
            cfg,
            poisoned: None,
        }
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.me
    }

    /// Number of ranks in the group.
    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    /// The group's global ranks, in group order.
    pub fn ranks(&self) -> &[Rank] {
        &self.ranks
    }

    /// The fabric channel of this communicator.
    pub fn channel(&self) -> u32 {
        self.channel
    }

    /// The configuration (deadlines, tree threshold).
    pub fn config(&self) -> &CommConfig {
        &self.cfg
    }

    /// The error that made the communicator unusable, if one did.
    pub fn poisoned(&self) -> Option<&CommError> {
        self.poisoned.as_ref()
    }

    /// A point-to-point handle on this group, usable while a collective runs.
    pub fn p2p(&self) -> crate::p2p::P2p {
        crate::p2p::P2p::new(
            Arc::clone(&self.fabric),
            Arc::clone(&self.ranks),
            self.me,
            self.channel,
            self.cfg.deadline,
        )
    }

    /// Which algorithm an all-reduce of `len` elements runs with `algo`.
    pub fn pick(&self, algo: Algo, len: usize) -> Algo {
        match algo {
            Algo::Auto if len * 4 < self.cfg.tree_threshold_bytes => Algo::Tree,
            Algo::Auto => Algo::Ring,
            other => other,
        }
    }

    fn begin(&mut self, name: &'static str, kind: u32, lanes: u8) -> Result<Op, CommError> {
        if let Some(e) = &self.poisoned {
            return Err(CommError::Poisoned(Box::new(e.clone())));
        }
        let seq = self.seq;
        self.seq += 1;
        Ok(Op {
            fabric: Arc::clone(&self.fabric),
            ranks: Arc::clone(&self.ranks),
            me: self.me,
            channel: self.channel,
            seq,
            lanes,
            name,
            kind,
            deadline: self.cfg.deadline,
            grace: self.cfg.grace,
            stuck_sent: AtomicBool::new(false),
        })
    }

    async fn finish<T>(&mut self, op: &Op, r: Result<T, CommError>) -> Result<T, CommError> {
        if let Err(e) = &r {
            op.abort(e).await;
            self.poisoned = Some(e.clone());
        }
        r
    }

    /// Give up on this rank's next operation before it starts: tell every member, who may be
    /// waiting in it, why (naming `err`'s culprit), and poison the communicator. Used by
    /// [`crate::hfreduce`] when a host leader's local stage fails.
    pub(crate) async fn fail_next(&mut self, err: &CommError) {
        if self.poisoned.is_some() {
            return;
        }
        // Every operation's messages go out on lanes 0 and 1 at most.
        if let Ok(ctx) = self.begin("all_reduce", 0, 2) {
            ctx.abort(err).await;
        }
        self.poisoned = Some(err.clone());
    }

    /// Reduce `buf` element-wise across the group; every rank gets the result.
    pub async fn all_reduce(
        &mut self,
        buf: Vec<f32>,
        op: ReduceOp,
        algo: Algo,
    ) -> Result<Vec<f32>, CommError> {
        let algo = self.pick(algo, buf.len());
        let code = match algo {
            Algo::Tree => kind::TREE_ALL_REDUCE,
            Algo::Ring | Algo::Auto => kind::RING_ALL_REDUCE,
        };
        let ctx = self.begin("all_reduce", kind::with(code, op.code() as usize), 2)?;
        let r = if code == kind::TREE_ALL_REDUCE {
            tree::all_reduce(&ctx, buf, op).await
        } else {
            ring::all_reduce(&ctx, buf, op).await
        };
        self.finish(&ctx, r).await
    }

    /// Reduce `buf` (length a multiple of the group size) and keep chunk `rank()` of the result.
    pub async fn reduce_scatter(
        &mut self,
        buf: Vec<f32>,
        op: ReduceOp,
    ) -> Result<Vec<f32>, CommError> {
        let k = kind::with(kind::REDUCE_SCATTER, op.code() as usize);
        let ctx = self.begin("reduce_scatter", k, 1)?;
        let r = ring::reduce_scatter(&ctx, buf, op).await;
        self.finish(&ctx, r).await
    }

    /// Concatenate every rank's `chunk` (all of one length) in group order.
    pub async fn all_gather(&mut self, chunk: Vec<f32>) -> Result<Vec<f32>, CommError> {
        let ctx = self.begin("all_gather", kind::ALL_GATHER, 1)?;
        let r = ring::all_gather(&ctx, chunk).await;
        self.finish(&ctx, r).await
    }

    /// Every rank gets group rank `root`'s `buf`; the other ranks pass a buffer of the same
    /// length (its contents are replaced).
    pub async fn broadcast(&mut self, buf: Vec<f32>, root: usize) -> Result<Vec<f32>, CommError> {
        let ctx = self.begin("broadcast", kind::with(kind::BROADCAST, root), 1)?;
        let r = if root < ctx.size() {
            tree::broadcast(&ctx, buf, root).await
        } else {
            Err(ctx.invalid(format!("root {root} outside a group of {}", ctx.size())))
        };
        self.finish(&ctx, r).await
    }

    /// Send `send[j]` to group rank `j` and return what each rank sent here; parts may have any
    /// length, including zero. `send.len()` must be the group size.
    pub async fn all_to_all_v(&mut self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CommError> {
        let ctx = self.begin("all_to_all_v", kind::ALL_TO_ALL_V, 1)?;
        let r = all_to_all::all_to_all_v(&ctx, send).await;
        self.finish(&ctx, r).await
    }

    /// Wait until every rank of the group has entered the barrier.
    pub async fn barrier(&mut self) -> Result<(), CommError> {
        let ctx = self.begin("barrier", kind::BARRIER, 1)?;
        let r = tree::barrier(&ctx).await;
        self.finish(&ctx, r).await
    }
}

//! The communicator: one rank's handle on a group of ranks over the fabric, and its public
//! collectives on f32 buffers (the bf16 ones are in [`crate::bf16`]). Each operation runs with a
//! fresh `Op` context (tags, framing, failure protocol: see `op.rs`).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use flotilla_runtime::fabric::{Fabric, Rank};

use crate::elem::{Elem, Pool};
use crate::error::CommError;
use crate::op::Op;
use crate::wire::kind;
use crate::{Algo, CommConfig, ReduceOp, all_to_all, ring, star, tree};

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
    /// Spare buffers carried from one operation to the next.
    pool: Pool,
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
            pool: Pool::default(),
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
            pool: Pool::default(),
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

    /// Which algorithm an all-reduce of `len` elements (of 4 bytes: bf16 and shape-only buffers
    /// count as f32 here) runs with `algo`: `Auto` is the tree below
    /// [`CommConfig::tree_threshold_bytes`], the star at or above
    /// [`CommConfig::star_threshold_bytes`] when the fabric is in-process
    /// ([`CommConfig::in_process`]), and the ring otherwise.
    pub fn pick(&self, algo: Algo, len: usize) -> Algo {
        let bytes = len.saturating_mul(4);
        match algo {
            Algo::Auto if bytes < self.cfg.tree_threshold_bytes => Algo::Tree,
            Algo::Auto if self.cfg.in_process && bytes >= self.cfg.star_threshold_bytes => {
                Algo::Star
            }
            Algo::Auto => Algo::Ring,
            other => other,
        }
    }

    /// Whether a reduce-scatter of `len` elements runs the star (else the ring).
    fn star_reduce_scatter(&self, len: usize) -> bool {
        self.cfg.in_process && len.saturating_mul(4) >= self.cfg.star_threshold_bytes
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
            pool: Mutex::new(std::mem::take(&mut self.pool)),
        })
    }

    async fn finish<T>(&mut self, op: Op, r: Result<T, CommError>) -> Result<T, CommError> {
        if let Err(e) = &r {
            op.abort(e).await;
            self.poisoned = Some(e.clone());
        }
        self.pool = op.pool.into_inner().unwrap_or_else(|p| p.into_inner());
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

    pub(crate) async fn all_reduce_t<T: Elem>(
        &mut self,
        buf: Vec<T>,
        op: ReduceOp,
        algo: Algo,
    ) -> Result<Vec<T>, CommError> {
        let algo = self.pick(algo, buf.len());
        let code = match algo {
            Algo::Tree => kind::TREE_ALL_REDUCE,
            Algo::Star => kind::STAR_ALL_REDUCE,
            Algo::Ring | Algo::Auto => kind::RING_ALL_REDUCE,
        };
        let ctx = self.begin("all_reduce", kind::with(code, op.code() as usize), 2)?;
        let r = match algo {
            Algo::Tree => tree::all_reduce(&ctx, buf, op).await,
            Algo::Star => star::all_reduce(&ctx, buf, op).await,
            Algo::Ring | Algo::Auto => ring::all_reduce(&ctx, buf, op).await,
        };
        self.finish(ctx, r).await
    }

    pub(crate) async fn reduce_scatter_t<T: Elem>(
        &mut self,
        buf: Vec<T>,
        op: ReduceOp,
    ) -> Result<Vec<T>, CommError> {
        let star = self.star_reduce_scatter(buf.len());
        let code = if star {
            kind::STAR_REDUCE_SCATTER
        } else {
            kind::REDUCE_SCATTER
        };
        let ctx = self.begin("reduce_scatter", kind::with(code, op.code() as usize), 1)?;
        let r = if star && ctx.size() > 1 {
            match ring::check_divisible(&ctx, buf.len()) {
                Ok(()) => star::reduce_scatter(&ctx, buf, op).await,
                Err(e) => Err(e),
            }
        } else {
            ring::reduce_scatter(&ctx, buf, op).await
        };
        self.finish(ctx, r).await
    }

    pub(crate) async fn all_gather_t<T: Elem>(
        &mut self,
        chunk: Vec<T>,
        out: Option<Vec<T>>,
    ) -> Result<Vec<T>, CommError> {
        let ctx = self.begin("all_gather", kind::ALL_GATHER, 1)?;
        let r = ring::all_gather(&ctx, chunk, out).await;
        self.finish(ctx, r).await
    }

    pub(crate) async fn broadcast_t<T: Elem>(
        &mut self,
        buf: Vec<T>,
        root: usize,
    ) -> Result<Vec<T>, CommError> {
        let ctx = self.begin("broadcast", kind::with(kind::BROADCAST, root), 1)?;
        let r = if root < ctx.size() {
            tree::broadcast(&ctx, buf, root).await
        } else {
            Err(ctx.invalid(format!("root {root} outside a group of {}", ctx.size())))
        };
        self.finish(ctx, r).await
    }

    pub(crate) async fn all_to_all_v_t<T: Elem>(
        &mut self,
        send: Vec<Vec<T>>,
    ) -> Result<Vec<Vec<T>>, CommError> {
        let ctx = self.begin("all_to_all_v", kind::ALL_TO_ALL_V, 1)?;
        let r = all_to_all::all_to_all_v(&ctx, send).await;
        self.finish(ctx, r).await
    }

    /// Reduce `buf` element-wise across the group; every rank gets the result.
    pub async fn all_reduce(
        &mut self,
        buf: Vec<f32>,
        op: ReduceOp,
        algo: Algo,
    ) -> Result<Vec<f32>, CommError> {
        self.all_reduce_t(buf, op, algo).await
    }

    /// Reduce `buf` (length a multiple of the group size) and keep chunk `rank()` of the result.
    pub async fn reduce_scatter(
        &mut self,
        buf: Vec<f32>,
        op: ReduceOp,
    ) -> Result<Vec<f32>, CommError> {
        self.reduce_scatter_t(buf, op).await
    }

    /// Concatenate every rank's `chunk` (all of one length) in group order.
    pub async fn all_gather(&mut self, chunk: Vec<f32>) -> Result<Vec<f32>, CommError> {
        self.all_gather_t(chunk, None).await
    }

    /// [`Communicator::all_gather`] into `out`'s allocation (its contents are replaced), so
    /// that a caller gathering again and again allocates (and page-faults) nothing.
    pub async fn all_gather_into(
        &mut self,
        chunk: Vec<f32>,
        out: Vec<f32>,
    ) -> Result<Vec<f32>, CommError> {
        self.all_gather_t(chunk, Some(out)).await
    }

    /// Every rank gets group rank `root`'s `buf`; the other ranks pass a buffer of the same
    /// length (its contents are replaced).
    pub async fn broadcast(&mut self, buf: Vec<f32>, root: usize) -> Result<Vec<f32>, CommError> {
        self.broadcast_t(buf, root).await
    }

    /// Send `send[j]` to group rank `j` and return what each rank sent here; parts may have any
    /// length, including zero. `send.len()` must be the group size.
    pub async fn all_to_all_v(&mut self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CommError> {
        self.all_to_all_v_t(send).await
    }

    /// Wait until every rank of the group has entered the barrier.
    pub async fn barrier(&mut self) -> Result<(), CommError> {
        let ctx = self.begin("barrier", kind::BARRIER, 1)?;
        let r = tree::barrier(&ctx).await;
        self.finish(ctx, r).await
    }
}

//! HFReduce (Fire-Flyer AI-HPC, arXiv 2408.14158 §IV): a hierarchical all-reduce for ranks
//! grouped by host.
//!
//! The ranks of one host share a [`HostReducer`]. Each rank hands its buffer to it (a move, no
//! copy); the host's leader (local index 0) then reduces the host's buffers chunk by chunk in host
//! memory, the reduction of a chunk split over a few threads (crossbeam scoped threads; plain
//! element-wise loops over cache-sized blocks, which LLVM vectorises). For each reduced chunk the
//! leader runs the inter-host all-reduce over the host leaders' [`Communicator`] (double binary
//! tree by default, as in the paper), then copies the result back into every local buffer, and
//! each rank gets its own buffer back. The stages are pipelined: a reducer thread reduces chunk
//! k+1 while the leader's thread runs the inter-host all-reduce of chunk k and copies it back.
//!
//! With a single host (no communicator, or one over one leader) the reduction and the copy back
//! are fused: each block of every local buffer is read once and written once, which is the least
//! memory traffic an all-reduce of separate per-rank buffers can have.
//!
//! Failures never hang. The leader waits for its local ranks at most the host deadline (half the
//! communicator deadline by default, so that remote leaders waiting on this one hear why before
//! they would blame it); a local rank that does not arrive, or that [`HostReducer::fail`] marks
//! failed, is named in the error, every local rank gets that error, and the leader tells the
//! other leaders through an abort of the next inter-host operation. A rank waiting for its leader
//! gives up after the communicator deadline (plus grace) naming the leader; once the leader has
//! started, its own waits are bounded, and a leader whose task is dropped mid-operation fails the
//! round for everyone.
//!
//! Shape-only buffers ([`HfReduce::all_reduce_absent`], for the simulated cluster) go through the
//! same host rounds and failure rules; the host stage has nothing to compute, and the leader runs
//! the inter-host all-reduce of every chunk shape-only, the same messages as for f32 buffers, on
//! its own task (no blocking thread, so it also runs on a paused clock).
//!
//! Every rank of a job must hold the same number of local ranks (the world size, which `Avg`
//! divides by, is `local_count × leaders`) and pass buffers of one length.

use std::sync::Arc;

use crate::hfreduce_host::{Deposit, LeaderGuard, OP};
use crate::kernels::{fused, reduce_chunk, run_parallel};
use crate::{Algo, CommError, Communicator, ReduceOp};

pub use crate::hfreduce_host::HostReducer;

/// Below this many elements (all local buffers together), a single-host reduction runs inline
/// on the leader's task instead of on a blocking thread.
const INLINE_ELEMS: usize = 1 << 16;

/// One rank's handle on a hierarchical all-reduce: its host's [`HostReducer`] and, on the host
/// leader (local index 0) of a multi-host job, the communicator over the host leaders.
#[derive(Debug)]
pub struct HfReduce {
    comm: Option<Communicator>,
    host: Arc<HostReducer>,
    local: usize,
    chunk_elems: usize,
    algo: Algo,
    round: u64,
    poisoned: Option<CommError>,
}

impl HfReduce {
    /// Rank `local_index` of a host of `local_count` ranks sharing `host`. The leader (local
    /// index 0) passes the communicator over the host leaders (`None` for a single host); the
    /// other ranks pass `None`. `chunk_bytes` is the pipeline's chunk size (rounded down to whole
    /// f32, at least one). Every rank of the job must use the same chunk size.
    pub fn new(
        comm_over_leaders: Option<Communicator>,
        host: Arc<HostReducer>,
        local_index: usize,
        local_count: usize,
        chunk_bytes: usize,
    ) -> Result<Self, CommError> {
        let invalid = |why: String| CommError::InvalidArgument { op: OP, why };
        if local_count != host.local_count() {
            return Err(invalid(format!(
                "local count {local_count} but the host reducer has {} ranks",
                host.local_count()
            )));
        }
        if local_index >= local_count {
            return Err(invalid(format!(
                "local index {local_index} on a host of {local_count} ranks"
            )));
        }
        if local_index != 0 && comm_over_leaders.is_some() {
            return Err(invalid(format!(
                "local rank {local_index} is not its host's leader but was given the leaders' \
                 communicator"
            )));
        }
        Ok(HfReduce {
            comm: comm_over_leaders,
            host,
            local: local_index,
            chunk_elems: (chunk_bytes / 4).max(1),
            algo: Algo::Tree,
            round: 0,
            poisoned: None,
        })
    }

    /// The inter-host algorithm (default: the double binary tree, as in the paper).
    pub fn with_algo(mut self, algo: Algo) -> Self {
        self.algo = algo;
        self
    }

    /// Whether this rank is its host's leader.
    pub fn is_leader(&self) -> bool {
        self.local == 0
    }

    /// The number of ranks taking part on this host.
    pub fn local_count(&self) -> usize {
        self.host.local_count()
    }

    /// The error that made this handle unusable, if one did.
    pub fn poisoned(&self) -> Option<&CommError> {
        self.poisoned.as_ref()
    }

    /// Reduce `buf` element-wise over every rank of every host; each rank gets the result back in
    /// its own buffer.
    pub async fn all_reduce(&mut self, buf: Vec<f32>, op: ReduceOp) -> Result<Vec<f32>, CommError> {
        match self.run(Deposit::F32(buf), op).await? {
            Deposit::F32(v) => Ok(v),
            Deposit::Absent(_) => Err(self.poison(CommError::BadMessage {
                op: OP,
                peer: self.host.ranks[0],
                why: "a shape-only result for an f32 buffer".into(),
            })),
        }
    }

    /// [`HfReduce::all_reduce`] of a shape-only buffer of `len` elements (see
    /// [`crate::shape_only`]): the host stage has nothing to compute, and the leader runs the
    /// same inter-host all-reduces as for f32 buffers (one per chunk, with the same algorithm,
    /// shape-only), one after the other, on its own task. Every local rank of the host must pass
    /// a shape-only buffer in the same round; one that passes f32 is named in the error.
    pub async fn all_reduce_absent(&mut self, len: usize, op: ReduceOp) -> Result<(), CommError> {
        self.run(Deposit::Absent(len), op).await.map(drop)
    }

    /// Poison this handle with `e` and return it.
    fn poison(&mut self, e: CommError) -> CommError {
        self.poisoned = Some(e.clone());
        e
    }

    async fn run(&mut self, buf: Deposit, op: ReduceOp) -> Result<Deposit, CommError> {
        if let Some(e) = &self.poisoned {
            return Err(CommError::Poisoned(Box::new(e.clone())));
        }
        let round = self.round;
        self.round += 1;
        let r = if self.local == 0 {
            self.lead(round, buf, op).await
        } else {
            match self.host.deposit(round, self.local, buf, op) {
                Ok(()) => self.host.collect(round, self.local).await,
                Err(e) => Err(e),
            }
        };
        r.map_err(|e| self.poison(e))
    }

    async fn lead(&mut self, round: u64, buf: Deposit, op: ReduceOp) -> Result<Deposit, CommError> {
        let host = Arc::clone(&self.host);
        host.deposit(round, 0, buf, op)?;
        let mut guard = LeaderGuard {
            host: &host,
            round,
            armed: true,
        };
        let ready = match host.gather(round).await {
            Ok(parts) => check(&host, parts, op),
            Err(e) => Err(e),
        };
        let r = match ready {
            Ok(Checked::F32(bufs)) => self
                .reduce(bufs, op)
                .await
                .map(|b| b.into_iter().map(Deposit::F32).collect()),
            Ok(Checked::Absent { len, count }) => self
                .reduce_absent(len, op)
                .await
                .map(|()| (0..count).map(|_| Deposit::Absent(len)).collect()),
            Err(e) => {
                // Tell the other hosts' leaders, who are waiting on this one, why.
                if let Some(c) = self.comm.as_mut() {
                    c.fail_next(&e).await;
                }
                Err(e)
            }
        };
        guard.armed = false;
        match r {
            Ok(bufs) => host
                .deliver(round, bufs)
                .ok_or_else(|| CommError::InvalidArgument {
                    op: OP,
                    why: "a host of no ranks".into(),
                }),
            Err(e) => {
                host.fail_round(round, &e);
                Err(e)
            }
        }
    }

    /// The reduction proper, over every local buffer (index 0 is the leader's).
    async fn reduce(
        &mut self,
        mut bufs: Vec<Vec<f32>>,
        op: ReduceOp,
    ) -> Result<Vec<Vec<f32>>, CommError> {
        let leaders = self.comm.as_ref().map_or(1, Communicator::size);
        let world = leaders * bufs.len();
        let threads = self.host.threads;
        let leader = self.host.ranks[0];
        let panicked = || CommError::Aborted {
            op: OP,
            by: leader,
            culprit: None,
            reason: "the host reduction panicked".into(),
        };
        if leaders == 1 {
            if bufs.iter().map(Vec::len).sum::<usize>() < INLINE_ELEMS {
                fused(&mut bufs, op, world, 1);
                return Ok(bufs);
            }
            return tokio::task::spawn_blocking(move || {
                fused(&mut bufs, op, world, threads);
                bufs
            })
            .await
            .map_err(|_| panicked());
        }
        let Some(mut comm) = self.comm.take() else {
            return Err(panicked());
        };
        let handle = tokio::runtime::Handle::current();
        let (chunk, algo) = (self.chunk_elems, self.algo);
        let (comm, bufs, r) = tokio::task::spawn_blocking(move || {
            let stages = Stages {
                handle: &handle,
                op,
                world,
                chunk,
                threads,
                algo,
            };
            let r = stages.run(&mut comm, &mut bufs);
            (comm, bufs, r)
        })
        .await
        .map_err(|_| panicked())?;
        self.comm = Some(comm);
        r.map(|()| bufs)
    }

    /// The shape-only reduction of buffers of `len` elements: the inter-host all-reduce of every
    /// chunk that [`Stages::run`] would run, in the same order (a single host sends nothing).
    async fn reduce_absent(&mut self, len: usize, op: ReduceOp) -> Result<(), CommError> {
        let Some(comm) = self.comm.as_mut().filter(|c| c.size() > 1) else {
            return Ok(());
        };
        let chunk = self.chunk_elems;
        for k in 0..len.div_ceil(chunk).max(1) {
            let part = len.saturating_sub(k * chunk).min(chunk);
            comm.all_reduce_absent(part, inter_op(op), self.algo)
                .await?;
        }
        Ok(())
    }
}

/// The reduction between host leaders: `Avg` sums (the leader divides by the world size).
fn inter_op(op: ReduceOp) -> ReduceOp {
    match op {
        ReduceOp::Max => ReduceOp::Max,
        ReduceOp::Sum | ReduceOp::Avg => ReduceOp::Sum,
    }
}

/// A host's checked round: every local buffer f32, or every one shape-only of one length.
enum Checked {
    F32(Vec<Vec<f32>>),
    Absent { len: usize, count: usize },
}

/// Check that every local rank passed a buffer of the leader's kind and length, and the same
/// reduction.
fn check(
    host: &HostReducer,
    parts: Vec<(Deposit, ReduceOp)>,
    op: ReduceOp,
) -> Result<Checked, CommError> {
    let Some(first) = parts.first().map(|p| &p.0) else {
        return Ok(Checked::F32(Vec::new()));
    };
    let (len, kind) = (first.len(), first.kind());
    for (i, (b, o)) in parts.iter().enumerate() {
        if b.kind() != kind {
            return Err(CommError::BadMessage {
                op: OP,
                peer: host.ranks[i],
                why: format!("a {} buffer where the host leader has {kind}", b.kind()),
            });
        }
        if b.len() != len {
            return Err(CommError::SizeMismatch {
                op: OP,
                me: host.ranks[0],
                peer: host.ranks[i],
                ours: len,
                theirs: b.len(),
            });
        }
        if *o != op {
            return Err(CommError::OpMismatch {
                op: OP,
                me: host.ranks[0],
                peer: host.ranks[i],
                ours: format!("all_reduce({op:?})"),
                theirs: format!("all_reduce({o:?})"),
            });
        }
    }
    let count = parts.len();
    let mut bufs = Vec::with_capacity(count);
    for (b, _) in parts {
        match b {
            Deposit::F32(v) => bufs.push(v),
            Deposit::Absent(_) => return Ok(Checked::Absent { len, count }),
        }
    }
    Ok(Checked::F32(bufs))
}

/// The multi-host pipeline, run on a blocking thread of the leader.
struct Stages<'a> {
    handle: &'a tokio::runtime::Handle,
    op: ReduceOp,
    world: usize,
    chunk: usize,
    threads: usize,
    algo: Algo,
}

impl Stages<'_> {
    /// A reducer thread reduces chunk after chunk; this thread runs each reduced chunk's
    /// inter-host all-reduce and copies the result into every local buffer, one chunk behind.
    fn run(&self, comm: &mut Communicator, bufs: &mut [Vec<f32>]) -> Result<(), CommError> {
        let len = bufs.first().map_or(0, Vec::len);
        let chunks = len.div_ceil(self.chunk).max(1);
        let mut per_chunk: Vec<Vec<&mut [f32]>> = (0..chunks).map(|_| Vec::new()).collect();
        for b in bufs.iter_mut() {
            for (k, part) in b.chunks_mut(self.chunk).enumerate() {
                per_chunk[k].push(part);
            }
        }
        let inter = inter_op(self.op);
        let (op, threads) = (self.op, self.threads);
        std::thread::scope(|s| {
            let (tx, rx) = crossbeam::channel::bounded::<(Vec<f32>, Vec<&mut [f32]>)>(1);
            s.spawn(move || {
                for parts in per_chunk {
                    let sum = reduce_chunk(&parts, op, threads);
                    if tx.send((sum, parts)).is_err() {
                        break; // the inter-host stage failed
                    }
                }
            });
            for (sum, parts) in rx.iter() {
                let mut res = self
                    .handle
                    .block_on(comm.all_reduce(sum, inter, self.algo))?;
                op.finish(&mut res, self.world);
                let res = &res;
                run_parallel(parts, threads, |dst| dst.copy_from_slice(res));
            }
            Ok(())
        })
    }
}

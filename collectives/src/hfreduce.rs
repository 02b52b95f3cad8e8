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
//! Every rank of a job must hold the same number of local ranks (the world size, which `Avg`
//! divides by, is `local_count × leaders`) and pass buffers of one length.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flotilla_runtime::fabric::Rank;
use flotilla_runtime::topology::Topology;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::kernels::{fused, reduce_chunk, run_parallel};
use crate::{Algo, CommConfig, CommError, Communicator, ReduceOp};

const OP: &str = "hfreduce";
/// Below this many elements (all local buffers together), a single-host reduction runs inline
/// on the leader's task instead of on a blocking thread.
const INLINE_ELEMS: usize = 1 << 16;

/// One all-reduce of the host in progress.
struct Round {
    bufs: Vec<Option<Vec<f32>>>,
    ops: Vec<Option<ReduceOp>>,
    results: Vec<Option<Vec<f32>>>,
    error: Option<CommError>,
    leader_in: bool,
    /// Non-leader ranks that have taken their result.
    collected: usize,
}

impl Round {
    fn new(n: usize) -> Self {
        Round {
            bufs: (0..n).map(|_| None).collect(),
            ops: vec![None; n],
            results: (0..n).map(|_| None).collect(),
            error: None,
            leader_in: false,
            collected: 0,
        }
    }
}

#[derive(Default)]
struct HostState {
    rounds: BTreeMap<u64, Round>,
    failed: BTreeMap<usize, String>,
}

impl HostState {
    fn round(&mut self, r: u64, n: usize) -> &mut Round {
        self.rounds.entry(r).or_insert_with(|| Round::new(n))
    }
}

/// The shared host-memory stage of one host: every in-process rank of the host holds an `Arc`
/// of it.
pub struct HostReducer {
    ranks: Vec<Rank>,
    cfg: CommConfig,
    local_deadline: Duration,
    threads: usize,
    state: Mutex<HostState>,
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for HostReducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostReducer")
            .field("ranks", &self.ranks)
            .field("threads", &self.threads)
            .finish()
    }
}

impl HostReducer {
    /// A host of `local_count` ranks, named `0..local_count` in errors (see
    /// [`HostReducer::with_ranks`]), with the default deadlines and one reduction thread per
    /// available core.
    pub fn new(local_count: usize) -> Self {
        let cfg = CommConfig::default();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (changed, _) = watch::channel(0);
        HostReducer {
            ranks: (0..local_count).collect(),
            local_deadline: cfg.deadline / 2,
            cfg,
            threads,
            state: Mutex::new(HostState::default()),
            changed,
        }
    }

    /// The host's ranks of `topo`, with its global rank names and `cfg`'s deadlines.
    pub fn for_host(topo: &Topology, host: usize, cfg: CommConfig) -> Self {
        Self::new(topo.ranks_per_host)
            .with_ranks(topo.ranks_on_host(host))
            .with_config(cfg)
    }

    /// The global ranks of the local ranks, local index order (their number is the local count).
    pub fn with_ranks(mut self, ranks: Vec<Rank>) -> Self {
        self.ranks = ranks;
        self
    }

    /// Deadlines: a rank waits for its leader `deadline + grace`; the leader waits for its local
    /// ranks `deadline / 2`.
    pub fn with_config(mut self, cfg: CommConfig) -> Self {
        self.local_deadline = cfg.deadline / 2;
        self.cfg = cfg;
        self
    }

    /// Threads that share the reduction of a chunk (at least 1).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Number of ranks on this host.
    pub fn local_count(&self) -> usize {
        self.ranks.len()
    }

    /// The global ranks of the local ranks.
    pub fn ranks(&self) -> &[Rank] {
        &self.ranks
    }

    /// Mark local rank `local` failed: whoever waits on it now or later gets an error naming it.
    pub fn fail(&self, local: usize, why: impl Into<String>) {
        self.lock().failed.insert(local, why.into());
        self.bump();
    }

    fn lock(&self) -> MutexGuard<'_, HostState> {
        // A panic while holding this lock leaves plain data behind; keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn failed_error(&self, st: &HostState, local: usize) -> Option<CommError> {
        st.failed.get(&local).map(|why| CommError::PeerFailed {
            op: OP,
            rank: self.ranks[local],
            why: why.clone(),
        })
    }

    /// Put `local`'s buffer into round `r`.
    fn deposit(&self, r: u64, local: usize, buf: Vec<f32>, op: ReduceOp) -> Result<(), CommError> {
        {
            let n = self.local_count();
            let mut st = self.lock();
            let rd = st.round(r, n);
            if let Some(e) = &rd.error {
                let e = e.clone();
                rd.collected += 1;
                return Err(e);
            }
            rd.bufs[local] = Some(buf);
            rd.ops[local] = Some(op);
            if local == 0 {
                rd.leader_in = true;
            }
        }
        self.bump();
        Ok(())
    }

    /// Fail round `r` for every local rank.
    fn fail_round(&self, r: u64, e: &CommError) {
        {
            let n = self.local_count();
            let mut st = self.lock();
            let rd = st.round(r, n);
            rd.error = Some(e.clone());
            rd.bufs.iter_mut().for_each(|b| *b = None);
        }
        self.bump();
    }

    /// The leader: wait (at most the local deadline) until every local buffer of round `r` is in
    /// and take them, local order.
    async fn gather(&self, r: u64) -> Result<Vec<(Vec<f32>, ReduceOp)>, CommError> {
        let n = self.local_count();
        let deadline = Instant::now() + self.local_deadline;
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            let timed_out = Instant::now() >= deadline;
            {
                let mut st = self.lock();
                let missing = {
                    let rd = st.round(r, n);
                    rd.bufs.iter().position(Option::is_none)
                };
                match missing {
                    None => {
                        let rd = st.round(r, n);
                        let bufs = rd.bufs.iter_mut().zip(&rd.ops);
                        return Ok(bufs.filter_map(|(b, o)| Some((b.take()?, (*o)?))).collect());
                    }
                    Some(i) => {
                        if let Some(e) = self.failed_error(&st, i) {
                            return Err(e);
                        }
                        if timed_out {
                            return Err(CommError::Timeout {
                                op: OP,
                                rank: self.ranks[i],
                                after: self.local_deadline,
                            });
                        }
                    }
                }
            }
            // A closed channel cannot happen (we hold the sender); the deadline still applies.
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }

    /// A non-leader: wait for round `r`'s result for `local`. Waits for the leader to arrive at
    /// most the communicator deadline plus grace; once it has, without a deadline (the leader's
    /// own waits are bounded, and a leader that stops fails the round).
    async fn collect(&self, r: u64, local: usize) -> Result<Vec<f32>, CommError> {
        let n = self.local_count();
        let patience = self.cfg.deadline + self.cfg.grace;
        let deadline = Instant::now() + patience;
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            let leader_in = {
                let mut st = self.lock();
                let leader_failed = self.failed_error(&st, 0);
                let rd = st.round(r, n);
                if let Some(e) = &rd.error {
                    let e = e.clone();
                    rd.collected += 1;
                    return Err(e);
                }
                if let Some(buf) = rd.results[local].take() {
                    rd.collected += 1;
                    if rd.collected + 1 == n {
                        st.rounds.remove(&r);
                    }
                    return Ok(buf);
                }
                if !rd.leader_in {
                    if let Some(e) = leader_failed {
                        rd.collected += 1;
                        return Err(e);
                    }
                    if Instant::now() >= deadline {
                        rd.collected += 1;
                        return Err(CommError::Timeout {
                            op: OP,
                            rank: self.ranks[0],
                            after: patience,
                        });
                    }
                }
                rd.leader_in
            };
            if leader_in {
                let _ = rx.changed().await;
            } else {
                let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
            }
        }
    }

    /// The leader hands the non-leaders their buffers (index 0 is the leader's and is returned).
    fn deliver(&self, r: u64, bufs: Vec<Vec<f32>>) -> Option<Vec<f32>> {
        let n = self.local_count();
        let mut it = bufs.into_iter();
        let mine = it.next();
        {
            let mut st = self.lock();
            let rd = st.round(r, n);
            for (slot, b) in rd.results.iter_mut().skip(1).zip(it) {
                *slot = Some(b);
            }
            if n == 1 {
                st.rounds.remove(&r);
            }
        }
        self.bump();
        mine
    }
}

/// Fails the leader's round if the leader's task stops (is dropped or panics) mid-operation.
struct LeaderGuard<'a> {
    host: &'a HostReducer,
    round: u64,
    armed: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.host.fail_round(
                self.round,
                &CommError::PeerFailed {
                    op: OP,
                    rank: self.host.ranks[0],
                    why: "the host leader stopped in the middle of the operation".into(),
                },
            );
        }
    }
}

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
        if let Err(e) = &r {
            self.poisoned = Some(e.clone());
        }
        r
    }

    async fn lead(
        &mut self,
        round: u64,
        buf: Vec<f32>,
        op: ReduceOp,
    ) -> Result<Vec<f32>, CommError> {
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
            Ok(bufs) => self.reduce(bufs, op).await,
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
}

/// Check that every local rank passed a buffer of one length and the same reduction.
fn check(
    host: &HostReducer,
    parts: Vec<(Vec<f32>, ReduceOp)>,
    op: ReduceOp,
) -> Result<Vec<Vec<f32>>, CommError> {
    let len = parts.first().map_or(0, |p| p.0.len());
    for (i, (b, o)) in parts.iter().enumerate() {
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
    Ok(parts.into_iter().map(|p| p.0).collect())
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
        let inter = match self.op {
            ReduceOp::Max => ReduceOp::Max,
            ReduceOp::Sum | ReduceOp::Avg => ReduceOp::Sum,
        };
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

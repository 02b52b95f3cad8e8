//! HFReduce's host stage: the [`HostReducer`] that the ranks of one host share, where each rank
//! deposits its buffer for a round, the leader gathers them (within the host deadline), and the
//! results are handed back (see [`crate::hfreduce`] for the algorithm and its failure rules).
//! A round holds f32 buffers or shape-only ones ([`Deposit`]); the leader refuses a round that
//! mixes them, naming the local rank.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use flotilla_runtime::fabric::Rank;
use flotilla_runtime::topology::Topology;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{CommConfig, CommError, ReduceOp};

pub(crate) const OP: &str = "hfreduce";

/// A local rank's buffer in a round: f32 values, or the length of a shape-only buffer.
#[derive(Debug)]
pub(crate) enum Deposit {
    F32(Vec<f32>),
    Absent(usize),
}

impl Deposit {
    /// The number of elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            Deposit::F32(v) => v.len(),
            Deposit::Absent(len) => *len,
        }
    }

    /// What the buffer holds, for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Deposit::F32(_) => "f32",
            Deposit::Absent(_) => "shape-only",
        }
    }
}

/// One all-reduce of the host in progress.
struct Round {
    bufs: Vec<Option<Deposit>>,
    ops: Vec<Option<ReduceOp>>,
    results: Vec<Option<Deposit>>,
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
    pub(crate) ranks: Vec<Rank>,
    cfg: CommConfig,
    local_deadline: Duration,
    pub(crate) threads: usize,
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
    pub(crate) fn deposit(
        &self,
        r: u64,
        local: usize,
        buf: Deposit,
        op: ReduceOp,
    ) -> Result<(), CommError> {
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
    pub(crate) fn fail_round(&self, r: u64, e: &CommError) {
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
    pub(crate) async fn gather(&self, r: u64) -> Result<Vec<(Deposit, ReduceOp)>, CommError> {
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
    pub(crate) async fn collect(&self, r: u64, local: usize) -> Result<Deposit, CommError> {
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
    pub(crate) fn deliver(&self, r: u64, bufs: Vec<Deposit>) -> Option<Deposit> {
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
pub(crate) struct LeaderGuard<'a> {
    pub(crate) host: &'a HostReducer,
    pub(crate) round: u64,
    pub(crate) armed: bool,
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

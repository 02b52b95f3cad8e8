//! The job driver's view of its ranks: ask every rank the same question (or each its own) and
//! gather the answers within a deadline, turning a rank that fails, stops or stays silent into
//! a [`JobError::RankFailed`] naming it, and marking it failed on the fabric at once so that
//! its peers stop waiting on it.
//!
//! What "marked failed" and "start afresh after a roll-back" mean depends on where the ranks
//! run: that is the [`Fleet`] (the in-process fabric's hub, or the controller of a job whose
//! ranks are processes, `crate::remote`).

use std::sync::Arc;
use std::time::Duration;

use flotilla_runtime::clock::{BoxFuture, Clock, with_deadline};
use flotilla_runtime::fabric::inproc::InprocHub;
use ractor::RpcReplyPort;

use crate::error::JobError;
use crate::links::RankLinks;
use crate::rank::RankMsg;

/// Where a job's ranks run, as the job driver needs it besides their actors.
pub trait Fleet: Send + Sync {
    /// Mark `rank` failed, so that its peers' waits on it fail now.
    fn fail_rank(&self, rank: usize, why: String);
    /// Make every rank ready for `attempt` after a failure: the fabric's traffic and failure
    /// marks start afresh (and, for rank processes, every rank is up and in a new mesh).
    fn reset(&self, attempt: u64) -> BoxFuture<'_, Result<(), JobError>>;
    /// The job is over: close the fabric.
    fn close(&self);
    /// The ranks whose own in-memory copies were lost since the last call (their host was):
    /// a roll-back restores them from a peer's replica, else storage.
    fn lost_memory(&self) -> Vec<usize> {
        Vec::new()
    }
}

impl Fleet for InprocHub {
    fn fail_rank(&self, rank: usize, why: String) {
        InprocHub::fail_rank(self, rank, why);
    }

    fn reset(&self, _attempt: u64) -> BoxFuture<'_, Result<(), JobError>> {
        InprocHub::reset(self);
        Box::pin(async { Ok(()) })
    }

    fn close(&self) {
        InprocHub::close(self);
    }
}

/// The job's ranks, in rank order (found through their links, so a restarted rank actor is
/// found again), where they run, and the job's attempt.
pub(crate) struct Ranks {
    pub(crate) links: Vec<Arc<RankLinks>>,
    fleet: Arc<dyn Fleet>,
    /// Bumped at every roll-back; every step and restore carries it.
    pub(crate) attempt: u64,
}

impl Ranks {
    pub(crate) fn new(links: Vec<Arc<RankLinks>>, fleet: Arc<dyn Fleet>) -> Ranks {
        Ranks {
            links,
            fleet,
            attempt: 0,
        }
    }

    /// Number of ranks.
    pub(crate) fn len(&self) -> usize {
        self.links.len()
    }

    /// Start a new attempt (a roll-back): bump it, and have every rank ready for it with the
    /// fabric's failure marks and undelivered messages forgotten.
    pub(crate) async fn next_attempt(&mut self) -> Result<(), JobError> {
        self.attempt += 1;
        self.fleet.reset(self.attempt).await
    }

    /// See [`Fleet::lost_memory`].
    pub(crate) fn lost_memory(&self) -> Vec<usize> {
        self.fleet.lost_memory()
    }

    /// Close the fabric (the job is over).
    pub(crate) fn close(&self) {
        self.fleet.close();
    }

    /// Ask every rank the same question and wait for every answer within `deadline`. Answers
    /// are taken as they come: a rank that fails, stops or stays silent is marked failed on the
    /// fabric at once, so that peers waiting on it fail now instead of at their own deadline,
    /// and the first failure in time (the culprit, usually) is returned; a rank's own error
    /// becomes a [`JobError::RankFailed`] naming it.
    pub(crate) async fn try_all<T: Send + 'static>(
        &self,
        clock: &dyn Clock,
        deadline: Duration,
        step: u64,
        what: &str,
        msg: impl Fn(RpcReplyPort<Result<T, String>>) -> RankMsg,
    ) -> Result<Vec<T>, JobError> {
        let builders = self.links.iter().map(|_| &msg).collect();
        self.try_each(clock, deadline, step, what, builders).await
    }

    /// [`Ranks::try_all`] with a message of its own for every rank (`msgs[r]` for rank `r`).
    pub(crate) async fn try_each<
        T: Send + 'static,
        F: FnOnce(RpcReplyPort<Result<T, String>>) -> RankMsg,
    >(
        &self,
        clock: &dyn Clock,
        deadline: Duration,
        step: u64,
        what: &str,
        msgs: Vec<F>,
    ) -> Result<Vec<T>, JobError> {
        let label = |why: &str| {
            if what.is_empty() {
                why.to_string()
            } else {
                format!("{what}: {why}")
            }
        };
        let answers = self
            .gather(clock, deadline, step, msgs, |a: &Result<T, String>| {
                a.as_ref().err().map(|why| label(why))
            })
            .await?;
        answers
            .into_iter()
            .enumerate()
            .map(|(rank, a)| a.map_err(|why| JobError::RankFailed { rank, step, why }))
            .collect()
    }

    async fn gather<T: Send + 'static, F: FnOnce(RpcReplyPort<T>) -> RankMsg>(
        &self,
        clock: &dyn Clock,
        deadline: Duration,
        step: u64,
        msgs: Vec<F>,
        failed: impl Fn(&T) -> Option<String>,
    ) -> Result<Vec<T>, JobError> {
        let n = self.links.len();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for ((r, links), msg) in self.links.iter().enumerate().zip(msgs) {
            let (reply, answer) = ractor::concurrency::oneshot();
            let cannot = |why: String| JobError::RankFailed {
                rank: r,
                step,
                why: format!("cannot reach the rank: {why}"),
            };
            links
                .rank_actor()
                .ok_or_else(|| cannot("it is not running".into()))?
                .cast(msg(reply.into()))
                .map_err(|e| cannot(e.to_string()))?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send((r, answer.await.ok()));
            });
        }
        drop(tx);
        let started = clock.now();
        let mut slots: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let mut first_err = None;
        let fail = |r: usize, why: String, first_err: &mut Option<JobError>| {
            self.fleet.fail_rank(r, why.clone());
            first_err.get_or_insert(JobError::RankFailed { rank: r, step, why });
        };
        for _ in 0..n {
            let left = deadline.saturating_sub(clock.elapsed(started));
            match with_deadline(clock, left, rx.recv()).await {
                Ok(Some((r, Some(v)))) => {
                    if let Some(why) = failed(&v) {
                        fail(r, why, &mut first_err);
                    }
                    slots[r] = Some(v);
                }
                Ok(Some((r, None))) => fail(
                    r,
                    "the rank stopped without answering".into(),
                    &mut first_err,
                ),
                Ok(None) => break,
                Err(after) => {
                    for (r, s) in slots.iter().enumerate() {
                        if s.is_none() {
                            fail(r, format!("no answer within {after:?}"), &mut first_err);
                        }
                    }
                    break;
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(r, s)| {
                s.ok_or_else(|| JobError::RankFailed {
                    rank: r,
                    step,
                    why: "no answer".into(),
                })
            })
            .collect()
    }
}

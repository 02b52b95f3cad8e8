//! Forming the ranks' QUIC mesh for an attempt (the controller's side), and the controller as
//! the job driver's [`Fleet`]: every rank process binds a fresh endpoint, learns every rank's
//! address, joins and starts its actors. A rank process that drops out meanwhile makes the
//! controller start over; one that is up but answers nothing is hung, and its agent kills it
//! (and so starts it again).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flotilla_runtime::clock::BoxFuture;
use flotilla_runtime::config::Config;
use flotilla_runtime::control::ControlTx;
use flotilla_runtime::metrics as names;
use tokio::sync::watch;

use super::controller::{RankEntry, Shared, heartbeat};
use super::msg::{ToAgent, ToRank};
use crate::error::JobError;
use crate::ranks::Fleet;

impl Shared {
    /// Wait until every rank process is up, then form the mesh of `attempt`: each binds a fresh
    /// endpoint, learns every address, joins and starts its actors. Tried again while ranks
    /// drop out, until the rejoin deadline.
    pub(super) async fn mesh(&self, attempt: u64) -> Result<(), JobError> {
        self.attempt.store(attempt, Ordering::Relaxed);
        let deadline = Instant::now() + rejoin_timeout(&self.cfg);
        let mut changed = self.changed.subscribe();
        'again: loop {
            self.wait(&mut changed, deadline, "every rank process to join", |s| {
                let missing: Vec<usize> = s
                    .lines
                    .iter()
                    .filter(|l| !l.is_up())
                    .map(|l| l.rank)
                    .collect();
                (missing.is_empty())
                    .then_some(())
                    .ok_or(format!("ranks {missing:?} not up"))
            })
            .await?;
            {
                let mut reg = self.lock();
                for e in reg.ranks.iter_mut().flatten() {
                    e.bound = None;
                    e.ready = None;
                    e.not_ready = None;
                }
            }
            if !self.send_all(&ToRank::Prepare { attempt }).await {
                continue 'again;
            }
            // A live rank process answers at once; one that does not is hung.
            let by = (Instant::now() + answer_within(&self.cfg)).min(deadline);
            let ports = self
                .wait(&mut changed, by, "every rank to bind its endpoint", |s| {
                    s.collect(attempt, |e| {
                        e.bound
                            .filter(|b| b.0 == attempt)
                            .map(|b| SocketAddr::new(e.ip, b.1).to_string())
                    })
                })
                .await;
            let addrs = match ports {
                Ok(Some(a)) => a,
                Ok(None) => continue 'again,
                Err(_) if Instant::now() < deadline => {
                    self.kill_silent(attempt, "bind a fresh endpoint", |e| {
                        e.bound.is_some_and(|b| b.0 == attempt)
                    });
                    continue 'again;
                }
                Err(e) => return Err(e),
            };
            if !self.send_all(&ToRank::Peers { attempt, addrs }).await {
                continue 'again;
            }
            // Joining waits for every peer (at most `peer_timeout_ms`).
            let by =
                (Instant::now() + self.cfg.supervision.peer_timeout() + answer_within(&self.cfg))
                    .min(deadline);
            let joined = self
                .wait(&mut changed, by, "every rank to join the mesh", |s| {
                    s.collect(attempt, |e| {
                        (e.ready == Some(attempt)).then_some(String::new())
                    })
                })
                .await;
            match joined {
                Ok(Some(_)) => break,
                Ok(None) => continue 'again,
                Err(_) if Instant::now() < deadline => {
                    self.kill_silent(attempt, "join the mesh", |e| e.ready == Some(attempt));
                    continue 'again;
                }
                Err(e) => return Err(e),
            }
        }
        let took = self
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t0) = took {
            let s = t0.elapsed().as_secs_f64();
            metrics::histogram!(names::REJOIN_SECONDS).record(s);
            self.event_d(
                "rejoined",
                None,
                None,
                "every rank process is in the mesh",
                &format!("attempt {attempt} starts"),
                Some(s),
            );
        }
        self.write_agents_json();
        Ok(())
    }

    /// Every rank's value by `get`; `Err` while some are missing, `Ok(None)` when a rank is
    /// down or not ready (start over).
    fn collect(
        &self,
        attempt: u64,
        get: impl Fn(&RankEntry) -> Option<String>,
    ) -> Result<Option<Vec<String>>, String> {
        let reg = self.lock();
        let mut out = Vec::new();
        for (r, e) in reg.ranks.iter().enumerate() {
            let Some(e) = e.as_ref().filter(|_| self.lines[r].is_up()) else {
                return Ok(None);
            };
            if let Some((a, why)) = &e.not_ready
                && *a == attempt
            {
                tracing::warn!(rank = r, "not ready for attempt {attempt}: {why}");
                return Ok(None);
            }
            match get(e) {
                Some(v) => out.push(v),
                None => return Err(format!("rank {r} has not answered")),
            }
        }
        Ok(Some(out))
    }

    /// Wait until `check` gives `Ok`, re-checking at every registry change, until `deadline`.
    async fn wait<T>(
        &self,
        changed: &mut watch::Receiver<u64>,
        deadline: Instant,
        what: &str,
        check: impl Fn(&Self) -> Result<T, String>,
    ) -> Result<T, JobError> {
        loop {
            changed.borrow_and_update();
            let why = match check(self) {
                Ok(v) => return Ok(v),
                Err(why) => why,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, changed.changed()).await.is_err() {
                return Err(JobError::Processes(format!(
                    "at step {}, gave up waiting for {what}: {why}",
                    self.step()
                )));
            }
        }
    }

    /// Have the agents kill (and so restart) every rank process that is up but did not `what`
    /// for `attempt` (`done` says whether it did): it is hung.
    fn kill_silent(&self, attempt: u64, what: &str, done: impl Fn(&RankEntry) -> bool) {
        let hung: Vec<(usize, usize, u32, Option<ControlTx>)> = {
            let reg = self.lock();
            reg.ranks
                .iter()
                .enumerate()
                .filter_map(|(r, e)| e.as_ref().map(|e| (r, e)))
                .filter(|(r, e)| self.lines[*r].is_up() && !done(e))
                .map(|(r, e)| {
                    (
                        r,
                        e.agent,
                        e.pid,
                        reg.agents.get(&e.agent).map(|a| a.tx.clone()),
                    )
                })
                .collect()
        };
        for (rank, agent, pid, tx) in hung {
            let why = format!(
                "rank process {pid} did not {what} for attempt {attempt} within {:?}",
                answer_within(&self.cfg)
            );
            metrics::counter!(names::FAILURES, "kind" => "hung").increment(1);
            self.failed_now();
            self.event(
                "hung",
                Some(rank),
                Some(self.host_of(rank)),
                &why,
                &format!("agent {agent} kills it and starts it again"),
            );
            if let Some(tx) = tx {
                tokio::spawn(async move {
                    let _ = tx.send(&ToAgent::Kill { rank, pid }, &[]).await;
                });
            }
        }
    }

    /// Send `msg` to every rank process; false if one has no link.
    async fn send_all(&self, msg: &ToRank) -> bool {
        let mut ok = true;
        for line in &self.lines {
            match line.tx() {
                Some(tx) => ok &= tx.send(msg, &[]).await.is_ok(),
                None => ok = false,
            }
        }
        ok
    }
}

/// How long a live rank process may take to answer the controller between steps.
fn answer_within(cfg: &Config) -> Duration {
    (heartbeat(cfg) * 2).max(Duration::from_secs(2))
}

/// How long the controller waits for every rank process to be back after a failure (an agent
/// restarts it, or a spare takes its host over).
fn rejoin_timeout(cfg: &Config) -> Duration {
    (cfg.supervision.peer_timeout() * 2).max(Duration::from_secs(60))
}

impl Fleet for Shared {
    fn fail_rank(&self, rank: usize, why: String) {
        self.broadcast_failed(rank, &why);
    }

    fn reset(&self, attempt: u64) -> BoxFuture<'_, Result<(), JobError>> {
        Box::pin(self.mesh(attempt))
    }

    fn close(&self) {}

    fn lost_memory(&self) -> Vec<usize> {
        std::mem::take(&mut *self.lost.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

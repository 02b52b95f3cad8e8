//! The controller's side of the node agents: taking one in (and giving it a host or keeping it
//! as a spare), its heartbeats, a rank process's exit it reports, losing it (its host evicted
//! and handed to a spare), and `agents.json`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flotilla_runtime::control::{self, ControlTx};
use flotilla_runtime::metrics as names;

use super::controller::{AgentEntry, Shared, heartbeat, refuse};
use super::msg::{ToAgent, Up};

impl Shared {
    pub(super) async fn serve_agent(
        self: Arc<Self>,
        index: usize,
        pid: u32,
        hostname: String,
        tx: ControlTx,
        mut rx: control::ControlRx,
    ) {
        let generation = {
            let mut reg = self.lock();
            if reg.agents.contains_key(&index) {
                drop(reg);
                return refuse(
                    &tx,
                    rx.remote(),
                    &format!("agent {index} is already in the job"),
                );
            }
            reg.next_generation += 1;
            let generation = reg.next_generation;
            reg.agents.insert(
                index,
                AgentEntry {
                    pid,
                    hostname,
                    host: None,
                    tx: tx.clone(),
                    last_seen: Instant::now(),
                    generation,
                },
            );
            generation
        };
        self.assign_orphans(Some(index));
        self.write_agents_json();
        self.bump();
        let why = loop {
            match rx.recv::<Up>().await {
                Ok(Some((Up::Heartbeat, _))) => {
                    if let Some(a) = self.lock().agents.get_mut(&index) {
                        a.last_seen = Instant::now();
                    }
                }
                Ok(Some((Up::RankStarted { rank, pid }, _))) => {
                    self.event(
                        "rank_started",
                        Some(rank),
                        Some(self.host_of(rank)),
                        &format!("pid {pid}"),
                        "none",
                    );
                }
                Ok(Some((Up::RankExited { rank, pid, status }, _))) => {
                    self.rank_exited(index, rank, pid, &status);
                }
                Ok(Some((other, _))) => break format!("sent {other:?}, which agents do not send"),
                Ok(None) => break "closed its link".to_owned(),
                Err(e) => break e.to_string(),
            }
        };
        let live = self.lock().agents.get(&index).map(|a| a.generation) == Some(generation);
        if live {
            self.agent_lost(
                index,
                Some(pid),
                "link_lost",
                &format!("agent {index}: {why}"),
            );
        }
    }

    /// Give every lost host without an agent to a spare (and, with `prefer`, the host of that
    /// agent's own index to it if the host is free).
    pub(super) fn assign_orphans(&self, prefer: Option<usize>) {
        let mut sends = Vec::new();
        {
            let mut reg = self.lock();
            if let Some(i) = prefer
                && i < reg.hosts.len()
                && reg.hosts[i].is_none()
                && let Some(a) = reg.agents.get_mut(&i)
            {
                a.host = Some(i);
                reg.hosts[i] = Some(i);
                reg.lost_hosts.remove(&i);
                sends.push((i, i));
            }
            for h in 0..reg.hosts.len() {
                if reg.hosts[h].is_some() || !reg.lost_hosts.contains(&h) {
                    continue;
                }
                let spare = reg
                    .agents
                    .iter()
                    .find(|(_, a)| a.host.is_none())
                    .map(|(i, _)| *i);
                let Some(i) = spare else { break };
                if let Some(a) = reg.agents.get_mut(&i) {
                    a.host = Some(h);
                }
                reg.hosts[h] = Some(i);
                reg.lost_hosts.remove(&h);
                sends.push((h, i));
            }
        }
        for (host, agent) in sends {
            let ranks = self.ranks_of(host);
            let tx = self.lock().agents.get(&agent).map(|a| a.tx.clone());
            if agent != host {
                metrics::counter!(names::RECOVERY_ACTIONS, "action" => "reassign").increment(1);
                self.event(
                    "reassign",
                    None,
                    Some(host),
                    &format!("host {host} had no agent"),
                    &format!("agent {agent} (a spare) takes ranks {ranks:?}"),
                );
            }
            if let Some(tx) = tx {
                tokio::spawn(async move {
                    let _ = tx.send(&ToAgent::Assign { host, ranks }, &[]).await;
                });
            }
        }
    }

    /// Agent `index` is gone (exit, silence or lost link): evict its host, fail its ranks, and
    /// hand the host to a spare if there is one.
    pub(super) fn agent_lost(&self, index: usize, pid: Option<u32>, kind: &str, why: &str) {
        if self.over.load(Ordering::SeqCst) {
            return;
        }
        let host = {
            let mut reg = self.lock();
            match reg.agents.get(&index) {
                Some(a) if pid.is_none_or(|p| p == a.pid) => {}
                _ => return,
            }
            let Some(a) = reg.agents.remove(&index) else {
                return;
            };
            a.tx.close(why);
            if let Some(h) = a.host {
                reg.hosts[h] = None;
                reg.lost_hosts.insert(h);
            }
            a.host
        };
        self.failed_now();
        metrics::counter!(names::FAILURES, "kind" => kind.to_owned()).increment(1);
        let action = match host {
            Some(h) => {
                metrics::counter!(names::RECOVERY_ACTIONS, "action" => "evict").increment(1);
                for r in self.ranks_of(h) {
                    self.lost.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                    self.lines[r].detach(None, why);
                    self.broadcast_failed(r, why);
                }
                format!(
                    "evict host {h}; roll back and rerun its ranks on a spare or restarted agent"
                )
            }
            None => "none (it was a spare)".to_owned(),
        };
        self.event(kind, None, host, why, &action);
        self.assign_orphans(None);
        self.write_agents_json();
        self.bump();
    }

    pub(super) fn rank_exited(&self, agent: usize, rank: usize, pid: u32, status: &str) {
        if self.over.load(Ordering::SeqCst) {
            return;
        }
        let current = self
            .lock()
            .ranks
            .get(rank)
            .and_then(|e| e.as_ref())
            .map(|e| (e.pid, e.agent));
        if current != Some((pid, agent)) && current.is_some() {
            return; // an older process of the rank
        }
        self.failed_now();
        let why = format!("rank process {pid} exited: {status}");
        metrics::counter!(names::FAILURES, "kind" => "rank_exit").increment(1);
        self.lines[rank].detach(None, &why);
        self.broadcast_failed(rank, &why);
        self.event(
            "rank_exit",
            Some(rank),
            Some(self.host_of(rank)),
            &why,
            &format!("agent {agent} restarts it; roll back"),
        );
        self.bump();
    }

    /// Declare an agent lost once it has missed `supervision.heartbeat_misses` heartbeats.
    pub(super) async fn watch_heartbeats(self: Arc<Self>) {
        let hb = heartbeat(&self.cfg);
        let limit = hb * self.cfg.supervision.heartbeat_misses.unwrap_or(2).max(1);
        let mut tick = tokio::time::interval(hb / 10);
        loop {
            tick.tick().await;
            let silent: Vec<(usize, u32, Duration)> = self
                .lock()
                .agents
                .iter()
                .filter(|(_, a)| a.last_seen.elapsed() > limit)
                .map(|(i, a)| (*i, a.pid, a.last_seen.elapsed()))
                .collect();
            for (i, pid, quiet) in silent {
                let why = format!(
                    "agent {i} (pid {pid}) sent no heartbeat for {} ms",
                    quiet.as_millis()
                );
                self.agent_lost(i, Some(pid), "heartbeat", &why);
            }
        }
    }

    /// `agents.json`: every agent and rank process with its pid, host and ranks.
    pub(super) fn write_agents_json(&self) {
        let reg = self.lock();
        let agents: Vec<_> = reg
            .agents
            .iter()
            .map(|(i, a)| {
                let ranks: Vec<_> = a
                    .host
                    .map(|h| self.ranks_of(h))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| {
                        let pid = reg.ranks[r]
                            .as_ref()
                            .filter(|e| e.agent == *i)
                            .map(|e| e.pid);
                        serde_json::json!({"rank": r, "pid": pid})
                    })
                    .collect();
                serde_json::json!({
                    "index": i, "pid": a.pid, "hostname": a.hostname, "host": a.host,
                    "spare": a.host.is_none(), "ranks": ranks,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "controller": {"addr": self.addr.to_string(), "pid": std::process::id()},
            "attempt": self.attempt.load(Ordering::Relaxed),
            "agents": agents,
        });
        drop(reg);
        let path = self.job_dir.join("agents.json");
        let tmp = self.job_dir.join("agents.json.tmp");
        let text = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }
}

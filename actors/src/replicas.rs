//! One rank's in-memory checkpoint copies for the job driver: its own last snapshot (kept with
//! its SHA-256), the replicas it pushes to `checkpoint.replicas - 1` peers on other hosts, the
//! replica service through which it holds its peers' copies, and the restore that takes the
//! fastest sound source (own memory → a peer → storage) and says which one it used.
//!
//! The driver makes one [`RankReplicas`] per rank beside the rank actor (it must outlive the
//! rank's compute thread, so that a restarted rank finds its own copy), calls
//! [`RankReplicas::keep`] with each checkpoint's snapshot (after handing it to the
//! [`flotilla_ckpt::CheckpointEngine`]) and [`RankReplicas::restore`] before a restarted rank's
//! first step.

use std::sync::Arc;
use std::time::Duration;

use flotilla_ckpt::replica::{push_replica, replica_peers, replica_sources};
use flotilla_ckpt::{CheckpointEngine, OwnCopy, ReplicaServer, Restored, Restorer, Snapshot};
use flotilla_runtime::config::Config;
use flotilla_runtime::fabric::{Fabric, Rank};
use flotilla_runtime::topology::Topology;

use crate::error::JobError;

/// The job's topology as the config describes it.
pub fn topology(cfg: &Config) -> Result<Topology, JobError> {
    let p = &cfg.parallel;
    Topology::new(
        cfg.cluster.hosts,
        cfg.cluster.ranks_per_host,
        p.pp,
        p.ep,
        p.dp,
    )
    .map_err(|e| JobError::Config(e.to_string()))
}

/// One rank's own copy, replicas and replica service.
#[derive(Debug)]
pub struct RankReplicas {
    rank: Rank,
    fabric: Arc<dyn Fabric>,
    /// Where this rank's replicas go.
    peers: Vec<Rank>,
    own: Option<OwnCopy>,
    /// Holds the replicas of the ranks whose peer this rank is.
    server: ReplicaServer,
    deadline: Duration,
}

impl RankReplicas {
    /// Set up `fabric.rank()`'s replication for `replicas` copies (`[checkpoint] replicas`, the
    /// owner included); `deadline` bounds every fabric receive of a restore. Starts the replica
    /// service (inside a tokio runtime).
    pub fn new(
        topo: &Topology,
        replicas: usize,
        fabric: Arc<dyn Fabric>,
        deadline: Duration,
    ) -> Self {
        let rank = fabric.rank();
        let server = ReplicaServer::spawn(
            Arc::clone(&fabric),
            replica_sources(topo, rank, replicas),
            deadline,
        );
        Self {
            rank,
            peers: replica_peers(topo, rank, replicas),
            fabric,
            own: None,
            server,
            deadline,
        }
    }

    /// The peers that receive this rank's replicas.
    pub fn peers(&self) -> &[Rank] {
        &self.peers
    }

    /// The replica service (its store holds the peers' copies).
    pub fn server(&self) -> &ReplicaServer {
        &self.server
    }

    /// This rank's own copy, if it kept one.
    pub fn own(&self) -> Option<&OwnCopy> {
        self.own.as_ref()
    }

    /// Mutable access to the own copy: fault injection for tests.
    pub fn own_mut(&mut self) -> Option<&mut OwnCopy> {
        self.own.as_mut()
    }

    /// Keep `snap` as this rank's own copy and push it to the peers; the own copy it replaces
    /// is handed back (its buffers can serve again). The encoding and hashing run on the
    /// blocking pool.
    pub async fn keep(&mut self, snap: Snapshot) -> Result<Option<Snapshot>, JobError> {
        let bad = |e: String| JobError::Checkpoint(e);
        let (own, bytes) = tokio::task::spawn_blocking(move || {
            let bytes = flotilla_ckpt::format::encode_shard(&snap).map_err(|e| e.to_string())?;
            let sha = flotilla_ckpt::format::sha256_hex(&bytes);
            Ok::<_, String>((OwnCopy::with_sha256(snap, sha), bytes))
        })
        .await
        .map_err(|e| bad(e.to_string()))?
        .map_err(bad)?;
        let step = own.snapshot().step;
        let previous = self.own.replace(own).map(OwnCopy::into_snapshot);
        if !self.peers.is_empty() {
            push_replica(
                self.fabric.as_ref(),
                &self.peers,
                self.rank,
                step,
                bytes,
                self.deadline,
            )
            .await
            .map_err(|e| bad(e.to_string()))?;
        }
        Ok(previous)
    }

    /// Forget the own copy (as a rank that lost its process would).
    pub fn drop_own(&mut self) {
        self.own = None;
    }

    /// Restore this rank at `step` (the newest any source holds when `None`) from the fastest
    /// sound source; `storage` is the job's checkpoint engine, if it has one.
    pub async fn restore(
        &self,
        storage: Option<&CheckpointEngine>,
        step: Option<u64>,
    ) -> Result<Restored, JobError> {
        let r = Restorer {
            own: self.own.as_ref(),
            peers: Some((self.fabric.as_ref(), &self.peers)),
            storage,
            deadline: self.deadline,
        };
        r.restore(self.rank, step)
            .await
            .map_err(|e| JobError::Checkpoint(e.to_string()))
    }
}

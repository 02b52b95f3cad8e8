//! Peer replication of in-memory snapshots (TRANSOM's TCE backup, Gemini's in-memory
//! checkpoints): each rank sends its encoded shard to `replicas - 1` peers on other hosts over the
//! fabric, and each holder keeps the latest complete, verified replica per source rank in a
//! [`ReplicaStore`]. A restarted rank fetches its replica back with [`fetch_replica`], which
//! checks the length and SHA-256 again before decoding, so a replica damaged in the holder's
//! memory is refused with the reason.
//!
//! Wire protocol, on channel [`CHANNEL`] (FIFO per source, destination and tag):
//! - push: source → holder, tag [`PUSH`]: a JSON [`ReplicaHeader`], then the shard bytes; the
//!   holder answers on tag [`ACK`] with a JSON [`PushAck`] once it has checked and kept (or
//!   refused) them, so that a push that returned is a replica in place;
//! - fetch: requester → holder, tag [`FETCH`]: JSON `{"source": r}`; the holder answers on tag
//!   [`REPLY`] with a header (`found = false` when it holds nothing) and, if found, the bytes.
//!
//! The replica is the shard's safetensors encoding ([`crate::shard_io::encode_shard`]), the same
//! bytes as on storage, so one checksum and one decoder serve every source.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_runtime::fabric::{Fabric, FabricError, Payload, Rank, Tag};
use flotilla_runtime::topology::Topology;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::format::{FormatError, decode_shard, sha256_hex};
use crate::snapshot::Snapshot;

/// The fabric channel of checkpoint replication.
pub const CHANNEL: u32 = 0x434b_5054;
/// Tag of a pushed replica (header, then bytes).
pub const PUSH: u64 = 1;
/// Tag of a fetch request.
pub const FETCH: u64 = 2;
/// Tag of a fetch answer (header, then bytes if found).
pub const REPLY: u64 = 3;
/// Tag of a push's acknowledgment.
pub const ACK: u64 = 4;

/// A holder's answer to a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushAck {
    pub step: u64,
    /// Why the holder refused the replica (it kept its previous one); `None` when kept.
    pub refused: Option<String>,
}

/// Why replication or a fetch failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReplicaError {
    #[error("fabric: {0}")]
    Fabric(#[from] FabricError),
    #[error("bad replica header from rank {from}: {why}")]
    Header { from: Rank, why: String },
    #[error("replica of rank {source_rank} held by rank {holder} is damaged: {why}")]
    Corrupt {
        source_rank: Rank,
        holder: Rank,
        why: String,
    },
    #[error("rank {holder} holds no replica of rank {source_rank}")]
    Missing { source_rank: Rank, holder: Rank },
    #[error("replica task: {0}")]
    Task(String),
}

/// What precedes a replica's bytes on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaHeader {
    /// The rank whose state it is.
    pub source: Rank,
    pub step: u64,
    /// Whether bytes follow (always on a push; on a reply, whether the holder had one).
    pub found: bool,
    pub bytes: u64,
    /// SHA-256 of the bytes, computed by the source when it pushed them.
    pub sha256: String,
}

/// The ranks that hold `rank`'s replicas: `replicas - 1` of them (`[checkpoint] replicas`
/// counts the owner), each on another host (hosts after `rank`'s in turn, same local index),
/// at most one per other host. Empty on a single host.
pub fn replica_peers(topo: &Topology, rank: Rank, replicas: usize) -> Vec<Rank> {
    let others = topo.hosts.saturating_sub(1);
    let host = topo.host_of(rank);
    let local = topo.local_index(rank);
    (1..=replicas.saturating_sub(1).min(others))
        .map(|i| ((host + i) % topo.hosts) * topo.ranks_per_host + local)
        .collect()
}

/// The sources whose replicas `holder` keeps (the inverse of [`replica_peers`]).
pub fn replica_sources(topo: &Topology, holder: Rank, replicas: usize) -> Vec<Rank> {
    (0..topo.world())
        .filter(|&r| r != holder && replica_peers(topo, r, replicas).contains(&holder))
        .collect()
}

/// One verified replica.
#[derive(Debug, Clone)]
pub struct Replica {
    pub source: Rank,
    pub step: u64,
    pub sha256: String,
    bytes: Vec<u8>,
}

impl Replica {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The latest complete, verified replica per source rank, as one holder keeps them.
#[derive(Debug, Default)]
pub struct ReplicaStore {
    latest: BTreeMap<Rank, Replica>,
}

fn check(h: &ReplicaHeader, bytes: &[u8]) -> Result<(), String> {
    if bytes.len() as u64 != h.bytes {
        return Err(format!(
            "{} bytes, the header says {} (truncated)",
            bytes.len(),
            h.bytes
        ));
    }
    let got = sha256_hex(bytes);
    if got != h.sha256 {
        return Err(format!("SHA-256 {got}, the source sent {}", h.sha256));
    }
    Ok(())
}

impl ReplicaStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keep `bytes` as `h.source`'s replica if they match the header and are not older than the
    /// one held; a damaged replica is refused and the older one kept.
    pub fn insert(&mut self, h: ReplicaHeader, bytes: Vec<u8>) -> Result<(), String> {
        check(&h, &bytes)?;
        self.keep(h, bytes)
    }

    /// [`ReplicaStore::insert`] for bytes already checked.
    fn keep(&mut self, h: ReplicaHeader, bytes: Vec<u8>) -> Result<(), String> {
        if self.latest.get(&h.source).is_some_and(|r| r.step > h.step) {
            return Err(format!("step {} is older than the replica held", h.step));
        }
        let r = Replica {
            source: h.source,
            step: h.step,
            sha256: h.sha256,
            bytes,
        };
        self.latest.insert(h.source, r);
        Ok(())
    }

    pub fn get(&self, source: Rank) -> Option<&Replica> {
        self.latest.get(&source)
    }

    /// Change a held replica's bytes in place: fault injection for tests (a bit flip in the
    /// holder's memory), which [`fetch_replica`] must detect.
    pub fn tamper(&mut self, source: Rank, f: impl FnOnce(&mut Vec<u8>)) {
        if let Some(r) = self.latest.get_mut(&source) {
            f(&mut r.bytes);
        }
    }

    /// Receive one pushed replica from `src` and keep it; its step.
    pub async fn accept(
        &mut self,
        fabric: &dyn Fabric,
        src: Rank,
        deadline: Duration,
    ) -> Result<u64, ReplicaError> {
        let (h, bytes) = recv_replica(fabric, src, PUSH, deadline, deadline).await?;
        let (source, step) = (h.source, h.step);
        let bytes = bytes.ok_or(ReplicaError::Missing {
            source_rank: source,
            holder: fabric.rank(),
        })?;
        let r = tokio::task::spawn_blocking(move || check(&h, &bytes).map(|()| (h, bytes)))
            .await
            .map_err(|e| ReplicaError::Task(e.to_string()))?;
        let corrupt = |why| ReplicaError::Corrupt {
            source_rank: source,
            holder: fabric.rank(),
            why,
        };
        let (h, bytes) = r.map_err(corrupt)?;
        self.keep(h, bytes).map_err(corrupt)?;
        Ok(step)
    }

    /// Answer one fetch request from `requester` with the replica it names (a copy: the store
    /// keeps its own).
    pub async fn answer_fetch(
        store: &RwLock<ReplicaStore>,
        fabric: &dyn Fabric,
        requester: Rank,
        deadline: Duration,
    ) -> Result<(), ReplicaError> {
        let tag = Tag::new(CHANNEL, FETCH);
        let req = fabric.recv(requester, tag, deadline).await?.into_bytes()?;
        let want: FetchRequest =
            serde_json::from_slice(&req).map_err(|e| ReplicaError::Header {
                from: requester,
                why: e.to_string(),
            })?;
        let found = {
            let st = store.read().await;
            st.get(want.source).map(|r| {
                let h = ReplicaHeader {
                    source: r.source,
                    step: r.step,
                    found: true,
                    bytes: r.bytes.len() as u64,
                    sha256: r.sha256.clone(),
                };
                (h, r.bytes.clone())
            })
        };
        let (h, bytes) = match found {
            Some((h, b)) => (h, Some(b)),
            None => {
                let h = ReplicaHeader {
                    source: want.source,
                    step: 0,
                    found: false,
                    bytes: 0,
                    sha256: String::new(),
                };
                (h, None)
            }
        };
        send_replica(fabric, requester, REPLY, &h, bytes).await
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchRequest {
    source: Rank,
}

async fn send_replica(
    fabric: &dyn Fabric,
    dst: Rank,
    tag: u64,
    h: &ReplicaHeader,
    bytes: Option<Vec<u8>>,
) -> Result<(), ReplicaError> {
    let tag = Tag::new(CHANNEL, tag);
    let head = serde_json::to_vec(h).map_err(|e| ReplicaError::Task(e.to_string()))?;
    fabric.send(dst, tag, Payload::Bytes(head)).await?;
    if let Some(b) = bytes {
        fabric.send(dst, tag, Payload::Bytes(b)).await?;
    }
    Ok(())
}

/// Receive a header within `deadline` and then its bytes within `body_deadline` (a large
/// replica may take much longer to arrive than its header).
async fn recv_replica(
    fabric: &dyn Fabric,
    src: Rank,
    tag: u64,
    deadline: Duration,
    body_deadline: Duration,
) -> Result<(ReplicaHeader, Option<Vec<u8>>), ReplicaError> {
    let tag = Tag::new(CHANNEL, tag);
    let head = fabric.recv(src, tag, deadline).await?.into_bytes()?;
    let h: ReplicaHeader = serde_json::from_slice(&head).map_err(|e| ReplicaError::Header {
        from: src,
        why: e.to_string(),
    })?;
    if !h.found {
        return Ok((h, None));
    }
    let bytes = fabric.recv(src, tag, body_deadline).await?.into_bytes()?;
    Ok((h, Some(bytes)))
}

/// Send `source`'s encoded shard `bytes` (taken at `step`) to every peer and wait, within
/// `deadline` each, for every peer to say it kept them; the SHA-256 is computed once here and
/// travels in the header. The last peer gets the buffer itself. A peer that refused the
/// replica (it failed its check there) is an error naming the peer and why.
pub async fn push_replica(
    fabric: &dyn Fabric,
    peers: &[Rank],
    source: Rank,
    step: u64,
    bytes: Vec<u8>,
    deadline: Duration,
) -> Result<(), ReplicaError> {
    let (sha, bytes) = tokio::task::spawn_blocking(move || (sha256_hex(&bytes), bytes))
        .await
        .map_err(|e| ReplicaError::Task(e.to_string()))?;
    let h = ReplicaHeader {
        source,
        step,
        found: true,
        bytes: bytes.len() as u64,
        sha256: sha,
    };
    let mut bytes = Some(bytes);
    for (i, &p) in peers.iter().enumerate() {
        let b = if i + 1 == peers.len() {
            bytes.take()
        } else {
            bytes.clone()
        };
        send_replica(fabric, p, PUSH, &h, b).await?;
    }
    for &p in peers {
        let ack = fabric
            .recv(p, Tag::new(CHANNEL, ACK), deadline)
            .await?
            .into_bytes()?;
        let ack: PushAck = serde_json::from_slice(&ack).map_err(|e| ReplicaError::Header {
            from: p,
            why: format!("bad acknowledgment: {e}"),
        })?;
        if let Some(why) = ack.refused {
            return Err(ReplicaError::Corrupt {
                source_rank: source,
                holder: p,
                why: format!("refused on arrival: {why}"),
            });
        }
    }
    Ok(())
}

/// Ask `holder` for its replica of `source`; the snapshot, after checking the bytes' length and
/// SHA-256 against what the source sent and decoding them (hash and decode run side by side).
pub async fn fetch_replica(
    fabric: &dyn Fabric,
    holder: Rank,
    source: Rank,
    deadline: Duration,
) -> Result<Snapshot, ReplicaError> {
    let req = serde_json::to_vec(&FetchRequest { source })
        .map_err(|e| ReplicaError::Task(e.to_string()))?;
    fabric
        .send(holder, Tag::new(CHANNEL, FETCH), Payload::Bytes(req))
        .await?;
    let (h, bytes) = recv_replica(fabric, holder, REPLY, deadline, deadline).await?;
    let bytes = bytes.ok_or(ReplicaError::Missing {
        source_rank: source,
        holder,
    })?;
    let corrupt = |why: String| ReplicaError::Corrupt {
        source_rank: source,
        holder,
        why,
    };
    if h.source != source {
        return Err(corrupt(format!(
            "the holder sent rank {}'s replica",
            h.source
        )));
    }
    let decoded = tokio::task::spawn_blocking(move || {
        std::thread::scope(|sc| {
            let d = sc.spawn(|| decode_shard(&bytes));
            let c = check(&h, &bytes);
            let d = d
                .join()
                .unwrap_or_else(|_| Err(FormatError::Metadata("decoder panicked".into())));
            c.and_then(|()| d.map_err(|e| e.to_string()))
        })
    })
    .await
    .map_err(|e| ReplicaError::Task(e.to_string()))?;
    let snap = decoded.map_err(corrupt)?;
    if snap.meta.rank != source {
        return Err(corrupt(format!("it holds rank {}'s state", snap.meta.rank)));
    }
    Ok(snap)
}

/// A holder's replication service: tasks that accept pushes from `sources` and answer their
/// fetches, until dropped or [`ReplicaServer::shutdown`]. The loops wait for a request in short
/// rounds; once a push's header has come, its bytes get `body_deadline`.
#[derive(Debug)]
pub struct ReplicaServer {
    pub store: Arc<RwLock<ReplicaStore>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ReplicaServer {
    /// Start serving on `fabric` (inside a tokio runtime).
    pub fn spawn(fabric: Arc<dyn Fabric>, sources: Vec<Rank>, body_deadline: Duration) -> Self {
        let store = Arc::new(RwLock::new(ReplicaStore::new()));
        let poll = Duration::from_millis(200);
        let mut tasks = Vec::new();
        for src in sources {
            let (f, st) = (Arc::clone(&fabric), Arc::clone(&store));
            tasks.push(tokio::spawn(async move {
                loop {
                    match recv_replica(f.as_ref(), src, PUSH, poll, body_deadline).await {
                        Ok((h, Some(bytes))) => {
                            let (source, step) = (h.source, h.step);
                            let r = tokio::task::spawn_blocking(move || {
                                check(&h, &bytes).map(|()| (h, bytes))
                            })
                            .await;
                            let refused = match r {
                                Ok(Ok((h, b))) => st.write().await.keep(h, b).err(),
                                Ok(Err(why)) => Some(why),
                                Err(_) => return,
                            };
                            if let Some(why) = &refused {
                                tracing::warn!(source, step, "replica refused: {why}");
                            }
                            let ack = PushAck { step, refused };
                            let Ok(ack) = serde_json::to_vec(&ack) else {
                                return;
                            };
                            let tag = Tag::new(CHANNEL, ACK);
                            if let Err(e) = f.send(src, tag, Payload::Bytes(ack)).await
                                && !pause(&ReplicaError::Fabric(e)).await
                            {
                                return;
                            }
                        }
                        Ok((_, None)) => {}
                        Err(e) => {
                            if !pause(&e).await {
                                return;
                            }
                        }
                    }
                }
            }));
            let (f, st) = (Arc::clone(&fabric), Arc::clone(&store));
            tasks.push(tokio::spawn(async move {
                loop {
                    if let Err(e) = ReplicaStore::answer_fetch(&st, f.as_ref(), src, poll).await
                        && !pause(&e).await
                    {
                        return;
                    }
                }
            }));
        }
        Self { store, tasks }
    }

    /// Stop the service's tasks.
    pub fn shutdown(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// After a failed receive: whether to keep serving (timeouts and failed peers, which may come
/// back, are waited out; a closed fabric ends the service).
async fn pause(e: &ReplicaError) -> bool {
    match e {
        ReplicaError::Fabric(FabricError::Timeout { .. }) => true,
        ReplicaError::Fabric(FabricError::Closed) => false,
        other => {
            tracing::debug!("replica service: {other}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            true
        }
    }
}

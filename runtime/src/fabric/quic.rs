//! The QUIC fabric: ranks in different processes or hosts joined by quinn with mutual TLS.
//!
//! Topology: one QUIC connection per pair of ranks (per peer rank rather than per peer host:
//! ranks of one host each hold their own endpoint; multiplexing ranks of a host over one
//! connection is left to the host agent). The lower rank dials the higher one; both then send
//! over the same connection. Each direction uses a small fixed set of long-lived unidirectional
//! streams ("lanes", [`QuicOptions::lanes`]); a (channel, tag) always maps to the same lane, so
//! messages stay FIFO per (source, tag) while a bulk transfer on one tag does not stall every
//! other tag. Frames are a 32-byte versioned header plus the body ([`frame`]).
//!
//! Receiving: a task per incoming lane reads frames and delivers them into a local
//! [`InprocHub`], which does the (source, tag) matching, FIFO queuing and deadlines exactly like
//! the in-process fabric. A malformed, truncated or oversized frame fails that peer (the
//! connection is closed; receives from it fail with [`FabricError::PeerFailed`] whose reason
//! names the fault), as does a connection that closes or times out.
//!
//! Sending: a send completes when its frame is in quinn's send buffer (at most
//! [`QuicOptions::send_window`] unacknowledged bytes per connection), like a NIC's send
//! completion. A send whose future is dropped after it took its lane still finishes its frame in
//! the background, so a stream never carries half a frame. Receive windows are raised well above
//! quinn's defaults for bulk transfer; received frames are drained into the hub at once.
//!
//! Security: [`tls::JobCa`] issues each rank a certificate; both sides verify the other chains
//! to the job CA, and the listener checks that the dialler's certificate names the rank its
//! hello claims.

pub mod frame;
mod handshake;
mod options;
pub mod tls;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::frame::{HEADER_LEN, Header, Kind};
use self::handshake::{accept_one, dial};
pub use self::options::{QuicError, QuicOptions};
pub use self::tls::{JobCa, RankIdentity};
use super::inproc::{InprocFabric, InprocHub};
use super::{BoxFuture, Fabric, FabricError, Payload, Rank, Tag};

/// Application error codes on the wire.
const CODE_SHUTDOWN: u32 = 0;
const CODE_PROTOCOL: u32 = 1;
const CODE_REFUSED: u32 = 2;

/// An outgoing stream, opened on first use.
type Lane = Arc<tokio::sync::Mutex<Option<SendStream>>>;

struct PeerConn {
    conn: Connection,
    lanes: Vec<Lane>,
}

#[derive(Default)]
struct PeerSlot {
    conn: Option<Arc<PeerConn>>,
    failed: Option<String>,
}

/// State shared by the fabric and its background tasks (which never hold the endpoint, so
/// dropping the fabric closes it).
struct Shared {
    rank: Rank,
    world: usize,
    opts: QuicOptions,
    hub: Arc<InprocHub>,
    peers: Mutex<Vec<PeerSlot>>,
    /// Bumped whenever a peer joins or fails.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<PeerSlot>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn transport(&self, rank: Rank, why: impl std::fmt::Display) -> FabricError {
        FabricError::Transport {
            rank,
            why: why.to_string(),
        }
    }

    /// Record `peer` as failed (the first reason wins) and wake receives waiting on it.
    fn fail_peer(&self, peer: Rank, why: String) {
        let conn = {
            let mut peers = self.lock();
            let Some(slot) = peers.get_mut(peer) else {
                return;
            };
            if slot.failed.is_some() {
                return;
            }
            tracing::warn!(rank = self.rank, peer, %why, "quic fabric: peer failed");
            slot.failed = Some(why.clone());
            self.hub.fail_rank(peer, why);
            slot.conn.clone()
        };
        if let Some(c) = conn {
            c.conn
                .close(VarInt::from_u32(CODE_PROTOCOL), b"peer failed");
        }
        self.changed.send_modify(|g| *g += 1);
    }

    /// The connection to `peer`, or why there is none.
    fn peer(&self, peer: Rank) -> Result<Arc<PeerConn>, FabricError> {
        let peers = self.lock();
        let slot = &peers[peer];
        if let Some(why) = &slot.failed {
            return Err(FabricError::PeerFailed {
                rank: peer,
                why: why.clone(),
            });
        }
        slot.conn
            .clone()
            .ok_or_else(|| self.transport(peer, "not connected"))
    }

    /// Adopt an authenticated connection to `peer` and start reading from it.
    fn register(self: &Arc<Self>, peer: Rank, conn: Connection) -> Result<(), FabricError> {
        {
            let mut peers = self.lock();
            let slot = &mut peers[peer];
            if slot.conn.is_some() || slot.failed.is_some() {
                conn.close(VarInt::from_u32(CODE_REFUSED), b"duplicate connection");
                return Err(self.transport(peer, "a second connection from this rank refused"));
            }
            slot.conn = Some(Arc::new(PeerConn {
                conn: conn.clone(),
                lanes: (0..self.opts.lanes.max(1))
                    .map(|_| Arc::new(tokio::sync::Mutex::new(None)))
                    .collect(),
            }));
        }
        self.changed.send_modify(|g| *g += 1);
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                match conn.accept_uni().await {
                    Ok(stream) => {
                        let (s, c) = (Arc::clone(&shared), conn.clone());
                        tokio::spawn(read_lane(s, peer, c, stream));
                    }
                    Err(e) => {
                        shared.fail_peer(peer, format!("connection closed: {e}"));
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    fn missing_peers(&self) -> Vec<Rank> {
        self.lock()
            .iter()
            .enumerate()
            .filter(|(r, s)| *r != self.rank && s.conn.is_none())
            .map(|(r, _)| r)
            .collect()
    }
}

/// Read frames from one incoming lane of `peer` into the hub until the stream ends.
async fn read_lane(shared: Arc<Shared>, peer: Rank, conn: Connection, mut s: RecvStream) {
    let from_peer = shared.hub.endpoint(peer);
    loop {
        match read_frame(&mut s, peer, shared.opts.max_frame_bytes).await {
            Ok(Some((tag, payload))) => {
                if from_peer.send(shared.rank, tag, payload).await.is_err() {
                    return; // the hub is closed: this fabric shut down
                }
            }
            Ok(None) => return,
            Err(why) => {
                let _ = s.stop(VarInt::from_u32(CODE_PROTOCOL));
                shared.fail_peer(peer, why);
                conn.close(VarInt::from_u32(CODE_PROTOCOL), b"malformed frame");
                return;
            }
        }
    }
}

/// The next data frame of a lane: `Ok(None)` when the stream ended cleanly (or was reset, or
/// the connection went away, which the connection's task reports).
async fn read_frame(
    s: &mut RecvStream,
    peer: Rank,
    max: u64,
) -> Result<Option<(Tag, Payload)>, String> {
    use quinn::{ReadError, ReadExactError};
    let quiet = |e: &ReadError| matches!(e, ReadError::Reset(_) | ReadError::ConnectionLost(_));
    let mut head = [0u8; HEADER_LEN];
    match s.read_exact(&mut head).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(format!(
                "truncated frame header from rank {peer}: {n} of {HEADER_LEN} bytes"
            ));
        }
        Err(ReadExactError::ReadError(e)) if quiet(&e) => return Ok(None),
        Err(ReadExactError::ReadError(e)) => return Err(format!("read from rank {peer}: {e}")),
    }
    let h =
        Header::decode(&head, max).map_err(|e| format!("malformed frame from rank {peer}: {e}"))?;
    if h.kind != Kind::Data || h.src != peer {
        return Err(format!(
            "malformed frame from rank {peer}: {:?} frame claiming source rank {}",
            h.kind, h.src
        ));
    }
    // `h.len <= max`, which was accepted as a buffer size.
    let mut body = vec![0u8; h.len as usize];
    match s.read_exact(&mut body).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(format!(
                "truncated frame from rank {peer} (tag {}): {n} of {} body bytes",
                h.tag, h.len
            ));
        }
        Err(ReadExactError::ReadError(e)) if quiet(&e) => return Ok(None),
        Err(ReadExactError::ReadError(e)) => return Err(format!("read from rank {peer}: {e}")),
    }
    let payload = frame::decode_body(h.dtype, body)
        .map_err(|e| format!("malformed frame from rank {peer}: {e}"))?;
    Ok(Some((h.tag, payload)))
}

fn lane_of(tag: Tag, lanes: usize) -> usize {
    let h = (u64::from(tag.channel).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ tag.tag)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    ((h >> 32) % lanes.max(1) as u64) as usize
}

/// One rank's endpoint of the QUIC fabric. Dropping it closes every connection (peers see it
/// fail) and fails this rank's own pending receives with [`FabricError::Closed`].
pub struct QuicFabric {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    local: InprocFabric,
    acceptor: JoinHandle<()>,
}

impl std::fmt::Debug for QuicFabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicFabric")
            .field("rank", &self.shared.rank)
            .field("world", &self.shared.world)
            .field("addr", &self.endpoint.local_addr().ok())
            .finish()
    }
}

impl QuicFabric {
    /// Bind rank `rank` of `world` to `listen`, with a certificate issued by `ca`.
    pub async fn bind(
        rank: Rank,
        world: usize,
        listen: SocketAddr,
        ca: &JobCa,
        opts: QuicOptions,
    ) -> Result<Self, QuicError> {
        Self::bind_with_identity(ca.issue(rank)?, world, listen, opts).await
    }

    /// Bind with an identity issued elsewhere (the multi-process case: the controller holds the
    /// CA and ships each agent its ranks' identities). Starts accepting peers at once.
    pub async fn bind_with_identity(
        id: RankIdentity,
        world: usize,
        listen: SocketAddr,
        opts: QuicOptions,
    ) -> Result<Self, QuicError> {
        if id.rank >= world || u32::try_from(world).is_err() {
            return Err(FabricError::NoSuchRank {
                rank: id.rank,
                world,
            }
            .into());
        }
        let transport = opts.transport()?;
        let bind_err = |why: std::io::Error| QuicError::Bind {
            addr: listen,
            why: why.to_string(),
        };
        let mut endpoint =
            Endpoint::server(id.server_config(transport.clone())?, listen).map_err(bind_err)?;
        endpoint.set_default_client_config(id.client_config(transport)?);
        let hub = InprocHub::new(world);
        let shared = Arc::new(Shared {
            rank: id.rank,
            world,
            opts,
            hub: Arc::clone(&hub),
            peers: Mutex::new((0..world).map(|_| PeerSlot::default()).collect()),
            changed: watch::Sender::new(0),
        });
        let (ep, sh) = (endpoint.clone(), Arc::clone(&shared));
        let acceptor = tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let sh = Arc::clone(&sh);
                tokio::spawn(async move {
                    let t = sh.opts.connect_timeout;
                    let r = tokio::time::timeout(t, accept_one(Arc::clone(&sh), incoming)).await;
                    match r {
                        Ok(Ok(peer)) => tracing::debug!(rank = sh.rank, peer, "peer joined"),
                        Ok(Err(why)) => tracing::warn!(rank = sh.rank, %why, "refused a peer"),
                        Err(_) => tracing::warn!(rank = sh.rank, "a peer's handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            local: hub.endpoint(id.rank),
            shared,
            endpoint,
            acceptor,
        })
    }

    /// The address this rank listens on (with the port the OS chose for port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, QuicError> {
        self.endpoint.local_addr().map_err(|e| QuicError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            why: e.to_string(),
        })
    }

    /// Join the full mesh: dial every higher rank at `peers[rank]` and wait until every lower
    /// rank has dialled us, within [`QuicOptions::connect_timeout`]. The future owns what it
    /// needs, so the ranks of one process can join concurrently.
    pub fn connect_all(
        &self,
        peers: &[SocketAddr],
    ) -> impl Future<Output = Result<(), QuicError>> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        let endpoint = self.endpoint.clone();
        let peers = peers.to_vec();
        async move {
            let (rank, world) = (shared.rank, shared.world);
            if peers.len() != world {
                return Err(QuicError::Peers {
                    world,
                    got: peers.len(),
                });
            }
            let deadline = tokio::time::Instant::now() + shared.opts.connect_timeout;
            let mut dials = tokio::task::JoinSet::new();
            for (peer, &addr) in peers.iter().enumerate().skip(rank + 1) {
                let d = dial(Arc::clone(&shared), endpoint.clone(), peer, addr);
                dials.spawn(async move {
                    tokio::time::timeout_at(deadline, d)
                        .await
                        .unwrap_or_else(|_| {
                            Err(FabricError::Transport {
                                rank: peer,
                                why: format!("no connection to {addr} in time"),
                            })
                        })
                });
            }
            while let Some(r) = dials.join_next().await {
                r.map_err(|e| QuicError::Options(format!("dial task: {e}")))??;
            }
            let mut changed = shared.changed.subscribe();
            loop {
                let missing = shared.missing_peers();
                let Some(&first) = missing.first() else {
                    return Ok(());
                };
                let wait = tokio::time::timeout_at(deadline, changed.changed()).await;
                if wait.is_err() {
                    return Err(FabricError::Transport {
                        rank: first,
                        why: format!("ranks {missing:?} did not connect in time"),
                    }
                    .into());
                }
            }
        }
    }

    /// Build an `n`-rank mesh on 127.0.0.1 with ephemeral ports, in this process (tests,
    /// single-host runs).
    pub async fn loopback_mesh(n: usize, opts: QuicOptions) -> Result<Vec<Self>, QuicError> {
        let ca = JobCa::generate()?;
        Self::loopback_mesh_with(&ca, vec![opts; n]).await
    }

    /// [`Self::loopback_mesh`] with a given CA and per-rank options.
    pub async fn loopback_mesh_with(
        ca: &JobCa,
        opts: Vec<QuicOptions>,
    ) -> Result<Vec<Self>, QuicError> {
        let n = opts.len();
        let mut ranks = Vec::with_capacity(n);
        for (r, o) in opts.into_iter().enumerate() {
            ranks.push(Self::bind(r, n, SocketAddr::from(([127, 0, 0, 1], 0)), ca, o).await?);
        }
        let addrs = ranks
            .iter()
            .map(|f| f.local_addr())
            .collect::<Result<Vec<_>, _>>()?;
        let joins: Vec<_> = ranks
            .iter()
            .map(|f| tokio::spawn(f.connect_all(&addrs)))
            .collect();
        for j in joins {
            j.await
                .map_err(|e| QuicError::Options(format!("connect task: {e}")))??;
        }
        Ok(ranks)
    }

    /// Finish every outgoing lane and wait (bounded by the connect timeout) until peers have
    /// acknowledged all data, then close. Use before a process exits, so its last sends land.
    pub async fn shutdown(&self) {
        let conns: Vec<_> = self
            .shared
            .lock()
            .iter()
            .filter_map(|s| s.conn.clone())
            .collect();
        let mut pending = Vec::new();
        for pc in &conns {
            for lane in &pc.lanes {
                if let Some(mut s) = lane.lock().await.take() {
                    let _ = s.finish();
                    pending.push(s.stopped());
                }
            }
        }
        let _ = tokio::time::timeout(self.shared.opts.connect_timeout, async {
            for p in pending {
                let _ = p.await;
            }
        })
        .await;
        self.close();
    }

    /// Close every connection now (unsent data is dropped) and fail local receives.
    pub fn close(&self) {
        self.endpoint
            .close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
        self.shared.hub.close();
    }

    /// The connection to `peer` (tests inject raw streams through it).
    #[cfg(test)]
    pub(crate) fn connection(&self, peer: Rank) -> Option<Connection> {
        self.shared.lock()[peer]
            .conn
            .as_ref()
            .map(|c| c.conn.clone())
    }

    async fn send_to(&self, dst: Rank, tag: Tag, payload: Payload) -> Result<(), FabricError> {
        let (rank, world) = (self.shared.rank, self.shared.world);
        if dst >= world {
            return Err(FabricError::NoSuchRank { rank: dst, world });
        }
        if dst == rank {
            return self.local.send(dst, tag, payload).await;
        }
        let max = self.shared.opts.max_frame_bytes;
        let len = payload.byte_len() as u64;
        if len > max {
            return Err(self.shared.transport(
                dst,
                format!("frame of {len} bytes exceeds the maximum of {max} bytes"),
            ));
        }
        let pc = self.shared.peer(dst)?;
        let header = Header::data(rank, tag, &payload).encode();
        let body = frame::encode_body(payload);
        // The lane is taken here, in call order (tokio's mutex is fair), so sends on one tag
        // keep their order. The write runs in its own task: a caller that drops its send future
        // mid-frame cannot leave half a frame on the stream (the frame still goes out).
        let mut lane = Arc::clone(&pc.lanes[lane_of(tag, pc.lanes.len())])
            .lock_owned()
            .await;
        let conn = pc.conn.clone();
        let write = tokio::spawn(async move {
            let mut s = match lane.take() {
                Some(s) => s,
                None => conn.open_uni().await?,
            };
            let mut chunks = [Bytes::copy_from_slice(&header), Bytes::from(body)];
            s.write_all_chunks(&mut chunks).await?;
            *lane = Some(s);
            Ok::<_, quinn::WriteError>(())
        });
        match write.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(quinn::WriteError::ConnectionLost(e))) => Err(self.lost(dst, e)),
            Ok(Err(e)) => Err(self.shared.transport(dst, e)),
            Err(e) => Err(self.shared.transport(dst, format!("send task: {e}"))),
        }
    }

    fn lost(&self, peer: Rank, e: quinn::ConnectionError) -> FabricError {
        if e == quinn::ConnectionError::LocallyClosed {
            return FabricError::Closed;
        }
        let why = format!("connection lost: {e}");
        self.shared.fail_peer(peer, why.clone());
        FabricError::PeerFailed { rank: peer, why }
    }
}

impl Drop for QuicFabric {
    fn drop(&mut self) {
        self.close();
        self.acceptor.abort();
    }
}

impl Fabric for QuicFabric {
    fn rank(&self) -> Rank {
        self.shared.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn send(
        &self,
        dst: Rank,
        tag: Tag,
        payload: Payload,
    ) -> BoxFuture<'_, Result<(), FabricError>> {
        Box::pin(self.send_to(dst, tag, payload))
    }
    fn recv(
        &self,
        src: Rank,
        tag: Tag,
        deadline: Duration,
    ) -> BoxFuture<'_, Result<Payload, FabricError>> {
        self.local.recv(src, tag, deadline)
    }
}

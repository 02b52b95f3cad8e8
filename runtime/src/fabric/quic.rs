//! The QUIC fabric: ranks in different processes or hosts joined by quinn with mutual TLS.
//!
//! Topology: [`QuicOptions::connections`] QUIC connections per pair of ranks (per peer rank
//! rather than per peer host: ranks of one host each hold their own endpoint). The lower rank
//! dials the higher one; both then send over the same connections. quinn drives each
//! connection (packetising, crypto) on one task, so several connections let a multi-threaded
//! tokio runtime spread one peer's traffic over several cores; the fabric's I/O runs on the
//! runtime that binds it.
//!
//! Each direction uses a fixed set of long-lived unidirectional streams ("lanes",
//! [`QuicOptions::lanes`], spread round-robin over the connections). A (channel, tag) maps to one
//! lane, so messages stay FIFO per (source, tag) while a bulk transfer on one tag does not stall
//! every other tag. Messages of at least [`QuicOptions::stripe_bytes`] are striped: one piece on
//! every lane, so over every connection (`send.rs`); the receiver copies pieces straight into
//! the message's buffer and delivers it from the tag's own lane (`recv.rs`). Frames are a
//! 56-byte versioned header plus the body ([`frame`]); tensor bodies go on the wire as their
//! little-endian bytes, without per-element conversion.
//!
//! Receiving: a task per incoming lane reads frames and delivers them into a local
//! [`InprocHub`], which does the (source, tag) matching, FIFO queuing and deadlines exactly like
//! the in-process fabric. A malformed, truncated or oversized frame fails that peer (its
//! connections are closed; receives from it fail with [`FabricError::PeerFailed`] whose reason
//! names the fault), as does a connection that closes or times out.
//!
//! Sending: a send completes when its frames are in quinn's send buffers (at most
//! [`QuicOptions::send_window`] unacknowledged bytes per connection), like a NIC's send
//! completion. A send whose future is dropped after it took its lanes still finishes its frames
//! in the background, so a stream never carries half a frame. Receive windows and the UDP
//! socket buffers are raised well above the defaults for bulk transfer.
//!
//! Security: [`tls::JobCa`] issues each rank a certificate; both sides verify the other chains
//! to the job CA, and the listener checks that the dialler's certificate names the rank its
//! hello claims. [`launch`] starts ranks in child processes and ships them their identities.

pub mod frame;
mod handshake;
pub mod launch;
mod options;
mod recv;
mod send;
pub mod tls;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use quinn::{Connection, Endpoint, SendStream, VarInt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::handshake::{accept_one, dial};
pub use self::options::{QuicError, QuicOptions};
use self::recv::{PeerRx, read_lane};
pub use self::tls::{JobCa, RankIdentity};
use super::inproc::{InprocFabric, InprocHub};
use super::{BoxFuture, Fabric, FabricError, Inbox, Payload, Rank, Tag};

/// Application error codes on the wire.
const CODE_SHUTDOWN: u32 = 0;
const CODE_PROTOCOL: u32 = 1;
const CODE_REFUSED: u32 = 2;

/// An outgoing stream, opened on first use.
type Lane = Arc<tokio::sync::Mutex<Option<SendStream>>>;

/// The sending side of a peer whose connections are all up.
struct PeerConn {
    conns: Vec<Connection>,
    lanes: Vec<Lane>,
    /// Taken while a striped send takes every lane; the last striped message's number.
    stripe: tokio::sync::Mutex<u64>,
}

impl PeerConn {
    /// The connection that carries lane `lane`.
    fn conn_of(&self, lane: usize) -> Connection {
        self.conns[lane % self.conns.len()].clone()
    }
}

#[derive(Default)]
struct PeerSlot {
    /// The connections registered so far, by index.
    pending: Vec<Option<Connection>>,
    /// Set once every connection is up.
    conn: Option<Arc<PeerConn>>,
    failed: Option<String>,
}

/// State shared by the fabric and its background tasks (which never hold the endpoint, so
/// dropping the fabric closes it).
struct Shared {
    rank: Rank,
    world: usize,
    opts: QuicOptions,
    /// Lanes per peer asked for (a peer's count is also a multiple of its connections).
    lanes: usize,
    /// Connections this rank opens to the peers it dials.
    connections: usize,
    hub: Arc<InprocHub>,
    peers: Mutex<Vec<PeerSlot>>,
    rx: Vec<Arc<PeerRx>>,
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
        let conns: Vec<Connection> = {
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
            slot.pending.iter().flatten().cloned().collect()
        };
        for c in conns {
            c.close(VarInt::from_u32(CODE_PROTOCOL), b"peer failed");
        }
        self.changed.send_modify(|g| *g += 1);
    }

    /// The connections to `peer`, or why there are none.
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

    /// Adopt authenticated connection `index` to `peer` and start reading from it.
    fn register(
        self: &Arc<Self>,
        peer: Rank,
        index: usize,
        count: usize,
        conn: Connection,
    ) -> Result<(), FabricError> {
        {
            let mut peers = self.lock();
            let slot = &mut peers[peer];
            if slot.pending.is_empty() {
                slot.pending.resize(count, None);
            }
            if slot.pending.len() != count {
                conn.close(VarInt::from_u32(CODE_REFUSED), b"connection count changed");
                return Err(self.transport(peer, "hellos disagree on the connection count"));
            }
            if slot.failed.is_some() || slot.pending[index].is_some() {
                conn.close(VarInt::from_u32(CODE_REFUSED), b"duplicate connection");
                return Err(self.transport(peer, "a second connection from this rank refused"));
            }
            slot.pending[index] = Some(conn.clone());
            if slot.pending.iter().all(Option::is_some) {
                slot.conn = Some(Arc::new(PeerConn {
                    conns: slot.pending.iter().flatten().cloned().collect(),
                    lanes: (0..options::lanes_for(self.lanes, count))
                        .map(|_| Arc::new(tokio::sync::Mutex::new(None)))
                        .collect(),
                    stripe: tokio::sync::Mutex::new(0),
                }));
            }
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

/// A UDP socket on `addr` with the kernel buffers of `opts`.
fn udp_socket(addr: SocketAddr, opts: &QuicOptions) -> std::io::Result<std::net::UdpSocket> {
    let sock = std::net::UdpSocket::bind(addr)?;
    if opts.socket_buffer_bytes > 0 {
        let state = quinn::udp::UdpSocketState::new((&sock).into())?;
        // Best effort: the kernel caps these at net.core.{r,w}mem_max.
        let n = opts.socket_buffer_bytes;
        if let Err(e) = state.set_recv_buffer_size((&sock).into(), n) {
            tracing::debug!(%e, "quic fabric: cannot raise the UDP receive buffer");
        }
        if let Err(e) = state.set_send_buffer_size((&sock).into(), n) {
            tracing::debug!(%e, "quic fabric: cannot raise the UDP send buffer");
        }
    }
    Ok(sock)
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
        let socket = udp_socket(listen, &opts).map_err(bind_err)?;
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let server = id.server_config(transport.clone())?;
        let mut endpoint =
            Endpoint::new(opts.endpoint()?, Some(server), socket, runtime).map_err(bind_err)?;
        endpoint.set_default_client_config(id.client_config(transport)?);
        let hub = InprocHub::new(world);
        let (lanes, connections) = opts.shape();
        let shared = Arc::new(Shared {
            rank: id.rank,
            world,
            opts,
            lanes,
            connections,
            hub: Arc::clone(&hub),
            peers: Mutex::new((0..world).map(|_| PeerSlot::default()).collect()),
            rx: (0..world).map(|_| Arc::new(PeerRx::default())).collect(),
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
            let dials_of = |(peer, &addr): (Rank, &SocketAddr)| {
                (0..shared.connections).map(move |i| (peer, addr, i))
            };
            for (peer, addr, i) in peers.iter().enumerate().skip(rank + 1).flat_map(dials_of) {
                let d = dial(Arc::clone(&shared), endpoint.clone(), peer, addr, i);
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
    /// acknowledged all data, then close and let the close reach the peers. Use before a
    /// process exits, so its last sends land and peers see it leave at once.
    pub async fn shutdown(&self) {
        let conns: Vec<_> = self
            .shared
            .lock()
            .iter()
            .filter_map(|s| s.conn.clone())
            .collect();
        // Keep each finished stream alive until the peer acknowledged it (quinn stops tracking a
        // dropped stream), and stop waiting when its connection goes away.
        let mut finished = Vec::new();
        for pc in &conns {
            for (i, lane) in pc.lanes.iter().enumerate() {
                if let Some(mut s) = lane.lock().await.take() {
                    let _ = s.finish();
                    finished.push((s, pc.conn_of(i)));
                }
            }
        }
        let _ = tokio::time::timeout(self.shared.opts.connect_timeout, async {
            for (s, conn) in &finished {
                tokio::select! {
                    _ = s.stopped() => {}
                    _ = conn.closed() => {}
                }
            }
        })
        .await;
        self.close();
        // Let the endpoint send its CONNECTION_CLOSE before the process may exit, or peers
        // would wait for their idle timeout.
        let _ =
            tokio::time::timeout(self.shared.opts.connect_timeout, self.endpoint.wait_idle()).await;
    }

    /// Declare `peer` failed (told by the job's controller, which saw it die): its connections
    /// are closed and receives from it fail at once with `why`.
    pub fn fail_peer(&self, peer: Rank, why: String) {
        self.shared.fail_peer(peer, why);
    }

    /// Close every connection now (unsent data is dropped) and fail local receives.
    pub fn close(&self) {
        self.endpoint
            .close(VarInt::from_u32(CODE_SHUTDOWN), b"shutdown");
        self.shared.hub.close();
    }

    /// The first connection to `peer` (tests inject raw streams through it).
    #[cfg(test)]
    pub(crate) fn connection(&self, peer: Rank) -> Option<Connection> {
        self.shared.lock()[peer]
            .conn
            .as_ref()
            .map(|c| c.conns[0].clone())
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
    fn subscribe(&self, channel: u32) -> Result<Inbox, FabricError> {
        self.local.subscribe(channel)
    }
}

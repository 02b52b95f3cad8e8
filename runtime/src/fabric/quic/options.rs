//! Options and setup errors of the QUIC fabric: windows, connections and lanes per pair of
//! ranks, striping threshold, UDP socket buffers, timeouts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;

use crate::fabric::FabricError;

/// Most connections a pair of ranks may use.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// Lanes per peer: at least `lanes` and a multiple of `conns`.
pub(crate) fn lanes_for(lanes: usize, conns: usize) -> usize {
    lanes.clamp(1, 1024).next_multiple_of(conns.max(1))
}

/// Tuning of a [`QuicFabric`](super::QuicFabric).
#[derive(Debug, Clone, PartialEq)]
pub struct QuicOptions {
    /// Largest message body accepted or sent, bytes.
    pub max_frame_bytes: u64,
    /// Receive window of one stream, bytes (quinn's default, 1.25 MB, caps bulk throughput).
    pub stream_receive_window: u64,
    /// Receive window of a whole connection, bytes.
    pub connection_receive_window: u64,
    /// Unacknowledged bytes a connection may have in flight, bytes.
    pub send_window: u64,
    /// Long-lived streams per direction per peer ("lanes"), spread round-robin over the
    /// connections.
    pub lanes: usize,
    /// QUIC connections per pair of ranks, chosen by the dialling (lower) rank; 0 picks one
    /// connection per 4 cores of this host, 1 to 4. quinn drives each connection (packets,
    /// crypto) on one task, so several connections let a multi-threaded runtime spread one
    /// peer's traffic over several cores; on a host without idle cores they only add work.
    pub connections: usize,
    /// Messages of at least this many bytes are striped, one piece per connection; smaller
    /// ones travel whole on their tag's lane.
    pub stripe_bytes: u64,
    /// Kernel send and receive buffer of the UDP socket, bytes (0: the OS default). The Linux
    /// default (208 KiB) drops datagrams at loopback speeds; the kernel caps the value at
    /// `net.core.rmem_max` / `wmem_max`.
    pub socket_buffer_bytes: usize,
    /// Upper bound for path-MTU discovery, bytes of UDP payload (1452 suits Ethernet; raise it
    /// on jumbo-frame fabrics).
    pub max_udp_payload: u16,
    /// How long establishing the mesh may take.
    pub connect_timeout: Duration,
    /// A connection silent for this long is dead (its peer fails).
    pub idle_timeout: Duration,
    /// Keep-alive interval (must be well below `idle_timeout`).
    pub keep_alive: Duration,
}

impl Default for QuicOptions {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1 << 30,
            stream_receive_window: 16 << 20,
            connection_receive_window: 64 << 20,
            send_window: 64 << 20,
            lanes: 4,
            connections: 0,
            stripe_bytes: 1 << 20,
            socket_buffer_bytes: 4 << 20,
            max_udp_payload: 1452,
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
        }
    }
}

impl QuicOptions {
    /// Lanes and connections as used: connections resolved (see [`Self::connections`]), lanes
    /// a multiple of them (so consecutive lanes lie on distinct connections).
    pub(crate) fn shape(&self) -> (usize, usize) {
        let conns = match self.connections {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get() / 4)
                .clamp(1, 4),
            n => n.min(MAX_CONNECTIONS),
        };
        (lanes_for(self.lanes, conns), conns)
    }

    /// The quinn endpoint configuration these options describe: the largest UDP payload this
    /// endpoint accepts is `max_udp_payload` (quinn's default, 1472, would advertise a smaller
    /// bound to the peer and cap path-MTU discovery there, whatever its upper bound).
    pub fn endpoint(&self) -> Result<quinn::EndpointConfig, QuicError> {
        let mut e = quinn::EndpointConfig::default();
        e.max_udp_payload_size(self.max_udp_payload.max(1200))
            .map_err(|e| QuicError::Options(format!("max_udp_payload: {e}")))?;
        Ok(e)
    }

    /// The quinn transport configuration these options describe.
    pub fn transport(&self) -> Result<Arc<quinn::TransportConfig>, QuicError> {
        let var = |what: &str, v: u64| {
            VarInt::from_u64(v).map_err(|_| QuicError::Options(format!("{what} {v} is too large")))
        };
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| QuicError::Options("idle_timeout is too large".into()))?;
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload.max(1200));
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(var("stream_receive_window", self.stream_receive_window)?)
            .receive_window(var(
                "connection_receive_window",
                self.connection_receive_window,
            )?)
            .send_window(self.send_window)
            .max_concurrent_uni_streams(var(
                "lanes",
                4 * self.shape().0 as u64 + 4 * MAX_CONNECTIONS as u64,
            )?)
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .mtu_discovery_config(Some(mtu));
        Ok(Arc::new(t))
    }
}

/// Why the QUIC fabric could not be set up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuicError {
    #[error("certificate: {0}")]
    Cert(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("options: {0}")]
    Options(String),
    #[error("cannot bind {addr}: {why}")]
    Bind { addr: SocketAddr, why: String },
    #[error("expected {world} peer addresses (one per rank), got {got}")]
    Peers { world: usize, got: usize },
    #[error("launching ranks: {0}")]
    Launch(String),
    #[error(transparent)]
    Fabric(#[from] FabricError),
}

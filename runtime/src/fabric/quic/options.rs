//! Options and setup errors of the QUIC fabric.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::VarInt;

use crate::fabric::FabricError;

/// Tuning of a [`QuicFabric`].
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
    /// Long-lived streams per direction per peer.
    pub lanes: usize,
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
            max_udp_payload: 1452,
            connect_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
        }
    }
}

impl QuicOptions {
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
            .max_concurrent_uni_streams(var("lanes", 4 * self.lanes.max(1) as u64 + 16)?)
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
    #[error(transparent)]
    Fabric(#[from] FabricError),
}

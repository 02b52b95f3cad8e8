//! The control plane's transport: typed messages between a job's processes (controller, node
//! agents, rank processes) over QUIC with mutual TLS from the job CA.
//!
//! A control link is one QUIC connection with one bidirectional stream. The controller listens
//! ([`ControlListener`]); agents and rank processes dial it ([`connect`]). Each side's
//! certificate must chain to the job CA (a peer with another CA's certificate, or none, fails
//! the handshake); who a peer claims to be is checked against its certificate by the caller
//! ([`ControlLink::peer_is`]).
//!
//! Frames: a 16-byte header (magic `FLC1`, the control message's length as u32 LE, the blob's
//! length as u64 LE), the control message encoded by [`crate::codec`] (at most
//! [`MAX_CONTROL_BYTES`], decoded with that limit), then the blob: opaque bytes that ride with
//! the message (a checkpoint shard), at most the link's blob limit, read as it arrives rather
//! than allocated from the header. A frame that breaks any of these rules is an error naming
//! the fault, and the caller drops the link; nothing in it panics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, CodecError, MAX_CONTROL_BYTES};
use crate::fabric::quic::tls::{self, NamedIdentity};
use crate::fabric::quic::{QuicError, QuicOptions};

/// ALPN protocol id of the control plane (a fabric endpoint refuses it, and the other way).
pub const ALPN: &[u8] = b"flotilla-control/1";
/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FLC1";
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 16;
/// The default most bytes of a frame's blob (a rank's checkpoint shard).
pub const MAX_BLOB_BYTES: u64 = 1 << 36;
/// The certificate name of the controller.
pub const CONTROLLER_NAME: &str = "controller.flotilla";

/// What went wrong on a control link.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control link: {0}")]
    Transport(String),
    #[error("control link: malformed frame: {0}")]
    Frame(String),
    #[error("control link: {0}")]
    Codec(#[from] CodecError),
    #[error("control link: {0}")]
    Quic(#[from] QuicError),
}

fn transport(e: impl std::fmt::Display) -> ControlError {
    ControlError::Transport(e.to_string())
}

/// The transport settings of control links: keep-alives well inside the idle timeout, so a
/// quiet link stays up and a peer whose host vanished is noticed within `idle`.
fn transport_config(idle: Duration) -> Result<Arc<quinn::TransportConfig>, ControlError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(idle).map_err(transport)?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    Ok(Arc::new(t))
}

fn socket(addr: SocketAddr) -> Result<std::net::UdpSocket, ControlError> {
    std::net::UdpSocket::bind(addr).map_err(|e| transport(format!("bind {addr}: {e}")))
}

/// The controller's listening endpoint.
#[derive(Debug)]
pub struct ControlListener {
    endpoint: Endpoint,
    max_blob: u64,
}

impl ControlListener {
    /// Listen on `addr` (port 0: the OS picks) as `id`, whose certificate names
    /// [`CONTROLLER_NAME`]; a link idle for `idle` is dropped.
    pub fn bind(
        addr: SocketAddr,
        id: &NamedIdentity,
        idle: Duration,
    ) -> Result<Self, ControlError> {
        let server = id.server_config(ALPN, transport_config(idle)?)?;
        let endpoint = Endpoint::new(
            QuicOptions::default().endpoint()?,
            Some(server),
            socket(addr)?,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(transport)?;
        Ok(Self {
            endpoint,
            max_blob: MAX_BLOB_BYTES,
        })
    }

    /// A listener that refuses blobs above `max` bytes (tests of oversized frames).
    pub fn with_max_blob(mut self, max: u64) -> Self {
        self.max_blob = max;
        self
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Result<SocketAddr, ControlError> {
        self.endpoint.local_addr().map_err(transport)
    }

    /// The next authenticated link: `None` once the listener is closed; an error for a peer
    /// that failed the handshake (the caller logs it and goes on accepting).
    pub async fn accept(&self) -> Option<Result<ControlLink, ControlError>> {
        let incoming = self.endpoint.accept().await?;
        let max_blob = self.max_blob;
        Some(
            async move {
                let conn = incoming
                    .await
                    .map_err(|e| transport(format!("handshake: {e}")))?;
                let (tx, rx) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
                    .await
                    .map_err(|_| transport("no stream opened within 10 s"))?
                    .map_err(transport)?;
                Ok(ControlLink::new(conn, tx, rx, max_blob))
            }
            .await,
        )
    }

    /// Stop accepting and close every link.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(0), b"job ended");
    }
}

/// Dial the controller at `addr` as `id` (the controller's certificate must name
/// [`CONTROLLER_NAME`]), within `timeout`.
pub async fn connect(
    addr: SocketAddr,
    id: &NamedIdentity,
    idle: Duration,
    timeout: Duration,
) -> Result<ControlLink, ControlError> {
    let local = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let mut endpoint = Endpoint::new(
        QuicOptions::default().endpoint()?,
        None,
        socket(local)?,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(transport)?;
    endpoint.set_default_client_config(id.client_config(ALPN, transport_config(idle)?)?);
    let dial = async {
        let conn = endpoint
            .connect(addr, CONTROLLER_NAME)
            .map_err(|e| transport(format!("connect to {addr}: {e}")))?
            .await
            .map_err(|e| transport(format!("handshake with {addr}: {e}")))?;
        let (tx, rx) = conn.open_bi().await.map_err(transport)?;
        Ok::<_, ControlError>(ControlLink::new(conn, tx, rx, MAX_BLOB_BYTES))
    };
    let mut link = tokio::time::timeout(timeout, dial).await.map_err(|_| {
        transport(format!(
            "no answer from the controller at {addr} within {timeout:?}"
        ))
    })??;
    link.endpoint = Some(endpoint);
    Ok(link)
}

/// One control link: a sending half that may be cloned and a receiving half.
#[derive(Debug)]
pub struct ControlLink {
    pub tx: ControlTx,
    pub rx: ControlRx,
    /// The dialler's own endpoint (kept alive with the link).
    endpoint: Option<Endpoint>,
}

impl ControlLink {
    fn new(conn: Connection, tx: SendStream, rx: RecvStream, max_blob: u64) -> Self {
        Self {
            tx: ControlTx {
                stream: Arc::new(tokio::sync::Mutex::new(tx)),
                conn: conn.clone(),
            },
            rx: ControlRx {
                stream: rx,
                max_blob,
                conn,
            },
            endpoint: None,
        }
    }

    /// Whether the peer's (verified) certificate names `name`.
    pub fn peer_is(&self, name: &str) -> bool {
        self.tx.peer_is(name)
    }

    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        self.tx.conn.remote_address()
    }

    /// Split into the halves, keeping the dialler's endpoint alive in the sending one.
    pub fn split(self) -> (ControlTx, ControlRx, Option<Endpoint>) {
        (self.tx, self.rx, self.endpoint)
    }
}

/// The sending half of a control link (clones share the stream; a frame is written whole).
#[derive(Debug, Clone)]
pub struct ControlTx {
    stream: Arc<tokio::sync::Mutex<SendStream>>,
    conn: Connection,
}

impl ControlTx {
    /// Send `msg` with `blob` riding along (empty for none).
    pub async fn send<T: Serialize>(&self, msg: &T, blob: &[u8]) -> Result<(), ControlError> {
        let body = codec::encode(msg)?;
        let mut head = [0u8; HEADER_LEN];
        head[..4].copy_from_slice(&MAGIC);
        head[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
        head[8..].copy_from_slice(&(blob.len() as u64).to_le_bytes());
        let mut s = self.stream.lock().await;
        s.write_all(&head).await.map_err(transport)?;
        s.write_all(&body).await.map_err(transport)?;
        s.write_all(blob).await.map_err(transport)
    }

    /// Write raw bytes (tests of malformed frames).
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), ControlError> {
        self.stream
            .lock()
            .await
            .write_all(bytes)
            .await
            .map_err(transport)
    }

    /// Whether the peer's (verified) certificate names `name`.
    pub fn peer_is(&self, name: &str) -> bool {
        tls::peer_cert(&self.conn).is_some_and(|c| tls::cert_names(&c, name))
    }

    /// Close the link at once, telling the peer `why`.
    pub fn close(&self, why: &str) {
        self.conn.close(VarInt::from_u32(1), why.as_bytes());
    }

    /// Finish the stream and wait (at most `timeout`) until the peer has everything.
    pub async fn finish(&self, timeout: Duration) {
        let mut s = self.stream.lock().await;
        let _ = s.finish();
        let _ = tokio::time::timeout(timeout, s.stopped()).await;
    }

    /// Resolves when the link is closed, by either side or by its idle timeout.
    pub async fn closed(&self) -> String {
        self.conn.closed().await.to_string()
    }
}

/// The receiving half of a control link.
#[derive(Debug)]
pub struct ControlRx {
    stream: RecvStream,
    max_blob: u64,
    conn: Connection,
}

impl ControlRx {
    /// The next message and its blob; `None` when the peer finished the stream cleanly. A
    /// malformed or oversized frame is an error (the caller should drop the link).
    pub async fn recv<T: DeserializeOwned>(
        &mut self,
    ) -> Result<Option<(T, Vec<u8>)>, ControlError> {
        let mut head = [0u8; HEADER_LEN];
        match self.stream.read_exact(&mut head).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(n)) => {
                return Err(ControlError::Frame(format!(
                    "the stream ended {n} bytes into a frame header"
                )));
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(transport(e)),
        }
        let (len, blob_len) = parse_header(&head, self.max_blob)?;
        let mut body = vec![0u8; len];
        self.read_all(&mut body, "message").await?;
        let msg = codec::decode(&body, MAX_CONTROL_BYTES)?;
        let blob = self.read_blob(blob_len).await?;
        Ok(Some((msg, blob)))
    }

    async fn read_all(&mut self, buf: &mut [u8], what: &str) -> Result<(), ControlError> {
        self.stream.read_exact(buf).await.map_err(|e| match e {
            quinn::ReadExactError::FinishedEarly(n) => ControlError::Frame(format!(
                "the stream ended {n} bytes into a {}-byte {what}",
                buf.len()
            )),
            quinn::ReadExactError::ReadError(e) => transport(e),
        })
    }

    /// A blob of `len` bytes, grown as it arrives (a header alone reserves nothing).
    async fn read_blob(&mut self, len: u64) -> Result<Vec<u8>, ControlError> {
        let mut blob = Vec::new();
        let mut left = len;
        let mut chunk = vec![0u8; (len.min(1 << 20)) as usize];
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            self.read_all(&mut chunk[..n], "blob").await?;
            blob.extend_from_slice(&chunk[..n]);
            left -= n as u64;
        }
        Ok(blob)
    }

    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        self.conn.remote_address()
    }
}

/// Check a frame header: the message's length and the blob's.
pub fn parse_header(head: &[u8; HEADER_LEN], max_blob: u64) -> Result<(usize, u64), ControlError> {
    if head[..4] != MAGIC {
        return Err(ControlError::Frame(format!(
            "bad magic {:02x?} (not a control frame)",
            &head[..4]
        )));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&head[4..8]);
    let len = u32::from_le_bytes(len) as usize;
    let mut blob = [0u8; 8];
    blob.copy_from_slice(&head[8..]);
    let blob = u64::from_le_bytes(blob);
    if len > MAX_CONTROL_BYTES {
        return Err(ControlError::Frame(format!(
            "a {len}-byte message exceeds the limit of {MAX_CONTROL_BYTES} bytes"
        )));
    }
    if blob > max_blob {
        return Err(ControlError::Frame(format!(
            "a {blob}-byte blob exceeds the limit of {max_blob} bytes"
        )));
    }
    Ok((len, blob))
}

pub mod keys;
#[cfg(test)]
mod tests;

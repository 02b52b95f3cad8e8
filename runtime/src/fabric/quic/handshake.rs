//! Joining two ranks: the QUIC/TLS handshake, then a hello frame each way naming the ranks.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::{Endpoint, RecvStream, SendStream, VarInt};

use super::frame::{HEADER_LEN, Header, Kind};
use super::{CODE_REFUSED, Shared, tls};
use crate::fabric::{FabricError, Rank};

/// Read the hello frame of the other side of a new connection.
async fn read_hello(rx: &mut RecvStream, world: usize) -> Result<Rank, String> {
    let mut head = [0u8; HEADER_LEN];
    rx.read_exact(&mut head)
        .await
        .map_err(|e| format!("no hello: {e}"))?;
    let h = Header::decode(&head, 0).map_err(|e| format!("malformed hello: {e}"))?;
    if h.kind != Kind::Hello {
        return Err(format!("expected a hello, got a {:?} frame", h.kind));
    }
    if h.tag.tag != world as u64 || h.src >= world {
        return Err(format!(
            "hello from rank {} of a {}-rank job, this job has {world} ranks",
            h.src, h.tag.tag
        ));
    }
    Ok(h.src)
}

async fn write_hello(tx: &mut SendStream, rank: Rank, world: usize) -> Result<(), String> {
    tx.write_all(&Header::hello(rank, world).encode())
        .await
        .map_err(|e| format!("hello: {e}"))?;
    tx.finish().map_err(|e| format!("hello: {e}"))
}

/// The listener side of a new connection: TLS, then the dialler's hello, checked against its
/// certificate, then our hello.
pub(super) async fn accept_one(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
) -> Result<Rank, String> {
    let conn = incoming.await.map_err(|e| format!("handshake: {e}"))?;
    let remote = conn.remote_address();
    let (mut tx, mut rx) = conn
        .accept_bi()
        .await
        .map_err(|e| format!("{remote}: {e}"))?;
    let peer = read_hello(&mut rx, shared.world).await?;
    let named = tls::peer_cert(&conn).is_some_and(|c| tls::cert_names_rank(&c, peer));
    if !named || peer == shared.rank {
        conn.close(
            VarInt::from_u32(CODE_REFUSED),
            b"certificate does not name this rank",
        );
        return Err(format!(
            "{remote} claims rank {peer} without its certificate"
        ));
    }
    write_hello(&mut tx, shared.rank, shared.world).await?;
    shared.register(peer, conn).map_err(|e| e.to_string())?;
    Ok(peer)
}

/// The dialler side: connect to `peer` at `addr` (whose certificate must name `peer`), hello.
pub(super) async fn dial(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    peer: Rank,
    addr: SocketAddr,
) -> Result<(), FabricError> {
    let err = |why: String| FabricError::Transport { rank: peer, why };
    let conn = endpoint
        .connect(addr, &tls::rank_name(peer))
        .map_err(|e| err(format!("connect to {addr}: {e}")))?
        .await
        .map_err(|e| err(format!("handshake with {addr}: {e}")))?;
    let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
    write_hello(&mut tx, shared.rank, shared.world)
        .await
        .map_err(err)?;
    let got = read_hello(&mut rx, shared.world).await.map_err(err)?;
    if got != peer {
        conn.close(VarInt::from_u32(CODE_REFUSED), b"wrong rank");
        return Err(err(format!("{addr} answered as rank {got}")));
    }
    shared.register(peer, conn)
}

//! Joining two ranks: the QUIC/TLS handshake of each of their connections, then a hello frame
//! each way naming the ranks, the connection's index and the connection count (the dialler's
//! choice, which the listener echoes).

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::{Endpoint, RecvStream, SendStream, VarInt};

use super::frame::{HEADER_LEN, Header, Kind};
use super::options::MAX_CONNECTIONS;
use super::{CODE_REFUSED, Shared, tls};
use crate::fabric::{FabricError, Rank};

/// What a hello says.
struct Hello {
    rank: Rank,
    index: usize,
    count: usize,
}

/// Read the hello frame of the other side of a new connection.
async fn read_hello(rx: &mut RecvStream, world: usize) -> Result<Hello, String> {
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
    let index = h.tag.channel as usize;
    let count = usize::try_from(h.total).unwrap_or(usize::MAX);
    if count == 0 || count > MAX_CONNECTIONS || index >= count {
        return Err(format!(
            "hello for connection {index} of {} per pair (at most {MAX_CONNECTIONS})",
            h.total
        ));
    }
    Ok(Hello {
        rank: h.src,
        index,
        count,
    })
}

async fn write_hello(
    tx: &mut SendStream,
    shared: &Shared,
    index: usize,
    count: usize,
) -> Result<(), String> {
    // `index < count <= MAX_CONNECTIONS`.
    let h = Header::hello(shared.rank, shared.world, index as u32, count as u32);
    tx.write_all(&h.encode())
        .await
        .map_err(|e| format!("hello: {e}"))?;
    tx.finish().map_err(|e| format!("hello: {e}"))
}

/// The listener side of a new connection: TLS, then the dialler's hello, checked against its
/// certificate, then our hello. Returns the peer's rank.
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
    let hello = read_hello(&mut rx, shared.world).await?;
    let peer = hello.rank;
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
    write_hello(&mut tx, &shared, hello.index, hello.count).await?;
    shared
        .register(peer, hello.index, hello.count, conn)
        .map_err(|e| e.to_string())?;
    Ok(peer)
}

/// The dialler side of connection `index`: connect to `peer` at `addr` (whose certificate
/// must name `peer`), hello.
pub(super) async fn dial(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    peer: Rank,
    addr: SocketAddr,
    index: usize,
) -> Result<(), FabricError> {
    let err = |why: String| FabricError::Transport { rank: peer, why };
    let count = shared.connections;
    let conn = endpoint
        .connect(addr, &tls::rank_name(peer))
        .map_err(|e| err(format!("connect to {addr}: {e}")))?
        .await
        .map_err(|e| err(format!("handshake with {addr}: {e}")))?;
    let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| err(e.to_string()))?;
    write_hello(&mut tx, &shared, index, count)
        .await
        .map_err(err)?;
    let got = read_hello(&mut rx, shared.world).await.map_err(err)?;
    if got.rank != peer || got.index != index || got.count != count {
        conn.close(VarInt::from_u32(CODE_REFUSED), b"wrong rank");
        return Err(err(format!(
            "{addr} answered as rank {} (connection {})",
            got.rank, got.index
        )));
    }
    shared.register(peer, index, count, conn)
}

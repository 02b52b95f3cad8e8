//! The sending half of the QUIC fabric: a message travels whole on its tag's lane, or, from
//! [`QuicOptions::stripe_bytes`](super::QuicOptions::stripe_bytes) up and with several
//! connections, in one piece per connection: on the tag's own lane (piece 0) and the lanes after
//! it, which lie on distinct connections. Striped sends take their lanes one after another under
//! one lock, so every lane carries striped messages in sequence order and the receiving readers
//! (each waiting only for pieces of its own message, which come earlier on every other lane than
//! any later message) never wait on each other in a cycle.
//!
//! Bodies are handed to quinn as [`Bytes`] that own the payload's buffer (no copy). Each frame
//! is written by its own task: a caller that drops its send future mid-frame cannot leave half a
//! frame on a stream.

use std::sync::Arc;

use bytes::Bytes;
use quinn::{Connection, SendStream};
use tokio::sync::OwnedMutexGuard;

use super::frame::{self, Header};
use super::{PeerConn, QuicFabric};
use crate::fabric::{Fabric, FabricError, Payload, Rank, Tag};

/// Pieces are cut at multiples of this many bytes (whole elements of every dtype).
const PIECE_ALIGN: u64 = 64 << 10;

/// The lane of `tag` among `lanes`.
pub(super) fn lane_of(tag: Tag, lanes: usize) -> usize {
    let h = (u64::from(tag.channel).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ tag.tag)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    ((h >> 32) % lanes.max(1) as u64) as usize
}

/// Write frames on a lane (opening its stream on first use) in a task of their own.
fn write_frames(
    mut lane: OwnedMutexGuard<Option<SendStream>>,
    conn: Connection,
    frames: Vec<Bytes>,
) -> tokio::task::JoinHandle<Result<(), quinn::WriteError>> {
    tokio::spawn(async move {
        let mut s = match lane.take() {
            Some(s) => s,
            None => conn.open_uni().await?,
        };
        let mut chunks = frames;
        s.write_all_chunks(&mut chunks).await?;
        *lane = Some(s);
        Ok(())
    })
}

impl QuicFabric {
    pub(super) async fn send_to(
        &self,
        dst: Rank,
        tag: Tag,
        payload: Payload,
    ) -> Result<(), FabricError> {
        let (rank, world) = (self.shared.rank, self.shared.world);
        if dst >= world {
            return Err(FabricError::NoSuchRank { rank: dst, world });
        }
        if dst == rank {
            return self.local.send(dst, tag, payload).await;
        }
        let max = self.shared.opts.max_frame_bytes;
        let dtype = frame::Dtype::of(&payload);
        let body = frame::payload_bytes(payload).map_err(|e| self.shared.transport(dst, e))?;
        let len = body.len() as u64;
        if len > max {
            return Err(self.shared.transport(
                dst,
                format!("frame of {len} bytes exceeds the maximum of {max} bytes"),
            ));
        }
        let pc = self.shared.peer(dst)?;
        let whole = Header::body(rank, tag, dtype, len);
        let lanes = pc.lanes.len();
        let home = lane_of(tag, lanes);
        let striping = pc.conns.len() > 1 && len >= self.shared.opts.stripe_bytes.max(PIECE_ALIGN);
        let writes = if striping {
            striped(&pc, &whole, body, home).await
        } else {
            // The lane is taken here, in call order (tokio's mutex is fair), so sends on one
            // tag keep their order.
            let lane = Arc::clone(&pc.lanes[home]).lock_owned().await;
            let head = Bytes::copy_from_slice(&whole.encode());
            vec![write_frames(lane, pc.conn_of(home), vec![head, body])]
        };
        let mut result = Ok(());
        for w in writes {
            let r = match w.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(quinn::WriteError::ConnectionLost(e))) => Err(self.lost(dst, e)),
                Ok(Err(e)) => Err(self.shared.transport(dst, e)),
                Err(e) => Err(self.shared.transport(dst, format!("send task: {e}"))),
            };
            result = result.and(r);
        }
        result
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

/// Take lanes `home, home + 1, …` (one per connection) and write one piece of `body` on each.
async fn striped(
    pc: &PeerConn,
    whole: &Header,
    body: Bytes,
    home: usize,
) -> Vec<tokio::task::JoinHandle<Result<(), quinn::WriteError>>> {
    let (lanes, pieces) = (pc.lanes.len(), pc.conns.len());
    let mut guards = Vec::with_capacity(pieces);
    let seq = {
        let mut next = pc.stripe.lock().await;
        for i in 0..pieces {
            guards.push(Arc::clone(&pc.lanes[(home + i) % lanes]).lock_owned().await);
        }
        *next += 1;
        *next
    };
    let total = whole.total;
    let piece = total
        .div_ceil(pieces as u64)
        .div_ceil(PIECE_ALIGN)
        .saturating_mul(PIECE_ALIGN);
    let mut writes = Vec::with_capacity(lanes);
    for (i, lane) in guards.into_iter().enumerate() {
        let offset = (i as u64).saturating_mul(piece).min(total);
        let len = piece.min(total - offset);
        if len == 0 && i > 0 {
            continue; // the lane is released; piece 0 always goes out
        }
        let head = Header::piece(whole, seq, offset, len).encode();
        // `offset + len <= total`, the body's length.
        let part = body.slice(offset as usize..(offset + len) as usize);
        let conn = pc.conn_of((home + i) % lanes);
        writes.push(write_frames(
            lane,
            conn,
            vec![Bytes::copy_from_slice(&head), part],
        ));
    }
    writes
}

//! The receiving half of the QUIC fabric: one task per incoming lane reads frames into typed
//! buffers and delivers whole messages into the local hub; pieces of striped messages are
//! copied straight into their message's buffer, and the reader of the piece at offset 0 (which
//! the sender puts on the tag's own lane) delivers the message once every piece is in, so
//! messages stay FIFO per (source, tag).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use quinn::{Connection, ReadError, ReadExactError, RecvStream, VarInt};

use super::frame::{self, HEADER_LEN, Header, Kind};
use super::{CODE_PROTOCOL, Shared};
use crate::fabric::{Fabric, Payload, Rank, Tag};

/// Striped messages being assembled from one peer at most (a sender's lanes run at most a few
/// messages apart; more means a broken peer).
const MAX_ASSEMBLIES: usize = 4096;

/// A striped message being filled by the readers of several lanes.
struct Assembly {
    head: Header,
    state: Mutex<Filling>,
    done: tokio::sync::Notify,
}

struct Filling {
    payload: Option<Payload>,
    received: u64,
}

impl Assembly {
    fn lock(&self) -> MutexGuard<'_, Filling> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The striped messages in flight from one peer, by sequence number.
#[derive(Default)]
pub(super) struct PeerRx {
    assemblies: Mutex<HashMap<u64, Arc<Assembly>>>,
}

impl PeerRx {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Assembly>>> {
        self.assemblies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The assembly of the message `h` is a piece of, started by whichever piece comes first.
    fn assembly(&self, h: &Header) -> Result<Arc<Assembly>, String> {
        let mut map = self.lock();
        if let Some(a) = map.get(&h.seq) {
            let w = &a.head;
            if (w.tag, w.dtype, w.total) != (h.tag, h.dtype, h.total) {
                return Err(format!(
                    "piece of striped message {} disagrees with its other pieces",
                    h.seq
                ));
            }
            return Ok(Arc::clone(a));
        }
        if map.len() >= MAX_ASSEMBLIES {
            return Err(format!(
                "more than {MAX_ASSEMBLIES} striped messages in flight"
            ));
        }
        // `h.total <= max_frame_bytes`, which was accepted as a buffer size.
        let a = Arc::new(Assembly {
            head: *h,
            state: Mutex::new(Filling {
                payload: Some(frame::alloc_payload(h.dtype, h.total as usize)),
                received: 0,
            }),
            done: tokio::sync::Notify::new(),
        });
        map.insert(h.seq, Arc::clone(&a));
        Ok(a)
    }
}

/// How reading a frame ended.
enum Frame {
    /// A message to deliver.
    Message(Tag, Payload),
    /// A piece went into its assembly (delivered by the reader of piece 0).
    Piece,
    /// The stream ended cleanly, was reset, or the connection went away (which the
    /// connection's own task reports).
    End,
}

/// Read frames from one incoming lane of `peer` into the hub until the stream ends.
pub(super) async fn read_lane(
    shared: Arc<Shared>,
    peer: Rank,
    conn: Connection,
    mut s: RecvStream,
) {
    let from_peer = shared.hub.endpoint(peer);
    let rx = Arc::clone(&shared.rx[peer]);
    let mut last_seq = None;
    loop {
        let r = read_frame(
            &mut s,
            &rx,
            &conn,
            peer,
            shared.opts.max_frame_bytes,
            &mut last_seq,
        );
        match r.await {
            Ok(Frame::Message(tag, payload)) => {
                if from_peer.send(shared.rank, tag, payload).await.is_err() {
                    return; // the hub is closed: this fabric shut down
                }
            }
            Ok(Frame::Piece) => {}
            Ok(Frame::End) => return,
            Err(why) => {
                let _ = s.stop(VarInt::from_u32(CODE_PROTOCOL));
                shared.fail_peer(peer, why);
                conn.close(VarInt::from_u32(CODE_PROTOCOL), b"malformed frame");
                return;
            }
        }
    }
}

fn quiet(e: &ReadError) -> bool {
    matches!(e, ReadError::Reset(_) | ReadError::ConnectionLost(_))
}

/// The next frame of a lane.
async fn read_frame(
    s: &mut RecvStream,
    rx: &PeerRx,
    conn: &Connection,
    peer: Rank,
    max: u64,
    last_seq: &mut Option<u64>,
) -> Result<Frame, String> {
    let mut head = [0u8; HEADER_LEN];
    match s.read_exact(&mut head).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(Frame::End),
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(format!(
                "truncated frame header from rank {peer}: {n} of {HEADER_LEN} bytes"
            ));
        }
        Err(ReadExactError::ReadError(e)) if quiet(&e) => return Ok(Frame::End),
        Err(ReadExactError::ReadError(e)) => return Err(format!("read from rank {peer}: {e}")),
    }
    let h =
        Header::decode(&head, max).map_err(|e| format!("malformed frame from rank {peer}: {e}"))?;
    if h.kind == Kind::Hello || h.src != peer {
        return Err(format!(
            "malformed frame from rank {peer}: {:?} frame claiming source rank {}",
            h.kind, h.src
        ));
    }
    if h.kind == Kind::Piece {
        if last_seq.is_some_and(|l| h.seq <= l) {
            return Err(format!(
                "malformed frame from rank {peer}: striped message {} out of order",
                h.seq
            ));
        }
        *last_seq = Some(h.seq);
        return read_piece(s, rx, conn, peer, &h).await;
    }
    // `h.len <= max`, which was accepted as a buffer size.
    let mut payload = frame::alloc_payload(h.dtype, h.len as usize);
    match s.read_exact(frame::payload_bytes_mut(&mut payload)).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(format!(
                "truncated frame from rank {peer} (tag {}): {n} of {} body bytes",
                h.tag, h.len
            ));
        }
        Err(ReadExactError::ReadError(e)) if quiet(&e) => return Ok(Frame::End),
        Err(ReadExactError::ReadError(e)) => return Err(format!("read from rank {peer}: {e}")),
    }
    let payload = frame::finish_payload(h.dtype, payload)
        .map_err(|e| format!("malformed frame from rank {peer} (tag {}): {e}", h.tag))?;
    Ok(Frame::Message(h.tag, payload))
}

/// Read one piece into its assembly; the reader of piece 0 then waits for the whole message.
async fn read_piece(
    s: &mut RecvStream,
    rx: &PeerRx,
    conn: &Connection,
    peer: Rank,
    h: &Header,
) -> Result<Frame, String> {
    let asm = rx.assembly(h)?;
    // Header::decode checked `offset + len <= total`, the assembly's buffer size.
    let (mut at, end) = (h.offset as usize, (h.offset + h.len) as usize);
    while at < end {
        let chunk = match s.read_chunk(end - at, true).await {
            Ok(Some(c)) => c.bytes,
            Ok(None) => {
                return Err(format!(
                    "truncated piece from rank {peer} (tag {}): {} of {} bytes",
                    h.tag,
                    at - h.offset as usize,
                    h.len
                ));
            }
            Err(e) if quiet(&e) => return Ok(Frame::End),
            Err(e) => return Err(format!("read from rank {peer}: {e}")),
        };
        let n = chunk.len().min(end - at);
        let mut st = asm.lock();
        let Some(p) = st.payload.as_mut() else {
            return Err(format!(
                "striped message {} from rank {peer} is already whole",
                h.seq
            ));
        };
        frame::payload_bytes_mut(p)[at..at + n].copy_from_slice(&chunk[..n]);
        st.received += n as u64;
        if st.received > h.total {
            return Err(format!(
                "overlapping pieces of striped message {} from rank {peer}",
                h.seq
            ));
        }
        if st.received == h.total {
            asm.done.notify_one();
        }
        at += n;
    }
    if h.offset != 0 && h.total != 0 {
        return Ok(Frame::Piece);
    }
    // Piece 0: wait for the others (read by the other lanes' tasks), then deliver.
    loop {
        let done = asm.done.notified();
        if asm.lock().received == h.total {
            break;
        }
        tokio::select! {
            () = done => {}
            _ = conn.closed() => return Ok(Frame::End),
        }
    }
    rx.lock().remove(&h.seq);
    let Some(payload) = asm.lock().payload.take() else {
        return Err(format!(
            "striped message {} from rank {peer} has two first pieces",
            h.seq
        ));
    };
    let payload = frame::finish_payload(h.dtype, payload)
        .map_err(|e| format!("malformed striped message from rank {peer}: {e}"))?;
    Ok(Frame::Message(h.tag, payload))
}

//! The wire format of collective messages: data frames with their trailer, control messages,
//! and the operation kinds that frames carry.
//!
//! A data frame is the buffer with its trailer (the kind and the sender's total length,
//! [`Elem::frame`]): appended to the buffer ([`Elem::TRAILER`] elements) when the buffer has room
//! for it or is small; a large buffer without spare capacity instead goes raw, right after a
//! [`Control::Header`] carrying the same two values on the same tag, so that framing never
//! reallocates (and copies) a large buffer. A shape-only buffer carries its trailer in the
//! payload's metadata ([`crate::absent`]), so it is always one message.

use flotilla_runtime::fabric::{Payload, Rank};

use crate::elem::Elem;

/// Kinds of operation, carried in every data frame.
pub(crate) mod kind {
    pub const RING_ALL_REDUCE: u32 = 1;
    pub const TREE_ALL_REDUCE: u32 = 2;
    pub const REDUCE_SCATTER: u32 = 3;
    pub const ALL_GATHER: u32 = 4;
    pub const BROADCAST: u32 = 5;
    pub const ALL_TO_ALL_V: u32 = 6;
    pub const BARRIER: u32 = 7;
    pub const STAR_ALL_REDUCE: u32 = 8;
    pub const STAR_REDUCE_SCATTER: u32 = 9;

    /// An operation code with a parameter (reduction or root) in the upper 24 bits.
    pub fn with(code: u32, param: usize) -> u32 {
        code | ((param as u32) << 8)
    }

    pub fn name(k: u32) -> String {
        let (code, param) = (k & 0xff, k >> 8);
        let op = |p| match p {
            0 => "sum",
            1 => "avg",
            2 => "max",
            _ => "?",
        };
        match code {
            RING_ALL_REDUCE => format!("ring all_reduce({})", op(param)),
            TREE_ALL_REDUCE => format!("tree all_reduce({})", op(param)),
            REDUCE_SCATTER => format!("reduce_scatter({})", op(param)),
            ALL_GATHER => "all_gather".into(),
            BROADCAST => format!("broadcast(root {param})"),
            ALL_TO_ALL_V => "all_to_all_v".into(),
            BARRIER => "barrier".into(),
            STAR_ALL_REDUCE => format!("star all_reduce({})", op(param)),
            STAR_REDUCE_SCATTER => format!("star reduce_scatter({})", op(param)),
            other => format!("unknown operation {other}"),
        }
    }
}

/// A control message: a peer is stuck, or a peer aborts the operation, or the header of the
/// raw data message that follows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Control {
    Stuck {
        waiting_on: Rank,
    },
    Abort {
        culprit: Option<Rank>,
        reason: String,
    },
    Header {
        kind: u32,
        total: u64,
    },
}

impl Control {
    pub(crate) fn encode(&self) -> Payload {
        let kind_bytes;
        let (code, rank, text) = match self {
            Control::Stuck { waiting_on } => (1u8, *waiting_on as u64, &[][..]),
            Control::Abort { culprit, reason } => (
                2u8,
                culprit.map_or(u64::MAX, |r| r as u64),
                reason.as_bytes(),
            ),
            Control::Header { kind, total } => {
                kind_bytes = kind.to_le_bytes();
                (3u8, *total, &kind_bytes[..])
            }
        };
        let mut b = Vec::with_capacity(9 + text.len());
        b.push(code);
        b.extend_from_slice(&rank.to_le_bytes());
        b.extend_from_slice(text);
        Payload::Bytes(b)
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, String> {
        let (code, rest) = b.split_first().ok_or("empty control message")?;
        let raw: [u8; 8] = rest
            .get(..8)
            .and_then(|s| s.try_into().ok())
            .ok_or("truncated control message")?;
        let rank = u64::from_le_bytes(raw);
        if *code == 3 {
            let kind: [u8; 4] = rest[8..]
                .try_into()
                .map_err(|_| "a data header without its kind")?;
            return Ok(Control::Header {
                kind: u32::from_le_bytes(kind),
                total: rank,
            });
        }
        let text = String::from_utf8_lossy(&rest[8..]).into_owned();
        match code {
            1 => Ok(Control::Stuck {
                waiting_on: rank as Rank,
            }),
            2 => Ok(Control::Abort {
                culprit: (rank != u64::MAX).then_some(rank as Rank),
                reason: text,
            }),
            other => Err(format!("unknown control code {other}")),
        }
    }
}

/// Buffers shorter than this get the trailer appended even without spare capacity (reallocating
/// them costs little); longer ones without room go raw after a [`Control::Header`].
const INLINE_MAX: usize = 1 << 14;

/// Frame `data` as operation `kind` with the sender's `total` length: the header message to
/// send first, if any, and the data message.
pub(crate) fn frame<T: Elem>(data: Vec<T>, kind: u32, total: usize) -> (Option<Payload>, Payload) {
    let total = total as u64;
    if data.capacity() - data.len() >= T::TRAILER || data.len() < INLINE_MAX {
        (None, T::frame(data, kind, total))
    } else {
        (
            Some(Control::Header { kind, total }.encode()),
            T::wrap(data),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elem::Unframed;

    #[test]
    fn control_messages_round_trip() {
        for c in [
            Control::Stuck { waiting_on: 7 },
            Control::Abort {
                culprit: Some(3),
                reason: "rank 3 died".into(),
            },
            Control::Abort {
                culprit: None,
                reason: String::new(),
            },
            Control::Header {
                kind: 0xabcd_0102,
                total: (5 << 32) | 9,
            },
        ] {
            let Payload::Bytes(b) = c.encode() else {
                panic!("control messages are bytes");
            };
            assert_eq!(Control::decode(&b), Ok(c));
        }
        assert!(Control::decode(&[]).is_err());
        assert!(Control::decode(&[2, 0, 0]).is_err());
        assert!(Control::decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn frames_carry_kind_and_total() {
        let (None, body) = frame(vec![1.0f32, 2.0], 0xabcd, (5usize << 32) | 9) else {
            panic!("small frames are one f32 message");
        };
        assert_eq!(body.byte_len(), 4 * (2 + <f32 as Elem>::TRAILER));
        let Unframed::Frame { data, kind, total } = f32::unframe(body) else {
            panic!("an f32 frame");
        };
        assert_eq!((data, kind, total), (vec![1.0, 2.0], 0xabcd, (5 << 32) | 9));
        // A large full buffer is not reallocated: it goes raw after a header.
        let big = vec![0u16; INLINE_MAX];
        let ptr = big.as_ptr();
        let (Some(Payload::Bytes(h)), Payload::Bf16(v)) = frame(big, 7, INLINE_MAX) else {
            panic!("large full frames are a header and the raw data");
        };
        assert_eq!((v.as_ptr(), v.len()), (ptr, INLINE_MAX));
        let header = Control::Header {
            kind: 7,
            total: INLINE_MAX as u64,
        };
        assert_eq!(Control::decode(&h), Ok(header));
    }
}

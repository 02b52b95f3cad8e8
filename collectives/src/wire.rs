//! The wire format of collective messages: data frames with their trailer, control messages,
//! and the operation kinds that frames carry.

use flotilla_runtime::fabric::{Payload, Rank};

/// Kinds of operation, carried in every data frame.
pub(crate) mod kind {
    pub const RING_ALL_REDUCE: u32 = 1;
    pub const TREE_ALL_REDUCE: u32 = 2;
    pub const REDUCE_SCATTER: u32 = 3;
    pub const ALL_GATHER: u32 = 4;
    pub const BROADCAST: u32 = 5;
    pub const ALL_TO_ALL_V: u32 = 6;
    pub const BARRIER: u32 = 7;

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
            other => format!("unknown operation {other}"),
        }
    }
}

/// A control message: a peer is stuck, or a peer aborts the operation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Control {
    Stuck {
        waiting_on: Rank,
    },
    Abort {
        culprit: Option<Rank>,
        reason: String,
    },
}

impl Control {
    pub(crate) fn encode(&self) -> Payload {
        let (code, rank, text) = match self {
            Control::Stuck { waiting_on } => (1u8, *waiting_on as u64, ""),
            Control::Abort { culprit, reason } => {
                (2u8, culprit.map_or(u64::MAX, |r| r as u64), reason.as_str())
            }
        };
        let mut b = Vec::with_capacity(9 + text.len());
        b.push(code);
        b.extend_from_slice(&rank.to_le_bytes());
        b.extend_from_slice(text.as_bytes());
        Payload::Bytes(b)
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Self, String> {
        let (code, rest) = b.split_first().ok_or("empty control message")?;
        let raw: [u8; 8] = rest
            .get(..8)
            .and_then(|s| s.try_into().ok())
            .ok_or("truncated control message")?;
        let rank = u64::from_le_bytes(raw);
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

pub(crate) const TRAILER: usize = 3;

/// A data frame: the payload followed by the kind and the sender's total length.
pub(crate) fn frame(mut data: Vec<f32>, kind: u32, total: usize) -> Payload {
    let total = total as u64;
    data.extend_from_slice(&[
        f32::from_bits(kind),
        f32::from_bits(total as u32),
        f32::from_bits((total >> 32) as u32),
    ]);
    Payload::F32(data)
}

/// An owned copy of `s` with room for the frame trailer (so framing does not reallocate).
pub(crate) fn owned(s: &[f32]) -> Vec<f32> {
    let mut v = Vec::with_capacity(s.len() + TRAILER);
    v.extend_from_slice(s);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let Payload::F32(v) = frame(vec![1.0, 2.0], 0xabcd, (5usize << 32) | 9) else {
            panic!("frames are f32");
        };
        assert_eq!(v.len(), 2 + TRAILER);
        assert_eq!(v[2].to_bits(), 0xabcd);
        assert_eq!(v[3].to_bits(), 9);
        assert_eq!(v[4].to_bits(), 5);
    }
}

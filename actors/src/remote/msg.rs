//! The control plane's messages between the controller, the node agents and the rank
//! processes, and the blobs that ride with some of them (a snapshot, the parameters).
//!
//! Every message is encoded by `runtime`'s codec and decoded with its size limit
//! ([`flotilla_runtime::control`]); a blob is checked by its own decoder here (a snapshot by the
//! checkpoint format's, which verifies its checksums). Messages that belong to an attempt carry
//! it, and a receiver drops one of another attempt, so nothing from before a roll-back is taken
//! after it.

use serde::{Deserialize, Serialize};

use crate::store::StepStats;
use crate::stream::Span;

/// What a process says first on its link to the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Hello {
    /// A node agent: its index among the job's agents (`0..hosts + spares`; agents at
    /// `hosts..` start as spares), its pid and host name, and the job's config hash.
    Agent {
        index: usize,
        pid: u32,
        hostname: String,
        config_hash: String,
    },
    /// A rank process, started by agent `agent`.
    Rank {
        rank: usize,
        agent: usize,
        pid: u32,
        config_hash: String,
    },
}

/// Agent or rank process → controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Up {
    Hello(Hello),
    /// An agent is alive (every `supervision.heartbeat_ms`).
    Heartbeat,
    /// An agent started a rank process.
    RankStarted {
        rank: usize,
        pid: u32,
    },
    /// A rank process of an agent exited (seen by the agent at once): its exit status.
    RankExited {
        rank: usize,
        pid: u32,
        status: String,
    },
    /// A rank process bound its fabric endpoint for `attempt` on `port` (the controller pairs
    /// it with the address it sees the rank's link come from).
    Bound {
        attempt: u64,
        port: u16,
    },
    /// A rank process joined the mesh of `attempt` and started its actors.
    Ready {
        attempt: u64,
    },
    /// A rank process could not get ready for `attempt`.
    NotReady {
        attempt: u64,
        why: String,
    },
    /// A supervision event of a rank process's tree (for `events.jsonl`).
    Event {
        supervisor: String,
        child: String,
        event: String,
    },
    /// The answer to request `id` (the blob: a snapshot's or the parameters' bytes).
    Reply {
        id: u64,
        reply: Reply,
    },
}

/// Controller → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToAgent {
    /// Run and supervise these ranks (an agent that was a spare becomes host `host`).
    Assign { host: usize, ranks: Vec<usize> },
    /// Rank process `pid` of rank `rank` is hung (it answers nothing): kill it, and start the
    /// rank again as after any exit.
    Kill { rank: usize, pid: u32 },
    /// The job is over: stop the rank processes and exit.
    Stop,
}

/// Controller → rank process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToRank {
    /// Stop the actors of any earlier attempt and bind a fresh fabric endpoint for `attempt`.
    Prepare { attempt: u64 },
    /// Every rank's fabric address for `attempt`, in rank order: join the mesh, start the
    /// rank's actors.
    Peers { attempt: u64, addrs: Vec<String> },
    /// A peer failed in `attempt`: waits on it fail now.
    PeerFailed {
        attempt: u64,
        rank: usize,
        why: String,
    },
    /// A question for the rank actor (the blob: a snapshot to restore).
    Request { id: u64, request: Request },
    /// The job is over: exit.
    Stop,
}

/// What the controller asks a rank actor (the remote form of [`crate::rank::RankMsg`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Step {
        attempt: u64,
    },
    Snapshot,
    /// Restore the snapshot in the blob and go on as `attempt`.
    Restore {
        attempt: u64,
    },
    CanonicalParams,
    Trace,
}

/// A rank actor's answer (the blob holds a snapshot or the parameters where the answer is one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Step(Result<StepStats, String>),
    /// `Ok`: the snapshot is the blob, in the checkpoint shard format.
    Snapshot(Result<(), String>),
    Restore(Result<(), String>),
    /// `Ok`: the tensors are the blob ([`encode_tensors`]).
    Params(Result<(), String>),
    Trace(Result<Vec<WireSpan>, String>),
}

/// A [`Span`] on the wire (its name as a string).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireSpan {
    pub what: String,
    pub chunk: usize,
    pub stage: Option<usize>,
    pub start: f64,
    pub end: f64,
}

impl From<&Span> for WireSpan {
    fn from(s: &Span) -> Self {
        Self {
            what: s.what.to_owned(),
            chunk: s.chunk,
            stage: s.stage,
            start: s.start,
            end: s.end,
        }
    }
}

/// The names a span may carry (the stream's job kinds); any other is shown as "remote".
const SPAN_NAMES: &[&str] = &[
    "step",
    "gradients",
    "forward",
    "B",
    "W",
    "experts",
    "experts B",
];

impl WireSpan {
    pub fn into_span(self) -> Span {
        let what = SPAN_NAMES
            .iter()
            .find(|n| **n == self.what)
            .copied()
            .unwrap_or("remote");
        Span {
            what,
            chunk: self.chunk,
            stage: self.stage,
            start: self.start,
            end: self.end,
        }
    }
}

/// Named f32 tensors as bytes: the tensor count (u64 LE), then per tensor the name's length
/// (u32 LE), the name, the value count (u64 LE), the values (f32 LE).
pub fn encode_tensors(t: &[(String, Vec<f32>)]) -> Vec<u8> {
    let n: usize = t.iter().map(|(k, v)| 12 + k.len() + 4 * v.len()).sum();
    let mut out = Vec::with_capacity(8 + n);
    out.extend_from_slice(&(t.len() as u64).to_le_bytes());
    for (name, vals) in t {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(vals.len() as u64).to_le_bytes());
        for v in vals {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Parse [`encode_tensors`]; anything malformed is an error naming where.
pub fn decode_tensors(mut b: &[u8]) -> Result<Vec<(String, Vec<f32>)>, String> {
    let (count, rest) = b
        .split_first_chunk::<8>()
        .ok_or_else(|| "truncated tensor count".to_owned())?;
    let count = u64::from_le_bytes(*count);
    b = rest;
    let mut out = Vec::new();
    for at in 0..count {
        let take = |b: &mut &[u8], n: usize, what: &str| -> Result<Vec<u8>, String> {
            if b.len() < n {
                return Err(format!("tensor {at}: truncated {what}"));
            }
            let (h, t) = b.split_at(n);
            *b = t;
            Ok(h.to_vec())
        };
        let len = take(&mut b, 4, "name length")?;
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let name = String::from_utf8(take(&mut b, len, "name")?)
            .map_err(|_| format!("tensor {at}: the name is not UTF-8"))?;
        let n = take(&mut b, 8, "value count")?;
        let mut c = [0u8; 8];
        c.copy_from_slice(&n);
        let n = usize::try_from(u64::from_le_bytes(c))
            .ok()
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| format!("tensor {at} ({name}): value count out of range"))?;
        let vals = take(&mut b, n, "values")?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push((name, vals));
    }
    if !b.is_empty() {
        return Err(format!(
            "{} bytes after the last of {count} tensors",
            b.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_runtime::codec::{self, MAX_CONTROL_BYTES};
    use proptest::prelude::*;

    #[test]
    fn tensors_round_trip_and_truncation_is_an_error() {
        let t = vec![
            ("a.weight".to_string(), vec![1.0, -2.5, f32::MIN_POSITIVE]),
            ("b".to_string(), vec![]),
        ];
        let b = encode_tensors(&t);
        assert_eq!(decode_tensors(&b).expect("decode"), t);
        for cut in 1..b.len() {
            assert!(decode_tensors(&b[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn messages_round_trip_through_the_codec() {
        let msgs = vec![
            Up::Hello(Hello::Rank {
                rank: 3,
                agent: 1,
                pid: 42,
                config_hash: "ab".into(),
            }),
            Up::Reply {
                id: 7,
                reply: Reply::Trace(Ok(vec![WireSpan {
                    what: "F".into(),
                    chunk: 1,
                    stage: Some(0),
                    start: 0.5,
                    end: 1.0,
                }])),
            },
            Up::Reply {
                id: 8,
                reply: Reply::Step(Err("boom".into())),
            },
        ];
        for m in msgs {
            let b = codec::encode(&m).expect("encode");
            let back: Up = codec::decode(&b, MAX_CONTROL_BYTES).expect("decode");
            assert_eq!(back, m);
        }
        let r = ToRank::Peers {
            attempt: 2,
            addrs: vec!["127.0.0.1:5".into()],
        };
        let b = codec::encode(&r).expect("encode");
        assert_eq!(
            codec::decode::<ToRank>(&b, MAX_CONTROL_BYTES).expect("decode"),
            r
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Bounded fuzzing of the control-message decoders and the tensor blob's: any bytes
        /// are a message or an error, never a panic or an allocation past the limit.
        #[test]
        fn any_bytes_decode_to_a_message_or_an_error(
            bytes in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            let _ = codec::decode::<Up>(&bytes, MAX_CONTROL_BYTES);
            let _ = codec::decode::<ToRank>(&bytes, MAX_CONTROL_BYTES);
            let _ = codec::decode::<ToAgent>(&bytes, MAX_CONTROL_BYTES);
            let _ = decode_tensors(&bytes);
        }

        /// Valid messages with bytes flipped decode to something or fail cleanly.
        #[test]
        fn corrupted_messages_fail_cleanly(flip in 0usize..64, val in any::<u8>(), step in any::<u64>()) {
            let m = Up::Reply { id: step, reply: Reply::Step(Err("x".repeat(40))) };
            let mut b = codec::encode(&m).expect("encode");
            let i = flip % b.len();
            b[i] = val;
            let _ = codec::decode::<Up>(&b, MAX_CONTROL_BYTES);
        }
    }
}

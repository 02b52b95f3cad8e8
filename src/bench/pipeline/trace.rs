//! `--trace`: the last timed step of the DualPipe run on the modelled link, as a Chrome trace
//! (Perfetto, chrome://tracing) and as a profile record per rank.
//!
//! Each rank is a process with two threads: its compute stream (every job it ran: forward, B
//! and W phases, the experts' work, the gradient all-reduce, the step's own work) and its
//! egress port (each all-to-all message on the wire, from the moment the port took it until it
//! left; `in flight` to its arrival). The stream's times count from the rank's start of the
//! step, the port's from the driver's request for it; the two differ by the time the request
//! took to reach the rank (microseconds).

use std::time::Instant;

use flotilla_actors::stream::Span;
use serde_json::{Value, json};

use super::link::Wire;

/// The Chrome trace of `spans` (by rank) and `wires`, the step having been asked for at `t0`.
pub fn chrome(spans: &[Vec<Span>], wires: &[Wire], t0: Instant) -> Value {
    let us = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e6;
    let mut events = Vec::new();
    for (rank, ss) in spans.iter().enumerate() {
        events.push(json!({"name": "process_name", "ph": "M", "pid": rank,
                           "args": {"name": format!("rank {rank}")}}));
        events.push(
            json!({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0,
                           "args": {"name": "compute stream"}}),
        );
        events.push(
            json!({"name": "thread_name", "ph": "M", "pid": rank, "tid": 1,
                           "args": {"name": "egress port"}}),
        );
        for s in ss {
            events.push(json!({
                "name": format!("{} {}", s.what, s.chunk), "cat": s.what, "ph": "X",
                "pid": rank, "tid": 0, "ts": s.start * 1e6,
                "dur": (s.end - s.start).max(0.0) * 1e6,
                "args": {"chunk": s.chunk, "stage": s.stage},
            }));
        }
    }
    for w in wires {
        events.push(json!({
            "name": format!("to {}", w.dst), "cat": "wire", "ph": "X", "pid": w.src, "tid": 1,
            "ts": us(w.start), "dur": (us(w.left) - us(w.start)).max(0.0),
            "args": {"bytes": w.bytes, "dst": w.dst, "tag": w.tag,
                     "queued_us": us(w.start) - us(w.posted)},
        }));
        events.push(json!({
            "name": format!("from {}", w.src), "cat": "in flight", "ph": "X", "pid": w.dst,
            "tid": 1, "ts": us(w.left), "dur": (us(w.due) - us(w.left)).max(0.0),
            "args": {"bytes": w.bytes, "src": w.src},
        }));
    }
    json!({ "traceEvents": events })
}

/// A `pipeline_profile` record per rank: how its step divides into compute (by kind of job)
/// and idle, and what its port sent.
pub fn summary(spans: &[Vec<Span>], wires: &[Wire]) -> Vec<Value> {
    spans
        .iter()
        .enumerate()
        .map(|(rank, ss)| {
            let step_s = ss.iter().map(|s| s.end).fold(0.0, f64::max);
            let busy = |what: &[&str]| -> f64 {
                ss.iter()
                    .filter(|s| what.is_empty() || what.contains(&s.what))
                    .map(|s| s.end - s.start)
                    .sum()
            };
            let compute_s = busy(&[]);
            let sent: Vec<&Wire> = wires.iter().filter(|w| w.src == rank).collect();
            json!({
                "bench": "pipeline_profile", "rank": rank, "step_s": step_s,
                "compute_s": compute_s, "idle_s": (step_s - compute_s).max(0.0),
                "forward_s": busy(&["forward"]), "backward_s": busy(&["B"]),
                "weight_s": busy(&["W"]), "experts_s": busy(&["experts", "experts B"]),
                "gradients_s": busy(&["gradients"]), "step_work_s": busy(&["step"]),
                "jobs": ss.len(),
                "all_to_all_messages_sent": sent.len(),
                "all_to_all_bytes_sent": sent.iter().map(|w| w.bytes).sum::<u64>(),
            })
        })
        .collect()
}

//! `--trace`: one step of a run on the modelled link, as a Chrome trace (open it in Perfetto or
//! chrome://tracing) and as a summary of where each rank's core stood idle.
//!
//! Every rank is a process in the trace; its executor streams are threads (compute: the baton
//! held, labelled with the piece; waits: for an all-to-all, a pipeline message, or another
//! stream), and its egress port is one more thread, with every modelled message on it.
//!
//! The summary splits a rank's step into compute (the baton held) and idle, and says what the
//! streams waited for while the core stood idle (several at once count in each). Every wait for
//! an all-to-all message is split by the message's life: before the peer posted it (the peer
//! was late: the all-to-all is a rendezvous), on the link (queued behind the port's earlier
//! messages, on the wire, in flight) and after it was due (delivery and wake-up).

use std::time::Instant;

use flotilla_actors::pipeline::profile::{Activity, Event};
use flotilla_actors::schedule::Op;
use serde_json::{Value, json};

use super::link::Wire;

/// One rank's last step: when it began (after the barrier), how long it took, its events.
#[derive(Debug, Clone)]
pub struct RankStep {
    pub start: Instant,
    pub step_s: f64,
    pub events: Vec<Event>,
}

fn secs(t: Instant, origin: Instant) -> f64 {
    t.saturating_duration_since(origin).as_secs_f64()
}

fn piece_name(e: &Event) -> String {
    match e.piece {
        Some((op, c, s)) => {
            let op = match op {
                Op::F => "F",
                Op::B => "B",
                Op::W => "W",
            };
            format!("{op} chunk {c} stage {s}")
        }
        None => "-".into(),
    }
}

fn activity_name(a: Activity) -> &'static str {
    match a {
        Activity::Compute => "compute",
        Activity::Exchange => "wait all-to-all",
        Activity::Pipe => "wait pipeline",
        Activity::Local => "wait stream",
    }
}

/// The egress port's thread id in the trace (streams are 0..4).
const PORT_TID: usize = 9;

/// The Chrome trace of `ranks` and the link's `wires`, times in µs from the earliest step start.
pub fn chrome(ranks: &[RankStep], wires: &[Wire]) -> Value {
    let Some(origin) = ranks.iter().map(|r| r.start).min() else {
        return json!({"traceEvents": []});
    };
    let us = |t: Instant| secs(t, origin) * 1e6;
    let mut ev = Vec::new();
    for (r, step) in ranks.iter().enumerate() {
        ev.push(json!({"ph": "M", "name": "process_name", "pid": r, "args": {"name": format!("rank {r}")}}));
        ev.push(json!({"ph": "M", "name": "thread_name", "pid": r, "tid": PORT_TID, "args": {"name": "egress port"}}));
        for e in &step.events {
            let name = match e.activity {
                Activity::Compute => piece_name(e),
                a => format!("{} ({})", activity_name(a), piece_name(e)),
            };
            ev.push(json!({
                "ph": "X", "name": name, "cat": activity_name(e.activity),
                "pid": r, "tid": e.lane, "ts": us(e.start), "dur": us(e.end) - us(e.start),
                "args": {"tag": format!("{:#x}", e.tag)},
            }));
        }
    }
    for w in wires {
        ev.push(json!({
            "ph": "X", "name": format!("to rank {}", w.dst), "cat": "wire",
            "pid": w.src, "tid": PORT_TID, "ts": us(w.start), "dur": us(w.left) - us(w.start),
            "args": {"bytes": w.bytes, "tag": format!("{:#x}", w.tag),
                     "posted_us": us(w.posted), "due_us": us(w.due)},
        }));
    }
    json!({"traceEvents": ev, "displayTimeUnit": "ms"})
}

/// Sum of the lengths of `[a, b)` intervals after merging overlaps.
fn union_len(mut iv: Vec<(f64, f64)>) -> f64 {
    iv.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut total = 0.0;
    let mut cur: Option<(f64, f64)> = None;
    for (a, b) in iv {
        match cur {
            Some((ca, cb)) if a <= cb => cur = Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                total += cb - ca;
                cur = Some((a, b));
            }
            None => cur = Some((a, b)),
        }
    }
    total + cur.map_or(0.0, |(a, b)| b - a)
}

/// Length of `iv`'s union that lies outside every interval of `busy` (both unsorted).
fn outside(iv: &[(f64, f64)], busy: &[(f64, f64)]) -> f64 {
    let both: Vec<(f64, f64)> = iv.iter().chain(busy).copied().collect();
    union_len(both) - union_len(busy.to_vec())
}

/// Per rank: compute, idle, what the idle core waited for, and the all-to-all waits by cause.
pub fn summary(ranks: &[RankStep], wires: &[Wire]) -> Vec<Value> {
    let Some(origin) = ranks.iter().map(|r| r.start).min() else {
        return Vec::new();
    };
    ranks
        .iter()
        .enumerate()
        .map(|(r, step)| {
            let iv = |a: Activity| -> Vec<(f64, f64)> {
                step.events
                    .iter()
                    .filter(|e| e.activity == a)
                    .map(|e| (secs(e.start, origin), secs(e.end, origin)))
                    .collect()
            };
            let compute = iv(Activity::Compute);
            let compute_s = union_len(compute.clone());
            let (mut peer_late, mut on_link, mut after_due, mut waits) = (0.0, 0.0, 0.0, 0);
            for e in step
                .events
                .iter()
                .filter(|e| e.activity == Activity::Exchange)
            {
                let mine = || wires.iter().filter(|w| w.dst == r && w.tag == e.tag);
                let Some(w) = mine()
                    .filter(|w| w.due <= e.end)
                    .max_by_key(|w| w.due)
                    .or_else(|| mine().min_by_key(|w| w.due))
                else {
                    continue;
                };
                waits += 1;
                let (s, t) = (secs(e.start, origin), secs(e.end, origin));
                let (posted, due) = (secs(w.posted, origin), secs(w.due, origin));
                peer_late += (posted.min(t) - s).max(0.0);
                on_link += (due.min(t) - posted.max(s)).max(0.0);
                after_due += (t - due.max(s)).max(0.0);
            }
            let egress: Vec<(f64, f64)> = wires
                .iter()
                .filter(|w| w.src == r)
                .map(|w| (secs(w.start, origin), secs(w.left, origin)))
                .collect();
            json!({
                "bench": "pipeline_profile", "rank": r, "step_s": step.step_s,
                "compute_s": compute_s, "idle_s": step.step_s - compute_s,
                "idle_waiting_all_to_all_s": outside(&iv(Activity::Exchange), &compute),
                "idle_waiting_pipeline_s": outside(&iv(Activity::Pipe), &compute),
                "idle_waiting_stream_s": outside(&iv(Activity::Local), &compute),
                "all_to_all_waits": waits,
                "all_to_all_wait_peer_late_s": peer_late,
                "all_to_all_wait_on_link_s": on_link,
                "all_to_all_wait_after_due_s": after_due,
                "egress_busy_s": union_len(egress),
                "events": step.events.len(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_merges_overlaps_and_outside_subtracts_busy_time() {
        assert!((union_len(vec![(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) - 4.0).abs() < 1e-12);
        assert_eq!(union_len(Vec::new()), 0.0);
        let waits = [(0.0, 4.0), (3.0, 6.0)];
        let busy = [(1.0, 2.0), (5.0, 7.0)];
        // Waits cover [0, 6); busy covers [1, 2) and [5, 6) of it.
        assert!((outside(&waits, &busy) - 4.0).abs() < 1e-12);
    }
}

//! How the actors of one rank find each other and share what the rank's device and schedule
//! make common: the compute stream, the activation room, the order of forwards.
//!
//! Every actor of the rank writes its own reference here when it starts, so a restarted actor
//! is found again by its siblings; the rank actor puts the stream here (it owns the device).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use ractor::ActorRef;

use crate::expert_shard::ShardMsg;
use crate::rank::RankMsg;
use crate::stage::StageMsg;
use crate::stream::Stream;

/// The rank's forwards: they start in the order of the rank's action list, and only while the
/// rank holds fewer activations than the schedule's peak (so that a step never needs more
/// activation memory than its schedule says, and the earliest forward is never starved by a
/// later one).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    /// Ordinal (among the rank's forwards) of the next forward allowed to start.
    pub f_next: usize,
    /// Micro-batches whose activations the rank holds (a forward started, its B not done).
    pub live: usize,
    /// The schedule's peak.
    pub cap: usize,
}

impl Gate {
    /// Whether the forward of ordinal `k` may start now; if so, it has.
    pub fn try_start(&mut self, k: usize) -> bool {
        let ok = self.f_next == k && self.live < self.cap;
        if ok {
            self.f_next += 1;
            self.live += 1;
        }
        ok
    }

    /// A B finished: its activations are freed.
    pub fn release(&mut self) {
        self.live = self.live.saturating_sub(1);
    }
}

/// The directory of one rank's actors (see the module documentation).
#[derive(Debug)]
pub struct RankLinks {
    pub rank: usize,
    stream: Mutex<Option<Stream>>,
    rank_actor: Mutex<Option<ActorRef<RankMsg>>>,
    shard: Mutex<Option<ActorRef<ShardMsg>>>,
    stages: Mutex<BTreeMap<usize, ActorRef<StageMsg>>>,
    gate: Mutex<Gate>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RankLinks {
    pub fn new(rank: usize) -> RankLinks {
        RankLinks {
            rank,
            stream: Mutex::new(None),
            rank_actor: Mutex::new(None),
            shard: Mutex::new(None),
            stages: Mutex::new(BTreeMap::new()),
            gate: Mutex::new(Gate::default()),
        }
    }

    pub fn set_stream(&self, s: Option<Stream>) {
        *lock(&self.stream) = s;
    }

    /// The rank's compute stream (`None` while the rank actor is not running).
    pub fn stream(&self) -> Option<Stream> {
        lock(&self.stream).clone()
    }

    pub fn set_rank_actor(&self, a: ActorRef<RankMsg>) {
        *lock(&self.rank_actor) = Some(a);
    }

    pub fn rank_actor(&self) -> Option<ActorRef<RankMsg>> {
        lock(&self.rank_actor).clone()
    }

    pub fn set_shard(&self, a: ActorRef<ShardMsg>) {
        *lock(&self.shard) = Some(a);
    }

    pub fn shard(&self) -> Option<ActorRef<ShardMsg>> {
        lock(&self.shard).clone()
    }

    pub fn set_stage(&self, stage: usize, a: ActorRef<StageMsg>) {
        lock(&self.stages).insert(stage, a);
    }

    /// The stage actors, by stage.
    pub fn stages(&self) -> BTreeMap<usize, ActorRef<StageMsg>> {
        lock(&self.stages).clone()
    }

    /// The forward gate, locked.
    pub fn gate(&self) -> MutexGuard<'_, Gate> {
        lock(&self.gate)
    }

    /// Tell every stage actor but `but` that the gate changed.
    pub fn gate_changed(&self, but: usize) {
        for (s, a) in self.stages() {
            if s != but {
                let _ = a.cast(StageMsg::Room);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_start_in_order_within_the_room() {
        let mut g = Gate {
            cap: 2,
            ..Gate::default()
        };
        assert!(!g.try_start(1), "not before forward 0");
        assert!(g.try_start(0) && g.try_start(1));
        assert!(!g.try_start(2), "the room is full");
        g.release();
        assert!(g.try_start(2));
        assert_eq!(g.live, 2);
    }
}

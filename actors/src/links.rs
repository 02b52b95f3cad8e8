//! How the actors of one rank find each other and share what the rank's device and schedule
//! make common: the compute stream, the activation room, the order of forwards, and the outputs
//! held until their action ends.
//!
//! Every actor of the rank writes its own reference here when it starts, so a restarted actor
//! is found again by its siblings; the rank actor puts the stream here (it owns the device).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use ractor::ActorRef;

use flotilla_runtime::config::StartOrder;

use crate::expert_shard::ShardMsg;
use crate::rank::RankMsg;
use crate::schedule::Op;
use crate::stage::StageMsg;
use crate::stream::Stream;

/// When the units of the rank's action list may start. A forward starts in the list's order
/// of forwards and only while the rank holds fewer activations than the schedule's peak (so a
/// step never needs more activation memory than its schedule says); a W only once every unit
/// before it in the list has started (so a W never takes the device from work the list puts
/// first). A B starts as `parallel.start_order` says: with `list`, once every unit before it
/// has started, so the step follows the schedule's own timeline exactly (the simulated
/// device shows it: `sims/tests/timeline.rs`); with `ready` (the default), as soon as its
/// gradient is in, so that a real device does not idle for a late activation while a
/// gradient waits (`flotilla bench pipeline`: DualPipe's step over max(compute, comm) 1.06
/// with `ready`, 1.18 with B's in list order, on 2 cores). Once started, the phases of several
/// actions interleave on the stream (the overlap).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Gate {
    /// Per action of the rank's list, its units not started yet.
    pub unstarted: Vec<usize>,
    /// Per action, its forwards not started yet.
    pub f_unstarted: Vec<usize>,
    /// The first action with a unit not started.
    pub next: usize,
    /// The first action with a forward not started.
    pub f_next: usize,
    /// Micro-batches whose activations the rank holds (a forward started, its B not done).
    pub live: usize,
    /// The most `live` has been this step.
    pub peak: usize,
    /// The schedule's peak.
    pub cap: usize,
    /// When a B may start.
    pub order: StartOrder,
}

impl Gate {
    /// The gate of a step whose list has actions of `units` units each, `forwards` of them
    /// forwards, at most `cap` activations held.
    pub fn new(units: Vec<usize>, forwards: Vec<usize>, cap: usize, order: StartOrder) -> Gate {
        let mut g = Gate {
            unstarted: units,
            f_unstarted: forwards,
            next: 0,
            f_next: 0,
            live: 0,
            peak: 0,
            cap,
            order,
        };
        g.advance();
        g
    }

    /// Whether a unit `op` of the action at `pos` may start now; if so, it has.
    pub fn try_start(&mut self, pos: usize, op: Op) -> bool {
        let ordered = match op {
            Op::W => pos == self.next,
            Op::F => pos == self.f_next,
            Op::B => self.order == StartOrder::Ready || pos == self.next,
        };
        if !ordered || (op == Op::F && self.live >= self.cap) {
            return false;
        }
        if let Some(n) = self.unstarted.get_mut(pos) {
            *n = n.saturating_sub(1);
        }
        if op == Op::F {
            if let Some(n) = self.f_unstarted.get_mut(pos) {
                *n = n.saturating_sub(1);
            }
            self.live += 1;
            self.peak = self.peak.max(self.live);
        }
        self.advance();
        true
    }

    fn advance(&mut self) {
        while self.unstarted.get(self.next) == Some(&0) {
            self.next += 1;
        }
        while self.f_unstarted.get(self.f_next) == Some(&0) {
            self.f_next += 1;
        }
    }

    /// A B finished: its activations are freed.
    pub fn release(&mut self) {
        self.live = self.live.saturating_sub(1);
    }
}

/// A send held until its action ends.
pub type HeldSend = Box<dyn FnOnce() + Send>;

/// The outputs of the rank's multi-unit actions: a full backward (`BW`: B then W) and an
/// overlapped pair (`FB`: F of one stage, B and W of another) hand their outputs on only when
/// the whole action has ended, as the schedule's timeline counts them (`schedule/timeline.rs`)
/// and as autograd would run a full backward. The units of a pair belong to two stage actors,
/// so the count is the rank's.
#[derive(Default)]
pub struct Outputs {
    /// By (attempt, step, action index): units not done yet, and the sends held.
    open: BTreeMap<(u64, u64, u64), (usize, Vec<HeldSend>)>,
}

impl std::fmt::Debug for Outputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outputs({} actions open)", self.open.len())
    }
}

impl Outputs {
    /// A unit of the action at `pos` (of `units` units) of step `(attempt, step)` ended, with
    /// `send` to do once its action has: the sends to do now (none while the action is open).
    pub fn unit_done(
        &mut self,
        (attempt, step, pos): (u64, u64, u64),
        units: usize,
        send: Option<HeldSend>,
    ) -> Vec<HeldSend> {
        if units <= 1 {
            return send.into_iter().collect();
        }
        // Actions of an older step or attempt will never end (a roll-back came): dropped.
        self.open.retain(|k, _| (k.0, k.1) >= (attempt, step));
        let e = self
            .open
            .entry((attempt, step, pos))
            .or_insert_with(|| (units, Vec::new()));
        e.0 -= 1;
        e.1.extend(send);
        if e.0 > 0 {
            return Vec::new();
        }
        self.open
            .remove(&(attempt, step, pos))
            .map(|(_, v)| v)
            .unwrap_or_default()
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
    outputs: Mutex<Outputs>,
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
            outputs: Mutex::new(Outputs::default()),
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

    /// The outputs held for their actions, locked.
    pub fn outputs(&self) -> MutexGuard<'_, Outputs> {
        lock(&self.outputs)
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
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn an_actions_outputs_leave_when_its_last_unit_ends() {
        let sent = Arc::new(AtomicUsize::new(0));
        let send = || -> HeldSend {
            let sent = Arc::clone(&sent);
            Box::new(move || {
                sent.fetch_add(1, Ordering::SeqCst);
            })
        };
        let mut o = Outputs::default();
        assert_eq!(
            o.unit_done((0, 0, 5), 1, Some(send())).len(),
            1,
            "a lone unit"
        );
        // An FB pair: F's activation, then B's gradient, then W.
        assert!(o.unit_done((0, 0, 7), 3, Some(send())).is_empty());
        assert!(o.unit_done((0, 0, 7), 3, Some(send())).is_empty());
        let out = o.unit_done((0, 0, 7), 3, None);
        assert_eq!(out.len(), 2);
        out.into_iter().for_each(|f| f());
        assert_eq!(sent.load(Ordering::SeqCst), 2);
        // A roll-back: the older attempt's open action is dropped.
        assert!(o.unit_done((0, 1, 2), 2, Some(send())).is_empty());
        assert!(o.unit_done((1, 1, 2), 2, None).is_empty());
        assert_eq!(o.open.len(), 1);
    }

    #[test]
    fn units_start_in_list_order_and_forwards_within_the_room() {
        use Op::{B, F, W};
        // F0 F1 FB(F2, B0, W0) B1 W1 F3. (A W's own B is the stage actor's to wait for.)
        let units = vec![1, 1, 3, 1, 1, 1];
        let forwards = vec![1, 1, 1, 0, 0, 1];
        let mut g = Gate::new(units.clone(), forwards.clone(), 2, StartOrder::List);
        assert!(!g.try_start(1, F), "not before action 0's forward");
        assert!(g.try_start(0, F) && g.try_start(1, F));
        assert!(!g.try_start(2, F), "the room is full");
        assert!(g.try_start(2, B), "the pair's B may go first");
        g.release();
        assert!(
            !g.try_start(3, B),
            "list order: not before the pair's F and W"
        );
        assert!(g.try_start(2, F) && g.try_start(2, W));
        assert!(!g.try_start(4, W), "not before B1");
        assert!(g.try_start(3, B) && g.try_start(4, W));
        assert!(!g.try_start(5, F), "the room is full again");
        assert_eq!((g.next, g.live, g.peak), (5, 2, 2));

        // The same list with B's started as soon as their gradient is in.
        let mut g = Gate::new(units, forwards, 2, StartOrder::Ready);
        assert!(g.try_start(0, F) && g.try_start(1, F));
        assert!(g.try_start(3, B), "B1 goes before the pair");
        g.release();
        assert!(!g.try_start(5, F), "forwards keep the list's order");
        assert!(!g.try_start(4, W), "a W waits for every unit before it");
        assert!(g.try_start(2, F) && g.try_start(2, B) && g.try_start(2, W));
        assert!(g.try_start(4, W));
        assert!(!g.try_start(5, F), "the room is full");
        assert_eq!((g.next, g.live), (5, 2));
    }
}

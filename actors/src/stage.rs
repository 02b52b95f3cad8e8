//! The pipeline stage actor: one per (rank, stage) — DualPipe puts two stages on a rank. It
//! follows its stage's part of the rank's action list: a forward starts when its input
//! activation has arrived (and the rank has room for its activations, forwards in the list's
//! order), a B when its output gradient has, a W after its B. Each runs as phases on the
//! rank's compute stream ([`crate::passes`]); after a phase the actor posts what the phase
//! yielded (a MoE layer's dispatch to the EP group's expert shards, a finished pass's output to
//! the neighbouring stage) and issues whatever phase is ready next: the shared expert while the
//! dispatch travels, another micro-batch's phase while this one waits for its combine. That
//! choice is the whole of the overlap: an F&B pair of DualPipe is two passes whose phases
//! interleave on the stream, as in Figure 4 of the DeepSeek-V3 report.
//!
//! At most `window` of the stage's actions are in progress at once (claimed in list order).
//! Every message is tagged with the job's attempt and the step; those of an older attempt are
//! dropped, those of a later step kept until it starts. A wait on a peer has a deadline: when
//! nothing has happened for `deadline` while the actor waits for peers, the step fails naming
//! what it waited for and from whom. A peer marked failed fails the step at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_model::EpGroup;
use flotilla_runtime::clock::Clock;
use flotilla_runtime::fabric::{Delivery, Fabric, Payload, Rank, TensorMsg};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::faults::FaultPlan;
use crate::links::RankLinks;
use crate::passes::{self, Out};
use crate::pipeline::Placement;
use crate::schedule::Op;
use crate::stream::{Class, Order};
use crate::wire::{Key, Kind, SHARD_CHANNEL, STAGE_CHANNEL};

/// What a stage actor is started with.
#[derive(Clone)]
pub struct StageArgs {
    pub rank: usize,
    pub stage: usize,
    pub placement: Arc<Placement>,
    pub fabric: Arc<dyn Fabric>,
    pub links: Arc<RankLinks>,
    pub clock: Arc<dyn Clock>,
    /// Actions of this stage in progress at once.
    pub window: usize,
    /// How long a wait on peers may last.
    pub deadline: Duration,
    pub faults: Option<Arc<FaultPlan>>,
}

impl std::fmt::Debug for StageArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StageArgs(rank {}, stage {})", self.rank, self.stage)
    }
}

/// A step for the stage actors to run.
#[derive(Debug, Clone)]
pub struct StepPlan {
    pub attempt: u64,
    pub step: u64,
    pub report: UnboundedSender<StageReport>,
}

/// What a stage actor tells its rank about a step.
#[derive(Debug, Clone, PartialEq)]
pub enum StageReport {
    /// Every W of the stage is done: its gradients are final for this step.
    WeightsDone { stage: usize },
    /// Every action of the stage is done.
    Done { stage: usize },
    /// The stage's step failed.
    Failed { stage: usize, why: String },
}

/// Messages to a stage actor.
#[derive(Debug)]
pub enum StageMsg {
    /// Run a step.
    Run(StepPlan),
    /// Drop the step in progress and everything received for it; go on with `attempt`.
    Abort { attempt: u64 },
    /// Something from the fabric.
    Net(Delivery),
    /// A job of unit `unit` of run `run_id` finished.
    Done {
        run_id: u64,
        unit: usize,
        out: Result<Option<Out>, String>,
    },
    /// Sending failed.
    SendFailed { run_id: u64, why: String },
    /// The rank's forward gate changed.
    Room,
    /// Time to check the deadline of run `run_id`.
    Watch { run_id: u64 },
}

/// One action of the stage's list.
#[derive(Debug, Clone, Copy)]
struct Unit {
    op: Op,
    chunk: usize,
    /// Index of its action in the rank's list.
    pos: u64,
    /// A W's ordinal among the rank's W's.
    w: u32,
    /// Units of its action (on this stage or another of the rank): 3 for an F&B pair, 2 for
    /// a full backward, else 1. The action's outputs leave when the last of them ends.
    of: usize,
}

/// Where a unit is in the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Waiting,
    Busy,
    Await(usize, Kind),
    Done,
}

/// The step in progress.
#[derive(Debug)]
struct Running {
    plan: StepPlan,
    run_id: u64,
    st: Vec<St>,
    /// Units before this one are all done.
    first: usize,
    claimed: usize,
    weights_left: usize,
    last_progress: Instant,
    watching: bool,
}

/// The stage actor's state.
pub struct StageState {
    a: StageArgs,
    units: Vec<Unit>,
    ep: EpGroup,
    /// Global ranks of the EP group, by EP index.
    ep_ranks: Vec<Rank>,
    attempt: u64,
    run_id: u64,
    run: Option<Running>,
    /// What arrived and was not taken yet, by key (a combine holds one part per EP index).
    inbox: HashMap<Key, Vec<Option<(Rank, TensorMsg)>>>,
    /// A peer failed in this attempt (told between steps too): every run fails until the next
    /// attempt, instead of waiting for the dead peer's messages until its deadline.
    peer_failed: Option<String>,
}

/// The stage actor.
#[derive(Debug, Default)]
pub struct StageActor;

/// The stage's units from the rank's list, with their ordinals.
fn units_of(placement: &Placement, rank: usize, stage: usize) -> Vec<Unit> {
    let pp = placement.topo.coord(rank).pp;
    let mut w = 0u32;
    let mut out = Vec::new();
    for (pos, action) in placement.schedule.ranks[pp].iter().enumerate() {
        let units = action.units();
        let of = units.len();
        for u in units {
            if u.stage == stage {
                out.push(Unit {
                    op: u.op,
                    chunk: u.chunk,
                    pos: pos as u64,
                    w,
                    of,
                });
            }
            if u.op == Op::W {
                w += 1;
            }
        }
    }
    out
}

impl Actor for StageActor {
    type Msg = StageMsg;
    type State = StageState;
    type Arguments = StageArgs;

    async fn pre_start(
        &self,
        me: ActorRef<StageMsg>,
        a: StageArgs,
    ) -> Result<StageState, ActorProcessingErr> {
        let mut inbox = a.fabric.subscribe(STAGE_CHANNEL + a.stage as u32)?;
        let pump = me.clone();
        tokio::spawn(async move {
            while let Some(d) = inbox.recv().await {
                if pump.cast(StageMsg::Net(d)).is_err() {
                    break;
                }
            }
        });
        let topo = &a.placement.topo;
        let c = topo.coord(a.rank);
        let ep = EpGroup {
            size: topo.ep,
            index: c.ep,
        };
        let ep_ranks = topo.ep_group(a.rank);
        a.links.set_stage(a.stage, me.clone());
        if let Some(r) = a.links.rank_actor() {
            let _ = r.cast(crate::rank::RankMsg::Restarted(format!(
                "stage {}",
                a.stage
            )));
        }
        Ok(StageState {
            units: units_of(&a.placement, a.rank, a.stage),
            a,
            ep,
            ep_ranks,
            attempt: 0,
            run_id: 0,
            run: None,
            inbox: HashMap::new(),
            peer_failed: None,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<StageMsg>,
        msg: StageMsg,
        s: &mut StageState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            StageMsg::Run(plan) => {
                if let Some(f) = &s.a.faults
                    && f.panics(s.a.rank, s.a.stage, plan.step)
                {
                    panic!(
                        "injected panic in stage {} of rank {} at step {}",
                        s.a.stage, s.a.rank, plan.step
                    );
                }
                s.run_id += 1;
                s.inbox.retain(|k, _| k.attempt == plan.attempt as u8);
                s.run = Some(Running {
                    run_id: s.run_id,
                    st: vec![St::Waiting; s.units.len()],
                    first: 0,
                    claimed: 0,
                    weights_left: s.units.iter().filter(|u| u.op == Op::W).count(),
                    last_progress: s.a.clock.now(),
                    watching: false,
                    plan,
                });
                if let Some(why) = s.peer_failed.clone() {
                    s.fail(why);
                    return Ok(());
                }
            }
            StageMsg::Abort { attempt } => {
                s.attempt = attempt;
                s.run = None;
                s.peer_failed = None;
                s.inbox.clear();
                return Ok(());
            }
            StageMsg::Net(Delivery::Message { src, tag, payload }) => {
                s.receive(src, tag, payload);
            }
            StageMsg::Net(Delivery::PeerFailed { rank, why }) => {
                let why = format!("rank {rank} failed: {why}");
                s.peer_failed.get_or_insert_with(|| why.clone());
                s.fail(why);
            }
            StageMsg::Done { run_id, unit, out } => {
                if s.run.as_ref().is_none_or(|r| r.run_id != run_id) {
                    return Ok(());
                }
                match out {
                    Ok(o) => s.after(&me, unit, o),
                    Err(why) => s.fail(why),
                }
            }
            StageMsg::SendFailed { run_id, why } => {
                if s.run.as_ref().is_some_and(|r| r.run_id == run_id) {
                    s.fail(why);
                }
            }
            StageMsg::Room => {}
            StageMsg::Watch { run_id } => {
                s.watch(&me, run_id);
                return Ok(());
            }
        }
        s.pump(&me);
        Ok(())
    }
}

impl StageState {
    fn now(&self) -> Instant {
        self.a.clock.now()
    }

    /// Keep a message for the unit that will take it.
    fn receive(&mut self, src: Rank, tag: flotilla_runtime::fabric::Tag, payload: Payload) {
        let (Some(key), Ok(msg)) = (Key::of(tag), payload.into_tensor()) else {
            self.fail(format!(
                "a message from rank {src} on the stage channel that is not ours (tag {tag})"
            ));
            return;
        };
        // An older attempt's (a roll-back came since): dropped. Within an attempt every message
        // of a step is taken before the step ends, so what is left is a later step's.
        if key.attempt != self.attempt as u8 {
            return;
        }
        let slots = match key.kind {
            Kind::Combine | Kind::GradCombine => self.ep.size,
            _ => 1,
        };
        let slot = match key.kind {
            Kind::Combine | Kind::GradCombine => self.a.placement.topo.coord(src).ep,
            _ => 0,
        };
        let parts = self.inbox.entry(key).or_insert_with(|| vec![None; slots]);
        match parts.get_mut(slot) {
            Some(p @ None) => *p = Some((src, msg)),
            _ => self.fail(format!("rank {src} sent {key:?} twice")),
        }
        if let Some(r) = &mut self.run {
            r.last_progress = self.a.clock.now();
        }
    }

    /// Take the whole of `key` from the inbox, if every part is in.
    fn take(&mut self, key: &Key) -> Option<Vec<(Rank, TensorMsg)>> {
        if self.inbox.get(key)?.iter().any(Option::is_none) {
            return None;
        }
        self.inbox.remove(key)?.into_iter().collect()
    }

    fn key(&self, chunk: usize, layer: usize, kind: Kind) -> Option<Key> {
        let r = self.run.as_ref()?;
        Some(Key::new(r.plan.attempt, r.plan.step, chunk, layer, kind))
    }

    /// The step failed: report it once and stop.
    fn fail(&mut self, why: String) {
        if let Some(r) = self.run.take() {
            let _ = r.plan.report.send(StageReport::Failed {
                stage: self.a.stage,
                why: format!("stage {} of rank {}: {why}", self.a.stage, self.a.rank),
            });
        }
    }

    /// Start everything that can start.
    fn pump(&mut self, me: &ActorRef<StageMsg>) {
        let Some(r) = self.run.as_mut() else { return };
        while r.st.get(r.first) == Some(&St::Done) {
            r.first += 1;
        }
        let active = r.st[r.first..r.claimed]
            .iter()
            .filter(|s| **s != St::Done)
            .count();
        let room = self.a.window.max(1).saturating_sub(active);
        r.claimed = (r.claimed + room).min(self.units.len());
        for i in r.first..self.units.len() {
            let Some(r) = self.run.as_ref() else { return };
            if i >= r.claimed {
                break;
            }
            match r.st[i] {
                St::Waiting => self.try_start(me, i),
                St::Await(layer, kind) => {
                    let Some(key) = self.key(self.units[i].chunk, layer, kind) else {
                        return;
                    };
                    if let Some(parts) = self.take(&key) {
                        let (c, s) = (self.units[i].chunk, self.a.stage);
                        self.issue(me, i, Class::Compute, move |d| {
                            passes::resume(d, c, s, Some(parts)).map(Some)
                        });
                    }
                }
                St::Busy | St::Done => {}
            }
        }
        let Some(r) = self.run.as_mut() else { return };
        if r.st[r.first..].iter().all(|s| *s == St::Done) {
            let _ = r.plan.report.send(StageReport::Done {
                stage: self.a.stage,
            });
            self.run = None;
            return;
        }
        if !r.watching {
            r.watching = true;
            self.arm(me, self.a.deadline);
        }
    }

    /// Start unit `i` if its inputs are here.
    fn try_start(&mut self, me: &ActorRef<StageMsg>, i: usize) {
        let u = self.units[i];
        let (c, s) = (u.chunk, self.a.stage);
        let last = self.a.placement.specs.len() - 1;
        let done = |op: Op, st: &[St], units: &[Unit]| {
            units
                .iter()
                .zip(st)
                .any(|(v, x)| v.op == op && v.chunk == c && *x == St::Done)
        };
        let Some(r) = self.run.as_ref() else { return };
        match u.op {
            Op::F => {
                let input = if s == 0 {
                    None
                } else {
                    let Some(k) = self.key(c, 0, Kind::Act) else {
                        return;
                    };
                    if !self.inbox.contains_key(&k) {
                        return;
                    }
                    Some(k)
                };
                if !self.start_in_order(u.pos, Op::F) {
                    return;
                }
                let act = input.and_then(|k| self.take(&k)).and_then(|mut v| v.pop());
                let ep = self.ep;
                self.issue(me, i, Class::Compute, move |d| {
                    passes::start_forward(d, c, s, ep, act).map(Some)
                });
            }
            Op::B => {
                if !done(Op::F, &r.st, &self.units) {
                    return;
                }
                let key = if s == last {
                    None
                } else {
                    let Some(k) = self.key(c, 0, Kind::Grad) else {
                        return;
                    };
                    if !self.inbox.contains_key(&k) {
                        return;
                    }
                    Some(k)
                };
                if !self.start_in_order(u.pos, Op::B) {
                    return;
                }
                let grad = key.and_then(|k| self.take(&k)).and_then(|mut v| v.pop());
                self.issue(me, i, Class::Compute, move |d| {
                    passes::start_backward(d, c, s, grad).map(Some)
                });
            }
            Op::W => {
                if !done(Op::B, &r.st, &self.units) || !self.start_in_order(u.pos, Op::W) {
                    return;
                }
                let order = Order {
                    w: Some(u.w),
                    stage: Some(s),
                    ..Order::new(Class::Compute, u.pos, "W", c)
                };
                self.issue_ordered(me, i, order, move |d| {
                    passes::weight(d, c, s).map(|()| None)
                });
            }
        }
    }

    /// Whether a unit of the action at `pos` may start now (see [`crate::links::Gate`]); if so,
    /// it has, and the rank's other stage actors are told.
    fn start_in_order(&self, pos: u64, op: Op) -> bool {
        let started = self
            .a
            .links
            .gate()
            .try_start(usize::try_from(pos).unwrap_or(usize::MAX), op);
        if started {
            self.a.links.gate_changed(self.a.stage);
        }
        started
    }

    /// Issue a job of unit `i` on the stream; its answer comes back as [`StageMsg::Done`].
    fn issue(
        &mut self,
        me: &ActorRef<StageMsg>,
        i: usize,
        class: Class,
        f: impl FnOnce(&mut crate::stream::OnDevice<'_>) -> Result<Option<Out>, String> + Send + 'static,
    ) {
        let u = self.units[i];
        let what = match u.op {
            Op::F => "forward",
            Op::B => "B",
            Op::W => "W",
        };
        let order = Order {
            stage: Some(self.a.stage),
            ..Order::new(class, u.pos, what, u.chunk)
        };
        self.issue_ordered(me, i, order, f);
    }

    fn issue_ordered(
        &mut self,
        me: &ActorRef<StageMsg>,
        i: usize,
        order: Order,
        f: impl FnOnce(&mut crate::stream::OnDevice<'_>) -> Result<Option<Out>, String> + Send + 'static,
    ) {
        let Some(stream) = self.a.links.stream() else {
            self.fail("the rank's device is gone".into());
            return;
        };
        let Some(r) = self.run.as_mut() else { return };
        r.st[i] = St::Busy;
        let (me, run_id) = (me.clone(), r.run_id);
        tokio::spawn(async move {
            let out = stream.run(order, f).await.map_err(|e| e.to_string());
            let out = out.and_then(|r| r);
            let _ = me.cast(StageMsg::Done {
                run_id,
                unit: i,
                out,
            });
        });
    }

    /// Act on what a phase of unit `i` yielded.
    fn after(&mut self, me: &ActorRef<StageMsg>, i: usize, out: Option<Out>) {
        let u = self.units[i];
        let (c, s) = (u.chunk, self.a.stage);
        let now = self.now();
        let Some(r) = self.run.as_mut() else { return };
        r.last_progress = now;
        let action = (r.plan.attempt, r.plan.step, u.pos);
        match out {
            None => {
                r.st[i] = St::Done;
                r.weights_left -= 1;
                if r.weights_left == 0 {
                    let _ = r.plan.report.send(StageReport::WeightsDone { stage: s });
                }
                let ready = self.a.links.outputs().unit_done(action, u.of, None);
                ready.into_iter().for_each(|send| send());
            }
            Some(Out::Post { layer, kind, parts }) => {
                for (p, payload) in parts.into_iter().enumerate() {
                    let Some(key) = self.key(c, layer, kind) else {
                        return;
                    };
                    let dst = self.ep_ranks[p];
                    self.send(me, dst, key.tag(SHARD_CHANNEL), payload);
                }
                self.issue(me, i, Class::Compute, move |d| {
                    passes::resume(d, c, s, None).map(Some)
                });
            }
            Some(Out::Await { layer, kind }) => r.st[i] = St::Await(layer, kind),
            Some(Out::Done { output }) => {
                r.st[i] = St::Done;
                let (to, kind) = match u.op {
                    Op::F => (s + 1, Kind::Act),
                    _ => (s.wrapping_sub(1), Kind::Grad),
                };
                if u.op == Op::B {
                    self.a.links.gate().release();
                    self.a.links.gate_changed(s);
                }
                let send = match (output, self.key(c, 0, kind)) {
                    (Some(payload), Some(key)) => {
                        let dst = self.a.placement.peer_for(self.a.rank, c, to);
                        self.sender(me, dst, key.tag(STAGE_CHANNEL + to as u32), payload)
                    }
                    _ => None,
                };
                let ready = self.a.links.outputs().unit_done(action, u.of, send);
                ready.into_iter().for_each(|send| send());
            }
        }
    }

    /// Send in the background (a simulated link takes time); a failure fails the step.
    fn send(
        &self,
        me: &ActorRef<StageMsg>,
        dst: Rank,
        tag: flotilla_runtime::fabric::Tag,
        payload: Payload,
    ) {
        if let Some(send) = self.sender(me, dst, tag, payload) {
            send();
        }
    }

    /// A send to do now or later (see [`crate::links::Outputs`]).
    fn sender(
        &self,
        me: &ActorRef<StageMsg>,
        dst: Rank,
        tag: flotilla_runtime::fabric::Tag,
        payload: Payload,
    ) -> Option<crate::links::HeldSend> {
        let run_id = self.run.as_ref().map(|r| r.run_id)?;
        let (fabric, me) = (Arc::clone(&self.a.fabric), me.clone());
        Some(Box::new(move || {
            tokio::spawn(async move {
                if let Err(e) = fabric.send(dst, tag, payload).await {
                    let why = format!("sending to rank {dst}: {e}");
                    let _ = me.cast(StageMsg::SendFailed { run_id, why });
                }
            });
        }))
    }

    /// Check again after `after`.
    fn arm(&self, me: &ActorRef<StageMsg>, after: Duration) {
        let Some(run_id) = self.run.as_ref().map(|r| r.run_id) else {
            return;
        };
        let (sleep, me) = (self.a.clock.sleep(after), me.clone());
        tokio::spawn(async move {
            sleep.await;
            let _ = me.cast(StageMsg::Watch { run_id });
        });
    }

    /// The deadline: fail when nothing has happened for `deadline` while waiting on peers.
    fn watch(&mut self, me: &ActorRef<StageMsg>, run_id: u64) {
        let Some(r) = self.run.as_ref().filter(|r| r.run_id == run_id) else {
            return;
        };
        let idle = self.a.clock.elapsed(r.last_progress);
        let busy = r.st.contains(&St::Busy);
        if busy || idle < self.a.deadline {
            let left = if busy {
                self.a.deadline
            } else {
                self.a.deadline - idle
            };
            self.arm(me, left);
            return;
        }
        let why = self.waiting_for();
        self.fail(format!("nothing arrived for {idle:?}: {why}"));
    }

    /// What the step waits for, in words.
    fn waiting_for(&self) -> String {
        let Some(r) = &self.run else {
            return "nothing".into();
        };
        let s = self.a.stage;
        for (u, st) in self.units.iter().zip(&r.st).take(r.claimed) {
            let c = u.chunk;
            match st {
                St::Waiting if u.op == Op::F && s > 0 => {
                    let src = self.a.placement.peer_for(self.a.rank, c, s - 1);
                    return format!("the activation of micro-batch {c} from rank {src}");
                }
                St::Waiting if u.op == Op::B && s + 1 < self.a.placement.specs.len() => {
                    let src = self.a.placement.peer_for(self.a.rank, c, s + 1);
                    return format!("the gradient of micro-batch {c} from rank {src}");
                }
                St::Await(layer, kind) => {
                    let got = self
                        .key(c, *layer, *kind)
                        .and_then(|k| self.inbox.get(&k).cloned())
                        .unwrap_or_default();
                    // This rank's own experts answer last when they wait for a peer's rows:
                    // the peers are named first.
                    let me = self.a.rank;
                    let missing: Vec<Rank> = self
                        .ep_ranks
                        .iter()
                        .enumerate()
                        .filter(|(p, _)| got.get(*p).is_none_or(Option::is_none))
                        .map(|(_, r)| *r)
                        .collect();
                    let peers: Vec<String> = missing
                        .iter()
                        .filter(|&&r| r != me)
                        .map(|r| format!("rank {r}"))
                        .collect();
                    let from = if peers.is_empty() {
                        "this rank's own experts".to_string()
                    } else {
                        peers.join(" and ")
                    };
                    return format!("the {kind:?} of layer {layer}, micro-batch {c} from {from}");
                }
                _ => {}
            }
        }
        "room for the next forward's activations".into()
    }
}

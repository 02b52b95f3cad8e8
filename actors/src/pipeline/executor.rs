//! The pipeline executor: runs one rank's action list of a [`Schedule`](crate::schedule::Schedule), driven by the
//! activations and gradients that arrive from the neighbouring stages.
//!
//! For every action the executor receives what it needs (a forward's input activation from the
//! rank holding the previous stage, a backward's output gradient from the rank holding the next
//! one — or takes it from this rank when both stages live here), runs the compute through a
//! [`StageWork`], and sends the results on. An `FB` pair runs its forward and its full backward on
//! two threads at once, so that one half's expert all-to-all waits while the other computes; by
//! default ([`Overlap::Streams`], `streams.rs`) the whole list runs on a few such streams, so
//! that unpaired warm-up forwards and drain backwards overlap each other too.
//!
//! Timing has two modes. [`Timing::Wall`]: spans are wall-clock seconds since the step began.
//! [`Timing::Injected`]: the compute still runs (a cost-only [`StageWork`] does nothing), but
//! every action takes exactly the injected [`Costs`] on a virtual clock; messages carry their
//! sender's virtual time, and an action starts at `max(rank free, inputs' times)`. The trace of
//! the injected mode is the executor's own measurement of its schedule: the bubble tests compare
//! it with Table 2 of the DeepSeek-V3 report.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flotilla_model::device::{Lane, with_lane};

use crate::schedule::{Action, Costs, Op, timeline};

use super::placement::Placement;
use super::profile::{Activity, in_piece};
use super::transport::{Dir, Link};

/// The compute of a rank's stages, callable from several threads at once (an `FB` pair's
/// halves, the executor's streams).
pub trait StageWork: Sync {
    /// Values in the tensor that crosses a stage boundary for `chunk` (tokens × hidden).
    fn boundary_len(&self, chunk: usize) -> usize;
    /// Forward of `(chunk, stage)`; returns the output activation (`None` on the head stage).
    fn forward(
        &self,
        chunk: usize,
        stage: usize,
        input: Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>, String>;
    /// Backward for input; returns the input gradient (`None` on the embedding stage).
    fn backward_input(
        &self,
        chunk: usize,
        stage: usize,
        grad: Option<Vec<f32>>,
    ) -> Result<Option<Vec<f32>>, String>;
    /// Backward for weights, calling `yield_now` between layers (where the executor lets
    /// another stream compute first).
    fn backward_weight(
        &self,
        chunk: usize,
        stage: usize,
        yield_now: &(dyn Fn() + Sync),
    ) -> Result<(), String>;
    /// Every `W` of `stage` on this rank is done: its gradients are final for this step.
    fn stage_grads_done(&self, _stage: usize) {}
}

/// How a rank's work shares its device in wall-clock mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// One action at a time; an F&B pair's halves one after the other (what the overlap gains
    /// is measured against this).
    Off,
    /// The two halves of each F&B pair at the same time, every other action alone: DualPipe's
    /// pairs as the report draws them.
    Pairs,
    /// `n` streams over the whole list (`streams.rs`): each takes the next piece (an F&B pair
    /// is its halves) as soon as it is free, so a pair's halves overlap as in `Pairs`, and so
    /// do consecutive warm-up forwards, drain backwards and the halves of neighbouring pairs.
    /// The default is [`Overlap::DEFAULT_STREAMS`].
    Streams(usize),
}

impl Overlap {
    /// Measured best on the pipeline bench (`docs/benchmarks.md`): three streams let a
    /// forward, a backward and a W be in flight at once.
    pub const DEFAULT_STREAMS: usize = 3;

    /// The default for a job whose micro-batches run as `sub_batches` sub-batches
    /// (`parallel.sub_batches`): [`Overlap::DEFAULT_STREAMS`] streams per sub-batch, at most
    /// one per [`Lane`].
    pub fn for_sub_batches(sub_batches: usize) -> Overlap {
        Overlap::Streams((Self::DEFAULT_STREAMS * sub_batches.max(1)).min(Lane::MAX))
    }
}

impl Default for Overlap {
    fn default() -> Self {
        Overlap::Streams(Self::DEFAULT_STREAMS)
    }
}

/// Which of a rank's streams waiting for the compute baton gets it first ([`Overlap::Streams`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TurnOrder {
    /// The one that asked first.
    Arrival,
    /// The one whose piece comes first in the action list, every F and B before every W: the
    /// schedule's order is the order in which the pipeline (and the EP peers, which run the same
    /// list) need the pieces done, and a W has no communication that anyone waits for, so it
    /// fills the gaps. Measured against `Arrival` on the pipeline bench (`docs/benchmarks.md`).
    #[default]
    Schedule,
}

/// How the executor measures time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Timing {
    Wall,
    Injected(Costs),
}

/// One action as it ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub action: Action,
    pub start: f64,
    pub end: f64,
}

/// What a rank's step did, in time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    pub spans: Vec<Span>,
    /// Most stage activations held at once (an `F` holds one until its `B`).
    pub peak_activations: usize,
}

impl Trace {
    /// Sum of the actions' durations.
    pub fn busy(&self) -> f64 {
        self.spans.iter().map(|s| s.end - s.start).sum()
    }

    /// When the last action ended.
    pub fn end(&self) -> f64 {
        self.spans.iter().map(|s| s.end).fold(0.0, f64::max)
    }
}

/// A local hand-off: data that stays on this rank between two of its stages.
type Key = (usize, usize, u8);

/// What the executor's threads share: local hand-offs, finished work, the gradients' turn.
#[derive(Debug, Default)]
pub(super) struct Local {
    handoffs: HashMap<Key, (Vec<f32>, f64)>,
    /// `(op, chunk, stage)` passes of this rank that have finished.
    done: HashSet<(Op, usize, usize)>,
    /// `W` passes applied so far. They accumulate into the gradients, so they are applied in
    /// the list's order whatever thread runs them: the sums, and hence the step, are the same
    /// bits in every mode.
    w_applied: usize,
    /// `W` passes of each stage still to apply (its gradients are final at zero).
    w_left: HashMap<usize, usize>,
    /// Stage activations held now (a forward holds one from its start to its backward's end),
    /// the most the list holds one action at a time, and the most held so far.
    live: usize,
    cap: usize,
    pub(super) peak: usize,
    /// Forwards that have taken their activation (streams take them in list order).
    f_next: usize,
}

/// One rank's run of its action list.
pub struct Executor<'a> {
    pub placement: &'a Placement,
    /// This rank's global rank.
    pub rank: usize,
    pub link: &'a Link,
    pub timing: Timing,
    /// Wall-clock origin of the step (shared by the ranks of one process).
    pub epoch: Instant,
    /// How actions overlap in wall-clock mode.
    pub overlap: Overlap,
    /// Who of the streams goes first.
    pub turns: TurnOrder,
    pub(super) local: Mutex<Local>,
    /// Signalled whenever `local` changes.
    pub(super) changed: Condvar,
}

impl<'a> Executor<'a> {
    pub fn new(
        placement: &'a Placement,
        rank: usize,
        link: &'a Link,
        timing: Timing,
        epoch: Instant,
    ) -> Self {
        Executor {
            placement,
            rank,
            link,
            timing,
            epoch,
            overlap: Overlap::default(),
            turns: TurnOrder::default(),
            local: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    fn last_stage(&self) -> usize {
        self.placement.specs.len() - 1
    }

    pub(super) fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    pub(super) fn lock(&self) -> Result<MutexGuard<'_, Local>, String> {
        self.local
            .lock()
            .map_err(|_| "a compute thread panicked".to_string())
    }

    /// Whether other actions of this rank may run while this one waits (streams).
    fn concurrent(&self) -> bool {
        matches!(self.overlap, Overlap::Streams(_)) && matches!(self.timing, Timing::Wall)
    }

    /// Take what `take` finds in the shared state. With streams, what another stream of
    /// this rank has still to produce is waited for, with the baton (which the caller holds)
    /// handed over meanwhile; one at a time, it must be there already.
    pub(super) fn wait_local<T>(
        &self,
        mut take: impl FnMut(&mut Local) -> Option<T>,
        what: impl Fn() -> String,
    ) -> Result<T, String> {
        let mut g = self.lock()?;
        if let Some(t) = take(&mut g) {
            return Ok(t);
        }
        if !self.concurrent() {
            return Err(format!("internal: {} was not ready on this rank", what()));
        }
        self.link.baton.release();
        let t0 = Instant::now();
        let r = loop {
            if let Some(t) = take(&mut g) {
                break Ok(t);
            }
            if let Some(why) = self.link.failure.get() {
                break Err(why);
            }
            match self.changed.wait_timeout(g, Duration::from_millis(20)) {
                Ok((next, _)) => g = next,
                Err(_) => {
                    self.link.baton.acquire();
                    return Err("a compute thread panicked".to_string());
                }
            }
        };
        drop(g);
        self.link.baton.profile().record(Activity::Local, 0, t0);
        self.link.baton.acquire();
        r
    }

    fn take_local(&self, key: Key) -> Result<(Vec<f32>, f64), String> {
        self.wait_local(|l| l.handoffs.remove(&key), || format!("hand-off {key:?}"))
    }

    fn put_local(&self, key: Key, v: (Vec<f32>, f64)) -> Result<(), String> {
        self.lock()?.handoffs.insert(key, v);
        self.changed.notify_all();
        Ok(())
    }

    /// Record that `(op, c, s)` has finished on this rank.
    fn mark_done(&self, op: Op, c: usize, s: usize) -> Result<(), String> {
        let mut g = self.lock()?;
        g.done.insert((op, c, s));
        if op == Op::B {
            g.live = g.live.saturating_sub(1);
        }
        drop(g);
        self.changed.notify_all();
        Ok(())
    }

    /// Wait until `(op, c, s)` has finished on this rank (its cache is ready for what follows).
    fn wait_done(&self, op: Op, c: usize, s: usize) -> Result<(), String> {
        self.wait_local(
            |l| l.done.contains(&(op, c, s)).then_some(()),
            || format!("{op}(chunk {c}, stage {s})"),
        )
    }

    /// `W(c, s)`, the `ordinal`-th W of the list: applied after every earlier W (the gradient
    /// sums keep their order), then the stage's gradients are handed on if it was its last W.
    fn apply_w(
        &self,
        work: &dyn StageWork,
        c: usize,
        s: usize,
        ordinal: usize,
    ) -> Result<(), String> {
        self.wait_done(Op::B, c, s)?;
        self.wait_local(
            |l| (l.w_applied == ordinal).then_some(()),
            || format!("the turn of W(chunk {c}, stage {s})"),
        )?;
        // A W has no communication: between its layers, a stream waiting for the core (its
        // data arrived) goes first, so W fills the gaps instead of delaying an all-to-all.
        let r = work.backward_weight(c, s, &|| self.link.baton.yield_to_waiting());
        let last = {
            let mut g = self.lock()?;
            let left = g.w_left.entry(s).or_default();
            *left = left.saturating_sub(1);
            *left == 0
        };
        if r.is_ok() && last {
            work.stage_grads_done(s);
        }
        self.lock()?.w_applied += 1;
        self.changed.notify_all();
        r
    }

    /// The input activation of `F(chunk, stage)` and its time.
    fn f_input(&self, work: &dyn StageWork, c: usize, s: usize) -> Result<Input, String> {
        if s == 0 {
            return Ok((None, 0.0));
        }
        let src = self.placement.peer_for(self.rank, c, s - 1);
        let (v, t) = if src == self.rank {
            self.take_local((c, s - 1, Dir::Act as u8))?
        } else {
            self.link
                .recv_pipe(src, c, s - 1, Dir::Act, work.boundary_len(c))?
        };
        Ok((Some(v), t))
    }

    fn f_output(&self, c: usize, s: usize, out: Option<Vec<f32>>, t: f64) -> Result<(), String> {
        let Some(v) = out else { return Ok(()) };
        if s == self.last_stage() {
            return Ok(());
        }
        let dst = self.placement.peer_for(self.rank, c, s + 1);
        if dst == self.rank {
            self.put_local((c, s, Dir::Act as u8), (v, t))
        } else {
            self.link.send_pipe(dst, c, s, Dir::Act, v, t)
        }
    }

    /// The output gradient that `B(chunk, stage)` starts from, and its time.
    fn b_input(&self, work: &dyn StageWork, c: usize, s: usize) -> Result<Input, String> {
        if s == self.last_stage() {
            return Ok((None, 0.0));
        }
        let src = self.placement.peer_for(self.rank, c, s + 1);
        let (v, t) = if src == self.rank {
            self.take_local((c, s + 1, Dir::Grad as u8))?
        } else {
            self.link
                .recv_pipe(src, c, s + 1, Dir::Grad, work.boundary_len(c))?
        };
        Ok((Some(v), t))
    }

    fn b_output(&self, c: usize, s: usize, out: Option<Vec<f32>>, t: f64) -> Result<(), String> {
        let Some(v) = out else { return Ok(()) };
        if s == 0 {
            return Ok(());
        }
        let dst = self.placement.peer_for(self.rank, c, s - 1);
        if dst == self.rank {
            self.put_local((c, s, Dir::Grad as u8), (v, t))
        } else {
            self.link.send_pipe(dst, c, s, Dir::Grad, v, t)
        }
    }

    /// Wall mode: a forward as one self-contained unit (receive, compute, send), holding the
    /// rank's compute baton except while it waits.
    ///
    /// `slot`: on streams, the forward's ordinal among the list's forwards. It then takes its
    /// activation only when every earlier forward has taken theirs and the rank holds fewer than
    /// the list does one action at a time. In order, so that the earliest forward is never
    /// starved by a later one that waits for data depending on it.
    pub(super) fn wall_f(
        &self,
        work: &dyn StageWork,
        c: usize,
        s: usize,
        slot: Option<usize>,
    ) -> Result<(), String> {
        in_piece((Op::F, c, s), || {
            self.link.baton.acquire();
            let r = (|| {
                if let Some(k) = slot {
                    self.wait_local(
                        |l| {
                            (l.f_next == k && l.live < l.cap).then(|| {
                                l.f_next += 1;
                                l.live += 1;
                                l.peak = l.peak.max(l.live);
                            })
                        },
                        || format!("room for the activations of F(chunk {c}, stage {s})"),
                    )?;
                }
                let (inp, _) = self.f_input(work, c, s)?;
                let out = work.forward(c, s, inp)?;
                self.mark_done(Op::F, c, s)?;
                self.f_output(c, s, out, self.now())
            })();
            self.link.baton.release();
            r
        })
    }

    /// Wall mode: a backward for input, with its W (the `w`-th of the list) before the
    /// gradient leaves when `w` is given.
    pub(super) fn wall_b(
        &self,
        work: &dyn StageWork,
        c: usize,
        s: usize,
        w: Option<usize>,
    ) -> Result<(), String> {
        in_piece((Op::B, c, s), || {
            self.link.baton.acquire();
            let r = (|| {
                self.wait_done(Op::F, c, s)?;
                let (g, _) = self.b_input(work, c, s)?;
                let d = work.backward_input(c, s, g)?;
                self.mark_done(Op::B, c, s)?;
                if let Some(k) = w {
                    self.apply_w(work, c, s, k)?;
                }
                self.b_output(c, s, d, self.now())
            })();
            self.link.baton.release();
            r
        })
    }

    /// Wall mode: the `k`-th W of the list.
    pub(super) fn wall_w(
        &self,
        work: &dyn StageWork,
        c: usize,
        s: usize,
        k: usize,
    ) -> Result<(), String> {
        in_piece((Op::W, c, s), || {
            self.link.baton.acquire();
            let r = self.apply_w(work, c, s, k);
            self.link.baton.release();
            r
        })
    }

    /// Wall mode, one action at a time (`w`: the ordinal of its W).
    fn wall(&self, work: &dyn StageWork, action: &Action, w: Option<usize>) -> Result<(), String> {
        let k = || w.ok_or_else(|| format!("internal: {action:?} has no W ordinal"));
        match *action {
            Action::F { chunk, stage } => self.wall_f(work, chunk, stage, None),
            Action::B { chunk, stage } => self.wall_b(work, chunk, stage, None),
            Action::W { chunk, stage } => self.wall_w(work, chunk, stage, k()?),
            Action::BW { chunk, stage } => self.wall_b(work, chunk, stage, Some(k()?)),
            Action::FB { f, b } if self.overlap == Overlap::Off => {
                self.wall_f(work, f.0, f.1, None)?;
                self.wall_b(work, b.0, b.1, Some(k()?))
            }
            Action::FB { f, b } => {
                let k = k()?;
                std::thread::scope(|scope| {
                    // The forward half issues its device work on a lane of its own: the halves
                    // block inside that work (all-to-all, baton), so they must not share threads.
                    let fwd = scope
                        .spawn(|| with_lane(Lane::new(1), || self.wall_f(work, f.0, f.1, None)));
                    let bwd = with_lane(Lane::FIRST, || self.wall_b(work, b.0, b.1, Some(k)));
                    let fwd = fwd
                        .join()
                        .unwrap_or_else(|_| Err("the forward half of an F&B pair panicked".into()));
                    bwd.and(fwd)
                })
            }
        }
    }

    /// Injected mode: gather every input, start at the latest of them, take the action's cost.
    fn injected(
        &self,
        work: &dyn StageWork,
        action: &Action,
        costs: &Costs,
        free: f64,
        w: Option<usize>,
    ) -> Result<(f64, f64), String> {
        let mut start = free;
        let mut f_in = None;
        let mut b_in = None;
        for u in action.units() {
            match u.op {
                Op::F => {
                    let (v, t) = self.f_input(work, u.chunk, u.stage)?;
                    start = start.max(t);
                    f_in = Some(v);
                }
                Op::B => {
                    let (v, t) = self.b_input(work, u.chunk, u.stage)?;
                    start = start.max(t);
                    b_in = Some(v);
                }
                Op::W => {}
            }
        }
        let end = start + costs.of(action);
        let (mut f_out, mut b_out) = (None, None);
        for u in action.units() {
            let (c, s) = (u.chunk, u.stage);
            match u.op {
                Op::F => {
                    f_out = Some((u, work.forward(c, s, f_in.take().flatten())?));
                    self.mark_done(Op::F, c, s)?;
                }
                Op::B => {
                    b_out = Some((u, work.backward_input(c, s, b_in.take().flatten())?));
                    self.mark_done(Op::B, c, s)?;
                }
                Op::W => {
                    let k = w.ok_or_else(|| format!("internal: {action:?} has no W ordinal"))?;
                    self.apply_w(work, c, s, k)?;
                }
            }
        }
        if let Some((u, v)) = f_out {
            self.f_output(u.chunk, u.stage, v, end)?;
        }
        if let Some((u, v)) = b_out {
            self.b_output(u.chunk, u.stage, v, end)?;
        }
        Ok((start, end))
    }

    /// Run `actions` in order. Stops at the first failure (its own or a transport one).
    pub fn run(&self, work: &dyn StageWork, actions: &[Action]) -> Result<Trace, String> {
        let ordinals = w_ordinals(actions);
        {
            let mut g = self.lock()?;
            *g = Local::default();
            for u in actions.iter().flat_map(Action::units) {
                if u.op == Op::W {
                    *g.w_left.entry(u.stage).or_default() += 1;
                }
            }
            g.cap = timeline::peak_activations(actions).max(1);
        }
        if self.concurrent() {
            return self.run_streams(work, actions, &ordinals);
        }
        let mut trace = Trace::default();
        let (mut live, mut free) = (0usize, 0.0f64);
        for (action, &w) in actions.iter().zip(&ordinals) {
            let ran = match self.timing {
                Timing::Wall => {
                    let start = self.now();
                    self.wall(work, action, w).map(|()| (start, self.now()))
                }
                Timing::Injected(costs) => {
                    // Receives hand the baton over, so they must hold it, as in wall mode.
                    self.link.baton.acquire();
                    let r = self.injected(work, action, &costs, free, w);
                    self.link.baton.release();
                    r
                }
            };
            // A failed expert all-to-all lets the layer finish on zeros; its failure, the root
            // cause, wins over whatever failed after it.
            let (start, end) = match (ran, self.link.failure.get()) {
                (_, Some(why)) => return Err(why),
                (r, None) => r?,
            };
            free = end;
            trace.spans.push(Span {
                action: *action,
                start,
                end,
            });
            for u in action.units() {
                match u.op {
                    Op::F => live += 1,
                    Op::B => live = live.saturating_sub(1),
                    Op::W => {}
                }
                // An F&B pair holds its forward's activations before its backward frees.
                if u.op == Op::F {
                    trace.peak_activations = trace.peak_activations.max(live);
                }
            }
        }
        Ok(trace)
    }
}

/// The ordinal of each action's W among the list's W's (`None` where it has none).
fn w_ordinals(actions: &[Action]) -> Vec<Option<usize>> {
    let mut next = 0;
    actions
        .iter()
        .map(|a| {
            a.units().iter().any(|u| u.op == Op::W).then(|| {
                next += 1;
                next - 1
            })
        })
        .collect()
}

type Input = (Option<Vec<f32>>, f64);

//! The pipeline executor: runs one rank's action list of a [`Schedule`](crate::schedule::Schedule), driven by the
//! activations and gradients that arrive from the neighbouring stages.
//!
//! For every action the executor receives what it needs (a forward's input activation from the
//! rank holding the previous stage, a backward's output gradient from the rank holding the next
//! one — or takes it from this rank when both stages live here), runs the compute through a
//! [`StageWork`], and sends the results on. An `FB` pair runs its forward and its full backward on
//! two threads at once, so that one half's expert all-to-all waits while the other computes.
//!
//! Timing has two modes. [`Timing::Wall`]: spans are wall-clock seconds since the step began.
//! [`Timing::Injected`]: the compute still runs (a cost-only [`StageWork`] does nothing), but
//! every action takes exactly the injected [`Costs`] on a virtual clock; messages carry their
//! sender's virtual time, and an action starts at `max(rank free, inputs' times)`. The trace of
//! the injected mode is the executor's own measurement of its schedule: the bubble tests compare
//! it with Table 2 of the DeepSeek-V3 report.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::schedule::{Action, Costs, Op};

use super::placement::Placement;
use super::transport::{Dir, Link};

/// The compute of a rank's stages, callable from two threads at once (an `FB` pair).
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
    /// Backward for weights.
    fn backward_weight(&self, chunk: usize, stage: usize) -> Result<(), String>;
    /// Every `W` of `stage` on this rank is done: its gradients are final for this step.
    fn stage_grads_done(&self, _stage: usize) {}
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

/// One rank's run of its action list.
pub struct Executor<'a> {
    pub placement: &'a Placement,
    /// This rank's global rank.
    pub rank: usize,
    pub link: &'a Link,
    pub timing: Timing,
    /// Wall-clock origin of the step (shared by the ranks of one process).
    pub epoch: Instant,
    /// Run the two halves of an `FB` pair at the same time (the point of DualPipe); off, they run
    /// one after the other (for measuring what the overlap gains).
    pub overlap: bool,
    local: Mutex<HashMap<Key, (Vec<f32>, f64)>>,
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
            overlap: true,
            local: Mutex::new(HashMap::new()),
        }
    }

    fn last_stage(&self) -> usize {
        self.placement.specs.len() - 1
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn take_local(&self, key: Key) -> Result<(Vec<f32>, f64), String> {
        self.local
            .lock()
            .map_err(|_| "a compute thread panicked".to_string())?
            .remove(&key)
            .ok_or_else(|| format!("internal: {key:?} was not produced on this rank before use"))
    }

    fn put_local(&self, key: Key, v: (Vec<f32>, f64)) -> Result<(), String> {
        self.local
            .lock()
            .map_err(|_| "a compute thread panicked".to_string())?
            .insert(key, v);
        Ok(())
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
    /// rank's compute baton except while it waits on the fabric.
    fn wall_f(&self, work: &dyn StageWork, c: usize, s: usize) -> Result<(), String> {
        self.link.baton.acquire();
        let r = (|| {
            let (inp, _) = self.f_input(work, c, s)?;
            let out = work.forward(c, s, inp)?;
            self.f_output(c, s, out, self.now())
        })();
        self.link.baton.release();
        r
    }

    /// Wall mode: a backward for input, optionally with its W before the gradient leaves.
    fn wall_b(&self, work: &dyn StageWork, c: usize, s: usize, with_w: bool) -> Result<(), String> {
        self.link.baton.acquire();
        let r = (|| {
            let (g, _) = self.b_input(work, c, s)?;
            let d = work.backward_input(c, s, g)?;
            if with_w {
                work.backward_weight(c, s)?;
            }
            self.b_output(c, s, d, self.now())
        })();
        self.link.baton.release();
        r
    }

    fn wall(&self, work: &dyn StageWork, action: &Action) -> Result<(), String> {
        match *action {
            Action::F { chunk, stage } => self.wall_f(work, chunk, stage),
            Action::B { chunk, stage } => self.wall_b(work, chunk, stage, false),
            Action::W { chunk, stage } => {
                self.link.baton.acquire();
                let r = work.backward_weight(chunk, stage);
                self.link.baton.release();
                r
            }
            Action::BW { chunk, stage } => self.wall_b(work, chunk, stage, true),
            Action::FB { f, b } if !self.overlap => {
                self.wall_f(work, f.0, f.1)?;
                self.wall_b(work, b.0, b.1, true)
            }
            Action::FB { f, b } => std::thread::scope(|scope| {
                let fwd = scope.spawn(|| self.wall_f(work, f.0, f.1));
                let bwd = self.wall_b(work, b.0, b.1, true);
                let fwd = fwd
                    .join()
                    .unwrap_or_else(|_| Err("the forward half of an F&B pair panicked".into()));
                bwd.and(fwd)
            }),
        }
    }

    /// Injected mode: gather every input, start at the latest of them, take the action's cost.
    fn injected(
        &self,
        work: &dyn StageWork,
        action: &Action,
        costs: &Costs,
        free: f64,
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
            match u.op {
                Op::F => f_out = Some((u, work.forward(u.chunk, u.stage, f_in.take().flatten())?)),
                Op::B => {
                    b_out = Some((
                        u,
                        work.backward_input(u.chunk, u.stage, b_in.take().flatten())?,
                    ))
                }
                Op::W => work.backward_weight(u.chunk, u.stage)?,
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
        let mut w_left: HashMap<usize, usize> = HashMap::new();
        for a in actions {
            for u in a.units().into_iter().filter(|u| u.op == Op::W) {
                *w_left.entry(u.stage).or_default() += 1;
            }
        }
        let mut trace = Trace::default();
        let (mut live, mut free) = (0usize, 0.0f64);
        for action in actions {
            let ran = match self.timing {
                Timing::Wall => {
                    let start = self.now();
                    self.wall(work, action).map(|()| (start, self.now()))
                }
                Timing::Injected(costs) => {
                    // Receives hand the baton over, so they must hold it, as in wall mode.
                    self.link.baton.acquire();
                    let r = self.injected(work, action, &costs, free);
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
                    Op::W => {
                        let left = w_left.entry(u.stage).or_default();
                        *left -= 1;
                        if *left == 0 {
                            work.stage_grads_done(u.stage);
                        }
                    }
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

type Input = (Option<Vec<f32>>, f64);

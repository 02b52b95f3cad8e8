//! Times a [`Schedule`] under a cost model: every action's start and end on its rank, the
//! makespan, each rank's bubble and its peak activation memory.
//!
//! Each rank runs its list in order; an action starts when the rank is free and every
//! dependency (see `check.rs`) has ended, plus [`Costs::comm`] when the dependency ran on
//! another rank. The three units of an `FB` pair all end when the pair ends. The step starts at
//! time 0 on every rank.
//!
//! **Bubble** of a rank = makespan − the rank's busy time (the sum of its actions' costs), i.e.
//! all its idle time within the step, at the start, in between and at the end (waiting for the
//! slowest rank, as the optimizer step that follows does). Table 2 of the report gives the
//! pipeline's bubble, which is the worst rank's, [`Timeline::max_bubble`]: for 1F1B and ZB1P
//! every rank's bubble equals it ((PP−1)(F+B), (PP−1)(F+B−2W)); for DualPipe it is the middle
//! ranks' ((PP/2−1)(F&B+B−3W), exact when F equals the backward for input and W ≤ F; the outer
//! ranks idle less whenever F&B < F + B). The tests pin the measured values.
//!
//! **Activation memory**, in micro-batches of one stage: an `F` allocates one, the `B` of the
//! same (chunk, stage) frees it (the report's convention — the backward-for-input releases the
//! stage's activations; what a deferred `W` keeps, the layers' inputs and output gradients, is
//! not counted). Measured: 1F1B and ZB1P hold PP on rank 0 (PP−r on rank r; ZB1P would hold PP
//! on every rank if its delayed `W`s were counted), DualPipe PP+1 on every rank, DualPipeV
//! 2·pp+1 of its half-size stages. An `FB` allocates its forward's activations before its backward frees, so the
//! pair counts at its peak. Peak = the most held at once on a rank.

use super::check::{Table, action_deps, check};
use super::{Action, CheckError, Op, Schedule};

/// Durations of the actions (in any unit) and of a transfer between ranks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    /// A forward chunk (the report's F).
    pub f: f64,
    /// A backward-for-input chunk; the report's full-backward B is `b + w`.
    pub b: f64,
    /// A backward-for-weights chunk (the report's W).
    pub w: f64,
    /// An overlapped forward + full-backward pair (the report's F&B).
    pub fb: f64,
    /// Latency of an activation or gradient between ranks (0 by default).
    pub comm: f64,
}

impl Default for Costs {
    /// F = B = W = 1, F&B = 3 (no gain from overlapping), no communication cost.
    fn default() -> Self {
        Costs {
            f: 1.0,
            b: 1.0,
            w: 1.0,
            fb: 3.0,
            comm: 0.0,
        }
    }
}

impl Costs {
    /// The duration of `action`.
    pub fn of(&self, action: &Action) -> f64 {
        match action {
            Action::F { .. } => self.f,
            Action::B { .. } => self.b,
            Action::W { .. } => self.w,
            Action::BW { .. } => self.b + self.w,
            Action::FB { .. } => self.fb,
        }
    }

    /// The report's B: a full backward chunk, `b + w`.
    pub fn full_backward(&self) -> f64 {
        self.b + self.w
    }
}

/// When an action ran.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub start: f64,
    pub end: f64,
}

/// A timed schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// `spans[r][i]` is when `ranks[r][i]` ran.
    pub spans: Vec<Vec<Span>>,
    /// When the last action on any rank ends.
    pub makespan: f64,
    /// Per rank, the sum of its actions' costs.
    pub busy: Vec<f64>,
    /// Per rank, `makespan − busy`.
    pub bubble: Vec<f64>,
    /// Per rank, the most (chunk, stage) activations held at once.
    pub peak_activations: Vec<usize>,
}

impl Timeline {
    /// The largest per-rank bubble.
    pub fn max_bubble(&self) -> f64 {
        self.bubble.iter().copied().fold(0.0, f64::max)
    }
}

/// Time `schedule` under `costs`; refuses a schedule that [`check`] refuses.
pub fn simulate(schedule: &Schedule, costs: &Costs) -> Result<Timeline, CheckError> {
    simulate_by(schedule, &|a: &Action| costs.of(a), costs.comm)
}

/// Time `schedule` with `cost` giving each action's duration (which may depend on its stages:
/// the first and last carry the embedding and the head) and `comm` the latency between ranks.
pub fn simulate_by(
    schedule: &Schedule,
    cost: &dyn Fn(&Action) -> f64,
    comm: f64,
) -> Result<Timeline, CheckError> {
    check(schedule)?;
    let stages = schedule.stages();
    let mut ended: Table<Option<f64>> = Table::new(schedule.chunks, stages, None);
    let mut spans: Vec<Vec<Span>> = schedule
        .ranks
        .iter()
        .map(|a| Vec::with_capacity(a.len()))
        .collect();
    let mut free = vec![0.0f64; schedule.pp];
    let total: usize = schedule.ranks.iter().map(Vec::len).sum();
    let mut finished = 0;
    // The check above proved that this replay finishes.
    while finished < total {
        for (rank, acts) in schedule.ranks.iter().enumerate() {
            while let Some(action) = acts.get(spans[rank].len()) {
                let mut ready = 0.0f64;
                let mut waiting = false;
                for d in action_deps(action, stages) {
                    match *ended.get(d) {
                        Some(t) => {
                            let hop = if schedule.rank_of(d.chunk, d.stage) == rank {
                                0.0
                            } else {
                                comm
                            };
                            ready = ready.max(t + hop);
                        }
                        None => waiting = true,
                    }
                }
                if waiting {
                    break;
                }
                let start = free[rank].max(ready);
                let end = start + cost(action);
                for u in action.units() {
                    ended.set(u, Some(end));
                }
                free[rank] = end;
                spans[rank].push(Span { start, end });
                finished += 1;
            }
        }
    }
    let makespan = free.iter().copied().fold(0.0, f64::max);
    let busy: Vec<f64> = schedule
        .ranks
        .iter()
        .map(|acts| acts.iter().map(cost).sum())
        .collect();
    Ok(Timeline {
        spans,
        makespan,
        bubble: busy.iter().map(|b| makespan - b).collect(),
        busy,
        peak_activations: schedule.ranks.iter().map(|a| peak_activations(a)).collect(),
    })
}

/// The most activations held at once by a rank running `acts` in order (see the module docs).
pub fn peak_activations(acts: &[Action]) -> usize {
    let (mut held, mut peak) = (0usize, 0usize);
    for a in acts {
        let units = a.units();
        if units.iter().any(|u| u.op == Op::F) {
            held += 1;
            peak = peak.max(held);
        }
        if units.iter().any(|u| u.op == Op::B) {
            held = held.saturating_sub(1);
        }
    }
    peak
}

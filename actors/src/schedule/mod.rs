//! Pipeline-parallel schedules as data (DeepSeek-V3 report §3.2, Table 2).
//!
//! A [`Schedule`] is, for every pipeline rank, the ordered list of compute [`Action`]s that rank
//! runs. [`build`] makes one of five kinds: GPipe, 1F1B, ZB1P (zero-bubble ZB-H1), DualPipe and
//! DualPipeV. [`check()`] proves a schedule dependency-correct and deadlock-free, [`simulate`]
//! times it under a cost model ([`Costs`]) and [`svg::render`] draws it.
//!
//! # Vocabulary
//!
//! - A *chunk* is a micro-batch (`0..chunks`). A *stage* is a contiguous slice of the model's
//!   layers (`0..stages`); a micro-batch runs forward through stages `0, 1, …` and backward in
//!   the reverse order.
//! - `F` is a stage's forward; `B` is its **backward for input** (the gradient sent to the
//!   previous stage) and `W` its **backward for weights**. The report's "B" in Table 2 is a
//!   *full* backward chunk, i.e. this module's `B + W`; its "W" is this `W`. Where a schedule
//!   runs a full backward (GPipe, 1F1B, DualPipe's non-zero-bubble backwards) it emits one
//!   `BW` action: `B` and `W` back to back as one indivisible step whose input gradient is sent
//!   only at its end, as autograd does (two separate actions would let the gradient leave
//!   before `W` and silently turn 1F1B into a partly zero-bubble schedule).
//! - `FB` is an overlapped forward/backward pair (the report's "F&B"): the forward of one
//!   (chunk, stage) and the **full** backward (input and weights) of another, run together so
//!   that one's all-to-all hides behind the other's compute. An `FB` therefore performs three
//!   unit operations: `F(f)`, `B(b)` and `W(b)`.
//!
//! # Placement and communication
//!
//! Sends and receives are *implied by stage placement* rather than listed: [`Schedule::rank_of`]
//! says which rank holds a (chunk, stage); whenever a dependency crosses ranks, the activation
//! (forward) or gradient (backward) travels point-to-point. The model is an unbounded,
//! buffered channel per pair of ranks: an action waits only for the data it needs, never for its
//! peer to post a receive, so the only ordering constraints are data dependencies. Placement:
//!
//! - GPipe, 1F1B, ZB1P: `pp` stages, stage `s` on rank `s`.
//! - DualPipe: `pp` stages (two copies of the parameters); the first half of the chunks is fed
//!   at rank 0 and runs stage `s` on rank `s`, the second half is fed at rank `pp−1` and runs
//!   stage `s` on rank `pp−1−s`. Rank `r` thus holds stages `r` and `pp−1−r`.
//! - DualPipeV: `2·pp` stages in a V: stage `s < pp` on rank `s`, stage `s ≥ pp` on rank
//!   `2·pp−1−s`, so rank `r` holds stages `r` and `2·pp−1−r`; every chunk enters and leaves at
//!   rank 0.
//!
//! # Timing
//!
//! [`simulate`] runs each rank's list in order under [`Costs`] (F, B, W, F&B and an optional
//! per-hop latency, zero by default). A rank's bubble is makespan − its busy time; Table 2's
//! figure is the worst rank's. See `timeline.rs` for the activation-memory convention and the
//! tests for the measured bubbles against the report's formulas.

pub mod check;
mod dualpipe;
mod dualpipev;
mod gpipe;
mod one_f_one_b;
pub mod svg;
pub mod timeline;
mod zb1p;

use std::fmt;
use std::str::FromStr;

use serde_json::{Value, json};

pub use check::{Blocked, CheckError, check};
pub use timeline::{Costs, Span, Timeline, simulate, simulate_by};

/// The schedule families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// All forwards, then all (full) backwards.
    GPipe,
    /// One-forward-one-backward (PipeDream-flush), full backwards.
    OneF1B,
    /// Zero-bubble ZB-H1: 1F1B with `W` split off and delayed to fill the drain bubble.
    Zb1p,
    /// DualPipe: two directions, overlapped F&B pairs in the steady state.
    DualPipe,
    /// DualPipeV: DualPipe "cut in half", one direction folded into a V over `2·pp` stages.
    DualPipeV,
}

impl Kind {
    /// Every kind, in CLI order.
    pub const ALL: [Kind; 5] = [
        Kind::GPipe,
        Kind::OneF1B,
        Kind::Zb1p,
        Kind::DualPipe,
        Kind::DualPipeV,
    ];

    /// The CLI / JSON name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::GPipe => "gpipe",
            Kind::OneF1B => "1f1b",
            Kind::Zb1p => "zb1p",
            Kind::DualPipe => "dualpipe",
            Kind::DualPipeV => "dualpipev",
        }
    }

    /// How many stages the model is cut into for `pp` ranks.
    pub fn stages(self, pp: usize) -> usize {
        match self {
            Kind::DualPipeV => 2 * pp,
            _ => pp,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| ScheduleError::UnknownKind(s.to_string()))
    }
}

/// A unit operation on one (chunk, stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Forward.
    F,
    /// Backward for input.
    B,
    /// Backward for weights.
    W,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::F => "F",
            Op::B => "B",
            Op::W => "W",
        })
    }
}

/// One (op, chunk, stage): what the checker counts and the simulator times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Unit {
    pub op: Op,
    pub chunk: usize,
    pub stage: usize,
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(chunk {}, stage {})", self.op, self.chunk, self.stage)
    }
}

/// One step of a rank's list. See the module docs for what each performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    F {
        chunk: usize,
        stage: usize,
    },
    B {
        chunk: usize,
        stage: usize,
    },
    W {
        chunk: usize,
        stage: usize,
    },
    /// A full backward, `B` and `W` of one (chunk, stage) as one indivisible step: the input
    /// gradient leaves only when the weight gradient is done too (as autograd runs it).
    BW {
        chunk: usize,
        stage: usize,
    },
    /// Overlapped pair: forward of `f = (chunk, stage)` with the full backward (B and W) of `b`.
    FB {
        f: (usize, usize),
        b: (usize, usize),
    },
}

impl Action {
    /// The same action on chunk `s·c + j` for each of its chunks `c` (see [`Schedule::split`]).
    pub fn on_sub_batch(&self, s: usize, j: usize) -> Action {
        let sub = |c: &mut usize| *c = *c * s + j;
        let mut a = *self;
        match &mut a {
            Action::F { chunk, .. }
            | Action::B { chunk, .. }
            | Action::W { chunk, .. }
            | Action::BW { chunk, .. } => sub(chunk),
            Action::FB { f, b } => {
                sub(&mut f.0);
                sub(&mut b.0);
            }
        }
        a
    }

    /// `"F"`, `"B"`, `"W"` or `"FB"`.
    pub fn op_name(&self) -> &'static str {
        match self {
            Action::F { .. } => "F",
            Action::B { .. } => "B",
            Action::W { .. } => "W",
            Action::BW { .. } => "BW",
            Action::FB { .. } => "FB",
        }
    }

    /// The unit operations this action performs (three for `FB`).
    pub fn units(&self) -> Vec<Unit> {
        let u = |op, (chunk, stage): (usize, usize)| Unit { op, chunk, stage };
        match *self {
            Action::F { chunk, stage } => vec![u(Op::F, (chunk, stage))],
            Action::B { chunk, stage } => vec![u(Op::B, (chunk, stage))],
            Action::W { chunk, stage } => vec![u(Op::W, (chunk, stage))],
            Action::BW { chunk, stage } => vec![u(Op::B, (chunk, stage)), u(Op::W, (chunk, stage))],
            Action::FB { f, b } => vec![u(Op::F, f), u(Op::B, b), u(Op::W, b)],
        }
    }

    /// A short label with chunk ids, as in the report's figure: `"F3"`, `"B3"`, `"3|12"` (FB).
    pub fn label(&self) -> String {
        match *self {
            Action::F { chunk, .. }
            | Action::B { chunk, .. }
            | Action::W { chunk, .. }
            | Action::BW { chunk, .. } => {
                format!("{}{}", self.op_name(), chunk)
            }
            Action::FB { f, b } => format!("{}|{}", f.0, b.0),
        }
    }

    fn json(&self) -> Value {
        match *self {
            Action::F { chunk, stage }
            | Action::B { chunk, stage }
            | Action::W { chunk, stage }
            | Action::BW { chunk, stage } => {
                json!({"op": self.op_name(), "chunk": chunk, "stage": stage})
            }
            Action::FB { f, b } => json!({
                "op": "FB",
                "f": {"chunk": f.0, "stage": f.1},
                "b": {"chunk": b.0, "stage": b.1},
            }),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::F { chunk, stage }
            | Action::B { chunk, stage }
            | Action::W { chunk, stage }
            | Action::BW { chunk, stage } => {
                write!(f, "{}(chunk {chunk}, stage {stage})", self.op_name())
            }
            Action::FB { f: a, b } => write!(
                f,
                "FB(F chunk {} stage {} + B chunk {} stage {})",
                a.0, a.1, b.0, b.1
            ),
        }
    }
}

/// Why [`build`] refused its parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("unknown schedule kind {0:?} (expected gpipe, 1f1b, zb1p, dualpipe or dualpipev)")]
    UnknownKind(String),
    #[error("pp must be at least 1, got 0")]
    ZeroPp,
    #[error("chunks must be at least 1, got 0")]
    ZeroChunks,
    #[error("{kind} needs an even pp (rank r pairs stage r with stage pp-1-r), got pp={pp}")]
    OddPp { kind: Kind, pp: usize },
    #[error("{kind} needs an even number of chunks (half are fed from each end), got {chunks}")]
    OddChunks { kind: Kind, chunks: usize },
    #[error("{kind} needs chunks >= {min} for pp={pp} ({why}), got chunks={chunks}")]
    TooFewChunks {
        kind: Kind,
        pp: usize,
        chunks: usize,
        min: usize,
        why: &'static str,
    },
}

/// Every rank's ordered action list for one training step.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: Kind,
    /// Pipeline ranks.
    pub pp: usize,
    /// Micro-batches.
    pub chunks: usize,
    /// `ranks[r]` is what rank `r` runs, in order.
    pub ranks: Vec<Vec<Action>>,
}

impl Schedule {
    /// How many stages the model is cut into.
    pub fn stages(&self) -> usize {
        self.kind.stages(self.pp)
    }

    /// The rank that holds `stage` for `chunk` (see the module docs).
    pub fn rank_of(&self, chunk: usize, stage: usize) -> usize {
        match self.kind {
            Kind::GPipe | Kind::OneF1B | Kind::Zb1p => stage,
            Kind::DualPipe => {
                if chunk < self.chunks / 2 {
                    stage
                } else {
                    self.pp - 1 - stage
                }
            }
            Kind::DualPipeV => {
                if stage < self.pp {
                    stage
                } else {
                    2 * self.pp - 1 - stage
                }
            }
        }
    }

    /// Each micro-batch as `s` sub-batches: chunk `c` becomes chunks `s·c .. s·c + s`, and each
    /// action becomes `s` actions, one per sub-batch, side by side in the list. The order between
    /// a chunk's actions is the original one for each sub-batch, so the split schedule is as
    /// dependency-correct and deadlock-free as the original (the checker proves it), and one
    /// action at a time it holds at most `s` times the original's peak in sub-batches (`s − 1`
    /// fewer where the peak is an F&B pair's: the split pairs free in turn): no more activation
    /// memory. Every sub-batch keeps its micro-batch's direction through DualPipe.
    pub fn split(&self, s: usize) -> Schedule {
        let s = s.max(1);
        Schedule {
            kind: self.kind,
            pp: self.pp,
            chunks: self.chunks * s,
            ranks: self
                .ranks
                .iter()
                .map(|acts| {
                    acts.iter()
                        .flat_map(|a| (0..s).map(move |j| a.on_sub_batch(s, j)))
                        .collect()
                })
                .collect(),
        }
    }

    /// The CLI's JSON: kind, pp, chunks, every rank's actions (with start and end times),
    /// per-rank bubble, makespan and peak activations.
    pub fn to_json(&self, timeline: &Timeline) -> Value {
        let ranks: Vec<Value> = self
            .ranks
            .iter()
            .enumerate()
            .map(|(r, acts)| {
                let actions: Vec<Value> = acts
                    .iter()
                    .zip(&timeline.spans[r])
                    .map(|(a, span)| {
                        let mut v = a.json();
                        v["start"] = json!(span.start);
                        v["end"] = json!(span.end);
                        v
                    })
                    .collect();
                json!({"rank": r, "actions": actions})
            })
            .collect();
        json!({
            "kind": self.kind.name(),
            "pp": self.pp,
            "chunks": self.chunks,
            "stages": self.stages(),
            "ranks": ranks,
            "bubble": timeline.bubble,
            "makespan": timeline.makespan,
            "peak_activations": timeline.peak_activations,
        })
    }
}

/// Build a schedule of `kind` for `pp` ranks and `chunks` micro-batches.
///
/// Refused: `pp = 0`, `chunks = 0`; for 1F1B and ZB1P `chunks < pp` (the steady state never
/// fills the pipeline); for DualPipe an odd `pp`, an odd `chunks` or `chunks < 2·pp`; for
/// DualPipeV `chunks < 2·pp`. (Both DualPipes need at least one steady-state F&B step on the
/// outermost rank: `chunks/2 ≥ pp` per direction resp. `chunks ≥ 2·pp` through the V.)
pub fn build(kind: Kind, pp: usize, chunks: usize) -> Result<Schedule, ScheduleError> {
    validate(kind, pp, chunks)?;
    let ranks = match kind {
        Kind::GPipe => gpipe::build(pp, chunks),
        Kind::OneF1B => one_f_one_b::build(pp, chunks),
        Kind::Zb1p => zb1p::build(pp, chunks),
        Kind::DualPipe => dualpipe::build(pp, chunks),
        Kind::DualPipeV => dualpipev::build(pp, chunks),
    };
    Ok(Schedule {
        kind,
        pp,
        chunks,
        ranks,
    })
}

fn validate(kind: Kind, pp: usize, chunks: usize) -> Result<(), ScheduleError> {
    if pp == 0 {
        return Err(ScheduleError::ZeroPp);
    }
    if chunks == 0 {
        return Err(ScheduleError::ZeroChunks);
    }
    let too_few = |min, why| ScheduleError::TooFewChunks {
        kind,
        pp,
        chunks,
        min,
        why,
    };
    match kind {
        Kind::GPipe => {}
        Kind::OneF1B | Kind::Zb1p => {
            if chunks < pp {
                return Err(too_few(pp, "one micro-batch in flight per stage"));
            }
        }
        Kind::DualPipe => {
            if pp % 2 == 1 {
                return Err(ScheduleError::OddPp { kind, pp });
            }
            if chunks % 2 == 1 {
                return Err(ScheduleError::OddChunks { kind, chunks });
            }
            if chunks < 2 * pp {
                return Err(too_few(2 * pp, "pp micro-batches fed from each end"));
            }
        }
        Kind::DualPipeV => {
            if chunks < 2 * pp {
                return Err(too_few(2 * pp, "the V's warm-up holds 2*pp micro-batches"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;

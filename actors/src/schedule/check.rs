//! Proves a [`Schedule`] correct: every (op, chunk, stage) runs exactly once, on the rank that
//! holds the stage, and the ranks, each running its list strictly in order, all finish.
//!
//! Dependencies of the unit operations (`S` stages):
//! - `F(c, s)` needs `F(c, s−1)` (for `s > 0`);
//! - `B(c, s)` needs `F(c, s)` and `B(c, s+1)` (for `s < S−1`);
//! - `W(c, s)` needs `B(c, s)`.
//!
//! An action may start once every dependency of its units, other than its own units, is done
//! (an `FB` pair's `W(b)` needs its own `B(b)`, which it performs). Deadlock freedom is shown by
//! replaying: each round, every rank runs as many actions from the head of its list as are
//! ready; if a round makes no progress before all lists are done, the heads of the unfinished
//! lists are reported with what they wait for. Communication is buffered (see the module docs
//! of `schedule`), so data dependencies are the only constraints.

use std::fmt;

use super::{Action, Op, Schedule, Unit};

/// A rank that cannot progress: the action at the head of its list and what it waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub rank: usize,
    /// Index of the action in the rank's list.
    pub index: usize,
    pub action: Action,
    pub waiting_for: Vec<Unit>,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {} at #{} {} waits for ",
            self.rank, self.index, self.action
        )?;
        for (i, u) in self.waiting_for.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{u}")?;
        }
        Ok(())
    }
}

fn list_blocked(blocked: &[Blocked]) -> String {
    blocked
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a schedule is not correct.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("the schedule has {got} rank lists, expected pp={pp}")]
    RankCount { got: usize, pp: usize },
    #[error("rank {rank}: {unit} is out of range ({chunks} chunks, {stages} stages)")]
    OutOfRange {
        rank: usize,
        unit: Unit,
        chunks: usize,
        stages: usize,
    },
    #[error("rank {rank}: {unit} belongs on rank {expected}")]
    Misplaced {
        rank: usize,
        unit: Unit,
        expected: usize,
    },
    #[error("{unit} runs twice (ranks {first} and {second})")]
    Duplicate {
        unit: Unit,
        first: usize,
        second: usize,
    },
    #[error("{unit} never runs")]
    Missing { unit: Unit },
    #[error("deadlock with {done} of {total} actions done: {}", list_blocked(.blocked))]
    Deadlock {
        done: usize,
        total: usize,
        blocked: Vec<Blocked>,
    },
}

/// A dense table over (op, chunk, stage).
#[derive(Debug, Clone)]
pub(crate) struct Table<T> {
    chunks: usize,
    stages: usize,
    cells: Vec<T>,
}

impl<T: Clone> Table<T> {
    pub(crate) fn new(chunks: usize, stages: usize, fill: T) -> Self {
        Table {
            chunks,
            stages,
            cells: vec![fill; 3 * chunks * stages],
        }
    }

    fn index(&self, u: Unit) -> usize {
        let op = match u.op {
            Op::F => 0,
            Op::B => 1,
            Op::W => 2,
        };
        (op * self.chunks + u.chunk) * self.stages + u.stage
    }

    pub(crate) fn get(&self, u: Unit) -> &T {
        &self.cells[self.index(u)]
    }

    pub(crate) fn set(&mut self, u: Unit, v: T) {
        let i = self.index(u);
        self.cells[i] = v;
    }
}

/// What `u` needs done first, for a model of `stages` stages.
pub fn unit_deps(u: Unit, stages: usize) -> Vec<Unit> {
    let at = |op, stage| Unit {
        op,
        chunk: u.chunk,
        stage,
    };
    match u.op {
        Op::F if u.stage > 0 => vec![at(Op::F, u.stage - 1)],
        Op::F => vec![],
        Op::B if u.stage + 1 < stages => vec![at(Op::F, u.stage), at(Op::B, u.stage + 1)],
        Op::B => vec![at(Op::F, u.stage)],
        Op::W => vec![at(Op::B, u.stage)],
    }
}

/// What `action` needs done before it starts (its units' dependencies, less its own units).
pub fn action_deps(action: &Action, stages: usize) -> Vec<Unit> {
    let own = action.units();
    let mut deps: Vec<Unit> = own
        .iter()
        .flat_map(|u| unit_deps(*u, stages))
        .filter(|d| !own.contains(d))
        .collect();
    deps.sort();
    deps.dedup();
    deps
}

/// Check `schedule`: placement, exactly-once, dependency order and deadlock freedom.
pub fn check(schedule: &Schedule) -> Result<(), CheckError> {
    let (chunks, stages) = (schedule.chunks, schedule.stages());
    if schedule.ranks.len() != schedule.pp {
        return Err(CheckError::RankCount {
            got: schedule.ranks.len(),
            pp: schedule.pp,
        });
    }
    let mut seen: Table<Option<usize>> = Table::new(chunks, stages, None);
    for (rank, acts) in schedule.ranks.iter().enumerate() {
        for unit in acts.iter().flat_map(Action::units) {
            if unit.chunk >= chunks || unit.stage >= stages {
                return Err(CheckError::OutOfRange {
                    rank,
                    unit,
                    chunks,
                    stages,
                });
            }
            let expected = schedule.rank_of(unit.chunk, unit.stage);
            if expected != rank {
                return Err(CheckError::Misplaced {
                    rank,
                    unit,
                    expected,
                });
            }
            if let Some(first) = *seen.get(unit) {
                return Err(CheckError::Duplicate {
                    unit,
                    first,
                    second: rank,
                });
            }
            seen.set(unit, Some(rank));
        }
    }
    for op in [Op::F, Op::B, Op::W] {
        for chunk in 0..chunks {
            for stage in 0..stages {
                let unit = Unit { op, chunk, stage };
                if seen.get(unit).is_none() {
                    return Err(CheckError::Missing { unit });
                }
            }
        }
    }
    replay(schedule)
}

/// Run every rank's list in order, an action only once its dependencies are done.
fn replay(schedule: &Schedule) -> Result<(), CheckError> {
    let stages = schedule.stages();
    let mut done = Table::new(schedule.chunks, stages, false);
    let mut next = vec![0usize; schedule.pp];
    let total: usize = schedule.ranks.iter().map(Vec::len).sum();
    let mut finished = 0;
    loop {
        let mut progress = false;
        for (rank, acts) in schedule.ranks.iter().enumerate() {
            while let Some(action) = acts.get(next[rank]) {
                if !action_deps(action, stages).iter().all(|d| *done.get(*d)) {
                    break;
                }
                for u in action.units() {
                    done.set(u, true);
                }
                next[rank] += 1;
                finished += 1;
                progress = true;
            }
        }
        if finished == total {
            return Ok(());
        }
        if !progress {
            let blocked = schedule
                .ranks
                .iter()
                .enumerate()
                .filter_map(|(rank, acts)| {
                    let action = *acts.get(next[rank])?;
                    let waiting_for = action_deps(&action, stages)
                        .into_iter()
                        .filter(|d| !*done.get(*d))
                        .collect();
                    Some(Blocked {
                        rank,
                        index: next[rank],
                        action,
                        waiting_for,
                    })
                })
                .collect();
            return Err(CheckError::Deadlock {
                done: finished,
                total,
                blocked,
            });
        }
    }
}

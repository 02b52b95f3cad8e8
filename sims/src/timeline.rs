//! A simulated step's pipeline, read back from its trace, beside the schedule's own timeline
//! (`flotilla schedule`): the schedule's timeline is what the ranks' action lists cost when
//! every F, B and W of a stage takes the time the simulated device charged for it and nothing
//! else takes any; the trace is what the actors did. On a free link (no transfer time) the two
//! must agree rank by rank, which is how the simulator's scheduling is tested.
//!
//! The pipeline of a rank is its `forward`, `B` and `W` jobs; its **bubble** is the pipeline's
//! makespan (first such job's start to last one's end, over the pipeline's ranks) less the
//! rank's time in them, as [`flotilla_actors::schedule::Timeline`] counts it.

use std::collections::BTreeMap;

use flotilla_actors::pipeline::kind_of;
use flotilla_actors::schedule::{self, Action, Op, Timeline};
use flotilla_runtime::config::Config;
use flotilla_runtime::topology::Coord;
use serde_json::Value;

/// Why a trace or a schedule cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    #[error("trace.json: {0}")]
    Trace(String),
    #[error("the schedule: {0}")]
    Schedule(String),
}

/// One job of the trace, in seconds since the step began.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSpan {
    /// `forward`, `B`, `W`, `experts`, `gradients`, `step`, …
    pub what: String,
    pub chunk: usize,
    /// The pipeline stage the job worked for, if one.
    pub stage: Option<usize>,
    pub start: f64,
    pub end: f64,
}

impl TraceSpan {
    pub fn seconds(&self) -> f64 {
        self.end - self.start
    }

    /// The pipeline op of the job (F, B or W), if it is one.
    pub fn op(&self) -> Option<Op> {
        match self.what.as_str() {
            "forward" => Some(Op::F),
            "B" => Some(Op::B),
            "W" => Some(Op::W),
            _ => None,
        }
    }
}

/// The trace's jobs, by job rank (the Chrome trace's process id).
pub fn spans(trace: &[u8]) -> Result<Vec<Vec<TraceSpan>>, TimelineError> {
    let v: Value =
        serde_json::from_slice(trace).map_err(|e| TimelineError::Trace(e.to_string()))?;
    let events = v["traceEvents"]
        .as_array()
        .ok_or_else(|| TimelineError::Trace("no traceEvents array".into()))?;
    let mut out: Vec<Vec<TraceSpan>> = Vec::new();
    for e in events.iter().filter(|e| e["ph"] == "X") {
        let bad = || TimelineError::Trace(format!("malformed event {e}"));
        let pid = usize::try_from(e["pid"].as_u64().ok_or_else(bad)?).map_err(|_| bad())?;
        let chunk =
            usize::try_from(e["args"]["chunk"].as_u64().ok_or_else(bad)?).map_err(|_| bad())?;
        let stage = e["args"]["stage"]
            .as_u64()
            .and_then(|s| usize::try_from(s).ok());
        let (ts, dur) = (
            e["ts"].as_f64().ok_or_else(bad)?,
            e["dur"].as_f64().ok_or_else(bad)?,
        );
        if out.len() <= pid {
            out.resize(pid + 1, Vec::new());
        }
        out[pid].push(TraceSpan {
            what: e["cat"].as_str().ok_or_else(bad)?.to_string(),
            chunk,
            stage,
            start: ts * 1e-6,
            end: (ts + dur) * 1e-6,
        });
    }
    Ok(out)
}

/// The pipeline of one step as the trace shows it, for the pipeline of data rank 0 and expert
/// rank 0 (index = pipeline rank).
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub makespan: f64,
    pub busy: Vec<f64>,
    pub bubble: Vec<f64>,
    /// Mean seconds of each (op, stage)'s jobs.
    pub costs: BTreeMap<(Op, usize), f64>,
    /// The largest relative deviation of one F, B or W from its (op, stage)'s mean.
    pub spread: f64,
}

impl Measured {
    /// What `action` costs: its units' means (an F&B pair shares one compute stream, so with
    /// nothing to overlap it costs its parts).
    pub fn cost(&self, action: &Action) -> f64 {
        action
            .units()
            .iter()
            .map(|u| self.costs.get(&(u.op, u.stage)).copied().unwrap_or(0.0))
            .sum()
    }
}

/// Read the pipeline of `cfg`'s job from its trace's `spans`.
pub fn measure(cfg: &Config, spans: &[Vec<TraceSpan>]) -> Result<Measured, TimelineError> {
    let topo = flotilla_actors::replicas::topology(cfg)
        .map_err(|e| TimelineError::Schedule(e.to_string()))?;
    let ranks: Vec<Vec<&TraceSpan>> = (0..cfg.parallel.pp)
        .map(|p| {
            let r = topo.rank_of(Coord {
                pp: p,
                dp: 0,
                ep: 0,
            });
            let of_rank = spans.get(r).map(Vec::as_slice).unwrap_or(&[]);
            of_rank.iter().filter(|s| s.op().is_some()).collect()
        })
        .collect();
    let all = || ranks.iter().flatten();
    let t0 = all().map(|s| s.start).fold(f64::INFINITY, f64::min);
    let t1 = all().map(|s| s.end).fold(f64::NEG_INFINITY, f64::max);
    if !t0.is_finite() || !t1.is_finite() {
        return Err(TimelineError::Trace("no forward, B or W jobs".into()));
    }
    let mut by: BTreeMap<(Op, usize), Vec<f64>> = BTreeMap::new();
    for s in all() {
        let (Some(op), Some(stage)) = (s.op(), s.stage) else {
            return Err(TimelineError::Trace(format!(
                "a {} job without its stage",
                s.what
            )));
        };
        by.entry((op, stage)).or_default().push(s.seconds());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let costs: BTreeMap<(Op, usize), f64> = by.iter().map(|(k, v)| (*k, mean(v))).collect();
    let mut spread = 0.0f64;
    for (k, v) in &by {
        let m = costs[k];
        for x in v {
            spread = spread.max((x - m).abs() / m.max(f64::MIN_POSITIVE));
        }
    }
    let busy: Vec<f64> = ranks
        .iter()
        .map(|s| s.iter().map(|s| s.seconds()).sum())
        .collect();
    let makespan = t1 - t0;
    Ok(Measured {
        makespan,
        bubble: busy.iter().map(|b| makespan - b).collect(),
        busy,
        costs,
        spread,
    })
}

/// The timeline of `cfg`'s schedule (as `flotilla schedule` draws it) with the costs
/// `measured` and no transfer time.
pub fn scheduled(cfg: &Config, measured: &Measured) -> Result<Timeline, TimelineError> {
    let p = &cfg.parallel;
    let sched = schedule::build(kind_of(p.schedule), p.pp, p.micro_batches)
        .map_err(|e| TimelineError::Schedule(e.to_string()))?
        .split(p.sub_batches.max(1));
    schedule::simulate_by(&sched, &|a: &Action| measured.cost(a), 0.0)
        .map_err(|e| TimelineError::Schedule(e.to_string()))
}

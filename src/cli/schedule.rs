//! `flotilla schedule`: build a pipeline schedule (GPipe, 1F1B, ZB1P, DualPipe, DualPipeV),
//! prove it correct and deadlock-free, time it under a cost model, then print it as a table or
//! JSON and optionally draw it as SVG.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use flotilla_actors::schedule::{self, Costs, Kind, svg};

/// Arguments of `flotilla schedule`.
#[derive(Debug, clap::Args)]
pub struct ScheduleArgs {
    /// Schedule kind: gpipe, 1f1b, zb1p, dualpipe or dualpipev.
    #[arg(long, value_parser = parse_kind)]
    pub kind: Kind,
    /// Pipeline ranks.
    #[arg(long)]
    pub pp: usize,
    /// Micro-batches per step.
    #[arg(long)]
    pub chunks: usize,
    /// Print the schedule, its timings, per-rank bubble and makespan as JSON.
    #[arg(long)]
    pub json: bool,
    /// Draw the timeline to this SVG file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Cost of a forward chunk (F).
    #[arg(long, default_value_t = 1.0)]
    pub cost_f: f64,
    /// Cost of a backward-for-input chunk (B); the report's full backward is B + W.
    #[arg(long, default_value_t = 1.0)]
    pub cost_b: f64,
    /// Cost of a backward-for-weights chunk (W).
    #[arg(long, default_value_t = 1.0)]
    pub cost_w: f64,
    /// Cost of an overlapped forward + full-backward pair (F&B); default F + B + W.
    #[arg(long)]
    pub cost_fb: Option<f64>,
    /// Latency of an activation or gradient between ranks.
    #[arg(long, default_value_t = 0.0)]
    pub cost_comm: f64,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    s.parse()
        .map_err(|e: schedule::ScheduleError| e.to_string())
}

/// Build, check, time and print the schedule.
pub fn run(args: ScheduleArgs) -> Result<ExitCode> {
    let costs = Costs {
        f: args.cost_f,
        b: args.cost_b,
        w: args.cost_w,
        fb: args
            .cost_fb
            .unwrap_or(args.cost_f + args.cost_b + args.cost_w),
        comm: args.cost_comm,
    };
    for (name, v) in [
        ("--cost-f", costs.f),
        ("--cost-b", costs.b),
        ("--cost-w", costs.w),
        ("--cost-fb", costs.fb),
        ("--cost-comm", costs.comm),
    ] {
        anyhow::ensure!(
            v.is_finite() && v >= 0.0,
            "{name} must be a finite, non-negative number, got {v}"
        );
    }
    let sched = schedule::build(args.kind, args.pp, args.chunks)?;
    let timeline = schedule::simulate(&sched, &costs)
        .with_context(|| format!("{} schedule is not correct", args.kind))?;
    if let Some(path) = &args.svg {
        std::fs::write(path, svg::render(&sched, &timeline, &costs))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", sched.to_json(&timeline));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} pp={} chunks={} stages={} makespan={:.3}  (F={} B={} W={} F&B={} comm={})",
        sched.kind,
        sched.pp,
        sched.chunks,
        sched.stages(),
        timeline.makespan,
        costs.f,
        costs.b,
        costs.w,
        costs.fb,
        costs.comm
    );
    println!(
        "{:>4}  {:>7}  {:>10}  {:>10}  {:>9}  actions",
        "rank", "actions", "busy", "bubble", "peak act"
    );
    for (r, acts) in sched.ranks.iter().enumerate() {
        let head: Vec<String> = acts.iter().take(12).map(|a| a.label()).collect();
        let more = if acts.len() > head.len() { " …" } else { "" };
        println!(
            "{r:>4}  {:>7}  {:>10.3}  {:>10.3}  {:>9}  {}{more}",
            acts.len(),
            timeline.busy[r],
            timeline.bubble[r],
            timeline.peak_activations[r],
            head.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

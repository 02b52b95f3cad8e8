//! `flotilla bench sim`: the simulated cluster at scale. Runs a job whose config says
//! `device = "sim"` (by default `configs/deepseek-v3-128.toml`: 128 ranks, DualPipe over
//! PP 8 × EP 8 × DP 2, the DeepSeek-V3 report's dimensions for 16 layers) through the same
//! actors, schedules, collectives and checkpoint engine as `flotilla train`, with shape-only
//! tensors on tokio's paused clock, and reports what running it costs this machine (wall time,
//! peak resident memory) beside what it simulates (virtual seconds per step, the ranks'
//! bubble, MFU against the simulated device's peak). `events_sha256` hashes the run's event log
//! and the trace of its last step: two runs of the same config give the same hash (the
//! simulation is deterministic: one thread, virtual time, ordered maps).
//!
//! The run's files go to simulated storage (nothing is written here) unless `--out` names a
//! directory, where `metrics.jsonl`, `events.jsonl`, `summary.json` and `trace.json` (Chrome
//! trace format, opens in Perfetto) are written.

use std::path::Path;

use anyhow::Result;
use flotilla_runtime::config::Config;
use serde_json::json;

use super::Report;
use super::step::peak_rss_mib;

/// Run `cfg` (a simulated-cluster config) to its end; the report.
pub fn run(cfg: Config, out: Option<&Path>) -> Result<Report> {
    let ranks = cfg.world_size();
    let run = flotilla_sims::run(cfg, out)?;
    let mut report = Report::default();
    for r in &run.records {
        report.push(json!({
            "bench": "sim_step", "step": r.stats.step, "virtual_step_s": r.step_seconds,
            "bubble_fraction": r.bubble_fraction, "tokens": r.stats.tokens,
            "tokens_per_virtual_s": r.tokens_per_s,
        }));
    }
    let s = &run.summary;
    report.push(json!({"summary": {
        "ranks": ranks,
        "wall_s": run.wall_s,
        "peak_rss_mib": peak_rss_mib(),
        "virtual_step_s": s.step_s,
        "bubble_fraction": s.bubble_fraction,
        "mfu": s.mfu,
        // Over the steps alone; the run's own figure also counts start-up and the wait for
        // the last checkpoint's write at the end.
        "tokens_per_virtual_s": s.tokens as f64 / (s.step_s * s.steps as f64).max(1e-12),
        "virtual_run_s": s.seconds,
        "checkpoints": run.checkpoint_events(),
        "events_sha256": run.events_sha256,
    }}));
    Ok(report)
}

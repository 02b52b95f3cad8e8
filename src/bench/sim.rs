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
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use flotilla_actors::StepRecord;
use flotilla_runtime::clock::VirtualClock;
use flotilla_runtime::config::{Config, DeviceKind};
use flotilla_runtime::storage::Storage;
use flotilla_runtime::storage::local::LocalStorage;
use flotilla_runtime::storage::sim::SimStorage;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::Report;
use super::step::peak_rss_mib;

/// Run `cfg` (a simulated-cluster config) to its end; the report.
pub fn run(cfg: Config, out: Option<&Path>) -> Result<Report> {
    ensure!(
        cfg.cluster.device == DeviceKind::Sim,
        "bench sim runs the simulated cluster: the config must say cluster.device = \"sim\""
    );
    let ranks = cfg.world_size();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .context("starting the tokio runtime")?;
    let started = Instant::now();
    let storage: Arc<dyn Storage> = match out {
        Some(dir) => Arc::new(LocalStorage::new(dir)),
        None => Arc::new(SimStorage::unlimited()),
    };
    let mut report = Report::default();
    let (summary, records, events, trace) = rt.block_on(async {
        let mut records = Vec::new();
        let summary = flotilla_actors::train(
            cfg,
            Arc::clone(&storage),
            Arc::new(VirtualClock),
            &mut |r: &StepRecord| records.push(r.clone()),
        )
        .await?;
        let events = storage.get("events.jsonl").await?;
        let trace = storage.get("trace.json").await?;
        anyhow::Ok((summary, records, events, trace))
    })?;
    let wall_s = started.elapsed().as_secs_f64();
    for r in &records {
        report.push(json!({
            "bench": "sim_step", "step": r.stats.step, "virtual_step_s": r.step_seconds,
            "bubble_fraction": r.bubble_fraction, "tokens": r.stats.tokens,
            "tokens_per_virtual_s": r.tokens_per_s,
        }));
    }
    let commits: Vec<String> = String::from_utf8_lossy(&events)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["child"] == "checkpoint")
        .filter_map(|v| v["event"].as_str().map(str::to_string))
        .collect();
    let mut h = Sha256::new();
    h.update(&events);
    h.update(&trace);
    let events_sha256: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    report.push(json!({"summary": {
        "ranks": ranks,
        "wall_s": wall_s,
        "peak_rss_mib": peak_rss_mib(),
        "virtual_step_s": summary.step_s,
        "bubble_fraction": summary.bubble_fraction,
        "mfu": summary.mfu,
        // Over the steps alone; the run's own figure also counts start-up and the wait for
        // the last checkpoint's write at the end.
        "tokens_per_virtual_s": summary.tokens as f64 / (summary.step_s * summary.steps as f64).max(1e-12),
        "virtual_run_s": summary.seconds,
        "checkpoints": commits,
        "events_sha256": events_sha256,
    }}));
    Ok(report)
}

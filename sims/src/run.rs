//! One simulated job, start to end, on its own single-threaded runtime with tokio's clock
//! paused: deterministic (one thread, virtual time, ordered maps), so two runs of a config give
//! the same event log and trace, which [`SimRun::events_sha256`] pins.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use flotilla_actors::{JobError, StepRecord, Summary};
use flotilla_runtime::clock::VirtualClock;
use flotilla_runtime::config::{Config, DeviceKind};
use flotilla_runtime::storage::local::LocalStorage;
use flotilla_runtime::storage::sim::SimStorage;
use flotilla_runtime::storage::{Storage, StorageError};
use sha2::{Digest, Sha256};

/// Why a simulated run failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(
        "the simulated cluster runs configs with cluster.device = \"sim\" (this one says {0:?})"
    )]
    NotSimulated(DeviceKind),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("reading the run's files back: {0}")]
    Storage(#[from] StorageError),
}

/// What a simulated run did.
#[derive(Debug, Clone)]
pub struct SimRun {
    pub summary: Summary,
    /// Every step's record, in order.
    pub records: Vec<StepRecord>,
    /// `events.jsonl`.
    pub events: Vec<u8>,
    /// `trace.json` (the last step, Chrome trace format, virtual µs).
    pub trace: Vec<u8>,
    /// SHA-256 of the event log followed by the trace, hex.
    pub events_sha256: String,
    /// Wall seconds the run took this machine.
    pub wall_s: f64,
}

impl SimRun {
    /// The lines of `events.jsonl` whose `child` is `checkpoint` (saves, commits, restores).
    pub fn checkpoint_events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.events)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["child"] == "checkpoint")
            .filter_map(|v| v["event"].as_str().map(str::to_string))
            .collect()
    }
}

/// Run `cfg` (whose `cluster.device` must be `sim`) to its end. The run's files go to
/// simulated storage, or to the local directory `out` when given.
pub fn run(cfg: Config, out: Option<&Path>) -> Result<SimRun, SimError> {
    if cfg.cluster.device != DeviceKind::Sim {
        return Err(SimError::NotSimulated(cfg.cluster.device));
    }
    // Timers only: nothing on the simulated path does socket I/O, and without an I/O driver an
    // idle runtime advances its paused clock without a system call.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()?;
    let started = Instant::now();
    let storage: Arc<dyn Storage> = match out {
        Some(dir) => Arc::new(LocalStorage::new(dir)),
        None => Arc::new(SimStorage::unlimited()),
    };
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
        Ok::<_, SimError>((summary, records, events, trace))
    })?;
    let wall_s = started.elapsed().as_secs_f64();
    let mut h = Sha256::new();
    h.update(&events);
    h.update(&trace);
    let events_sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(SimRun {
        summary,
        records,
        events,
        trace,
        events_sha256,
        wall_s,
    })
}

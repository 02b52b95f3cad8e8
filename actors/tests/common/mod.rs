//! What the job tests share: run a job with injected faults on simulated storage, and keep what
//! it did.

use std::sync::Arc;

use flotilla_actors::faults::FaultPlan;
use flotilla_actors::{StepRecord, train_with_faults};
use flotilla_runtime::clock::RealClock;
use flotilla_runtime::config::Config;
use flotilla_runtime::storage::Storage;
use flotilla_runtime::storage::sim::SimStorage;

/// Run `cfg` with `plan`'s faults to its end: its parameter hash, every step's (step, skipped)
/// in the order they ran (a roll-back's replays included), and its `events.jsonl`.
pub async fn run_plan(cfg: Config, plan: FaultPlan) -> (String, Vec<(u64, bool)>, String) {
    cfg.validate().expect("a valid config");
    let storage = Arc::new(SimStorage::unlimited());
    let mut steps = Vec::new();
    let s = train_with_faults(
        cfg,
        storage.clone(),
        Arc::new(RealClock),
        None,
        Some(Arc::new(plan)),
        &mut |r: &StepRecord| steps.push((r.stats.step, r.stats.skipped)),
    )
    .await
    .expect("the job ends");
    let events = storage.get("events.jsonl").await.expect("events");
    (
        s.params_sha256,
        steps,
        String::from_utf8_lossy(&events).into_owned(),
    )
}

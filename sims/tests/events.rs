//! The same small job trained on the CPU (real arithmetic, wall clock) and on the simulated
//! cluster (shapes only, virtual time) goes through the same supervision and step events: the
//! same actors start and stop under the same supervisors, the same checkpoint writers run and
//! the same checkpoints commit, the same steps are recorded, in the same order per actor.
//! Only the numbers differ (losses, bytes, seconds), and the one event that says a simulated
//! checkpoint holds shapes only.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla_actors::{StepRecord, train};
use flotilla_runtime::clock::RealClock;
use flotilla_runtime::config::{Config, DeviceKind, FabricKind, Schedule};
use flotilla_runtime::storage::Storage;
use flotilla_runtime::storage::sim::SimStorage;
use serde_json::Value;

/// DualPipe over pp 2 × ep 2 on the default model, 4 steps, a checkpoint every 2.
fn small() -> Config {
    let mut c = Config::default();
    c.job.steps = 4;
    c.optimizer.warmup_steps = 1;
    c.data.batch_size = 8;
    c.data.seq_len = 16;
    c.parallel.pp = 2;
    c.parallel.ep = 2;
    c.parallel.schedule = Schedule::DualPipe;
    c.parallel.micro_batches = 4;
    c.cluster.ranks_per_host = 4;
    c.cluster.cpu_threads = Some(1);
    c.checkpoint.interval = 2;
    c
}

/// Per (supervisor, child), the kinds of its events in order: a supervision event's variant
/// (`Started`, `Exited`, …), a checkpoint event's words before the first number.
fn kinds(events: &[u8]) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(events).lines() {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        let (sup, child) = (v["supervisor"].as_str(), v["child"].as_str());
        let event = v["event"].as_str().expect("an event");
        if event.contains("is shape-only") {
            continue; // The simulated cluster's own notice.
        }
        let kind: String = if child == Some("checkpoint") {
            // "committed step 2: 123 bytes in 4 files, 0.01 s after hand-off" → "committed step 2"
            event.split(':').next().unwrap_or(event).to_string()
        } else {
            event
                .split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or(event)
                .to_string()
        };
        out.entry((
            sup.unwrap_or("?").to_string(),
            child.unwrap_or("?").to_string(),
        ))
        .or_default()
        .push(kind);
    }
    out
}

#[test]
fn cpu_and_simulated_runs_go_through_the_same_events() {
    let cpu_cfg = small();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let storage = Arc::new(SimStorage::unlimited());
    let mut cpu_steps = Vec::new();
    rt.block_on(train(
        cpu_cfg.clone(),
        storage.clone(),
        Arc::new(RealClock),
        &mut |r: &StepRecord| cpu_steps.push((r.stats.step, r.stats.skipped)),
    ))
    .expect("the CPU job runs");
    let cpu_events = rt
        .block_on(storage.get("events.jsonl"))
        .expect("events.jsonl");

    let mut sim_cfg = cpu_cfg;
    sim_cfg.cluster.device = DeviceKind::Sim;
    sim_cfg.cluster.fabric = FabricKind::Sim;
    let sim = flotilla_sims::run(sim_cfg, None).expect("the simulated job runs");
    let sim_steps: Vec<(u64, bool)> = sim
        .records
        .iter()
        .map(|r| (r.stats.step, r.stats.skipped))
        .collect();

    assert_eq!(
        cpu_steps,
        vec![(0, false), (1, false), (2, false), (3, false)]
    );
    assert_eq!(sim_steps, cpu_steps);
    let (cpu, simulated) = (kinds(&cpu_events), kinds(&sim.events));
    assert!(
        cpu.keys().any(|(s, c)| s == "rank-3" && c == "stage-1"),
        "{:?}",
        cpu.keys()
    );
    assert!(cpu.contains_key(&("ckpt-writers/step-00000004".into(), "writer-3".into())));
    assert_eq!(
        cpu[&("controller".into(), "checkpoint".into())],
        vec!["committed step 2", "committed step 4"]
    );
    assert_eq!(cpu, simulated);
}

#[test]
fn two_simulated_runs_give_the_same_event_log_and_trace() {
    let mut cfg = small();
    cfg.cluster.device = DeviceKind::Sim;
    cfg.cluster.fabric = FabricKind::Sim;
    let a = flotilla_sims::run(cfg.clone(), None).expect("first run");
    let b = flotilla_sims::run(cfg, None).expect("second run");
    assert!(!a.trace.is_empty() && !a.events.is_empty());
    assert_eq!(a.events_sha256, b.events_sha256);
    assert_eq!(a.summary.step_s, b.summary.step_s);
}

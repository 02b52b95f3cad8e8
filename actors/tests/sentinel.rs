//! The sentinel in a real job: a `[sentinel]` section starts it under the controller, every
//! step's statistics go through its detectors, and what they find is a line of `events.jsonl`
//! naming step, kind and (for a collapse) the MoE layer; training is not changed by it. A batch
//! whose loss spikes (or is not finite) is skipped by every rank.

mod common;

use std::sync::Arc;

use flotilla_actors::faults::FaultPlan;
use flotilla_actors::{StepRecord, train};
use flotilla_runtime::clock::RealClock;
use flotilla_runtime::config::{Config, SentinelConfig};
use flotilla_runtime::storage::Storage;
use flotilla_runtime::storage::sim::SimStorage;

/// Two pipeline stages with two experts each on two ranks, 6 steps.
fn cfg(sentinel: Option<SentinelConfig>) -> Config {
    let mut c = Config::default();
    c.job.steps = 6;
    c.optimizer.warmup_steps = 1;
    c.data.batch_size = 4;
    c.data.seq_len = 16;
    c.cluster.cpu_threads = Some(1);
    c.parallel.pp = 2;
    c.parallel.micro_batches = 2;
    c.cluster.ranks_per_host = 2;
    c.checkpoint.interval = 0;
    c.sentinel = sentinel;
    c
}

/// The run's parameter hash and its `events.jsonl` lines from the sentinel, parsed.
async fn run(cfg: Config) -> (String, Vec<serde_json::Value>) {
    cfg.validate().expect("a valid config");
    let storage = Arc::new(SimStorage::unlimited());
    let s = train(
        cfg,
        storage.clone(),
        Arc::new(RealClock),
        &mut |_: &StepRecord| {},
    )
    .await
    .expect("the job ends");
    let events = storage.get("events.jsonl").await.expect("events");
    let lines = String::from_utf8_lossy(&events)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|v| v["child"] == "sentinel")
        .collect();
    (s.params_sha256, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sentinel_reports_what_its_detectors_find_and_changes_nothing() {
    let (plain, none) = run(cfg(None)).await;
    assert!(none.is_empty(), "no sentinel, no findings: {none:?}");

    // Every MoE layer's busiest expert is above the mean (the load is never perfectly even),
    // so with the bar just above 1 every step reports a collapse per MoE layer.
    let strict = SentinelConfig {
        expert_load_max: 1.000_001,
        window: 2,
        ..SentinelConfig::default()
    };
    let (watched, found) = run(cfg(Some(strict))).await;
    assert_eq!(watched, plain, "the sentinel only watches");
    let collapses: Vec<_> = found
        .iter()
        .filter(|v| v["anomaly"]["kind"] == "expert_collapse")
        .collect();
    assert!(!collapses.is_empty(), "{found:?}");
    let steps: std::collections::BTreeSet<u64> = collapses
        .iter()
        .filter_map(|v| v["anomaly"]["step"].as_u64())
        .collect();
    assert_eq!(steps, (0..6).collect(), "one report per step at least");
    for v in &collapses {
        assert!(v["anomaly"]["moe_layer"].is_u64(), "{v}");
        assert!(
            v["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("anomaly: step ") && e.contains("expert_collapse")),
            "{v}"
        );
    }

    // `enabled = false`: no sentinel runs.
    let off = SentinelConfig {
        enabled: false,
        ..SentinelConfig::default()
    };
    let (_, silent) = run(cfg(Some(off))).await;
    assert!(silent.is_empty(), "{silent:?}");
}

/// The run's parameter hash, the steps whose update was skipped, and its events.
async fn run_with(cfg: Config, plan: FaultPlan) -> (String, Vec<u64>, String) {
    let (sha, steps, events) = common::run_plan(cfg, plan).await;
    let skipped = steps.into_iter().filter(|s| s.1).map(|s| s.0).collect();
    (sha, skipped, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiking_or_non_finite_batch_is_skipped_by_every_rank() {
    // A constant learning rate, so that a skipped step changes nothing but its own update.
    let mut c = cfg(Some(SentinelConfig {
        window: 3,
        ..SentinelConfig::default()
    }));
    c.optimizer.schedule = flotilla_runtime::config::LrSchedule::Constant;
    let (plain, none, _) = run_with(c.clone(), FaultPlan::default()).await;
    assert!(none.is_empty(), "a calm run skips nothing");

    // Step 4's loss ×100: above 3 × the mean of the last 3, so every rank skips its update.
    let (spiked, skipped, events) =
        run_with(c.clone(), FaultPlan::default().with_loss_factor(4, 100.0)).await;
    assert_eq!(skipped, [4]);
    assert!(
        events.contains("step 4: update skipped, its batch gave loss")
            && events.contains("a spike above the running mean"),
        "{events}"
    );
    assert!(
        events.contains("\"kind\":\"loss_spike\""),
        "the sentinel reports it too"
    );
    assert_ne!(spiked, plain, "the skipped update is missing");
    // The same parameters as a run of one step fewer whose data omits step 4's batch: the
    // skip took out that batch's update and nothing else.
    let mut shorter = c.clone();
    shorter.job.steps -= 1;
    let (omitted, none, _) = run_with(shorter, FaultPlan::default().with_omitted_batch(4)).await;
    assert!(none.is_empty());
    assert_eq!(spiked, omitted, "a skipped batch is an omitted batch");

    // A NaN loss at step 4: skipped for not being finite, with or without a sentinel; the
    // parameters are those of the spiking run (both skipped exactly step 4's update).
    for sentinel in [true, false] {
        let mut c = c.clone();
        if !sentinel {
            c.sentinel = None;
        }
        let (nan, skipped, events) =
            run_with(c, FaultPlan::default().with_loss_factor(4, f32::NAN)).await;
        assert_eq!(skipped, [4], "sentinel {sentinel}");
        assert!(events.contains("not finite"), "{events}");
        assert_eq!(nan, spiked, "sentinel {sentinel}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_rank_is_reported_as_a_straggler_and_left_running() {
    // Four ranks: two pipeline stages × two data-parallel replicas; rank 3's device is 6 times
    // slower than its peers'.
    let mut c = cfg(Some(SentinelConfig::default()));
    c.job.steps = 4;
    c.parallel.dp = 2;
    c.cluster.ranks_per_host = 4;
    let (plain, _, _) = run_with(c.clone(), FaultPlan::default()).await;
    let (slow, skipped, events) = run_with(c, FaultPlan::default().with_slow_rank(3, 6.0)).await;
    assert_eq!(slow, plain, "a slow rank computes the same bits");
    assert!(skipped.is_empty());
    let lines: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let stragglers: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["anomaly"]["kind"] == "straggler")
        .collect();
    // Rank 3 on (nearly) every step; a peer at most once (busy time is wall time of device
    // work, and a loaded machine may preempt a rank's thread in the middle of a job).
    let named = |rank: u64| {
        stragglers
            .iter()
            .filter(|v| v["anomaly"]["rank"] == rank)
            .count()
    };
    assert!(named(3) >= 3, "rank 3 on 3 of 4 steps at least: {events}");
    for peer in 0..3 {
        assert!(named(peer) <= 1, "rank {peer}: {stragglers:?}");
    }
    // Nothing failed, restarted or rolled back: every child only started (and stopped at the
    // end), and the driver wrote no roll-back.
    for v in &lines {
        let e = v["event"].as_str().unwrap_or("");
        assert!(
            ["Started", "Stopped", "anomaly: "]
                .iter()
                .any(|ok| e.starts_with(ok)),
            "{v}"
        );
    }
}

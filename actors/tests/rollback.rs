//! Rolling a job back in flight: a rank's step fails, every rank is restored to the last
//! committed checkpoint from the fastest sound source (its own memory, a peer's replica or
//! storage), and the job ends with exactly the parameters of the run that never failed.

mod common;

use std::sync::Arc;

use flotilla_actors::faults::{FaultPlan, InjectedFault, StagePanic};
use flotilla_actors::{StepRecord, train_with_faults};
use flotilla_runtime::clock::RealClock;
use flotilla_runtime::config::{CheckpointMode, Config, Schedule};
use flotilla_runtime::storage::Storage;
use flotilla_runtime::storage::sim::SimStorage;

/// Two pipeline stages on two hosts (one rank each), checkpoints every 2 of 8 steps, each
/// rank's copy replicated to the other host.
fn cfg(replicas: usize) -> Config {
    let mut c = Config::default();
    c.job.steps = 8;
    c.optimizer.warmup_steps = 1;
    c.data.batch_size = 4;
    c.data.seq_len = 16;
    c.cluster.cpu_threads = Some(1);
    c.parallel.pp = 2;
    c.parallel.schedule = Schedule::OneFOneB;
    c.parallel.micro_batches = 2;
    c.cluster.hosts = 2;
    c.cluster.ranks_per_host = 1;
    c.checkpoint.interval = 2;
    c.checkpoint.mode = CheckpointMode::Async;
    c.checkpoint.replicas = replicas;
    c
}

/// Run the job with `faults`; its summary's parameter hash, the steps seen, and its events.
async fn run(cfg: Config, faults: Vec<InjectedFault>) -> (String, Vec<u64>, String) {
    run_plan(cfg, FaultPlan::new(faults)).await
}

/// [`common::run_plan`] with the steps seen.
async fn run_plan(cfg: Config, plan: FaultPlan) -> (String, Vec<u64>, String) {
    let (sha, steps, events) = common::run_plan(cfg, plan).await;
    (sha, steps.into_iter().map(|(s, _)| s).collect(), events)
}

fn fault(step: u64, lose_memory: bool) -> InjectedFault {
    InjectedFault {
        rank: 1,
        step,
        lose_memory,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_is_rolled_back_from_the_fastest_source() {
    let (clean, seen, _) = run(cfg(2), vec![]).await;
    assert_eq!(seen, (0..8).collect::<Vec<_>>());

    // Step 5 fails on rank 1: both ranks go back to step 4, from their own memory.
    let (sha, seen, events) = run(cfg(2), vec![fault(5, false)]).await;
    assert_eq!(sha, clean, "{events}");
    assert_eq!(seen, vec![0, 1, 2, 3, 4, 4, 5, 6, 7], "{events}");
    assert!(events.contains("rank 1 failed at step 5"), "{events}");
    assert!(
        events.contains("rank 1 restored step 4 from own memory"),
        "{events}"
    );

    // Rank 1 loses its memory with the failure: it is restored from rank 0's replica.
    let (sha, _, events) = run(cfg(2), vec![fault(5, true)]).await;
    assert_eq!(sha, clean, "{events}");
    assert!(
        events.contains("rank 1 restored step 4 from rank 0's memory"),
        "{events}"
    );
    assert!(
        events.contains("rank 0 restored step 4 from own memory"),
        "{events}"
    );

    // Without replicas a rank that lost its memory reads storage; a second failure is rolled
    // back as well.
    let (sha, _, events) = run(cfg(1), vec![fault(5, true), fault(7, false)]).await;
    assert_eq!(sha, clean, "{events}");
    assert!(
        events.contains("rank 1 restored step 4 from storage"),
        "{events}"
    );
    assert!(events.contains("rank 1 failed at step 7"), "{events}");
}

/// A stage actor that panics is restarted by its rank's supervisor (`rest_for_one`), the step
/// fails, and the job rolls back to its last checkpoint and replays: the same parameters as
/// the run without the panic, and the restart in `events.jsonl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_stage_actor_is_restarted_and_the_step_replayed() {
    let (clean, _, _) = run(cfg(2), vec![]).await;
    let plan = FaultPlan::new(vec![]).with_panic(StagePanic {
        rank: 1,
        stage: 1,
        step: 5,
    });
    let (sha, seen, events) = run_plan(cfg(2), plan).await;
    assert_eq!(sha, clean, "{events}");
    assert_eq!(seen, vec![0, 1, 2, 3, 4, 4, 5, 6, 7], "{events}");
    let restart = events
        .lines()
        .find(|l| l.contains("\"rank-1\"") && l.contains("stage-1") && l.contains("Restarted"));
    assert!(restart.is_some(), "{events}");
    assert!(
        events.contains("injected panic in stage 1 of rank 1"),
        "{events}"
    );
    assert!(
        events.contains("rank 1 restored step 4 from own memory"),
        "{events}"
    );
}

/// The state a job starts from is its first in-memory copy: a failure before the first
/// checkpoint rolls back to step 0 and the run ends as the clean one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_before_the_first_checkpoint_rolls_back_to_the_start() {
    let (clean, _, _) = run(cfg(2), vec![]).await;
    let (sha, seen, events) = run(cfg(2), vec![fault(1, false)]).await;
    assert_eq!(sha, clean, "{events}");
    assert_eq!(seen, vec![0, 0, 1, 2, 3, 4, 5, 6, 7], "{events}");
    assert!(
        events.contains("rank 1 failed at step 1") && events.contains("back to step 0"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_roll_back_budget_is_kept() {
    let mut c = cfg(2);
    c.supervision.max_job_restarts = 1;
    let storage = Arc::new(SimStorage::unlimited());
    let faults = vec![fault(3, false), fault(5, false)];
    let err = train_with_faults(
        c,
        storage.clone(),
        Arc::new(RealClock),
        None,
        Some(Arc::new(FaultPlan::new(faults))),
        &mut |_: &StepRecord| {},
    )
    .await
    .expect_err("the second failure is one too many");
    assert!(
        err.to_string().contains("injected failure at step 5"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("the restart budget (supervision.max_job_restarts = 1) is spent"),
        "{err}"
    );
    let events = storage.get("events.jsonl").await.expect("events");
    let events = String::from_utf8_lossy(&events);
    assert!(events.contains("rank 1 failed at step 3"), "{events}");
    assert!(!events.contains("rank 1 failed at step 5"), "{events}");
}

/// A rank whose step hangs is caught by the watchdog (`supervision.watchdog_factor` × the
/// median step) long before its peers' deadline (3 × `peer_timeout_ms` = 90 s), the job rolls
/// back to its last checkpoint and replays, and ends with the parameters of the run that never
/// hung; the hung step task is aborted, not waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_step_is_caught_by_the_watchdog_and_replayed() {
    let mut c = cfg(2);
    c.supervision.watchdog_factor = Some(20.0);
    let (clean, _, _) = run(c.clone(), vec![]).await;
    let started = std::time::Instant::now();
    let plan = FaultPlan::new(vec![]).with_stall(1, 5, std::time::Duration::from_secs(120));
    let (sha, seen, events) = run_plan(c, plan).await;
    assert_eq!(sha, clean, "{events}");
    assert!(events.contains("hung: no answer within"), "{events}");
    assert!(events.contains("watchdog"), "{events}");
    assert!(
        seen.windows(2).any(|w| w[1] <= w[0]),
        "steps after the checkpoint were replayed: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&7));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "caught by the watchdog, not by the 90 s deadline nor the 120 s hang: {:?}",
        started.elapsed()
    );
}

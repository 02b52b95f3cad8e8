//! The checkpoint coordinator and its writers under a root supervisor, as the job starts them:
//! a writer whose writes fail is restarted and its shard written again, and the checkpoint
//! commits bit-identically; a write that keeps failing exhausts the restart intensity and fails
//! that checkpoint only, naming rank and step, while the previous one stays loadable; a job
//! whose checkpoint cannot be written ends with that error and its last checkpoint intact.

use std::sync::Arc;
use std::time::Duration;

use flotilla_actors::checkpoints::Checkpointer;
use flotilla_actors::ckpt_coordinator::{self, CkptCoordinator, Coordinator, CoordinatorArgs};
use flotilla_actors::{StepRecord, train};
use flotilla_ckpt::{CheckpointEngine, Layout, Snapshot, SnapshotMeta, Which};
use flotilla_model::data::DataCursor;
use flotilla_model::optim::{AdamWState, ParamState};
use flotilla_runtime::clock::{RealClock, VirtualClock, undilate};
use flotilla_runtime::config::{CheckpointMode, Config};
use flotilla_runtime::storage::Storage;
use flotilla_runtime::storage::sim::SimStorage;
use flotilla_runtime::supervision::{
    ChildEvent, ChildState, EventReceiver, ExitReason, Strategy, Supervisor, SupervisorEvent,
    SupervisorHandle, SupervisorPolicy, event_channel,
};
use ractor::Actor;
use tokio::time::Instant;

/// Rank `rank` of `world` at `step`, about `n` floats per tensor, with awkward float values.
fn snapshot(rank: usize, world: usize, step: u64, n: usize) -> Snapshot {
    let meta = SnapshotMeta {
        rank,
        layout: Layout {
            world_size: world,
            pp: 1,
            ep: world,
            dp: 1,
            stage_layers: Vec::new(),
        },
        config_hash: "0123456789abcdef".into(),
    };
    let mut s = Snapshot::new(meta, step);
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (step << 8) ^ rank as u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f32::from_bits(x as u32)
    };
    let mut state = AdamWState {
        steps: step,
        ..AdamWState::default()
    };
    for (name, shape) in [
        ("model.embed_tokens.weight", vec![n / 16, 16]),
        ("model.norm.weight", vec![16]),
    ] {
        let numel: usize = shape.iter().product();
        let mut data: Vec<f32> = (0..numel).map(|_| next()).collect();
        data[0] = -0.0;
        data[1] = f32::from_bits(0x7fc0_1234);
        s.add_param(name, &shape, data).expect("param");
        state.params.insert(
            name.into(),
            ParamState {
                step,
                exp_avg: (0..numel).map(|_| next()).collect(),
                exp_avg_sq: (0..numel).map(|_| next()).collect(),
            },
        );
    }
    s.set_optimizer(state).expect("optimizer");
    s.set_data_cursor(&DataCursor {
        seed: 7,
        shuffle: true,
        epoch: 1,
        position: 6,
        steps: step,
        fingerprint: 99,
    });
    s
}

fn world(n: usize, step: u64, floats: usize) -> Vec<Snapshot> {
    (0..n).map(|r| snapshot(r, n, step, floats)).collect()
}

/// Async checkpoints every 2 steps; writers restarted at most 3 times within 60 s, after 10, 20,
/// 40 ms.
fn config() -> Config {
    let mut c = Config::default();
    c.checkpoint.interval = 2;
    c.checkpoint.mode = CheckpointMode::Async;
    c.supervision.max_restarts = 3;
    c.supervision.within_s = 60.0;
    c.supervision.backoff_ms = 10;
    c
}

/// What the checkpointer stores: the snapshots with the model's config recorded.
fn as_saved(cfg: &Config, mut snaps: Vec<Snapshot>) -> Vec<Snapshot> {
    let text = flotilla_actors::model_config::hf_config_json(&cfg.model).to_string();
    for s in &mut snaps {
        s.model_config = Some(text.clone());
    }
    snaps
}

/// The controller's root supervisor with the coordinator under it, as `train` starts it.
async fn start(
    cfg: &Config,
    engine: &CheckpointEngine,
) -> (SupervisorHandle, Coordinator, EventReceiver) {
    let (tx, rx) = event_channel();
    // Both callers run on the paused clock with simulated storage: the writers' supervision
    // counts modelled time, as in a simulated job.
    let child =
        ckpt_coordinator::child_spec(cfg, engine.clone(), tx.clone(), &VirtualClock).expect("spec");
    let spec = SupervisorPolicy::from_numbers(3, 60.0, 0, 0, 1_000)
        .expect("policy")
        .with_strategy(Strategy::OneForAll)
        .spec()
        .expect("spec")
        .child(child)
        .observer(tx)
        .with_label("controller");
    let (sup, _join) = Supervisor::spawn(None, spec, None).await.expect("root");
    let coordinator = Coordinator::find(&sup).await.expect("coordinator");
    (sup, coordinator, rx)
}

fn drain(rx: &mut EventReceiver) -> Vec<SupervisorEvent> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

/// The events of `child` under the writers' supervisor of `step`.
fn of<'a>(
    events: &'a [SupervisorEvent],
    step: u64,
    child: &'a str,
) -> impl Iterator<Item = &'a ChildEvent> + 'a {
    let sup = format!("ckpt-writers/step-{step:08}");
    events
        .iter()
        .filter(move |e| e.supervisor == sup && e.child == child)
        .map(|e| &e.event)
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_is_retried_by_a_restarted_writer_and_the_checkpoint_commits() {
    let cfg = config();
    // 20 MB/s: the two shards take tens of modelled milliseconds on virtual time.
    let storage = Arc::new(SimStorage::new(20e6, Duration::from_millis(1)));
    let engine = CheckpointEngine::with_root(storage.clone(), "ckpt", 3);
    let (sup, coordinator, mut rx) = start(&cfg, &engine).await;
    let mut ck = Checkpointer::new(&cfg, engine.clone(), coordinator.clone()).expect("enabled");
    storage.fail_next_writes_under("ckpt/step-00000004/rank-1", 2);

    let snaps = world(2, 4, 64 * 1024);
    let bytes: usize = snaps.iter().map(Snapshot::nbytes).sum();
    let modelled = Duration::from_secs_f64(bytes as f64 / 20e6);
    let t0 = Instant::now();
    ck.save_all(snaps.clone()).await.expect("save accepted");
    let stall = undilate(Instant::now() - t0);
    assert!(stall < modelled / 10, "{stall:?} vs {modelled:?}");
    assert!(!coordinator.is_finished().await.expect("answer"));

    ck.finish().await.expect("committed after the retries");
    let took = undilate(Instant::now() - t0);
    assert!(took >= modelled, "{took:?} vs {modelled:?}");
    let committed = ck.take_committed().expect("the buffers come back");
    assert_eq!(committed, as_saved(&cfg, snaps));
    let loaded = engine.load(Which::Step(4), true).await.expect("load");
    assert_eq!(loaded.snapshots, committed, "bit-identical");
    assert!(engine.verify(4).await.expect("verify").ok());

    let events = drain(&mut rx);
    let w1: Vec<&ChildEvent> = of(&events, 4, "writer-1").collect();
    let failures: Vec<&String> = w1
        .iter()
        .filter_map(|e| match e {
            ChildEvent::Exited {
                reason: ExitReason::Failed(why),
            } => Some(why),
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), 2, "{w1:?}");
    for why in failures {
        assert!(
            why.contains("rank 1, step 4") && why.contains("injected fault"),
            "{why}"
        );
    }
    let restarts: Vec<u32> = w1
        .iter()
        .filter_map(|e| match e {
            ChildEvent::Restarted { restarts } => Some(*restarts),
            _ => None,
        })
        .collect();
    assert_eq!(restarts, vec![1, 2], "{w1:?}");
    assert!(
        !of(&events, 4, "writer-0").any(|e| matches!(e, ChildEvent::Restarted { .. })),
        "writer 0 never failed"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.event, ChildEvent::Escalated { .. }))
    );
    sup.stop(Duration::from_secs(5)).await.expect("stop");
}

#[tokio::test(start_paused = true)]
async fn a_write_that_keeps_failing_fails_its_checkpoint_and_keeps_the_previous_one() {
    let cfg = config();
    let storage = Arc::new(SimStorage::new(20e6, Duration::from_millis(1)));
    let engine = CheckpointEngine::with_root(storage.clone(), "ckpt", 3);
    let (sup, coordinator, mut rx) = start(&cfg, &engine).await;
    let mut ck = Checkpointer::new(&cfg, engine.clone(), coordinator).expect("enabled");
    ck.save_all(world(2, 2, 4096)).await.expect("save");
    ck.finish().await.expect("step 2 commits");
    let two = ck.take_committed().expect("step 2's snapshots");

    storage.fail_writes_under("ckpt/step-00000004/rank-0");
    ck.save_all(world(2, 4, 4096)).await.expect("save accepted");
    let err = ck
        .finish()
        .await
        .expect_err("the checkpoint fails")
        .to_string();
    assert!(
        err.contains("step 4")
            && err.contains("rank 0")
            && err.contains("ckpt/step-00000004/rank-0.safetensors: injected fault"),
        "{err}"
    );
    println!("{err}");
    let files = storage.list("ckpt/step-00000004").await.expect("list");
    assert!(!files.iter().any(|f| f == "manifest.json"), "{files:?}");
    assert_eq!(engine.steps().await.expect("steps"), vec![2]);
    assert_eq!(engine.latest().await.expect("latest"), Some(2));
    let loaded = engine.load_latest_valid(true).await.expect("step 2 loads");
    assert_eq!((loaded.step, loaded.fallbacks.len()), (2, 0));
    assert_eq!(loaded.snapshots, two);

    let events = drain(&mut rx);
    let w0: Vec<&ChildEvent> = of(&events, 4, "writer-0").collect();
    let restarts = w0
        .iter()
        .filter(|e| matches!(e, ChildEvent::Restarted { .. }))
        .count();
    assert_eq!(restarts, 3, "max_restarts, then it gives up: {w0:?}");
    assert!(
        w0.iter().any(|e| matches!(e, ChildEvent::Escalated { .. })),
        "{w0:?}"
    );

    // Only that checkpoint failed: the coordinator is up, not restarted, and the next
    // checkpoint commits (and retention clears what step 4 left).
    let info = sup.child(ckpt_coordinator::CHILD_ID).await.expect("child");
    assert_eq!((info.state, info.restarts), (ChildState::Running, 0));
    ck.save_all(world(2, 6, 4096)).await.expect("save");
    ck.finish().await.expect("step 6 commits");
    assert_eq!(engine.steps().await.expect("steps"), vec![2, 6]);
    assert!(
        storage
            .list("ckpt/step-00000004")
            .await
            .expect("list")
            .is_empty()
    );
    sup.stop(Duration::from_secs(5)).await.expect("stop");
}

/// Writers of an engine on a local directory write through the direct path, several at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_of_a_local_engine_write_straight_from_the_snapshots() {
    let dir = std::env::temp_dir().join(format!("flotilla-ckpt-actors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = CheckpointEngine::local(&dir, 2);
    let args = CoordinatorArgs {
        engine: engine.clone(),
        policy: ckpt_coordinator::writer_policy(&config().supervision, &RealClock).expect("policy"),
        events: None,
        concurrent_writes: 3,
    };
    let (actor, join) = CkptCoordinator::spawn(None, CkptCoordinator, args)
        .await
        .expect("coordinator");
    let coordinator = Coordinator::new(actor.clone());
    let snaps = world(3, 5, 4096);
    assert_eq!(coordinator.save(snaps.clone()).await.expect("save"), 5);
    let saved = coordinator.wait().await.expect("commit").expect("a save");
    assert_eq!((saved.report.step, saved.report.files), (5, 3));
    assert_eq!(saved.snapshots, snaps);
    for r in 0..3 {
        assert!(
            dir.join(format!("step-00000005/rank-{r}.safetensors"))
                .is_file()
        );
    }
    let loaded = engine.load(Which::Step(5), true).await.expect("load");
    assert_eq!(loaded.snapshots, snaps);
    assert!(
        coordinator.wait().await.expect("answer").is_none(),
        "nothing in flight"
    );
    actor.stop(None);
    join.await.expect("stopped");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The whole job: a checkpoint that cannot be written ends it with an error naming rank and
/// step, after the writer's restarts (in `events.jsonl`), and the last checkpoint still loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_checkpoint_cannot_be_written_ends_with_its_last_checkpoint_intact() {
    let mut cfg = config();
    cfg.job.steps = 6;
    cfg.optimizer.warmup_steps = 1;
    cfg.data.batch_size = 2;
    cfg.data.seq_len = 16;
    cfg.cluster.cpu_threads = Some(1);
    let storage = Arc::new(SimStorage::unlimited());
    storage.fail_writes_under("checkpoints/step-00000004/rank-0");
    let err = train(
        cfg,
        storage.clone(),
        Arc::new(RealClock),
        &mut |_: &StepRecord| {},
    )
    .await
    .expect_err("the job fails")
    .to_string();
    assert!(
        err.contains("step 4") && err.contains("rank 0") && err.contains("injected fault"),
        "{err}"
    );
    let events =
        String::from_utf8_lossy(&storage.get("events.jsonl").await.expect("events")).into_owned();
    let restarts = events
        .lines()
        .filter(|l| l.contains("ckpt-writers/step-00000004") && l.contains("Restarted"))
        .count();
    assert_eq!(restarts, 3, "{events}");
    assert!(events.contains("Escalated"), "{events}");
    println!("{err}");
    let engine = CheckpointEngine::with_root(storage, "checkpoints", 3);
    assert_eq!(engine.steps().await.expect("steps"), vec![2]);
    let loaded = engine.load_latest_valid(true).await.expect("step 2 loads");
    assert_eq!(loaded.step, 2);
}

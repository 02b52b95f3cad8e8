//! Checkpoints on the simulated cluster: a rank on the simulated device, whose tensors carry
//! shapes only, snapshots its state as a shape-only snapshot, which the checkpoint engine writes
//! by its modelled size through simulated storage on virtual time, and which nothing restores;
//! a simulated job checkpoints through its actors, keeps no in-memory copies of those
//! checkpoints (an event says so), and refuses to roll back to one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_actors::faults::{FaultPlan, InjectedFault};
use flotilla_actors::pipeline::ModelShape;
use flotilla_actors::store::{RankStore, load_dataset, make_device};
use flotilla_actors::{StepRecord, train_with_faults};
use flotilla_ckpt::shard_io::shard_size;
use flotilla_ckpt::{CheckpointEngine, CkptError, Which};
use flotilla_model::LossParts;
use flotilla_runtime::clock::{VirtualClock, undilate};
use flotilla_runtime::config::{CheckpointMode, Config, DeviceKind, FabricKind};
use flotilla_runtime::storage::Storage;
use flotilla_runtime::storage::sim::SimStorage;
use tokio::time::Instant;

fn sim(steps: u64) -> Config {
    let mut c = Config::default();
    c.job.steps = steps;
    c.optimizer.warmup_steps = 1;
    c.data.batch_size = 2;
    c.data.seq_len = 16;
    c.cluster.device = DeviceKind::Sim;
    c.cluster.fabric = FabricKind::Sim;
    c
}

#[tokio::test(start_paused = true)]
async fn a_simulated_rank_checkpoints_its_modelled_size_on_virtual_time() {
    let cfg = sim(4);
    let dev = make_device(&cfg, 0).expect("device");
    let placement = Arc::new(flotilla_actors::pipeline::placement(&cfg).expect("placement"));
    let shape = ModelShape::of(&cfg, &placement).expect("shape");
    let dataset = Arc::new(load_dataset(&cfg).expect("dataset"));
    let mut store =
        RankStore::build(&cfg, 0, placement, &shape, dataset, dev.as_ref()).expect("rank");
    // One update, so that AdamW has moments (shape-only ones, on this device).
    store
        .apply(dev.as_ref(), &LossParts::default(), 1.0, &BTreeMap::new())
        .expect("update");
    let snap = store.snapshot(dev.as_ref()).expect("a shape-only snapshot");
    assert!(snap.is_shape_only());
    assert_eq!(snap.step, 1);
    let held: usize = store.held_named().values().map(|t| t.numel() * 4).sum();
    assert_eq!(snap.params.len(), store.held_named().len());
    assert_eq!(snap.moments.len(), store.trainable.len());
    assert!(snap.moments.values().all(|m| m.step == 1));
    let moments: usize = store.trainable.len();
    assert!(moments > 0);
    let moment_bytes: usize = snap
        .moments
        .values()
        .map(|m| m.exp_avg.nbytes() + m.exp_avg_sq.nbytes())
        .sum();
    assert_eq!(snap.nbytes(), held + moment_bytes);

    // Nothing restores it.
    let err = store
        .restore(dev.as_ref(), &snap)
        .expect_err("no values to restore");
    assert!(err.to_string().contains("simulated cluster"), "{err}");

    // Through the engine onto simulated storage: its modelled size over the bandwidth.
    let bandwidth = 1e6;
    let storage = Arc::new(SimStorage::new(bandwidth, Duration::ZERO));
    let engine = CheckpointEngine::new(storage.clone(), 1);
    let size = shard_size(&snap).expect("size");
    assert!(size > snap.nbytes() as u64);
    let t0 = Instant::now();
    let report = engine.save_sync(vec![snap]).await.expect("save");
    let took = undilate(Instant::now() - t0).as_secs_f64();
    // The shard, then the manifest and `latest` (real bytes).
    let written: u64 = [
        "step-00000001/rank-0.safetensors",
        "step-00000001/manifest.json",
        "latest",
    ]
    .iter()
    .map(|k| storage.size(k).expect("written"))
    .sum();
    let want = written as f64 / bandwidth;
    assert_eq!(report.bytes, size);
    assert!(
        took >= want && took <= want * 1.01,
        "{took} s, {want} s modelled"
    );
    assert_eq!(storage.size("step-00000001/rank-0.safetensors"), Some(size));
    assert!(storage.held_bytes() < size / 10, "{}", storage.held_bytes());
    match engine.load(Which::Latest, true).await {
        Err(e @ CkptError::ShapeOnly { .. }) => {
            assert!(e.to_string().contains("simulated cluster"), "{e}");
        }
        other => panic!("expected a shape-only refusal, got {other:?}"),
    }
}

/// A one-rank simulated job that checkpoints every 2 steps.
fn sim_job(mode: CheckpointMode) -> Config {
    let mut c = sim(6);
    c.checkpoint.interval = 2;
    c.checkpoint.mode = mode;
    c
}

async fn events(storage: &SimStorage) -> String {
    let bytes = storage.get("events.jsonl").await.expect("events");
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test(start_paused = true)]
async fn a_simulated_job_commits_shape_only_checkpoints_and_keeps_no_copies() {
    for mode in [CheckpointMode::Sync, CheckpointMode::Async] {
        let cfg = sim_job(mode);
        let storage = Arc::new(SimStorage::new(1e9, Duration::ZERO));
        let run: Arc<dyn Storage> = storage.clone();
        let summary = train_with_faults(
            cfg.clone(),
            run.clone(),
            Arc::new(VirtualClock),
            None,
            None,
            &mut |_: &StepRecord| {},
        )
        .await
        .expect("the simulated job checkpoints and ends");
        assert_eq!(summary.steps, 6);
        // The checkpoints went to the simulated checkpoint storage of `[cluster.sim]` (not to
        // the run's storage), each commit an event with its modelled size.
        let ev = events(&storage).await;
        for step in [2, 4, 6] {
            let line = ev
                .lines()
                .find(|l| l.contains(&format!("committed step {step}:")))
                .unwrap_or_else(|| panic!("{mode:?}: no commit of step {step}: {ev}"));
            assert!(line.contains("in 1 files"), "{line}");
            let bytes: u64 = line
                .split("committed step ")
                .nth(1)
                .and_then(|r| r.split(": ").nth(1))
                .and_then(|r| r.split(' ').next())
                .and_then(|b| b.parse().ok())
                .unwrap_or_else(|| panic!("no size in {line}"));
            assert!(bytes > 0, "{line}");
        }
        assert!(run.list("checkpoints").await.expect("list").is_empty());
        let ev = events(&storage).await;
        assert!(
            ev.contains("checkpoint of step 2 is shape-only")
                && ev.contains("no in-memory copies or peer replicas kept"),
            "{mode:?}: {ev}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_roll_back_to_a_shape_only_checkpoint_is_refused() {
    let storage = Arc::new(SimStorage::new(1e9, Duration::ZERO));
    let fault = InjectedFault {
        rank: 0,
        step: 3,
        lose_memory: false,
    };
    let err = train_with_faults(
        sim_job(CheckpointMode::Sync),
        storage.clone(),
        Arc::new(VirtualClock),
        None,
        Some(Arc::new(FaultPlan::new(vec![fault]))),
        &mut |_: &StepRecord| {},
    )
    .await
    .expect_err("no roll-back on the simulated cluster");
    let text = err.to_string();
    assert!(
        text.contains("cannot roll back")
            && text.contains("injected failure")
            && text.contains("step 2")
            && text.contains("simulated cluster"),
        "{text}"
    );
}

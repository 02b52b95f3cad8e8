//! Checkpoint and resume through the job's ranks: a run resumed from its step-3 checkpoint ends
//! with exactly the parameters of the run that was never interrupted.

use std::sync::Arc;

use flotilla_actors::job::{Job, Launch};
use flotilla_actors::pipeline::job_params_sha256;
use flotilla_actors::{ResumeFrom, StepRecord, train, train_from};
use flotilla_ckpt::format::{decode_shard, encode_shard};
use flotilla_ckpt::{CheckpointEngine, Which};
use flotilla_runtime::clock::RealClock;
use flotilla_runtime::config::{CheckpointMode, Config};
use flotilla_runtime::storage::Storage;
use flotilla_runtime::storage::sim::SimStorage;

fn tiny(steps: u64) -> Config {
    let mut c = Config::default();
    c.job.steps = steps;
    c.optimizer.warmup_steps = 1;
    c.data.batch_size = 2;
    c.data.seq_len = 16;
    c.cluster.cpu_threads = Some(1);
    c.checkpoint.interval = 3;
    c
}

async fn start(cfg: &Config) -> Job {
    let storage = Arc::new(SimStorage::unlimited());
    Job::start(
        cfg.clone(),
        storage,
        Arc::new(RealClock),
        true,
        Launch::default(),
    )
    .await
    .expect("the job starts")
}

async fn sha(job: &Job, step: u64) -> String {
    job_params_sha256(vec![job.params(step).await.expect("params")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_rank_continues_bit_exactly() {
    let cfg = tiny(6);
    let mut a = start(&cfg).await;
    for s in 0..3 {
        a.step(s).await.expect("step");
    }
    let snap = a.snapshots(3).await.expect("snapshot").remove(0);
    assert_eq!(snap.step, 3);
    assert!(
        snap.params
            .keys()
            .any(|k| k.ends_with("e_score_correction_bias")),
        "router bias buffers are part of the state"
    );
    assert!(!snap.moments.is_empty());
    // Through the on-disk encoding, bit for bit.
    let decoded = decode_shard(&encode_shard(&snap).expect("encode")).expect("decode");
    assert_eq!(decoded, snap);

    let mut b = start(&cfg).await;
    b.restore(vec![decoded]).await.expect("restore");
    assert_eq!(b.snapshots(3).await.expect("snapshot").remove(0), snap);
    for s in 3..6 {
        let (sa, sb) = (
            a.step(s).await.expect("step"),
            b.step(s).await.expect("step"),
        );
        assert_eq!(sa[0].loss.to_bits(), sb[0].loss.to_bits());
        assert_eq!(sa[0].step, sb[0].step);
    }
    assert_eq!(sha(&a, 6).await, sha(&b, 6).await);
    a.stop().await.expect("stop");
    b.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_another_model_is_refused_and_changes_nothing() {
    let cfg = tiny(6);
    let mut t = start(&cfg).await;
    let before = t.snapshots(0).await.expect("snapshot").remove(0);
    let mut bad = before.clone();
    bad.step = 9;
    bad.params.pop_first();
    assert!(t.restore(vec![bad]).await.is_err());
    let mut bad = before.clone();
    bad.data_cursor = vec![0; 3];
    assert!(t.restore(vec![bad]).await.is_err());
    assert_eq!(t.snapshots(0).await.expect("snapshot").remove(0), before);
    t.stop().await.expect("stop");
}

async fn run(
    cfg: Config,
    storage: Arc<SimStorage>,
    resume: Option<ResumeFrom>,
) -> (flotilla_actors::Summary, Vec<u64>) {
    let mut seen = Vec::new();
    let s = train_from(
        cfg,
        storage,
        Arc::new(RealClock),
        resume,
        &mut |r: &StepRecord| seen.push(r.stats.step),
    )
    .await
    .expect("job runs");
    (s, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_step_3_matches_the_uninterrupted_run() {
    let storage = Arc::new(SimStorage::unlimited());
    let mut cfg = tiny(6);
    cfg.checkpoint.mode = CheckpointMode::Async;
    let mut seen = Vec::new();
    let full = train(
        cfg.clone(),
        storage.clone(),
        Arc::new(RealClock),
        &mut |r: &StepRecord| seen.push(r.stats.step),
    )
    .await
    .expect("job runs");
    assert_eq!(seen, (0..6).collect::<Vec<_>>());
    let engine = CheckpointEngine::with_root(storage.clone(), "checkpoints", 3);
    assert_eq!(engine.steps().await.expect("steps"), vec![3, 6]);

    // Resume from step 3 in sync mode: steps 3..6 again, and the same parameters.
    cfg.checkpoint.mode = CheckpointMode::Sync;
    let (resumed, seen) = run(cfg.clone(), storage.clone(), Some(ResumeFrom::Step(3))).await;
    assert_eq!(seen, vec![3, 4, 5]);
    assert_eq!(resumed.params_sha256, full.params_sha256);

    // Damage step 6: resuming from the latest falls back to step 3, says why, and still ends
    // with the same parameters.
    let key = "checkpoints/step-00000006/rank-0.safetensors";
    let mut bytes = storage.get(key).await.expect("shard");
    let at = bytes.len() - 7;
    bytes[at] ^= 1;
    storage.put(key, bytes).await.expect("put");
    let (again, seen) = run(cfg, storage.clone(), Some(ResumeFrom::Latest)).await;
    assert_eq!(seen, vec![3, 4, 5]);
    assert_eq!(again.params_sha256, full.params_sha256);
    let events =
        String::from_utf8_lossy(&storage.get("events.jsonl").await.expect("events")).into_owned();
    assert!(
        events.contains("fallback") && events.contains("step-00000006"),
        "{events}"
    );
    let loaded = engine.load(Which::Latest, true).await.expect("load");
    assert_eq!(loaded.step, 6, "the resumed run checkpointed step 6 again");
}

/// A pipeline rank's snapshot records an uneven stage split: restoring it into a job that cuts
/// the model otherwise is refused by name (the stages would hold other tensors); the even split
/// named explicitly is the same layout as no split at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_another_stage_split_is_refused_by_name() {
    use flotilla_runtime::config::Schedule;

    let job = |split: Vec<usize>| {
        let mut c = tiny(2);
        c.model.num_hidden_layers = 4;
        c.parallel.pp = 2;
        c.parallel.schedule = Schedule::OneFOneB;
        c.parallel.micro_batches = 2;
        c.cluster.ranks_per_host = 2;
        c.parallel.stage_layers = split;
        c
    };
    let uneven = start(&job(vec![3, 1])).await;
    let snaps = uneven.snapshots(0).await.expect("snapshot");
    uneven.stop().await.expect("stop");
    assert_eq!(snaps[0].meta.layout.stage_layers, vec![3, 1]);
    let mut even = start(&job(Vec::new())).await;
    let before = even.snapshots(0).await.expect("snapshot");
    assert!(before[0].meta.layout.stage_layers.is_empty());
    let err = even
        .restore(snaps)
        .await
        .expect_err("another split")
        .to_string();
    assert!(
        err.contains("parallel.stage_layers") && err.contains("[3, 1]"),
        "{err}"
    );
    assert_eq!(even.snapshots(0).await.expect("snapshot"), before);
    even.stop().await.expect("stop");
    let mut named = start(&job(vec![2, 2])).await;
    named
        .restore(before)
        .await
        .expect("[2, 2] is the even split");
    named.stop().await.expect("stop");
}

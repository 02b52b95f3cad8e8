//! The checkpoint engine end to end over the storage seam: bit-exact round trips, detection of
//! damaged or partial checkpoints with fallback, retention, and the stall of async saves.

use std::sync::Arc;
use std::time::Duration;

use flotilla_ckpt::format::{MANIFEST, shard_name, step_dir};
use flotilla_ckpt::{CheckpointEngine, Layout, Snapshot, SnapshotMeta, Which};
use flotilla_model::data::DataCursor;
use flotilla_model::optim::{AdamWState, ParamState};
use flotilla_runtime::storage::Storage;
use flotilla_runtime::storage::local::LocalStorage;
use flotilla_runtime::storage::sim::SimStorage;
use tokio::time::Instant;

/// A deterministic snapshot of rank `rank` of `world` at `step` with about `n` floats per tensor,
/// with awkward values (NaN payloads, -0.0, subnormals, infinities) among them.
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
        ("model.layers.0.mlp.gate.e_score_correction_bias", vec![8]),
        ("model.norm.weight", vec![16]),
    ] {
        let numel: usize = shape.iter().product();
        let mut data: Vec<f32> = (0..numel).map(|_| next()).collect();
        if numel > 4 {
            data[0] = -0.0;
            data[1] = f32::from_bits(0x7fc0_1234);
            data[2] = f32::MIN_POSITIVE / 4.0;
            data[3] = f32::NEG_INFINITY;
        }
        s.add_param(name, &shape, data).expect("param");
        if !name.contains("bias") {
            state.params.insert(
                name.into(),
                ParamState {
                    step,
                    exp_avg: (0..numel).map(|_| next()).collect(),
                    exp_avg_sq: (0..numel).map(|_| next()).collect(),
                },
            );
        }
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
    s.rng = Some(vec![1, 2, 3, 255]);
    s
}

fn fast() -> Arc<SimStorage> {
    Arc::new(SimStorage::unlimited())
}

#[tokio::test(start_paused = true)]
async fn save_then_load_is_bit_exact() {
    let storage = fast();
    let engine = CheckpointEngine::with_root(storage.clone(), "ckpt", 3);
    let snaps = vec![snapshot(0, 2, 5, 256), snapshot(1, 2, 5, 256)];
    let report = engine.save_sync(snaps.clone()).await.expect("save");
    assert_eq!((report.step, report.files), (5, 2));
    assert_eq!(engine.latest().await.expect("latest"), Some(5));
    let loaded = engine.load(Which::Latest, true).await.expect("load");
    assert_eq!(loaded.step, 5);
    assert_eq!(loaded.snapshots, snaps);
    assert!(loaded.fallbacks.is_empty());
    let m = &loaded.manifest;
    assert_eq!(m.files.len(), 2);
    assert_eq!(
        m.tensors["model.norm.weight"].len(),
        2,
        "one piece per rank"
    );
    assert!(m.tensors.contains_key("optim.exp_avg.model.norm.weight"));
    assert_eq!(
        storage.get("ckpt/latest").await.expect("latest"),
        b"step-00000005\n"
    );
    for r in engine.verify_all().await.expect("verify") {
        assert!(r.ok(), "{r:?}");
    }
}

#[tokio::test]
async fn round_trip_on_the_local_filesystem() {
    let dir = std::env::temp_dir().join(format!("flotilla-ckpt-local-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = CheckpointEngine::new(Arc::new(LocalStorage::new(&dir)), 2);
    let snap = snapshot(0, 1, 3, 1024);
    engine.save_sync(vec![snap.clone()]).await.expect("save");
    assert!(dir.join("step-00000003/rank-0.safetensors").is_file());
    assert!(dir.join("step-00000003/manifest.json").is_file());
    let loaded = engine.load(Which::Step(3), true).await.expect("load");
    assert_eq!(loaded.snapshots, vec![snap]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    ShardBitFlipInValues,
    ShardBitFlipInHeader,
    ShardTruncated,
    ShardMissing,
    ManifestBitFlip,
    ManifestTruncated,
    ManifestMissing,
}

async fn damage(storage: &SimStorage, dir: &str, d: Damage) {
    let shard = format!("{dir}/{}", shard_name(1));
    let manifest = format!("{dir}/{MANIFEST}");
    let flip = |mut b: Vec<u8>, at: usize| {
        b[at] ^= 0x10;
        b
    };
    match d {
        Damage::ShardBitFlipInValues => {
            let b = storage.get(&shard).await.expect("get");
            let at = b.len() - 5;
            storage.put(&shard, flip(b, at)).await.expect("put");
        }
        Damage::ShardBitFlipInHeader => {
            let b = storage.get(&shard).await.expect("get");
            storage.put(&shard, flip(b, 40)).await.expect("put");
        }
        Damage::ShardTruncated => {
            let b = storage.get(&shard).await.expect("get");
            storage
                .put(&shard, b[..b.len() / 2].to_vec())
                .await
                .expect("put");
        }
        Damage::ShardMissing => storage.remove(&shard).await.expect("remove"),
        Damage::ManifestBitFlip => {
            let b = storage.get(&manifest).await.expect("get");
            let at = b.len() / 3;
            storage.put(&manifest, flip(b, at)).await.expect("put");
        }
        Damage::ManifestTruncated => {
            let b = storage.get(&manifest).await.expect("get");
            storage
                .put(&manifest, b[..b.len() - 40].to_vec())
                .await
                .expect("put");
        }
        Damage::ManifestMissing => storage.remove(&manifest).await.expect("remove"),
    }
}

#[tokio::test(start_paused = true)]
async fn damage_is_detected_and_loading_falls_back_with_a_reason() {
    for d in [
        Damage::ShardBitFlipInValues,
        Damage::ShardBitFlipInHeader,
        Damage::ShardTruncated,
        Damage::ShardMissing,
        Damage::ManifestBitFlip,
        Damage::ManifestTruncated,
        Damage::ManifestMissing,
    ] {
        let storage = fast();
        let engine = CheckpointEngine::new(storage.clone(), 5);
        for step in [2, 4] {
            let snaps = vec![snapshot(0, 2, step, 512), snapshot(1, 2, step, 512)];
            engine.save_sync(snaps).await.expect("save");
        }
        damage(&storage, &step_dir(4), d).await;

        let report = engine.verify(4).await.expect("verify");
        assert!(!report.ok(), "{d:?}: verify found nothing");
        let text = report.problems.join("\n");
        let names_file = text.contains("rank-1.safetensors") || text.contains(MANIFEST);
        assert!(names_file, "{d:?}: {text}");
        assert!(engine.verify(2).await.expect("verify").ok(), "{d:?}");

        assert!(
            engine.load(Which::Step(4), true).await.is_err(),
            "{d:?}: damaged step 4 loaded"
        );
        let loaded = engine.load_latest_valid(true).await.expect("fallback");
        assert_eq!(loaded.step, 2, "{d:?}");
        assert_eq!(loaded.snapshots[1], snapshot(1, 2, 2, 512), "{d:?}");
        let why = loaded.fallbacks.join("; ");
        assert!(why.contains("step-00000004"), "{d:?}: {why}");
        println!("{d:?}: {why}");
    }
}

#[tokio::test(start_paused = true)]
async fn without_verify_a_flipped_value_bit_goes_unseen_but_sizes_are_checked() {
    let storage = fast();
    let engine = CheckpointEngine::new(storage.clone(), 5);
    engine
        .save_sync(vec![snapshot(0, 2, 1, 512), snapshot(1, 2, 1, 512)])
        .await
        .expect("save");
    damage(&storage, &step_dir(1), Damage::ShardBitFlipInValues).await;
    assert!(engine.load(Which::Step(1), false).await.is_ok());
    assert!(engine.load(Which::Step(1), true).await.is_err());
    damage(&storage, &step_dir(1), Damage::ShardTruncated).await;
    assert!(engine.load(Which::Step(1), false).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn retention_keeps_the_last_n_and_removes_partial_saves() {
    let storage = fast();
    let engine = CheckpointEngine::new(storage.clone(), 2);
    // The leftovers of a save that crashed before its manifest.
    storage
        .put("step-00000000/rank-0.safetensors", vec![1, 2, 3])
        .await
        .expect("put");
    for step in 1..=5 {
        let report = engine
            .save_sync(vec![snapshot(0, 1, step, 64)])
            .await
            .expect("save");
        assert!(!report.removed.contains(&step), "removed the newest");
    }
    assert_eq!(engine.steps().await.expect("steps"), vec![4, 5]);
    assert_eq!(
        storage.list("").await.expect("list"),
        vec!["latest", "step-00000004", "step-00000005"]
    );

    // keep = 1 still keeps the newest; a resume to an older step leaves newer ones alone.
    let one = CheckpointEngine::new(storage.clone(), 1);
    one.save_sync(vec![snapshot(0, 1, 3, 64)])
        .await
        .expect("save");
    assert_eq!(one.steps().await.expect("steps"), vec![3, 4, 5]);
    assert_eq!(one.latest().await.expect("latest"), Some(3));
    one.save_sync(vec![snapshot(0, 1, 6, 64)])
        .await
        .expect("save");
    assert_eq!(one.steps().await.expect("steps"), vec![6]);
}

#[tokio::test(start_paused = true)]
async fn a_damaged_latest_pointer_falls_back_to_the_newest_committed_step() {
    let storage = fast();
    let engine = CheckpointEngine::new(storage.clone(), 3);
    for step in [1, 2] {
        engine
            .save_sync(vec![snapshot(0, 1, step, 64)])
            .await
            .expect("save");
    }
    storage
        .put("latest", b"step-0000\xff".to_vec())
        .await
        .expect("put");
    assert_eq!(engine.latest().await.expect("latest"), Some(2));
    let loaded = engine.load_latest_valid(true).await.expect("load");
    assert_eq!(loaded.step, 2);
    assert!(
        loaded.fallbacks[0].contains("latest"),
        "{:?}",
        loaded.fallbacks
    );
    let reports = engine.verify_all().await.expect("verify");
    assert!(reports.iter().any(|r| !r.ok()));
}

#[tokio::test(start_paused = true)]
async fn nothing_to_load_is_an_error_not_a_panic() {
    let engine = CheckpointEngine::new(fast(), 3);
    assert_eq!(engine.latest().await.expect("latest"), None);
    assert!(engine.load(Which::Latest, true).await.is_err());
    assert!(engine.load_latest_valid(true).await.is_err());
    // Snapshots that are not one step of the whole world are refused.
    assert!(engine.save_sync(vec![]).await.is_err());
    assert!(engine.save_sync(vec![snapshot(0, 2, 1, 64)]).await.is_err());
    assert!(
        engine
            .save_sync(vec![snapshot(0, 2, 1, 64), snapshot(1, 2, 2, 64)])
            .await
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn async_save_stalls_less_than_sync_save() {
    // 4 MiB of state onto a 50 MB/s disk: a sync save stalls ~ 0.17 s of (virtual) time, an
    // async save only for the snapshot copy, which costs no virtual time.
    let snap = snapshot(0, 1, 1, 512 * 1024);
    assert!(snap.nbytes() >= 4 << 20, "{}", snap.nbytes());
    let storage = Arc::new(SimStorage::new(50e6, Duration::from_millis(1)));
    let engine = CheckpointEngine::new(storage.clone(), 3);

    let t0 = Instant::now();
    engine.save_sync(vec![snap.clone()]).await.expect("save");
    let sync_stall = flotilla_runtime::clock::undilate(Instant::now() - t0);

    let mut later = snap.clone();
    later.step = 2;
    let t0 = Instant::now();
    let copy = later.clone();
    let handle = engine.save_async(vec![copy]).expect("save_async");
    let async_stall = flotilla_runtime::clock::undilate(Instant::now() - t0);
    assert!(!handle.is_finished());
    let report = handle.wait().await.expect("persisted");
    assert_eq!(report.step, 2);
    println!("sync stall {sync_stall:?}, async stall {async_stall:?}");
    assert!(sync_stall >= Duration::from_millis(80), "{sync_stall:?}");
    assert!(
        async_stall < sync_stall / 10,
        "{async_stall:?} vs {sync_stall:?}"
    );
    let loaded = engine.load(Which::Latest, true).await.expect("load");
    assert_eq!(loaded.snapshots, vec![later]);
}

#[tokio::test(start_paused = true)]
async fn background_saves_commit_in_order() {
    let storage = Arc::new(SimStorage::new(10e6, Duration::ZERO));
    let engine = CheckpointEngine::new(storage, 2);
    let handles: Vec<_> = (1..=3)
        .map(|s| {
            engine
                .save_async(vec![snapshot(0, 1, s, 4096)])
                .expect("save_async")
        })
        .collect();
    for h in handles {
        h.wait().await.expect("saved");
    }
    assert_eq!(engine.steps().await.expect("steps"), vec![2, 3]);
    assert_eq!(engine.latest().await.expect("latest"), Some(3));
}

#[tokio::test(start_paused = true)]
async fn a_save_that_dies_before_its_manifest_commits_nothing() {
    let storage = fast();
    let engine = CheckpointEngine::new(storage.clone(), 3);
    engine
        .save_sync(vec![snapshot(0, 2, 3, 64), snapshot(1, 2, 3, 64)])
        .await
        .expect("save");
    // The disk dies after the shards of step 6 and before its manifest: a crash mid-commit.
    storage.fail_writes_under("step-00000006/manifest.json");
    let err = engine
        .save_sync(vec![snapshot(0, 2, 6, 64), snapshot(1, 2, 6, 64)])
        .await
        .expect_err("the save must fail");
    assert!(err.to_string().contains("manifest.json"), "{err}");
    assert_eq!(
        storage.list("step-00000006").await.expect("list"),
        vec!["rank-0.safetensors", "rank-1.safetensors"]
    );
    assert_eq!(engine.steps().await.expect("steps"), vec![3]);
    assert_eq!(engine.latest().await.expect("latest"), Some(3));
    let loaded = engine.load_latest_valid(true).await.expect("load");
    assert_eq!((loaded.step, loaded.fallbacks.len()), (3, 0));
    let reports = engine.verify_all().await.expect("verify");
    let six = reports
        .iter()
        .find(|r| r.step == 6)
        .expect("step 6 reported");
    assert!(six.problems[0].contains("never committed"), "{six:?}");
}

/// The save's pieces, driven one by one as the checkpoint actors do (shards in any order, one
/// engine per writer is not needed: they share this one), commit exactly what one save commits.
#[tokio::test(start_paused = true)]
async fn shards_written_apart_commit_what_one_save_commits() {
    let (whole, pieces) = (fast(), fast());
    let snaps = vec![snapshot(0, 2, 4, 256), snapshot(1, 2, 4, 256)];
    let one = CheckpointEngine::with_root(whole.clone(), "ckpt", 2);
    one.save_sync(snaps.clone()).await.expect("save");

    let engine = CheckpointEngine::with_root(pieces.clone(), "ckpt", 2);
    let lock = engine.begin(&snaps).await.expect("begin");
    assert_eq!(lock.step(), 4);
    let mut records = Vec::new();
    for s in snaps.iter().rev() {
        let shared = Arc::new(s.clone());
        records.push(
            engine
                .write_shard(Arc::clone(&shared))
                .await
                .expect("shard"),
        );
        assert_eq!(
            Arc::strong_count(&shared),
            1,
            "the engine keeps no reference"
        );
    }
    assert!(
        engine.steps().await.expect("steps").is_empty(),
        "not committed yet"
    );
    let report = engine.commit(&lock, records).await.expect("commit");
    assert_eq!((report.step, report.files), (4, 2));
    assert_eq!(engine.prune(lock).await.expect("prune"), Vec::<u64>::new());
    for key in [
        "ckpt/step-00000004/manifest.json",
        "ckpt/step-00000004/rank-0.safetensors",
        "ckpt/step-00000004/rank-1.safetensors",
        "ckpt/latest",
    ] {
        assert_eq!(
            pieces.get(key).await.expect("written"),
            whole.get(key).await.expect("written"),
            "{key}"
        );
    }
    let loaded = engine.load(Which::Step(4), true).await.expect("load");
    assert_eq!(loaded.snapshots, snaps);
}

/// A commit checks the records first: a missing rank or another step's shard commits nothing.
#[tokio::test(start_paused = true)]
async fn a_commit_refuses_records_that_do_not_cover_the_world() {
    let storage = fast();
    let engine = CheckpointEngine::new(storage.clone(), 2);
    let snaps = vec![snapshot(0, 2, 6, 64), snapshot(1, 2, 6, 64)];
    let lock = engine.begin(&snaps).await.expect("begin");
    let r0 = engine
        .write_shard(Arc::new(snaps[0].clone()))
        .await
        .expect("shard");
    let err = engine
        .commit(&lock, vec![r0.clone()])
        .await
        .expect_err("rank 1 is missing");
    assert!(err.to_string().contains("do not cover"), "{err}");
    let other = engine
        .write_shard(Arc::new(snapshot(1, 2, 7, 64)))
        .await
        .expect("shard");
    let err = engine
        .commit(&lock, vec![r0, other])
        .await
        .expect_err("a shard of step 7");
    assert!(err.to_string().contains("step 7"), "{err}");
    assert!(engine.steps().await.expect("steps").is_empty());
    assert_eq!(engine.latest().await.expect("latest"), None);
    assert!(
        !storage
            .list("step-00000006")
            .await
            .expect("list")
            .contains(&MANIFEST.to_string())
    );
}

//! Checkpoints of shape-only state (the simulated cluster's snapshots, which hold shapes and no
//! values): the engine writes each shard by its modelled size through simulated storage, on
//! virtual time and without building its bytes; the manifest commits and marks the shards;
//! retention works as for any checkpoint; and every way of reading the values back (load,
//! fallback, one rank, verify, resharding, own copies, encoding) is refused, saying that the
//! simulated cluster wrote it.

use std::sync::Arc;
use std::time::Duration;

use flotilla_ckpt::format::{MANIFEST, encode_shard, shard_name, step_dir};
use flotilla_ckpt::shard_io::shard_size;
use flotilla_ckpt::{
    CheckpointEngine, CkptError, Layout, OwnCopy, Snapshot, SnapshotError, SnapshotMeta, Which,
};
use flotilla_runtime::clock::undilate;
use flotilla_runtime::storage::sim::SimStorage;
use flotilla_runtime::storage::{Storage, StorageError};
use tokio::time::Instant;

/// Rank `rank` of `world` at `step`: a dense `rows × 4096` matrix and a norm, with their AdamW
/// moments, all shape-only (about `rows · 48 KiB` of modelled state).
fn shape_only(rank: usize, world: usize, step: u64, rows: usize) -> Snapshot {
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
    s.add_shape_only("model.layers.0.mlp.experts.0.up_proj.weight", &[rows, 4096]);
    s.add_shape_only("model.norm.weight", &[4096]);
    for name in [
        "model.layers.0.mlp.experts.0.up_proj.weight",
        "model.norm.weight",
    ] {
        s.add_shape_only_moments(name, step).expect("moments");
    }
    s.optim_steps = step;
    s
}

fn world(n: usize, step: u64, rows: usize) -> Vec<Snapshot> {
    (0..n).map(|r| shape_only(r, n, step, rows)).collect()
}

fn refused_as_simulated<T: std::fmt::Debug>(r: Result<T, CkptError>, what: &str) {
    match r {
        Err(e @ CkptError::ShapeOnly { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("written by the simulated cluster"),
                "{what}: {text}"
            );
            assert!(text.contains(MANIFEST), "{what} names the manifest: {text}");
        }
        other => panic!("{what}: expected a shape-only refusal, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn gigabytes_of_shape_only_state_checkpoint_by_size_on_virtual_time() {
    let bandwidth = 2e9;
    let storage = Arc::new(SimStorage::new(bandwidth, Duration::ZERO));
    let engine = CheckpointEngine::with_root(storage.clone(), "ckpt", 2);
    // Two ranks of 3 × 4 GiB (a matrix and its two moments) each: 24 GiB that are never
    // allocated.
    let snaps = world(2, 6, 1 << 18);
    assert!(snaps.iter().all(Snapshot::is_shape_only));
    let state: usize = snaps.iter().map(Snapshot::nbytes).sum();
    assert!(state >= 24 << 30, "{state}");
    let shard_bytes: Vec<u64> = snaps.iter().map(|s| shard_size(s).expect("size")).collect();

    let (wall, virt) = (std::time::Instant::now(), Instant::now());
    let report = engine.save_sync(snaps).await.expect("save");
    let (wall, virt) = (wall.elapsed(), undilate(Instant::now() - virt));

    let total: u64 = shard_bytes.iter().sum();
    assert_eq!(report.step, 6);
    assert_eq!(report.bytes, total);
    assert!(
        total >= state as u64,
        "shards hold their headers and all the state"
    );
    // The shards take their modelled size over the bandwidth; the manifest and `latest` add a
    // few kilobytes.
    let want = total as f64 / bandwidth;
    let got = virt.as_secs_f64();
    assert!(
        got >= want && got <= want * 1.001,
        "{got} s of virtual time, {want} s modelled"
    );
    assert!(
        wall < Duration::from_secs(5),
        "no bytes are built or hashed: {wall:?}"
    );
    assert!(storage.held_bytes() < 1 << 20, "{}", storage.held_bytes());

    // Committed: the manifest lists every shard by its size, shape-only and without a checksum.
    assert_eq!(engine.steps().await.expect("steps"), vec![6]);
    assert_eq!(engine.latest().await.expect("latest"), Some(6));
    let m = engine.manifest(6).await.expect("manifest");
    assert_eq!(m.files.len(), 2);
    for (r, want) in shard_bytes.iter().enumerate() {
        let f = &m.files[&shard_name(r)];
        assert!(f.shape_only && f.sha256.is_empty(), "{f:?}");
        assert_eq!(f.bytes, *want);
        let key = format!("ckpt/{}/{}", step_dir(6), shard_name(r));
        assert_eq!(storage.size(&key), Some(*want));
        match storage.get(&key).await {
            Err(StorageError::SizeOnly { key: k, bytes }) => {
                assert_eq!((k, bytes), (key.clone(), *want));
            }
            other => panic!("reading {key}: expected a refusal, got {other:?}"),
        }
    }
    assert!(m.tensors.contains_key("optim.exp_avg_sq.model.norm.weight"));

    // Nothing reads it back.
    refused_as_simulated(engine.load(Which::Latest, true).await, "load");
    refused_as_simulated(engine.load(Which::Step(6), false).await, "load step");
    refused_as_simulated(engine.load_latest_valid(true).await, "load_latest_valid");
    refused_as_simulated(engine.load_rank(None, 1).await, "load_rank");
    refused_as_simulated(engine.load_rank(Some(6), 0).await, "load_rank at 6");
    refused_as_simulated(engine.verify(6).await, "verify");
    refused_as_simulated(engine.verify_all().await, "verify_all");
    let names = vec!["model.norm.weight".to_string()];
    let meta = shape_only(0, 2, 6, 1).meta;
    refused_as_simulated(engine.assemble(6, meta, &names).await, "assemble");
}

#[tokio::test(start_paused = true)]
async fn shape_only_checkpoints_are_pruned_like_any_other() {
    let storage = Arc::new(SimStorage::new(1e9, Duration::ZERO));
    let engine = CheckpointEngine::new(storage.clone(), 2);
    for step in [2, 4, 6] {
        let report = engine.save_sync(world(2, step, 64)).await.expect("save");
        assert_eq!(report.removed, if step == 6 { vec![2] } else { vec![] });
    }
    assert_eq!(engine.steps().await.expect("steps"), vec![4, 6]);
    assert_eq!(
        storage.size(&format!("{}/rank-0.safetensors", step_dir(2))),
        None
    );
    assert!(
        storage
            .size(&format!("{}/rank-1.safetensors", step_dir(6)))
            .is_some()
    );
    // The background save takes the same path.
    let h = engine.save_async(world(2, 8, 64)).expect("save");
    assert_eq!(h.wait().await.expect("committed").removed, vec![4]);
    assert_eq!(engine.latest().await.expect("latest"), Some(8));
}

#[tokio::test]
async fn the_local_filesystem_refuses_a_shape_only_shard_by_name() {
    let dir = std::env::temp_dir().join(format!("flotilla-shape-only-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for engine in [
        CheckpointEngine::local(&dir, 1),
        CheckpointEngine::new(
            Arc::new(flotilla_runtime::storage::local::LocalStorage::new(&dir)),
            1,
        ),
    ] {
        let err = engine.save_sync(world(1, 3, 8)).await.expect_err("refused");
        let text = err.to_string();
        assert!(
            matches!(&err, CkptError::Storage(StorageError::Unsupported { key, .. })
                if key == "step-00000003/rank-0.safetensors"),
            "{text}"
        );
        assert!(text.contains("simulated"), "{text}");
        assert_eq!(engine.steps().await.expect("steps"), Vec::<u64>::new());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn values_of_a_shape_only_snapshot_are_refused_not_invented() {
    let s = shape_only(0, 1, 1, 4);
    let no_values = |e: &dyn std::fmt::Display| {
        let t = e.to_string();
        assert!(
            t.contains("shape-only") && t.contains("simulated cluster"),
            "{t}"
        );
    };
    no_values(&encode_shard(&s).expect_err("encode"));
    no_values(&OwnCopy::new(s.clone()).expect_err("own copy"));
    match s.optimizer_state() {
        Err(e @ SnapshotError::NoValues { .. }) => no_values(&e),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A shape-only own copy (taken without hashing) is refused when it would be restored.
    let own = OwnCopy::with_sha256(s, String::new());
    no_values(&own.verified().expect_err("verified"));
}

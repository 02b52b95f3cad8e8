//! Peer replication over the in-process fabric and restoring from the fastest sound source:
//! replicas land on other hosts, a damaged replica or own copy is refused with the reason and
//! the next source serves, and the local engine's direct shard writes load back bit for bit.

use std::sync::Arc;
use std::time::Duration;

use flotilla_ckpt::format::encode_shard;
use flotilla_ckpt::replica::replica_sources;
use flotilla_ckpt::{
    CheckpointEngine, Layout, OwnCopy, ReplicaServer, Restorer, Snapshot, SnapshotMeta, Source,
    Which, push_replica, replica_peers,
};
use flotilla_model::optim::{AdamWState, ParamState};
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::topology::Topology;

const DEADLINE: Duration = Duration::from_secs(10);

fn snapshot(rank: usize, world: usize, step: u64) -> Snapshot {
    let meta = SnapshotMeta {
        rank,
        layout: Layout {
            world_size: world,
            pp: 1,
            ep: 1,
            dp: world,
            stage_layers: Vec::new(),
        },
        config_hash: "cafe".into(),
    };
    let mut s = Snapshot::new(meta, step);
    let v = |k: usize| {
        (0..k)
            .map(|i| (i * 7 + rank) as f32 * 0.25 - step as f32)
            .collect()
    };
    s.add_param("model.embed_tokens.weight", &[8, 4], v(32))
        .expect("param");
    s.add_param("model.norm.weight", &[4], v(4)).expect("param");
    let mut st = AdamWState {
        steps: step,
        ..AdamWState::default()
    };
    st.params.insert(
        "model.embed_tokens.weight".into(),
        ParamState {
            step,
            exp_avg: v(32),
            exp_avg_sq: v(32),
        },
    );
    s.set_optimizer(st).expect("optimizer");
    s.data_cursor = vec![1, 2, 3];
    s
}

#[test]
fn replicas_go_to_other_hosts() {
    let t = Topology::new(4, 2, 1, 1, 8).expect("topology");
    for r in 0..t.world() {
        let peers = replica_peers(&t, r, 3);
        assert_eq!(peers.len(), 2, "rank {r}");
        for p in &peers {
            assert_ne!(t.host_of(*p), t.host_of(r), "rank {r} → {p}");
            assert!(replica_sources(&t, *p, 3).contains(&r));
        }
    }
    assert_eq!(replica_peers(&t, 3, 1), Vec::<usize>::new(), "owner only");
    let one_host = Topology::new(1, 4, 1, 1, 4).expect("topology");
    assert!(replica_peers(&one_host, 0, 2).is_empty(), "no other host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_prefers_own_memory_then_a_peer_then_storage() {
    let dir = std::env::temp_dir().join(format!("flotilla-ckpt-replicas-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = CheckpointEngine::local(&dir, 2);
    let snap = snapshot(0, 2, 5);
    engine
        .save_sync(vec![snap.clone(), snapshot(1, 2, 5)])
        .await
        .expect("save");
    // Rank 0's replica goes to rank 1 (the other host) and rank 1 keeps it.
    let topo = Topology::new(2, 1, 1, 1, 2).expect("topology");
    let peers = replica_peers(&topo, 0, 2);
    assert_eq!(peers, vec![1]);
    let hub = InprocHub::new(2);
    let eps = hub.endpoints();
    let server = ReplicaServer::spawn(Arc::new(eps[1].clone()), vec![0], DEADLINE);
    let bytes = encode_shard(&snap).expect("encode");
    push_replica(&eps[0], &peers, 0, 5, bytes, DEADLINE)
        .await
        .expect("push, acknowledged");
    // Acknowledged: the replica is in place.
    assert_eq!(server.store.read().await.get(0).map(|r| r.step), Some(5));

    let own = OwnCopy::new(snap.clone()).expect("own copy");
    let all = Restorer {
        own: Some(&own),
        peers: Some((&eps[0], &peers)),
        storage: Some(&engine),
        deadline: DEADLINE,
    };
    let r = all.restore(0, Some(5)).await.expect("restore");
    assert_eq!((r.source, r.rejected.len()), (Source::OwnMemory, 0));
    assert_eq!(r.snapshot, snap);

    // Own memory damaged: the peer serves, and the reason is reported.
    let mut damaged = own.clone();
    if let Some(t) = damaged.snapshot_mut().params.get_mut("model.norm.weight") {
        let mut v = t.data().to_vec();
        v[1] = f32::from_bits(v[1].to_bits() ^ 1);
        *t = flotilla_ckpt::HostTensor::new("w", t.shape().to_vec(), v).expect("tensor");
    }
    let r = Restorer {
        own: Some(&damaged),
        ..all
    }
    .restore(0, Some(5))
    .await
    .expect("restore");
    assert_eq!(r.source, Source::Peer(1));
    assert_eq!(r.snapshot, snap);
    assert!(r.rejected[0].contains("own memory") && r.rejected[0].contains("damaged"));

    // The peer's replica damaged in its memory: refused with the reason, storage serves.
    server.store.write().await.tamper(0, |b| {
        let n = b.len();
        b[n - 3] ^= 0x10;
    });
    let r = Restorer { own: None, ..all }
        .restore(0, Some(5))
        .await
        .expect("restore");
    assert_eq!(r.source, Source::Storage(5));
    assert_eq!(r.snapshot, snap);
    assert_eq!(r.rejected.len(), 1, "{:?}", r.rejected);
    assert!(
        r.rejected[0].contains("rank 1") && r.rejected[0].contains("SHA-256"),
        "{:?}",
        r.rejected
    );

    // A peer without a replica, and a step nobody holds.
    let r = Restorer { own: None, ..all }
        .restore(1, None)
        .await
        .expect("restore");
    assert_eq!(r.source, Source::Storage(5));
    assert!(
        r.rejected[0].contains("holds no replica"),
        "{:?}",
        r.rejected
    );
    let e = all.restore(0, Some(9)).await.expect_err("no step 9");
    assert_eq!(e.tried.len(), 3, "{e}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_engine_writes_shards_that_load_back_bit_for_bit() {
    let dir = std::env::temp_dir().join(format!("flotilla-ckpt-direct-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = CheckpointEngine::local(&dir, 2);
    let snaps = vec![snapshot(0, 2, 3), snapshot(1, 2, 3)];
    let h = engine.save_async(snaps.clone()).expect("save");
    let (report, back) = h.wait_with_buffers().await.expect("commit");
    assert_eq!((report.step, report.files), (3, 2));
    assert_eq!(back, snaps, "the buffers come back unchanged");
    let bytes = std::fs::read(dir.join("step-00000003/rank-1.safetensors")).expect("shard");
    assert_eq!(bytes, encode_shard(&snaps[1]).expect("encode"));
    let loaded = engine.load(Which::Latest, true).await.expect("load");
    assert_eq!(loaded.snapshots, snaps);
    assert!(engine.verify(3).await.expect("verify").ok());
    let _ = std::fs::remove_dir_all(&dir);
}

//! Restoring a rank from each checkpoint source: a run checkpointed at step 3 (own memory, a
//! replica on a peer of another host over the in-process fabric, storage) and restored into a
//! fresh job from each source in turn ends at step 6 with exactly the parameters of the run that
//! was never interrupted. A damaged peer replica is refused with the reason and storage serves
//! instead.

use std::sync::Arc;
use std::time::Duration;

use flotilla_actors::job::{Job, Launch};
use flotilla_actors::pipeline::job_params_sha256;
use flotilla_actors::replicas::RankReplicas;
use flotilla_ckpt::{CheckpointEngine, Restored, Restorer, Source};
use flotilla_runtime::clock::RealClock;
use flotilla_runtime::config::Config;
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::storage::sim::SimStorage;
use flotilla_runtime::topology::Topology;

const K: u64 = 3;
const N: u64 = 6;

fn tiny() -> Config {
    let mut c = Config::default();
    c.job.steps = N;
    c.optimizer.warmup_steps = 1;
    c.data.batch_size = 2;
    c.data.seq_len = 16;
    c.cluster.cpu_threads = Some(1);
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

/// Steps `from..to` of `job`, then its parameters' SHA-256; the job stops.
async fn run(mut job: Job, from: u64, to: u64) -> String {
    for s in from..to {
        job.step(s).await.expect("step");
    }
    let sha = job_params_sha256(vec![job.params(to).await.expect("params")]);
    job.stop().await.expect("stop");
    sha
}

/// A fresh job restored from `r`, run to step N; its parameters' SHA-256.
async fn continue_from(cfg: &Config, r: &Restored) -> String {
    assert_eq!(r.snapshot.step, K);
    let mut job = start(cfg).await;
    job.restore(vec![r.snapshot.clone()])
        .await
        .expect("restore");
    run(job, K, N).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_restore_source_resumes_bit_exactly() {
    let cfg = tiny();
    let uninterrupted = run(start(&cfg).await, 0, N).await;

    // Run to K and checkpoint: keep in memory and replicate, persist to storage.
    let mut job = start(&cfg).await;
    for s in 0..K {
        job.step(s).await.expect("step");
    }
    let snap = job
        .snapshots(K)
        .await
        .expect("snapshot")
        .pop()
        .expect("one rank");
    job.stop().await.expect("stop");
    let storage = Arc::new(SimStorage::unlimited());
    let engine = CheckpointEngine::with_root(storage, "ckpt", 2);
    engine.save_sync(vec![snap.clone()]).await.expect("save");
    // Rank 0 (the trainer) on host 0; rank 1 on host 1 holds its replica.
    let topo = Topology::new(2, 1, 1, 1, 2).expect("topology");
    let hub = InprocHub::new(2);
    let deadline = Duration::from_secs(10);
    let fabric = |r: usize| -> Arc<dyn Fabric> { Arc::new(hub.endpoint(r)) };
    let mut me = RankReplicas::new(&topo, 2, fabric(0), deadline);
    let peer = RankReplicas::new(&topo, 2, fabric(1), deadline);
    assert_eq!(me.peers(), &[1]);
    me.keep(snap.clone()).await.expect("keep");
    for _ in 0..500 {
        if peer.server().store.read().await.get(0).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        peer.server().store.read().await.get(0).map(|r| r.step),
        Some(K)
    );

    // 1. Own memory.
    let r = me.restore(Some(&engine), Some(K)).await.expect("restore");
    assert_eq!(r.source, Source::OwnMemory);
    assert_eq!(
        continue_from(&cfg, &r).await,
        uninterrupted,
        "from own memory"
    );

    // 2. The peer's memory, once the rank's own copy is gone.
    me.drop_own();
    let r = me.restore(Some(&engine), Some(K)).await.expect("restore");
    assert_eq!(r.source, Source::Peer(1));
    assert_eq!(
        continue_from(&cfg, &r).await,
        uninterrupted,
        "from the peer"
    );

    // 3. Storage alone.
    let r = Restorer {
        own: None,
        peers: None,
        storage: Some(&engine),
        deadline,
    }
    .restore(0, Some(K))
    .await
    .expect("restore");
    assert_eq!(r.source, Source::Storage(K));
    assert_eq!(continue_from(&cfg, &r).await, uninterrupted, "from storage");

    // A bit flipped in the peer's copy: refused with the reason, storage serves.
    peer.server().store.write().await.tamper(0, |b| {
        let i = b.len() / 2;
        b[i] ^= 0x04;
    });
    let r = me.restore(Some(&engine), None).await.expect("restore");
    assert_eq!(r.source, Source::Storage(K));
    assert_eq!(r.rejected.len(), 1, "{:?}", r.rejected);
    assert!(
        r.rejected[0].contains("rank 1") && r.rejected[0].contains("damaged"),
        "{:?}",
        r.rejected
    );
    assert_eq!(
        continue_from(&cfg, &r).await,
        uninterrupted,
        "after the refused replica"
    );
}

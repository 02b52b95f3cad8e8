//! The communicator's collectives over the QUIC fabric between OS processes on 127.0.0.1: this
//! test binary re-executes itself (`--exact child_rank`, `FLOTILLA_COLL_CHILD` set) as ranks
//! `1..world` and joins them through `flotilla_runtime::fabric::quic::launch`. Every rank runs
//! ring and tree all-reduce, reduce-scatter, all-gather, broadcast and an all-to-all-v with
//! uneven and zero-length parts on integer-valued buffers, and checks every element exactly.
//! Two connections per pair, so the large buffers are striped.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use flotilla_collectives::{Algo, CommConfig, Communicator, ReduceOp};
use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::quic::launch;
use flotilla_runtime::fabric::quic::{JobCa, QuicFabric, QuicOptions};

const CHILD_ENV: &str = "FLOTILLA_COLL_CHILD";
/// Generous: two cores are shared with other work.
const T: Duration = Duration::from_secs(30);

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn opts() -> QuicOptions {
    QuicOptions {
        connect_timeout: T,
        connections: 2,
        stripe_bytes: 1 << 20,
        ..QuicOptions::default()
    }
}

fn child(_: usize) -> Command {
    let exe = std::env::current_exe().expect("the test binary");
    let mut c = Command::new(exe);
    c.args(["--exact", "child_rank", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1");
    c
}

/// Small integers, so that every sum is exact in f32.
fn val(rank: usize, j: usize) -> f32 {
    ((rank + 1) * (j % 1000)) as f32
}

/// Length of the all-to-all-v part from `src` to `dst`: uneven, some zero.
fn part_len(src: usize, dst: usize) -> usize {
    ((src * 3 + dst) % 3) * 40_000 + usize::from(src == dst) * 7
}

fn part_val(src: usize, dst: usize, k: usize) -> f32 {
    (src * 1_000_000 + dst * 100_000 + k) as f32
}

/// Every collective, checked exactly, on this rank of the mesh.
async fn collectives(f: QuicFabric) {
    let f = Arc::new(f);
    let (me, n) = (f.rank(), f.world());
    let cfg = CommConfig::with_deadline(T);
    let mut c = Communicator::world(Arc::clone(&f) as Arc<dyn Fabric>, 5, cfg);
    let rank_sum = (n * (n + 1) / 2) as f32;

    for (algo, len) in [(Algo::Ring, 786_433), (Algo::Tree, 10_001)] {
        let buf = (0..len).map(|j| val(me, j)).collect();
        let got = c
            .all_reduce(buf, ReduceOp::Sum, algo)
            .await
            .expect("all_reduce");
        assert_eq!(got.len(), len);
        let bad = (0..len).find(|&j| got[j] != rank_sum * (j % 1000) as f32);
        assert_eq!(bad, None, "{algo:?} all-reduce: first wrong element");
    }

    let chunk = 50_000;
    let buf = (0..n * chunk).map(|j| val(me, j)).collect();
    let got = c
        .reduce_scatter(buf, ReduceOp::Sum)
        .await
        .expect("reduce_scatter");
    assert_eq!(got.len(), chunk);
    let bad = (0..chunk).find(|&k| got[k] != rank_sum * ((me * chunk + k) % 1000) as f32);
    assert_eq!(bad, None, "reduce-scatter: first wrong element");

    let part = 300_000;
    let mine = (0..part).map(|k| (me * part + k) as f32).collect();
    let got = c.all_gather(mine).await.expect("all_gather");
    assert_eq!(got.len(), n * part);
    assert!(
        got.iter().enumerate().all(|(i, &x)| x == i as f32),
        "all-gather"
    );

    let root = 1 % n;
    let len = 400_001;
    let buf = if me == root {
        (0..len).map(|j| j as f32).collect()
    } else {
        vec![0.0; len]
    };
    let got = c.broadcast(buf, root).await.expect("broadcast");
    assert!(got.len() == len && got.iter().enumerate().all(|(j, &x)| x == j as f32));

    let send = (0..n)
        .map(|d| (0..part_len(me, d)).map(|k| part_val(me, d, k)).collect())
        .collect();
    let got = c.all_to_all_v(send).await.expect("all_to_all_v");
    assert_eq!(got.len(), n);
    for (s, p) in got.iter().enumerate() {
        assert_eq!(p.len(), part_len(s, me), "all-to-all-v part from {s}");
        assert!(p.iter().enumerate().all(|(k, &x)| x == part_val(s, me, k)));
    }

    c.barrier().await.expect("barrier");
    drop(c);
    f.shutdown().await;
}

/// The child side; does nothing unless started by a parent test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_rank() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let f = launch::child_mesh(localhost(), opts()).await.expect("join");
    collectives(f).await;
}

async fn run(world: usize) {
    let ca = JobCa::generate().expect("ca");
    let (f, kids) = launch::parent_mesh(&ca, world, localhost(), opts(), child)
        .await
        .expect("mesh");
    collectives(f).await;
    let st = tokio::task::spawn_blocking(move || kids.wait(T)).await;
    let st = st.expect("join").expect("children exit");
    assert!(st.iter().all(|s| s.success()), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectives_over_quic_between_two_processes() {
    run(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectives_over_quic_between_three_processes() {
    run(3).await;
}

//! HFReduce tests: hosts × ranks per host over the in-process fabric, exact integer results, and
//! failures that name the rank at fault.

use std::sync::Arc;
use std::time::Duration;

use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::topology::Topology;
use tokio::time::Instant;

use crate::tests::{cfg, data, expected};
use crate::{Algo, CommConfig, CommError, Communicator, HfReduce, HostReducer, ReduceOp};

/// A job of `hosts × per` ranks: the hub, each host's reducer, and each rank's handle.
fn job(
    hosts: usize,
    per: usize,
    chunk_bytes: usize,
    cfg: CommConfig,
) -> (Arc<InprocHub>, Vec<Arc<HostReducer>>, Vec<HfReduce>) {
    let topo = Topology::new(hosts, per, 1, 1, hosts * per).expect("topology");
    let hub = InprocHub::new(topo.world());
    let leaders: Vec<usize> = (0..hosts).map(|h| h * per).collect();
    let reducers: Vec<Arc<HostReducer>> = (0..hosts)
        .map(|h| Arc::new(HostReducer::for_host(&topo, h, cfg.clone()).with_threads(2)))
        .collect();
    let mut handles = Vec::new();
    for r in 0..topo.world() {
        let (h, local) = (topo.host_of(r), topo.local_index(r));
        let comm = (local == 0 && hosts > 1).then(|| {
            let ep = Arc::new(hub.endpoint(r)) as Arc<dyn Fabric>;
            Communicator::new(ep, leaders.clone(), 9, cfg.clone()).expect("leaders")
        });
        let hf = HfReduce::new(comm, Arc::clone(&reducers[h]), local, per, chunk_bytes)
            .expect("hfreduce");
        handles.push(hf);
    }
    (hub, reducers, handles)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hfreduce_equals_the_plain_sum_on_every_layout() {
    for (hosts, per) in [(1, 4), (2, 2), (2, 3), (3, 2), (1, 1), (4, 1)] {
        for algo in [Algo::Tree, Algo::Ring] {
            let n = hosts * per;
            // Small chunks so that large buffers run many pipelined chunks.
            let (_hub, _hosts, hfs) = job(hosts, per, 4096, cfg());
            let tasks: Vec<_> = hfs
                .into_iter()
                .enumerate()
                .map(|(r, hf)| {
                    tokio::spawn(async move {
                        let mut hf = hf.with_algo(algo);
                        let mut out = Vec::new();
                        for len in [0, 1, 5, 1023, 1025, 20_000, 300_001] {
                            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Avg] {
                                let input = data(r, len);
                                let ptr = input.as_ptr() as usize;
                                let got = hf.all_reduce(input, op).await.expect("all_reduce");
                                // The rank's own buffer comes back.
                                assert!(
                                    len == 0 || got.as_ptr() as usize == ptr,
                                    "buffer was replaced"
                                );
                                out.push((len, op, got));
                            }
                        }
                        out
                    })
                })
                .collect();
            for (r, t) in tasks.into_iter().enumerate() {
                for (len, op, got) in t.await.expect("rank task") {
                    assert!(
                        got == expected(n, len, op),
                        "{hosts}×{per} {algo:?} rank {r} len {len} {op:?}"
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_host_large_buffers_use_the_threaded_path() {
    let (_hub, hosts, hfs) = job(1, 4, 1 << 20, cfg());
    assert_eq!(hosts[0].local_count(), 4);
    let len = (1 << 20) + 7;
    let tasks: Vec<_> = hfs
        .into_iter()
        .enumerate()
        .map(|(r, mut hf)| {
            tokio::spawn(async move { hf.all_reduce(data(r, len), ReduceOp::Sum).await })
        })
        .collect();
    let want = expected(4, len, ReduceOp::Sum);
    for t in tasks {
        assert!(t.await.expect("task").expect("all_reduce") == want);
    }
}

fn short() -> CommConfig {
    CommConfig::with_deadline(Duration::from_millis(400))
}

/// Run every rank but `dead` once; return each live rank's error.
async fn run_without(hosts: usize, per: usize, dead: usize, tell: bool) -> Vec<(usize, CommError)> {
    let (hub, reducers, hfs) = job(hosts, per, 4096, short());
    if tell {
        hub.fail_rank(dead, "killed by the test");
        reducers[dead / per].fail(dead % per, "killed by the test");
    }
    let tasks: Vec<_> = hfs
        .into_iter()
        .enumerate()
        .filter(|&(r, _)| r != dead)
        .map(|(r, mut hf)| {
            tokio::spawn(async move {
                let e = hf.all_reduce(data(r, 50_000), ReduceOp::Sum).await;
                (r, e)
            })
        })
        .collect();
    let mut errs = Vec::new();
    for t in tasks {
        let (r, e) = t.await.expect("task");
        match e {
            Err(e) => errs.push((r, e)),
            Ok(_) => panic!("rank {r} finished an all-reduce without rank {dead}"),
        }
    }
    errs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_rank_is_named_by_every_other_rank() {
    let bound = Duration::from_secs(3);
    for (hosts, per) in [(2, 2), (1, 4), (3, 2)] {
        for dead in 0..hosts * per {
            for tell in [true, false] {
                let t = Instant::now();
                let errs = run_without(hosts, per, dead, tell).await;
                assert!(t.elapsed() < bound, "took {:?}", t.elapsed());
                for (r, e) in errs {
                    assert_eq!(
                        e.culprit(),
                        Some(dead),
                        "{hosts}×{per} dead {dead} told {tell}: rank {r}: {e}"
                    );
                    assert!(e.to_string().contains(&format!("rank {dead}")), "{e}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_lengths_fail_every_rank_and_poison() {
    let (_hub, _r, hfs) = job(1, 3, 4096, short());
    let tasks: Vec<_> = hfs
        .into_iter()
        .enumerate()
        .map(|(r, mut hf)| {
            tokio::spawn(async move {
                let len = if r == 2 { 9 } else { 10 };
                let e = hf.all_reduce(data(r, len), ReduceOp::Sum).await;
                let again = hf.all_reduce(data(r, 10), ReduceOp::Sum).await;
                (e, again)
            })
        })
        .collect();
    for t in tasks {
        let (e, again) = t.await.expect("task");
        assert!(
            matches!(e, Err(CommError::SizeMismatch { peer: 2, .. })),
            "{e:?}"
        );
        assert!(matches!(again, Err(CommError::Poisoned(_))), "{again:?}");
    }
}

#[test]
fn bad_arguments_are_refused() {
    let host = Arc::new(HostReducer::new(2));
    assert!(HfReduce::new(None, Arc::clone(&host), 0, 3, 1024).is_err());
    assert!(HfReduce::new(None, Arc::clone(&host), 2, 2, 1024).is_err());
    let hub = InprocHub::new(2);
    let comm = Communicator::world(Arc::new(hub.endpoint(0)) as Arc<dyn Fabric>, 0, cfg());
    assert!(HfReduce::new(Some(comm), Arc::clone(&host), 1, 2, 1024).is_err());
    assert!(HfReduce::new(None, host, 1, 2, 0).is_ok());
}

/// The leader's blocking stage drives the inter-host all-reduce through the runtime handle; this
/// must also work on a current-thread runtime.
#[tokio::test]
async fn works_on_a_current_thread_runtime() {
    let (_hub, _hosts, hfs) = job(2, 2, 4096, cfg());
    let len = 100_000;
    let tasks: Vec<_> = hfs
        .into_iter()
        .enumerate()
        .map(|(r, mut hf)| {
            tokio::spawn(async move { hf.all_reduce(data(r, len), ReduceOp::Sum).await })
        })
        .collect();
    let want = expected(4, len, ReduceOp::Sum);
    for t in tasks {
        assert!(t.await.expect("task").expect("all_reduce") == want);
    }
}

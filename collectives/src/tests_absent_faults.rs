//! Shape-only collectives fail as the f32 ones do: a dead, stalled or silenced peer gives every
//! rank the very error (and timing) the f32 operation gives; and HFReduce on shape-only buffers:
//! the leaders' messages of the f32 pipeline, and its failure rules.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::fabric::sim::{LinkModel, SimNetwork};
use flotilla_runtime::topology::Topology;
use tokio::time::Instant;

use crate::tests::{DEADLINE, cfg, data, on_all};
use crate::tests_absent::{COLLS, Coll, run};
use crate::tests_faults::GoesSilent;
use crate::{Algo, CommConfig, CommError, Communicator, HfReduce, HostReducer, ReduceOp};

/// How one rank of the group misbehaves.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Marked failed by the fabric 1 ms into the operation.
    Dies,
    /// Never enters the operation.
    Stalls,
    /// Enters it, but nothing it sends after its first `n` messages arrives.
    GoesSilent(usize),
}

/// One live rank's outcome: its rank, the operation's result, a second operation's, the time.
type Outcome = (
    usize,
    Result<Vec<usize>, CommError>,
    Result<Vec<usize>, CommError>,
    Duration,
);

/// Run `coll` twice on every rank of a group of `n` but the faulty rank `bad`; the outcomes,
/// and whether a message of `bad` was lost (a silenced rank that had nothing more to send
/// fails nobody).
async fn faulty(
    n: usize,
    bad: usize,
    fault: Fault,
    coll: Coll,
    shape_only: bool,
) -> (Vec<Outcome>, bool) {
    let hub = InprocHub::new(n);
    let mut quiet = None;
    let mut comms = Vec::new();
    for e in hub.endpoints() {
        let f: Arc<dyn Fabric> = match fault {
            Fault::GoesSilent(after) if e.rank() == bad => {
                let q = Arc::new(GoesSilent {
                    inner: e,
                    after,
                    sent: AtomicUsize::new(0),
                });
                quiet = Some(Arc::clone(&q));
                q
            }
            Fault::Dies | Fault::Stalls if e.rank() == bad => continue,
            _ => Arc::new(e),
        };
        comms.push(Communicator::world(f, 40, cfg()));
    }
    if let Fault::Dies = fault {
        let hub = Arc::clone(&hub);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            hub.fail_rank(bad, "killed by the test");
        });
    }
    let start = Instant::now();
    let out = on_all(comms, move |mut c| async move {
        let first = run(&mut c, coll, 10, shape_only).await;
        let second = run(&mut c, coll, 10, shape_only).await;
        (c.rank(), first, second, start.elapsed())
    })
    .await;
    let lost = quiet.is_none_or(|q| q.sent.load(Ordering::SeqCst) > q.after);
    (out.into_iter().filter(|o| o.0 != bad).collect(), lost)
}

/// Each outcome's rank, result lengths or culprit (for both operations), and time.
fn summary(outcomes: &[Outcome]) -> Vec<String> {
    let r = |res: &Result<Vec<usize>, CommError>| match res {
        Ok(lens) => format!("ok {lens:?}"),
        Err(e) => format!(
            "culprit {:?}, poisoned {}",
            e.culprit(),
            matches!(e, CommError::Poisoned(_))
        ),
    };
    outcomes
        .iter()
        .map(|(rank, first, second, took)| {
            format!("{rank}: {} then {}, {took:?}", r(first), r(second))
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_failed_or_silent_peer_is_named_as_by_f32() {
    let n = 5;
    let faults = [
        Fault::Dies,
        Fault::Stalls,
        Fault::GoesSilent(1),
        Fault::GoesSilent(2),
    ];
    // Rank 4 is the broadcast's root.
    for bad in [2, 4] {
        for fault in faults {
            for coll in COLLS {
                let (f, lost) = faulty(n, bad, fault, coll, false).await;
                let (a, lost_a) = faulty(n, bad, fault, coll, true).await;
                assert_eq!(lost, lost_a);
                let what = format!("rank {bad} {fault:?}, {coll:?}");
                if let Fault::Dies = fault {
                    // The fabric wakes the waiters on a dead rank in no set order, so a rank
                    // may see the death itself or a peer's abort naming it, in either run.
                    assert_eq!(summary(&f), summary(&a), "{what}");
                } else {
                    assert_eq!(f, a, "{what}");
                }
                let mut failed = 0;
                for (r, first, second, took) in &a {
                    assert!(*took <= 2 * DEADLINE + 2 * cfg().grace, "{what}: {took:?}");
                    failed += usize::from(first.is_err() || second.is_err());
                    // The first operation names the faulty rank. (A second one, after a rank
                    // went silent mid-way, may blame whoever waited on it: the silenced rank's
                    // stuck notices are lost too; the f32 run above says the same.)
                    let Err(e) = first else { continue };
                    assert_eq!(e.culprit(), Some(bad), "{what}: rank {r}: {e}");
                    if coll != Coll::SendRecv {
                        let again = second.as_ref().expect_err("poisoned");
                        assert!(matches!(again, CommError::Poisoned(_)), "{what}: {again}");
                    }
                }
                // A leaf of the broadcast's tree is needed by nobody, and a rank silenced after
                // its last send has done its part.
                let leaf = coll == Coll::Broadcast && bad != n - 1;
                assert!(leaf || !lost || failed > 0, "{what}: nobody noticed");
            }
        }
    }
}

/// Run `f` on every item as its own task; results in order.
async fn each<A, T, F, Fut>(items: Vec<A>, f: F) -> Vec<T>
where
    F: Fn(A) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = items.into_iter().map(|a| tokio::spawn(f(a))).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task panicked"));
    }
    out
}

/// A job of `hosts × per` ranks on simulated links (one host per `per` ranks): each rank's
/// HFReduce handle, and the host reducers.
fn hf_job(
    hosts: usize,
    per: usize,
    chunk_bytes: usize,
    algo: Algo,
    cfg: &CommConfig,
) -> (Arc<SimNetwork>, Vec<Arc<HostReducer>>, Vec<HfReduce>) {
    let topo = Topology::new(hosts, per, 1, 1, hosts * per).expect("topology");
    let net = SimNetwork::new(links(hosts, per));
    let eps = net.endpoints();
    let leaders: Vec<usize> = (0..hosts).map(|h| h * per).collect();
    let reducers: Vec<Arc<HostReducer>> = (0..hosts)
        .map(|h| Arc::new(HostReducer::for_host(&topo, h, cfg.clone())))
        .collect();
    let mut hfs = Vec::new();
    for (r, ep) in eps.into_iter().enumerate() {
        let (h, local) = (topo.host_of(r), topo.local_index(r));
        let comm = (local == 0).then(|| {
            let ep = Arc::new(ep) as Arc<dyn Fabric>;
            Communicator::new(ep, leaders.clone(), 9, cfg.clone()).expect("leaders")
        });
        let hf = HfReduce::new(comm, Arc::clone(&reducers[h]), local, per, chunk_bytes)
            .expect("hfreduce")
            .with_algo(algo);
        hfs.push(hf);
    }
    (net, reducers, hfs)
}

fn links(hosts: usize, per: usize) -> LinkModel {
    LinkModel {
        host_of: (0..hosts * per).map(|r| r / per).collect(),
        intra_host_bytes_per_s: 4e6,
        inter_host_bytes_per_s: 1e6,
        latency: Duration::from_micros(3),
    }
}

/// What the f32 HFReduce's leaders send: one f32 all-reduce per chunk (a fresh buffer with room
/// for the trailer, as the reducer thread makes), one after the other. Each leader's finishing
/// time.
async fn f32_leaders(hosts: usize, len: usize, chunk: usize, algo: Algo) -> Vec<Duration> {
    let model = links(hosts, 1);
    let comms: Vec<_> = SimNetwork::new(model)
        .endpoints()
        .into_iter()
        .map(|e| Communicator::world(Arc::new(e) as Arc<dyn Fabric>, 9, cfg()))
        .collect();
    let start = Instant::now();
    on_all(comms, move |mut c| async move {
        for k in 0..len.div_ceil(chunk).max(1) {
            let part = len.saturating_sub(k * chunk).min(chunk);
            let mut buf = Vec::with_capacity(part + 3);
            buf.extend(data(c.rank(), part));
            c.all_reduce(buf, ReduceOp::Sum, algo)
                .await
                .expect("all_reduce");
        }
        start.elapsed()
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn shape_only_hfreduce_sends_what_the_f32_leaders_send() {
    let chunk_bytes = 4096;
    for (hosts, per) in [(1, 3), (2, 2), (3, 2), (4, 1)] {
        for algo in [Algo::Tree, Algo::Ring, Algo::Auto] {
            for len in [0, 1, 1023, 1025, 5000] {
                let (_net, _r, hfs) = hf_job(hosts, per, chunk_bytes, algo, &cfg());
                let start = Instant::now();
                let times = each(hfs, move |mut hf| async move {
                    hf.all_reduce_absent(len, ReduceOp::Avg)
                        .await
                        .expect("all_reduce_absent");
                    start.elapsed()
                })
                .await;
                let what = format!("{hosts}×{per} {algo:?} len {len}");
                if hosts == 1 {
                    assert!(times.iter().all(|t| t.is_zero()), "{what}: {times:?}");
                    continue;
                }
                let want = f32_leaders(hosts, len, chunk_bytes / 4, algo).await;
                // Every rank of a host gets its result when its leader is done.
                let got: Vec<_> = times.iter().step_by(per).copied().collect();
                assert_eq!(got, want, "{what}");
                for (r, t) in times.iter().enumerate() {
                    assert_eq!(*t, want[r / per], "{what}: rank {r}");
                }
                assert!(want.iter().all(|t| !t.is_zero()), "{what}");
            }
        }
    }
}

fn short() -> CommConfig {
    CommConfig::with_deadline(Duration::from_millis(400))
}

#[tokio::test(start_paused = true)]
async fn shape_only_hfreduce_names_a_dead_rank_and_poisons() {
    for (hosts, per) in [(2, 2), (1, 4), (3, 2)] {
        for dead in 0..hosts * per {
            for tell in [true, false] {
                let (net, reducers, hfs) = hf_job(hosts, per, 4096, Algo::Tree, &short());
                if tell {
                    net.hub().fail_rank(dead, "killed by the test");
                    reducers[dead / per].fail(dead % per, "killed by the test");
                }
                let live: Vec<_> = hfs
                    .into_iter()
                    .enumerate()
                    .filter(|&(r, _)| r != dead)
                    .collect();
                let errs = each(live, |(r, mut hf)| async move {
                    let first = hf.all_reduce_absent(50_000, ReduceOp::Sum).await;
                    let again = hf.all_reduce_absent(50_000, ReduceOp::Sum).await;
                    (r, first, again)
                })
                .await;
                for (r, first, again) in errs {
                    let what = format!("{hosts}×{per} dead {dead} told {tell}: rank {r}");
                    let e = first.expect_err(&what);
                    assert_eq!(e.culprit(), Some(dead), "{what}: {e}");
                    assert!(e.to_string().contains(&format!("rank {dead}")), "{e}");
                    let again = again.expect_err("poisoned");
                    assert!(matches!(again, CommError::Poisoned(_)), "{what}: {again}");
                }
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_host_mixing_shape_only_and_f32_names_the_odd_rank() {
    // Host 0 (ranks 0–2) mixes: `odd` passes a shape-only buffer and its other ranks f32 ones;
    // host 1 (ranks 3–5) is shape-only throughout.
    for (odd, culprit) in [(2, 2), (0, 1)] {
        let (_net, _r, hfs) = hf_job(2, 3, 4096, Algo::Tree, &short());
        let ranks: Vec<_> = hfs.into_iter().enumerate().collect();
        let out = each(ranks, move |(r, mut hf)| async move {
            let first = if r == odd || r >= 3 {
                hf.all_reduce_absent(10, ReduceOp::Sum).await
            } else {
                hf.all_reduce(data(r, 10), ReduceOp::Sum).await.map(drop)
            };
            let again = hf.all_reduce_absent(10, ReduceOp::Sum).await;
            (r, first, again)
        })
        .await;
        for (r, first, again) in out {
            let e = first.expect_err("host 0 mixes buffers");
            assert_eq!(e.culprit(), Some(culprit), "rank {r}: {e}");
            if r < 3 {
                assert!(matches!(e, CommError::BadMessage { .. }), "rank {r}: {e}");
            }
            assert!(matches!(again, Err(CommError::Poisoned(_))), "{again:?}");
        }
    }
}

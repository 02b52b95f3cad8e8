//! Cross-cutting tests of the communicator over the in-process fabric.
//!
//! Data are small integers held in f32, so every reduction order gives the exact same result and
//! results are compared with `==`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;
use tokio::time::Instant;

use crate::{Algo, CommConfig, CommError, Communicator, ReduceOp};

pub(crate) const DEADLINE: Duration = Duration::from_secs(5);

pub(crate) fn cfg() -> CommConfig {
    CommConfig::with_deadline(DEADLINE)
}

/// A hub of `n` ranks and a world communicator per rank on `channel`.
pub(crate) fn world(n: usize, channel: u32) -> (Arc<InprocHub>, Vec<Communicator>) {
    world_with(n, channel, cfg())
}

/// [`world`] with another configuration.
pub(crate) fn world_with(
    n: usize,
    channel: u32,
    cfg: CommConfig,
) -> (Arc<InprocHub>, Vec<Communicator>) {
    let hub = InprocHub::new(n);
    let comms = hub
        .endpoints()
        .into_iter()
        .map(|e| Communicator::world(Arc::new(e) as Arc<dyn Fabric>, channel, cfg.clone()))
        .collect();
    (hub, comms)
}

/// Run `f` on every communicator as its own task; results in rank order.
pub(crate) async fn on_all<T, F, Fut>(comms: Vec<Communicator>, f: F) -> Vec<T>
where
    F: Fn(Communicator) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = comms.into_iter().map(|c| tokio::spawn(f(c))).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("rank task panicked"));
    }
    out
}

/// Rank `r`'s input of `len` elements: small integers, different per rank and position.
pub(crate) fn data(r: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|k| ((r * 31 + k * 7) % 17) as f32 - 8.0)
        .collect()
}

pub(crate) fn expected(n: usize, len: usize, op: ReduceOp) -> Vec<f32> {
    let inputs: Vec<_> = (0..n).map(|r| data(r, len)).collect();
    (0..len)
        .map(|k| {
            let xs = inputs.iter().map(|x| x[k]);
            match op {
                ReduceOp::Sum => xs.sum(),
                ReduceOp::Avg => xs.sum::<f32>() / n as f32,
                ReduceOp::Max => xs.fold(f32::NEG_INFINITY, f32::max),
            }
        })
        .collect()
}

const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max];
const ALGOS: [Algo; 4] = [Algo::Ring, Algo::Tree, Algo::Star, Algo::Auto];

fn lens(n: usize) -> Vec<usize> {
    vec![0, 1, n.saturating_sub(1), n + 3, 1000, 20_000]
}

#[tokio::test]
async fn all_reduce_every_size_op_and_algorithm() {
    for n in 1..=8 {
        let (hub, comms) = world(n, 1);
        let results = on_all(comms, move |mut c| async move {
            let mut out = Vec::new();
            for len in lens(n) {
                for op in OPS {
                    for algo in ALGOS {
                        let r = c.all_reduce(data(c.rank(), len), op, algo).await;
                        out.push(((len, op, algo), r.expect("all_reduce")));
                    }
                }
            }
            out
        })
        .await;
        let want: Vec<_> = lens(n)
            .into_iter()
            .flat_map(|len| OPS.map(|op| ((len, op), expected(n, len, op))))
            .collect();
        for rank_results in results {
            for ((len, op, algo), got) in rank_results {
                let w = want.iter().find(|(k, _)| *k == (len, op)).map(|(_, w)| w);
                assert!(w == Some(&got), "n {n} len {len} {op:?} {algo:?}");
            }
        }
        assert_eq!(hub.mailboxes(), 0, "no message left behind");
    }
}

#[tokio::test]
async fn auto_picks_tree_below_the_threshold() {
    let (_hub, comms) = world(2, 1);
    let c = &comms[0];
    assert_eq!(c.pick(Algo::Auto, 16 * 1024 - 1), Algo::Tree);
    assert_eq!(c.pick(Algo::Auto, 16 * 1024), Algo::Ring);
    assert_eq!(c.pick(Algo::Ring, 1), Algo::Ring);
    // In process, large all-reduces go through the star.
    let hub = InprocHub::new(2);
    let c = Communicator::world(Arc::new(hub.endpoint(0)), 1, cfg().in_process());
    assert_eq!(c.pick(Algo::Auto, 16 * 1024), Algo::Ring);
    assert_eq!(c.pick(Algo::Auto, (1 << 20) - 1), Algo::Ring);
    assert_eq!(c.pick(Algo::Auto, 1 << 20), Algo::Star);
    assert_eq!(c.pick(Algo::Auto, 16 * 1024 - 1), Algo::Tree);
    assert_eq!(c.pick(Algo::Tree, 1 << 20), Algo::Tree);
}

#[tokio::test]
async fn reduce_scatter_and_all_gather() {
    // Not in process (ring), and in process with every size above the star threshold.
    let star = CommConfig {
        star_threshold_bytes: 0,
        ..cfg().in_process()
    };
    for (n, cfg) in (1..=8).flat_map(|n| [(n, cfg()), (n, star.clone())]) {
        let (hub, comms) = world_with(n, 2, cfg);
        let results = on_all(comms, move |mut c| async move {
            let mut out = Vec::new();
            for chunk in [0, 1, 5] {
                for op in OPS {
                    let mine = c
                        .reduce_scatter(data(c.rank(), n * chunk), op)
                        .await
                        .expect("reduce_scatter");
                    out.push((chunk, Some(op), mine));
                }
                let all = c
                    .all_gather(data(c.rank(), chunk))
                    .await
                    .expect("all_gather");
                out.push((chunk, None, all));
            }
            (c.rank(), out)
        })
        .await;
        for (r, rank_results) in results {
            for (chunk, op, got) in rank_results {
                let want: Vec<f32> = match op {
                    Some(op) => expected(n, n * chunk, op)[r * chunk..(r + 1) * chunk].to_vec(),
                    None => (0..n).flat_map(|i| data(i, chunk)).collect(),
                };
                assert_eq!(got, want, "n {n} rank {r} chunk {chunk} {op:?}");
            }
        }
        assert_eq!(hub.mailboxes(), 0);
    }
}

#[tokio::test]
async fn broadcast_from_every_root() {
    for n in 1..=8 {
        let (_hub, comms) = world(n, 3);
        let results = on_all(comms, move |mut c| async move {
            let mut out = Vec::new();
            for root in 0..n {
                for len in [0, 7] {
                    let buf = if c.rank() == root {
                        data(root, len)
                    } else {
                        vec![0.0; len]
                    };
                    let got = c.broadcast(buf, root).await.expect("broadcast");
                    out.push((root, len, got));
                }
            }
            out
        })
        .await;
        for rank_results in results {
            for (root, len, got) in rank_results {
                assert_eq!(got, data(root, len), "n {n} root {root}");
            }
        }
    }
}

/// Part i → j of the all-to-all test: uneven lengths, zero for some pairs.
pub(crate) fn part(i: usize, j: usize) -> Vec<f32> {
    let len = (i * 3 + j * 5) % 4 + usize::from(i == j) * 2;
    (0..len).map(|k| (i * 1000 + j * 100 + k) as f32).collect()
}

#[tokio::test]
async fn all_to_all_v_uneven_and_empty_parts() {
    for n in 1..=8 {
        let (hub, comms) = world(n, 4);
        let results = on_all(comms, move |mut c| async move {
            let me = c.rank();
            let mut out = Vec::new();
            // Twice, to check successive operations do not mix.
            for _ in 0..2 {
                let send = (0..n).map(|j| part(me, j)).collect();
                out.push(c.all_to_all_v(send).await.expect("all_to_all_v"));
            }
            // Everything empty.
            let none = c
                .all_to_all_v(vec![Vec::new(); n])
                .await
                .expect("empty all_to_all_v");
            assert!(none.iter().all(Vec::is_empty));
            (me, out)
        })
        .await;
        for (me, rounds) in results {
            for got in rounds {
                let want: Vec<_> = (0..n).map(|i| part(i, me)).collect();
                assert_eq!(got, want, "n {n} rank {me}");
            }
        }
        assert_eq!(hub.mailboxes(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn barrier_waits_for_the_last_rank() {
    for n in 1..=8 {
        let (_hub, comms) = world(n, 5);
        let start = Instant::now();
        let waited = on_all(comms, move |mut c| async move {
            if c.rank() == n - 1 {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            c.barrier().await.expect("barrier");
            start.elapsed()
        })
        .await;
        assert!(
            waited.iter().all(|w| *w >= Duration::from_secs(2)),
            "n {n}: {waited:?}"
        );
    }
}

#[tokio::test]
async fn point_to_point_around_a_ring() {
    let n = 5;
    let (hub, comms) = world(n, 6);
    let got = on_all(comms, move |c| async move {
        let me = c.rank();
        c.send((me + 1) % n, 9, data(me, 3)).await.expect("send");
        c.send((me + 1) % n, 10, vec![me as f32])
            .await
            .expect("send");
        // Receive tag 10 first: tags are independent streams.
        let b = c.recv((me + n - 1) % n, 10).await.expect("recv");
        let a = c.recv_exact((me + n - 1) % n, 9, 3).await.expect("recv");
        (me, a, b)
    })
    .await;
    for (me, a, b) in got {
        let left = (me + n - 1) % n;
        assert_eq!(a, data(left, 3));
        assert_eq!(b, vec![left as f32]);
    }
    assert_eq!(hub.mailboxes(), 0);
}

#[tokio::test(start_paused = true)]
async fn point_to_point_timeout_and_size_check_name_the_peer() {
    let (_hub, comms) = world(3, 6);
    let err = comms[0].recv(2, 1).await.expect_err("nobody sent");
    assert!(matches!(err, CommError::Timeout { rank: 2, .. }), "{err}");
    comms[1].send(0, 2, vec![1.0; 4]).await.expect("send");
    let err = comms[0]
        .recv_exact(1, 2, 3)
        .await
        .expect_err("wrong length");
    assert!(
        matches!(
            err,
            CommError::SizeMismatch {
                peer: 1,
                theirs: 4,
                ours: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        comms[0].send(3, 0, vec![]).await,
        Err(CommError::InvalidArgument { .. })
    ));
}

#[tokio::test]
async fn subgroups_run_next_to_the_world_group() {
    let hub = InprocHub::new(6);
    let eps: Vec<Arc<dyn Fabric>> = hub
        .endpoints()
        .into_iter()
        .map(|e| Arc::new(e) as Arc<dyn Fabric>)
        .collect();
    let handles: Vec<_> = eps
        .into_iter()
        .map(|f| {
            tokio::spawn(async move {
                let r = f.rank();
                let group: Vec<usize> = (r % 2..6).step_by(2).collect();
                let mut sub = Communicator::new(Arc::clone(&f), group, 10 + r as u32 % 2, cfg())
                    .expect("subgroup");
                let mut all = Communicator::world(f, 20, cfg());
                let mut out = Vec::new();
                for len in [3, 100] {
                    let (s, w) = tokio::join!(
                        sub.all_reduce(data(r, len), ReduceOp::Sum, Algo::Ring),
                        all.all_reduce(data(r, len), ReduceOp::Max, Algo::Tree),
                    );
                    out.push((len, s.expect("subgroup all_reduce"), w.expect("world")));
                }
                (r, out)
            })
        })
        .collect();
    for h in handles {
        let (r, out) = h.await.expect("task");
        for (len, s, w) in out {
            let mut sum = vec![0.0; len];
            for i in (r % 2..6).step_by(2) {
                for (s, x) in sum.iter_mut().zip(data(i, len)) {
                    *s += x;
                }
            }
            assert_eq!(s, sum, "rank {r} subgroup");
            assert_eq!(w, expected(6, len, ReduceOp::Max), "rank {r} world");
        }
    }
    assert_eq!(hub.mailboxes(), 0);
}

#[test]
fn bad_groups_are_refused() {
    let hub = InprocHub::new(4);
    let f: Arc<dyn Fabric> = Arc::new(hub.endpoint(1));
    let new = |ranks: Vec<usize>| Communicator::new(Arc::clone(&f), ranks, 0, cfg());
    assert!(matches!(new(vec![0, 2]), Err(CommError::BadGroup { .. })));
    assert!(matches!(new(vec![1, 1]), Err(CommError::BadGroup { .. })));
    assert!(matches!(new(vec![1, 4]), Err(CommError::BadGroup { .. })));
    let c = new(vec![3, 1]).expect("valid group");
    assert_eq!((c.rank(), c.size(), c.ranks()), (1, 2, &[3, 1][..]));
}

#[tokio::test]
async fn buffers_move_without_copies() {
    let (_hub, comms) = world(2, 13);
    // Point-to-point: the receiver gets the sender's allocation.
    let buf = data(0, 64);
    let ptr = buf.as_ptr() as usize;
    comms[0].send(1, 0, buf).await.expect("send");
    let got = comms[1].recv(0, 0).await.expect("recv");
    assert_eq!(got.as_ptr() as usize, ptr);
    // All-to-all: a rank's part for itself stays where it is.
    let got = on_all(comms, |mut c| async move {
        let mine = data(c.rank(), 8);
        let ptr = mine.as_ptr() as usize;
        let mut send = vec![Vec::new(), Vec::new()];
        send[c.rank()] = mine;
        let recv = c.all_to_all_v(send).await.expect("all_to_all_v");
        recv[c.rank()].as_ptr() as usize == ptr
    })
    .await;
    assert_eq!(got, [true, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_to_point_runs_while_a_collective_waits() {
    let (hub, comms) = world(3, 14);
    let out = on_all(comms, |mut c| async move {
        let p2p = c.p2p();
        let me = c.rank();
        // Rank 2 enters the all-reduce only after it got rank 0's message; ranks 0 and 1
        // send theirs from inside the window where their all-reduce is already waiting.
        let collective = async {
            if me == 2 {
                let v = p2p.recv(0, 1).await.expect("recv");
                assert_eq!(v, vec![42.0]);
            }
            c.all_reduce(data(me, 10), ReduceOp::Sum, Algo::Auto).await
        };
        let side = async {
            if me == 0 {
                p2p.send(2, 1, vec![42.0]).await.expect("send");
            }
        };
        let (r, ()) = tokio::join!(collective, side);
        r.expect("all_reduce")
    })
    .await;
    assert!(out.iter().all(|r| *r == expected(3, 10, ReduceOp::Sum)));
    assert_eq!(hub.mailboxes(), 0);
}

#[tokio::test(start_paused = true)]
async fn on_simulated_links_ring_wins_big_and_tree_wins_small() {
    use flotilla_runtime::clock::undilate;
    use flotilla_runtime::fabric::sim::{LinkModel, SimNetwork};

    let n = 8;
    let net = SimNetwork::new(LinkModel {
        host_of: (0..n).collect(),
        intra_host_bytes_per_s: 100e9,
        inter_host_bytes_per_s: 1e9,
        latency: Duration::from_micros(10),
    });
    let comms = net
        .endpoints()
        .into_iter()
        .map(|e| Communicator::world(Arc::new(e) as Arc<dyn Fabric>, 15, cfg()))
        .collect();
    let cases = [
        (1 << 18, Algo::Ring),
        (1 << 18, Algo::Tree),
        (16, Algo::Ring),
        (16, Algo::Tree),
    ];
    let times = on_all(comms, move |mut c| async move {
        let mut times = Vec::new();
        for (len, algo) in cases {
            c.barrier().await.expect("barrier");
            let t0 = Instant::now();
            let got = c.all_reduce(data(c.rank(), len), ReduceOp::Sum, algo).await;
            times.push(undilate(t0.elapsed()));
            assert!(got.expect("all_reduce") == expected(n, len, ReduceOp::Sum));
        }
        times
    })
    .await;
    let t = &times[0];
    // Ring: 2(n−1) = 14 steps of (1 MiB / n at 1 GB/s + 10 µs latency) ≈ 1.98 ms, plus the
    // skew of the barrier's release down the tree.
    assert!(
        t[0] > Duration::from_micros(1950) && t[0] < Duration::from_micros(2300),
        "{t:?}"
    );
    assert!(t[0] < t[1], "ring must beat the tree on 1 MiB: {t:?}");
    assert!(
        t[3] < t[2],
        "the tree must beat the ring on 64 bytes: {t:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stalled_rank_fails_its_group_only() {
    let hub = InprocHub::new(6);
    let stalled = 5;
    let mut handles = Vec::new();
    for e in hub.endpoints().into_iter().filter(|e| e.rank() != stalled) {
        handles.push(tokio::spawn(async move {
            let r = e.rank();
            let f: Arc<dyn Fabric> = Arc::new(e);
            let group: Vec<usize> = (r % 2..6).step_by(2).collect();
            let mut c = Communicator::new(f, group, 30 + r as u32 % 2, cfg()).expect("group");
            (r, c.all_reduce(data(r, 5), ReduceOp::Sum, Algo::Ring).await)
        }));
    }
    for h in handles {
        let (r, res) = h.await.expect("task");
        if r % 2 == 0 {
            res.expect("the even group is whole");
        } else {
            assert_eq!(
                res.expect_err("the odd group lost rank 5").culprit(),
                Some(stalled)
            );
        }
    }
}

#[test]
fn config_follows_the_supervision_section() {
    let s = flotilla_runtime::config::SupervisionConfig::default();
    let c = CommConfig::from_supervision(&s);
    assert_eq!(c.deadline, s.peer_timeout());
    assert!(c.grace < c.deadline);
    assert_eq!(c.tree_threshold_bytes, 64 * 1024);
}

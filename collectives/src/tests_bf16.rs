//! bf16 collectives over the in-process fabric: every operation and algorithm, world sizes 1–8.
//!
//! Data are small integers (|x| ≤ 8), exactly representable in bf16, and so are all their
//! partial sums over at most 8 ranks, so every reduction order gives the exact same bits. The
//! expected `Avg` is computed as the implementation does it: the exact sum divided in f32, then
//! rounded to bf16 once.

use crate::tests::{cfg, data, expected, on_all, part, world, world_with};
use crate::{Algo, CommConfig, CommError, ReduceOp, to_bf16};

const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max];
const ALGOS: [Algo; 4] = [Algo::Ring, Algo::Tree, Algo::Star, Algo::Auto];

fn bf(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| to_bf16(x)).collect()
}

/// Rank `r`'s bf16 input of `len` elements.
fn bdata(r: usize, len: usize) -> Vec<u16> {
    bf(&data(r, len))
}

/// In process, with the star for every size.
fn star() -> CommConfig {
    CommConfig {
        star_threshold_bytes: 0,
        ..cfg().in_process()
    }
}

#[tokio::test]
async fn bf16_all_reduce_every_size_op_and_algorithm() {
    for (n, cfg) in (1..=8).flat_map(|n| [(n, cfg()), (n, star())]) {
        let (hub, comms) = world_with(n, 31, cfg);
        let results = on_all(comms, move |mut c| async move {
            let mut out = Vec::new();
            for len in [0, 1, n + 3, 1000, 20_000] {
                for op in OPS {
                    for algo in ALGOS {
                        let r = c.all_reduce_bf16(bdata(c.rank(), len), op, algo).await;
                        out.push(((len, op, algo), r.expect("all_reduce_bf16")));
                    }
                }
            }
            out
        })
        .await;
        for rank_results in results {
            for ((len, op, algo), got) in rank_results {
                let want = bf(&expected(n, len, op));
                assert!(got == want, "n {n} len {len} {op:?} {algo:?}");
            }
        }
        assert_eq!(hub.mailboxes(), 0, "no message left behind");
    }
}

#[tokio::test]
async fn bf16_reduce_scatter_all_gather_and_broadcast() {
    for (n, cfg) in (1..=8).flat_map(|n| [(n, cfg()), (n, star())]) {
        let (hub, comms) = world_with(n, 32, cfg);
        let results = on_all(comms, move |mut c| async move {
            let me = c.rank();
            let mut out = Vec::new();
            for chunk in [0, 1, 5, 20_000] {
                for op in OPS {
                    let mine = c.reduce_scatter_bf16(bdata(me, n * chunk), op).await;
                    out.push((format!("rs {chunk} {op:?}"), mine.expect("reduce_scatter")));
                }
                let all = c.all_gather_bf16(bdata(me, chunk)).await;
                out.push((format!("ag {chunk}"), all.expect("all_gather")));
            }
            for root in 0..n {
                let buf = if me == root {
                    bdata(root, 7)
                } else {
                    vec![0; 7]
                };
                let got = c.broadcast_bf16(buf, root).await.expect("broadcast");
                out.push((format!("bc {root}"), got));
            }
            (me, out)
        })
        .await;
        for (r, rank_results) in results {
            let mut it = rank_results.into_iter();
            for chunk in [0, 1, 5, 20_000] {
                for op in OPS {
                    let (what, got) = it.next().expect("a result");
                    let want = &expected(n, n * chunk, op)[r * chunk..(r + 1) * chunk];
                    assert!(got == bf(want), "n {n} rank {r} {what}");
                }
                let (what, got) = it.next().expect("a result");
                let want: Vec<f32> = (0..n).flat_map(|i| data(i, chunk)).collect();
                assert!(got == bf(&want), "n {n} rank {r} {what}");
            }
            for root in 0..n {
                let (what, got) = it.next().expect("a result");
                assert_eq!(got, bdata(root, 7), "n {n} rank {r} {what}");
            }
        }
        assert_eq!(hub.mailboxes(), 0);
    }
}

#[tokio::test]
async fn bf16_all_to_all_v_and_point_to_point() {
    for n in 1..=8 {
        let (hub, comms) = world(n, 33);
        let results = on_all(comms, move |mut c| async move {
            let me = c.rank();
            let send = (0..n).map(|j| bf(&part(me, j))).collect();
            let got = c.all_to_all_v_bf16(send).await.expect("all_to_all_v");
            // Around the ring by point-to-point.
            c.send_bf16((me + 1) % n, 5, bdata(me, 9))
                .await
                .expect("send");
            let from_left = c.recv_bf16((me + n - 1) % n, 5).await.expect("recv");
            (me, got, from_left)
        })
        .await;
        for (me, got, from_left) in results {
            for (i, p) in got.iter().enumerate() {
                assert_eq!(*p, bf(&part(i, me)), "n {n} {i} → {me}");
            }
            assert_eq!(from_left, bdata((me + n - 1) % n, 9));
        }
        assert_eq!(hub.mailboxes(), 0);
    }
}

#[tokio::test]
async fn f32_and_bf16_do_not_mix() {
    let (_hub, comms) = world(2, 34);
    let errs = on_all(comms, |mut c| async move {
        if c.rank() == 0 {
            c.all_reduce(data(0, 8), ReduceOp::Sum, Algo::Ring)
                .await
                .map(drop)
        } else {
            c.all_reduce_bf16(bdata(1, 8), ReduceOp::Sum, Algo::Ring)
                .await
                .map(drop)
        }
    })
    .await;
    for (r, e) in errs.into_iter().enumerate() {
        let e = e.expect_err("element types differ");
        let named = matches!(e, CommError::BadMessage { .. } | CommError::Aborted { .. });
        assert!(named && e.culprit().is_some(), "rank {r}: {e}");
    }
}

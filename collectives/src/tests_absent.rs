//! Shape-only collectives on simulated links: every operation takes exactly the virtual time of
//! the f32 operation of the same length (the same messages, of the same sizes), a billion
//! elements cost nothing but their messages, and shape-only and f32 messages never mix.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::sim::{LinkModel, SimNetwork};
use tokio::time::Instant;

use crate::tests::{cfg, data, on_all};
use crate::{Algo, CommConfig, CommError, Communicator, ReduceOp};

/// The collectives under test (`SendRecv`: every rank sends to its right neighbour and receives
/// from its left one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Coll {
    AllReduce(Algo),
    ReduceScatter,
    AllGather,
    Broadcast,
    AllToAll,
    SendRecv,
}

pub(crate) const COLLS: [Coll; 9] = [
    Coll::AllReduce(Algo::Ring),
    Coll::AllReduce(Algo::Tree),
    Coll::AllReduce(Algo::Star),
    Coll::AllReduce(Algo::Auto),
    Coll::ReduceScatter,
    Coll::AllGather,
    Coll::Broadcast,
    Coll::AllToAll,
    Coll::SendRecv,
];

/// Rank `r`'s f32 input of `len` elements, with spare room for the frame trailer (what the
/// shape-only messages model; see [`crate::shape_only`]).
fn roomy(r: usize, len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len + 3);
    v.extend(data(r, len));
    v
}

/// Lengths of the parts rank `me` sends in the all-to-all: a third, two thirds or all of `len`
/// (uneven, and empty for the short ones of a short `len`).
fn parts(me: usize, n: usize, len: usize) -> Vec<usize> {
    (0..n).map(|j| len * (1 + (me + j) % 3) / 3).collect()
}

/// Run `coll` on `c` with buffers of `len` elements, f32 or shape-only; returns the lengths of
/// the result.
pub(crate) async fn run(
    c: &mut Communicator,
    coll: Coll,
    len: usize,
    shape_only: bool,
) -> Result<Vec<usize>, CommError> {
    let (n, me) = (c.size(), c.rank());
    let one = |l: usize| vec![l];
    let lens = |v: Vec<Vec<f32>>| v.iter().map(Vec::len).collect::<Vec<_>>();
    match (coll, shape_only) {
        (Coll::AllReduce(algo), false) => c
            .all_reduce(roomy(me, len), ReduceOp::Sum, algo)
            .await
            .map(|v| one(v.len())),
        (Coll::AllReduce(algo), true) => c
            .all_reduce_absent(len, ReduceOp::Sum, algo)
            .await
            .map(|()| one(len)),
        (Coll::ReduceScatter, false) => c
            .reduce_scatter(roomy(me, len * n), ReduceOp::Avg)
            .await
            .map(|v| one(v.len())),
        (Coll::ReduceScatter, true) => c
            .reduce_scatter_absent(len * n, ReduceOp::Avg)
            .await
            .map(one),
        (Coll::AllGather, false) => c.all_gather(roomy(me, len)).await.map(|v| one(v.len())),
        (Coll::AllGather, true) => c.all_gather_absent(len).await.map(one),
        (Coll::Broadcast, false) => c
            .broadcast(roomy(me, len), n - 1)
            .await
            .map(|v| one(v.len())),
        (Coll::Broadcast, true) => c.broadcast_absent(len, n - 1).await.map(|()| one(len)),
        (Coll::AllToAll, false) => {
            let send = parts(me, n, len).iter().map(|&l| roomy(me, l)).collect();
            c.all_to_all_v(send).await.map(lens)
        }
        (Coll::AllToAll, true) => c.all_to_all_v_absent(&parts(me, n, len)).await,
        (Coll::SendRecv, false) => {
            let p = c.p2p();
            let (right, left) = ((me + 1) % n, (me + n - 1) % n);
            let (sent, got) = tokio::join!(p.send(right, 5, roomy(me, len)), p.recv(left, 5));
            sent.and(got).map(|v| one(v.len()))
        }
        (Coll::SendRecv, true) => {
            let p = c.p2p();
            let (right, left) = ((me + 1) % n, (me + n - 1) % n);
            let (sent, got) = tokio::join!(p.send_absent(right, 5, len), p.recv_absent(left, 5));
            sent.and(got).map(one)
        }
    }
}

/// `n` ranks, two per host: an inter-host byte costs 1 µs and an intra-host one 0.25 µs, so a
/// message a few bytes off shows in the virtual time.
fn slow_links(n: usize) -> LinkModel {
    LinkModel {
        host_of: (0..n).map(|r| r / 2).collect(),
        intra_host_bytes_per_s: 4e6,
        inter_host_bytes_per_s: 1e6,
        latency: Duration::from_micros(3),
    }
}

/// A world communicator per rank of a fresh simulated network.
pub(crate) fn sim_world(model: LinkModel, cfg: &CommConfig) -> Vec<Communicator> {
    SimNetwork::new(model)
        .endpoints()
        .into_iter()
        .map(|e| Communicator::world(Arc::new(e) as Arc<dyn Fabric>, 21, cfg.clone()))
        .collect()
}

/// Every rank's virtual finishing time (tokio's dilated clock) and result lengths.
async fn timed(
    model: LinkModel,
    cfg: &CommConfig,
    coll: Coll,
    len: usize,
    shape_only: bool,
) -> Vec<(Duration, Vec<usize>)> {
    let comms = sim_world(model, cfg);
    let t0 = Instant::now();
    on_all(comms, move |mut c| async move {
        let r = run(&mut c, coll, len, shape_only).await;
        let r = r.unwrap_or_else(|e| panic!("{coll:?} len {len} shape-only {shape_only}: {e}"));
        (t0.elapsed(), r)
    })
    .await
}

/// In process, with thresholds so low that `Auto` picks the tree, the ring and the star by
/// length (below 16 elements, below 1024, from 1024 on) and reduce-scatters run the star.
fn star_cfg() -> CommConfig {
    let mut c = cfg().in_process();
    c.tree_threshold_bytes = 64;
    c.star_threshold_bytes = 4096;
    c
}

#[tokio::test(start_paused = true)]
async fn shape_only_takes_exactly_the_time_of_f32() {
    let plain = cfg();
    let star = star_cfg();
    for n in [2, 3, 4, 8] {
        for coll in COLLS {
            let mut cfgs = vec![&plain];
            if matches!(coll, Coll::AllReduce(Algo::Auto) | Coll::ReduceScatter) {
                cfgs.push(&star);
            }
            for cfg in cfgs {
                for len in [0, 1, 7, 1001, 20_001] {
                    let f = timed(slow_links(n), cfg, coll, len, false).await;
                    let a = timed(slow_links(n), cfg, coll, len, true).await;
                    let what = format!("{n} ranks, {coll:?}, len {len}, {cfg:?}");
                    assert_eq!(f, a, "{what}");
                    assert!(a.iter().all(|(t, _)| *t > Duration::ZERO), "{what}");
                }
            }
        }
    }
}

thread_local! {
    /// The largest allocation this thread made since the last [`largest_allocation`].
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The largest allocation made on this thread since the last call.
fn largest_allocation() -> usize {
    LARGEST.with(|l| l.replace(0))
}

/// The system allocator, noting each thread's largest allocation.
struct Noting;

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Noting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Noting = Noting;

#[tokio::test(start_paused = true)]
async fn a_billion_elements_cost_only_their_messages() {
    const LEN: usize = 1_000_000_000;
    const BW: f64 = 50e9;
    let lat = Duration::from_micros(5);
    let model = |n: usize| LinkModel {
        host_of: (0..n).collect(),
        intra_host_bytes_per_s: BW,
        inter_host_bytes_per_s: BW,
        latency: lat,
    };
    let wall = std::time::Instant::now();
    largest_allocation();
    for n in [2, 3, 4, 8] {
        for coll in COLLS {
            let got = timed(model(n), &cfg(), coll, LEN, true).await;
            let slowest = got.iter().map(|g| g.0).max().unwrap_or_default();
            let slowest = flotilla_runtime::clock::undilate(slowest);
            // Every operation moves at least a third of a buffer into some rank.
            let third = Duration::from_secs_f64(4.0 * LEN as f64 / 3.0 / BW);
            assert!(slowest >= third, "{n} ranks {coll:?}: {slowest:?}");
            if coll == Coll::AllReduce(Algo::Ring) {
                // 2(n−1) steps of the largest chunk (its f32 bytes and the trailer) and a latency.
                let chunk = (4 * LEN.div_ceil(n) + 12) as f64;
                let step = Duration::from_secs_f64(chunk / BW) + lat;
                let want = step * (2 * (n as u32 - 1));
                let off = slowest.abs_diff(want);
                assert!(
                    off < Duration::from_micros(20),
                    "{n}: {slowest:?} vs {want:?}"
                );
            }
            assert_eq!(got[0].1, run_lengths(coll, n, LEN), "{coll:?}");
        }
    }
    let largest = largest_allocation();
    assert!(largest < 1 << 20, "an allocation of {largest} bytes");
    assert!(
        wall.elapsed() < Duration::from_secs(5),
        "{:?}",
        wall.elapsed()
    );
}

/// The result lengths rank 0 gets from `coll` on `n` ranks with buffers of `len`.
fn run_lengths(coll: Coll, n: usize, len: usize) -> Vec<usize> {
    match coll {
        Coll::AllReduce(_) | Coll::ReduceScatter | Coll::Broadcast | Coll::SendRecv => vec![len],
        Coll::AllGather => vec![n * len],
        Coll::AllToAll => (0..n).map(|j| parts(j, n, len)[0]).collect(),
    }
}

#[tokio::test(start_paused = true)]
async fn the_noting_allocator_sees_big_allocations() {
    largest_allocation();
    let v = roomy(0, 1 << 20);
    assert!(largest_allocation() >= 4 << 20);
    drop(v);
    let comms = sim_world(slow_links(2), &cfg());
    on_all(comms, |mut c| async move {
        c.all_reduce(roomy(c.rank(), 300_000), ReduceOp::Sum, Algo::Ring)
            .await
    })
    .await;
    assert!(largest_allocation() >= 600_000, "f32 chunks are allocated");
}

/// What each rank of a group got when rank `odd` ran `coll` shape-only and the others f32.
async fn mixed(n: usize, odd: usize, coll: Coll) -> Vec<(usize, Result<Vec<usize>, CommError>)> {
    let comms = sim_world(slow_links(n), &cfg());
    on_all(comms, move |mut c| async move {
        let me = c.rank();
        (me, run(&mut c, coll, 10, me == odd).await)
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn shape_only_and_f32_messages_are_bad_messages_naming_the_sender() {
    for n in [2, 4] {
        for odd in [0, 1, n - 1] {
            for coll in COLLS {
                let got = mixed(n, odd, coll).await;
                let what = format!("{n} ranks, rank {odd} shape-only, {coll:?}: {got:?}");
                let mut named = 0;
                for (r, res) in &got {
                    match res {
                        Err(e @ CommError::BadMessage { peer, .. }) => {
                            // Exactly one of the two runs shape-only, and the receiver says
                            // which it got.
                            assert!((*r == odd) != (*peer == odd), "{what}");
                            let why = if *r == odd {
                                "a f32 payload where shape-only was expected"
                            } else {
                                "a shape-only payload where f32 was expected"
                            };
                            assert!(e.to_string().contains(why), "{what}");
                            named += 1;
                        }
                        Err(CommError::Aborted { .. }) => {}
                        // Point-to-point has no abort, and a broadcast's root needs nothing.
                        Ok(_) => {
                            assert!(matches!(coll, Coll::SendRecv | Coll::Broadcast), "{what}")
                        }
                        Err(e) => panic!("{what}: {e}"),
                    }
                }
                assert!(named > 0, "{what}");
            }
        }
    }
}

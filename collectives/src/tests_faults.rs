//! Failure tests: dead and stalled ranks, mismatched sizes and operations, and what they leave.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::tests::{DEADLINE, cfg, data, on_all, part, world};
use crate::{Algo, CommError, Communicator, ReduceOp};

/// The operations the failure tests run.
#[derive(Debug, Clone, Copy)]
enum Kind {
    RingAllReduce,
    TreeAllReduce,
    StarAllReduce,
    ReduceScatter,
    AllGather,
    Broadcast(usize),
    AllToAll,
    Barrier,
}

const KINDS: [Kind; 7] = [
    Kind::RingAllReduce,
    Kind::TreeAllReduce,
    Kind::StarAllReduce,
    Kind::ReduceScatter,
    Kind::AllGather,
    Kind::AllToAll,
    Kind::Barrier,
];

async fn run(c: &mut Communicator, kind: Kind, len: usize) -> Result<(), CommError> {
    let (n, me) = (c.size(), c.rank());
    match kind {
        Kind::RingAllReduce => {
            c.all_reduce(data(me, len), ReduceOp::Sum, Algo::Ring)
                .await?
        }
        Kind::TreeAllReduce => {
            c.all_reduce(data(me, len), ReduceOp::Sum, Algo::Tree)
                .await?
        }
        Kind::StarAllReduce => {
            c.all_reduce(data(me, len), ReduceOp::Sum, Algo::Star)
                .await?
        }
        Kind::ReduceScatter => c.reduce_scatter(data(me, len * n), ReduceOp::Avg).await?,
        Kind::AllGather => c.all_gather(data(me, len)).await?,
        Kind::Broadcast(root) => c.broadcast(data(me, len), root).await?,
        Kind::AllToAll => {
            let send = (0..n).map(|j| part(me, j)).collect();
            c.all_to_all_v(send).await?.concat()
        }
        Kind::Barrier => {
            c.barrier().await?;
            Vec::new()
        }
    };
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_rank_is_named_by_every_other_rank() {
    let (n, dead) = (5, 2);
    for kind in KINDS.into_iter().chain([Kind::Broadcast(dead)]) {
        let (hub, comms) = world(n, 7);
        let live: Vec<_> = comms.into_iter().filter(|c| c.rank() != dead).collect();
        let killer = Arc::clone(&hub);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            killer.fail_rank(dead, "killed by test");
        });
        let start = std::time::Instant::now();
        let errs = on_all(live, move |mut c| async move {
            let first = run(&mut c, kind, 10).await;
            let second = run(&mut c, kind, 10).await;
            (c.rank(), first, second)
        })
        .await;
        for (r, first, second) in errs {
            let e = first.expect_err("the op must fail");
            assert_eq!(e.culprit(), Some(dead), "{kind:?} rank {r}: {e}");
            let e = second.expect_err("the communicator is poisoned");
            assert!(matches!(e, CommError::Poisoned(_)), "{e}");
            assert_eq!(e.culprit(), Some(dead));
        }
        assert!(
            start.elapsed() < DEADLINE / 2,
            "{kind:?} took {:?}",
            start.elapsed()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_rank_is_named_after_the_deadline() {
    let (n, stalled) = (6, 3);
    let grace = cfg().grace;
    for kind in KINDS.into_iter().chain([Kind::Broadcast(stalled)]) {
        let (_hub, comms) = world(n, 8);
        let live: Vec<_> = comms.into_iter().filter(|c| c.rank() != stalled).collect();
        let start = Instant::now();
        let errs = on_all(live, move |mut c| async move {
            let r = run(&mut c, kind, 10).await;
            (c.rank(), r, start.elapsed())
        })
        .await;
        for (r, res, took) in errs {
            let e = res.expect_err("the op must fail");
            assert_eq!(e.culprit(), Some(stalled), "{kind:?} rank {r}: {e}");
            assert!(
                took >= DEADLINE && took <= DEADLINE + 2 * grace,
                "{kind:?} rank {r} took {took:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_lengths_are_reported_by_every_rank() {
    for kind in [
        Kind::RingAllReduce,
        Kind::TreeAllReduce,
        Kind::StarAllReduce,
        Kind::AllGather,
    ] {
        let (_hub, comms) = world(4, 9);
        let start = std::time::Instant::now();
        let errs = on_all(comms, move |mut c| async move {
            let len = if c.rank() == 1 { 9 } else { 8 };
            (c.rank(), run(&mut c, kind, len).await)
        })
        .await;
        let mut direct = 0;
        for (r, res) in errs {
            let e = res.expect_err("sizes differ");
            assert!(e.to_string().contains("has 9"), "{kind:?} rank {r}: {e}");
            if let CommError::SizeMismatch { me, peer, .. } = e {
                assert!(me == 1 || peer == 1, "{e}");
                direct += 1;
            }
        }
        assert!(direct > 0, "{kind:?}: someone must see the mismatch itself");
        assert!(start.elapsed() < DEADLINE / 2);
    }
}

#[tokio::test]
async fn mismatched_operations_and_arguments_are_reported() {
    let (_hub, comms) = world(3, 11);
    let errs = on_all(comms, |mut c| async move {
        let op = if c.rank() == 0 {
            ReduceOp::Max
        } else {
            ReduceOp::Sum
        };
        c.all_reduce(data(c.rank(), 6), op, Algo::Ring).await
    })
    .await;
    for e in errs {
        let e = e.expect_err("operations differ");
        assert!(e.to_string().contains("(max)"), "{e}");
    }

    let (_hub, comms) = world(3, 12);
    let errs = on_all(comms, |mut c| async move {
        let parts = if c.rank() == 0 { 2 } else { 3 };
        (c.rank(), c.all_to_all_v(vec![Vec::new(); parts]).await)
    })
    .await;
    for (r, e) in errs {
        let e = e.expect_err("wrong part count on rank 0");
        if r == 0 {
            assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
        } else {
            assert!(matches!(e, CommError::Aborted { by: 0, .. }), "{e}");
            assert!(e.to_string().contains("2 send parts"), "{e}");
        }
    }
}

/// A rank's endpoint that stops delivering after `after` sends: the rank stalls mid-operation
/// (its task goes on, but nothing it sends arrives).
#[derive(Debug)]
pub(crate) struct GoesSilent {
    pub(crate) inner: flotilla_runtime::fabric::inproc::InprocFabric,
    pub(crate) after: usize,
    pub(crate) sent: std::sync::atomic::AtomicUsize,
}

impl flotilla_runtime::fabric::Fabric for GoesSilent {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn send(
        &self,
        dst: usize,
        tag: flotilla_runtime::fabric::Tag,
        payload: flotilla_runtime::fabric::Payload,
    ) -> flotilla_runtime::fabric::BoxFuture<'_, Result<(), flotilla_runtime::fabric::FabricError>>
    {
        let n = self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n < self.after {
            self.inner.send(dst, tag, payload)
        } else {
            Box::pin(std::future::ready(Ok(())))
        }
    }
    fn recv(
        &self,
        src: usize,
        tag: flotilla_runtime::fabric::Tag,
        deadline: Duration,
    ) -> flotilla_runtime::fabric::BoxFuture<
        '_,
        Result<flotilla_runtime::fabric::Payload, flotilla_runtime::fabric::FabricError>,
    > {
        self.inner.recv(src, tag, deadline)
    }
    fn subscribe(
        &self,
        channel: u32,
    ) -> Result<flotilla_runtime::fabric::Inbox, flotilla_runtime::fabric::FabricError> {
        self.inner.subscribe(channel)
    }
}

#[tokio::test(start_paused = true)]
async fn a_rank_that_stalls_mid_operation_is_named() {
    use flotilla_runtime::fabric::Fabric;
    use flotilla_runtime::fabric::inproc::InprocHub;

    let (n, silent) = (5, 1);
    for kind in KINDS {
        for after in [1, 2, 3] {
            let hub = InprocHub::new(n);
            let quiet = Arc::new(GoesSilent {
                inner: hub.endpoint(silent),
                after,
                sent: 0.into(),
            });
            let comms: Vec<_> = hub
                .endpoints()
                .into_iter()
                .map(|e| {
                    let f: Arc<dyn Fabric> = if e.rank() == silent {
                        Arc::clone(&quiet) as Arc<dyn Fabric>
                    } else {
                        Arc::new(e)
                    };
                    Communicator::world(f, 16, cfg())
                })
                .collect();
            let start = Instant::now();
            let errs = on_all(comms, move |mut c| async move {
                (c.rank(), run(&mut c, kind, 10).await, start.elapsed())
            })
            .await;
            // A rank whose part of the operation no longer needed the silent rank may finish
            // (its result is whole); every other rank fails naming the silent one, in time.
            let mut failed = 0;
            for (r, res, took) in errs.into_iter().filter(|e| e.0 != silent) {
                if let Err(e) = res {
                    failed += 1;
                    assert_eq!(e.culprit(), Some(silent), "{kind:?}/{after} rank {r}: {e}");
                    assert!(
                        took <= DEADLINE + 2 * cfg().grace,
                        "{kind:?} rank {r}: {took:?}"
                    );
                }
            }
            let dropped = quiet.sent.load(std::sync::atomic::Ordering::SeqCst) > after;
            assert!(!dropped || failed > 0, "{kind:?}/{after}: nobody noticed");
        }
    }
}

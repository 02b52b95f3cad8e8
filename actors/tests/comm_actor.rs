//! The comm actor over the in-process fabric (4 ranks, exact results, a failed rank named) and,
//! with feature `cuda` on a machine with GPUs, over NCCL.

use std::sync::Arc;
use std::time::Duration;

use flotilla_actors::comm::{Buf, CommActor, CommActorError, CommArgs, CommBackend, CommMsg};
use flotilla_collectives::{Algo, CommConfig, Communicator, ReduceOp, to_bf16};
use flotilla_runtime::fabric::inproc::InprocHub;
use ractor::{Actor, ActorRef, call};

fn data(r: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|k| ((r * 31 + k * 7) % 17) as f32 - 8.0)
        .collect()
}

async fn fabric_actors(n: usize) -> (Arc<InprocHub>, Vec<ActorRef<CommMsg>>) {
    let hub = InprocHub::new(n);
    let mut actors = Vec::new();
    for r in 0..n {
        let cfg = CommConfig::with_deadline(Duration::from_secs(5));
        let comm = Communicator::world(Arc::new(hub.endpoint(r)), 1, cfg);
        let args = CommArgs {
            rank: r,
            backend: CommBackend::Fabric(comm),
        };
        let (a, _) = Actor::spawn(None, CommActor, args).await.expect("spawn");
        actors.push(a);
    }
    (hub, actors)
}

/// What one rank gets from each request of the exactness test.
#[derive(Debug, PartialEq)]
struct Outcome {
    sum: Vec<f32>,
    max_bf16: Vec<u16>,
    scattered: Vec<f32>,
    gathered: Vec<u16>,
    broadcast: Vec<f32>,
    exchanged: Vec<Vec<f32>>,
}

async fn requests(a: ActorRef<CommMsg>, r: usize, n: usize) -> Outcome {
    let bf = |v: Vec<f32>| v.into_iter().map(to_bf16).collect::<Vec<_>>();
    let f32_of = |b: Buf| match b {
        Buf::F32(v) => v,
        other => panic!("expected f32, got {}", other.describe()),
    };
    let bf16_of = |b: Buf| match b {
        Buf::Bf16(v) => v,
        other => panic!("expected bf16, got {}", other.describe()),
    };
    let ok = "the actor answers";
    let sum = call!(a, |reply| CommMsg::AllReduce {
        buf: Buf::F32(data(r, 12)),
        op: ReduceOp::Sum,
        algo: Algo::Ring,
        reply
    })
    .expect(ok)
    .expect("all_reduce");
    let max = call!(a, |reply| CommMsg::AllReduce {
        buf: Buf::Bf16(bf(data(r, 12))),
        op: ReduceOp::Max,
        algo: Algo::Star,
        reply
    })
    .expect(ok)
    .expect("all_reduce bf16");
    let scattered = call!(a, |reply| CommMsg::ReduceScatter {
        buf: Buf::F32(data(r, 12)),
        op: ReduceOp::Sum,
        reply
    })
    .expect(ok)
    .expect("reduce_scatter");
    let gathered = call!(a, |reply| CommMsg::AllGather {
        chunk: Buf::Bf16(bf(data(r, 2))),
        reply
    })
    .expect(ok)
    .expect("all_gather");
    let root = n - 1;
    let broadcast = call!(a, |reply| CommMsg::Broadcast {
        buf: Buf::F32(if r == root {
            data(root, 5)
        } else {
            vec![0.0; 5]
        }),
        root,
        reply
    })
    .expect(ok)
    .expect("broadcast");
    let parts = (0..n)
        .map(|j| Buf::F32(vec![(r * 10 + j) as f32; j]))
        .collect();
    let exchanged = call!(a, |reply| CommMsg::AllToAllV { parts, reply })
        .expect(ok)
        .expect("all_to_all_v");
    call!(a, |reply| CommMsg::Barrier { reply })
        .expect(ok)
        .expect("barrier");
    Outcome {
        sum: f32_of(sum),
        max_bf16: bf16_of(max),
        scattered: f32_of(scattered),
        gathered: bf16_of(gathered),
        broadcast: f32_of(broadcast),
        exchanged: exchanged.into_iter().map(f32_of).collect(),
    }
}

fn expected(r: usize, n: usize) -> Outcome {
    let inputs: Vec<_> = (0..n).map(|i| data(i, 12)).collect();
    let sum: Vec<f32> = (0..12).map(|k| inputs.iter().map(|x| x[k]).sum()).collect();
    let max: Vec<f32> = (0..12)
        .map(|k| inputs.iter().map(|x| x[k]).fold(f32::MIN, f32::max))
        .collect();
    let c = 12 / n;
    Outcome {
        scattered: sum[r * c..(r + 1) * c].to_vec(),
        sum,
        max_bf16: max.into_iter().map(to_bf16).collect(),
        gathered: (0..n).flat_map(|i| data(i, 2)).map(to_bf16).collect(),
        broadcast: data(n - 1, 5),
        exchanged: (0..n).map(|i| vec![(i * 10 + r) as f32; r]).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_fabric_ranks_serve_every_collective_exactly() {
    let n = 4;
    let (hub, actors) = fabric_actors(n).await;
    let tasks: Vec<_> = actors
        .iter()
        .cloned()
        .enumerate()
        .map(|(r, a)| tokio::spawn(requests(a, r, n)))
        .collect();
    for (r, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.expect("rank task"), expected(r, n), "rank {r}");
    }
    assert_eq!(hub.mailboxes(), 0);
    for a in actors {
        a.stop(None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rank_is_reported_by_name() {
    let (hub, actors) = fabric_actors(4).await;
    hub.fail_rank(2, "killed by test");
    let tasks: Vec<_> = [0, 1, 3]
        .into_iter()
        .map(|r| {
            let a = actors[r].clone();
            tokio::spawn(async move {
                let got = call!(a, |reply| CommMsg::AllReduce {
                    buf: Buf::F32(data(r, 64)),
                    op: ReduceOp::Sum,
                    algo: Algo::Ring,
                    reply
                });
                (r, got.expect("the actor answers"))
            })
        })
        .collect();
    for t in tasks {
        let (r, got) = t.await.expect("rank task");
        let e = got.expect_err("rank 2 is dead");
        assert_eq!(e.culprit(), Some(2), "rank {r}: {e}");
        assert!(e.to_string().contains("rank 2"), "rank {r}: {e}");
    }
    for a in actors {
        a.stop(None);
    }
}

#[tokio::test]
async fn mixed_all_to_all_parts_are_refused() {
    let (_hub, actors) = fabric_actors(2).await;
    let parts = vec![Buf::F32(vec![1.0]), Buf::Bf16(vec![1])];
    let got =
        call!(actors[0], |reply| CommMsg::AllToAllV { parts, reply }).expect("the actor answers");
    assert!(
        matches!(got, Err(CommActorError::Unsupported { rank: 0, .. })),
        "{got:?}"
    );
    for a in actors {
        a.stop(None);
    }
}

/// NCCL on up to 4 local GPUs; skips (passes, saying so) where there is no GPU or no NCCL.
#[cfg(feature = "cuda")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nccl_ranks_serve_collectives_on_gpus() {
    use flotilla_collectives::nccl::{CudaContext, NcclId};
    let gpus = std::panic::catch_unwind(CudaContext::device_count)
        .ok()
        .and_then(Result::ok)
        .map_or(0, |g| g.max(0) as usize);
    let Some(id) = (gpus > 0)
        .then(|| {
            std::panic::catch_unwind(NcclId::new)
                .ok()
                .and_then(Result::ok)
        })
        .flatten()
    else {
        eprintln!("skipping nccl_ranks_serve_collectives_on_gpus: no GPU or no NCCL");
        return;
    };
    let n = gpus.min(4);
    let spawns: Vec<_> = (0..n)
        .map(|r| {
            tokio::spawn(async move {
                let ctx = CudaContext::new(r).expect("open GPU");
                let stream = ctx.new_stream().expect("stream");
                let backend = CommBackend::Nccl {
                    stream,
                    rank: r,
                    world: n,
                    id,
                };
                let args = CommArgs { rank: r, backend };
                Actor::spawn(None, CommActor, args).await.expect("spawn").0
            })
        })
        .collect();
    let mut actors = Vec::new();
    for s in spawns {
        actors.push(s.await.expect("spawn task"));
    }
    let tasks: Vec<_> = actors
        .iter()
        .cloned()
        .enumerate()
        .map(|(r, a)| tokio::spawn(requests(a, r, n)))
        .collect();
    // 12 elements split evenly over the 1 to 4 ranks.
    for (r, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.expect("rank task"), expected(r, n), "rank {r}");
    }
    for a in actors {
        a.stop(None);
    }
}

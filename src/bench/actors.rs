//! `flotilla bench actors`: actor messaging (throughput, round-trip latency) and the in-process
//! fabric's bandwidth for large tensors, beside a plain memcpy of the same size in the same run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flotilla_runtime::fabric::inproc::InprocHub;
use flotilla_runtime::fabric::{Fabric, Payload, Tag};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::json;

use super::Report;

/// Sizes and repetitions; the defaults run in a few seconds on 2 cores.
#[derive(Debug, Clone)]
pub struct ActorBenchArgs {
    pub messages: usize,
    pub round_trips: usize,
    pub tensor_mib: usize,
    pub tensor_reps: usize,
}

impl Default for ActorBenchArgs {
    fn default() -> Self {
        Self {
            messages: 1_000_000,
            round_trips: 20_000,
            tensor_mib: 64,
            tensor_reps: 20,
        }
    }
}

enum CounterMsg {
    Add(u64),
    Get(RpcReplyPort<u64>),
}

struct Counter;

impl Actor for Counter {
    type Msg = CounterMsg;
    type State = u64;
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<u64, ActorProcessingErr> {
        Ok(0)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        total: &mut u64,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CounterMsg::Add(n) => *total += n,
            CounterMsg::Get(reply) => {
                // The caller may have given up; nothing to do then.
                let _ = reply.send(*total);
            }
        }
        Ok(())
    }
}

/// Run the benchmark, returning its JSON records (the last is the summary).
pub async fn run(args: &ActorBenchArgs) -> Result<Report> {
    let mut report = Report::default();
    let (actor, handle) = Actor::spawn(None, Counter, ())
        .await
        .context("spawning the counter actor")?;

    // Throughput: a stream of small casts, then one call to know they were all handled.
    let t = Instant::now();
    for _ in 0..args.messages {
        actor
            .cast(CounterMsg::Add(1))
            .map_err(|e| anyhow::anyhow!("cast failed: {e}"))?;
    }
    let seen = ractor::call!(actor, CounterMsg::Get).map_err(|e| anyhow::anyhow!("{e}"))?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(seen == args.messages as u64, "counter saw {seen} messages");
    let msgs_per_s = args.messages as f64 / secs;
    report.push(json!({"bench": "actor_cast", "messages": args.messages, "seconds": secs, "msgs_per_s": msgs_per_s}));

    // Latency: request/reply round trips, one at a time.
    let mut lat = Vec::with_capacity(args.round_trips);
    for _ in 0..args.round_trips {
        let t = Instant::now();
        ractor::call!(actor, CounterMsg::Get).map_err(|e| anyhow::anyhow!("{e}"))?;
        lat.push(t.elapsed());
    }
    lat.sort_unstable();
    let p50 = percentile_us(&lat, 0.50);
    let p99 = percentile_us(&lat, 0.99);
    report.push(json!({"bench": "actor_call_round_trip", "calls": args.round_trips, "p50_us": p50, "p99_us": p99}));
    actor.stop(None);
    handle.await.context("joining the counter actor")?;

    // Fabric: a 64 MiB f32 tensor bounced between two ranks; every hop is one delivery.
    let bytes = args.tensor_mib << 20;
    let hub = InprocHub::new(2);
    let eps = hub.endpoints();
    let (a, b) = (eps[0].clone(), eps[1].clone());
    let deadline = Duration::from_secs(30);
    let reps = args.tensor_reps;
    let echo = tokio::spawn(async move {
        for i in 0..reps as u64 {
            let p = b.recv(0, Tag::new(0, i), deadline).await?;
            b.send(0, Tag::new(1, i), p).await?;
        }
        Ok::<_, flotilla_runtime::fabric::FabricError>(())
    });
    let mut tensor = Payload::F32(vec![1.0f32; bytes / 4]);
    let t = Instant::now();
    for i in 0..reps as u64 {
        a.send(1, Tag::new(0, i), tensor).await?;
        tensor = a.recv(1, Tag::new(1, i), deadline).await?;
    }
    let fabric_secs = t.elapsed().as_secs_f64();
    echo.await.context("joining the echo rank")??;
    anyhow::ensure!(tensor.byte_len() == bytes, "tensor changed size in flight");
    let fabric_gbps = (2 * reps * bytes) as f64 / fabric_secs / 1e9;
    report.push(json!({"bench": "inproc_fabric", "bytes": bytes, "hops": 2 * reps, "seconds": fabric_secs, "gb_per_s": fabric_gbps}));

    // Baseline: memcpy of the same size between two buffers already in memory.
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault the pages in before timing
    let t = Instant::now();
    for _ in 0..reps {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    let memcpy_gbps = (reps * bytes) as f64 / t.elapsed().as_secs_f64() / 1e9;
    report.push(json!({"bench": "memcpy", "bytes": bytes, "reps": reps, "gb_per_s": memcpy_gbps}));

    report.push(json!({"summary": {
        "fabric_over_memcpy": fabric_gbps / memcpy_gbps,
        "msgs_per_s": msgs_per_s,
        "p99_us": p99,
    }}));
    Ok(report)
}

fn percentile_us(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

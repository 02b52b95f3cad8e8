//! Timing harness for the collectives over the in-process fabric (what `flotilla bench
//! collectives` reports), with the nccl-tests definitions of algorithm and bus bandwidth.
//!
//! `size` is the bytes of one rank's whole buffer (the all-reduce buffer, the reduce-scatter
//! input, the all-gather output, the all-to-all send buffer); `algbw = size / time`;
//! `busbw = algbw · 2(n−1)/n` for all-reduce and `algbw · (n−1)/n` for reduce-scatter,
//! all-gather and all-to-all ([`Coll::bus_factor`]). The time of one repetition is the slowest
//! rank's, from a common barrier to its completion; [`time_inproc`] gives the mean over the
//! repetitions, after one untimed warm-up. As in nccl-tests, buffers live across repetitions:
//! the all-reduce and all-to-all buffers are carried on, the all-gather output is reused
//! ([`Communicator::all_gather_into`]), and inputs that an operation consumes are prepared
//! outside the timed region.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flotilla_runtime::fabric::Fabric;
use flotilla_runtime::fabric::inproc::InprocHub;

use crate::{Algo, CommConfig, CommError, Communicator, HfReduce, HostReducer, ReduceOp};

/// The collective of one measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coll {
    /// [`Communicator::all_reduce`] with the given algorithm.
    AllReduce(Algo),
    /// [`HfReduce::all_reduce`], ranks grouped into hosts.
    HfReduce,
    ReduceScatter,
    AllGather,
    /// [`Communicator::all_to_all_v`] with equal parts.
    AllToAll,
}

impl Coll {
    /// Every collective the benchmark measures.
    pub const ALL: [Coll; 7] = [
        Coll::AllReduce(Algo::Ring),
        Coll::AllReduce(Algo::Tree),
        Coll::AllReduce(Algo::Star),
        Coll::HfReduce,
        Coll::ReduceScatter,
        Coll::AllGather,
        Coll::AllToAll,
    ];

    /// The operation's name.
    pub fn op(self) -> &'static str {
        match self {
            Coll::AllReduce(_) | Coll::HfReduce => "all_reduce",
            Coll::ReduceScatter => "reduce_scatter",
            Coll::AllGather => "all_gather",
            Coll::AllToAll => "all_to_all",
        }
    }

    /// The algorithm's name.
    pub fn algo(self) -> &'static str {
        match self {
            Coll::AllReduce(Algo::Tree) => "tree",
            Coll::AllReduce(Algo::Star) => "star",
            Coll::AllReduce(Algo::Auto) => "auto",
            Coll::HfReduce => "hfreduce",
            Coll::AllReduce(Algo::Ring)
            | Coll::ReduceScatter
            | Coll::AllGather
            | Coll::AllToAll => "ring",
        }
    }

    /// busbw / algbw for `n` ranks.
    pub fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Coll::AllReduce(_) | Coll::HfReduce => 2.0 * (n - 1.0) / n,
            Coll::ReduceScatter | Coll::AllGather | Coll::AllToAll => (n - 1.0) / n,
        }
    }
}

/// The all-reduce that [`Communicator::pick`] runs (`Algo::Auto`) for `bytes` per rank on an
/// in-process group of `n` ranks configured as [`time_inproc`] configures them: the entry of
/// [`Coll::ALL`] whose measurement is what an in-process job gets.
pub fn picked_inproc(n: usize, bytes: usize) -> Coll {
    let hub = InprocHub::new(n.max(1));
    let cfg = CommConfig::with_deadline(Duration::from_secs(1)).in_process();
    let comm = Communicator::world(Arc::new(hub.endpoint(0)), 0, cfg);
    Coll::AllReduce(comm.pick(Algo::Auto, bytes / 4))
}

/// Bandwidth of a plain single-threaded copy of `bytes` between two buffers already in memory,
/// GB/s (1e9): the best of three passes of `reps` copies (on a shared machine the best pass is
/// the least disturbed one, which makes ratios against it conservative).
pub fn memcpy_gb_s(bytes: usize, reps: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault the pages in before timing
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps.max(1) {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
        }
        best = best.max((reps.max(1) * bytes) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// One rank's handles: the world communicator (barriers and the flat collectives) and, for
/// HFReduce, its hierarchical handle.
struct RankSet {
    comm: Communicator,
    hf: Option<HfReduce>,
}

fn rank_sets(
    fabrics: Vec<Arc<dyn Fabric>>,
    coll: Coll,
    hosts: usize,
    in_process: bool,
) -> Result<Vec<RankSet>, CommError> {
    let n = fabrics.len();
    if n == 0 || hosts == 0 || !n.is_multiple_of(hosts) {
        return Err(CommError::InvalidArgument {
            op: "bench",
            why: format!("{hosts} hosts do not divide {n} ranks"),
        });
    }
    let mut cfg = CommConfig::with_deadline(Duration::from_secs(120));
    cfg.in_process = in_process;
    let per = n / hosts;
    let channel = NEXT_CHANNEL.fetch_add(2, Ordering::Relaxed);
    let leaders: Vec<usize> = (0..hosts).map(|h| h * per).collect();
    let reducers: Vec<Arc<HostReducer>> = (0..hosts)
        .map(|h| {
            let r = HostReducer::new(per)
                .with_ranks((h * per..(h + 1) * per).collect())
                .with_config(cfg.clone());
            Arc::new(r)
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for (r, ep) in fabrics.into_iter().enumerate() {
        let comm = Communicator::world(Arc::clone(&ep), channel, cfg.clone());
        let hf = if coll == Coll::HfReduce {
            let (h, local) = (r / per, r % per);
            let lead = (local == 0 && hosts > 1)
                .then(|| Communicator::new(ep, leaders.clone(), channel + 1, cfg.clone()))
                .transpose()?;
            Some(HfReduce::new(
                lead,
                Arc::clone(&reducers[h]),
                local,
                per,
                4 << 20,
            )?)
        } else {
            None
        };
        out.push(RankSet { comm, hf });
    }
    Ok(out)
}

/// Mean seconds per operation of `coll` over `n` in-process ranks (in `hosts` groups, for
/// HFReduce) on `bytes` per rank (rounded up to a multiple of `4n`): the slowest rank of each
/// of `reps` repetitions, after one untimed warm-up. The communicators are configured
/// [`CommConfig::in_process`], so the reduce-scatter (and `Auto`) run as they would in an
/// in-process job. Runs on the current tokio runtime (use a multi-threaded one).
pub async fn time_inproc(
    coll: Coll,
    n: usize,
    hosts: usize,
    bytes: usize,
    reps: usize,
) -> Result<f64, CommError> {
    let hub = InprocHub::new(n);
    let fabrics = (0..n)
        .map(|r| Arc::new(hub.endpoint(r)) as Arc<dyn Fabric>)
        .collect();
    time_with(fabrics, coll, hosts, bytes, reps, true).await
}

/// Fabric channels of the next measurement (two per measurement, so that measurements sharing
/// a fabric never share tags).
static NEXT_CHANNEL: AtomicU32 = AtomicU32::new(1 << 20);

/// [`time_inproc`] over any fabric: `fabrics[r]` is rank r's endpoint (all in this process;
/// the communicators are not configured in-process, as for a network fabric). Each call uses
/// two fresh fabric channels from 2^20 up.
pub async fn time_over(
    fabrics: Vec<Arc<dyn Fabric>>,
    coll: Coll,
    hosts: usize,
    bytes: usize,
    reps: usize,
) -> Result<f64, CommError> {
    time_with(fabrics, coll, hosts, bytes, reps, false).await
}

async fn time_with(
    fabrics: Vec<Arc<dyn Fabric>>,
    coll: Coll,
    hosts: usize,
    bytes: usize,
    reps: usize,
    in_process: bool,
) -> Result<f64, CommError> {
    let n = fabrics.len();
    let reps = reps.max(1);
    let elems = (bytes / 4).div_ceil(n.max(1)) * n;
    let tasks: Vec<_> = rank_sets(fabrics, coll, hosts, in_process)?
        .into_iter()
        .map(|rs| tokio::spawn(rank_loop(rs, coll, n, elems, reps)))
        .collect();
    let mut per_rank = Vec::with_capacity(n);
    for (r, t) in tasks.into_iter().enumerate() {
        per_rank.push(t.await.map_err(|e| CommError::Aborted {
            op: "bench",
            by: r,
            culprit: Some(r),
            reason: format!("rank task failed: {e}"),
        })??);
    }
    let total: f64 = (0..reps)
        .map(|i| {
            per_rank
                .iter()
                .map(|ts: &Vec<Duration>| ts[i].as_secs_f64())
                .fold(0.0, f64::max)
        })
        .sum();
    Ok(total / reps as f64)
}

async fn rank_loop(
    mut rs: RankSet,
    coll: Coll,
    n: usize,
    elems: usize,
    reps: usize,
) -> Result<Vec<Duration>, CommError> {
    let part = elems / n;
    let mut times = Vec::with_capacity(reps);
    // Buffers carried from one repetition to the next (already faulted in). Sums grow by a
    // factor n per repetition and may reach infinity, which costs nothing extra.
    let mut buf = vec![1.0f32; elems];
    let mut parts: Vec<Vec<f32>> = (0..n).map(|_| vec![1.0f32; part]).collect();
    let mut gathered = Vec::new();
    for i in 0..=reps {
        // Inputs that the operation consumes are prepared outside the timed region.
        let input = match coll {
            Coll::ReduceScatter => buf.clone(),
            Coll::AllGather => buf[..part].to_vec(),
            _ => Vec::new(),
        };
        rs.comm.barrier().await?;
        let t = Instant::now();
        // Results that are not carried on are dropped after the clock stops.
        let out = match coll {
            Coll::AllReduce(algo) => {
                buf = rs
                    .comm
                    .all_reduce(std::mem::take(&mut buf), ReduceOp::Sum, algo)
                    .await?;
                Vec::new()
            }
            Coll::HfReduce => {
                if let Some(hf) = rs.hf.as_mut() {
                    buf = hf
                        .all_reduce(std::mem::take(&mut buf), ReduceOp::Sum)
                        .await?;
                }
                Vec::new()
            }
            Coll::ReduceScatter => rs.comm.reduce_scatter(input, ReduceOp::Sum).await?,
            Coll::AllGather => {
                // As nccl-tests does, the output buffer is allocated once and reused.
                gathered = rs
                    .comm
                    .all_gather_into(input, std::mem::take(&mut gathered))
                    .await?;
                Vec::new()
            }
            Coll::AllToAll => {
                parts = rs.comm.all_to_all_v(std::mem::take(&mut parts)).await?;
                Vec::new()
            }
        };
        let dt = t.elapsed();
        // No rank prepares its next input (or frees this output) while another is still in
        // the timed region: that work would hold one of the runtime's threads.
        rs.comm.barrier().await?;
        drop(out);
        if i > 0 {
            times.push(dt);
        }
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_collective_times_on_two_hosts() {
        for coll in Coll::ALL {
            let s = time_inproc(coll, 4, 2, 1 << 16, 2).await.expect("timed");
            assert!(s > 0.0 && s < 10.0, "{coll:?}: {s}");
        }
        assert!(time_inproc(Coll::HfReduce, 4, 3, 1024, 1).await.is_err());
        assert_eq!(Coll::AllReduce(Algo::Ring).bus_factor(4), 1.5);
        assert_eq!(Coll::AllGather.bus_factor(4), 0.75);
        assert_eq!(picked_inproc(4, 64 << 20), Coll::AllReduce(Algo::Star));
        assert_eq!(picked_inproc(4, 4 << 10), Coll::AllReduce(Algo::Tree));
        assert!(Coll::ALL.contains(&picked_inproc(4, 64 << 20)));
    }

    /// `cargo test --release -p flotilla-collectives -- --ignored --nocapture inproc_64mib`:
    /// every collective of 64 MiB over 4 in-process ranks against memcpy.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "a measurement; run in release mode"]
    async fn inproc_64mib_collectives_against_memcpy() {
        let bytes = 64 << 20;
        let memcpy = memcpy_gb_s(bytes, 10);
        let cfg = CommConfig::with_deadline(Duration::from_secs(1)).in_process();
        let hub = InprocHub::new(4);
        let comm = Communicator::world(Arc::new(hub.endpoint(0)), 0, cfg);
        println!(
            "Auto picks {:?} at 64 MiB",
            comm.pick(Algo::Auto, bytes / 4)
        );
        for coll in Coll::ALL {
            let s = time_inproc(coll, 4, 1, bytes, 5).await.expect("timed");
            let busbw = bytes as f64 / s / 1e9 * coll.bus_factor(4);
            println!(
                "{:14} {:9} {:.1} ms  busbw {busbw:.2} GB/s  memcpy {memcpy:.2} GB/s  ratio {:.3}",
                coll.op(),
                coll.algo(),
                s * 1e3,
                busbw / memcpy
            );
        }
    }

    /// `cargo test --release -p flotilla-collectives -- --ignored --nocapture inproc_crossover`:
    /// where the star overtakes the tree and the ring in process (sets the star threshold).
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "a measurement; run in release mode"]
    async fn inproc_crossover() {
        for bytes in [64 << 10, 256 << 10, 1 << 20, 4 << 20] {
            let mut line = format!("{:>8} KiB", bytes >> 10);
            for algo in [Algo::Tree, Algo::Ring, Algo::Star] {
                let s = time_inproc(Coll::AllReduce(algo), 4, 1, bytes, 20)
                    .await
                    .expect("timed");
                line += &format!("  {algo:?} {:.0} us", s * 1e6);
            }
            println!("{line}");
        }
    }
}

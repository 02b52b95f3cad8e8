//! `flotilla bench collectives`: the communicator's collectives (ring and tree all-reduce,
//! HFReduce, reduce-scatter, all-gather, all-to-all) over the in-process fabric or a loopback
//! QUIC mesh (`--fabric quic`), for message sizes from 4 KiB up, with time, algorithm bandwidth
//! and bus bandwidth as nccl-tests defines them, each beside a memcpy of the same size measured
//! in the same run (see [`flotilla_collectives::perf`] for the definitions and the timing). With
//! `--fabric quic` it also measures one-way transfers of the largest size (at most 64 MiB): the
//! QUIC fabric, a bare single-stream quinn transfer and a plain TCP loopback stream.
//!
//! The in-process all-to-all moves its buffers (no copy), so its bandwidth is not bounded by
//! memory bandwidth. HFReduce with `--hosts 1` never touches the fabric (the whole reduction is
//! in shared host memory); pass `--hosts` to exercise its inter-host stage.
//!
//! The last record is `{"summary": {"inproc_allreduce_64mib_busbw_over_memcpy",
//! "inproc_allreduce_64mib_algo" (the best in-process algorithm at 64 MiB),
//! "inproc_ring_allreduce_64mib_busbw_over_memcpy", "quic_over_bare_quinn", "quic_mib_per_s",
//! "tcp_mib_per_s"}}`, null where not measured in this run.

mod quic;

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use clap::{Args, ValueEnum};
use flotilla_collectives::Algo;
use flotilla_collectives::perf::{Coll, memcpy_gb_s, time_inproc, time_over};
use flotilla_runtime::fabric::Fabric;
use serde_json::json;

use super::Report;

/// Which fabric carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FabricKind {
    /// In-process channels: every rank is a task of this process.
    Inproc,
    /// QUIC over 127.0.0.1.
    Quic,
}

/// Flags of `flotilla bench collectives`.
#[derive(Debug, Clone, Args)]
pub struct CollectivesArgs {
    /// Print JSON lines (the last is the summary).
    #[arg(long)]
    pub json: bool,
    /// Ranks in all.
    #[arg(long, default_value_t = 4)]
    pub ranks: usize,
    /// Hosts the ranks are grouped into (HFReduce's hierarchy; must divide --ranks).
    #[arg(long, default_value_t = 1)]
    pub hosts: usize,
    /// The fabric between ranks.
    #[arg(long, value_enum, default_value_t = FabricKind::Inproc)]
    pub fabric: FabricKind,
    /// Message sizes in bytes (suffixes K, M, G), comma-separated; default 4K, 16K, … up to
    /// --max-mib.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Vec<usize>,
    /// Largest default message size, MiB (the sizes go up ×4 from 4 KiB; 256 is the full sweep).
    #[arg(long, default_value_t = 64)]
    pub max_mib: usize,
    /// Bytes moved per measurement, MiB: sets the repetitions of each size (3 to 200).
    #[arg(long, default_value_t = 512)]
    pub budget_mib: usize,
}

impl Default for CollectivesArgs {
    fn default() -> Self {
        CollectivesArgs {
            json: false,
            ranks: 4,
            hosts: 1,
            fabric: FabricKind::Inproc,
            sizes: Vec::new(),
            max_mib: 64,
            budget_mib: 512,
        }
    }
}

/// Parse `4096`, `4K`, `64M`, `1G` (binary units).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: usize = num
        .trim()
        .parse()
        .map_err(|e| format!("bad size {s:?}: {e}"))?;
    n.checked_mul(mul)
        .filter(|&b| b >= 4)
        .ok_or_else(|| format!("bad size {s:?}: at least 4 bytes, at most usize"))
}

/// The sizes to measure.
fn sizes(args: &CollectivesArgs) -> Vec<usize> {
    if !args.sizes.is_empty() {
        return args.sizes.clone();
    }
    let max = args.max_mib.max(1) << 20;
    std::iter::successors(Some(4usize << 10), |&s| Some(s * 4))
        .take_while(|&s| s <= max)
        .collect()
}

/// Run the benchmark, returning its JSON records (the last is the summary).
pub fn run(args: &CollectivesArgs) -> Result<Report> {
    ensure!(args.ranks >= 1, "--ranks must be at least 1");
    ensure!(
        args.hosts >= 1 && args.ranks.is_multiple_of(args.hosts),
        "--hosts ({}) must divide --ranks ({})",
        args.hosts,
        args.ranks
    );
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: &CollectivesArgs) -> Result<Report> {
    let mut report = Report::default();
    let n = args.ranks;
    let sizes = sizes(args);
    let mesh = match args.fabric {
        FabricKind::Inproc => None,
        FabricKind::Quic => Some(quic::mesh(n).await?),
    };
    let fabric = if mesh.is_some() { "quic" } else { "inproc" };
    let mut best64: Option<(f64, &'static str)> = None;
    let mut ring64 = None;
    for &bytes in &sizes {
        let reps = ((args.budget_mib << 20) / bytes).clamp(3, 200);
        let memcpy = memcpy_gb_s(bytes, reps);
        for coll in Coll::ALL {
            let timed = match &mesh {
                None => time_inproc(coll, n, args.hosts, bytes, reps).await,
                Some(m) => {
                    let fabrics = m.iter().map(|f| Arc::clone(f) as Arc<dyn Fabric>).collect();
                    time_over(fabrics, coll, args.hosts, bytes, reps).await
                }
            };
            let secs = timed.with_context(|| {
                format!("{fabric} {} {} of {bytes} bytes", coll.op(), coll.algo())
            })?;
            let algbw = bytes as f64 / secs / 1e9;
            let busbw = algbw * coll.bus_factor(n);
            let ratio = busbw / memcpy;
            if mesh.is_none() && bytes == 64 << 20 && coll.op() == "all_reduce" {
                if best64.is_none_or(|(b, _)| ratio > b) {
                    best64 = Some((ratio, coll.algo()));
                }
                if coll == Coll::AllReduce(Algo::Ring) {
                    ring64 = Some(ratio);
                }
            }
            report.push(json!({
                "bench": "collectives",
                "fabric": fabric,
                "op": coll.op(),
                "algo": coll.algo(),
                "ranks": n,
                "hosts": args.hosts,
                "bytes": bytes,
                "reps": reps,
                "time_us": secs * 1e6,
                "algbw_gb_s": algbw,
                "busbw_gb_s": busbw,
                "memcpy_gb_s": memcpy,
                "busbw_over_memcpy": ratio,
            }));
        }
    }
    let mut q = QuicSummary::default();
    if let Some(m) = mesh {
        quic::close(m).await;
        q = quic_p2p(&sizes, args.budget_mib, &mut report).await?;
    }
    report.push(json!({"summary": {
        "inproc_allreduce_64mib_busbw_over_memcpy": best64.map(|b| b.0),
        "inproc_allreduce_64mib_algo": best64.map(|b| b.1),
        "inproc_ring_allreduce_64mib_busbw_over_memcpy": ring64,
        "quic_over_bare_quinn": q.over_bare,
        "quic_mib_per_s": q.mib_per_s,
        "tcp_mib_per_s": q.tcp_mib_per_s,
    }}));
    Ok(report)
}

/// The QUIC part of the summary (all `None` when not measured).
#[derive(Debug, Default)]
struct QuicSummary {
    over_bare: Option<f64>,
    mib_per_s: Option<f64>,
    tcp_mib_per_s: Option<f64>,
}

/// One-way transfers of the largest size (at most 64 MiB): the QUIC fabric, bare quinn, TCP.
async fn quic_p2p(sizes: &[usize], budget_mib: usize, report: &mut Report) -> Result<QuicSummary> {
    let bytes = sizes
        .iter()
        .copied()
        .filter(|&b| b <= 64 << 20)
        .max()
        .unwrap_or(64 << 20);
    let reps = ((budget_mib << 20) / bytes).clamp(3, 50);
    let fabric = quic::fabric_mib_per_s(bytes, reps)
        .await
        .context("QUIC fabric transfer")?;
    let bare = quic::bare_quinn_mib_per_s(bytes, reps)
        .await
        .context("bare quinn transfer")?;
    let tcp = tokio::task::spawn_blocking(move || quic::tcp_mib_per_s(bytes, reps))
        .await
        .context("joining the TCP baseline")?
        .context("TCP transfer")?;
    for (what, v) in [("quic_fabric", fabric), ("bare_quinn", bare), ("tcp", tcp)] {
        report.push(json!({
            "bench": "p2p",
            "transport": what,
            "bytes": bytes,
            "reps": reps,
            "mib_per_s": v,
        }));
    }
    Ok(QuicSummary {
        over_bare: Some(fabric / bare),
        mib_per_s: Some(fabric),
        tcp_mib_per_s: Some(tcp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_default_sweep() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("2").is_err());
        assert!(parse_size("x").is_err());
        let a = CollectivesArgs {
            max_mib: 1,
            ..CollectivesArgs::default()
        };
        assert_eq!(
            sizes(&a),
            vec![4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
        );
    }

    #[test]
    fn a_small_run_reports_every_collective_and_a_summary() {
        let a = CollectivesArgs {
            sizes: vec![4096, 1 << 16],
            budget_mib: 1,
            hosts: 2,
            ..CollectivesArgs::default()
        };
        let r = run(&a).expect("bench");
        assert_eq!(r.records.len(), 2 * Coll::ALL.len() + 1);
        assert!(r.records[0]["busbw_gb_s"].as_f64().is_some_and(|b| b > 0.0));
        let summary = &r.records[r.records.len() - 1]["summary"];
        assert!(summary["quic_mib_per_s"].is_null(), "{summary}");
        assert!(summary["inproc_allreduce_64mib_busbw_over_memcpy"].is_null());
    }

    #[test]
    fn the_quic_fabric_runs_every_collective_and_the_baselines() {
        let a = CollectivesArgs {
            sizes: vec![1 << 16],
            budget_mib: 1,
            ranks: 3,
            fabric: FabricKind::Quic,
            ..CollectivesArgs::default()
        };
        let r = run(&a).expect("bench");
        assert_eq!(r.records.len(), Coll::ALL.len() + 3 + 1);
        let summary = &r.records[r.records.len() - 1]["summary"];
        for k in ["quic_over_bare_quinn", "quic_mib_per_s", "tcp_mib_per_s"] {
            assert!(
                summary[k].as_f64().is_some_and(|v| v > 0.0),
                "{k}: {summary}"
            );
        }
    }
}

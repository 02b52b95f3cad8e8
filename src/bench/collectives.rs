//! `flotilla bench collectives`: the communicator's collectives (ring and tree all-reduce,
//! HFReduce, reduce-scatter, all-gather, all-to-all) over the in-process fabric and over a
//! loopback QUIC mesh in this process, for message sizes from 4 KiB up, with time, algorithm
//! bandwidth and bus bandwidth as nccl-tests defines them, each beside a memcpy of the same size
//! measured in the same run (see [`flotilla_collectives::perf`] for the definitions and the
//! timing). With the QUIC fabric it also measures one-way transfers of `--p2p-mib` between two
//! OS processes ([`quic`]): the QUIC fabric, a bare single-stream quinn connection (also with
//! the fabric's socket buffers) and a plain TCP stream. Without `--fabric` both fabrics run;
//! the QUIC sweep stops at `--quic-max-mib` with its own smaller budget, so the default run
//! takes a minute or two on a 2-core machine.
//!
//! The in-process all-to-all moves its buffers (no copy), so its bandwidth is not bounded by
//! memory bandwidth. HFReduce with `--hosts 1` never touches the fabric (the whole reduction is
//! in shared host memory); pass `--hosts` to exercise its inter-host stage.
//!
//! The last record is `{"summary": {"inproc_allreduce_64mib_busbw_over_memcpy",
//! "inproc_allreduce_64mib_algo" (the best in-process algorithm at 64 MiB),
//! "inproc_ring_allreduce_64mib_busbw_over_memcpy", "quic_over_bare_quinn" (two processes,
//! fabric over bare quinn), "quic_over_bare_quinn_big_sockets", "quic_mib_per_s",
//! "bare_quinn_mib_per_s", "tcp_mib_per_s", "p2p_processes"}}`, null where not measured.

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
    /// The fabric between ranks (both, one after the other, when absent).
    #[arg(long, value_enum)]
    pub fabric: Option<FabricKind>,
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
    /// Largest default message size of the QUIC collectives sweep, MiB.
    #[arg(long, default_value_t = 4)]
    pub quic_max_mib: usize,
    /// Bytes moved per measurement of the QUIC collectives sweep, MiB.
    #[arg(long, default_value_t = 64)]
    pub quic_budget_mib: usize,
    /// Size of the two-process one-way transfers (QUIC fabric, bare quinn, TCP), MiB; 0 skips
    /// them.
    #[arg(long, default_value_t = 64)]
    pub p2p_mib: usize,
    /// Internal: run as the receiving process of a two-process transfer
    /// (`<transport>,<bytes>,<reps>`).
    #[arg(long, hide = true)]
    pub p2p_worker: Option<String>,
}

impl Default for CollectivesArgs {
    fn default() -> Self {
        CollectivesArgs {
            json: false,
            ranks: 4,
            hosts: 1,
            fabric: None,
            sizes: Vec::new(),
            max_mib: 64,
            budget_mib: 512,
            quic_max_mib: 4,
            quic_budget_mib: 64,
            p2p_mib: 64,
            p2p_worker: None,
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

/// The sizes to measure over `fabric`.
fn sizes(args: &CollectivesArgs, fabric: FabricKind) -> Vec<usize> {
    if !args.sizes.is_empty() {
        return args.sizes.clone();
    }
    let max_mib = match fabric {
        FabricKind::Inproc => args.max_mib,
        FabricKind::Quic => args.quic_max_mib,
    };
    let max = max_mib.max(1) << 20;
    std::iter::successors(Some(4usize << 10), |&s| Some(s * 4))
        .take_while(|&s| s <= max)
        .collect()
}

/// Run the benchmark, returning its JSON records (the last is the summary).
pub fn run(args: &CollectivesArgs) -> Result<Report> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    if let Some(spec) = &args.p2p_worker {
        rt.block_on(quic::run_worker(spec))?;
        return Ok(Report::default());
    }
    ensure!(args.ranks >= 1, "--ranks must be at least 1");
    ensure!(
        args.hosts >= 1 && args.ranks.is_multiple_of(args.hosts),
        "--hosts ({}) must divide --ranks ({})",
        args.hosts,
        args.ranks
    );
    rt.block_on(run_async(args))
}

/// The in-process all-reduce results at 64 MiB: the best algorithm's busbw over memcpy, and
/// the ring's.
#[derive(Debug, Default)]
struct Inproc64 {
    best: Option<(f64, &'static str)>,
    ring: Option<f64>,
}

async fn run_async(args: &CollectivesArgs) -> Result<Report> {
    let mut report = Report::default();
    let fabrics = match args.fabric {
        Some(f) => vec![f],
        None => vec![FabricKind::Inproc, FabricKind::Quic],
    };
    let mut in64 = Inproc64::default();
    let mut q = QuicSummary::default();
    for fabric in fabrics {
        sweep(args, fabric, &mut report, &mut in64).await?;
        if fabric == FabricKind::Quic && args.p2p_mib > 0 {
            q = quic_p2p(args.p2p_mib << 20, args.budget_mib, &mut report).await?;
        }
    }
    report.push(json!({"summary": {
        "inproc_allreduce_64mib_busbw_over_memcpy": in64.best.map(|b| b.0),
        "inproc_allreduce_64mib_algo": in64.best.map(|b| b.1),
        "inproc_ring_allreduce_64mib_busbw_over_memcpy": in64.ring,
        "quic_over_bare_quinn": q.over_bare,
        "quic_over_bare_quinn_big_sockets": q.over_bare_big,
        "quic_mib_per_s": q.mib_per_s,
        "bare_quinn_mib_per_s": q.bare_mib_per_s,
        "tcp_mib_per_s": q.tcp_mib_per_s,
        "p2p_processes": q.mib_per_s.map(|_| 2),
    }}));
    Ok(report)
}

/// Every collective at every size over `fabric`.
async fn sweep(
    args: &CollectivesArgs,
    kind: FabricKind,
    report: &mut Report,
    in64: &mut Inproc64,
) -> Result<()> {
    let n = args.ranks;
    let (mesh, budget_mib, fabric) = match kind {
        FabricKind::Inproc => (None, args.budget_mib, "inproc"),
        FabricKind::Quic => (Some(quic::mesh(n).await?), args.quic_budget_mib, "quic"),
    };
    for bytes in sizes(args, kind) {
        let reps = ((budget_mib << 20) / bytes).clamp(3, 200);
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
                if in64.best.is_none_or(|(b, _)| ratio > b) {
                    in64.best = Some((ratio, coll.algo()));
                }
                if coll == Coll::AllReduce(Algo::Ring) {
                    in64.ring = Some(ratio);
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
    if let Some(m) = mesh {
        quic::close(m).await;
    }
    Ok(())
}

/// The QUIC part of the summary (all `None` when not measured).
#[derive(Debug, Default)]
struct QuicSummary {
    over_bare: Option<f64>,
    over_bare_big: Option<f64>,
    mib_per_s: Option<f64>,
    bare_mib_per_s: Option<f64>,
    tcp_mib_per_s: Option<f64>,
}

/// One-way transfers of `bytes` between two processes over each transport.
async fn quic_p2p(bytes: usize, budget_mib: usize, report: &mut Report) -> Result<QuicSummary> {
    let reps = ((budget_mib << 20) / bytes).clamp(3, 50);
    let mut got = Vec::new();
    for t in quic::Transport::ALL {
        let r = quic::p2p(t, bytes, reps).await?;
        report.push(json!({
            "bench": "p2p",
            "transport": t.name(),
            "processes": 2,
            "how": "one way between two OS processes on 127.0.0.1, 1-byte ack per message",
            "bytes": bytes,
            "reps": reps,
            "mib_per_s": r.mib_per_s,
            "cpu_cores": r.cpu_cores,
        }));
        got.push(r.mib_per_s);
    }
    let [fabric, bare, bare_big, tcp] = got[..] else {
        anyhow::bail!("expected {} transports", quic::Transport::ALL.len());
    };
    Ok(QuicSummary {
        over_bare: Some(fabric / bare),
        over_bare_big: Some(fabric / bare_big),
        mib_per_s: Some(fabric),
        bare_mib_per_s: Some(bare),
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
            sizes(&a, FabricKind::Inproc),
            vec![4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
        );
        assert_eq!(sizes(&a, FabricKind::Quic).last(), Some(&(4 << 20)));
    }

    #[test]
    fn a_small_run_reports_every_collective_and_a_summary() {
        let a = CollectivesArgs {
            sizes: vec![4096, 1 << 16],
            budget_mib: 1,
            hosts: 2,
            fabric: Some(FabricKind::Inproc),
            ..CollectivesArgs::default()
        };
        let r = run(&a).expect("bench");
        assert_eq!(r.records.len(), 2 * Coll::ALL.len() + 1);
        assert!(r.records[0]["busbw_gb_s"].as_f64().is_some_and(|b| b > 0.0));
        let summary = &r.records[r.records.len() - 1]["summary"];
        assert!(summary["quic_mib_per_s"].is_null(), "{summary}");
        assert!(summary["inproc_allreduce_64mib_busbw_over_memcpy"].is_null());
    }

    /// The two-process transfers need the `flotilla` binary (not this test's), so they are
    /// skipped here; `flotilla bench collectives --json` runs them.
    #[test]
    fn the_quic_fabric_runs_every_collective() {
        let a = CollectivesArgs {
            sizes: vec![1 << 16],
            budget_mib: 1,
            quic_budget_mib: 1,
            ranks: 3,
            fabric: Some(FabricKind::Quic),
            p2p_mib: 0,
            ..CollectivesArgs::default()
        };
        let r = run(&a).expect("bench");
        assert_eq!(r.records.len(), Coll::ALL.len() + 1);
        assert!(
            r.records
                .iter()
                .take(Coll::ALL.len())
                .all(|x| x["fabric"] == "quic")
        );
        let summary = &r.records[r.records.len() - 1]["summary"];
        assert!(summary["quic_mib_per_s"].is_null(), "{summary}");
    }
}

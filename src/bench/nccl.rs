//! `flotilla bench nccl` (feature `cuda`): NCCL all-reduce and all-to-all between the GPUs of
//! this host through Flotilla's NCCL backend, timed like nccl-tests (algbw = bytes / time;
//! busbw = algbw·2(n−1)/n for all-reduce and algbw·(n−1)/n for all-to-all). One thread per GPU
//! by default, or one process per GPU with `--procs` (the NCCL id travels on the command line,
//! standing in for the control plane). Compare with `tools/bench/torch_nccl.py`, run in the
//! same session.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use cudarc::driver::CudaContext;
use flotilla_collectives::ReduceOp;
use flotilla_collectives::nccl::{NcclComm, NcclId};
use serde_json::json;

use super::Report;

const SIZES: [usize; 9] = [
    4 << 10,
    16 << 10,
    64 << 10,
    256 << 10,
    1 << 20,
    4 << 20,
    16 << 20,
    64 << 20,
    256 << 20,
];

fn iters(bytes: usize) -> usize {
    if bytes >= 16 << 20 { 20 } else { 100 }
}

/// Run the measurements as `rank` of `world`; rank 0 returns the records.
pub fn worker(rank: usize, world: usize, id: NcclId) -> Result<Report> {
    let ctx = CudaContext::new(rank).with_context(|| format!("opening GPU {rank}"))?;
    let stream = ctx.new_stream().context("creating a stream")?;
    let comm = NcclComm::new(Arc::clone(&stream), rank, world, id)?;
    let mut report = Report::default();
    report.push(self_check(&comm)?);
    let mut sync = stream.alloc_zeros::<f32>(1)?;
    let mut barrier = |comm: &NcclComm| -> Result<()> {
        let s = stream.alloc_zeros::<f32>(1)?;
        comm.all_reduce(&s, &mut sync, ReduceOp::Sum)?;
        stream.synchronize()?;
        Ok(())
    };
    let n = world as f64;
    for &bytes in &SIZES {
        let elems = bytes / 4;
        let send = stream.alloc_zeros::<f32>(elems)?;
        let mut recv = stream.alloc_zeros::<f32>(elems)?;
        let per_peer = elems / world;
        let counts = vec![per_peer; world];
        for (op, factor) in [
            ("all_reduce", 2.0 * (n - 1.0) / n),
            ("all_to_all", (n - 1.0) / n),
        ] {
            let run = |recv: &mut cudarc::driver::CudaSlice<f32>| -> Result<()> {
                match op {
                    "all_reduce" => comm.all_reduce(&send, recv, ReduceOp::Sum)?,
                    _ => comm.all_to_all_v(&send, &counts, recv, &counts)?,
                }
                Ok(())
            };
            for _ in 0..5 {
                run(&mut recv)?;
            }
            barrier(&comm)?;
            let k = iters(bytes);
            let t = Instant::now();
            for _ in 0..k {
                run(&mut recv)?;
            }
            stream.synchronize()?;
            let secs = t.elapsed().as_secs_f64() / k as f64;
            let moved = if op == "all_to_all" {
                per_peer * world * 4
            } else {
                bytes
            };
            let algbw = moved as f64 / secs / 1e9;
            report.push(json!({
                "bench": "nccl", "impl": "flotilla", "op": op, "ranks": world, "bytes": moved,
                "time_us": secs * 1e6, "algbw_gbs": algbw, "busbw_gbs": algbw * factor,
            }));
        }
    }
    Ok(report)
}

/// Exact results on integer data before timing anything: all-reduce of rank-valued buffers and
/// an uneven all-to-all-v (rank r sends r+p+1 elements to peer p, valued 1000·r + p).
fn self_check(comm: &NcclComm) -> Result<serde_json::Value> {
    let (rank, world) = (comm.rank(), comm.world());
    let stream = comm.stream();
    let send = stream.clone_htod(&vec![(rank + 1) as f32; 1000])?;
    let mut recv = stream.alloc_zeros::<f32>(1000)?;
    comm.all_reduce(&send, &mut recv, ReduceOp::Sum)?;
    let got = stream.clone_dtoh(&recv)?;
    let want = (world * (world + 1) / 2) as f32;
    anyhow::ensure!(
        got.iter().all(|&x| x == want),
        "all_reduce gave {:?}, want {want}",
        &got[..4]
    );
    let send_counts: Vec<usize> = (0..world).map(|p| rank + p + 1).collect();
    let recv_counts: Vec<usize> = (0..world).map(|p| p + rank + 1).collect();
    let data: Vec<f32> = (0..world)
        .flat_map(|p| std::iter::repeat_n((1000 * rank + p) as f32, rank + p + 1))
        .collect();
    let send = stream.clone_htod(&data)?;
    let mut recv = stream.alloc_zeros::<f32>(recv_counts.iter().sum::<usize>().max(1))?;
    comm.all_to_all_v(&send, &send_counts, &mut recv, &recv_counts)?;
    let got = stream.clone_dtoh(&recv)?;
    let want: Vec<f32> = (0..world)
        .flat_map(|p| std::iter::repeat_n((1000 * p + rank) as f32, p + rank + 1))
        .collect();
    anyhow::ensure!(
        got[..want.len()] == want[..],
        "all_to_all_v gave wrong data on rank {rank}"
    );
    Ok(json!({"bench": "nccl_self_check", "rank": rank, "world": world, "ok": true}))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return Err(anyhow!("--nccl-id must have an even number of hex digits"));
    }
    (0..s.len() / 2)
        .map(|i| {
            u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| anyhow!("--nccl-id: {e}"))
        })
        .collect()
}

/// All GPUs of this host: one thread (or, with `procs`, one child process) per GPU.
pub fn run(gpus: Option<usize>, procs: bool) -> Result<Report> {
    let world = match gpus {
        Some(n) => n,
        None => CudaContext::device_count().context("counting GPUs")? as usize,
    };
    anyhow::ensure!(world >= 1, "no GPU found");
    let id = NcclId::new()?;
    if procs {
        let exe = std::env::current_exe().context("locating the flotilla binary")?;
        let mut children = Vec::new();
        for r in 1..world {
            children.push(
                std::process::Command::new(&exe)
                    .args([
                        "bench",
                        "nccl",
                        "--worker-rank",
                        &r.to_string(),
                        "--world",
                        &world.to_string(),
                        "--nccl-id",
                        &hex(&id.to_bytes()),
                    ])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .context("starting a worker process")?,
            );
        }
        let mut report = worker(0, world, id)?;
        for mut c in children {
            let st = c.wait()?;
            anyhow::ensure!(st.success(), "a worker process failed: {st}");
        }
        for r in &mut report.records {
            r["procs"] = json!(true);
        }
        return Ok(report);
    }
    let handles: Vec<_> = (1..world)
        .map(|r| std::thread::spawn(move || worker(r, world, id)))
        .collect();
    let report = worker(0, world, id)?;
    for h in handles {
        h.join().map_err(|_| anyhow!("a GPU thread panicked"))??;
    }
    Ok(report)
}

/// The child side of `--procs`.
pub fn run_worker(rank: usize, world: usize, id_hex: &str) -> Result<()> {
    let id = NcclId::from_bytes(&unhex(id_hex)?)?;
    worker(rank, world, id).map(|_| ())
}

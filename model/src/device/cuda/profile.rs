//! What the CUDA device's operations cost: counted work, and GPU time from CUDA events.
//!
//! Without profiling, the first operation after a drain records a start event and the drain
//! records an end event: one pair of events per drained interval, whose GPU time (idle gaps
//! between its operations included, as a stream's busy time would count them) is added to
//! `seconds` by the first drain that finds the interval finished. A drain does not wait for the
//! GPU (the compute thread would otherwise stall the stream after every job), so an interval's
//! seconds may be counted one drain late; a step's last drain comes after the host has read
//! Σg², by which time its intervals have finished. With profiling, every operation gets its own
//! pair, and the drain waits for them and sums them per kernel name.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use super::super::Cost;
use super::super::cost::Work;

/// One operation's host time: how long the thread that issued it spent in it (launching it,
/// or waiting for the GPU where the operation hands a result to the host).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTime {
    pub name: &'static str,
    pub calls: u64,
    pub seconds: f64,
}

static HOST_TIMING: AtomicBool = AtomicBool::new(false);
static HOST_TIMES: Mutex<BTreeMap<&'static str, HostTime>> = Mutex::new(BTreeMap::new());

/// Whether every CUDA device of the process adds its operations' host time to one table
/// ([`take_host_times`]): off by default (it costs two clock reads and a lock per operation).
pub fn set_host_timing(on: bool) {
    HOST_TIMING.store(on, Ordering::Relaxed);
}

/// The host time of every operation since the last call, sorted by time.
pub fn take_host_times() -> Vec<HostTime> {
    let mut t = HOST_TIMES.lock().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<HostTime> = std::mem::take(&mut *t).into_values().collect();
    v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    v
}

/// Runs `f`, adding its host time to `name`'s when host timing is on.
pub(super) fn host_timed<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    if !HOST_TIMING.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let r = f();
    let secs = start.elapsed().as_secs_f64();
    let mut t = HOST_TIMES.lock().unwrap_or_else(|p| p.into_inner());
    let e = t.entry(name).or_insert(HostTime {
        name,
        calls: 0,
        seconds: 0.0,
    });
    e.calls += 1;
    e.seconds += secs;
    r
}

/// How many drained intervals may wait for the GPU before a drain waits for the oldest.
const MAX_OPEN_INTERVALS: usize = 256;

/// One kernel's share of the profiled operations.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub name: &'static str,
    pub calls: u64,
    pub seconds: f64,
    pub flops: f64,
    pub bytes: f64,
}

/// Running totals of a device.
#[derive(Default)]
pub(super) struct Stats {
    cost: Cost,
    /// The event recorded before the first operation since the last drain.
    open: Option<CudaEvent>,
    /// Drained intervals (start and end events) the GPU may not have finished yet.
    closed: VecDeque<(CudaEvent, CudaEvent)>,
    pub(super) profiling: bool,
    /// Profiled operations not yet resolved: name, work, start and end events.
    pending: Vec<(&'static str, Work, CudaEvent, CudaEvent)>,
    /// Resolved per-kernel totals.
    table: BTreeMap<&'static str, KernelTime>,
}

/// What [`Stats::begin`] hands to [`Stats::end`].
pub(super) struct Token {
    name: &'static str,
    start: Option<CudaEvent>,
}

fn timing_event(ctx: &Arc<CudaContext>, stream: &CudaStream) -> CudaEvent {
    let e = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap_or_else(|err| panic!("CUDA event: {err}"));
    e.record(stream)
        .unwrap_or_else(|err| panic!("CUDA event record: {err}"));
    e
}

impl Stats {
    pub(super) fn begin(
        &mut self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        name: &'static str,
    ) -> Token {
        if self.open.is_none() {
            self.open = Some(timing_event(ctx, stream));
        }
        Token {
            name,
            start: self.profiling.then(|| timing_event(ctx, stream)),
        }
    }

    pub(super) fn end(&mut self, stream: &CudaStream, token: Token, work: Work) {
        self.cost.add(&Cost {
            flops: work.flops,
            bytes: work.bytes,
            seconds: 0.0,
            gemm_flops: if work.gemm { work.flops } else { 0.0 },
            gemm_seconds: 0.0,
            ops: 1,
        });
        if let Some(start) = token.start {
            let end = timing_event(start.context(), stream);
            self.pending.push((token.name, work, start, end));
            if self.pending.len() >= 4096 {
                self.resolve();
            }
        }
    }

    /// Waits for the profiled operations' events and adds them to the table (and their GEMM
    /// time to the running cost).
    fn resolve(&mut self) {
        for (name, work, start, end) in self.pending.drain(..) {
            end.synchronize()
                .unwrap_or_else(|e| panic!("CUDA event sync: {e}"));
            let secs = f64::from(start.elapsed_ms(&end).unwrap_or(0.0)) * 1e-3;
            if work.gemm {
                self.cost.gemm_seconds += secs;
            }
            let k = self.table.entry(name).or_insert(KernelTime {
                name,
                calls: 0,
                seconds: 0.0,
                flops: 0.0,
                bytes: 0.0,
            });
            k.calls += 1;
            k.seconds += secs;
            k.flops += work.flops;
            k.bytes += work.bytes;
        }
    }

    /// The cost since the last drain, with the GPU seconds of every drained interval that has
    /// finished (does not wait for the stream, unless too many intervals are outstanding).
    pub(super) fn take_cost(&mut self, stream: &CudaStream) -> Cost {
        if let Some(start) = self.open.take() {
            let end = timing_event(start.context(), stream);
            self.closed.push_back((start, end));
        }
        while let Some((start, end)) = self.closed.front() {
            let done = end
                .try_is_complete()
                .unwrap_or_else(|e| panic!("CUDA stream failed: {e}"));
            if !done && self.closed.len() <= MAX_OPEN_INTERVALS {
                break;
            }
            // Finished (or too many outstanding: wait for the oldest).
            let secs = f64::from(start.elapsed_ms(end).unwrap_or(0.0)) * 1e-3;
            self.cost.seconds += secs;
            self.closed.pop_front();
        }
        self.resolve();
        std::mem::take(&mut self.cost)
    }

    pub(super) fn take_profile(&mut self) -> Vec<KernelTime> {
        self.resolve();
        let mut v: Vec<KernelTime> = std::mem::take(&mut self.table).into_values().collect();
        v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        v
    }
}

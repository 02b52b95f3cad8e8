//! What the CUDA device's operations cost: counted work, and GPU time from CUDA events.
//!
//! Without profiling, the first operation after a drain records a start event and the drain
//! records an end event and waits for it: one pair of events per drained interval, so `seconds`
//! is the GPU time from the first operation's start to the drain (idle gaps between operations
//! included, as a stream's busy time would count them). With profiling, every operation gets its
//! own pair, and the drain sums them per kernel name.

use std::collections::BTreeMap;
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use super::super::Cost;
use super::super::cost::Work;

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

    /// The cost since the last drain, its seconds measured on the GPU (waits for the stream).
    pub(super) fn take_cost(&mut self, stream: &CudaStream) -> Cost {
        if let Some(start) = self.open.take() {
            let end = timing_event(start.context(), stream);
            end.synchronize()
                .unwrap_or_else(|e| panic!("CUDA event sync: {e}"));
            self.cost.seconds = f64::from(start.elapsed_ms(&end).unwrap_or(0.0)) * 1e-3;
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

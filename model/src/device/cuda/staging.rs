//! Uploads through pinned host memory: a copy from pageable memory makes the host wait until
//! the stream has reached it, which takes away the host's lead over the GPU at every upload
//! (the experts' problem tables, the scatter indices). Here each upload's bytes go into a ring
//! of page-locked memory first, from which the copy is truly asynchronous; an event per
//! upload says when its part of the ring may be written again.

use std::collections::VecDeque;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, PinnedHostSlice};

use super::CudaError;

/// Bytes of the ring (uploads larger than this go straight from pageable memory).
pub(super) const RING_BYTES: usize = 16 << 20;

/// The ring and the uploads still reading from it, oldest first.
pub(super) struct Staging {
    ring: PinnedHostSlice<u8>,
    base: *mut u8,
    head: usize,
    in_flight: VecDeque<CudaEvent>,
    /// Events of finished uploads, for the next ones (an upload is on the step's hot path).
    spare: Vec<CudaEvent>,
}

// SAFETY: `base` points into `ring`, which the struct owns; it is only written through
// `&mut self` (the device keeps the ring behind a mutex).
unsafe impl Send for Staging {}

impl Staging {
    pub(super) fn new(ctx: &Arc<CudaContext>) -> Result<Staging, CudaError> {
        // SAFETY: nothing reads the ring before an upload has written its part.
        let mut ring = unsafe { ctx.alloc_pinned::<u8>(RING_BYTES) }
            .map_err(CudaError::driver("pinned staging memory"))?;
        let base = ring
            .as_mut_ptr()
            .map_err(CudaError::driver("pinned staging memory"))?;
        Ok(Staging {
            ring,
            base,
            head: 0,
            in_flight: VecDeque::new(),
            spare: Vec::new(),
        })
    }

    /// Copies `bytes` into the ring and issues their copy to device address `dst` on
    /// `stream`; returns false (nothing issued) when they do not fit in the ring.
    pub(super) fn upload(
        &mut self,
        stream: &Arc<CudaStream>,
        dst: u64,
        bytes: &[u8],
    ) -> Result<bool, CudaError> {
        let n = bytes.len();
        if n > self.ring.len() {
            return Ok(false);
        }
        // Finished uploads leave the queue; at the end of the ring, wait for every upload
        // still reading from it, then start again at its beginning.
        while self.in_flight.front().is_some_and(CudaEvent::is_complete) {
            self.spare.extend(self.in_flight.pop_front());
        }
        let start = self.head.next_multiple_of(16);
        let start = if start + n > self.ring.len() {
            for e in self.in_flight.drain(..) {
                e.synchronize()
                    .map_err(CudaError::driver("staging upload"))?;
                self.spare.push(e);
            }
            0
        } else {
            start
        };
        // SAFETY: `start + n` is within the ring, and no copy in flight reads these bytes
        // (every upload issued since the ring last wrapped lies before `start`).
        let part = unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(start), n);
            std::slice::from_raw_parts(self.base.add(start), n)
        };
        // SAFETY: `dst` is a live device allocation of at least `n` bytes (the caller's) and
        // `part` stays untouched until the event recorded after the copy has passed.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, part, stream.cu_stream()) }
            .map_err(CudaError::driver("staging upload"))?;
        let done = match self.spare.pop() {
            Some(e) => e,
            None => stream
                .context()
                .new_event(None)
                .map_err(CudaError::driver("staging event"))?,
        };
        done.record(stream)
            .map_err(CudaError::driver("staging event"))?;
        self.in_flight.push_back(done);
        self.head = start + n;
        Ok(true)
    }
}

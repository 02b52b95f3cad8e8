//! A caching allocator for host buffers (the CPU device's answer to page-fault-bound allocation).
//!
//! A training step allocates the same activation shapes every time. Returning freed buffers to the
//! system and faulting fresh pages in again cost as much as the whole step's arithmetic on the
//! default model (measured: 31.7 ms → 15.5 ms per step when allocations are recycled), so tensors
//! made by the CPU device hand their buffer back here when dropped, keyed by length, and the next
//! allocation of that length reuses it. The cache is bounded by `limit_bytes`.

use std::collections::HashMap;
use std::sync::Mutex;

/// Cached buffers by length, and their total size in bytes.
#[derive(Debug, Default)]
struct Cache {
    by_len: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

/// Freed host buffers, by length.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Cache>,
    limit_bytes: usize,
}

impl BufferPool {
    pub fn new(limit_bytes: usize) -> BufferPool {
        BufferPool {
            free: Mutex::new(Cache::default()),
            limit_bytes,
        }
    }

    /// A buffer of exactly `n` values: a recycled one (old contents) or a fresh zeroed one.
    pub fn take(&self, n: usize) -> Vec<f32> {
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = g.by_len.get_mut(&n).and_then(|list| list.pop()) {
            g.bytes -= n * 4;
            return v;
        }
        drop(g);
        vec![0.0; n]
    }

    /// Keeps `v` for reuse (or frees it when the cache is full).
    pub fn put(&self, v: Vec<f32>) {
        let n = v.len();
        if n == 0 {
            return;
        }
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if g.bytes + n * 4 <= self.limit_bytes {
            g.bytes += n * 4;
            g.by_len.entry(n).or_default().push(v);
        }
    }

    /// Bytes currently cached.
    pub fn cached_bytes(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// Frees every cached buffer.
    pub fn clear(&self) {
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        g.by_len.clear();
        g.bytes = 0;
    }
}

//! The NCCL backend (feature `cuda`): collectives between GPUs on device buffers, through
//! cudarc's NCCL bindings (loaded at run time).
//!
//! One [`NcclComm`] per GPU rank, on that rank's CUDA stream. The communicator's unique id is
//! made by one rank ([`NcclId::new`]) and travels to the others over the control plane as 128
//! plain bytes ([`NcclId::to_bytes`] / [`NcclId::from_bytes`]); it works the same with one
//! process per GPU and with several GPUs per process (one thread per GPU). All-to-all(v) is
//! built from grouped sends and receives, as NCCL's own documentation does it. Operations are
//! asynchronous on the stream; the comm actor is the only caller that blocks on them.

use std::sync::Arc;

/// The CUDA types a caller needs to set up an [`NcclComm`], re-exported so that crates above
/// this one need no cudarc dependency of their own.
pub use cudarc::driver::{CudaContext, CudaStream};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use cudarc::nccl::{NcclType, result, sys};

use crate::ReduceOp;

/// An NCCL failure, naming the operation.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error("nccl {op}: {code:?}")]
    Nccl {
        op: &'static str,
        code: sys::ncclResult_t,
    },
    #[error("nccl id: expected 128 bytes, got {0}")]
    BadId(usize),
    #[error("nccl {op}: {why}")]
    Shape { op: &'static str, why: String },
    #[error("nccl {op}: cuda: {why}")]
    Cuda { op: &'static str, why: String },
}

fn check(
    op: &'static str,
    r: Result<result::NcclStatus, result::NcclError>,
) -> Result<(), NcclError> {
    r.map(|_| ()).map_err(|e| NcclError::Nccl { op, code: e.0 })
}

/// The communicator's unique id.
#[derive(Clone, Copy)]
pub struct NcclId(sys::ncclUniqueId);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (on one rank; then send its bytes to the others).
    pub fn new() -> Result<Self, NcclError> {
        result::get_uniqueid()
            .map(NcclId)
            .map_err(|e| NcclError::Nccl {
                op: "get_uniqueid",
                code: e.0,
            })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.internal.iter().map(|&c| c as u8).collect()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, NcclError> {
        if b.len() != 128 {
            return Err(NcclError::BadId(b.len()));
        }
        let mut internal = [0 as ::core::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(b) {
            *d = *s as ::core::ffi::c_char;
        }
        Ok(NcclId(sys::ncclUniqueId { internal }))
    }
}

/// One GPU rank's NCCL communicator.
pub struct NcclComm {
    raw: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {})", self.rank, self.world)
    }
}

// SAFETY: an NCCL communicator may be used from any one thread at a time; `NcclComm` is not
// `Sync`, so `&NcclComm` never reaches two threads at once.
unsafe impl Send for NcclComm {}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: `raw` came from ncclCommInitRank and is destroyed once, here.
        if let Err(e) = unsafe { result::comm_destroy(self.raw) } {
            tracing::warn!("nccl comm_destroy failed: {e:?}");
        }
    }
}

fn op_code(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

impl NcclComm {
    /// Join the communicator `id` as `rank` of `world` (blocks until every rank has joined).
    pub fn new(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: NcclId,
    ) -> Result<Self, NcclError> {
        let n = i32::try_from(world).map_err(|_| NcclError::Shape {
            op: "init",
            why: format!("world {world}"),
        })?;
        let r = i32::try_from(rank).map_err(|_| NcclError::Shape {
            op: "init",
            why: format!("rank {rank}"),
        })?;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| NcclError::Shape {
                op: "init",
                why: e.to_string(),
            })?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; NCCL fills it on success.
        check("comm_init_rank", unsafe {
            result::comm_init_rank(&mut raw, n, id.0, r)
        })?;
        Ok(Self {
            raw,
            stream,
            rank,
            world,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn cu(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as _
    }

    /// `recv = op over ranks of send` (same length everywhere).
    pub fn all_reduce<T: NcclType>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<(), NcclError> {
        if send.len() != recv.len() {
            return Err(NcclError::Shape {
                op: "all_reduce",
                why: format!("send {} != recv {}", send.len(), recv.len()),
            });
        }
        let (s, _rs) = send.device_ptr(&self.stream);
        let (d, _rd) = recv.device_ptr_mut(&self.stream);
        // SAFETY: both pointers address `send.len()` elements of T on this stream's device.
        check("all_reduce", unsafe {
            result::all_reduce(
                s as _,
                d as _,
                send.len(),
                T::as_nccl_type(),
                op_code(op),
                self.raw,
                self.cu(),
            )
        })
    }

    /// Rank r gets chunk r of the reduction; `send.len() == world · recv.len()`.
    pub fn reduce_scatter<T: NcclType>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<(), NcclError> {
        if send.len() != recv.len() * self.world {
            return Err(NcclError::Shape {
                op: "reduce_scatter",
                why: format!(
                    "send {} != world {} × recv {}",
                    send.len(),
                    self.world,
                    recv.len()
                ),
            });
        }
        let count = recv.len();
        let (s, _rs) = send.device_ptr(&self.stream);
        let (d, _rd) = recv.device_ptr_mut(&self.stream);
        // SAFETY: sizes checked above.
        check("reduce_scatter", unsafe {
            result::reduce_scatter(
                s as _,
                d as _,
                count,
                T::as_nccl_type(),
                op_code(op),
                self.raw,
                self.cu(),
            )
        })
    }

    /// Every rank's `send` concatenated in rank order; `recv.len() == world · send.len()`.
    pub fn all_gather<T: NcclType>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<(), NcclError> {
        if recv.len() != send.len() * self.world {
            return Err(NcclError::Shape {
                op: "all_gather",
                why: format!(
                    "recv {} != world {} × send {}",
                    recv.len(),
                    self.world,
                    send.len()
                ),
            });
        }
        let (s, _rs) = send.device_ptr(&self.stream);
        let (d, _rd) = recv.device_ptr_mut(&self.stream);
        // SAFETY: sizes checked above.
        check("all_gather", unsafe {
            result::all_gather(
                s as _,
                d as _,
                send.len(),
                T::as_nccl_type(),
                self.raw,
                self.cu(),
            )
        })
    }

    /// `buf` on every rank becomes `root`'s.
    pub fn broadcast<T: NcclType>(
        &self,
        buf: &mut CudaSlice<T>,
        root: usize,
    ) -> Result<(), NcclError> {
        let root = i32::try_from(root).map_err(|_| NcclError::Shape {
            op: "broadcast",
            why: format!("root {root}"),
        })?;
        let n = buf.len();
        let (d, _rd) = buf.device_ptr_mut(&self.stream);
        // SAFETY: in-place broadcast over `n` elements of this device buffer.
        check("broadcast", unsafe {
            result::broadcast(
                d as _,
                d as _,
                n,
                T::as_nccl_type(),
                root,
                self.raw,
                self.cu(),
            )
        })
    }

    /// All-to-all with per-peer counts: `send` holds `send_counts[p]` elements for each peer p
    /// back to back, `recv` receives `recv_counts[p]` from each peer p back to back (grouped
    /// ncclSend/ncclRecv). Counts may be zero and uneven.
    pub fn all_to_all_v<T: NcclType>(
        &self,
        send: &CudaSlice<T>,
        send_counts: &[usize],
        recv: &mut CudaSlice<T>,
        recv_counts: &[usize],
    ) -> Result<(), NcclError> {
        let w = self.world;
        if send_counts.len() != w || recv_counts.len() != w {
            return Err(NcclError::Shape {
                op: "all_to_all_v",
                why: format!(
                    "{} send / {} recv counts for {w} ranks",
                    send_counts.len(),
                    recv_counts.len()
                ),
            });
        }
        let (st, rt): (usize, usize) = (send_counts.iter().sum(), recv_counts.iter().sum());
        if st > send.len() || rt > recv.len() {
            return Err(NcclError::Shape {
                op: "all_to_all_v",
                why: format!(
                    "counts sum to {st}/{rt}, buffers hold {}/{}",
                    send.len(),
                    recv.len()
                ),
            });
        }
        let elem = std::mem::size_of::<T>() as u64;
        let (s, _rs) = send.device_ptr(&self.stream);
        let (d, _rd) = recv.device_ptr_mut(&self.stream);
        check("group_start", result::group_start())?;
        let mut outcome = Ok(());
        let (mut so, mut ro) = (0u64, 0u64);
        for peer in 0..w {
            // SAFETY: offsets stay within the buffers (sums checked above).
            let r = unsafe {
                let sr = result::send(
                    (s + so * elem) as _,
                    send_counts[peer],
                    T::as_nccl_type(),
                    peer as i32,
                    self.raw,
                    self.cu(),
                );
                sr.and_then(|_| {
                    result::recv(
                        (d + ro * elem) as _,
                        recv_counts[peer],
                        T::as_nccl_type(),
                        peer as i32,
                        self.raw,
                        self.cu(),
                    )
                })
            };
            if let Err(e) = check("send/recv", r) {
                outcome = Err(e);
                break;
            }
            so += send_counts[peer] as u64;
            ro += recv_counts[peer] as u64;
        }
        // The group must be closed even when a call inside it failed.
        let end = check("group_end", result::group_end());
        outcome.and(end)
    }
}

//! Typed device buffers for the NCCL backend (feature `cuda`), and blocking whole-buffer
//! collectives on them: each call allocates its output on the communicator's stream, runs the
//! NCCL operation, and waits for the stream. This is what the comm actor's NCCL thread calls
//! (`flotilla_actors::comm`); it is the one place that blocks on NCCL.
//!
//! bf16 travels as `half::bf16` on the device (NCCL's `ncclBfloat16`; NCCL reduces bf16 with
//! its own accumulation); [`NcclComm::upload_bf16`] and [`NcclComm::download`] convert from and
//! to the raw bits (`u16`) that the fabric communicator uses.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::NcclType;

use crate::ReduceOp;
use crate::nccl::{NcclComm, NcclError};

/// A device buffer of one of the collectives' element types.
#[derive(Debug)]
pub enum DeviceBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<half::bf16>),
}

/// A host buffer as downloaded from the device (bf16 as raw bits).
#[derive(Debug, Clone, PartialEq)]
pub enum HostBuf {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl DeviceBuf {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            DeviceBuf::F32(s) => s.len(),
            DeviceBuf::Bf16(s) => s.len(),
        }
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name.
    pub fn dtype(&self) -> &'static str {
        match self {
            DeviceBuf::F32(_) => "f32",
            DeviceBuf::Bf16(_) => "bf16",
        }
    }
}

fn cuda(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> NcclError {
    move |e| NcclError::Cuda {
        op,
        why: e.to_string(),
    }
}

/// Apply `$f` (a generic method of `NcclComm` taking the typed slice first) to either variant.
macro_rules! each {
    ($self:ident, $buf:expr, $f:ident ( $($arg:expr),* )) => {
        match $buf {
            DeviceBuf::F32(s) => $self.$f(s, $($arg),*).map(DeviceBuf::F32),
            DeviceBuf::Bf16(s) => $self.$f(s, $($arg),*).map(DeviceBuf::Bf16),
        }
    };
}

impl NcclComm {
    /// Copy host f32 data to a new device buffer.
    pub fn upload_f32(&self, host: &[f32]) -> Result<DeviceBuf, NcclError> {
        let s = self.stream().clone_htod(host).map_err(cuda("upload"))?;
        Ok(DeviceBuf::F32(s))
    }

    /// Copy host bf16 bits to a new device buffer.
    pub fn upload_bf16(&self, host: &[u16]) -> Result<DeviceBuf, NcclError> {
        let v: Vec<half::bf16> = host.iter().map(|&b| half::bf16::from_bits(b)).collect();
        let s = self.stream().clone_htod(&v).map_err(cuda("upload"))?;
        Ok(DeviceBuf::Bf16(s))
    }

    /// Copy a device buffer back to the host (waits for the stream).
    pub fn download(&self, buf: &DeviceBuf) -> Result<HostBuf, NcclError> {
        let stream = self.stream();
        let host = match buf {
            DeviceBuf::F32(s) => HostBuf::F32(stream.clone_dtoh(s).map_err(cuda("download"))?),
            DeviceBuf::Bf16(s) => {
                let v = stream.clone_dtoh(s).map_err(cuda("download"))?;
                HostBuf::Bf16(v.into_iter().map(half::bf16::to_bits).collect())
            }
        };
        // A copy into pageable memory is complete when it returns; this makes it explicit.
        self.sync("download")?;
        Ok(host)
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        op: &'static str,
        n: usize,
    ) -> Result<CudaSlice<T>, NcclError> {
        self.stream().alloc_zeros::<T>(n).map_err(cuda(op))
    }

    fn sync(&self, op: &'static str) -> Result<(), NcclError> {
        self.stream().synchronize().map_err(cuda(op))
    }

    fn all_reduce_t<T: NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        send: CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<CudaSlice<T>, NcclError> {
        if send.is_empty() {
            return Ok(send);
        }
        let mut recv = self.zeros("all_reduce", send.len())?;
        self.all_reduce(&send, &mut recv, op)?;
        self.sync("all_reduce")?;
        Ok(recv)
    }

    fn reduce_scatter_t<T: NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        send: CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<CudaSlice<T>, NcclError> {
        if !send.len().is_multiple_of(self.world()) {
            return Err(NcclError::Shape {
                op: "reduce_scatter",
                why: format!(
                    "a buffer of {} elements does not split into {} equal chunks",
                    send.len(),
                    self.world()
                ),
            });
        }
        if send.is_empty() {
            return Ok(send);
        }
        let mut recv = self.zeros("reduce_scatter", send.len() / self.world())?;
        self.reduce_scatter(&send, &mut recv, op)?;
        self.sync("reduce_scatter")?;
        Ok(recv)
    }

    fn all_gather_t<T: NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        send: CudaSlice<T>,
    ) -> Result<CudaSlice<T>, NcclError> {
        if send.is_empty() {
            return Ok(send);
        }
        let mut recv = self.zeros("all_gather", send.len() * self.world())?;
        self.all_gather(&send, &mut recv)?;
        self.sync("all_gather")?;
        Ok(recv)
    }

    fn broadcast_t<T: NcclType + DeviceRepr>(
        &self,
        mut buf: CudaSlice<T>,
        root: usize,
    ) -> Result<CudaSlice<T>, NcclError> {
        if buf.is_empty() {
            return Ok(buf);
        }
        self.broadcast(&mut buf, root)?;
        self.sync("broadcast")?;
        Ok(buf)
    }

    /// The whole-buffer all-reduce: a new buffer with the reduction (blocks until done).
    pub fn all_reduce_buf(&self, buf: DeviceBuf, op: ReduceOp) -> Result<DeviceBuf, NcclError> {
        each!(self, buf, all_reduce_t(op))
    }

    /// The whole-buffer reduce-scatter: this rank's chunk of the reduction.
    pub fn reduce_scatter_buf(&self, buf: DeviceBuf, op: ReduceOp) -> Result<DeviceBuf, NcclError> {
        each!(self, buf, reduce_scatter_t(op))
    }

    /// The whole-buffer all-gather: every rank's chunk, in rank order.
    pub fn all_gather_buf(&self, chunk: DeviceBuf) -> Result<DeviceBuf, NcclError> {
        each!(self, chunk, all_gather_t())
    }

    /// The whole-buffer broadcast from `root` (in place).
    pub fn broadcast_buf(&self, buf: DeviceBuf, root: usize) -> Result<DeviceBuf, NcclError> {
        each!(self, buf, broadcast_t(root))
    }

    /// Wait until every rank has reached the barrier (a one-element all-reduce).
    pub fn barrier(&self) -> Result<(), NcclError> {
        let send = self.zeros::<f32>("barrier", 1)?;
        self.all_reduce_t(send, ReduceOp::Sum).map(drop)
    }

    /// All-to-all of host parts (`parts[p]` goes to rank p; all of one element type, any
    /// lengths, zero included): the part lengths are exchanged first, then the packed data in
    /// one grouped send/receive on the device; the result is split per sender on the host.
    pub fn all_to_all_v_host(&self, parts: Vec<HostBuf>) -> Result<Vec<HostBuf>, NcclError> {
        let w = self.world();
        if parts.len() != w {
            return Err(NcclError::Shape {
                op: "all_to_all_v",
                why: format!("{} parts for {w} ranks", parts.len()),
            });
        }
        if let Some(HostBuf::Bf16(_)) = parts.first() {
            let typed = parts
                .into_iter()
                .map(|p| match p {
                    HostBuf::Bf16(v) => Ok(v.into_iter().map(half::bf16::from_bits).collect()),
                    HostBuf::F32(_) => Err(mixed("f32")),
                })
                .collect::<Result<Vec<Vec<half::bf16>>, _>>()?;
            let out = self.exchange(typed)?;
            Ok(out
                .into_iter()
                .map(|v| HostBuf::Bf16(v.into_iter().map(half::bf16::to_bits).collect()))
                .collect())
        } else {
            let typed = parts
                .into_iter()
                .map(|p| match p {
                    HostBuf::F32(v) => Ok(v),
                    HostBuf::Bf16(_) => Err(mixed("bf16")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(self
                .exchange(typed)?
                .into_iter()
                .map(HostBuf::F32)
                .collect())
        }
    }

    /// Exchange the counts, then the packed parts; split what arrived per sender.
    fn exchange<T: NcclType + DeviceRepr + ValidAsZeroBits + Copy>(
        &self,
        parts: Vec<Vec<T>>,
    ) -> Result<Vec<Vec<T>>, NcclError> {
        let op = "all_to_all_v";
        let stream = self.stream();
        let w = self.world();
        let send_counts: Vec<usize> = parts.iter().map(Vec::len).collect();
        let counts: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let dev_counts = stream.clone_htod(&counts).map_err(cuda(op))?;
        let mut got = self.zeros::<u64>(op, w)?;
        let ones = vec![1; w];
        self.all_to_all_v(&dev_counts, &ones, &mut got, &ones)?;
        let got = stream.clone_dtoh(&got).map_err(cuda(op))?;
        self.sync(op)?;
        let recv_counts: Vec<usize> = got.into_iter().map(|c| c as usize).collect();
        let packed: Vec<T> = parts.concat();
        let rt: usize = recv_counts.iter().sum();
        // Device buffers are never empty (a zero-byte allocation is an error); the counts say
        // how much of them is used.
        let send = if packed.is_empty() {
            self.zeros::<T>(op, 1)?
        } else {
            stream.clone_htod(&packed).map_err(cuda(op))?
        };
        let mut recv = self.zeros::<T>(op, rt.max(1))?;
        self.all_to_all_v(&send, &send_counts, &mut recv, &recv_counts)?;
        let all = stream.clone_dtoh(&recv).map_err(cuda(op))?;
        self.sync(op)?;
        let mut out = Vec::with_capacity(w);
        let mut off = 0;
        for c in recv_counts {
            out.push(all[off..off + c].to_vec());
            off += c;
        }
        Ok(out)
    }
}

fn mixed(got: &'static str) -> NcclError {
    NcclError::Shape {
        op: "all_to_all_v",
        why: format!("parts of mixed element types (a {got} part)"),
    }
}

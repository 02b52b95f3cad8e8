//! Tensors: a shape plus storage owned by one device (host floats, or shape only on the simulator).
//!
//! A [`Tensor`] is always contiguous and row-major. Kernels read it as a matrix of
//! `rows() x cols()`, where `cols()` is the last dimension and `rows()` the product of the others.
//! Layer code never looks inside the storage: it hands tensors to a [`crate::device::Device`], and
//! only device implementations (and the HF edge, the tests) read values.

use std::fmt;
use std::sync::Arc;

use crate::device::pool::BufferPool;

/// Host values, optionally owned by a device's [`BufferPool`] (returned there when dropped).
pub(crate) struct HostBuf {
    data: Vec<f32>,
    pool: Option<Arc<BufferPool>>,
}

impl Clone for HostBuf {
    fn clone(&self) -> HostBuf {
        let mut data = match &self.pool {
            Some(p) => p.take(self.data.len()),
            None => vec![0.0; self.data.len()],
        };
        data.copy_from_slice(&self.data);
        HostBuf {
            data,
            pool: self.pool.clone(),
        }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        if let Some(p) = &self.pool {
            p.put(std::mem::take(&mut self.data));
        }
    }
}

/// Where a tensor's values live.
#[derive(Clone)]
pub(crate) enum Storage {
    /// f32 values in host memory (the CPU device).
    Host(HostBuf),
    /// No values at all: the simulated device tracks shapes and costs only.
    ShapeOnly,
    /// f32 values in GPU memory (the CUDA device, feature `cuda`). Layer code does not change
    /// because it never matches on `Storage`.
    #[cfg(feature = "cuda")]
    Cuda(Box<cudarc::driver::CudaSlice<f32>>),
}

/// A contiguous, row-major f32 tensor on some device.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    pub(crate) storage: Storage,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.storage {
            Storage::Host(_) => "host",
            Storage::ShapeOnly => "shape-only",
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => "cuda",
        };
        write!(f, "Tensor({:?}, {kind})", self.shape)
    }
}

impl Tensor {
    /// A host tensor holding `data` (panics if `data.len()` is not the product of `shape`).
    pub fn from_host(shape: &[usize], data: Vec<f32>) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(
            n,
            data.len(),
            "Tensor::from_host: shape {shape:?} needs {n} values, got {}",
            data.len()
        );
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Host(HostBuf { data, pool: None }),
        }
    }

    /// A host tensor whose buffer returns to `pool` when dropped.
    pub(crate) fn from_pool(shape: &[usize], data: Vec<f32>, pool: &Arc<BufferPool>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Host(HostBuf {
                data,
                pool: Some(pool.clone()),
            }),
        }
    }

    /// A tensor that has a shape and no values (the simulated device's tensors).
    pub fn shape_only(shape: &[usize]) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::ShapeOnly,
        }
    }

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the last dimension (1 for a scalar).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Product of all dimensions but the last.
    pub fn rows(&self) -> usize {
        let c = self.cols();
        self.numel().checked_div(c).unwrap_or(0)
    }

    /// The same values under another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(n, self.numel(), "reshape {:?} -> {shape:?}", self.shape);
        self.shape = shape.to_vec();
        self
    }

    /// True when the tensor carries no values (simulated device).
    pub fn is_shape_only(&self) -> bool {
        matches!(self.storage, Storage::ShapeOnly)
    }

    /// The values, when they live in host memory.
    pub fn host(&self) -> Option<&[f32]> {
        match &self.storage {
            Storage::Host(v) => Some(&v.data),
            _ => None,
        }
    }

    /// The values, mutably, when they live in host memory.
    pub fn host_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.storage {
            Storage::Host(v) => Some(&mut v.data),
            _ => None,
        }
    }

    /// The host values, moved out of the tensor (`None` for a shape-only tensor).
    pub fn into_host(mut self) -> Option<Vec<f32>> {
        match &mut self.storage {
            Storage::Host(v) => Some(std::mem::take(&mut v.data)),
            _ => None,
        }
    }

    /// A tensor whose values live in GPU memory (the CUDA device's tensors).
    #[cfg(feature = "cuda")]
    pub(crate) fn from_cuda(shape: &[usize], data: cudarc::driver::CudaSlice<f32>) -> Tensor {
        // An empty tensor holds one unused value (see the CUDA device's `alloc`).
        debug_assert_eq!(shape.iter().product::<usize>().max(1), data.len());
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cuda(Box::new(data)),
        }
    }

    /// The GPU values, when the tensor is the CUDA device's.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Option<&cudarc::driver::CudaSlice<f32>> {
        match &self.storage {
            Storage::Cuda(s) => Some(s),
            _ => None,
        }
    }

    /// Exchange this tensor's host values with `values` (which must be as long): how an
    /// out-of-place update installs its result without a copy. Returns false, changing
    /// nothing, when the tensor holds no host values or the lengths differ.
    pub fn swap_host(&mut self, values: &mut Vec<f32>) -> bool {
        match &mut self.storage {
            Storage::Host(v) if v.data.len() == values.len() => {
                std::mem::swap(&mut v.data, values);
                true
            }
            _ => false,
        }
    }

    /// Host values for a device kernel; a tensor from another device here is a programming error.
    pub(crate) fn h(&self) -> &[f32] {
        self.host()
            .expect("CPU kernel given a tensor that is not in host memory")
    }

    /// Mutable host values for a device kernel (see [`Tensor::h`]).
    pub(crate) fn hm(&mut self) -> &mut [f32] {
        self.host_mut()
            .expect("CPU kernel given a tensor that is not in host memory")
    }
}

//! Tensors: a shape plus storage owned by one device (host floats, or shape only on the simulator).
//!
//! A [`Tensor`] is always contiguous and row-major. Kernels read it as a matrix of
//! `rows() x cols()`, where `cols()` is the last dimension and `rows()` the product of the others.
//! Layer code never looks inside the storage: it hands tensors to a [`crate::device::Device`], and
//! only device implementations (and the HF edge, the tests) read values.

use std::fmt;

/// Where a tensor's values live.
#[derive(Clone)]
pub(crate) enum Storage {
    /// f32 values in host memory (the CPU device).
    Host(Vec<f32>),
    /// No values at all: the simulated device tracks shapes and costs only.
    ShapeOnly,
    // A CUDA device adds `Cuda(cudarc::driver::CudaSlice<f32>)` here behind the `cuda` feature;
    // layer code does not change because it never matches on `Storage`.
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
        };
        write!(f, "Tensor({:?}, {kind})", self.shape)
    }
}

impl Tensor {
    /// A host tensor holding `data` (panics if `data.len()` is not the product of `shape`).
    pub fn from_host(shape: &[usize], data: Vec<f32>) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(n, data.len(), "Tensor::from_host: shape {shape:?} needs {n} values, got {}", data.len());
        Tensor { shape: shape.to_vec(), storage: Storage::Host(data) }
    }

    /// A tensor that has a shape and no values (the simulated device's tensors).
    pub fn shape_only(shape: &[usize]) -> Tensor {
        Tensor { shape: shape.to_vec(), storage: Storage::ShapeOnly }
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
        if c == 0 { 0 } else { self.numel() / c }
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
            Storage::Host(v) => Some(v),
            Storage::ShapeOnly => None,
        }
    }

    /// The values, mutably, when they live in host memory.
    pub fn host_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.storage {
            Storage::Host(v) => Some(v),
            Storage::ShapeOnly => None,
        }
    }

    /// Host values for a device kernel; a tensor from another device here is a programming error.
    pub(crate) fn h(&self) -> &[f32] {
        self.host().expect("CPU kernel given a tensor that is not in host memory")
    }

    /// Mutable host values for a device kernel (see [`Tensor::h`]).
    pub(crate) fn hm(&mut self) -> &mut [f32] {
        self.host_mut().expect("CPU kernel given a tensor that is not in host memory")
    }
}

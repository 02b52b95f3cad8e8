//! The driver's stream-ordered memory pool of a GPU: kept cached across steps (the caching
//! allocator) and asked for its peak.

use std::sync::Arc;

use cudarc::driver::CudaContext;

use super::{CudaError, device_count};

/// Peak bytes held by GPU `ordinal`'s default memory pool, which every [`super::CudaDevice`] of this
/// process on that GPU allocates from (`None` without a GPU).
pub fn pool_peak_bytes(ordinal: usize) -> Option<u64> {
    if device_count() <= ordinal {
        return None;
    }
    let ctx = CudaContext::new(ordinal).ok()?;
    pool_attr(
        &ctx,
        cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
    )
    .ok()
}

/// Starts [`pool_peak_bytes`] afresh from what the pool holds now.
pub fn reset_pool_peak(ordinal: usize) {
    if device_count() <= ordinal {
        return;
    }
    if let Ok(ctx) = CudaContext::new(ordinal) {
        let _ = set_pool_attr(
            &ctx,
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
        );
    }
}

/// Keeps freed blocks in the device's default memory pool instead of returning them to the
/// driver at every synchronisation: a release threshold of "everything".
pub(super) fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<(), CudaError> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    set_pool_attr(
        ctx,
        cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        u64::MAX,
    )
}

fn default_pool(ctx: &Arc<CudaContext>) -> Result<cudarc::driver::sys::CUmemoryPool, CudaError> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a valid device handle and an out-pointer to a local.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(CudaError::driver("memory pool"))?;
    Ok(pool)
}

fn set_pool_attr(
    ctx: &Arc<CudaContext>,
    attr: cudarc::driver::sys::CUmemPool_attribute,
    value: u64,
) -> Result<(), CudaError> {
    let pool = default_pool(ctx)?;
    let mut v = value;
    // SAFETY: both attributes used here take a cuuint64_t.
    unsafe { cudarc::driver::sys::cuMemPoolSetAttribute(pool, attr, (&mut v as *mut u64).cast()) }
        .result()
        .map_err(CudaError::driver("memory pool attribute"))
}

fn pool_attr(
    ctx: &Arc<CudaContext>,
    attr: cudarc::driver::sys::CUmemPool_attribute,
) -> Result<u64, CudaError> {
    let pool = default_pool(ctx)?;
    let mut v = 0u64;
    // SAFETY: as in `set_pool_attr`.
    unsafe { cudarc::driver::sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) }
        .result()
        .map_err(CudaError::driver("memory pool attribute"))?;
    Ok(v)
}

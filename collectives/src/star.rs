//! Star algorithms for ranks that share one process: every rank moves its whole buffer to group
//! rank 0 (the in-process fabric moves it, no copy), rank 0 reduces all the buffers in place
//! block by block on several threads (`kernels.rs`), and moves each buffer back.
//!
//! An all-reduce then reads every buffer once and writes every buffer once, the least memory
//! traffic an all-reduce of separate buffers can have (a ring reads and writes each chunk about
//! 2.4 times as often for 4 ranks), and a reduce-scatter reads every chunk once and writes only
//! the owner's. Over a network fabric the star would put 2(n−1) buffers on rank 0's link, so
//! [`crate::Communicator::pick`] uses it only when [`crate::CommConfig::in_process`] says the
//! fabric moves buffers without copying.
//!
//! Failures: rank 0 receives the buffers in rank order with the communicator's deadline, so a
//! dead or silent rank is named by rank 0, which aborts the operation for everyone; a dead rank 0
//! is named by every rank waiting for its buffer back.

use crate::ReduceOp;
use crate::elem::Elem;
use crate::error::CommError;
use crate::kernels::{fused, scattered};
use crate::op::Op;

/// Below this many elements in all, rank 0 reduces inline on its task instead of on a blocking
/// thread.
const INLINE_ELEMS: usize = 1 << 16;

/// Rank 0: receive every rank's buffer (all `total` long), in rank order after its own.
async fn gather<T: Elem>(ctx: &Op, mine: Vec<T>, total: usize) -> Result<Vec<Vec<T>>, CommError> {
    let mut bufs = Vec::with_capacity(ctx.size());
    bufs.push(mine);
    for p in 1..ctx.size() {
        let got = ctx.recv(p, 0, Some(total)).await?;
        ctx.check_len(p, &got, total)?;
        bufs.push(got);
    }
    Ok(bufs)
}

/// Rank 0: run `kernel` over every buffer, on blocking threads when the buffers are large
/// (shape-only buffers have nothing to reduce).
async fn reduce<T: Elem>(
    ctx: &Op,
    mut bufs: Vec<Vec<T>>,
    kernel: fn(&mut [Vec<T>], ReduceOp, usize, usize),
    op: ReduceOp,
) -> Result<Vec<Vec<T>>, CommError> {
    let n = ctx.size();
    if !T::HAS_VALUES {
        return Ok(bufs);
    }
    if bufs.iter().map(Vec::len).sum::<usize>() < INLINE_ELEMS {
        kernel(&mut bufs, op, n, 1);
        return Ok(bufs);
    }
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    tokio::task::spawn_blocking(move || {
        kernel(&mut bufs, op, n, threads);
        bufs
    })
    .await
    .map_err(|_| CommError::Aborted {
        op: ctx.name,
        by: ctx.global(0),
        culprit: None,
        reason: "the star reduction panicked".into(),
    })
}

/// Rank 0: move buffer i back to rank i; returns rank 0's own.
async fn scatter<T: Elem>(ctx: &Op, bufs: Vec<Vec<T>>, total: usize) -> Result<Vec<T>, CommError> {
    let mut it = bufs.into_iter();
    let mine = it.next().unwrap_or_default();
    for (p, b) in (1..ctx.size()).zip(it) {
        ctx.send(p, 0, b, total).await?;
    }
    Ok(mine)
}

/// Ranks other than 0: hand `buf` to rank 0 and take it back reduced.
async fn round_trip<T: Elem>(ctx: &Op, buf: Vec<T>) -> Result<Vec<T>, CommError> {
    let total = buf.len();
    ctx.send(0, 0, buf, total).await?;
    let got = ctx.recv(0, 0, Some(total)).await?;
    ctx.check_len(0, &got, total)?;
    Ok(got)
}

/// Star all-reduce of `buf` over the group.
pub(crate) async fn all_reduce<T: Elem>(
    ctx: &Op,
    mut buf: Vec<T>,
    op: ReduceOp,
) -> Result<Vec<T>, CommError> {
    let (n, total) = (ctx.size(), buf.len());
    if n == 1 {
        T::finish(op, &mut buf, 1);
        return Ok(buf);
    }
    if ctx.me() != 0 {
        return round_trip(ctx, buf).await;
    }
    let bufs = gather(ctx, buf, total).await?;
    let bufs = reduce(ctx, bufs, fused, op).await?;
    scatter(ctx, bufs, total).await
}

/// Star reduce-scatter of `buf` (length a multiple of the group size, checked by the caller):
/// returns this rank's reduced chunk, in `buf`'s own allocation.
pub(crate) async fn reduce_scatter<T: Elem>(
    ctx: &Op,
    buf: Vec<T>,
    op: ReduceOp,
) -> Result<Vec<T>, CommError> {
    let (n, me, total) = (ctx.size(), ctx.me(), buf.len());
    let mut mine = if me != 0 {
        round_trip(ctx, buf).await?
    } else {
        let bufs = gather(ctx, buf, total).await?;
        let bufs = reduce(ctx, bufs, scattered, op).await?;
        scatter(ctx, bufs, total).await?
    };
    let c = total / n;
    mine.copy_within(me * c..(me + 1) * c, 0);
    mine.truncate(c);
    Ok(mine)
}

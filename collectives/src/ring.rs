//! Ring algorithms: reduce-scatter, all-gather, and all-reduce as the two in sequence.
//!
//! The buffer is cut into n chunks (the first `len % n` one element longer, so any length
//! works). In the reduce-scatter, at step s rank i sends chunk i−s−1 to its right neighbour and
//! folds the chunk i−s−2 arriving from its left into its own copy; the folded chunk is what it
//! sends at the next step, so the received buffer itself moves on (no copy). After n−1 steps
//! rank i holds the reduced chunk i. The all-gather then passes the reduced chunks around the
//! ring for n−1 more steps. Each step sends and receives concurrently.

use std::ops::Range;

use crate::ReduceOp;
use crate::elem::Elem;
use crate::error::CommError;
use crate::op::Op;

/// Chunk `i` of `n` over `len` elements: sizes differ by at most one, larger chunks first.
pub fn chunk_range(len: usize, n: usize, i: usize) -> Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// One ring step: send `out` right, receive from the left (sender's total must be `total`).
async fn step<T: Elem>(ctx: &Op, out: Vec<T>, total: usize) -> Result<Vec<T>, CommError> {
    let n = ctx.size();
    let right = (ctx.me() + 1) % n;
    let left = (ctx.me() + n - 1) % n;
    // The first failure ends the step at once (a dead right neighbour fails the send).
    let ((), got) = tokio::try_join!(
        ctx.send(right, 0, out, total),
        ctx.recv(left, 0, Some(total))
    )?;
    Ok(got)
}

/// Reduce-scatter `buf` around the ring (`buf` itself is left as it is); returns rank i's
/// reduced chunk i, not yet finished (`Avg` still needs its division). The first chunk sent is
/// the only copy (into a pooled buffer); every received chunk has the local one folded into it
/// and moves on as it is.
async fn reduce_scatter_core<T: Elem>(
    ctx: &Op,
    buf: &[T],
    op: ReduceOp,
) -> Result<Vec<T>, CommError> {
    let (n, me, len) = (ctx.size(), ctx.me(), buf.len());
    let left = (me + n - 1) % n;
    let first = &buf[chunk_range(len, n, (me + n - 1) % n)];
    let mut out = ctx.take(chunk_range(len, n, 0).len());
    out.extend_from_slice(first);
    for s in 0..n - 1 {
        let c = (me + 2 * n - s - 2) % n;
        let mut got = step(ctx, out, len).await?;
        let r = chunk_range(len, n, c);
        ctx.check_len(left, &got, r.len())?;
        T::combine(op, &mut got, &buf[r]);
        out = got;
    }
    Ok(out)
}

/// All-gather around the ring: `buf` holds this rank's chunk `me` (per `range`), `mine` is a
/// copy of it; fills in every other chunk, each received chunk copied into place and moved on.
/// The last chunk received goes to the pool. `total` is what frames carry.
async fn all_gather_core<T: Elem>(
    ctx: &Op,
    buf: &mut [T],
    mine: Vec<T>,
    total: usize,
    range: impl Fn(usize) -> Range<usize>,
) -> Result<(), CommError> {
    let (n, me) = (ctx.size(), ctx.me());
    let left = (me + n - 1) % n;
    let mut out = mine;
    for s in 0..n - 1 {
        let c = (me + 2 * n - s - 1) % n;
        let got = step(ctx, out, total).await?;
        let r = range(c);
        ctx.check_len(left, &got, r.len())?;
        buf[r].copy_from_slice(&got);
        out = got;
    }
    ctx.give(out);
    Ok(())
}

/// Ring all-reduce of `buf` over the group.
pub(crate) async fn all_reduce<T: Elem>(
    ctx: &Op,
    mut buf: Vec<T>,
    op: ReduceOp,
) -> Result<Vec<T>, CommError> {
    let (n, me, len) = (ctx.size(), ctx.me(), buf.len());
    if n == 1 {
        T::finish(op, &mut buf, 1);
        return Ok(buf);
    }
    let mut mine = reduce_scatter_core(ctx, &buf, op).await?;
    T::finish(op, &mut mine, n);
    buf[chunk_range(len, n, me)].copy_from_slice(&mine);
    all_gather_core(ctx, &mut buf, mine, len, |c| chunk_range(len, n, c)).await?;
    Ok(buf)
}

/// Check that `len` splits into `n` equal chunks.
pub(crate) fn check_divisible(ctx: &Op, len: usize) -> Result<(), CommError> {
    let n = ctx.size();
    if len.is_multiple_of(n) {
        Ok(())
    } else {
        Err(ctx.invalid(format!(
            "a buffer of {len} elements does not split into {n} equal chunks"
        )))
    }
}

/// Reduce `buf` (length a multiple of the group size) and return this rank's chunk.
pub(crate) async fn reduce_scatter<T: Elem>(
    ctx: &Op,
    mut buf: Vec<T>,
    op: ReduceOp,
) -> Result<Vec<T>, CommError> {
    let n = ctx.size();
    check_divisible(ctx, buf.len())?;
    if n == 1 {
        T::finish(op, &mut buf, 1);
        return Ok(buf);
    }
    let mut mine = reduce_scatter_core(ctx, &buf, op).await?;
    T::finish(op, &mut mine, n);
    Ok(mine)
}

/// Concatenate every rank's `chunk` in group order into `out` (its allocation reused; `None`:
/// a spare or new one); all chunks must have one length.
pub(crate) async fn all_gather<T: Elem>(
    ctx: &Op,
    chunk: Vec<T>,
    out: Option<Vec<T>>,
) -> Result<Vec<T>, CommError> {
    let (n, me, c) = (ctx.size(), ctx.me(), chunk.len());
    if n == 1 {
        return Ok(chunk);
    }
    let mut buf: Vec<T> = out.unwrap_or_else(|| ctx.take(n * c));
    T::resize(&mut buf, n * c);
    buf[me * c..(me + 1) * c].copy_from_slice(&chunk);
    all_gather_core(ctx, &mut buf, chunk, c, |i| i * c..(i + 1) * c).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::chunk_range;

    #[test]
    fn chunks_cover_the_buffer_in_order() {
        for len in 0..40 {
            for n in 1..10 {
                let mut next = 0;
                for i in 0..n {
                    let r = chunk_range(len, n, i);
                    assert_eq!(r.start, next, "len {len} n {n} i {i}");
                    assert!(r.len() == len / n || r.len() == len / n + 1);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}

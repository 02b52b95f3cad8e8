//! Tree algorithms: double binary tree all-reduce, binary tree broadcast, and the barrier.
//!
//! Tree A is NCCL's binary tree over ranks `0..n` (a rank's parent flips its lowest set bit and
//! sets the next one). Tree B is tree A mirrored (`r → n−1−r`) when n is even and shifted by
//! one when n is odd, so that most ranks that are interior in one tree are leaves in the other.
//! The all-reduce sends the first half of the buffer up and back down tree A and the second
//! half through tree B at the same time (lanes 0 and 1): each half is reduced toward the root,
//! which finishes it, then broadcast back down. The reduction moves the accumulator to the
//! parent (no copy); only the fan-out to children copies.

use crate::ReduceOp;
use crate::elem::Elem;
use crate::error::CommError;
use crate::op::Op;

/// Which of the two trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    A,
    B,
}

/// Parent of rank `r` in tree A over `n` ranks (rank 0 is the root).
fn parent_a(n: usize, r: usize) -> Option<usize> {
    if r == 0 {
        return None;
    }
    let bit = r & r.wrapping_neg();
    let up = (r ^ bit) | (bit << 1);
    Some(if up >= n { r ^ bit } else { up })
}

/// Parent of rank `r` in tree `which` over `n` ranks.
pub fn parent(n: usize, r: usize, which: Which) -> Option<usize> {
    match which {
        Which::A => parent_a(n, r),
        Which::B if n.is_multiple_of(2) => parent_a(n, n - 1 - r).map(|p| n - 1 - p),
        Which::B => parent_a(n, (r + n - 1) % n).map(|p| (p + 1) % n),
    }
}

/// Children of rank `r` in tree `which` over `n` ranks, in rank order.
pub fn children(n: usize, r: usize, which: Which) -> Vec<usize> {
    (0..n).filter(|&c| parent(n, c, which) == Some(r)).collect()
}

/// Reduce `acc` up a tree to its root, finish it there, and broadcast the result back down.
/// `up` is this rank's parent and `down` its children (group indices).
async fn reduce_and_broadcast<T: Elem>(
    ctx: &Op,
    lane: u8,
    mut acc: Vec<T>,
    total: usize,
    up: Option<usize>,
    down: &[usize],
    op: ReduceOp,
) -> Result<Vec<T>, CommError> {
    for &c in down {
        let got: Vec<T> = ctx.recv(c, lane, Some(total)).await?;
        ctx.check_len(c, &got, acc.len())?;
        T::combine(op, &mut acc, &got);
        ctx.give(got);
    }
    let len = acc.len();
    let result = match up {
        Some(p) => {
            ctx.send(p, lane, acc, total).await?;
            let got = ctx.recv(p, lane, Some(total)).await?;
            ctx.check_len(p, &got, len)?;
            got
        }
        None => {
            T::finish(op, &mut acc, ctx.size());
            acc
        }
    };
    for &c in down {
        ctx.send(c, lane, ctx.copy(&result), total).await?;
    }
    Ok(result)
}

/// Double binary tree all-reduce.
pub(crate) async fn all_reduce<T: Elem>(
    ctx: &Op,
    mut buf: Vec<T>,
    op: ReduceOp,
) -> Result<Vec<T>, CommError> {
    let (n, me, total) = (ctx.size(), ctx.me(), buf.len());
    if n == 1 {
        T::finish(op, &mut buf, 1);
        return Ok(buf);
    }
    let second = buf.split_off(total.div_ceil(2));
    let (ca, cb) = (children(n, me, Which::A), children(n, me, Which::B));
    let (mut a, b) = tokio::try_join!(
        reduce_and_broadcast(ctx, 0, buf, total, parent(n, me, Which::A), &ca, op),
        reduce_and_broadcast(ctx, 1, second, total, parent(n, me, Which::B), &cb, op),
    )?;
    a.extend_from_slice(&b);
    Ok(a)
}

/// Broadcast group rank `root`'s buffer down tree A relabelled so that `root` is its root.
pub(crate) async fn broadcast<T: Elem>(
    ctx: &Op,
    buf: Vec<T>,
    root: usize,
) -> Result<Vec<T>, CommError> {
    let (n, me, total) = (ctx.size(), ctx.me(), buf.len());
    let rel = (me + n - root) % n;
    let abs = |r: usize| (r + root) % n;
    let result = match parent(n, rel, Which::A) {
        Some(p) => {
            let got = ctx.recv(abs(p), 0, Some(total)).await?;
            ctx.check_len(abs(p), &got, total)?;
            got
        }
        None => buf,
    };
    for c in children(n, rel, Which::A) {
        ctx.send(abs(c), 0, ctx.copy(&result), total).await?;
    }
    Ok(result)
}

/// Barrier: an empty reduction up tree A and the release back down.
pub(crate) async fn barrier(ctx: &Op) -> Result<(), CommError> {
    let (n, me) = (ctx.size(), ctx.me());
    let down = children(n, me, Which::A);
    reduce_and_broadcast::<f32>(
        ctx,
        0,
        Vec::new(),
        0,
        parent(n, me, Which::A),
        &down,
        ReduceOp::Sum,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(n: usize, mut r: usize, which: Which) -> usize {
        let mut d = 0;
        while let Some(p) = parent(n, r, which) {
            r = p;
            d += 1;
            assert!(d <= n, "cycle in tree {which:?} of {n}");
        }
        d
    }

    #[test]
    fn both_trees_span_the_group_with_at_most_two_children() {
        for n in 1..=64 {
            for which in [Which::A, Which::B] {
                let roots: Vec<_> = (0..n).filter(|&r| parent(n, r, which).is_none()).collect();
                assert_eq!(roots.len(), 1, "n {n} {which:?}");
                let max_depth = (0..n).map(|r| depth(n, r, which)).max().unwrap_or(0);
                assert!(max_depth <= 2 * (usize::BITS - n.leading_zeros()) as usize);
                for r in 0..n {
                    assert!(children(n, r, which).len() <= 2, "n {n} r {r} {which:?}");
                }
            }
        }
    }

    #[test]
    fn ranks_are_interior_in_at_most_one_tree_when_even() {
        for n in (2..=64).step_by(2) {
            let both = (0..n)
                .filter(|&r| {
                    !children(n, r, Which::A).is_empty() && !children(n, r, Which::B).is_empty()
                })
                .count();
            assert_eq!(both, 0, "n {n}");
        }
    }
}

//! Reduction kernels over buffers held in this process, shared by HFReduce's host stage and the
//! star algorithms: plain element-wise loops over cache-sized blocks (which LLVM vectorises),
//! the work split over a few crossbeam scoped threads.

use crate::ReduceOp;
use crate::elem::Elem;

/// Elements per cache block of the reduction kernels (16 KiB of f32).
const BLOCK: usize = 4096;
/// Fewest elements worth a thread of their own.
const MIN_PER_THREAD: usize = 1 << 16;

/// Run `f` on every item, the items spread over at most `threads` crossbeam scoped threads (the
/// calling thread takes the first share).
pub(crate) fn run_parallel<T: Send>(items: Vec<T>, threads: usize, f: impl Fn(T) + Sync) {
    let t = threads.clamp(1, items.len().max(1));
    if t == 1 {
        items.into_iter().for_each(f);
        return;
    }
    let mut shares: Vec<Vec<T>> = (0..t).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        shares[i % t].push(item);
    }
    let f = &f;
    let r = crossbeam::thread::scope(|s| {
        let mut it = shares.into_iter();
        let first = it.next();
        for share in it {
            s.spawn(move |_| share.into_iter().for_each(f));
        }
        first.into_iter().flatten().for_each(f);
    });
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
}

/// How many threads `len` elements are worth.
pub(crate) fn threads_for(len: usize, threads: usize) -> usize {
    threads.min(len.div_ceil(MIN_PER_THREAD)).max(1)
}

/// The all-reduce of equally long buffers held here: every block of every buffer is read once
/// and written once (the least memory traffic an all-reduce of separate buffers can have).
pub(crate) fn fused<T: Elem>(bufs: &mut [Vec<T>], op: ReduceOp, world: usize, threads: usize) {
    let len = bufs.first().map_or(0, Vec::len);
    let t = threads_for(len, threads);
    let per = len.div_ceil(t).max(1);
    let mut shares: Vec<Vec<&mut [T]>> = (0..t).map(|_| Vec::new()).collect();
    for b in bufs.iter_mut() {
        for (share, part) in shares.iter_mut().zip(b.chunks_mut(per)) {
            share.push(part);
        }
    }
    run_parallel(shares, t, |mut share| fused_part(&mut share, op, world));
}

/// Reduce the equally long `parts` block by block and write the result into all of them.
fn fused_part<T: Elem>(parts: &mut [&mut [T]], op: ReduceOp, world: usize) {
    let Some((first, rest)) = parts.split_first_mut() else {
        return;
    };
    let n = first.len();
    let mut off = 0;
    while off < n {
        let end = (off + BLOCK).min(n);
        let acc = &mut first[off..end];
        for r in rest.iter() {
            T::combine(op, acc, &r[off..end]);
        }
        T::finish(op, acc, world);
        for r in rest.iter_mut() {
            r[off..end].copy_from_slice(acc);
        }
        off = end;
    }
}

/// The sum (or max) of the equally long `parts`, in a new buffer with room for a frame trailer.
pub(crate) fn reduce_chunk<T: Elem>(parts: &[&mut [T]], op: ReduceOp, threads: usize) -> Vec<T> {
    let n = parts.first().map_or(0, |p| p.len());
    let mut out = Vec::with_capacity(n + T::TRAILER);
    out.resize(n, T::default());
    let t = threads_for(n, threads);
    let per = n.div_ceil(t).max(1);
    let shares: Vec<(usize, &mut [T])> = out
        .chunks_mut(per)
        .enumerate()
        .map(|(i, s)| (i * per, s))
        .collect();
    run_parallel(shares, t, |(lo, dst)| {
        let mut off = 0;
        while off < dst.len() {
            let end = (off + BLOCK).min(dst.len());
            let acc = &mut dst[off..end];
            let range = lo + off..lo + end;
            if let Some((first, rest)) = parts.split_first() {
                acc.copy_from_slice(&first[range.clone()]);
                for r in rest {
                    T::combine(op, acc, &r[range.clone()]);
                }
            }
            off = end;
        }
    });
    out
}

/// The reduce-scatter of equally long buffers held here (`bufs[i]` is group rank i's, its
/// length a multiple of the group size): chunk i of the result is written into chunk i of
/// `bufs[i]` only, reading chunk i of every buffer once. Blocks of all chunks are spread over
/// the threads.
pub(crate) fn scattered<T: Elem>(bufs: &mut [Vec<T>], op: ReduceOp, world: usize, threads: usize) {
    let n = bufs.len();
    let c = bufs.first().map_or(0, Vec::len) / n.max(1);
    // One work item per (block of chunk i): the owner's block and the others' same block.
    let mut items: Vec<(&mut [T], Vec<&[T]>)> = Vec::new();
    let mut owned: Vec<Option<&mut [T]>> = Vec::with_capacity(n);
    let mut others: Vec<Vec<&[T]>> = (0..n).map(|_| Vec::new()).collect();
    for (j, b) in bufs.iter_mut().enumerate() {
        for (i, chunk) in b.chunks_mut(c.max(1)).take(n).enumerate() {
            if i == j {
                owned.push(Some(chunk));
            } else {
                others[i].push(chunk);
            }
        }
    }
    for (i, mine) in owned.into_iter().enumerate() {
        let Some(mine) = mine else { continue };
        let theirs = std::mem::take(&mut others[i]);
        for (k, block) in mine.chunks_mut(BLOCK * 16).enumerate() {
            let lo = k * BLOCK * 16;
            let parts = theirs.iter().map(|t| &t[lo..lo + block.len()]).collect();
            items.push((block, parts));
        }
    }
    let t = threads_for(c * n, threads);
    run_parallel(items, t, |(acc, parts)| {
        let mut off = 0;
        while off < acc.len() {
            let end = (off + BLOCK).min(acc.len());
            for p in &parts {
                T::combine(op, &mut acc[off..end], &p[off..end]);
            }
            T::finish(op, &mut acc[off..end], world);
            off = end;
        }
    });
}

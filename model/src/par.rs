//! Dealing element-wise work out to threads: pieces are grouped into contiguous runs of about
//! equal size, one per thread (the calling thread takes the first), on scoped threads. Used by
//! the optimizer's update, gradient clipping and the checkpoint's snapshot copy; results never
//! depend on the split because each piece is independent.

/// Run `work` on every piece, spread over up to `threads` threads by `len` (elements per
/// piece); when there is less than `min_total` in all, everything runs here.
pub fn run_pieces<T: Send>(
    pieces: Vec<T>,
    threads: usize,
    min_total: usize,
    len: impl Fn(&T) -> usize,
    work: impl Fn(T) + Sync,
) {
    let total: usize = pieces.iter().map(&len).sum();
    let threads = threads.min(pieces.len()).max(1);
    if threads == 1 || total < min_total {
        pieces.into_iter().for_each(work);
        return;
    }
    let share = total.div_ceil(threads);
    let mut groups: Vec<Vec<T>> = (0..threads).map(|_| Vec::new()).collect();
    let (mut g, mut filled) = (0, 0);
    for p in pieces {
        if filled >= share && g + 1 < threads {
            g += 1;
            filled = 0;
        }
        filled += len(&p);
        groups[g].push(p);
    }
    let work = &work;
    std::thread::scope(|sc| {
        let mut groups = groups.into_iter();
        let mine = groups.next();
        for group in groups {
            sc.spawn(move || group.into_iter().for_each(work));
        }
        mine.into_iter().flatten().for_each(work);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_piece_runs_once_whatever_the_threads() {
        for threads in [1, 2, 3, 8] {
            let mut data: Vec<Vec<u32>> = (0..10).map(|i| vec![i; 100 + i as usize]).collect();
            let pieces: Vec<&mut Vec<u32>> = data.iter_mut().collect();
            run_pieces(
                pieces,
                threads,
                0,
                |v| v.len(),
                |v| v.iter_mut().for_each(|x| *x += 1),
            );
            for (i, v) in data.iter().enumerate() {
                assert!(v.iter().all(|&x| x == i as u32 + 1), "threads {threads}");
            }
        }
    }
}

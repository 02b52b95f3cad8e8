//! DualPipeV, DualPipe "cut in half" (the V-shape): one copy of the parameters cut into `2·pp`
//! stages; rank `r` holds stage `r` (the way down, phase 0) and stage `2·pp−1−r` (the way back,
//! phase 1), so every micro-batch enters and leaves at rank 0 and the last rank turns it round.
//!
//! The list is DualPipe's eight steps (see `dualpipe.rs`) for rank `r` of `n = pp` ranks with
//! all `chunks` micro-batches in each phase; the rank where the phases meet (DualPipe's middle
//! ranks) is the last one.

use super::Action;
use super::dualpipe::bidirectional;

/// Rank `r` holds stages `r` and `2·pp−1−r`.
pub(super) fn build(pp: usize, chunks: usize) -> Vec<Vec<Action>> {
    (0..pp)
        .map(|r| {
            bidirectional(pp, r, chunks, |phase, k| {
                (k, if phase == 0 { r } else { 2 * pp - 1 - r })
            })
        })
        .collect()
}

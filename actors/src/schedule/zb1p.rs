//! ZB1P, the zero-bubble schedule ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): the
//! 1F1B order of forwards and backwards-for-input, with each rank's backward-for-weights `W`
//! split off and delayed. Rank `r` delays its `W`s by `r` backwards, so the last rank, which
//! would otherwise wait for nothing, runs `B`s early and the earlier ranks receive their
//! gradients sooner; the delayed `W`s fill the drain. In-flight micro-batches stay at most `pp`
//! per rank (`pp−r` forwards awaiting `B`, plus `r` awaiting `W`), as in 1F1B.

use super::Action;
use super::one_f_one_b::rank_actions;

/// Rank `r` holds stage `r`.
pub(super) fn build(pp: usize, chunks: usize) -> Vec<Vec<Action>> {
    (0..pp)
        .map(|r| rank_actions(pp, chunks, r, Some(r)))
        .collect()
}

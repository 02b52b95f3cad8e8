//! GPipe: every rank runs all its forwards, then all its full backwards (`B` then `W` of the
//! same micro-batch, back to back), in micro-batch order. Peak activations: every micro-batch.

use super::Action;

/// Rank `r` holds stage `r`.
pub(super) fn build(pp: usize, chunks: usize) -> Vec<Vec<Action>> {
    (0..pp)
        .map(|stage| {
            let mut acts = Vec::with_capacity(3 * chunks);
            acts.extend((0..chunks).map(|chunk| Action::F { chunk, stage }));
            for chunk in 0..chunks {
                acts.push(Action::BW { chunk, stage });
            }
            acts
        })
        .collect()
}

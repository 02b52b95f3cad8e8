//! 1F1B (PipeDream-flush): rank `r` runs `pp−1−r` warm-up forwards, then alternates one forward
//! with one full backward, then drains the remaining backwards. Each full backward is one `BW`
//! action (the report's "B"): the input gradient is sent only when the weight gradient is done.
//!
//! The same skeleton with the backward split into `B` and a delayed `W` is ZB-H1 (see
//! `zb1p.rs`), hence [`rank_actions`]'s `w_lag`.

use super::Action;

/// Rank `r` holds stage `r`.
pub(super) fn build(pp: usize, chunks: usize) -> Vec<Vec<Action>> {
    (0..pp).map(|r| rank_actions(pp, chunks, r, None)).collect()
}

/// Rank `stage`'s list in 1F1B order. With `w_lag = None` each backward is a `BW`; with
/// `Some(lag)` it is a `B`, the `W` of the k-th backward follows the `(k + lag)`-th `B`, and
/// the `W`s still pending after the last `B` run at the end, in micro-batch order.
pub(super) fn rank_actions(
    pp: usize,
    chunks: usize,
    stage: usize,
    w_lag: Option<usize>,
) -> Vec<Action> {
    let warm_up = (pp - 1 - stage).min(chunks);
    let mut acts = Vec::with_capacity(3 * chunks);
    let mut next_w = 0;
    let mut backward = |acts: &mut Vec<Action>, chunk: usize| match w_lag {
        None => acts.push(Action::BW { chunk, stage }),
        Some(lag) => {
            acts.push(Action::B { chunk, stage });
            while next_w + lag <= chunk {
                acts.push(Action::W {
                    chunk: next_w,
                    stage,
                });
                next_w += 1;
            }
        }
    };
    acts.extend((0..warm_up).map(|chunk| Action::F { chunk, stage }));
    for chunk in warm_up..chunks {
        acts.push(Action::F { chunk, stage });
        backward(&mut acts, chunk - warm_up);
    }
    for chunk in chunks - warm_up..chunks {
        backward(&mut acts, chunk);
    }
    if w_lag.is_some() {
        let emitted = acts
            .iter()
            .filter(|a| matches!(a, Action::W { .. }))
            .count();
        acts.extend((emitted..chunks).map(|chunk| Action::W { chunk, stage }));
    }
    acts
}

//! Streams over a rank's action list ([`Overlap::Streams`]): the rank's device work as a few
//! queues that take turns on its compute, the way a GPU runs compute and communication-bound
//! streams side by side (three by default, [`Overlap::DEFAULT_STREAMS`]).
//!
//! The list is cut into pieces: a forward, a backward for input, or a W. An `F` or `B` action is
//! one piece, a `BW` two (B, then its W), an F&B pair three (its backward, its forward, then the
//! backward's W). `n` threads take the pieces in list order, each the next one as soon as it is
//! free. So a pair's halves overlap as in [`Overlap::Pairs`], and so do the pieces that DualPipe
//! leaves unpaired — a warm-up forward's all-to-all waits while the next forward computes, a
//! drain backward's while the next backward or W computes — and the end of one pair with the
//! start of the next (no barrier between pairs). A W is its own piece: its input gradient has
//! already gone to the previous stage (as zero-bubble schedules send it), and it computes while
//! the other streams wait for the fabric; between its layers it lets a stream whose data has
//! arrived go first (`Baton::yield_to_waiting`), so that it fills gaps instead of delaying an
//! all-to-all that a peer waits for.
//!
//! Why this keeps the schedule's guarantees:
//! - Pieces are taken in list order, so the earliest unfinished piece of a rank is always on a
//!   thread. Each piece waits for what it needs from this rank: a local hand-off, the forward
//!   whose cache its backward reads, the backward before its W, its turn among the W's, and a
//!   forward its turn to take an activation (below). All of those come earlier in the list, and
//!   the list alone is deadlock-free (the schedule checker), so the earliest unfinished piece of
//!   the job can always go on, and the streams are deadlock-free too. (Forwards must take their
//!   activations in order: if a later forward could take the last one while it waits for data
//!   that depends on an earlier forward, the earlier one would wait for ever.)
//! - Every W is applied in list order (`Executor::apply_w`), and the forwards' losses are summed
//!   in (chunk, stage) order (`work.rs`), so a step gives the same bits as one at a time.
//! - A piece holds the rank's compute baton while it computes and hands it over whenever it
//!   waits, so the streams interleave on the compute instead of dividing it. Of the streams
//!   waiting for it, by default ([`TurnOrder::Schedule`]) the one with the earliest piece of the
//!   list goes first, every F and B before every W; [`TurnOrder::Arrival`]: first come, first
//!   served. Either way the bits are the same (the W's order is fixed, see above).
//! - Each thread issues its device work on a lane of its own ([`Lane`]): a piece blocked inside
//!   its device work never sits on a thread another stream needs.
//!
//! With `parallel.sub_batches = s` the list already holds each action once per sub-batch, side
//! by side (`Schedule::split`), and the trainer defaults to three streams per sub-batch: a
//! sub-batch's all-to-all is in flight while its twin computes, which halves each piece's own
//! chain of compute and all-to-alls without holding more activation memory.
//!
//! Memory stays as the schedule says: a forward takes its stage activation when it starts and
//! waits while the rank already holds as many as the list holds one action at a time (the
//! report's PP + 1 for DualPipe); a backward frees one when its input gradient is done. The
//! trace's peak is what was held. An F&B pair is cut backward first, so its forward overlaps
//! its backward within that bound (the pair's forward holds the peak exactly while its own
//! backward has not freed).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use flotilla_model::device::{Lane, with_lane};

use super::baton::with_urgency;

use crate::schedule::Action;

use super::executor::{Executor, Overlap, Span, StageWork, Trace, TurnOrder};

/// One piece of the list: what a stream runs at once.
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// F, the `k`-th forward of the list.
    F(usize, usize, usize),
    /// B only.
    B(usize, usize),
    /// W, the `k`-th of the list.
    W(usize, usize, usize),
}

/// The pieces of `actions`, each with the index of its action.
fn pieces(actions: &[Action], ordinals: &[Option<usize>]) -> Result<Vec<(usize, Piece)>, String> {
    let mut out = Vec::with_capacity(actions.len() + actions.len() / 2);
    let mut forwards = 0;
    let mut next_f = || {
        forwards += 1;
        forwards - 1
    };
    for (i, (a, &w)) in actions.iter().zip(ordinals).enumerate() {
        let k = || w.ok_or_else(|| format!("internal: {a:?} has no W ordinal"));
        match *a {
            Action::F { chunk, stage } => out.push((i, Piece::F(chunk, stage, next_f()))),
            Action::B { chunk, stage } => out.push((i, Piece::B(chunk, stage))),
            Action::W { chunk, stage } => out.push((i, Piece::W(chunk, stage, k()?))),
            Action::BW { chunk, stage } => {
                out.push((i, Piece::B(chunk, stage)));
                out.push((i, Piece::W(chunk, stage, k()?)));
            }
            // The backward first: it frees an activation, so the forward can overlap it.
            Action::FB { f, b } => {
                out.push((i, Piece::B(b.0, b.1)));
                out.push((i, Piece::F(f.0, f.1, next_f())));
                out.push((i, Piece::W(b.0, b.1, k()?)));
            }
        }
    }
    Ok(out)
}

impl Executor<'_> {
    fn run_piece(&self, work: &dyn StageWork, piece: Piece) -> Result<(), String> {
        match piece {
            Piece::F(c, s, k) => self.wall_f(work, c, s, Some(k)),
            Piece::B(c, s) => self.wall_b(work, c, s, None),
            Piece::W(c, s, k) => self.wall_w(work, c, s, k),
        }
    }

    /// Run `actions` on the streams; `ordinals` numbers their W's.
    pub(super) fn run_streams(
        &self,
        work: &dyn StageWork,
        actions: &[Action],
        ordinals: &[Option<usize>],
    ) -> Result<Trace, String> {
        let pieces = pieces(actions, ordinals)?;
        // The urgency of piece `i` on the baton (lower goes first; equal: first come).
        let urgency = |i: usize| -> u64 {
            match (self.turns, pieces[i].1) {
                (TurnOrder::Arrival, _) => 0,
                (TurnOrder::Schedule, Piece::W(..)) => (pieces.len() + i) as u64,
                (TurnOrder::Schedule, _) => i as u64,
            }
        };
        let next = AtomicUsize::new(0);
        let times: Mutex<Vec<Option<(f64, f64)>>> = Mutex::new(vec![None; pieces.len()]);
        let stream = &|lane: Lane| {
            with_lane(lane, || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= pieces.len() || self.link.failure.get().is_some() {
                        break;
                    }
                    let start = self.now();
                    let r = with_urgency(urgency(i), || self.run_piece(work, pieces[i].1));
                    let end = self.now();
                    match r {
                        Ok(()) => {
                            if let Ok(mut t) = times.lock() {
                                t[i] = Some((start, end));
                            }
                        }
                        Err(why) => {
                            // The first failure wins (an all-to-all's, the root cause, is
                            // recorded before the error it leads to); the other streams stop.
                            self.link.failure.set(why);
                            self.changed.notify_all();
                            break;
                        }
                    }
                }
            })
        };
        let n = match self.overlap {
            Overlap::Streams(n) => n.clamp(1, Lane::MAX),
            _ => 1,
        };
        std::thread::scope(|scope| {
            let others: Vec<_> = (1..n)
                .map(|i| scope.spawn(move || stream(Lane::new(i))))
                .collect();
            stream(Lane::FIRST);
            for h in others {
                if h.join().is_err() {
                    self.link
                        .failure
                        .set("a compute thread of the pipeline panicked".into());
                }
            }
        });
        if let Some(why) = self.link.failure.get() {
            return Err(why);
        }
        let times = times
            .into_inner()
            .map_err(|_| "a compute thread panicked".to_string())?;
        let peak = self.lock()?.peak;
        trace(actions, &pieces, &times, peak)
    }
}

/// The trace of a two-stream run: one span per action (a pair's from its first start to its
/// last end) and the peak activations that the executor counted as they were taken.
fn trace(
    actions: &[Action],
    pieces: &[(usize, Piece)],
    times: &[Option<(f64, f64)>],
    peak: usize,
) -> Result<Trace, String> {
    let mut spans: Vec<Option<(f64, f64)>> = vec![None; actions.len()];
    for (&(a, piece), t) in pieces.iter().zip(times) {
        let (start, end) = t.ok_or_else(|| format!("internal: {piece:?} did not run"))?;
        let span = spans[a].get_or_insert((start, end));
        span.0 = span.0.min(start);
        span.1 = span.1.max(end);
    }
    let spans = actions
        .iter()
        .zip(spans)
        .map(|(a, t)| {
            let (start, end) = t.ok_or_else(|| format!("internal: {a:?} did not run"))?;
            Ok(Span {
                action: *a,
                start,
                end,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Trace {
        spans,
        peak_activations: peak,
    })
}

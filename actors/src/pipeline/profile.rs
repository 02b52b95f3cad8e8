//! A rank's step on the wall clock, for profiling the executor: when each stream held the
//! compute baton (and for which piece of the schedule), and when it waited for an all-to-all, a
//! pipeline message or another stream of its rank. Off unless asked for
//! ([`Trainer::set_profile`](crate::trainer::Trainer)); `flotilla bench pipeline --trace` writes
//! it as a Chrome trace.

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use flotilla_model::device::current_lane;

use crate::schedule::Op;

/// What a stream was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Holding the compute baton.
    Compute,
    /// Waiting for an expert all-to-all's messages.
    Exchange,
    /// Waiting for an activation or gradient from another pipeline rank.
    Pipe,
    /// Waiting for another stream of this rank (a hand-off, a forward's cache, a W's turn).
    Local,
}

/// One interval of one stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The executor stream ([`Lane`](flotilla_model::device::Lane) index).
    pub lane: usize,
    pub activity: Activity,
    /// The piece the stream was running: op, chunk, stage.
    pub piece: Option<(Op, usize, usize)>,
    /// The fabric tag's value for a wait on a message (0 otherwise).
    pub tag: u64,
    pub start: Instant,
    pub end: Instant,
}

thread_local! {
    static PIECE: Cell<Option<(Op, usize, usize)>> = const { Cell::new(None) };
}

/// Runs `f` with the calling thread's events labelled with `piece`.
pub fn in_piece<R>(piece: (Op, usize, usize), f: impl FnOnce() -> R) -> R {
    super::with_thread_value(&PIECE, Some(piece), f)
}

/// A step's events, shared by the rank's threads; a no-op when off.
#[derive(Debug, Clone, Default)]
pub struct Profile(Option<Arc<Mutex<Vec<Event>>>>);

impl Profile {
    /// A recording profile.
    pub fn on() -> Profile {
        Profile(Some(Arc::default()))
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Record that the calling thread did `activity` from `start` to now.
    pub fn record(&self, activity: Activity, tag: u64, start: Instant) {
        let Some(events) = &self.0 else { return };
        let event = Event {
            lane: current_lane().index(),
            activity,
            piece: PIECE.get(),
            tag,
            start,
            end: Instant::now(),
        };
        if let Ok(mut e) = events.lock() {
            e.push(event);
        }
    }

    /// The events so far, in the order they ended.
    pub fn events(&self) -> Vec<Event> {
        self.0
            .as_ref()
            .and_then(|e| e.lock().ok().map(|e| e.clone()))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_model::device::{Lane, with_lane};

    #[test]
    fn events_carry_the_lane_and_piece_of_the_recording_thread() {
        let p = Profile::on();
        let t0 = Instant::now();
        p.record(Activity::Local, 0, t0);
        with_lane(Lane::new(2), || {
            in_piece((Op::B, 3, 1), || p.record(Activity::Exchange, 7, t0));
        });
        let e = p.events();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].lane, e[0].piece), (0, None));
        assert_eq!(
            (e[1].lane, e[1].piece, e[1].tag),
            (2, Some((Op::B, 3, 1)), 7)
        );
        assert_eq!(e[1].activity, Activity::Exchange);
        assert!(e[1].end >= e[1].start);
    }

    #[test]
    fn an_off_profile_records_nothing() {
        let p = Profile::default();
        p.record(Activity::Compute, 0, Instant::now());
        assert!(!p.is_on() && p.events().is_empty());
    }
}

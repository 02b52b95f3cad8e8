//! Lanes: the concurrent streams of device work of one rank (the halves of an overlapped F&B
//! pair, or the pipeline executor's streams, up to [`Lane::MAX`]), kept on separate host threads.
//!
//! A half of a pair blocks inside its device work: the expert all-to-all waits for the EP peers
//! and for the rank's compute baton. If both halves' work shared one rayon pool, work stealing
//! could stack one half's blocked job on top of a frame of the other half on the same worker,
//! and neither could go on (seen as an intermittent hang of DualPipe with EP). So the thread
//! that issues work says which lane it is (a thread-local set by [`with_lane`], inherited by the
//! device's worker threads of that lane), and a device with host threads keeps a pool per lane:
//! a lane's blocked job then only ever waits above frames of its own lane, whose progress does
//! not depend on it. On a GPU the lanes are the natural place for two streams.

use std::cell::Cell;

/// Which stream of a rank's device work the calling thread issues: [`Lane::FIRST`] (everything
/// outside the pipeline executor's streams, and its first stream) or one of the next
/// [`Lane::MAX`] − 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Lane(u8);

impl Lane {
    /// How many lanes a device keeps apart: three streams per sub-batch for up to two
    /// sub-batches, and room to try more (a lane's pool is only built when used).
    pub const MAX: usize = 8;
    pub const FIRST: Lane = Lane(0);

    /// Lane `i` (`i < MAX`; larger values wrap around).
    pub fn new(i: usize) -> Lane {
        Lane((i % Self::MAX) as u8)
    }

    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

thread_local! {
    static LANE: Cell<Lane> = const { Cell::new(Lane::FIRST) };
}

/// The calling thread's lane.
pub fn current_lane() -> Lane {
    LANE.get()
}

/// Puts the calling thread on `lane` for good (a device's worker threads, at their start).
pub(crate) fn set_thread_lane(lane: Lane) {
    LANE.set(lane);
}

/// Runs `f` with the calling thread on `lane`, restoring the thread's lane afterwards (also when
/// `f` panics).
pub fn with_lane<R>(lane: Lane, f: impl FnOnce() -> R) -> R {
    struct Restore(Lane);
    impl Drop for Restore {
        fn drop(&mut self) {
            LANE.set(self.0);
        }
    }
    let _restore = Restore(LANE.replace(lane));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_lane_sets_and_restores_even_on_panic() {
        assert_eq!(current_lane(), Lane::FIRST);
        let seen = with_lane(Lane::new(1), current_lane);
        assert_eq!(seen, Lane::new(1));
        assert_eq!(current_lane(), Lane::FIRST);
        let r = std::panic::catch_unwind(|| with_lane(Lane::new(1), || panic!("inside")));
        assert!(r.is_err());
        assert_eq!(current_lane(), Lane::FIRST);
    }
}

//! The rank's compute baton: one stream (a half of an F&B pair, or one of the executor's
//! streams) computes while the others wait for the fabric.
//!
//! A stream holds it while it computes and hands it over at every receive (a W also between
//! its layers, when a stream waits), so the streams interleave — one's all-to-all in flight
//! while another computes, as the report orders DualPipe's components — instead of all
//! computing at a fraction of the speed and then all waiting.
//!
//! Who gets it next: the waiter of lowest *urgency* (a thread-local, [`with_urgency`]), and
//! among equals the one that asked first (a ticket lock). Threads that never set an urgency
//! are all equal, so then it is first come, first served. The executor's streams set the
//! urgency of each piece from the schedule ([`TurnOrder`](super::executor::TurnOrder)). The
//! holder is never interrupted: it computes until it waits (or, a W, between its layers).
//!
//! With a [`Profile`] on, every time it is held is an event.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::profile::{Activity, Profile};

/// The urgency of threads that set none: the least.
const LEAST: u64 = u64::MAX;

thread_local! {
    static URGENCY: Cell<u64> = const { Cell::new(LEAST) };
}

/// Runs `f` with the calling thread asking for the baton at `urgency` (lower goes first).
pub fn with_urgency<R>(urgency: u64, f: impl FnOnce() -> R) -> R {
    super::with_thread_value(&URGENCY, urgency, f)
}

#[derive(Debug, Default)]
struct Turns {
    next_ticket: u64,
    /// Who waits: (urgency, ticket), the first is served next.
    waiting: BTreeSet<(u64, u64)>,
    /// When the holder took it (`None`: nobody holds it), and the seconds it was held before.
    since: Option<Instant>,
    held_s: f64,
}

#[derive(Debug, Default)]
struct Inner {
    turns: Mutex<Turns>,
    cv: Condvar,
}

/// The compute baton of one rank (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct Baton(Arc<Inner>, Profile);

impl Baton {
    /// A baton that records when it is held, and the waits of the link it serves, in `profile`.
    pub fn profiled(profile: Profile) -> Baton {
        Baton(Arc::default(), profile)
    }

    pub fn profile(&self) -> &Profile {
        &self.1
    }

    /// Wait for this caller's turn, then hold the baton.
    pub fn acquire(&self) {
        let Ok(mut t) = self.0.turns.lock() else {
            return;
        };
        let me = (URGENCY.get(), t.next_ticket);
        t.next_ticket += 1;
        t.waiting.insert(me);
        while t.since.is_some() || t.waiting.first() != Some(&me) {
            match self.0.cv.wait(t) {
                Ok(g) => t = g,
                Err(_) => return,
            }
        }
        t.waiting.remove(&me);
        t.since = Some(Instant::now());
    }

    /// Hand the baton to the next in line.
    pub fn release(&self) {
        let Ok(mut t) = self.0.turns.lock() else {
            return;
        };
        if let Some(since) = t.since.take() {
            t.held_s += since.elapsed().as_secs_f64();
            self.1.record(Activity::Compute, 0, since);
        }
        drop(t);
        self.0.cv.notify_all();
    }

    /// Let every caller that waits for the baton now go first, then hold it again (a holder
    /// without communication of its own, a W, calls this between layers). Nothing happens
    /// when nobody waits.
    pub fn yield_to_waiting(&self) {
        if self.0.turns.lock().is_ok_and(|t| !t.waiting.is_empty()) {
            self.release();
            self.acquire();
        }
    }

    /// Seconds the baton has been held so far: the rank's compute on its streams.
    pub fn held_s(&self) -> f64 {
        self.0.turns.lock().map(|t| t.held_s).unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits until `n` callers wait for `b`.
    fn until_waiting(b: &Baton, n: usize) {
        while b.0.turns.lock().map(|t| t.waiting.len()).unwrap_or(0) < n {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The order in which callers asking at `urgencies` (in that order, each queued before the
    /// next asks) are served once the holder lets go; each reports its index.
    fn served(urgencies: &[u64]) -> Vec<usize> {
        let b = Baton::default();
        let order = Mutex::new(Vec::new());
        b.acquire();
        std::thread::scope(|s| {
            for (i, &u) in urgencies.iter().enumerate() {
                let (b, order) = (&b, &order);
                s.spawn(move || {
                    with_urgency(u, || {
                        b.acquire();
                        order.lock().expect("order").push(i);
                        b.release();
                    })
                });
                until_waiting(b, i + 1);
            }
            b.release();
        });
        order.into_inner().expect("order")
    }

    #[test]
    fn equal_urgency_is_first_come_first_served() {
        assert_eq!(served(&[LEAST, LEAST, LEAST]), vec![0, 1, 2]);
        assert_eq!(served(&[4, 4, 4]), vec![0, 1, 2]);
    }

    #[test]
    fn the_most_urgent_waiter_goes_first() {
        assert_eq!(served(&[9, 2, 5]), vec![1, 2, 0]);
    }
}

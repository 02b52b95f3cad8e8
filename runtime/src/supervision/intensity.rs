//! The restart-intensity rule as a pure tracker: more than `max_restarts` restarts within
//! `within` means the supervisor gives up.
//!
//! It is deliberately free of actors so that it can be property-tested against a reference
//! model, and it reads no clock: the caller passes `now` (the supervisor uses
//! `tokio::time::Instant::now()`, so the rule follows tokio's paused clock in tests and
//! simulations).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// What the supervisor should do about the restart just recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntensityDecision {
    /// Within budget: restart.
    Restart,
    /// Over budget: stop all children and fail (escalate to the parent).
    GiveUp,
}

/// Tracks recent restarts of one supervisor.
///
/// Semantics (same as OTP's `supervisor:add_restart/1`): a restart at time `r` is *in the
/// window* at time `now` when `now - r <= within`. Recording a restart at `now` first adds it,
/// then counts the restarts in the window; if the count exceeds `max_restarts`, the answer is
/// [`IntensityDecision::GiveUp`]. So `max_restarts = 0` gives up on the first restart, and
/// `max_restarts = 3` allows three restarts in any window and gives up on the fourth.
#[derive(Debug, Clone)]
pub struct RestartIntensity {
    max_restarts: u32,
    within: Duration,
    /// Times of the most recent restarts, oldest first; at most `max_restarts + 1` entries.
    recent: VecDeque<Instant>,
}

impl RestartIntensity {
    /// A tracker allowing `max_restarts` restarts within any window of length `within`.
    pub fn new(max_restarts: u32, within: Duration) -> Self {
        Self {
            max_restarts,
            within,
            recent: VecDeque::new(),
        }
    }

    /// The configured limit.
    pub fn max_restarts(&self) -> u32 {
        self.max_restarts
    }

    /// The configured window.
    pub fn within(&self) -> Duration {
        self.within
    }

    /// How many recorded restarts are in the window at `now` (used as the backoff attempt).
    pub fn in_window(&self, now: Instant) -> u32 {
        let n = self
            .recent
            .iter()
            .filter(|&&r| now.saturating_duration_since(r) <= self.within)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Records a restart at `now` and says whether it is within budget.
    pub fn record(&mut self, now: Instant) -> IntensityDecision {
        while let Some(&oldest) = self.recent.front() {
            if now.saturating_duration_since(oldest) > self.within {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.recent.push_back(now);
        // Only the newest `max_restarts + 1` entries can ever matter: the window is a suffix of
        // the history, and `max_restarts + 1` of them in it already means "give up".
        let limit = usize::try_from(self.max_restarts)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        while self.recent.len() > limit {
            self.recent.pop_front();
        }
        if self.recent.len() >= limit {
            IntensityDecision::GiveUp
        } else {
            IntensityDecision::Restart
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_restarts_gives_up_at_once() {
        let mut t = RestartIntensity::new(0, Duration::from_secs(5));
        assert_eq!(t.record(Instant::now()), IntensityDecision::GiveUp);
    }

    #[test]
    fn window_slides() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t = RestartIntensity::new(2, s(10));
        assert_eq!(t.record(t0), IntensityDecision::Restart);
        assert_eq!(t.record(t0 + s(4)), IntensityDecision::Restart);
        assert_eq!(t.in_window(t0 + s(10)), 2);
        // t0 is exactly `within` old: still in the window (inclusive, as in OTP).
        assert_eq!(t.record(t0 + s(10)), IntensityDecision::GiveUp);
        let mut t = RestartIntensity::new(2, s(10));
        t.record(t0);
        t.record(t0 + s(4));
        // Just past the window: t0 has left it.
        assert_eq!(
            t.record(t0 + s(10) + Duration::from_millis(1)),
            IntensityDecision::Restart
        );
        assert_eq!(t.in_window(t0 + s(30)), 0);
    }

    /// The reference model: keep every restart time; at the i-th restart count those (including
    /// itself) no older than `within`; give up when that count exceeds `max_restarts`.
    fn model(max_restarts: u32, within: Duration, times: &[Duration]) -> Vec<IntensityDecision> {
        times
            .iter()
            .enumerate()
            .map(|(i, &now)| {
                let in_window = times[..=i].iter().filter(|&&r| now - r <= within).count();
                if in_window > max_restarts as usize {
                    IntensityDecision::GiveUp
                } else {
                    IntensityDecision::Restart
                }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Random failure sequences (random time gaps, including bursts at the same instant)
        /// give the same decisions from the tracker as from the model.
        #[test]
        fn tracker_matches_model(
            max_restarts in 0u32..6,
            within_ms in 0u64..4_000,
            gaps_ms in proptest::collection::vec(
                prop_oneof![Just(0u64), 0u64..500, 0u64..5_000], 1..60),
        ) {
            let within = Duration::from_millis(within_ms);
            let mut at = Duration::ZERO;
            let times: Vec<Duration> = gaps_ms
                .iter()
                .map(|&g| { at += Duration::from_millis(g); at })
                .collect();
            let t0 = Instant::now();
            let mut tracker = RestartIntensity::new(max_restarts, within);
            let got: Vec<IntensityDecision> =
                times.iter().map(|&t| tracker.record(t0 + t)).collect();
            prop_assert_eq!(got, model(max_restarts, within, &times));
        }
    }
}

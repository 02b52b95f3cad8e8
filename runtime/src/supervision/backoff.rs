//! Restart backoff: an optional delay before a restart, growing while restarts keep coming.

use std::time::Duration;

/// Delay before restarting a child (or a restart group).
///
/// The `attempt` given to [`Backoff::delay`] is the number of restarts the supervisor already
/// made inside its current restart-intensity window (0 for the first restart after a calm
/// period), so the delay grows while failures cluster and resets by itself once they stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backoff {
    /// Restart at once (OTP's behaviour).
    #[default]
    None,
    /// Always wait this long.
    Fixed(Duration),
    /// Wait `initial * 2^attempt`, never more than `max`.
    Exponential {
        /// Delay of the first restart in a window.
        initial: Duration,
        /// Cap.
        max: Duration,
    },
}

impl Backoff {
    /// Exponential backoff from `initial`, doubling per attempt, capped at `max`.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Backoff::Exponential { initial, max }
    }

    /// The delay before restart number `attempt` (0-based) of the current window.
    pub fn delay(&self, attempt: u32) -> Duration {
        match *self {
            Backoff::None => Duration::ZERO,
            Backoff::Fixed(d) => d,
            Backoff::Exponential { initial, max } => 2u32
                .checked_pow(attempt)
                .and_then(|factor| initial.checked_mul(factor))
                .map_or(max, |d| d.min(max)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_and_fixed() {
        assert_eq!(Backoff::None.delay(7), Duration::ZERO);
        let fixed = Backoff::Fixed(Duration::from_millis(250));
        assert_eq!(fixed.delay(0), Duration::from_millis(250));
        assert_eq!(fixed.delay(9), Duration::from_millis(250));
    }

    #[test]
    fn exponential_doubles_and_caps() {
        let b = Backoff::exponential(Duration::from_millis(100), Duration::from_millis(1000));
        let got: Vec<u128> = (0..6).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        // No overflow for absurd attempts.
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(1000));
    }
}

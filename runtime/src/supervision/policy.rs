//! Plain-data (serde) forms of a supervisor's policy, so a tree's policy can come from config.
//!
//! The config's `[supervision]` table holds `max_restarts`, `within_s`, `backoff_ms`,
//! `backoff_max_ms` and `shutdown_timeout_ms`; [`SupervisorPolicy::from_numbers`] builds a
//! policy from exactly those,
//! and [`SupervisorPolicy`] also deserializes directly from such a table (every field optional).
//! [`SupervisorPolicy::spec`] turns it into a [`SupervisorSpec`] to which children are added.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::backoff::Backoff;
use super::error::SupervisorError;
use super::spec::{Shutdown, SupervisorSpec};
use super::strategy::Strategy;

/// Backoff as plain data: `{ kind = "none" }`, `{ kind = "fixed", delay_ms = 200 }` or
/// `{ kind = "exponential", initial_ms = 100, max_ms = 5000 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackoffPolicy {
    /// Restart at once.
    #[default]
    None,
    /// Always wait `delay_ms`.
    Fixed {
        /// Delay in milliseconds.
        delay_ms: u64,
    },
    /// `initial_ms * 2^attempt`, capped at `max_ms`.
    Exponential {
        /// First delay in milliseconds.
        initial_ms: u64,
        /// Cap in milliseconds.
        max_ms: u64,
    },
}

impl From<BackoffPolicy> for Backoff {
    fn from(p: BackoffPolicy) -> Self {
        match p {
            BackoffPolicy::None => Backoff::None,
            BackoffPolicy::Fixed { delay_ms } => Backoff::Fixed(Duration::from_millis(delay_ms)),
            BackoffPolicy::Exponential { initial_ms, max_ms } => Backoff::Exponential {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(max_ms),
            },
        }
    }
}

/// A supervisor's policy as plain data. Defaults: `one_for_one`, 3 restarts within 5 s, no
/// backoff, 5000 ms shutdown timeout for children.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorPolicy {
    /// Restart strategy (`one_for_one`, `one_for_all`, `rest_for_one`, `simple_one_for_one`).
    pub strategy: Strategy,
    /// More than this many restarts within `within_s` make the supervisor give up.
    pub max_restarts: u32,
    /// The restart-intensity window in seconds (may be fractional, must be finite and >= 0).
    pub within_s: f64,
    /// Delay before restarts.
    pub backoff: BackoffPolicy,
    /// Graceful-stop timeout given to children built with [`SupervisorPolicy::child_shutdown`].
    pub shutdown_timeout_ms: u64,
}

impl Default for SupervisorPolicy {
    fn default() -> Self {
        Self {
            strategy: Strategy::OneForOne,
            max_restarts: 3,
            within_s: 5.0,
            backoff: BackoffPolicy::None,
            shutdown_timeout_ms: 5_000,
        }
    }
}

impl SupervisorPolicy {
    /// A `one_for_one` policy from the config's flat numbers. The back-off doubles from
    /// `backoff_ms` per restart within the intensity window, up to `backoff_max_ms`
    /// ([`BackoffPolicy::Exponential`]); `backoff_ms = 0` means no back-off. An error if
    /// `within_s` is not a valid duration or `backoff_max_ms < backoff_ms`.
    pub fn from_numbers(
        max_restarts: u32,
        within_s: f64,
        backoff_ms: u64,
        backoff_max_ms: u64,
        shutdown_timeout_ms: u64,
    ) -> Result<Self, SupervisorError> {
        if backoff_max_ms < backoff_ms {
            return Err(SupervisorError::InvalidSpec(format!(
                "backoff_max_ms = {backoff_max_ms} is less than backoff_ms = {backoff_ms}"
            )));
        }
        let policy = Self {
            strategy: Strategy::OneForOne,
            max_restarts,
            within_s,
            backoff: if backoff_ms == 0 {
                BackoffPolicy::None
            } else {
                BackoffPolicy::Exponential {
                    initial_ms: backoff_ms,
                    max_ms: backoff_max_ms,
                }
            },
            shutdown_timeout_ms,
        };
        policy.within()?;
        Ok(policy)
    }

    /// [`SupervisorPolicy::from_numbers`] with the job config's `[supervision]` numbers.
    pub fn from_supervision(s: &crate::config::SupervisionConfig) -> Result<Self, SupervisorError> {
        Self::from_numbers(
            s.max_restarts,
            s.within_s,
            s.backoff_ms,
            s.backoff_max_ms,
            s.shutdown_timeout_ms,
        )
    }

    /// The same policy with another strategy.
    pub fn with_strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The same policy in the terms of `clock`: on the virtual clock, whose tokio time runs
    /// [`crate::clock::DILATION`] times slower than modelled time, the window, the back-off and
    /// the shutdown timeout are stretched by that much, so that a simulated job's supervisors
    /// count restarts and wait in modelled time as a real job's do in wall time.
    pub fn on_clock(mut self, clock: &dyn crate::clock::Clock) -> Self {
        if !clock.is_virtual() {
            return self;
        }
        let k = u64::from(crate::clock::DILATION);
        self.within_s *= f64::from(crate::clock::DILATION);
        self.shutdown_timeout_ms = self.shutdown_timeout_ms.saturating_mul(k);
        if let BackoffPolicy::Exponential { initial_ms, max_ms } = self.backoff {
            self.backoff = BackoffPolicy::Exponential {
                initial_ms: initial_ms.saturating_mul(k),
                max_ms: max_ms.saturating_mul(k),
            };
        }
        self
    }

    /// The window as a `Duration`; an error if `within_s` is negative, NaN or too large.
    pub fn within(&self) -> Result<Duration, SupervisorError> {
        Duration::try_from_secs_f64(self.within_s)
            .map_err(|e| SupervisorError::InvalidSpec(format!("within_s = {}: {e}", self.within_s)))
    }

    /// The shutdown for children of this policy: `Timeout(shutdown_timeout_ms)`.
    pub fn child_shutdown(&self) -> Shutdown {
        Shutdown::from_millis(self.shutdown_timeout_ms)
    }

    /// A spec with this policy and no children yet (add them with
    /// [`SupervisorSpec::child`], or set the template for `simple_one_for_one`).
    pub fn spec(&self) -> Result<SupervisorSpec, SupervisorError> {
        Ok(SupervisorSpec::new(self.strategy)
            .with_intensity(self.max_restarts, self.within()?)
            .with_backoff(self.backoff.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_the_virtual_clock_the_policy_counts_modelled_time() -> Result<(), SupervisorError> {
        let p = SupervisorPolicy::from_numbers(4, 2.5, 150, 1000, 800)?;
        assert_eq!(p.clone().on_clock(&crate::clock::RealClock), p);
        let v = p.on_clock(&crate::clock::VirtualClock);
        let k = u64::from(crate::clock::DILATION);
        assert_eq!(
            v.within()?,
            Duration::from_millis(2500) * crate::clock::DILATION
        );
        assert_eq!(v.shutdown_timeout_ms, 800 * k);
        assert!(matches!(
            v.backoff,
            BackoffPolicy::Exponential { initial_ms, max_ms } if initial_ms == 150 * k && max_ms == 1000 * k
        ));
        Ok(())
    }

    #[test]
    fn from_config_numbers() -> Result<(), SupervisorError> {
        let p = SupervisorPolicy::from_numbers(4, 2.5, 150, 1000, 800)?;
        let spec = p.spec()?;
        assert_eq!(spec.strategy, Strategy::OneForOne);
        assert_eq!(spec.max_restarts, 4);
        assert_eq!(spec.within, Duration::from_millis(2500));
        assert_eq!(
            spec.backoff,
            Backoff::exponential(Duration::from_millis(150), Duration::from_millis(1000))
        );
        assert_eq!(
            p.child_shutdown(),
            Shutdown::Timeout(Duration::from_millis(800))
        );
        let none = SupervisorPolicy::from_numbers(1, 1.0, 0, 0, 1)?;
        assert_eq!(none.spec()?.backoff, Backoff::None);
        assert!(SupervisorPolicy::from_numbers(1, -1.0, 0, 0, 1).is_err());
        assert!(SupervisorPolicy::from_numbers(1, f64::NAN, 0, 0, 1).is_err());
        Ok(())
    }

    /// The config's numbers give a back-off that doubles per restart up to `backoff_max_ms`
    /// (the `[supervision]` defaults: 100 ms up to 5000 ms), and a cap below the first delay
    /// is refused.
    #[test]
    fn config_backoff_doubles_up_to_its_maximum() -> Result<(), SupervisorError> {
        let spec = SupervisorPolicy::from_numbers(3, 60.0, 100, 5000, 5000)?.spec()?;
        let delays: Vec<u128> = (0..8).map(|a| spec.backoff.delay(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        let equal = SupervisorPolicy::from_numbers(3, 60.0, 250, 250, 5000)?.spec()?;
        assert_eq!(equal.backoff.delay(3), Duration::from_millis(250));
        match SupervisorPolicy::from_numbers(3, 60.0, 300, 200, 5000) {
            Err(SupervisorError::InvalidSpec(msg)) => {
                assert_eq!(msg, "backoff_max_ms = 200 is less than backoff_ms = 300");
            }
            other => panic!("expected InvalidSpec, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn deserializes_from_toml() -> Result<(), Box<dyn std::error::Error>> {
        let p: SupervisorPolicy = toml::from_str(
            r#"
            strategy = "rest_for_one"
            max_restarts = 10
            within_s = 60
            backoff = { kind = "exponential", initial_ms = 100, max_ms = 2000 }
            "#,
        )?;
        assert_eq!(p.strategy, Strategy::RestForOne);
        assert_eq!(p.shutdown_timeout_ms, 5_000, "missing fields take defaults");
        let spec = p.spec()?;
        assert_eq!(spec.within, Duration::from_secs(60));
        assert_eq!(
            spec.backoff,
            Backoff::exponential(Duration::from_millis(100), Duration::from_secs(2))
        );
        let empty: SupervisorPolicy = toml::from_str("")?;
        assert_eq!(empty, SupervisorPolicy::default());
        assert!(toml::from_str::<SupervisorPolicy>("max_restart = 3").is_err());
        Ok(())
    }
}

//! Learning-rate schedules: constant, and linear warm-up followed by cosine decay to a floor.
//!
//! `step` is the 0-based index of the optimizer step about to be taken (0 for the first update).
//! [`LrSchedule::WarmupCosine`] with `W = warmup_steps` and `T = total_steps`:
//!
//! ```text
//! step < W:        lr = max_lr · (step + 1) / W                  (the first step already moves)
//! W ≤ step < T:    lr = min_lr + (max_lr − min_lr) · ½ (1 + cos(π · (step − W) / (T − W)))
//! step ≥ T:        lr = min_lr
//! ```
//!
//! So step `W − 1` and step `W` both use `max_lr`, the cosine falls to `min_lr` exactly at step
//! `T`, and training past `T` stays at `min_lr`. `cos` is the platform's, so values agree from run
//! to run on one machine and to within an ulp across platforms.

use super::OptimError;

/// A learning-rate schedule (the `[optimizer]` section of the config chooses one by `kind`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The same learning rate at every step.
    Constant {
        /// The learning rate.
        lr: f64,
    },
    /// Linear warm-up to `max_lr`, then cosine decay to `min_lr` at `total_steps`.
    WarmupCosine {
        /// The peak learning rate, reached at the end of warm-up.
        max_lr: f64,
        /// The floor reached at `total_steps` and kept afterwards.
        min_lr: f64,
        /// Steps of linear warm-up (0 for none).
        warmup_steps: u64,
        /// The step at which the decay reaches `min_lr`; at least `warmup_steps`.
        total_steps: u64,
    },
}

impl LrSchedule {
    /// Checks that rates are finite and non-negative, `min_lr ≤ max_lr` and
    /// `warmup_steps ≤ total_steps`.
    pub fn validate(&self) -> Result<(), OptimError> {
        let rate = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(OptimError::Config(format!(
                    "{name} is {v}; it must be non-negative and finite"
                )))
            }
        };
        match *self {
            Self::Constant { lr } => rate("lr", lr),
            Self::WarmupCosine {
                max_lr,
                min_lr,
                warmup_steps,
                total_steps,
            } => {
                rate("max_lr", max_lr)?;
                rate("min_lr", min_lr)?;
                if min_lr > max_lr {
                    return Err(OptimError::Config(format!(
                        "min_lr {min_lr} exceeds max_lr {max_lr}"
                    )));
                }
                if warmup_steps > total_steps {
                    return Err(OptimError::Config(format!(
                        "warmup_steps {warmup_steps} exceeds total_steps {total_steps}"
                    )));
                }
                Ok(())
            }
        }
    }

    /// The learning rate of step `step` (0-based; see the module documentation).
    #[must_use]
    pub fn lr(&self, step: u64) -> f64 {
        match *self {
            Self::Constant { lr } => lr,
            Self::WarmupCosine {
                max_lr,
                min_lr,
                warmup_steps,
                total_steps,
            } => {
                if step < warmup_steps {
                    max_lr * (step + 1) as f64 / warmup_steps as f64
                } else if step >= total_steps {
                    min_lr
                } else {
                    let progress =
                        (step - warmup_steps) as f64 / (total_steps - warmup_steps) as f64;
                    min_lr
                        + (max_lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEDULE: LrSchedule = LrSchedule::WarmupCosine {
        max_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 10,
        total_steps: 110,
    };

    fn near(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15
    }

    #[test]
    fn warmup_is_linear_from_the_first_step() {
        assert!(near(SCHEDULE.lr(0), 1e-4));
        assert!(near(SCHEDULE.lr(4), 5e-4));
        assert!(near(SCHEDULE.lr(9), 1e-3));
    }

    #[test]
    fn cosine_boundaries() {
        assert!(near(SCHEDULE.lr(10), 1e-3), "peak at the end of warm-up");
        assert!(
            near(SCHEDULE.lr(60), 5.5e-4),
            "half-way: the midpoint of max and min"
        );
        let last = SCHEDULE.lr(109);
        let expected = 1e-4 + 9e-4 * 0.5 * (1.0 + (0.99 * std::f64::consts::PI).cos());
        assert!(
            near(last, expected) && last > 1e-4 && last < 1.01e-4,
            "{last}"
        );
        assert_eq!(SCHEDULE.lr(110), 1e-4);
        assert_eq!(SCHEDULE.lr(10_000), 1e-4);
        assert_eq!(SCHEDULE.lr(u64::MAX), 1e-4);
        let mut prev = f64::INFINITY;
        for step in 10..=110 {
            let lr = SCHEDULE.lr(step);
            assert!(lr <= prev, "not decreasing at {step}");
            prev = lr;
        }
    }

    #[test]
    fn degenerate_phases() {
        let no_warmup = LrSchedule::WarmupCosine {
            max_lr: 2.0,
            min_lr: 0.0,
            warmup_steps: 0,
            total_steps: 4,
        };
        assert_eq!(no_warmup.lr(0), 2.0);
        assert!(near(no_warmup.lr(2), 1.0));
        assert_eq!(no_warmup.lr(4), 0.0);
        let no_decay = LrSchedule::WarmupCosine {
            max_lr: 2.0,
            min_lr: 0.5,
            warmup_steps: 4,
            total_steps: 4,
        };
        assert_eq!(no_decay.lr(3), 2.0);
        assert_eq!(no_decay.lr(4), 0.5);
        let constant = LrSchedule::Constant { lr: 3e-4 };
        assert_eq!(constant.lr(0), 3e-4);
        assert_eq!(constant.lr(u64::MAX), 3e-4);
    }

    #[test]
    fn validation_names_the_problem() {
        let msg = |s: LrSchedule| {
            s.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(SCHEDULE.validate().is_ok());
        assert!(msg(LrSchedule::Constant { lr: f64::NAN }).contains("lr is NaN"));
        assert!(
            msg(LrSchedule::WarmupCosine {
                max_lr: 1.0,
                min_lr: 2.0,
                warmup_steps: 0,
                total_steps: 1
            })
            .contains("min_lr 2 exceeds max_lr 1")
        );
        assert!(
            msg(LrSchedule::WarmupCosine {
                max_lr: 1.0,
                min_lr: 0.0,
                warmup_steps: 5,
                total_steps: 4
            })
            .contains("warmup_steps 5")
        );
    }

    #[test]
    fn serde_uses_a_kind_tag() {
        let json = serde_json::to_string(&LrSchedule::Constant { lr: 0.5 }).unwrap_or_default();
        assert_eq!(json, r#"{"kind":"constant","lr":0.5}"#);
        let parsed: Option<LrSchedule> = serde_json::from_str(
            r#"{"kind":"warmup_cosine","max_lr":1e-3,"min_lr":1e-4,"warmup_steps":10,"total_steps":110}"#,
        )
        .ok();
        assert_eq!(parsed, Some(SCHEDULE));
        assert!(serde_json::from_str::<LrSchedule>(r#"{"kind":"constant","lr":1,"x":2}"#).is_err());
    }
}

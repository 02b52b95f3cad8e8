//! Restart strategies and restart types: the pure rules that decide *who* is restarted.
//!
//! Both enums are plain data (serde) so that a tree's policy can come from a config file.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::events::ExitReason;

/// How a supervisor reacts when one of its children must be restarted (OTP's strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Restart only the child that exited.
    #[default]
    OneForOne,
    /// Stop all other children (reverse start order), then restart all of them (start order).
    OneForAll,
    /// Stop the children started *after* the one that exited (reverse order), then restart the
    /// exited child and those (start order).
    RestForOne,
    /// All children are dynamic instances of one [`ChildTemplate`](super::ChildTemplate), added
    /// with `start_child(args)`; only the exited instance is restarted.
    SimpleOneForOne,
}

impl Strategy {
    /// Positions (in start order, `0..len`) of the children affected when the child at
    /// `failed` must be restarted: the failed child itself plus the siblings that are stopped and
    /// restarted with it. `failed` must be `< len`.
    pub fn restart_group(self, failed: usize, len: usize) -> Range<usize> {
        match self {
            Strategy::OneForOne | Strategy::SimpleOneForOne => failed..failed + 1,
            Strategy::OneForAll => 0..len,
            Strategy::RestForOne => failed..len,
        }
    }

    /// The OTP name of the strategy (`one_for_one`, ...), for logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::OneForOne => "one_for_one",
            Strategy::OneForAll => "one_for_all",
            Strategy::RestForOne => "rest_for_one",
            Strategy::SimpleOneForOne => "simple_one_for_one",
        }
    }
}

/// When a child is restarted (OTP's restart types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Restart {
    /// Always restarted, whatever the exit reason.
    #[default]
    Permanent,
    /// Restarted only after an abnormal exit (failure, panic, kill); a normal stop is final.
    Transient,
    /// Never restarted. When a group restart (one_for_all / rest_for_one) reaches a temporary
    /// child, it is stopped and dropped, not restarted.
    Temporary,
}

impl Restart {
    /// Whether a child of this restart type that exited for `reason` should be restarted.
    pub fn wants_restart(self, reason: &ExitReason) -> bool {
        match self {
            Restart::Permanent => true,
            Restart::Transient => reason.is_abnormal(),
            Restart::Temporary => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_otp() {
        assert_eq!(Strategy::OneForOne.restart_group(1, 3), 1..2);
        assert_eq!(Strategy::SimpleOneForOne.restart_group(2, 3), 2..3);
        assert_eq!(Strategy::OneForAll.restart_group(1, 3), 0..3);
        assert_eq!(Strategy::RestForOne.restart_group(1, 3), 1..3);
        assert_eq!(Strategy::RestForOne.restart_group(2, 3), 2..3);
    }

    #[test]
    fn restart_types_follow_otp() {
        let normal = ExitReason::Normal(None);
        let failed = ExitReason::Failed("boom".into());
        assert!(Restart::Permanent.wants_restart(&normal));
        assert!(Restart::Permanent.wants_restart(&failed));
        assert!(!Restart::Transient.wants_restart(&normal));
        assert!(Restart::Transient.wants_restart(&failed));
        assert!(Restart::Transient.wants_restart(&ExitReason::Killed));
        assert!(!Restart::Temporary.wants_restart(&normal));
        assert!(!Restart::Temporary.wants_restart(&failed));
    }

    #[test]
    fn plain_data_names() -> Result<(), serde_json::Error> {
        let s: Strategy = serde_json::from_str("\"rest_for_one\"")?;
        assert_eq!(s, Strategy::RestForOne);
        assert_eq!(s.as_str(), "rest_for_one");
        let r: Restart = serde_json::from_str("\"transient\"")?;
        assert_eq!(r, Restart::Transient);
        Ok(())
    }
}

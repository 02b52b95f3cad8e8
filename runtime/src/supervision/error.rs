//! The one error type of the supervision module: every failure is reported as data, never a hang.

use std::time::Duration;

use super::events::ExitReason;

/// Why a supervision operation failed.
///
/// It travels through ractor as an `ActorProcessingErr` (boxed) when a supervisor gives up, so
/// a parent that wants the structured form can `downcast_ref::<SupervisorError>()` the error of
/// its child's `ActorFailed` event. [`ExitReason::from_failure`] does exactly that.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    /// The spec or policy is inconsistent (duplicate child ids, a template under a strategy that
    /// is not `simple_one_for_one`, a negative window, ...).
    #[error("invalid supervisor spec: {0}")]
    InvalidSpec(String),

    /// A child could not be started (its start factory returned an error).
    #[error("child `{child}` failed to start: {reason}")]
    StartFailed {
        /// Id of the child spec whose start failed.
        child: String,
        /// The spawn error, as text.
        reason: String,
    },

    /// More than `max_restarts` restarts happened within `within`: the supervisor stopped its
    /// children and gave up. This is the error a parent sees when a child supervisor escalates.
    #[error(
        "supervisor `{supervisor}` gave up: more than {max_restarts} restart(s) within {within:?}; \
         last exit: child `{child}` ({reason})"
    )]
    IntensityExceeded {
        /// Label of the supervisor that gave up.
        supervisor: String,
        /// The child whose exit tipped the restart intensity over the limit.
        child: String,
        /// Why that child exited.
        reason: ExitReason,
        /// The configured limit.
        max_restarts: u32,
        /// The configured window.
        within: Duration,
    },

    /// No child with this id is known to the supervisor.
    #[error("no child with id `{0}`")]
    NoSuchChild(String),

    /// `restart_child` on a child that is running.
    #[error("child `{0}` is already running")]
    AlreadyRunning(String),

    /// `start_child` on a supervisor whose strategy is not `simple_one_for_one`.
    #[error("start_child needs a simple_one_for_one supervisor")]
    NotSimpleOneForOne,

    /// The supervisor actor could not be reached (it is dead or its mailbox is closed).
    #[error("supervisor unreachable: {0}")]
    Unreachable(String),

    /// The supervisor did not answer a request within the caller's deadline.
    #[error("supervisor did not answer within {0:?}")]
    Timeout(Duration),

    /// Spawning the supervisor actor itself failed for a reason other than a child's start.
    #[error("could not spawn supervisor: {0}")]
    Spawn(String),
}

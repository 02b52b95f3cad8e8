//! Supervision events as data: why a child exited, and what its supervisor did about it.
//!
//! Observers (tests, the controller, the sims' reports) get a stream of [`SupervisorEvent`]s
//! through an unbounded tokio channel, either registered in the spec
//! ([`SupervisorSpec::observer`](super::SupervisorSpec::observer), which also sees the initial
//! starts) or later with [`SupervisorHandle::subscribe`](super::SupervisorHandle::subscribe).

use std::fmt;
use std::time::Duration;

use ractor::{ActorId, ActorProcessingErr, SupervisionEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::error::SupervisorError;

/// Why a child actor exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// It stopped gracefully (ractor `stop`, `drain`), with the optional stop reason.
    Normal(Option<String>),
    /// It was killed (ractor `Signal::Kill`) or its task was cancelled.
    Killed,
    /// It failed: a handler returned an error or panicked. Holds the error text.
    Failed(String),
    /// It is a supervisor that gave up (restart intensity exceeded). Holds the error text,
    /// which names the grandchild whose exit tipped it over.
    Escalated(String),
    /// A restart was attempted and the start factory failed.
    StartFailed(String),
}

impl ExitReason {
    /// Anything but a graceful stop. Transient children are restarted only on abnormal exits.
    pub fn is_abnormal(&self) -> bool {
        !matches!(self, ExitReason::Normal(_))
    }

    /// Classifies an error carried by ractor's `ActorFailed`.
    pub fn from_failure(err: &ActorProcessingErr) -> Self {
        match err.downcast_ref::<SupervisorError>() {
            Some(e @ SupervisorError::IntensityExceeded { .. }) => {
                ExitReason::Escalated(e.to_string())
            }
            _ => ExitReason::Failed(err.to_string()),
        }
    }

    /// Classifies ractor's `ActorTerminated` stop reason. ractor reports a kill as the reason
    /// `"killed"` and a cancelled actor task as `"actor_task_cancelled"`.
    pub fn from_stop_reason(reason: Option<&str>) -> Self {
        match reason {
            Some("killed") | Some("actor_task_cancelled") => ExitReason::Killed,
            other => ExitReason::Normal(other.map(str::to_owned)),
        }
    }

    /// The actor and exit reason of a termination or failure event; `None` for other events
    /// (started, process-group changes).
    pub fn from_supervision_event(evt: &SupervisionEvent) -> Option<(ActorId, Self)> {
        match evt {
            SupervisionEvent::ActorTerminated(who, _, reason) => {
                Some((who.get_id(), Self::from_stop_reason(reason.as_deref())))
            }
            SupervisionEvent::ActorFailed(who, err) => {
                Some((who.get_id(), Self::from_failure(err)))
            }
            _ => None,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Normal(None) => write!(f, "normal"),
            ExitReason::Normal(Some(r)) => write!(f, "normal ({r})"),
            ExitReason::Killed => write!(f, "killed"),
            ExitReason::Failed(e) => write!(f, "failed: {e}"),
            ExitReason::Escalated(e) => write!(f, "escalated: {e}"),
            ExitReason::StartFailed(e) => write!(f, "start failed: {e}"),
        }
    }
}

/// What happened to one child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChildEvent {
    /// Started for the first time (initial start, `start_child`, `restart_child`).
    Started,
    /// A start attempt failed (initial start, `start_child`, or a restart).
    StartFailed {
        /// The spawn error, as text.
        error: String,
    },
    /// The child exited on its own (not stopped by its supervisor).
    Exited {
        /// Why.
        reason: ExitReason,
    },
    /// A restart is waiting out its backoff delay.
    RestartScheduled {
        /// How long until the restart.
        delay: Duration,
    },
    /// Restarted; `restarts` counts this child's restarts so far.
    Restarted {
        /// Restarts of this child since its supervisor started.
        restarts: u32,
    },
    /// Stopped gracefully by its supervisor (shutdown, group restart, `terminate_child`).
    Stopped,
    /// Its shutdown timeout passed (or its shutdown is `Brutal`), so it was killed.
    Killed,
    /// Its spec was dropped: a temporary child, or a dynamic instance that will not return.
    Removed,
    /// This child's exit exceeded the restart intensity: the supervisor stopped every child and
    /// is failing, which its parent sees as [`ExitReason::Escalated`].
    Escalated {
        /// The supervisor's error, as text.
        reason: String,
    },
}

/// One event, stamped with the supervisor's label and the (tokio) time it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorEvent {
    /// Label of the supervisor that reports it (its actor name, spec label, or actor id).
    pub supervisor: String,
    /// Id of the child spec concerned.
    pub child: String,
    /// What happened.
    pub event: ChildEvent,
    /// When, on tokio's clock (virtual under a paused clock).
    pub at: Instant,
}

/// Sending side of an event stream.
pub type EventSender = mpsc::UnboundedSender<SupervisorEvent>;
/// Receiving side of an event stream. It closes when the supervisor is gone.
pub type EventReceiver = mpsc::UnboundedReceiver<SupervisorEvent>;

/// A new event stream (give the sender to a spec, keep the receiver).
pub fn event_channel() -> (EventSender, EventReceiver) {
    mpsc::unbounded_channel()
}

/// Fans events out to the subscribers of one supervisor, forgetting closed ones, and logs them.
#[derive(Debug)]
pub(crate) struct EventHub {
    supervisor: String,
    subscribers: Vec<EventSender>,
}

impl EventHub {
    pub(crate) fn new(supervisor: String, subscribers: Vec<EventSender>) -> Self {
        Self {
            supervisor,
            subscribers,
        }
    }

    pub(crate) fn label(&self) -> &str {
        &self.supervisor
    }

    pub(crate) fn subscribe(&mut self, tx: EventSender) {
        self.subscribers.push(tx);
    }

    pub(crate) fn emit(&mut self, child: &str, event: ChildEvent) {
        match &event {
            ChildEvent::Exited { reason } if reason.is_abnormal() => {
                tracing::warn!(supervisor = %self.supervisor, child, %reason, "child exited");
            }
            ChildEvent::Escalated { reason } => {
                tracing::error!(supervisor = %self.supervisor, child, %reason, "supervisor gives up");
            }
            ChildEvent::StartFailed { error } => {
                tracing::warn!(supervisor = %self.supervisor, child, %error, "child start failed");
            }
            other => {
                tracing::debug!(supervisor = %self.supervisor, child, event = ?other, "supervision");
            }
        }
        let evt = SupervisorEvent {
            supervisor: self.supervisor.clone(),
            child: child.to_owned(),
            event,
            at: Instant::now(),
        };
        self.subscribers.retain(|tx| tx.send(evt.clone()).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_ractor_reasons() {
        assert_eq!(
            ExitReason::from_stop_reason(Some("killed")),
            ExitReason::Killed
        );
        assert_eq!(ExitReason::from_stop_reason(None), ExitReason::Normal(None));
        let n = ExitReason::from_stop_reason(Some("done"));
        assert_eq!(n, ExitReason::Normal(Some("done".into())));
        assert!(!n.is_abnormal());
        let plain: ActorProcessingErr = "boom".into();
        assert_eq!(
            ExitReason::from_failure(&plain),
            ExitReason::Failed("boom".into())
        );
        let gave_up: ActorProcessingErr = SupervisorError::IntensityExceeded {
            supervisor: "s".into(),
            child: "c".into(),
            reason: ExitReason::Killed,
            max_restarts: 1,
            within: Duration::from_secs(1),
        }
        .into();
        assert!(
            matches!(ExitReason::from_failure(&gave_up), ExitReason::Escalated(e) if e.contains("`c`"))
        );
    }

    #[test]
    fn hub_drops_closed_subscribers() {
        let (tx1, mut rx1) = event_channel();
        let (tx2, rx2) = event_channel();
        drop(rx2);
        let mut hub = EventHub::new("sup".into(), vec![tx1, tx2]);
        hub.emit("a", ChildEvent::Started);
        assert_eq!(hub.subscribers.len(), 1);
        let got = rx1.try_recv().map(|e| (e.supervisor, e.child, e.event));
        assert_eq!(got, Ok(("sup".into(), "a".into(), ChildEvent::Started)));
    }
}

//! OTP-style supervision (one_for_one, one_for_all, rest_for_one, simple_one_for_one) over ractor.
//!
//! ractor only *delivers* supervision events: a child spawned linked to a parent reports its
//! exit to it as `ActorTerminated` (graceful stop or kill) or `ActorFailed` (error or panic).
//! This module supplies what OTP's `supervisor` does with them:
//!
//! * **strategies** ([`Strategy`]): `one_for_one`, `one_for_all`, `rest_for_one`, and
//!   `simple_one_for_one` (dynamic instances of one [`ChildTemplate`], added with
//!   [`SupervisorHandle::start_child`]);
//! * **restart types** ([`Restart`]): permanent, transient (only after an abnormal exit),
//!   temporary (never, and dropped when a group restart reaches it);
//! * **restart intensity** ([`RestartIntensity`]): more than `max_restarts` restarts within
//!   `within` and the supervisor stops its children in reverse order and fails, which its
//!   parent sees as an abnormal exit ([`ExitReason::Escalated`]): escalation up the tree;
//! * **ordered start and shutdown**: children start in spec order (a failed start fails the
//!   supervisor's start, stopping those already started) and stop in reverse order, each with
//!   its [`Shutdown`] timeout after which it is killed;
//! * **backoff** ([`Backoff`]): an optional delay before restarts;
//! * **events as data** ([`SupervisorEvent`]): every start, exit, restart, stop, kill and
//!   escalation, with child id and reason, for tests, the controller and reports.
//!
//! All time is read through `tokio::time`, so a tree runs unchanged on tokio's paused clock.
//!
//! ```no_run
//! # use flotilla_runtime::supervision::*;
//! # use std::time::Duration;
//! # async fn demo(worker: ChildSpec, comm: ChildSpec) -> Result<(), SupervisorError> {
//! let (tx, mut events) = event_channel();
//! let spec = SupervisorPolicy::from_numbers(3, 10.0, 0, 0, 5_000)?
//!     .with_strategy(Strategy::RestForOne)
//!     .spec()?
//!     .child(comm)
//!     .child(worker.with_restart(Restart::Transient))
//!     .observer(tx);
//! let (sup, _join) = Supervisor::spawn(Some("rank-0".into()), spec, None).await?;
//! for child in sup.which_children().await? {
//!     println!("{} restarted {} times", child.id, child.restarts);
//! }
//! while let Some(evt) = events.recv().await {
//!     println!("{}: {} {:?}", evt.supervisor, evt.child, evt.event);
//! }
//! # Ok(()) }
//! ```
//!
//! Files: [`spec`] (child and supervisor specs), [`policy`] (serde plain-data policy),
//! [`strategy`] (who is restarted), [`intensity`] (when to give up), [`backoff`],
//! [`events`], `children` (the child table, start/stop of one child), [`supervisor`] (the
//! actor), [`handle`] (the client API), [`error`].

pub mod backoff;
mod children;
pub mod error;
pub mod events;
pub mod handle;
pub mod intensity;
pub mod policy;
pub mod spec;
pub mod strategy;
pub mod supervisor;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests_lifecycle;
#[cfg(test)]
mod tests_property;
#[cfg(test)]
mod tests_strategies;

pub use backoff::Backoff;
pub use children::{ChildInfo, ChildState};
pub use error::SupervisorError;
pub use events::{
    ChildEvent, EventReceiver, EventSender, ExitReason, SupervisorEvent, event_channel,
};
pub use handle::SupervisorHandle;
pub use intensity::{IntensityDecision, RestartIntensity};
pub use policy::{BackoffPolicy, SupervisorPolicy};
pub use spec::{
    ALL_DONE, BoxFuture, ChildArgs, ChildSpec, ChildTemplate, Shutdown, StartFn, StartWithArgsFn,
    SupervisorSpec,
};
pub use strategy::{Restart, Strategy};
pub use supervisor::{Supervisor, SupervisorMsg, SupervisorState};

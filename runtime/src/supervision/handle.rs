//! `SupervisorHandle`: the typed client API of a running supervisor, every call with a deadline.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorCell, ActorRef, RactorErr, RpcReplyPort};

use super::children::ChildInfo;
use super::error::SupervisorError;
use super::events::{EventReceiver, event_channel};
use super::supervisor::SupervisorMsg;

/// A reference to a running supervisor. Cheap to clone.
///
/// Every request has a deadline ([`SupervisorHandle::DEFAULT_CALL_TIMEOUT`] unless changed with
/// [`SupervisorHandle::with_call_timeout`]): a supervisor busy stopping slow children answers
/// late, and a dead one never, but the caller always gets an answer or an error.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    actor: ActorRef<SupervisorMsg>,
    call_timeout: Duration,
}

impl From<ActorRef<SupervisorMsg>> for SupervisorHandle {
    fn from(actor: ActorRef<SupervisorMsg>) -> Self {
        Self::new(actor)
    }
}

impl SupervisorHandle {
    /// Deadline of requests unless changed.
    pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

    /// Wraps a supervisor's actor reference.
    pub fn new(actor: ActorRef<SupervisorMsg>) -> Self {
        Self {
            actor,
            call_timeout: Self::DEFAULT_CALL_TIMEOUT,
        }
    }

    /// A handle on a supervisor known only by its cell (e.g. a nested supervisor from
    /// `which_children`); `None` if that actor is not a local [`Supervisor`](super::Supervisor).
    pub fn from_cell(cell: ActorCell) -> Option<Self> {
        match cell.is_message_type_of::<SupervisorMsg>() {
            Some(true) => Some(Self::new(cell.into())),
            _ => None,
        }
    }

    /// The same handle with another request deadline.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The supervisor's actor reference.
    pub fn actor(&self) -> &ActorRef<SupervisorMsg> {
        &self.actor
    }

    /// The supervisor's cell (to link, monitor, or use as a parent).
    pub fn cell(&self) -> ActorCell {
        self.actor.get_cell()
    }

    async fn call<T: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<T>) -> SupervisorMsg,
    ) -> Result<T, SupervisorError> {
        match self.actor.call(build, Some(self.call_timeout)).await {
            Ok(CallResult::Success(v)) => Ok(v),
            Ok(CallResult::Timeout) => Err(SupervisorError::Timeout(self.call_timeout)),
            Ok(CallResult::SenderError) => Err(SupervisorError::Unreachable(
                "the supervisor dropped the request".into(),
            )),
            Err(_) => Err(SupervisorError::Unreachable(
                "the supervisor's mailbox is closed".into(),
            )),
        }
    }

    /// All children in start order: id, actor (while running), state, restart count.
    pub async fn which_children(&self) -> Result<Vec<ChildInfo>, SupervisorError> {
        self.call(SupervisorMsg::WhichChildren).await
    }

    /// One child by id.
    pub async fn child(&self, id: &str) -> Result<ChildInfo, SupervisorError> {
        self.which_children()
            .await?
            .into_iter()
            .find(|c| c.id == id)
            .ok_or_else(|| SupervisorError::NoSuchChild(id.to_owned()))
    }

    /// `simple_one_for_one`: starts a new instance with `args` (which must be the type the
    /// template expects); the same `args` are reused on each of its restarts.
    pub async fn start_child<A: Any + Send + Sync>(
        &self,
        args: A,
    ) -> Result<ChildInfo, SupervisorError> {
        let args: Arc<dyn Any + Send + Sync> = Arc::new(args);
        self.call(|reply| SupervisorMsg::StartChild(args, reply))
            .await?
    }

    /// Stops a child with its shutdown (static children stay known as `Stopped`; dynamic and
    /// temporary ones are dropped).
    pub async fn terminate_child(&self, id: &str) -> Result<(), SupervisorError> {
        let id = id.to_owned();
        self.call(|reply| SupervisorMsg::TerminateChild(id, reply))
            .await?
    }

    /// Starts a stopped (or restart-pending) static child now.
    pub async fn restart_child(&self, id: &str) -> Result<ChildInfo, SupervisorError> {
        let id = id.to_owned();
        self.call(|reply| SupervisorMsg::RestartChild(id, reply))
            .await?
    }

    /// A stream of all further events of this supervisor. It closes when the supervisor is gone.
    /// To also see the initial starts, register an observer in the spec instead.
    pub fn subscribe(&self) -> Result<EventReceiver, SupervisorError> {
        let (tx, rx) = event_channel();
        self.actor.cast(SupervisorMsg::Subscribe(tx)).map_err(|_| {
            SupervisorError::Unreachable("the supervisor's mailbox is closed".into())
        })?;
        Ok(rx)
    }

    /// Stops the supervisor gracefully (its children in reverse start order) and waits, at most
    /// `timeout`, for it to be gone.
    pub async fn stop(&self, timeout: Duration) -> Result<(), SupervisorError> {
        match self.actor.stop_and_wait(None, Some(timeout)).await {
            Ok(()) => Ok(()),
            Err(RactorErr::Timeout) => Err(SupervisorError::Timeout(timeout)),
            // Already gone.
            Err(_) => Ok(()),
        }
    }
}

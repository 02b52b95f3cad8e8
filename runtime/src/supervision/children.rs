//! The supervisor's child table, and the two primitive operations on one child: start it
//! (linked), and stop it (graceful stop, then kill after its shutdown timeout).

use std::time::Duration;

use ractor::{ActorCell, ActorId, ActorStatus, RactorErr};
use tokio::time::Instant;

use super::spec::{ChildSpec, Shutdown};
use super::strategy::Restart;

/// How long to wait for a killed child's task to finish. A kill interrupts every await in the
/// child, so this only guards against a child that blocks its thread; past it we move on.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(5);

/// Where a child stands.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ChildState {
    /// Running.
    Running,
    /// Waiting for its (backoff-delayed) restart.
    RestartPending,
    /// Not running and not to be restarted unless asked (`restart_child`): it was terminated
    /// through the API, or it is transient and exited normally.
    Stopped,
}

/// A snapshot of one child, as answered by `which_children`.
#[derive(Debug, Clone)]
pub struct ChildInfo {
    /// Child id.
    pub id: String,
    /// Its actor, while it runs.
    pub cell: Option<ActorCell>,
    /// Where it stands.
    pub state: ChildState,
    /// Its restart type.
    pub restart: Restart,
    /// How many times it was restarted by the supervisor.
    pub restarts: u32,
    /// Whether it is a dynamic (`start_child`) instance.
    pub dynamic: bool,
}

/// Run status of a child entry.
#[derive(Debug, Clone)]
pub(crate) enum Status {
    Running(ActorCell),
    /// Restart due at this instant.
    Pending(Instant),
    Stopped,
}

/// One entry of the table.
#[derive(Debug)]
pub(crate) struct Child {
    pub(crate) spec: ChildSpec,
    pub(crate) status: Status,
    pub(crate) restarts: u32,
    pub(crate) dynamic: bool,
}

impl Child {
    pub(crate) fn info(&self) -> ChildInfo {
        let (cell, state) = match &self.status {
            Status::Running(c) => (Some(c.clone()), ChildState::Running),
            Status::Pending(_) => (None, ChildState::RestartPending),
            Status::Stopped => (None, ChildState::Stopped),
        };
        ChildInfo {
            id: self.spec.id.clone(),
            cell,
            state,
            restart: self.spec.restart,
            restarts: self.restarts,
            dynamic: self.dynamic,
        }
    }

    /// The running actor's id, if running.
    pub(crate) fn actor_id(&self) -> Option<ActorId> {
        match &self.status {
            Status::Running(c) => Some(c.get_id()),
            _ => None,
        }
    }
}

/// Children in start order. Ids are unique (checked by the spec; dynamic ids are numbered).
#[derive(Debug, Default)]
pub(crate) struct ChildTable {
    pub(crate) list: Vec<Child>,
}

impl ChildTable {
    pub(crate) fn position(&self, id: &str) -> Option<usize> {
        self.list.iter().position(|c| c.spec.id == id)
    }

    pub(crate) fn position_of_actor(&self, actor: ActorId) -> Option<usize> {
        self.list.iter().position(|c| c.actor_id() == Some(actor))
    }

    pub(crate) fn infos(&self) -> Vec<ChildInfo> {
        self.list.iter().map(Child::info).collect()
    }

    pub(crate) fn remove(&mut self, id: &str) {
        self.list.retain(|c| c.spec.id != id);
    }
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopOutcome {
    /// It stopped (or was already gone) within its timeout.
    Stopped,
    /// It was killed: brutal shutdown, or it ignored the stop past its timeout.
    Killed,
}

/// Starts `spec` linked to `supervisor`. If the factory forgot to link the child, links it.
pub(crate) async fn start_child(
    spec: &ChildSpec,
    supervisor: &ActorCell,
) -> Result<ActorCell, String> {
    let cell = (spec.start)(supervisor.clone())
        .await
        .map_err(|e| e.to_string())?;
    let linked = cell
        .try_get_supervisor()
        .is_some_and(|s| s.get_id() == supervisor.get_id());
    if !linked {
        tracing::warn!(child = %spec.id, "start factory did not link the child; linking it now");
        cell.link(supervisor.clone());
        if cell.get_status() >= ActorStatus::Stopping {
            return Err("child exited before it could be linked to its supervisor".into());
        }
    }
    Ok(cell)
}

/// Stops one child according to its shutdown: graceful stop with a deadline, then kill.
pub(crate) async fn stop_child(cell: &ActorCell, shutdown: Shutdown, reason: &str) -> StopOutcome {
    if let Shutdown::Timeout(grace) = shutdown {
        match cell
            .stop_and_wait(Some(reason.to_owned()), Some(grace))
            .await
        {
            Ok(()) => return StopOutcome::Stopped,
            Err(RactorErr::Timeout) => {}
            // The mailbox is closed: the child is already gone.
            Err(_) => {
                let _ = cell.wait(Some(KILL_WAIT)).await;
                return StopOutcome::Stopped;
            }
        }
    }
    if let Err(RactorErr::Timeout) = cell.kill_and_wait(Some(KILL_WAIT)).await {
        tracing::error!(actor = %cell.get_id(), "child still running {KILL_WAIT:?} after kill");
    }
    StopOutcome::Killed
}

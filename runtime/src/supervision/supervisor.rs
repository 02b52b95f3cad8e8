//! The `Supervisor` actor: starts its children in order, applies the strategy, restart types,
//! restart intensity and backoff when they exit, and stops them in reverse order.
//!
//! How it sits on ractor: every child is linked to the supervisor, so ractor delivers the
//! child's `ActorTerminated` / `ActorFailed` to [`Actor::handle_supervisor_evt`]. Events about
//! actors that are no longer in the table (children the supervisor stopped itself, earlier
//! incarnations of restarted ones) are recognised by their `ActorId` and ignored. Giving up is
//! done by stopping every child in reverse order and then returning an error from the handler:
//! ractor then fails the supervisor, and its parent receives `ActorFailed` carrying a
//! [`SupervisorError::IntensityExceeded`] (escalation). A normal stop runs the ordered shutdown
//! in `post_stop`.
//!
//! The supervisor never sleeps in a handler: a backoff delay is a timer that sends it
//! [`SupervisorMsg::RestartDue`], so it keeps answering queries meanwhile. The only waits in its
//! handlers are child starts and child stops, each bounded by the child's shutdown timeout.

use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::backoff::Backoff;
use super::children::{Child, ChildInfo, ChildTable, Status, StopOutcome, start_child, stop_child};
use super::error::SupervisorError;
use super::events::{ChildEvent, EventHub, EventSender, ExitReason};
use super::handle::SupervisorHandle;
use super::intensity::{IntensityDecision, RestartIntensity};
use super::spec::{ChildArgs, ChildTemplate, SupervisorSpec};
use super::strategy::{Restart, Strategy};

/// Stop reason given to children the supervisor stops.
const SHUTDOWN_REASON: &str = "shutdown";

/// The supervisor actor (stateless handler; everything lives in [`SupervisorState`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Supervisor;

/// The supervisor's protocol. Prefer the typed calls of [`SupervisorHandle`].
pub enum SupervisorMsg {
    /// All children, in start order.
    WhichChildren(RpcReplyPort<Vec<ChildInfo>>),
    /// `simple_one_for_one` only: start a new instance of the template with these arguments.
    StartChild(ChildArgs, RpcReplyPort<Result<ChildInfo, SupervisorError>>),
    /// Stop a child (its shutdown applies). A static child stays known, in state `Stopped`; a
    /// dynamic or temporary one is dropped.
    TerminateChild(String, RpcReplyPort<Result<(), SupervisorError>>),
    /// Start a static child that is `Stopped` or waiting for a restart, now.
    RestartChild(String, RpcReplyPort<Result<ChildInfo, SupervisorError>>),
    /// Send all further events to this stream.
    Subscribe(EventSender),
    /// Internal: a backoff delay has passed; restart the children whose restart is due.
    RestartDue,
}

/// The supervisor's state.
#[derive(Debug)]
pub struct SupervisorState {
    strategy: Strategy,
    backoff: Backoff,
    intensity: RestartIntensity,
    children: ChildTable,
    template: Option<ChildTemplate>,
    next_instance: u64,
    events: EventHub,
    auto_shutdown: bool,
}

impl Supervisor {
    /// Spawns a supervisor running `spec`, linked to `parent` when given (the parent then sees
    /// its failure, e.g. an intensity escalation). Children are started in spec order before
    /// this returns; if one fails to start, those already started are stopped in reverse order
    /// and the error names the child ([`SupervisorError::StartFailed`]).
    ///
    /// `name` registers the actor globally in ractor (so it must be unique) and labels events.
    pub async fn spawn(
        name: Option<String>,
        spec: SupervisorSpec,
        parent: Option<ActorCell>,
    ) -> Result<(SupervisorHandle, JoinHandle<()>), SupervisorError> {
        let spawned = match parent {
            Some(p) => <Self as Actor>::spawn_linked(name, Supervisor, spec, p).await,
            None => <Self as Actor>::spawn(name, Supervisor, spec).await,
        };
        match spawned {
            Ok((actor, join)) => Ok((SupervisorHandle::new(actor), join)),
            Err(SpawnErr::StartupFailed(e)) => Err(match e.downcast::<SupervisorError>() {
                Ok(e) => *e,
                Err(e) => SupervisorError::Spawn(e.to_string()),
            }),
            Err(e) => Err(SupervisorError::Spawn(e.to_string())),
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorSpec;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        spec: SupervisorSpec,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        spec.validate()?;
        let label = myself
            .get_name()
            .or(spec.label)
            .unwrap_or_else(|| myself.get_id().to_string());
        let mut state = SupervisorState {
            strategy: spec.strategy,
            backoff: spec.backoff,
            intensity: RestartIntensity::new(spec.max_restarts, spec.within),
            children: ChildTable::default(),
            template: spec.template,
            next_instance: 0,
            events: EventHub::new(label, spec.observers),
            auto_shutdown: spec.auto_shutdown,
        };
        let me = myself.get_cell();
        for child in spec.children {
            match start_child(&child, &me).await {
                Ok(cell) => {
                    state.events.emit(&child.id, ChildEvent::Started);
                    state.children.list.push(Child {
                        spec: child,
                        status: Status::Running(cell),
                        restarts: 0,
                        dynamic: false,
                    });
                }
                Err(error) => {
                    state.events.emit(
                        &child.id,
                        ChildEvent::StartFailed {
                            error: error.clone(),
                        },
                    );
                    state.shutdown_all().await;
                    return Err(SupervisorError::StartFailed {
                        child: child.id,
                        reason: error,
                    }
                    .into());
                }
            }
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::WhichChildren(reply) => {
                let _ = reply.send(state.children.infos());
            }
            SupervisorMsg::StartChild(args, reply) => {
                let res = state.start_dynamic(&myself.get_cell(), args).await;
                let _ = reply.send(res);
            }
            SupervisorMsg::TerminateChild(id, reply) => {
                let _ = reply.send(state.terminate(&id).await);
            }
            SupervisorMsg::RestartChild(id, reply) => {
                let res = state.restart_by_request(&myself.get_cell(), &id).await;
                let _ = reply.send(res);
            }
            SupervisorMsg::Subscribe(tx) => state.events.subscribe(tx),
            SupervisorMsg::RestartDue => {
                if let Some((id, reason)) = state.restart_due(&myself.get_cell()).await {
                    state.after_exit(&myself, id, reason).await?;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((actor, reason)) = ExitReason::from_supervision_event(&evt) else {
            return Ok(());
        };
        // Not ours any more (stopped by us, or an earlier incarnation): nothing to do.
        let Some(pos) = state.children.position_of_actor(actor) else {
            return Ok(());
        };
        let id = state.children.list[pos].spec.id.clone();
        state.children.list[pos].status = Status::Stopped;
        state.events.emit(
            &id,
            ChildEvent::Exited {
                reason: reason.clone(),
            },
        );
        state.after_exit(&myself, id, reason).await?;
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        state.shutdown_all().await;
        Ok(())
    }
}

impl SupervisorState {
    /// Decides what the exit of child `id` (already marked not running) means: drop it, leave it
    /// stopped, restart it and its group (now or after the backoff), or give up. A restart that
    /// fails to start counts as a new abnormal exit of that child, hence the loop.
    async fn after_exit(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        mut id: String,
        mut reason: ExitReason,
    ) -> Result<(), SupervisorError> {
        loop {
            let Some(pos) = self.children.position(&id) else {
                return Ok(());
            };
            let child = &self.children.list[pos];
            if !child.spec.restart.wants_restart(&reason) {
                // OTP: temporary children and finished dynamic instances are forgotten;
                // a transient static child that ended normally stays, stopped.
                if child.dynamic || child.spec.restart == Restart::Temporary {
                    self.children.remove(&id);
                    self.events.emit(&id, ChildEvent::Removed);
                }
                let idle = self
                    .children
                    .list
                    .iter()
                    .all(|c| matches!(c.status, Status::Stopped));
                if self.auto_shutdown && idle {
                    myself.stop(Some(super::spec::ALL_DONE.into()));
                }
                return Ok(());
            }
            let now = Instant::now();
            let attempt = self.intensity.in_window(now);
            if self.intensity.record(now) == IntensityDecision::GiveUp {
                return Err(self.give_up(id, reason).await);
            }
            let delay = self.backoff.delay(attempt);
            let due = now + delay;
            let group = self.stop_group(pos, due).await;
            if !delay.is_zero() {
                for member in &group {
                    self.events
                        .emit(member, ChildEvent::RestartScheduled { delay });
                }
                let me = myself.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(due).await;
                    // The supervisor may be gone by then; nothing to do in that case.
                    let _ = me.cast(SupervisorMsg::RestartDue);
                });
                return Ok(());
            }
            match self.restart_due(&myself.get_cell()).await {
                None => return Ok(()),
                Some((failed, start_error)) => {
                    id = failed;
                    reason = start_error;
                }
            }
        }
    }

    /// Stops the running siblings in the restart group of the child at `pos` (reverse start
    /// order), drops the temporary ones, and marks the group's remaining members pending until
    /// `due`. Members that were `Stopped` (not meant to run) stay so. Returns the ids of the
    /// members that will be restarted, in start order.
    async fn stop_group(&mut self, pos: usize, due: Instant) -> Vec<String> {
        let failed = self.children.list[pos].spec.id.clone();
        let range = self.strategy.restart_group(pos, self.children.list.len());
        let members: Vec<String> = self.children.list[range]
            .iter()
            .map(|c| c.spec.id.clone())
            .collect();
        let mut restart = Vec::new();
        for id in members.iter().rev() {
            let Some(i) = self.children.position(id) else {
                continue;
            };
            if let Status::Running(cell) = self.children.list[i].status.clone() {
                let outcome =
                    stop_child(&cell, self.children.list[i].spec.shutdown, SHUTDOWN_REASON).await;
                self.emit_stop(id, outcome);
                self.children.list[i].status = Status::Stopped;
                if self.children.list[i].spec.restart == Restart::Temporary {
                    self.children.remove(id);
                    self.events.emit(id, ChildEvent::Removed);
                    continue;
                }
                self.children.list[i].status = Status::Pending(due);
                restart.push(id.clone());
            } else if matches!(self.children.list[i].status, Status::Pending(_)) || *id == failed {
                self.children.list[i].status = Status::Pending(due);
                restart.push(id.clone());
            }
        }
        restart.reverse();
        restart
    }

    /// Restarts, in start order, every child whose restart is due. Stops at the first start
    /// failure and returns that child with the reason (the caller treats it as an exit).
    async fn restart_due(&mut self, me: &ActorCell) -> Option<(String, ExitReason)> {
        let now = Instant::now();
        for i in 0..self.children.list.len() {
            let is_due = matches!(self.children.list[i].status, Status::Pending(due) if due <= now);
            if !is_due {
                continue;
            }
            let id = self.children.list[i].spec.id.clone();
            match start_child(&self.children.list[i].spec, me).await {
                Ok(cell) => {
                    let child = &mut self.children.list[i];
                    child.status = Status::Running(cell);
                    child.restarts = child.restarts.saturating_add(1);
                    let restarts = child.restarts;
                    self.events.emit(&id, ChildEvent::Restarted { restarts });
                }
                Err(error) => {
                    self.children.list[i].status = Status::Stopped;
                    self.events.emit(
                        &id,
                        ChildEvent::StartFailed {
                            error: error.clone(),
                        },
                    );
                    return Some((id, ExitReason::StartFailed(error)));
                }
            }
        }
        None
    }

    /// Intensity exceeded: stop every child in reverse order and build the escalation error.
    async fn give_up(&mut self, child: String, reason: ExitReason) -> SupervisorError {
        let err = SupervisorError::IntensityExceeded {
            supervisor: self.events.label().to_owned(),
            child: child.clone(),
            reason,
            max_restarts: self.intensity.max_restarts(),
            within: self.intensity.within(),
        };
        self.shutdown_all().await;
        self.events.emit(
            &child,
            ChildEvent::Escalated {
                reason: err.to_string(),
            },
        );
        err
    }

    /// Ordered shutdown: every running child, in reverse start order, each with its own
    /// shutdown timeout. Pending restarts are cancelled.
    async fn shutdown_all(&mut self) {
        for i in (0..self.children.list.len()).rev() {
            let status = std::mem::replace(&mut self.children.list[i].status, Status::Stopped);
            if let Status::Running(cell) = status {
                let id = self.children.list[i].spec.id.clone();
                let outcome =
                    stop_child(&cell, self.children.list[i].spec.shutdown, SHUTDOWN_REASON).await;
                self.emit_stop(&id, outcome);
            }
        }
    }

    fn emit_stop(&mut self, id: &str, outcome: StopOutcome) {
        let event = match outcome {
            StopOutcome::Stopped => ChildEvent::Stopped,
            StopOutcome::Killed => ChildEvent::Killed,
        };
        self.events.emit(id, event);
    }

    async fn start_dynamic(
        &mut self,
        me: &ActorCell,
        args: ChildArgs,
    ) -> Result<ChildInfo, SupervisorError> {
        let Some(template) = &self.template else {
            return Err(SupervisorError::NotSimpleOneForOne);
        };
        self.next_instance += 1;
        let spec = template.instantiate(self.next_instance, args);
        match start_child(&spec, me).await {
            Ok(cell) => {
                self.events.emit(&spec.id, ChildEvent::Started);
                let child = Child {
                    spec,
                    status: Status::Running(cell),
                    restarts: 0,
                    dynamic: true,
                };
                let info = child.info();
                self.children.list.push(child);
                Ok(info)
            }
            Err(error) => {
                self.events.emit(
                    &spec.id,
                    ChildEvent::StartFailed {
                        error: error.clone(),
                    },
                );
                Err(SupervisorError::StartFailed {
                    child: spec.id,
                    reason: error,
                })
            }
        }
    }

    async fn terminate(&mut self, id: &str) -> Result<(), SupervisorError> {
        let pos = self
            .children
            .position(id)
            .ok_or_else(|| SupervisorError::NoSuchChild(id.to_owned()))?;
        let status = std::mem::replace(&mut self.children.list[pos].status, Status::Stopped);
        if let Status::Running(cell) = status {
            let outcome = stop_child(
                &cell,
                self.children.list[pos].spec.shutdown,
                SHUTDOWN_REASON,
            )
            .await;
            self.emit_stop(id, outcome);
        }
        let child = &self.children.list[pos];
        if child.dynamic || child.spec.restart == Restart::Temporary {
            self.children.remove(id);
            self.events.emit(id, ChildEvent::Removed);
        }
        Ok(())
    }

    async fn restart_by_request(
        &mut self,
        me: &ActorCell,
        id: &str,
    ) -> Result<ChildInfo, SupervisorError> {
        let pos = self
            .children
            .position(id)
            .ok_or_else(|| SupervisorError::NoSuchChild(id.to_owned()))?;
        if matches!(self.children.list[pos].status, Status::Running(_)) {
            return Err(SupervisorError::AlreadyRunning(id.to_owned()));
        }
        match start_child(&self.children.list[pos].spec, me).await {
            Ok(cell) => {
                self.children.list[pos].status = Status::Running(cell);
                self.events.emit(id, ChildEvent::Started);
                Ok(self.children.list[pos].info())
            }
            Err(error) => {
                self.events.emit(
                    id,
                    ChildEvent::StartFailed {
                        error: error.clone(),
                    },
                );
                Err(SupervisorError::StartFailed {
                    child: id.to_owned(),
                    reason: error,
                })
            }
        }
    }
}

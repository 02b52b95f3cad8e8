//! Declarative specs: what a supervisor starts ([`ChildSpec`], [`ChildTemplate`]) and how it
//! supervises ([`SupervisorSpec`]).
//!
//! A child is started by a *factory*: an async closure that receives the supervisor's
//! [`ActorCell`] and spawns the child **linked** to it (`spawn_linked(.., supervisor)`), so that
//! ractor delivers the child's exit to the supervisor. The factory is called again for every
//! restart, so it must build fresh actor arguments each time. [`ChildSpec::for_actor`] and
//! [`ChildSpec::supervisor`] cover the usual cases.

use std::any::{Any, type_name};
use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, SpawnErr};

use super::backoff::Backoff;
use super::error::SupervisorError;
use super::events::EventSender;
use super::strategy::{Restart, Strategy};
use super::supervisor::Supervisor;

/// A boxed, `Send` future (what the start factories return).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Starts one child linked to the supervisor given as argument; returns the child's cell.
pub type StartFn =
    Arc<dyn Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, SpawnErr>> + Send + Sync>;

/// Type-erased arguments of a dynamic child (`start_child(args)`), kept for its restarts.
pub type ChildArgs = Arc<dyn Any + Send + Sync>;

/// Starts one dynamic child from its arguments, linked to the supervisor given as argument.
pub type StartWithArgsFn = Arc<
    dyn Fn(ActorCell, ChildArgs) -> BoxFuture<'static, Result<ActorCell, SpawnErr>> + Send + Sync,
>;

/// How a child is stopped by its supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Ask it to stop, wait this long, then kill it.
    Timeout(Duration),
    /// Kill it at once.
    Brutal,
}

impl Shutdown {
    /// Default for workers: five seconds to stop gracefully.
    pub const DEFAULT: Shutdown = Shutdown::Timeout(Duration::from_secs(5));

    /// A graceful timeout of `ms` milliseconds (e.g. the config's `shutdown_timeout_ms`).
    pub fn from_millis(ms: u64) -> Self {
        Shutdown::Timeout(Duration::from_millis(ms))
    }

    /// The longest this shutdown can take before the kill (zero for `Brutal`).
    pub fn grace(self) -> Duration {
        match self {
            Shutdown::Timeout(d) => d,
            Shutdown::Brutal => Duration::ZERO,
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One statically declared child of a supervisor.
#[derive(Clone)]
pub struct ChildSpec {
    /// Unique among the supervisor's children; events and queries use it.
    pub id: String,
    /// When it is restarted.
    pub restart: Restart,
    /// How it is stopped.
    pub shutdown: Shutdown,
    /// The factory that spawns it linked to the supervisor.
    pub start: StartFn,
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("id", &self.id)
            .field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .finish_non_exhaustive()
    }
}

impl ChildSpec {
    /// A permanent child with the default shutdown, started by `start(supervisor_cell)`.
    pub fn new<F, Fut>(id: impl Into<String>, start: F) -> Self
    where
        F: Fn(ActorCell) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ActorCell, SpawnErr>> + Send + 'static,
    {
        Self {
            id: id.into(),
            restart: Restart::default(),
            shutdown: Shutdown::default(),
            start: Arc::new(move |sup| Box::pin(start(sup))),
        }
    }

    /// A child running actor `A`: `make()` builds a fresh handler and arguments for every
    /// (re)start, and the actor is spawned unnamed and linked to the supervisor.
    pub fn for_actor<A, F>(id: impl Into<String>, make: F) -> Self
    where
        A: Actor,
        F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
    {
        Self::new(id, move |sup: ActorCell| {
            let (handler, args) = make();
            async move {
                let (actor, _join) = A::spawn_linked(None, handler, args, sup).await?;
                Ok(actor.get_cell())
            }
        })
    }

    /// A child that is itself a supervisor running `spec` (a subtree). Its events are labelled
    /// with this child's id unless the spec has a label. Its shutdown timeout defaults to the
    /// sum of its static children's timeouts plus [`Shutdown::DEFAULT`], so that it has time to
    /// stop them in order; override it with [`ChildSpec::with_shutdown`] when it has many
    /// dynamic children.
    pub fn supervisor(id: impl Into<String>, spec: SupervisorSpec) -> Self {
        let id = id.into();
        let mut spec = spec;
        if spec.label.is_none() {
            spec.label = Some(id.clone());
        }
        let grace = spec
            .children
            .iter()
            .fold(Shutdown::DEFAULT.grace(), |acc, c| {
                acc.saturating_add(c.shutdown.grace())
            });
        let mut child = Self::new(id, move |sup: ActorCell| {
            let spec = spec.clone();
            async move {
                let (handle, _join) = Supervisor::spawn(None, spec, Some(sup))
                    .await
                    .map_err(|e| SpawnErr::StartupFailed(e.into()))?;
                Ok(handle.cell())
            }
        });
        child.shutdown = Shutdown::Timeout(grace);
        child
    }

    /// Sets the restart type.
    pub fn with_restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// Sets the shutdown.
    pub fn with_shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }
}

/// The one spec of the dynamic children of a `simple_one_for_one` supervisor. Each
/// `start_child(args)` creates an instance with id `"{id}-{n}"` (n = 1, 2, ...) whose factory
/// is called with those same `args` on every restart. Instances are stopped one by one in
/// reverse start order, like static children (OTP stops them concurrently), so give a
/// supervisor of many instances a shutdown that covers them all.
#[derive(Clone)]
pub struct ChildTemplate {
    /// Prefix of the instance ids.
    pub id: String,
    /// Restart type of every instance.
    pub restart: Restart,
    /// Shutdown of every instance.
    pub shutdown: Shutdown,
    /// The factory.
    pub start: StartWithArgsFn,
}

impl fmt::Debug for ChildTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildTemplate")
            .field("id", &self.id)
            .field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .finish_non_exhaustive()
    }
}

impl ChildTemplate {
    /// A template whose instances are started by `start(supervisor_cell, args)`. `start_child`
    /// must be given an `A`; other types make that start fail with a clear error.
    pub fn new<A, F, Fut>(id: impl Into<String>, start: F) -> Self
    where
        A: Clone + Send + Sync + 'static,
        F: Fn(ActorCell, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ActorCell, SpawnErr>> + Send + 'static,
    {
        let start: StartWithArgsFn =
            Arc::new(move |sup, args: ChildArgs| match args.downcast_ref::<A>() {
                Some(a) => Box::pin(start(sup, a.clone())),
                None => Box::pin(std::future::ready(Err(SpawnErr::StartupFailed(
                    format!("start_child arguments are not a `{}`", type_name::<A>()).into(),
                )))),
            });
        Self {
            id: id.into(),
            restart: Restart::default(),
            shutdown: Shutdown::default(),
            start,
        }
    }

    /// A template running actor `T`: `make(args)` builds handler and actor arguments.
    pub fn for_actor<T, A, F>(id: impl Into<String>, make: F) -> Self
    where
        T: Actor,
        A: Clone + Send + Sync + 'static,
        F: Fn(A) -> (T, T::Arguments) + Send + Sync + 'static,
    {
        Self::new(id, move |sup: ActorCell, a: A| {
            let (handler, args) = make(a);
            async move {
                let (actor, _join) = T::spawn_linked(None, handler, args, sup).await?;
                Ok(actor.get_cell())
            }
        })
    }

    /// Sets the restart type of the instances.
    pub fn with_restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// Sets the shutdown of the instances.
    pub fn with_shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// The spec of instance number `n` started with `args`.
    pub(crate) fn instantiate(&self, n: u64, args: ChildArgs) -> ChildSpec {
        let start = self.start.clone();
        ChildSpec {
            id: format!("{}-{n}", self.id),
            restart: self.restart,
            shutdown: self.shutdown,
            start: Arc::new(move |sup| start(sup, args.clone())),
        }
    }
}

/// Everything a [`Supervisor`] needs: strategy, restart intensity, backoff and children.
#[derive(Debug, Clone)]
pub struct SupervisorSpec {
    /// Restart strategy.
    pub strategy: Strategy,
    /// More than this many restarts within [`within`](Self::within) make the supervisor give up.
    pub max_restarts: u32,
    /// The restart-intensity window.
    pub within: Duration,
    /// Delay before restarts.
    pub backoff: Backoff,
    /// Static children, in start order (empty for `simple_one_for_one`).
    pub children: Vec<ChildSpec>,
    /// The template of dynamic children (only for `simple_one_for_one`).
    pub template: Option<ChildTemplate>,
    /// Event streams that see everything from the first start on.
    pub observers: Vec<EventSender>,
    /// Label used in events when the supervisor actor has no name.
    pub label: Option<String>,
    /// Stop (normally) once no child runs or waits for a restart (OTP's `auto_shutdown =
    /// all_significant`): a supervisor of one-off workers ends when their work is done.
    pub auto_shutdown: bool,
}

/// The stop reason of a supervisor that stopped itself because every child was done
/// ([`SupervisorSpec::auto_shutdown`]).
pub const ALL_DONE: &str = "every child is done";

impl SupervisorSpec {
    /// An empty spec with OTP's default intensity (1 restart within 5 s) and no backoff.
    pub fn new(strategy: Strategy) -> Self {
        Self {
            strategy,
            max_restarts: 1,
            within: Duration::from_secs(5),
            backoff: Backoff::None,
            children: Vec::new(),
            template: None,
            observers: Vec::new(),
            label: None,
            auto_shutdown: false,
        }
    }

    /// `one_for_one` with OTP defaults.
    pub fn one_for_one() -> Self {
        Self::new(Strategy::OneForOne)
    }

    /// `one_for_all` with OTP defaults.
    pub fn one_for_all() -> Self {
        Self::new(Strategy::OneForAll)
    }

    /// `rest_for_one` with OTP defaults.
    pub fn rest_for_one() -> Self {
        Self::new(Strategy::RestForOne)
    }

    /// `simple_one_for_one` over `template`, with OTP defaults.
    pub fn simple_one_for_one(template: ChildTemplate) -> Self {
        Self {
            template: Some(template),
            ..Self::new(Strategy::SimpleOneForOne)
        }
    }

    /// Sets the restart intensity.
    pub fn with_intensity(mut self, max_restarts: u32, within: Duration) -> Self {
        self.max_restarts = max_restarts;
        self.within = within;
        self
    }

    /// Stop once every child is done ([`SupervisorSpec::auto_shutdown`]).
    pub fn stop_when_done(mut self) -> Self {
        self.auto_shutdown = true;
        self
    }

    /// Sets the backoff.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Appends a static child (started after those already added).
    pub fn child(mut self, child: ChildSpec) -> Self {
        self.children.push(child);
        self
    }

    /// Adds an event stream that sees every event, including the initial starts.
    pub fn observer(mut self, tx: EventSender) -> Self {
        self.observers.push(tx);
        self
    }

    /// Sets the label used in events.
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Checks the spec: unique, non-empty child ids; a template iff `simple_one_for_one`.
    pub fn validate(&self) -> Result<(), SupervisorError> {
        let mut seen = HashSet::new();
        for c in &self.children {
            if c.id.is_empty() {
                return Err(SupervisorError::InvalidSpec("empty child id".into()));
            }
            if !seen.insert(c.id.as_str()) {
                return Err(SupervisorError::InvalidSpec(format!(
                    "duplicate child id `{}`",
                    c.id
                )));
            }
        }
        match (self.strategy, &self.template) {
            (Strategy::SimpleOneForOne, None) => Err(SupervisorError::InvalidSpec(
                "simple_one_for_one needs a child template".into(),
            )),
            (Strategy::SimpleOneForOne, Some(_)) if !self.children.is_empty() => Err(
                SupervisorError::InvalidSpec("simple_one_for_one takes no static children".into()),
            ),
            (s, Some(_)) if s != Strategy::SimpleOneForOne => {
                Err(SupervisorError::InvalidSpec(format!(
                    "a child template needs simple_one_for_one, not {}",
                    s.as_str()
                )))
            }
            _ => Ok(()),
        }
    }
}

//! Test helpers: a scriptable worker actor, a shared log, and event waiting with deadlines.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};

use super::events::{ChildEvent, EventReceiver, SupervisorEvent};
use super::handle::SupervisorHandle;
use super::spec::ChildSpec;

/// Ordered record of what workers did ("start:a", "stop:b").
#[derive(Debug, Clone, Default)]
pub(crate) struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub(crate) fn push(&self, entry: String) {
        self.0.lock().expect("log poisoned").push(entry);
    }

    pub(crate) fn entries(&self) -> Vec<String> {
        self.0.lock().expect("log poisoned").clone()
    }

    /// Entries starting with `prefix` (e.g. "stop:"), prefix removed.
    pub(crate) fn with_prefix(&self, prefix: &str) -> Vec<String> {
        self.entries()
            .iter()
            .filter_map(|e| e.strip_prefix(prefix).map(str::to_owned))
            .collect()
    }

    pub(crate) fn clear(&self) {
        self.0.lock().expect("log poisoned").clear();
    }
}

/// How a worker behaves at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Normal,
    FailStart,
}

/// A worker that logs its start and stop and does what it is told.
#[derive(Debug, Clone)]
pub(crate) struct Worker {
    pub(crate) name: String,
    pub(crate) log: Log,
    pub(crate) mode: Mode,
}

/// What a worker can be told.
#[derive(Debug)]
pub(crate) enum WorkerMsg {
    /// Fail (handler error): an abnormal exit.
    Fail,
    /// Stop itself gracefully: a normal exit.
    Exit,
    /// Busy for an hour: it will not see a stop request in the meantime.
    Block,
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _me: ActorRef<WorkerMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        if self.mode == Mode::FailStart {
            return Err(format!("{} refuses to start", self.name).into());
        }
        self.log.push(format!("start:{}", self.name));
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Fail => return Err(format!("{} crashed", self.name).into()),
            WorkerMsg::Exit => me.stop(Some("done".into())),
            WorkerMsg::Block => tokio::time::sleep(Duration::from_secs(3600)).await,
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<WorkerMsg>,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        self.log.push(format!("stop:{}", self.name));
        Ok(())
    }
}

/// A permanent child running a [`Worker`].
pub(crate) fn worker(name: &str, log: &Log) -> ChildSpec {
    worker_mode(name, log, Mode::Normal)
}

pub(crate) fn worker_mode(name: &str, log: &Log, mode: Mode) -> ChildSpec {
    let w = Worker {
        name: name.to_owned(),
        log: log.clone(),
        mode,
    };
    ChildSpec::for_actor(name, move || (w.clone(), ()))
}

/// The running cell of child `id`.
pub(crate) async fn cell_of(sup: &SupervisorHandle, id: &str) -> ActorCell {
    let info = sup.child(id).await.expect("child query");
    match info.cell {
        Some(cell) => cell,
        None => panic!("child `{id}` is not running: state {:?}", info.state),
    }
}

/// Tells child `id` of `sup` to do `msg`.
pub(crate) async fn tell(sup: &SupervisorHandle, id: &str, msg: WorkerMsg) {
    cell_of(sup, id)
        .await
        .send_message(msg)
        .unwrap_or_else(|_| panic!("could not message child `{id}`"));
}

/// Receives events until one matches (child, pred); returns it and everything before it.
/// Fails the test after 10 minutes of (virtual) silence, listing what was seen.
pub(crate) async fn wait_for(
    rx: &mut EventReceiver,
    child: &str,
    pred: impl Fn(&ChildEvent) -> bool,
) -> (SupervisorEvent, Vec<SupervisorEvent>) {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(600), rx.recv()).await {
            Ok(Some(e)) if e.child == child && pred(&e.event) => return (e, seen),
            Ok(Some(e)) => seen.push(e),
            Ok(None) => panic!("event stream closed waiting for `{child}`; seen {seen:#?}"),
            Err(_) => panic!("no matching event for `{child}`; seen {seen:#?}"),
        }
    }
}

/// Everything already queued in the stream, as (child, event) pairs.
pub(crate) fn drain(rx: &mut EventReceiver) -> Vec<(String, ChildEvent)> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push((e.child, e.event));
    }
    out
}

/// Lets every ready task run without advancing the (paused) clock much.
pub(crate) async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

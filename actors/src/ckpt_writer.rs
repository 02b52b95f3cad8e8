//! The checkpoint writer actor: writes one rank's shard of one checkpoint, reports its record to
//! the checkpoint coordinator, and stops.
//!
//! Writers are the children of a checkpoint's writers' supervisor (`one_for_one`, started by
//! the coordinator, [`crate::ckpt_coordinator`]), one per rank, each `transient`: a writer that
//! wrote its shard stops normally and stays stopped; a writer whose write fails (a storage error)
//! fails, and its supervisor restarts it (after the `[supervision]` backoff), and the new writer
//! writes the same shard again. When the restarts exceed the supervisor's restart intensity, the
//! supervisor gives up and the coordinator fails the checkpoint.
//!
//! The write runs in a task of its own, not in a handler, so a writer keeps answering its
//! supervisor (a stop is served at once, the task is aborted) while a large shard is written. The
//! writer holds its snapshot only weakly: the coordinator owns it, and when the coordinator
//! abandons the checkpoint there is nothing left to write. Writers of one checkpoint share a
//! semaphore that bounds how many shards are written at once.

use std::sync::{Arc, Weak};

use flotilla_ckpt::{CheckpointEngine, CkptError, ShardRecord, Snapshot};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::ckpt_coordinator::CoordinatorMsg;

/// Why a writer failed: it names the rank and step, and carries the storage (or encoding)
/// error. It is the exit reason its supervisor reports (`events.jsonl`) and escalates.
#[derive(Debug, thiserror::Error)]
#[error("writing the shard of rank {rank}, step {step}: {why}")]
pub struct WriteError {
    pub rank: usize,
    pub step: u64,
    pub why: CkptError,
}

/// What a writer is given at every (re)start.
#[derive(Debug, Clone)]
pub struct WriterArgs {
    pub step: u64,
    pub rank: usize,
    /// The rank's snapshot, owned by the coordinator.
    pub shard: Weak<Snapshot>,
    pub engine: CheckpointEngine,
    /// Where the record of the written shard goes.
    pub coordinator: ActorRef<CoordinatorMsg>,
    /// Shared by the checkpoint's writers: a permit per shard being written.
    pub slots: Arc<Semaphore>,
}

/// Messages to a writer (from its own write task).
#[derive(Debug)]
pub enum WriterMsg {
    /// The write ended: the shard's record, `None` when the checkpoint was abandoned, or why it
    /// failed.
    Done(Result<Option<ShardRecord>, CkptError>),
}

/// The writer actor.
#[derive(Debug, Default)]
pub struct CkptWriter;

/// A writer's state: its arguments and the write task in flight.
pub struct WriterState {
    args: WriterArgs,
    task: Option<JoinHandle<()>>,
}

impl Actor for CkptWriter {
    type Msg = WriterMsg;
    type State = WriterState;
    type Arguments = WriterArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<WriterMsg>,
        args: WriterArgs,
    ) -> Result<WriterState, ActorProcessingErr> {
        Ok(WriterState { args, task: None })
    }

    async fn post_start(
        &self,
        me: ActorRef<WriterMsg>,
        st: &mut WriterState,
    ) -> Result<(), ActorProcessingErr> {
        let (shard, engine, slots) = (
            st.args.shard.clone(),
            st.args.engine.clone(),
            Arc::clone(&st.args.slots),
        );
        st.task = Some(tokio::spawn(async move {
            let done = match slots.acquire_owned().await {
                Err(_) => Err(CkptError::Task("the writers' semaphore is closed".into())),
                Ok(_permit) => match shard.upgrade() {
                    // The strong reference is given to the engine, which drops it before it
                    // returns, so the coordinator gets the buffers back.
                    Some(snap) => engine.write_shard(snap).await.map(Some),
                    None => Ok(None),
                },
            };
            // The writer may be gone (stopped by its supervisor): nothing to report then.
            let _ = me.cast(WriterMsg::Done(done));
        }));
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<WriterMsg>,
        msg: WriterMsg,
        st: &mut WriterState,
    ) -> Result<(), ActorProcessingErr> {
        let WriterMsg::Done(done) = msg;
        st.task = None;
        let (step, rank) = (st.args.step, st.args.rank);
        match done {
            Ok(Some(record)) => {
                // The coordinator may be gone (the job is ending): the shard is simply not
                // committed then.
                let _ = st
                    .args
                    .coordinator
                    .cast(CoordinatorMsg::Written { step, record });
                me.stop(Some("written".into()));
                Ok(())
            }
            Ok(None) => {
                me.stop(Some("abandoned".into()));
                Ok(())
            }
            Err(why) => {
                tracing::warn!(rank, step, %why, "checkpoint shard write failed");
                Err(Box::new(WriteError { rank, step, why }))
            }
        }
    }

    async fn post_stop(
        &self,
        _me: ActorRef<WriterMsg>,
        st: &mut WriterState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(task) = st.task.take() {
            task.abort();
        }
        Ok(())
    }
}

//! Flotilla's actors, one per file, and the training job they run: the rank actor (its device
//! and training state, through its compute stream), the pipeline stage actors and the expert
//! shard that run the schedule's phases on it, the checkpoint coordinator and its writers, the
//! sentinel, the job driver under the controller's supervisor, and the run's files.

pub mod anomaly;
pub mod checkpoints;
pub mod ckpt_coordinator;
pub mod ckpt_writer;
pub mod comm;
mod driver;
pub mod error;
pub mod expert_shard;
pub mod faults;
pub mod job;
pub mod links;
pub mod model_config;
pub mod passes;
pub mod pipeline;
pub mod rank;
pub mod rank_tree;
mod ranks;
pub mod remote;
pub mod replicas;
mod rollback;
pub mod run_log;
pub mod schedule;
pub mod sentinel;
pub mod stage;
pub mod store;
pub mod stream;
pub mod wire;

pub use checkpoints::ResumeFrom;
pub use error::JobError;
pub use job::{StepRecord, Summary, train, train_from, train_with_faults};
pub use ranks::Fleet;

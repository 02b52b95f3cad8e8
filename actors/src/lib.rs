//! Flotilla's actors, one per file, and the training job they run: the rank actor (compute on
//! its own thread), the trainer it drives, the checkpoint coordinator and its writers, the job
//! driver under the controller's supervisor, and the run's files.

pub mod checkpoints;
pub mod ckpt_coordinator;
pub mod ckpt_writer;
pub mod comm;
pub mod error;
pub mod faults;
pub mod job;
mod kept_snapshot;
pub mod model_config;
pub mod pipeline;
pub mod rank;
pub mod replicas;
mod rollback;
pub mod run_log;
pub mod schedule;
pub mod trainer;

pub use checkpoints::ResumeFrom;
pub use error::JobError;
pub use job::{StepRecord, Summary, train, train_from, train_with_faults};

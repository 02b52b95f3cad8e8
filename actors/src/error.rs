//! Errors of the training job, each naming where it happened.

/// Why a job could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("config: {0}")]
    Config(String),
    #[error("model: {0}")]
    Model(String),
    #[error("data: {0}")]
    Data(String),
    #[error("optimizer: {0}")]
    Optim(String),
    #[error("storage: {0}")]
    Storage(#[from] flotilla_runtime::storage::StorageError),
    #[error("supervision: {0}")]
    Supervision(#[from] flotilla_runtime::supervision::SupervisorError),
    #[error("rank {rank} failed at step {step}: {why}")]
    RankFailed { rank: usize, step: u64, why: String },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The processes of a multi-process job: a control link, an agent, a rank process that
    /// could not start or rejoin.
    #[error("processes: {0}")]
    Processes(String),
}

impl From<crate::ckpt_coordinator::CheckpointError> for JobError {
    fn from(e: crate::ckpt_coordinator::CheckpointError) -> Self {
        JobError::Checkpoint(e.to_string())
    }
}

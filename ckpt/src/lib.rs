//! Flotilla's checkpoint engine: a rank's training state as a host-memory [`Snapshot`], its
//! on-storage form (a directory per step with one safetensors shard per rank and a self-checking
//! JSON manifest, committed atomically), and the [`CheckpointEngine`] that saves in the
//! foreground or the background, loads with verification, falls back past damaged checkpoints
//! and applies retention. All file access goes through the storage seam
//! (`flotilla_runtime::storage`).

pub mod engine;
pub mod format;
pub mod manifest;
pub mod snapshot;
pub mod verify;

pub use engine::{CheckpointEngine, CkptError, Loaded, SaveHandle, SaveReport, Which};
pub use manifest::Manifest;
pub use snapshot::{HostTensor, Layout, Moments, Snapshot, SnapshotError, SnapshotMeta};
pub use verify::VerifyReport;

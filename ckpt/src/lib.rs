//! Flotilla's checkpoint engine: a rank's training state as a host-memory [`Snapshot`], its
//! on-storage form (a directory per step with one safetensors shard per rank and a self-checking
//! JSON manifest, committed atomically), and the [`CheckpointEngine`] that saves in the
//! foreground or the background (or piece by piece, [`save`], for the checkpoint actors), loads with verification, falls back past damaged checkpoints
//! and applies retention; the peer replication of in-memory snapshots over the fabric
//! ([`replica`]); restoring a rank from the fastest sound source ([`restore`]); and loading onto
//! another DP/EP layout ([`reshard`]). File access goes through the storage seam
//! (`flotilla_runtime::storage`), except the shard writes of [`CheckpointEngine::local`]
//! ([`shard_io::write_local`]).

pub mod engine;
pub mod format;
pub mod manifest;
pub mod replica;
pub mod reshard;
pub mod restore;
pub mod save;
pub mod shard_io;
pub mod snapshot;
pub mod verify;

pub use engine::{CheckpointEngine, CkptError, Loaded, SaveReport, Which};
pub use manifest::Manifest;
pub use replica::{
    ReplicaError, ReplicaServer, ReplicaStore, fetch_replica, push_replica, replica_peers,
};
pub use restore::{OwnCopy, RestoreError, Restored, Restorer, Source};
pub use save::{Retention, SaveHandle, SaveLock, ShardRecord, reclaim};
pub use snapshot::{HostTensor, Layout, Moments, Snapshot, SnapshotError, SnapshotMeta};
pub use verify::VerifyReport;

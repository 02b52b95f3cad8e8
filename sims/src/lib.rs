//! The simulated cluster harness: runs a job whose config says `device = "sim"` through the
//! same actors as `flotilla train`, on tokio's paused clock, and reads what it did back: its
//! records and event log, a hash that pins the run ([`run`]), and its trace as spans per rank,
//! timed against the pipeline schedule's own timeline ([`timeline`]).
//!
//! Nothing here models the cluster itself: the device's costs are `model`'s `SimDevice`, the
//! links `runtime`'s `SimFabric`, the disks `runtime`'s `SimStorage`; this crate starts a job on
//! them and reports.

pub mod run;
pub mod timeline;

pub use run::{SimError, SimRun, run};

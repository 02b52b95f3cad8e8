//! Flotilla's runtime: supervision trees over ractor, the config schema, the clock and fabric
//! seams, the wire codec, the topology of ranks and groups, and metric names.

pub mod clock;
pub mod codec;
pub mod config;
pub mod control;
pub mod fabric;
pub mod metrics;
pub mod storage;
pub mod supervision;
pub mod topology;

//! A job whose ranks are processes: the controller, node agents and rank processes of
//! `flotilla launch` and `flotilla agent`, joined by the control plane
//! ([`flotilla_runtime::control`]) and, between ranks, the QUIC fabric.

pub mod agent;
pub mod controller;
mod hosts;
pub mod launch;
mod mesh;
pub mod msg;
pub mod proxy;
pub mod rank_process;

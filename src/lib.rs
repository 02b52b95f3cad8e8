//! Flotilla's public API for custom trainers: the crates re-exported under one roof.

pub use flotilla_actors as actors;
pub use flotilla_ckpt as ckpt;
pub use flotilla_collectives as collectives;
pub use flotilla_model as model;
pub use flotilla_runtime as runtime;
pub use flotilla_sims as sims;

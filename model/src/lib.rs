//! Flotilla's model: tensors and devices, the DeepSeek-V3 layers with explicit forward and
//! backward (input-grad B and weight-grad W), losses, the optimizer, the data pipeline and
//! HuggingFace safetensors interop. Pure computation: no async, no actors.
//!
//! Entry points: [`device::Device`] (with [`device::cpu::CpuDevice`] and [`device::sim::SimDevice`]),
//! [`config::ModelConfig`], [`model::DeepSeekV3`] (init, `forward_backward`, bias update) and its
//! stage API in [`stage`] (passes that stop at every expert exchange), [`hf`] load/save,
//! [`params::params_sha256`], [`flops`].

pub mod config;
pub mod data;
pub mod device;
pub mod flops;
pub mod hf;
pub mod layers;
pub mod model;
pub mod optim;
pub mod par;
pub mod params;
pub mod rng;
pub mod stage;
pub mod tensor;

pub use config::ModelConfig;
pub use device::cpu::CpuDevice;
pub use device::sim::{SimDevice, SimProfile};
pub use device::{Cost, Device};
pub use layers::ep::EpGroup;
pub use layers::local::LocalExperts;
pub use model::{Batch, DeepSeekV3, LossParts, StepOptions, StepOutput, Weights};
pub use params::params_sha256;
pub use stage::{
    BackwardPass, ForwardPass, PassError, StageCache, StageOutput, StageSpec, StageSplitError,
    Yield,
};
pub use tensor::Tensor;

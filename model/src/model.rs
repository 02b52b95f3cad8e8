//! The whole DeepSeek-V3: named weights, a seeded init, and a training step over a batch.
//!
//! [`DeepSeekV3::forward_backward`] runs the model as one pipeline stage holding everything
//! ([`crate::stage`] has the stage API that a pipeline-parallel runtime uses piecewise). Gradients go
//! into a [`Weights`] value of the same shapes (see [`DeepSeekV3::zero_grads`]).

use std::collections::BTreeMap;

use crate::config::{ConfigError, ModelConfig};
use crate::device::Device;
use crate::layers::block::Block;
use crate::layers::embedding::Embedding;
use crate::layers::ep::EpGroup;
use crate::layers::linear::Linear;
use crate::layers::local::LocalExperts;
use crate::layers::mtp::MtpLayer;
use crate::layers::rmsnorm::RmsNorm;
use crate::layers::router::ExpertLoad;
use crate::layers::zeros_like;
use crate::params::{Kind, Params};
use crate::stage::{BackwardPass, ForwardPass, PassError, StageSpec};
use crate::tensor::Tensor;

/// All of the model's tensors (and, in a second value, their gradients).
#[derive(Clone, Debug)]
pub struct Weights {
    /// `model.embed_tokens`.
    pub embed_tokens: Embedding,
    /// `model.layers.{i}` for `i < num_hidden_layers`.
    pub layers: Vec<Block>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head`.
    pub lm_head: Linear,
    /// MTP modules, `model.layers.{num_hidden_layers + k}` for `k < D`.
    pub mtp: Vec<MtpLayer>,
}

impl Params for Weights {
    fn visit<'a>(&'a self, _p: &str, f: &mut dyn FnMut(&str, &'a Tensor, Kind)) {
        self.embed_tokens.visit("model.embed_tokens.", f);
        for (i, l) in self.layers.iter().enumerate() {
            l.visit(&format!("model.layers.{i}."), f);
        }
        self.norm.visit("model.norm.", f);
        self.lm_head.visit("lm_head.", f);
        let n = self.layers.len();
        for (k, m) in self.mtp.iter().enumerate() {
            m.visit(&format!("model.layers.{}.", n + k), f);
        }
    }
    fn visit_mut(&mut self, _p: &str, f: &mut dyn FnMut(&str, &mut Tensor, Kind)) {
        self.embed_tokens.visit_mut("model.embed_tokens.", f);
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.visit_mut(&format!("model.layers.{i}."), f);
        }
        self.norm.visit_mut("model.norm.", f);
        self.lm_head.visit_mut("lm_head.", f);
        let n = self.layers.len();
        for (k, m) in self.mtp.iter_mut().enumerate() {
            m.visit_mut(&format!("model.layers.{}.", n + k), f);
        }
    }
    fn for_each_tensor<'a>(&'a self, f: &mut dyn FnMut(&'a Tensor)) {
        self.embed_tokens.for_each_tensor(f);
        for l in &self.layers {
            l.for_each_tensor(f);
        }
        self.norm.for_each_tensor(f);
        self.lm_head.for_each_tensor(f);
        for m in &self.mtp {
            m.for_each_tensor(f);
        }
    }
    fn for_each_tensor_mut(&mut self, f: &mut dyn FnMut(&mut Tensor)) {
        self.embed_tokens.for_each_tensor_mut(f);
        for l in &mut self.layers {
            l.for_each_tensor_mut(f);
        }
        self.norm.for_each_tensor_mut(f);
        self.lm_head.for_each_tensor_mut(f);
        for m in &mut self.mtp {
            m.for_each_tensor_mut(f);
        }
    }
}

impl Weights {
    /// The MoE of layer `layer` (decoder layers first, then the MTP modules' blocks), mutably.
    pub fn moe_mut(&mut self, layer: usize) -> Option<&mut crate::layers::moe::Moe> {
        let n = self.layers.len();
        match self.layers.get_mut(layer) {
            Some(b) => b.moe_mut(),
            None => self.mtp.get_mut(layer - n)?.block.moe_mut(),
        }
    }

    /// Trainable tensors by HF name, sorted (buffers left out).
    pub fn trainable(&self) -> BTreeMap<String, &Tensor> {
        let mut out = BTreeMap::new();
        self.visit("", &mut |n, t, k| {
            if k == Kind::Weight {
                out.insert(n.to_string(), t);
            }
        });
        out
    }
}

/// A micro-batch of token ids and HF-style labels (`-100` = ignore), `batch × seq`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub batch: usize,
    pub seq: usize,
}

impl Batch {
    /// A batch whose labels are its inputs (the usual causal-LM setup; the model shifts them).
    pub fn causal(input_ids: Vec<u32>, batch: usize, seq: usize) -> Batch {
        let labels = input_ids.iter().map(|&t| t as i64).collect();
        Batch {
            input_ids,
            labels,
            batch,
            seq,
        }
    }
}

/// Loss weights and outputs of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOptions {
    /// Sequence-wise balance loss α (0: off).
    pub balance_alpha: f32,
    /// MTP loss weight λ (the loss is `λ/D Σ_k L_k`; 0 skips the MTP modules).
    pub mtp_lambda: f32,
    /// Return the main logits.
    pub keep_logits: bool,
}

impl StepOptions {
    /// The config's α and λ, no logits.
    pub fn from_config(cfg: &ModelConfig) -> StepOptions {
        StepOptions {
            balance_alpha: cfg.balance_alpha(),
            mtp_lambda: cfg.mtp_lambda(),
            keep_logits: false,
        }
    }

    /// Plain HF causal-LM semantics (no balance loss, no MTP), logits kept: for parity tests.
    pub fn hf_parity() -> StepOptions {
        StepOptions {
            balance_alpha: 0.0,
            mtp_lambda: 0.0,
            keep_logits: true,
        }
    }
}

/// The parts of the training loss.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LossParts {
    /// Main cross-entropy (mean over counted targets).
    pub ce: f32,
    /// Weighted MTP loss `λ/D Σ_k L_k`.
    pub mtp: f32,
    /// Unweighted per-depth MTP losses `L_k`.
    pub mtp_per_depth: Vec<f32>,
    /// Sum over MoE layers of the sequence-wise balance loss (α included).
    pub balance: f32,
}

impl LossParts {
    /// The optimised objective `ce + mtp + balance`.
    pub fn total(&self) -> f32 {
        self.ce + self.mtp + self.balance
    }

    /// Adds another stage's parts (pipeline stages each report theirs).
    pub fn merge(&mut self, o: &LossParts) {
        self.ce += o.ce;
        self.mtp += o.mtp;
        self.balance += o.balance;
        if self.mtp_per_depth.is_empty() {
            self.mtp_per_depth = o.mtp_per_depth.clone();
        }
    }
}

/// What a training step returns besides the gradients.
#[derive(Debug)]
pub struct StepOutput {
    pub losses: LossParts,
    /// Main logits `[batch·seq, vocab]` when asked for.
    pub logits: Option<Tensor>,
    /// Router load of every MoE layer (MTP blocks included), in layer order.
    pub loads: Vec<ExpertLoad>,
}

/// A DeepSeek-V3 model: config plus weights on a device.
#[derive(Clone, Debug)]
pub struct DeepSeekV3 {
    pub config: ModelConfig,
    pub weights: Weights,
}

impl DeepSeekV3 {
    /// Deterministic init from `seed`: every linear / embedding `N(0, initializer_range²)` from a
    /// stream named after the tensor, norms 1, router biases 0. MTP depth = `num_nextn_predict_layers`.
    pub fn init(cfg: &ModelConfig, dev: &dyn Device, seed: u64) -> Result<DeepSeekV3, ConfigError> {
        cfg.validate()?;
        let std = cfg.initializer_range;
        let n = cfg.num_hidden_layers;
        let weights = Weights {
            embed_tokens: Embedding::init(
                dev,
                "model.embed_tokens.weight",
                cfg.vocab_size,
                cfg.hidden_size,
                std,
                seed,
            ),
            layers: (0..n)
                .map(|i| Block::init(dev, cfg, &format!("model.layers.{i}."), i, seed))
                .collect(),
            norm: RmsNorm::init(dev, cfg.hidden_size, cfg.rms_norm_eps as f32),
            lm_head: Linear::init(
                dev,
                "lm_head.weight",
                cfg.vocab_size,
                cfg.hidden_size,
                std,
                seed,
            ),
            mtp: (0..cfg.num_nextn_predict_layers)
                .map(|k| MtpLayer::init(dev, cfg, n + k, seed))
                .collect(),
        };
        Ok(DeepSeekV3 {
            config: cfg.clone(),
            weights,
        })
    }

    /// Number of MTP modules present.
    pub fn mtp_depth(&self) -> usize {
        self.weights.mtp.len()
    }

    /// A zeroed gradient buffer shaped like the weights.
    pub fn zero_grads(&self, dev: &dyn Device) -> Weights {
        zeros_like(&self.weights, dev)
    }

    /// All tensors by HF name (sorted), buffers included.
    pub fn named(&self) -> BTreeMap<String, &Tensor> {
        crate::params::named(&self.weights)
    }

    /// Visits every tensor (weights and buffers) by HF name, mutably.
    pub fn weights_visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        self.weights.visit_mut("", &mut |n, t, _| f(n, t));
    }

    /// [`crate::params::params_sha256`] of the weights.
    pub fn params_sha256(&self, dev: &dyn Device) -> Option<String> {
        crate::params::params_sha256(&self.weights, dev)
    }

    /// One training step on one micro-batch: forward, B and W over the whole model, every
    /// routed expert on this rank. Gradients are *accumulated* into `grads` (zero it between
    /// optimizer steps).
    pub fn forward_backward(
        &self,
        dev: &dyn Device,
        batch: &Batch,
        opts: &StepOptions,
        grads: &mut Weights,
    ) -> Result<StepOutput, PassError> {
        let spec = StageSpec::whole(&self.config);
        let mut result = None;
        // On the device's threads, so that the stages' `Device::join`s cost next to nothing.
        dev.on_device_threads(&mut || {
            result = Some((|| {
                let mut experts = LocalExperts::default();
                let mut f = ForwardPass::new(&spec, batch.clone(), None, opts, EpGroup::ALONE)?;
                self.drive_local(dev, &mut experts, |back| f.step(self, dev, back))?;
                let (out, cache) = f.finish()?;
                let mut b = BackwardPass::new(cache, None)?;
                self.drive_local(dev, &mut experts, |back| b.step(self, dev, back))?;
                let (_, cache) = b.finish()?;
                self.stage_backward_weight(dev, cache, grads, Some(&mut experts))?;
                Ok(StepOutput {
                    losses: out.losses,
                    logits: out.logits,
                    loads: out.loads,
                })
            })());
        });
        result.expect("the step ran")
    }

    /// Forward only (losses, optional logits, loads); no gradients.
    pub fn forward(
        &self,
        dev: &dyn Device,
        batch: &Batch,
        opts: &StepOptions,
    ) -> Result<StepOutput, PassError> {
        let spec = StageSpec::whole(&self.config);
        let mut experts = LocalExperts::default();
        let mut f = ForwardPass::new(&spec, batch.clone(), None, opts, EpGroup::ALONE)?;
        self.drive_local(dev, &mut experts, |back| f.step(self, dev, back))?;
        let (out, _cache) = f.finish()?;
        Ok(StepOutput {
            losses: out.losses,
            logits: out.logits,
            loads: out.loads,
        })
    }

    /// Auxiliary-loss-free balancing: moves every MoE layer's router bias by
    /// `−γ·sign(load − mean)` for the given loads (summed over the global batch by the caller).
    pub fn update_biases(&mut self, dev: &dyn Device, loads: &[ExpertLoad], gamma: f32) {
        let n = self.weights.layers.len();
        for load in loads {
            let block = if load.layer < n {
                self.weights.layers.get_mut(load.layer)
            } else {
                self.weights
                    .mtp
                    .get_mut(load.layer - n)
                    .map(|m| &mut m.block)
            };
            if let Some(Block {
                mlp: crate::layers::block::Ffn::Moe(moe),
                ..
            }) = block
            {
                moe.gate.update_bias(dev, &load.counts, gamma);
            }
        }
    }
}

//! `ModelConfig`: the DeepSeek-V3 hyper-parameters under HuggingFace `config.json` field names.
//!
//! Deserialises an HF `config.json` (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
//! `rope_parameters`) and serialises back; fields this crate does not use are kept in `extra` so a
//! load/save round trip preserves the file's content. Flotilla's training knobs that HF has no
//! field for (balance-loss α, bias-update γ, MTP λ) are optional extra fields, written only when set.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Invalid model hyper-parameters.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config: {field}: {why}")]
    Invalid { field: &'static str, why: String },
}

fn invalid(field: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        why: why.into(),
    }
}

/// HF `rope_parameters` (5.x) or `rope_scaling` (4.x): the RoPE variant and its parameters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// 4.x spelling of `rope_type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The RoPE variant resolved from the config.
#[derive(Clone, Debug, PartialEq)]
pub enum Rope {
    /// Plain RoPE with base `theta`.
    Default { theta: f64 },
    /// YaRN (HF `_compute_yarn_parameters`).
    Yarn {
        theta: f64,
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

fn default_true() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-6
}
fn default_init() -> f64 {
    0.02
}
fn default_act() -> String {
    "silu".to_string()
}
fn default_max_pos() -> usize {
    4096
}

/// DeepSeek-V3 model hyper-parameters (HF field names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense SwiGLU MLP (layers below `first_k_dense_replace`).
    pub intermediate_size: usize,
    /// Width of one routed expert (and of one shared expert).
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    pub n_shared_experts: usize,
    pub n_routed_experts: usize,
    pub routed_scaling_factor: f64,
    pub kv_lora_rank: usize,
    /// `None` (JSON null): a plain `q_proj` instead of `q_a_proj → q_a_layernorm → q_b_proj`.
    pub q_lora_rank: Option<usize>,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub qk_nope_head_dim: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub num_experts_per_tok: usize,
    pub first_k_dense_replace: usize,
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_true")]
    pub rope_interleave: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// MTP depth D (DeepSeek-V3: 1).
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    /// transformers 5.x RoPE settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// transformers 4.x RoPE base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// transformers 4.x RoPE scaling (YaRN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    /// Flotilla: sequence-wise balance loss weight α (default 1e-4; 0 switches it off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_loss_alpha: Option<f64>,
    /// Flotilla / DeepSeek remote code: whether the sequence-wise balance loss is on (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_aux: Option<bool>,
    /// Flotilla: bias update speed γ of auxiliary-loss-free balancing (default 0.001).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias_update_speed: Option<f64>,
    /// Flotilla: MTP loss weight λ (default 0.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtp_loss_weight: Option<f64>,
    /// Every other field of `config.json`, kept verbatim for the round trip.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ModelConfig {
    /// Parses and validates an HF `config.json` text.
    pub fn from_json(text: &str) -> Result<ModelConfig, ConfigError> {
        let c: ModelConfig = serde_json::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    /// The config as pretty JSON (HF field names).
    pub fn to_json(&self) -> Result<String, ConfigError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Flotilla's built-in default: a tiny DeepSeek-V3 (hidden 64, 2 layers — 1 dense, 1 MoE with
    /// 8 routed experts of width 32 and 1 shared, top-2 in 2 groups — MLA with q/kv LoRA, byte
    /// vocabulary, 1 MTP module).
    pub fn tiny() -> ModelConfig {
        ModelConfig {
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 96,
            moe_intermediate_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(4),
            n_shared_experts: 1,
            n_routed_experts: 8,
            routed_scaling_factor: 2.5,
            kv_lora_rank: 16,
            q_lora_rank: Some(32),
            qk_rope_head_dim: 8,
            v_head_dim: 16,
            qk_nope_head_dim: 16,
            n_group: 2,
            topk_group: 1,
            num_experts_per_tok: 2,
            first_k_dense_replace: 1,
            norm_topk_prob: true,
            hidden_act: "silu".into(),
            max_position_embeddings: 256,
            initializer_range: 0.02,
            rms_norm_eps: 1e-6,
            rope_interleave: true,
            tie_word_embeddings: false,
            num_nextn_predict_layers: 1,
            rope_parameters: Some(RopeParameters {
                rope_type: Some("default".into()),
                rope_theta: Some(10000.0),
                ..Default::default()
            }),
            rope_theta: None,
            rope_scaling: None,
            aux_loss_alpha: None,
            seq_aux: None,
            bias_update_speed: None,
            mtp_loss_weight: None,
            extra: Map::new(),
        }
    }

    /// Checks the constraints the implementation relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nz = |v: usize, f: &'static str| {
            if v == 0 {
                Err(invalid(f, "must be > 0"))
            } else {
                Ok(())
            }
        };
        nz(self.vocab_size, "vocab_size")?;
        nz(self.hidden_size, "hidden_size")?;
        nz(self.num_attention_heads, "num_attention_heads")?;
        nz(self.kv_lora_rank, "kv_lora_rank")?;
        nz(self.n_group, "n_group")?;
        if self.hidden_act != "silu" {
            return Err(invalid(
                "hidden_act",
                format!("only \"silu\" is supported, got {:?}", self.hidden_act),
            ));
        }
        if self.tie_word_embeddings {
            return Err(invalid(
                "tie_word_embeddings",
                "tied embeddings are not supported",
            ));
        }
        if self.qk_rope_head_dim == 0 || !self.qk_rope_head_dim.is_multiple_of(2) {
            return Err(invalid("qk_rope_head_dim", "must be even and > 0"));
        }
        if let Some(kv) = self.num_key_value_heads
            && kv != self.num_attention_heads
        {
            return Err(invalid(
                "num_key_value_heads",
                "MLA needs num_key_value_heads == num_attention_heads",
            ));
        }
        if self.first_k_dense_replace < self.num_hidden_layers || self.num_nextn_predict_layers > 0
        {
            nz(self.n_routed_experts, "n_routed_experts")?;
            if !self.n_routed_experts.is_multiple_of(self.n_group) {
                return Err(invalid("n_group", "must divide n_routed_experts"));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return Err(invalid("topk_group", "must be in 1..=n_group"));
            }
            let reachable = self.topk_group * (self.n_routed_experts / self.n_group);
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > reachable {
                return Err(invalid(
                    "num_experts_per_tok",
                    format!("must be in 1..={reachable} (experts in the kept groups)"),
                ));
            }
        }
        self.rope()?;
        Ok(())
    }

    /// The RoPE variant (5.x `rope_parameters` first, then 4.x `rope_theta` + `rope_scaling`).
    pub fn rope(&self) -> Result<Rope, ConfigError> {
        let p = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = p
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let kind = p
            .and_then(|p| p.rope_type.clone().or(p.type_.clone()))
            .unwrap_or_else(|| "default".into());
        match (kind.as_str(), p) {
            ("default", _) | (_, None) => Ok(Rope::Default { theta }),
            ("yarn", Some(p)) => {
                let original = p.original_max_position_embeddings.ok_or_else(|| {
                    invalid(
                        "rope_parameters",
                        "yarn needs original_max_position_embeddings",
                    )
                })?;
                let factor = p
                    .factor
                    .unwrap_or(self.max_position_embeddings as f64 / original as f64);
                Ok(Rope::Yarn {
                    theta,
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: p.beta_fast.unwrap_or(32.0),
                    beta_slow: p.beta_slow.unwrap_or(1.0),
                    mscale: p.mscale,
                    mscale_all_dim: p.mscale_all_dim,
                    attention_factor: p.attention_factor,
                    truncate: p.truncate.unwrap_or(true),
                })
            }
            (other, _) => Err(invalid(
                "rope_parameters",
                format!("rope_type {other:?} is not supported (default, yarn)"),
            )),
        }
    }

    /// Per-head query/key width `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether decoder layer `i` (MTP layers included, `i >= num_hidden_layers`) has a MoE MLP.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        i >= self.first_k_dense_replace
    }

    /// Balance-loss weight α in effect (0 when switched off).
    pub fn balance_alpha(&self) -> f32 {
        if self.seq_aux == Some(false) {
            0.0
        } else {
            self.aux_loss_alpha.unwrap_or(1e-4) as f32
        }
    }

    /// Bias update speed γ.
    pub fn bias_gamma(&self) -> f32 {
        self.bias_update_speed.unwrap_or(0.001) as f32
    }

    /// MTP loss weight λ.
    pub fn mtp_lambda(&self) -> f32 {
        self.mtp_loss_weight.unwrap_or(0.3) as f32
    }
}

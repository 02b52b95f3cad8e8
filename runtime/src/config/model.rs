//! `[model]`: the DeepSeek-V3 architecture, with HuggingFace `DeepseekV3Config` field names.
//!
//! The defaults describe a tiny model (~0.3 M parameters, two layers, eight routed experts) that
//! trains on the built-in corpus on two CPU cores in about a minute. Field names match
//! HuggingFace's `config.json` so that `model.hf_dir` imports and exports line up key for key;
//! the few Flotilla-only knobs (MTP weight, bias update speed, sequence-wise aux loss) are named
//! after the DeepSeek-V3 report's symbols in their doc comments.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::enums::{Precision, RopeScalingKind};

/// The model architecture and its training-only hyper-parameters (`[model]`).
///
/// Missing keys take the value of [`ModelSection::default`]. Cross-field rules (divisibility of
/// experts into groups, top-k bounds, ...) live in `validate.rs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Vocabulary size (byte-level text needs at least 256).
    pub vocab_size: usize,
    /// Model width d.
    pub hidden_size: usize,
    /// FFN width of the dense layers (the first `first_k_dense_replace` layers).
    pub intermediate_size: usize,
    /// FFN width of each routed and shared expert.
    pub moe_intermediate_size: usize,
    /// Number of transformer layers (not counting MTP modules).
    pub num_hidden_layers: usize,
    /// The first k layers use a dense FFN instead of MoE.
    pub first_k_dense_replace: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Rank of the query low-rank compression (MLA). `None` means no q LoRA: a plain `q_proj`.
    /// In TOML an absent key means the default (32) and `q_lora_rank = 0` means `None`.
    #[serde(with = "q_lora")]
    pub q_lora_rank: Option<usize>,
    /// Rank of the joint key/value compression (MLA's d_c).
    pub kv_lora_rank: usize,
    /// Per-head query/key dimension without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key dimension carrying RoPE (decoupled key, shared across heads). Even.
    pub qk_rope_head_dim: usize,
    /// Per-head value dimension.
    pub v_head_dim: usize,
    /// Routed experts per MoE layer (N_r).
    pub n_routed_experts: usize,
    /// Shared experts per MoE layer (N_s).
    pub n_shared_experts: usize,
    /// Routed experts activated per token (K_r).
    pub num_experts_per_tok: usize,
    /// Expert groups for group-limited routing.
    pub n_group: usize,
    /// Groups a token may route to.
    pub topk_group: usize,
    /// Normalise the selected gate weights to sum to one.
    pub norm_topk_prob: bool,
    /// Scale applied to the routed experts' output.
    pub routed_scaling_factor: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// Interleaved (GPT-J style) RoPE pairs, as DeepSeek's checkpoints use.
    pub rope_interleave: bool,
    /// Longest sequence the model supports.
    pub max_position_embeddings: usize,
    /// Multi-token prediction depth D (number of MTP modules; 0 turns MTP off).
    pub num_nextn_predict_layers: usize,
    /// Weight λ of the MTP loss.
    pub mtp_lambda: f64,
    /// Bias update speed γ of auxiliary-loss-free load balancing.
    pub bias_update_speed: f64,
    /// Weight α of the complementary sequence-wise balance loss (0 turns it off).
    pub seq_aux_alpha: f64,
    /// Standard deviation of the random initialisation (HuggingFace's `initializer_range`).
    pub init_std: f64,
    /// Load weights from this HuggingFace DeepseekV3 directory (`config.json` +
    /// `*.safetensors`) instead of initialising randomly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hf_dir: Option<PathBuf>,
    /// RoPE scaling (`[model.rope_scaling]`); absent means plain RoPE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// How GEMMs round their inputs: "fp32", or "bf16" (CUDA only). Not serialized when "fp32",
    /// so configs without it keep their canonical text and hash.
    #[serde(skip_serializing_if = "is_fp32")]
    pub precision: Precision,
}

fn is_fp32(p: &Precision) -> bool {
    *p == Precision::Fp32
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 128,
            moe_intermediate_size: 32,
            num_hidden_layers: 2,
            first_k_dense_replace: 1,
            num_attention_heads: 4,
            q_lora_rank: Some(32),
            kv_lora_rank: 16,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 8,
            v_head_dim: 16,
            n_routed_experts: 8,
            n_shared_experts: 1,
            num_experts_per_tok: 2,
            n_group: 2,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_interleave: true,
            max_position_embeddings: 256,
            num_nextn_predict_layers: 1,
            mtp_lambda: 0.3,
            bias_update_speed: 0.001,
            seq_aux_alpha: 1e-4,
            init_std: 0.02,
            hf_dir: None,
            rope_scaling: None,
            precision: Precision::Fp32,
        }
    }
}

impl ModelSection {
    /// Per-head query/key dimension: `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim.saturating_add(self.qk_rope_head_dim)
    }

    /// Number of MoE layers: `num_hidden_layers - first_k_dense_replace`.
    pub fn num_moe_layers(&self) -> usize {
        self.num_hidden_layers
            .saturating_sub(self.first_k_dense_replace)
    }

    /// Layers a pipeline cuts into stages: the transformer layers plus the MTP modules.
    pub fn pipeline_layers(&self) -> usize {
        self.num_hidden_layers
            .saturating_add(self.num_nextn_predict_layers)
    }
}

/// `[model.rope_scaling]`: YaRN context extension, HuggingFace's `rope_scaling` dict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RopeScaling {
    /// The method; only `"yarn"`.
    #[serde(rename = "type")]
    pub kind: RopeScalingKind,
    /// Context extension factor s (>= 1; 1 is a no-op).
    pub factor: f64,
    /// The context length the model was trained at before extension; `None` (absent) means
    /// `model.max_position_embeddings`, as in HuggingFace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// YaRN β_fast (high-frequency boundary, in rotations).
    pub beta_fast: f64,
    /// YaRN β_slow (low-frequency boundary, in rotations).
    pub beta_slow: f64,
    /// Attention temperature multiplier.
    pub mscale: f64,
    /// Temperature of the softmax scale (DeepSeek applies `yarn_get_mscale(factor,
    /// mscale_all_dim)²` to the attention scale; 0 leaves it alone).
    pub mscale_all_dim: f64,
}

impl Default for RopeScaling {
    fn default() -> Self {
        RopeScaling {
            kind: RopeScalingKind::Yarn,
            factor: 1.0,
            original_max_position_embeddings: None,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 0.0,
        }
    }
}

/// `q_lora_rank` is `Option<usize>` in Rust and a plain integer in TOML, where 0 means `None`.
mod q_lora {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        value: &Option<usize>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        // `usize` always fits `u64` on the platforms Rust supports.
        serializer.serialize_u64(value.unwrap_or(0) as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<usize>, D::Error> {
        let rank = usize::deserialize(deserializer)?;
        Ok((rank != 0).then_some(rank))
    }
}

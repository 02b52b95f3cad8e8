//! From the job config's `[model]` section to the model crate's HF-style `ModelConfig`.

use flotilla_model::ModelConfig;
use flotilla_runtime::config::{ModelSection, RopeScalingKind};
use serde_json::{Value, json};

use crate::error::JobError;

/// The `[model]` section as an HF `config.json` value (what `ModelConfig` reads).
pub fn hf_config_json(m: &ModelSection) -> Value {
    let rope_parameters = match &m.rope_scaling {
        None => json!({"rope_type": "default", "rope_theta": m.rope_theta}),
        Some(s) => {
            let kind = match s.kind {
                RopeScalingKind::Yarn => "yarn",
            };
            json!({
                "rope_type": kind,
                "rope_theta": m.rope_theta,
                "factor": s.factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "beta_fast": s.beta_fast,
                "beta_slow": s.beta_slow,
                "mscale": s.mscale,
                "mscale_all_dim": s.mscale_all_dim,
            })
        }
    };
    json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "moe_intermediate_size": m.moe_intermediate_size,
        "num_hidden_layers": m.num_hidden_layers,
        "first_k_dense_replace": m.first_k_dense_replace,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_attention_heads,
        // `q_lora_rank = 0` in the job config means a plain q_proj (HF: null).
        "q_lora_rank": m.q_lora_rank.filter(|&r| r > 0),
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "n_routed_experts": m.n_routed_experts,
        "n_shared_experts": m.n_shared_experts,
        "num_experts_per_tok": m.num_experts_per_tok,
        "n_group": m.n_group,
        "topk_group": m.topk_group,
        "norm_topk_prob": m.norm_topk_prob,
        "routed_scaling_factor": m.routed_scaling_factor,
        "rms_norm_eps": m.rms_norm_eps,
        "rope_interleave": m.rope_interleave,
        "max_position_embeddings": m.max_position_embeddings,
        "num_nextn_predict_layers": m.num_nextn_predict_layers,
        "initializer_range": m.init_std,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "rope_parameters": rope_parameters,
        "aux_loss_alpha": m.seq_aux_alpha,
        "seq_aux": m.seq_aux_alpha > 0.0,
        "bias_update_speed": m.bias_update_speed,
        "mtp_loss_weight": m.mtp_lambda,
    })
}

/// Build the model crate's config from the job config's `[model]` section.
pub fn model_config(m: &ModelSection) -> Result<ModelConfig, JobError> {
    let text = hf_config_json(m).to_string();
    ModelConfig::from_json(&text).map_err(|e| JobError::Model(format!("[model]: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_runtime::config::Config;

    #[test]
    fn default_section_converts_and_keeps_its_numbers() {
        let c = Config::default();
        let m = model_config(&c.model).expect("default model converts");
        assert_eq!(m.hidden_size, c.model.hidden_size);
        assert_eq!(m.n_routed_experts, c.model.n_routed_experts);
        assert_eq!(m.num_nextn_predict_layers, c.model.num_nextn_predict_layers);
        assert!((m.mtp_lambda() as f64 - c.model.mtp_lambda).abs() < 1e-6);
    }

    #[test]
    fn zero_q_lora_rank_means_plain_q_proj() {
        let mut c = Config::default();
        c.model.q_lora_rank = Some(0);
        assert_eq!(model_config(&c.model).expect("converts").q_lora_rank, None);
    }
}

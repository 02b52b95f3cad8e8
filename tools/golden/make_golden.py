"""Generate golden vectors from HuggingFace transformers' DeepseekV3 for Flotilla's parity tests.

Same recipe as ../shared/golden/deepseek_v3_tiny (see its README): float32, eager attention,
random weights (normal std 0.08; RMSNorm weights 1 + 0.1*N(0,1); e_score_correction_bias
0.05*N(0,1)), a random batch, and d loss / d parameter under the on-disk HF keys.

Usage: python3 make_golden.py OUT_DIR   (writes OUT_DIR/<case>/{config.json, model.safetensors,
io.safetensors, grads.safetensors})
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True, max_position_embeddings=256,
    rms_norm_eps=1e-6, num_nextn_predict_layers=1, tie_word_embeddings=False,
)

CASES = {
    # q_lora_rank unset -> plain q_proj; narrower model; other batch shape
    "no_q_lora": (dict(q_lora_rank=None, hidden_size=48, num_hidden_layers=2), (3, 17)),
    # several dense layers, 4 groups keep 2, more experts, top-4, two shared experts
    "dense2_groups4": (dict(num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=16,
                            num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=2), (2, 20)),
    # wider, other head dims, three shared experts, no top-k normalisation, one group
    "wide_shared3": (dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6,
                          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, kv_lora_rank=24,
                          q_lora_rank=48, n_shared_experts=3, norm_topk_prob=False,
                          routed_scaling_factor=1.0, n_group=1, topk_group=1, intermediate_size=160,
                          moe_intermediate_size=24), (2, 16)),
    # YaRN rope scaling and non-interleaved rope
    "yarn_nointerleave": (dict(rope_interleave=False, max_position_embeddings=256,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                "factor": 4.0, "original_max_position_embeddings": 64,
                                                "beta_fast": 32.0, "beta_slow": 1.0,
                                                "mscale": 1.0, "mscale_all_dim": 1.0}), (2, 40)),
}


def init_weights(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))


def map_grads(model, on_disk):
    """Return {on-disk key: grad}, resolving fused expert parameters by matching saved values."""
    params = dict(model.named_parameters())
    out = {}
    for key, saved in on_disk.items():
        if key in params:
            if params[key].grad is not None:
                out[key] = params[key].grad.detach().clone()
            continue
        if "e_score_correction_bias" in key:
            continue
        # a per-expert key whose parameter is fused: find the slice that holds these values
        prefix = key.split(".experts.")[0] + ".experts."
        j = int(key.split(".experts.")[1].split(".")[0])
        found = None
        for pname, p in params.items():
            if not pname.startswith(prefix) or p.dim() != 3:
                continue
            pj = p[j].detach()
            g = p.grad[j]
            rows = saved.shape[0]
            cands = []
            for t in (False, True):
                a, ga = (pj.t(), g.t()) if t else (pj, g)
                if a.shape == saved.shape:
                    cands.append((a, ga))
                if a.shape[1] == saved.shape[1] and a.shape[0] == 2 * rows:
                    cands.append((a[:rows], ga[:rows]))
                    cands.append((a[rows:], ga[rows:]))
            for a, ga in cands:
                if torch.equal(a, saved):
                    found = ga.contiguous().clone()
                    break
            if found is not None:
                break
        if found is None:
            raise SystemExit(f"no parameter slice matches {key}")
        out[key] = found
    return out


def make_case(name, overrides, batch, out_dir, seed):
    cfg = dict(BASE)
    cfg.update(overrides)
    config = DeepseekV3Config(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).float()
    gen = torch.Generator().manual_seed(seed)
    init_weights(model, gen)
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    on_disk = load_file(os.path.join(d, "model.safetensors"))
    b, t = batch
    input_ids = torch.randint(0, cfg["vocab_size"], (b, t), generator=gen)
    labels = torch.randint(0, cfg["vocab_size"], (b, t), generator=gen)
    model.train()
    out = model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    save_file({"input_ids": input_ids.contiguous(), "labels": labels.contiguous(),
               "logits": out.logits.detach().float().contiguous(),
               "loss": out.loss.detach().reshape(1).float()}, os.path.join(d, "io.safetensors"))
    grads = map_grads(model, on_disk)
    save_file({k: v.float().contiguous() for k, v in grads.items()}, os.path.join(d, "grads.safetensors"))
    print(f"{name}: loss {out.loss.item():.6f}, {len(on_disk)} tensors, {len(grads)} grads, keys ok")


def main():
    out_dir = sys.argv[1]
    for i, (name, (ov, batch)) in enumerate(CASES.items()):
        make_case(name, ov, batch, out_dir, seed=1000 + i)


if __name__ == "__main__":
    main()

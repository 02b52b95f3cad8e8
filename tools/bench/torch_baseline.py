#!/usr/bin/env python3
"""PyTorch baseline for `flotilla bench step --device cuda` (issue #9): trains HuggingFace
transformers' DeepseekV3ForCausalLM on one GPU, eager and under torch.compile, and prints one
JSON line per mode with tokens/s, MFU and peak GPU memory.

Precision: fp32 master weights and AdamW state with bf16 compute (torch.autocast, the default),
the whole model in bf16 (--weights bf16: weights, gradients and AdamW state), or fp32
throughout (--precision fp32). Data: uniform random tokens (the step's cost does not depend on them beyond
the routing). MFU counts the FLOPs of the step's matrix products as `model/src/flops.rs` does:
2·m·n·k per GEMM of forward, B and W (6 per active parameter per token for the linear layers),
attention as full T×T blocks (forward 2·T²·(d_qk + d_v) per head, backward twice that), routed
experts perfectly balanced (top-k of them per token), the vocabulary head included, the
embedding excluded. The HF model has no multi-token-prediction module, so none is counted.

Usage (on the GPU machine):
    python3 tools/bench/torch_baseline.py                 # both modes, the issue's config
    python3 tools/bench/torch_baseline.py --modes eager --steps 10
"""

import argparse
import json
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--hidden", type=int, default=1024)
    a("--layers", type=int, default=8)
    a("--heads", type=int, default=16)
    a("--dense-width", type=int, default=2816, help="intermediate_size of the dense layers")
    a("--first-dense", type=int, default=1, help="first_k_dense_replace")
    a("--experts", type=int, default=64)
    a("--topk", type=int, default=6)
    a("--shared", type=int, default=1)
    a("--moe-width", type=int, default=512)
    a("--groups", type=int, default=8)
    a("--topk-groups", type=int, default=4)
    a("--q-rank", type=int, default=384)
    a("--kv-rank", type=int, default=256)
    a("--qk-nope", type=int, default=128)
    a("--qk-rope", type=int, default=64)
    a("--v-dim", type=int, default=128)
    a("--vocab", type=int, default=32000)
    a("--batch", type=int, default=4)
    a("--seq", type=int, default=2048)
    a("--precision", choices=["bf16", "fp32"], default="bf16")
    a("--weights", choices=["fp32", "bf16"], default="fp32",
      help="fp32: fp32 master weights and AdamW state with bf16 autocast (Flotilla's bf16 mode); "
           "bf16: the model itself in bf16 (weights, gradients and AdamW state), no autocast")
    a("--modes", default="eager,compile", help="comma-separated: eager, compile")
    a("--warmup", type=int, default=3)
    a("--steps", type=int, default=10)
    a("--lr", type=float, default=1e-4)
    a("--peak-tflops", type=float, default=989.0,
      help="the GPU's dense bf16 (or tf32) peak, for MFU; H100/H200 SXM bf16: 989")
    a("--seed", type=int, default=0)
    return p.parse_args()


def step_flops_per_token(c):
    """FLOPs per token of one training step, counted as model/src/flops.rs counts them."""
    h, heads = c.hidden, c.heads
    qk = c.qk_nope + c.qk_rope
    # MLA projections (q through the low-rank path when q_rank > 0).
    if c.q_rank > 0:
        attn = h * c.q_rank + c.q_rank * heads * qk
    else:
        attn = h * heads * qk
    attn += h * (c.kv_rank + c.qk_rope) + c.kv_rank * heads * (c.qk_nope + c.v_dim)
    attn += heads * c.v_dim * h
    dense_mlp = 3 * h * c.dense_width
    moe = 3 * h * c.moe_width * (c.shared + c.topk) + h * c.experts
    params = c.layers * attn
    params += c.first_dense * dense_mlp + (c.layers - c.first_dense) * moe
    params += h * c.vocab  # the head
    linear = 6.0 * params
    # Attention products per token: forward 2·T·(d_qk + d_v) per head (full T×T blocks over T
    # tokens), backward twice that.
    attention = 3.0 * 2.0 * c.seq * (qk + c.v_dim) * heads * c.layers
    return linear + attention


def main():
    c = parse()
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    config = DeepseekV3Config(
        vocab_size=c.vocab, hidden_size=c.hidden, intermediate_size=c.dense_width,
        moe_intermediate_size=c.moe_width, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, num_key_value_heads=c.heads, n_routed_experts=c.experts,
        n_shared_experts=c.shared, num_experts_per_tok=c.topk, n_group=c.groups,
        topk_group=c.topk_groups, first_k_dense_replace=c.first_dense,
        q_lora_rank=c.q_rank if c.q_rank > 0 else None, kv_lora_rank=c.kv_rank,
        qk_nope_head_dim=c.qk_nope, qk_rope_head_dim=c.qk_rope, v_head_dim=c.v_dim,
        max_position_embeddings=c.seq, tie_word_embeddings=False, num_nextn_predict_layers=0,
    )
    flops_per_token = step_flops_per_token(c)
    tokens = c.batch * c.seq
    for mode in [m.strip() for m in c.modes.split(",") if m.strip()]:
        torch.manual_seed(c.seed)
        model = DeepseekV3ForCausalLM(config).to(dev).float()
        if c.weights == "bf16":
            model = model.to(torch.bfloat16)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr, fused=True)
        run = torch.compile(model) if mode == "compile" else model
        gen = torch.Generator(device=dev).manual_seed(c.seed)

        def one_step():
            ids = torch.randint(0, c.vocab, (c.batch, c.seq), device=dev, generator=gen)
            autocast = c.precision == "bf16" and c.weights == "fp32"
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(c.warmup):
            one_step()
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(c.steps):
            loss = one_step()
        torch.cuda.synchronize()
        secs = (time.perf_counter() - t0) / c.steps
        tps = tokens / secs
        print(json.dumps({
            "bench": "torch_baseline",
            "mode": mode,
            "gpu": torch.cuda.get_device_name(0),
            "precision": c.precision,
            "weights": c.weights,
            "torch": torch.__version__,
            "tokens_per_step": tokens,
            "step_s": secs,
            "tokens_per_s": tps,
            "flops_per_token": flops_per_token,
            "mfu": tps * flops_per_token / (c.peak_tflops * 1e12),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
            "warmup_s": warm_s,
            "final_loss": float(loss.detach()),
            "config": {k: v for k, v in vars(c).items() if k not in ("modes",)},
        }), flush=True)
        del model, opt, run
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

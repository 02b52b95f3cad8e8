#!/usr/bin/env bash
# One call's worth of GPU checks and measurements, on the GPU machine, from the binaries that
# tools/gpu/prepare.sh put in .gpu/: the CUDA device against the CPU and the HF golden sets,
# PyTorch eager (fp32 master weights + bf16 autocast, Flotilla's precision), Flotilla's step
# bench against it, the per-kernel tables, and (if `--loss` is given) the 200-step loss curve
# against the CPU. Each part has its own time limit, so that one that hangs leaves the rest;
# results go to $OUT (or ./gpu-out).
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} NCCL_NVLS_ENABLE=0
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
T0=$(date +%s)
since() { echo "[$(( $(date +%s) - T0 )) s]"; }
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi: the GPU tests will say skipped"
GBPS=3350
nvidia-smi -L 2>/dev/null | grep -q H200 && GBPS=4800
# bench step reads configs and writes run directories relative to the repository.
mkdir -p target/release && cp .gpu/flotilla target/release/flotilla
echo "== cuda_ops $(since)"
timeout 60 ./.gpu/cuda_ops --test-threads 1 2>&1 | grep -E "^test |test result|panicked|relative|skipped"
echo "== golden on cuda $(since)"
timeout 60 ./.gpu/golden golden_parity_on_cuda --nocapture 2>&1 | grep -E "^ok|^FAIL|routing|test result|skipped"
T="$OUT/torch.jsonl"
: > "$T"
echo "== PyTorch eager, fp32 master + autocast $(since)"
timeout 60 python3 tools/bench/torch_baseline.py --modes eager --weights fp32 --warmup 2 --steps 5 >> "$T" 2>> "$OUT/torch.err"
echo "rc $?"; cut -c1-400 "$T"; tail -n 2 "$OUT/torch.err"
echo "== flotilla bench step $(since)"
timeout 90 ./.gpu/flotilla bench step --config configs/gpu-bench.toml --device cuda --json \
    --peak-gbps $GBPS --warmup 2 --steps 5 --torch "$T" > "$OUT/step.jsonl" 2> "$OUT/step.err"
echo "rc $?"; grep -v '"host_op"\|"step_job"' "$OUT/step.jsonl" | cut -c1-900; tail -n 2 "$OUT/step.err"
echo "== kernel tables $(since)"
timeout 240 ./.gpu/flotilla bench step --config configs/gpu-bench.toml --device cuda --json \
    --kernels --peak-gbps $GBPS --warmup 1 --steps 2 > "$OUT/kernels.jsonl" 2> "$OUT/kernels.err"
echo "rc $?"; tail -n 2 "$OUT/kernels.err"
python3 - "$OUT/kernels.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ks = [r for r in rows if r.get("bench") == "kernel"]
variant = lambda r: (r["expert_kernel"], r["grouped_gemm"], r["fused_attention"])
totals = {}
for r in ks:
    totals[variant(r)] = totals.get(variant(r), 0.0) + r["ms"]
for v, ms in totals.items():
    print("pass %-52s %8.1f ms" % ("W kernel=%s grouped=%s fused attention=%s" % v, ms))
for r in ks:
    if r["kernel"].startswith(("attention", "gemm")) or r["share"] > 0.01:
        print("%-5s %-5s %-5s %-26s %5d %8.2f ms %5.1f%% %7.1f TF %6.0f GB/s" % (
            *variant(r), r["kernel"], r["calls"], r["ms"], 100 * r["share"], r["tflops"], r["gbps"]))
PY
if [ "${1:-}" = "--loss" ]; then
    echo "== 200 steps against the CPU $(since)"
    timeout 300 ./.gpu/cli cuda_training --nocapture 2>&1 | grep -E "fp32|bf16|test result|panicked|skipped"
fi
echo "elapsed $(( $(date +%s) - T0 )) s"

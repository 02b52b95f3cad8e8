#!/usr/bin/env bash
# One call's worth of GPU checks and measurements, on the GPU machine, from the binaries that
# tools/gpu/prepare.sh put in .gpu/: the CUDA device against the CPU and the HF golden sets,
# PyTorch eager (fp32 master weights + bf16 autocast, Flotilla's precision; and the whole model
# in bf16), Flotilla's step bench against it with the default kernels and two others, the
# per-kernel tables, and (if `--loss` is given) the 200-step loss curve against the CPU. Each part has its own time limit, so that one that hangs leaves the rest;
# results go to $OUT (or ./gpu-out). About 6 minutes on an H100.
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
timeout 60 ./.gpu/cuda_ops --test-threads 1 > "$OUT/cuda_ops.txt" 2>&1
grep -E "^test |test result|panicked|relative|skipped" "$OUT/cuda_ops.txt" | cut -c1-300
echo "== golden on cuda $(since)"
timeout 60 ./.gpu/golden golden_parity_on_cuda --nocapture > "$OUT/golden.txt" 2>&1
grep -E "^ok|^FAIL|routing differs|test result|skipped" "$OUT/golden.txt" | cut -c1-200
T="$OUT/torch.jsonl"
: > "$T"
for w in fp32 bf16; do
    echo "== PyTorch eager, $w weights (+ bf16 autocast) $(since)"
    timeout 70 python3 tools/bench/torch_baseline.py --modes eager --weights $w --warmup 2 --steps 5 >> "$T" 2>> "$OUT/torch.err"
    echo "rc $?"
done
python3 - "$T" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print("torch %s weights=%s: %.1f k tokens/s, %.1f ms, mfu %.3f, peak %.0f MiB" % (
        r["mode"], r["weights"], r["tokens_per_s"] / 1e3, r["step_s"] * 1e3, r["mfu"], r["peak_gpu_mib"]))
PY
tail -n 2 "$OUT/torch.err"
# The timed steps with each choice of kernels, then the kernel tables (most needed first, in
# case the call's limit cuts the rest).
step() {  # name, time limit, extra flags
    local name=$1 limit=$2
    shift 2
    echo "== flotilla bench step $name $(since)"
    timeout "$limit" ./.gpu/flotilla bench step --config configs/gpu-bench.toml --device cuda --json \
        --peak-gbps $GBPS --warmup 2 --steps 5 --torch "$T" "$@" > "$OUT/step-$name.jsonl" 2> "$OUT/step-$name.err"
    echo "rc $?"; tail -n 2 "$OUT/step-$name.err"
    python3 - "$OUT/step-$name.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r.get("bench") == "train_step":
        print("step experts=%s attention=%s: %.1f k tokens/s, %.1f ms, gpu %.1f ms, mfu %.4f, pool peak %.0f MiB" % (
            r["expert_gemm"], r["attention"], r["tokens_per_s"] / 1e3, r["step_ms"], r["gpu_ms_per_step"], r["mfu"], r["peak_gpu_mib"]))
    elif r.get("bench") == "step_job" and r["ms"] > 3:
        print("  job %s: %d, %.1f ms" % (r["what"], r["jobs"], r["ms"]))
    elif r.get("bench") == "host_op" and r["ms_per_step"] > 3:
        print("  host %s: %.0f calls, %.1f ms per step" % (r["op"], r["calls_per_step"], r["ms_per_step"]))
    elif "summary" in r:
        print("  summary", json.dumps(r["summary"]))
PY
}
step default 80
step cublas-attention 80 --attention cublas
step kernel 80 --expert-gemm kernel
echo "== kernel tables $(since)"
timeout 200 ./.gpu/flotilla bench step --config configs/gpu-bench.toml --device cuda --json \
    --kernels --peak-gbps $GBPS --warmup 1 --steps 1 > "$OUT/kernels.jsonl" 2> "$OUT/kernels.err"
echo "rc $?"; tail -n 2 "$OUT/kernels.err"
python3 - "$OUT/kernels.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ks = [r for r in rows if r.get("bench") == "kernel"]
variant = lambda r: (r["expert_gemm"], r["fused_attention"])
totals = {}
for r in ks:
    totals[variant(r)] = totals.get(variant(r), 0.0) + r["ms"]
for v, ms in totals.items():
    print("pass %-44s %8.1f ms" % ("experts=%s fused attention=%s" % v, ms))
for r in ks:
    if r["kernel"].startswith(("attention", "gemm")) or r["share"] > 0.01:
        print("%-8s %-5s %-26s %5d %8.2f ms %5.1f%% %7.1f TF %6.0f GB/s" % (
            *variant(r), r["kernel"], r["calls"], r["ms"], 100 * r["share"], r["tflops"], r["gbps"]))
PY
if [ "${1:-}" = "--loss" ]; then
    echo "== 200 steps against the CPU $(since)"
    timeout 300 ./.gpu/cli cuda_training --nocapture 2>&1 | grep -E "fp32|bf16|test result|panicked|skipped"
fi
echo "elapsed $(( $(date +%s) - T0 )) s"

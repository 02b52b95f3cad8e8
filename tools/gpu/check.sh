#!/usr/bin/env bash
# One call's worth of GPU checks and measurements, on the GPU machine, from the binaries that
# tools/gpu/prepare.sh put in .gpu/. The parts run in the order named on the command line
# (default: ops golden torch torch16 steps tables):
#   ops      the CUDA device against the CPU, operation by operation (cuda_ops)
#   golden   the HF golden sets on the GPU, f32 and bf16
#   torch    PyTorch eager, fp32 master weights + bf16 autocast (Flotilla's precision)
#   torch16  PyTorch eager, the whole model in bf16
#   compile  PyTorch under torch.compile in Flotilla's precision (its warm-up takes minutes)
#   steps    Flotilla's step bench against PyTorch, with the default kernels and with
#            --expert-gemm batched and kernel
#   others   the same with --attention cublas and with --expert-gemm cublas
#   tables   the per-kernel tables of one training step, four choices of expert GEMMs
#   loss     the 200-step loss curve against the CPU, f32 and bf16
# Each part has its own time limit, so that one that hangs leaves the rest; results go to $OUT
# (or ./gpu-out). The default parts take about 6 minutes on an H100.
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
ops() {
    echo "== cuda_ops $(since)"
    timeout 60 ./.gpu/cuda_ops --test-threads 1 > "$OUT/cuda_ops.txt" 2>&1
    grep -E "^test |test result|panicked|relative|skipped" "$OUT/cuda_ops.txt" | cut -c1-300
}
golden() {
    echo "== golden on cuda $(since)"
    timeout 60 ./.gpu/golden golden_parity_on_cuda --nocapture > "$OUT/golden.txt" 2>&1
    grep -E "^ok|^FAIL|routing differs|test result|skipped" "$OUT/golden.txt" | cut -c1-200
}
T="$OUT/torch.jsonl"
: > "$T"
torch_run() {  # mode, weights, time limit
    echo "== PyTorch $1, $2 weights (+ bf16 autocast) $(since)"
    timeout "$3" python3 tools/bench/torch_baseline.py --modes "$1" --weights "$2" --warmup 2 --steps 5 >> "$T" 2>> "$OUT/torch.err"
    echo "rc $?"
    tail -n 1 "$T" | python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print("torch %s weights=%s: %.1f k tokens/s, %.1f ms, mfu %.3f, peak %.0f MiB, warm-up %.0f s" % (
        r["mode"], r["weights"], r["tokens_per_s"] / 1e3, r["step_s"] * 1e3, r["mfu"], r["peak_gpu_mib"], r.get("warmup_s", -1)))
'
    tail -n 2 "$OUT/torch.err"
}
torch() { torch_run eager fp32 70; }
torch16() { torch_run eager bf16 70; }
compile() { torch_run compile fp32 300; }
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
steps() {
    step default 80
    step batched 80 --expert-gemm batched
    step kernel 80 --expert-gemm kernel
}
others() {
    step cublas-attention 80 --attention cublas
    step cublas 80 --expert-gemm cublas
}
tables() {
    echo "== kernel tables $(since)"
    timeout 240 ./.gpu/flotilla bench step --config configs/gpu-bench.toml --device cuda --json \
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
    print("step %-44s %8.1f ms" % ("experts=%s fused attention=%s" % v, ms))
first = variant(ks[0]) if ks else None
for r in ks:
    if r["kernel"].startswith("gemm") or (variant(r) == first and r["share"] > 0.005):
        print("%-8s %-5s %-26s %5d %8.2f ms %5.1f%% %7.1f TF %6.0f GB/s" % (
            *variant(r), r["kernel"], r["calls"], r["ms"], 100 * r["share"], r["tflops"], r["gbps"]))
PY
}
loss() {
    echo "== 200 steps against the CPU $(since)"
    timeout 300 ./.gpu/cli cuda_training --nocapture 2>&1 | grep -E "fp32|bf16|test result|panicked|skipped"
}
for part in "${@:-ops golden torch torch16 steps tables}"; do
    for p in $part; do
        case $p in
            ops | golden | torch | torch16 | compile | steps | others | tables | loss) "$p" ;;
            *) echo "unknown part $p: ops golden torch torch16 compile steps others tables loss"; exit 2 ;;
        esac
    done
done
echo "elapsed $(( $(date +%s) - T0 )) s"

#!/usr/bin/env bash
# Builds, on a machine without CUDA, everything tools/gpu/check.sh runs on a GPU machine without
# Rust: the release binary and the GPU test binaries with `--features cuda`, stripped of debug
# information, into .gpu/ (add `.gpu/` to .git/info/exclude and pass it in the device tool's
# `carry`).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu
cargo build --release --features cuda
cp target/release/flotilla .gpu/flotilla
# The test binaries' names carry a hash: ask cargo which files it built.
tests=$(cargo test --release --features cuda --no-run --message-format=json \
    -p flotilla-model --test cuda_ops --test golden -p flotilla --test cli 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
')
while read -r name exe; do
    cp "$exe" ".gpu/$name"
done <<< "$tests"
strip --strip-debug .gpu/flotilla .gpu/cuda_ops .gpu/golden .gpu/cli
ls -l .gpu/flotilla .gpu/cuda_ops .gpu/golden .gpu/cli

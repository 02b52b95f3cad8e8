"""Read flotilla's and torch's `bench nccl` JSON lines (files given as arguments) and print a
markdown table of busbw side by side, with the ratio flotilla / torch."""
import json
import sys

rows = {}
for path in sys.argv[1:]:
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r.get("bench") != "nccl":
            continue
        impl = r["impl"] + ("-procs" if r.get("procs") else "")
        rows.setdefault((r["op"], r["bytes"]), {})[impl] = r["busbw_gbs"]
impls = sorted({i for v in rows.values() for i in v})
print("| op | bytes | " + " | ".join(f"{i} busbw GB/s" for i in impls) + " | flotilla / torch |")
print("|---|---:|" + "---:|" * len(impls) + "---:|")
for (op, nbytes), v in sorted(rows.items()):
    ratio = v.get("flotilla", float("nan")) / v["torch"] if v.get("torch") else float("nan")
    print(f"| {op} | {nbytes} | " + " | ".join(f"{v.get(i, float('nan')):.1f}" for i in impls) + f" | {ratio:.3f} |")

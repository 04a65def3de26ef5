# On one GPU: distillation speed at the 3.1B shape. A short first run pays mamba_ssm's Triton autotuning,
# then batch 4 eager (baseline, same machine), batch 4 and 8 with compiled layers + liger's fused loss.
# Every run seeds the same weights and data and records its losses, so eager and compiled compare.
# Usage: bash scripts/device_speed_checks.sh. Writes scale_3b_*.json and logs into $OUT (commit them under
# benchmarks/results/).
set -o pipefail
source scripts/device_setup.sh
set +e
timeout 240 python3 benchmarks/scale_3b.py --out /tmp/scale_3b_warm.json --steps 1 --warmup 1 --batch 1 > /dev/null 2>&1
for v in "4 chunked" "4 chunked --compile-layers" "4 liger --compile-layers" "8 liger --compile-layers"; do
  set -- $v
  name="b$1_$(echo "${*:2}" | tr -d '-' | tr ' ' '_')"
  timeout 200 python3 benchmarks/scale_3b.py --out "$OUT/scale_3b_$name.json" --steps 4 --warmup 3 --batch $1 \
    --logit-impl ${*:2} > "$OUT/scale_3b_$name.log" 2>&1
  echo "$name: rc $? $(grep -E '"(tokens_per_second|peak_memory_gib|mfu)"' "$OUT/scale_3b_$name.json" 2>/dev/null | tr -d ' \n')"
done
python3 - <<'PY'
import json, os, glob
runs = {os.path.basename(f): json.load(open(f)) for f in sorted(glob.glob(os.environ["OUT"] + "/scale_3b_b4_*.json"))}
base = runs.get("scale_3b_b4_chunked.json")
for name, r in runs.items():
    if base and r is not base:
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
        print(f"{name}: largest relative loss difference to eager chunked {diff:.2e}")
PY

# On one GPU: distillation speed at the 3.1B shape. A short first run pays mamba_ssm's Triton autotuning (once
# per machine), then each variant "BATCH LOGIT_IMPL [scale_3b options]" runs with the same seeded weights and
# data and records its losses, so eager and compiled compare against the eager chunked run of the same call.
# Usage: bash scripts/device_speed_checks.sh ["4 chunked" "4 liger --compile-layers" ...]
# (default: the five below; at 1-2 minutes each, split them over two calls to stay under 10 minutes).
# Writes scale_3b_*.json and speed_logs.tgz into $OUT (commit the JSONs under benchmarks/results/).
set -o pipefail
source scripts/device_setup.sh
set +e
[ $# -gt 0 ] || set -- "4 chunked" "4 chunked --compile-layers" "4 liger --compile-layers" "8 liger --compile-layers" \
  "4 liger --compile-layers --compile-mode reduce-overhead"
[ -f /tmp/scale_3b_warm.json ] || timeout 240 python3 benchmarks/scale_3b.py --out /tmp/scale_3b_warm.json --steps 1 \
  --warmup 1 --batch 1 > /dev/null 2>&1
mkdir -p /tmp/speed_logs
for v in "$@"; do
  read -r batch impl rest <<< "$v"
  name="b${batch}_$(echo "$impl $rest" | tr -d '-' | tr -s ' ' '_' | sed 's/_$//')"
  timeout 200 python3 benchmarks/scale_3b.py --out "$OUT/scale_3b_$name.json" --steps 4 --warmup 3 --batch "$batch" \
    --logit-impl $impl $rest > "/tmp/speed_logs/scale_3b_$name.log" 2>&1
  echo "$name: rc $? $(grep -E '"(tokens_per_second|peak_memory_gib|mfu)"' "$OUT/scale_3b_$name.json" 2>/dev/null | tr -d ' \n')"
done
[ -f "$OUT/scale_3b_b4_chunked.json" ] || cp /tmp/scale_3b_b4_chunked.json "$OUT/" 2>/dev/null
cp "$OUT/scale_3b_b4_chunked.json" /tmp/ 2>/dev/null
tar czf "$OUT/speed_logs.tgz" -C /tmp speed_logs
python3 - <<'PY'
import json, os, glob
runs = {os.path.basename(f): json.load(open(f)) for f in sorted(glob.glob(os.environ["OUT"] + "/scale_3b_*.json"))}
base = runs.get("scale_3b_b4_chunked.json")
for name, r in runs.items():
    if base and r is not base and r.get("batch") == base.get("batch") and "losses" in r:
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
        print(f"{name}: largest relative loss difference to eager chunked {diff:.2e}")
PY

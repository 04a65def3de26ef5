# On one GPU: the liger loss's GPU tests, then distillation speed at the 3.1B shape (batch 4) with the chunked
# torch loss vs liger's fused loss, eager vs compiled decoder layers. Usage: bash scripts/device_speed_checks.sh
# Writes pytest output and scale_3b_*.json into $OUT (commit them under benchmarks/results/).
set -o pipefail
source scripts/device_setup.sh
timeout 120 python3 -m pytest -q -m gpu tests/test_fused_loss.py 2>&1 | tail -15 | tee "$OUT/fused_loss_gpu_tests.txt"
for v in "chunked" "liger" "chunked --compile-layers" "liger --compile-layers"; do
  name=$(echo "$v" | tr -d '-' | tr ' ' '_')
  timeout 150 python3 benchmarks/scale_3b.py --out "$OUT/scale_3b_b4_$name.json" --steps 4 --warmup 3 --batch 4 --logit-impl $v 2>&1 \
    | grep -E "tokens_per_second|peak_memory|mfu|Error|error" | tail -4
done

# On the GPU machine: the distillation ablations (benchmarks/distill_ablations.py) from the shipped teacher.
# Usage: bash scripts/device_ablations.sh 1|2|3|4|long [PARALLEL] (calls of under 10 minutes; results.json merges,
# and is written after every variant). 3: the variants of session 4 whose evaluation was cut off, and ratio
# 12.5%. 4: the three scored in session 6 (identity conv, temperature 2, released normalisation). long: ratio 25% and 50% (with CE too) at a larger budget. Environment overrides: TEACHER (default the shipped one),
# STEPS (400), EVAL (held-out records, 900), ABL_OUT (runs/abl), SECONDS_LIMIT (540).
set -o pipefail
source scripts/device_setup.sh
[ -f runs/world/train.json ] || python3 -m matvlm.cli data synth runs/world --train 100000 --test 2700 --seed 0 --workers 16 2>&1 | tail -1
case "$1" in
  1) only="ratio_12_5,ratio_25,ratio_50,place_begin,place_middle,place_end,init_random,loss_kl" ;;
  2) only="loss_ce,loss_layer,loss_kl_layer_ce,attn_bias,conv_identity,temperature_2,released_normalisation" ;;
  3) only="ratio_12_5,init_random,attn_bias,conv_identity,temperature_2,released_normalisation" ;;
  4) only="conv_identity,temperature_2,released_normalisation" ;;
  long) only="ratio_25,ratio_50,ratio_50_ce" ;;
  *) echo "usage: bash scripts/device_ablations.sh 1|2|3|4|long [PARALLEL]"; exit 2 ;;
esac
OUT_DIR=${ABL_OUT:-runs/abl}
mkdir -p "$OUT_DIR" && [ -f "$OUT_DIR/results.json" ] || cp benchmarks/results/ablations/results.json "$OUT_DIR"/ 2>/dev/null || true
timeout ${SECONDS_LIMIT:-540} python3 benchmarks/distill_ablations.py run --teacher ${TEACHER:-matvlm/assets/teacher} \
  --world runs/world --out "$OUT_DIR" --steps ${STEPS:-400} --batch-size 128 --parallel ${2:-4} --workers 2 \
  --eval-records ${EVAL:-900} --only "$only" 2>&1 | tail -20
cp "$OUT_DIR/results.json" "$OUT"/ 2>/dev/null; tar czf "$OUT/abl_logs.tgz" "$OUT_DIR"/*/distill.log "$OUT_DIR"/*/config.json 2>/dev/null || true

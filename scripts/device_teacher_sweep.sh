# On the GPU machine: generate the world once, then train one teacher per config file side by side
# (a 7M-parameter model leaves the GPU mostly idle). Usage: bash scripts/device_teacher_sweep.sh CFG...
set -eo pipefail
source scripts/device_setup.sh
[ -f runs/world/train.json ] || python3 -m matvlm.cli data synth runs/world --train 100000 --test 2700 --seed 0 --workers 16 2>&1 | tail -2
for cfg in "$@"; do
  name=$(basename "$cfg" .json)
  python3 -m matvlm.cli teacher --data runs/world --out "runs/$name" --config "$cfg" > "runs/$name.log" 2>&1 &
done
wait
for cfg in "$@"; do
  name=$(basename "$cfg" .json)
  tr '\r' '\n' < "runs/$name.log" | grep -E "step [0-9]+:|rror|Trace" | tail -8
  python3 -c "import json,sys; d=json.load(open('runs/$name/heldout_scores.json')); print('$name', round(d['average'],4), {k: round(v['score'],3) for k,v in d['families'].items()}, round(d['train_seconds']))" || true
  tar czf "$OUT/$name.tar.gz" -C runs "$name" "$name.run/log.csv" || true
done

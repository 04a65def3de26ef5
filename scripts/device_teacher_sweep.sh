# On the GPU machine: generate the world once, then train one teacher per config file side by side
# (a 7M-parameter model leaves the GPU mostly idle). Usage: bash scripts/device_teacher_sweep.sh SECONDS CFG...
# Each run is stopped after SECONDS; its log (periodic held-out scores) comes back in $OUT.
set -o pipefail
source scripts/device_setup.sh
LIMIT=$1; shift
[ -f runs/world/train.json ] || python3 -m matvlm.cli data synth runs/world --train 100000 --test 2700 --seed 0 --workers 16 2>&1 | tail -2
for cfg in "$@"; do
  name=$(basename "$cfg" .json)
  timeout "$LIMIT" python3 -m matvlm.cli teacher --data runs/world --out "runs/$name" --config "$cfg" > "runs/$name.log" 2>&1 &
done
wait
for cfg in "$@"; do
  name=$(basename "$cfg" .json)
  echo "== $name"; tr '\r' '\n' < "runs/$name.log" | grep -E "step [0-9]+:|rror" | tail -6
  tr '\r' '\n' < "runs/$name.log" | grep "it/s" | tail -1
  tr '\r' '\n' < "runs/$name.log" | grep -E "step [0-9]+:|rror|Average|│" > "$OUT/$name.log" || true
done

# On the GPU machine: which of the trainer's settings keeps it from the recall look-up that the CPU probe learns
# (benchmarks/probes/recall_format.log, findings 17 and 22)? Trains every configs/teacher_s18_bisect_*.json side by
# side on one GPU (batch 64: small runs share it), waits for them, prints each one's held-out recall by step, and
# scores the text-only variants on the same records with their images as well. Then, with a FOLLOW config, it starts
# one larger run on the same GPU with the best variant's settings (lr_schedule, final_answer_families,
# text_only_families) when that variant beats the baseline by THRESHOLD, else with FOLLOW as it is.
# Usage: bash scripts/device_recall_bisect.sh GPU WAIT_SECONDS [FOLLOW_CONFIG FOLLOW_NAME FOLLOW_SECONDS]
# SET=NAME (default s18_bisect) trains configs/teacher_NAME_*.json instead, as runs/NAME_* (the follow-on
# compares against NAME_base).
set -o pipefail
source scripts/device_setup.sh
set +e  # device_setup's errexit would end the report at the first grep that finds nothing
GPU=${1:?usage: bash scripts/device_recall_bisect.sh GPU WAIT_SECONDS [FOLLOW_CONFIG FOLLOW_NAME FOLLOW_SECONDS]}
WAIT=${2:?wait seconds}
SET=${SET:-s18_bisect}
PREFIX=${SET/s18_bisect/s18_bx}  # session 18's run names
text_only() {  # does the config (a JSON file) train some family as text?
  python3 -c "import json, sys; sys.exit(not json.load(open(sys.argv[1])).get('text_only_families'))" "$1"
}
NAMES=()
for cfg in configs/teacher_"$SET"_*.json; do
  v=$(basename "$cfg" .json); v=${v#teacher_"$SET"_}
  data=runs/world_next_recall; text_only "$cfg" && data=runs/world_next_recall_text
  [ -f "runs/${PREFIX}_$v/heldout_scores.json" ] || DATA=$data bash scripts/device_teacher_bg.sh "$cfg" "$WAIT" "${PREFIX}_$v" "$GPU" | tail -1
  NAMES+=("${PREFIX}_$v")
done
began=$(date +%s)
while pgrep -f "matvlm.cli teacher .*--out runs/${PREFIX}_" >/dev/null && [ $(( $(date +%s) - began )) -lt "$WAIT" ]; do sleep 5; done
echo "bisect runs ended after $(( $(date +%s) - began )) s"
for n in "${NAMES[@]}"; do
  echo "== $n: $(tr '\r' '\n' < "runs/${n}_bg.log" | grep -oE "step [0-9]+: held-out average [0-9.]+" | sed 's/held-out average //' | tr '\n' ' ')"
  tr '\r' '\n' < "runs/${n}_bg.log" | grep -E "Error|error" | grep -v -i warn | tail -2 | cut -c1-200
  if [ -f "runs/$n/heldout_scores.json" ] && text_only "runs/$n.run/config.json"; then
    CUDA_VISIBLE_DEVICES=$GPU python3 -m matvlm.cli eval "runs/$n" --data runs/world_next_recall/test.json \
      --images runs/world_next_recall/images --out "runs/$n/image_scores.json" >/dev/null 2>&1
  fi
done
[ -n "$3" ] || exit 0
python3 - "$3" "${THRESHOLD:-0.1}" "$PREFIX" "${NAMES[@]}" <<'PY'
import json, sys
from pathlib import Path
follow, threshold, prefix, names = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:]
scores = {}
for n in names:
    for name in ("heldout_scores.json", "image_scores.json"):
        if (p := Path("runs", n, name)).exists():
            scores[(n, name)] = json.loads(p.read_text())["average"]
print("final recall (120 records):", {f"{n}/{f}": round(s, 3) for (n, f), s in scores.items()})
base = scores.get((prefix + "_base", "heldout_scores.json"), 0.0)
best = max(scores, key=scores.get, default=None)
cfg = json.loads(Path(follow).read_text())
if best is not None and scores[best] >= base + threshold:
    won = json.loads(Path("runs", best[0] + ".run", "config.json").read_text())
    for key in ("lr_schedule", "final_answer_families", "text_only_families"):
        cfg[key] = won.get(key, cfg.get(key))
    print(f"follow-on run takes {best[0]}'s settings:", {k: cfg[k] for k in ("lr_schedule", "final_answer_families", "text_only_families")})
else:
    print(f"no variant beats the baseline ({base:.3f}) by {threshold}: the follow-on run is {follow} as it is")
Path("runs/follow_config.json").write_text(json.dumps(cfg))
PY
bash scripts/device_teacher_bg.sh runs/follow_config.json "${5:-900}" "$4" "$GPU"

# On the GPU machine: wait, then show how background teacher runs are doing (last progress line, held-out evaluations,
# errors), so that one call can both keep the machine busy and report. Optionally fetch them at the end.
# Usage: bash scripts/device_teacher_watch.sh SECONDS NAME... [--fetch]  (runs/NAME_bg.log; --fetch: each run's
# weights and run_meta.tgz into $OUT/NAME via device_teacher_fetch.sh, two files a run).
WAIT=${1:?usage: bash scripts/device_teacher_watch.sh SECONDS NAME... [--fetch]}; shift
FETCH=0; NAMES=()
for a in "$@"; do [ "$a" = "--fetch" ] && FETCH=1 || NAMES+=("$a"); done
sleep "$WAIT"
for n in "${NAMES[@]}"; do
  echo "== $n"
  tr '\r' '\n' < "runs/${n}_bg.log" | grep -E "held-out|profile|Error|error|nan|^teacher:" | grep -v -i warn | tail -n 4 | cut -c1-220
done
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
if [ "$FETCH" = 1 ]; then
  for n in "${NAMES[@]}"; do bash scripts/device_teacher_fetch.sh "runs/$n.run" "$OUT/$n"; done
fi

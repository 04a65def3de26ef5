# On the GPU machine: generate the synthetic world and train the shipped teacher.
# Usage: bash scripts/device_teacher.sh TRAIN_RECORDS STEPS [extra `matvlm teacher` options]
set -eo pipefail
source scripts/device_setup.sh
TRAIN=${1:-100000}; STEPS=${2:-3000}; shift 2 || true
[ -f runs/world/train.json ] || python3 -m matvlm.cli data synth runs/world --train "$TRAIN" --test 2700 --seed 0 --workers 16 2>&1 | tail -16
python3 -m matvlm.cli teacher --data runs/world --out runs/teacher --steps "$STEPS" --num-workers 12 "$@" 2>&1 \
  | tr '\r' '\n' | tee "$OUT/teacher_stdout.txt" | grep -E "step|rror|resum|held|Trace|│|┃|teacher: +[0-9]+%.*(00|50)/" || true
tar czf "$OUT/teacher.tar.gz" -C runs teacher
cp runs/teacher.run/log.csv "$OUT/teacher_log.csv"
cp runs/teacher/heldout_scores.json "$OUT/"

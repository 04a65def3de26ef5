# On the GPU machine: generate the synthetic world and train a teacher (configs/teacher.json by default).
# Usage: bash scripts/device_teacher.sh [CONFIG]. A call stops after 9 minutes; the next call on the same warm
# machine resumes from runs/teacher.run/. Each call also brings back the latest weights (weights.safetensors,
# bf16) and the run's config, tokenizer and log, so that a fresh machine can go on with
# `matvlm teacher --init-from` (fresh optimizer) and this machine's `matvlm teacher-export` can write a teacher.
set -o pipefail
source scripts/device_setup.sh
CFG=${1:-configs/teacher.json}
[ -f runs/world/train.json ] || python3 -m matvlm.cli data synth runs/world --train 100000 --test 2700 --seed 0 --workers 16 2>&1 | tail -2
# Stop early enough to hand back what exists; a later call resumes from the last checkpoint.
timeout 540 python3 -m matvlm.cli teacher --data runs/world --out runs/teacher --config "$CFG" 2>&1 \
  | tr '\r' '\n' | tee "$OUT/teacher_stdout.txt" | grep -E "step [0-9]+:|rror|resum|│|┃|teacher: +[0-9]+%.*[05]00/" || true
if [ -f runs/teacher/heldout_scores.json ]; then tar czf "$OUT/teacher.tar.gz" -C runs teacher teacher.run/log.csv; fi
bash scripts/device_teacher_fetch.sh runs/teacher.run

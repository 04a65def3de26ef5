# On one GPU machine, session 5: generate the world, then start in the background (setsid, so they outlive
# the call while the machine stays warm) the long-budget ratio ablations from the shipped teacher and a fresh
# teacher. Usage: bash scripts/device_background.sh TEACHER_CONFIG TEACHER_SECONDS ABL_SECONDS.
# Logs: runs/abl_long.log, runs/teacher_bg.log.
source scripts/device_setup.sh
[ -f runs/world/train.json ] || python3 -m matvlm.cli data synth runs/world --train 100000 --test 2700 --seed 0 --workers 16 2>&1 | tail -1
ABL_OUT=runs/abl_long STEPS=1200 EVAL=2700 SECONDS_LIMIT=${3:-1500} setsid nohup bash scripts/device_ablations.sh long 2 \
  > runs/abl_long.log 2>&1 < /dev/null &
bash scripts/device_teacher_bg.sh "${1:-configs/teacher_v2.json}" "${2:-1500}"

# On the GPU machine: train a teacher in the background while other work runs in the foreground.
# Usage: bash scripts/device_teacher_bg.sh CONFIG [SECONDS]. The run is started in its own process session
# (setsid), so it outlives this call and goes on while the machine stays warm; a later call on the same
# machine checks `tail runs/teacher_bg.log` and brings weights back with scripts/device_teacher_fetch.sh.
set -o pipefail
source scripts/device_setup.sh
CFG=${1:?usage: bash scripts/device_teacher_bg.sh CONFIG [SECONDS]}
[ -f runs/world/train.json ] || python3 -m matvlm.cli data synth runs/world --train 100000 --test 2700 --seed 0 --workers 16 2>&1 | tail -1
if pgrep -f "matvlm.cli teacher" >/dev/null; then echo "a teacher run is already going"; exit 0; fi
setsid nohup nice -n 5 timeout "${2:-1500}" python3 -m matvlm.cli teacher --data runs/world --out runs/teacher \
  --config "$CFG" > runs/teacher_bg.log 2>&1 < /dev/null &
echo "teacher started in the background (log: runs/teacher_bg.log)"

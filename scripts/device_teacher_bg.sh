# On the GPU machine: train a teacher in the background while other work runs in the foreground.
# Usage: bash scripts/device_teacher_bg.sh CONFIG [SECONDS] [NAME] [GPU]. The run (runs/NAME, default runs/teacher,
# on GPU number GPU, default 0) is started in its own process session (setsid), so it outlives this call and goes
# on while the machine stays warm; a later call checks `tail runs/NAME_bg.log` and brings weights back with
# scripts/device_teacher_fetch.sh runs/NAME.run. Two names on two GPUs train two teachers side by side.
set -o pipefail
source scripts/device_setup.sh
CFG=${1:?usage: bash scripts/device_teacher_bg.sh CONFIG [SECONDS] [NAME] [GPU]}
NAME=${3:-teacher}
[ -f runs/world/train.json ] || python3 -m matvlm.cli data synth runs/world --train 100000 --test 2700 --seed 0 --workers 16 2>&1 | tail -1
if pgrep -f "matvlm.cli teacher .*--out runs/$NAME " >/dev/null; then echo "teacher $NAME is already running"; exit 0; fi
CUDA_VISIBLE_DEVICES=${4:-0} setsid nohup nice -n 5 timeout "${2:-1500}" python3 -m matvlm.cli teacher --data runs/world \
  --out "runs/$NAME" --config "$CFG" > "runs/${NAME}_bg.log" 2>&1 < /dev/null &
echo "teacher $NAME started in the background on GPU ${4:-0} (log: runs/${NAME}_bg.log)"

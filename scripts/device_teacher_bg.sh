# On the GPU machine: train a teacher in the background while other work runs in the foreground.
# Usage: bash scripts/device_teacher_bg.sh CONFIG [SECONDS] [NAME] [GPU]. The run (runs/NAME, default runs/teacher,
# on GPU number GPU, default 0; a list such as 0,1 trains one run over those GPUs with DDP through torchrun, the
# config's batch_size being the global batch) is started in its own process session (setsid), so it outlives this
# call and goes on while the machine stays warm; a later call checks `tail runs/NAME_bg.log` and brings weights back with
# scripts/device_teacher_fetch.sh runs/NAME.run. Two names on two GPUs train two teachers side by side.
# DATA=DIR (default runs/world, made here when missing) trains on another world folder, e.g. a carried copy of the
# world's world.json, test.json and test images, which is all a generated_train run from a teacher reads.
set -o pipefail
source scripts/device_setup.sh
CFG=${1:?usage: bash scripts/device_teacher_bg.sh CONFIG [SECONDS] [NAME] [GPU]}
NAME=${3:-teacher}
DATA=${DATA:-runs/world}
[ "$DATA" != runs/world ] || [ -f runs/world/train.json ] || python3 -m matvlm.cli data synth runs/world --train 100000 --test 2700 --seed 0 --workers 16 2>&1 | tail -1
if pgrep -f "matvlm.cli teacher .*--out runs/$NAME " >/dev/null; then echo "teacher $NAME is already running"; exit 0; fi
GPUS=${4:-0}
NPROC=$(echo "$GPUS" | tr ',' '\n' | wc -l)
LAUNCH="python3"
[ "$NPROC" -gt 1 ] && LAUNCH="torchrun --standalone --nproc_per_node $NPROC"
CUDA_VISIBLE_DEVICES=$GPUS setsid nohup nice -n 5 timeout "${2:-1500}" $LAUNCH -m matvlm.cli teacher --data "$DATA" \
  --out "runs/$NAME" --config "$CFG" > "runs/${NAME}_bg.log" 2>&1 < /dev/null &
echo "teacher $NAME started in the background on GPU $GPUS ($NPROC process(es); log: runs/${NAME}_bg.log)"

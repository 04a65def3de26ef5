# On the GPU machine: the recall look-up probes (benchmarks/probes/recall_lookup.py) one after another on one
# GPU, in the background, so that they share a call with teacher runs on the other GPUs.
# Usage: bash scripts/device_recall_probes.sh GPU [SECONDS]  (logs: runs/probe_gpu_*.log; all stop at SECONDS)
# Questions (session 11's CPU probes stopped at ~4,000 small-model steps, all at chance):
#   l2_long     does the 2-layer probe start the key match with ~10x the steps?
#   teacher_lm  does an LM of the teacher's shape (8 x 192) from scratch?
#   from_teacher  does the shipped teacher's LM learn it quickly on 0-filler text alone?
set -o pipefail
source scripts/device_setup.sh
GPU=${1:?usage: bash scripts/device_recall_probes.sh GPU [SECONDS]}
COMMON="--device cuda --workers 6 --batch 64 --lr 1e-3 --eval-every 1000 --eval-n 128 --eval-fillers 0-0,2-5 --fillers 0-0 --supervise final"
CUDA_VISIBLE_DEVICES=$GPU setsid nohup nice -n 5 timeout "${2:-1200}" bash -c "
  python3 benchmarks/probes/recall_lookup.py $COMMON --layers 2 --hidden 64 --heads 2 --steps 40000 --max-minutes 6 > runs/probe_gpu_l2_long.log 2>&1
  python3 benchmarks/probes/recall_lookup.py $COMMON --steps 40000 --max-minutes 6 > runs/probe_gpu_teacher_lm.log 2>&1
  python3 benchmarks/probes/recall_lookup.py $COMMON --init teacher --eval-first --warmup 20 --steps 40000 --max-minutes 4 > runs/probe_gpu_from_teacher.log 2>&1
" > runs/probe_gpu_bg.log 2>&1 < /dev/null &
echo "recall probes started in the background on GPU $GPU (logs: runs/probe_gpu_*.log)"

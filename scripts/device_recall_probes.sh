# On the GPU machine: recall look-up probes (benchmarks/probes/recall_format.py) at the teacher's shape (8 x 192),
# side by side on one GPU, in the background, so that they share a call with teacher runs on the other GPUs.
# Usage: bash scripts/device_recall_probes.sh GPU MINUTES NAME=ARGS...   (logs: runs/probe_gpu_NAME.log)
#   e.g. bash scripts/device_recall_probes.sh 3 12 word="--format word --eval-formats chat" chat="--format chat"
# Each probe stops after MINUTES of training (plus start-up). The tokenizer is the shipped teacher's (numbers keep
# their space since session 13). Session 13's 4-minute probes (chat, word) and session 14's 14-minute ones (chat,
# codes, codes2) stayed at chance; bare repeats in the mix start the look-up (e.g. probe="--format repeat+chat").
set -o pipefail
source scripts/device_setup.sh
GPU=${1:?usage: bash scripts/device_recall_probes.sh GPU MINUTES NAME=ARGS...}
MINUTES=${2:?usage: bash scripts/device_recall_probes.sh GPU MINUTES NAME=ARGS...}
shift 2
FMT="python3 benchmarks/probes/recall_format.py --device cuda --layers 8 --hidden 192 --heads 6 --batch 64 --lr 1e-3 --eval-every 1000 --eval-n 256 --max-minutes $MINUTES"
export PYTHONPATH=$PYTHONPATH:$PWD/benchmarks/probes
for probe in "$@"; do
  name=${probe%%=*}
  CUDA_VISIBLE_DEVICES=$GPU setsid nohup nice -n 5 timeout $(( MINUTES * 60 + 120 )) $FMT ${probe#*=} \
    > "runs/probe_gpu_$name.log" 2>&1 < /dev/null &
  echo "recall probe $name started in the background on GPU $GPU (log: runs/probe_gpu_$name.log)"
done

# On the GPU machine: the recall look-up probes one after another on one GPU, in the background, so that they
# share a call with teacher runs on the other GPUs.
# Usage: bash scripts/device_recall_probes.sh GPU [SECONDS]  (logs: runs/probe_gpu_*.log; all stop at SECONDS)
# Session 12's CPU probes (benchmarks/probes/recall_format.log): a 2-layer d64 LM learns one-word look-ups
# within 1,000 steps once the lone space token before numbers is gone (--drop-space, the tokenizer's
# number_space), but not the world's two-word near-miss keys. Each probe here is an LM of the teacher's
# shape (8 x 192) from scratch for 4 minutes, all with --drop-space:
#   chat_ns   the world's wording and near-miss keys, one question a record (what the world asks)
#   word_ns   the world's wording with one-word keys, one question a record
#   mqar_ns   two-word keys in bare form, several questions a record drawn with replacement (dense)
#   chat      chat without --drop-space: the shipped tokenizer's baseline at this shape
set -o pipefail
source scripts/device_setup.sh
GPU=${1:?usage: bash scripts/device_recall_probes.sh GPU [SECONDS]}
FMT="python3 benchmarks/probes/recall_format.py --device cuda --layers 8 --hidden 192 --heads 6 --batch 64 --lr 1e-3 --eval-every 500 --eval-n 256 --max-minutes 4"
export PYTHONPATH=$PYTHONPATH:$PWD/benchmarks/probes
CUDA_VISIBLE_DEVICES=$GPU setsid nohup nice -n 5 timeout "${2:-1200}" bash -c "
  $FMT --format chat --drop-space > runs/probe_gpu_chat_ns.log 2>&1
  $FMT --format word --drop-space --eval-formats chat > runs/probe_gpu_word_ns.log 2>&1
  $FMT --format mqar --queries draw --drop-space --eval-formats bare > runs/probe_gpu_mqar_ns.log 2>&1
  $FMT --format chat > runs/probe_gpu_chat.log 2>&1
" > runs/probe_gpu_bg.log 2>&1 < /dev/null &
echo "recall probes started in the background on GPU $GPU (logs: runs/probe_gpu_*.log)"

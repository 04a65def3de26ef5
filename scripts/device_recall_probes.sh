# On the GPU machine: the recall look-up probes one after another on one GPU, in the background, so that they
# share a call with teacher runs on the other GPUs.
# Usage: bash scripts/device_recall_probes.sh GPU [SECONDS]  (logs: runs/probe_gpu_*.log; all stop at SECONDS)
# Questions (session 12's CPU probes, benchmarks/probes/recall_format.log: a 2-layer d64 LM learns no key
# match in any wording tried, and from records asking for every key it learns elimination instead):
#   chat_lm      an LM of the teacher's shape (8 x 192) from scratch on the world's wording, one question a record
#   chatmq_lm    the same with several questions a record (dense supervision; keys drawn with replacement,
#                so that elimination does not pay)
#   wordmq_lm    one-word keys (no near misses), several questions a record: the easiest world-like wording
#   from_teacher the shipped teacher's LM on the world's wording (recall_lookup.py, as planned in session 11)
set -o pipefail
source scripts/device_setup.sh
GPU=${1:?usage: bash scripts/device_recall_probes.sh GPU [SECONDS]}
FMT="python3 benchmarks/probes/recall_format.py --device cuda --layers 8 --hidden 192 --heads 6 --batch 64 --lr 1e-3 --eval-every 500 --eval-n 256"
export PYTHONPATH=benchmarks/probes
CUDA_VISIBLE_DEVICES=$GPU setsid nohup nice -n 5 timeout "${2:-1200}" bash -c "
  $FMT --format chat --max-minutes 5 > runs/probe_gpu_chat_lm.log 2>&1
  $FMT --format chatmq --queries draw --max-minutes 5 > runs/probe_gpu_chatmq_lm.log 2>&1
  $FMT --format wordmq --queries draw --eval-formats word,chat --max-minutes 5 > runs/probe_gpu_wordmq_lm.log 2>&1
  python3 benchmarks/probes/recall_lookup.py --device cuda --workers 6 --batch 64 --lr 1e-3 --eval-every 1000 \
    --eval-n 128 --eval-fillers 0-0,2-5 --fillers 0-0 --supervise final --init teacher --eval-first --warmup 20 \
    --steps 40000 --max-minutes 4 > runs/probe_gpu_from_teacher.log 2>&1
" > runs/probe_gpu_bg.log 2>&1 < /dev/null &
echo "recall probes started in the background on GPU $GPU (logs: runs/probe_gpu_*.log)"

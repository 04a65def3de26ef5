# On a 2-GPU machine: the 2-GPU tests (FSDP2 vs 1 GPU), then distillation throughput at the paper's 3.1B shape
# on 1 GPU vs 2 (DDP), same global batch. Usage: bash scripts/device_ddp3b.sh.
# Writes fsdp_gpu_tests.txt, ddp3b_1gpu.json, ddp3b_2gpu.json and ddp3b_scaling.json into $OUT.
set -o pipefail
source scripts/device_setup.sh
set +e  # a failing test must not stop the measurements (device_setup.sh sets -e)
timeout 150 python3 -m pytest -q -m gpu tests/test_fsdp.py 2>&1 | grep -vE "Loading weights|Writing model" > "$OUT/fsdp_gpu_tests.txt"
tail -3 "$OUT/fsdp_gpu_tests.txt"
ACC="python3 -m accelerate.commands.launch --num_machines 1 --mixed_precision no --dynamo_backend no"
ARGS="--global-batch 8 --micro-batch 4 --steps 10 --warmup 3"
timeout 200 $ACC --num_processes 1 benchmarks/ddp_scaling.py --out $OUT/ddp3b_1gpu.json $ARGS 2>&1 | grep -v Warn | tail -5
timeout 200 $ACC --multi_gpu --num_processes 2 benchmarks/ddp_scaling.py --out $OUT/ddp3b_2gpu.json $ARGS 2>&1 | grep -v Warn | tail -5
python3 benchmarks/ddp_scaling.py --compare $OUT/ddp3b_1gpu.json $OUT/ddp3b_2gpu.json --out $OUT/ddp3b_scaling.json

#!/usr/bin/env bash
# GPU checks and benchmarks of matvlm, one subcommand each. Run from the repository root on a CUDA machine.
#
#   bash scripts/gpu_checks.sh setup          install the wheels in .gpu-wheels/ (if any) and check the imports
#   bash scripts/gpu_checks.sh tests          the GPU-marked tests (pytest -m gpu); FSDP2 tests need 2 GPUs
#   bash scripts/gpu_checks.sh bench [PART]   engine speed and memory at the TinyLLaVA-3.1B shape (matvlm bench);
#                                             PART = decode | hf | memory | all (default all)
#   bash scripts/gpu_checks.sh distill-scale  distillation throughput at the 3.1B shape: 1 GPU (batch 1 and 4,
#                                             eager / compiled layers, chunked / liger loss), and 1 vs 2 GPUs (DDP)
#                                             when two GPUs are visible
#   bash scripts/gpu_checks.sh fidelity [ARGS]    benchmarks/fidelity_suite.py ARGS, if present
#   bash scripts/gpu_checks.sh serve-load [ARGS]  benchmarks/serve_load.py ARGS, if present
#
# Every subcommand but setup runs setup first. Results go to $OUT (default runs/gpu_checks/); copy the files that
# back a stated number into a dated folder under benchmarks/results/ (docs/benchmarks.md).
#
# Environment:
#   OUT            where results are written (default runs/gpu_checks)
#   SITE           where the carried wheels are installed (default /tmp/site; kept between calls on one machine)
#   STEP_TIMEOUT   seconds allowed to each measured command (default 560)
#
# .gpu-wheels/ (ignored by git) may hold wheels built for the GPU machine's Python, installed without network
# access: transformers, tokenizers, safetensors, mamba_ssm and liger_kernel (e.g. `pip wheel --no-deps -w .gpu-wheels
# mamba_ssm liger_kernel ...` on a machine of the same CUDA and Python). Without it, the environment's own packages
# are used (pip install -e ".[dev]" mamba_ssm liger-kernel).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_checks}
SITE=${SITE:-/tmp/site}
STEP_TIMEOUT=${STEP_TIMEOUT:-560}
mkdir -p "$OUT"

setup() {
  if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    if [ ! -f "$SITE/.installed" ]; then   # idempotent: a background run may still import from $SITE
      rm -rf "$SITE"
      python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu-wheels/*.whl 2>&1 \
        | grep -v WARNING || true
      touch "$SITE/.installed"
    fi
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  python3 -c "import torch, transformers, tokenizers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'tokenizers', tokenizers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'no CUDA device')"
}

tests() {
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | grep -vE "Loading weights|Writing model" \
    | tee "$OUT/gpu_tests.txt" | tail -5
}

bench() {  # split into parts so that each stays under a 10-minute call; parts merge into one bench_<device>.json
  local part=${1:-all} args
  mkdir -p "$OUT/bench"
  case "$part" in
    decode) args="--parts decode --engines matvlm" ;;
    hf) args="--parts decode --engines hf --hf-max-length 1024" ;;
    memory) args="--parts memory,batch,ttft" ;;
    all) bench decode && bench hf && bench memory; return ;;
    *) echo "usage: bash scripts/gpu_checks.sh bench [decode|hf|memory|all]"; exit 2 ;;
  esac
  timeout "$STEP_TIMEOUT" python3 -m matvlm.bench --shape tinyllava-3b --out "$OUT/bench" $args 2>&1 | tail -40
}

distill_scale() {
  local d="$OUT/distill_3b"
  mkdir -p "$d"
  # A short first run pays mamba_ssm's Triton autotuning once per machine, so the timed runs do not.
  timeout 240 python3 benchmarks/scale_3b.py --out "$d/warmup.json" --steps 1 --warmup 1 --batch 1 >/dev/null 2>&1
  run() {  # NAME then scale_3b.py options
    local name=$1; shift
    timeout "$STEP_TIMEOUT" python3 benchmarks/scale_3b.py --out "$d/scale_3b_$name.json" "$@" > "$d/$name.log" 2>&1
    echo "$name: rc $? $(grep -E '"(tokens_per_second|peak_memory_gib|mfu)"' "$d/scale_3b_$name.json" 2>/dev/null | tr -d ' \n')"
  }
  run b1 --steps 8
  run b1_gc --steps 8 --gradient-checkpointing
  run b4 --steps 4 --warmup 3 --batch 4 --logit-impl chunked
  run b4_liger --steps 4 --warmup 3 --batch 4 --logit-impl liger
  run b4_chunked_compilelayers --steps 4 --warmup 3 --batch 4 --logit-impl chunked --compile-layers
  run b4_liger_compilelayers --steps 4 --warmup 3 --batch 4 --logit-impl liger --compile-layers
  if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    local acc="python3 -m accelerate.commands.launch --num_machines 1 --mixed_precision no --dynamo_backend no"
    local args="--global-batch 8 --micro-batch 4 --steps 10 --warmup 3"
    timeout "$STEP_TIMEOUT" $acc --num_processes 1 benchmarks/ddp_scaling.py --out "$d/ddp3b_1gpu.json" $args 2>&1 | tail -3
    timeout "$STEP_TIMEOUT" $acc --multi_gpu --num_processes 2 benchmarks/ddp_scaling.py --out "$d/ddp3b_2gpu.json" $args \
      2>&1 | tail -3
    python3 benchmarks/ddp_scaling.py --compare "$d/ddp3b_1gpu.json" "$d/ddp3b_2gpu.json" --out "$d/ddp3b_scaling.json"
  else
    echo "one GPU visible: the 1 vs 2 GPU (DDP) comparison is skipped"
  fi
}

optional_script() {  # SCRIPT then its arguments
  local script=$1; shift
  if [ -f "$script" ]; then
    python3 "$script" "$@"
  else
    echo "$script is not in this checkout: nothing to run"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  tests) setup && tests ;;
  bench) setup && bench "$@" ;;
  distill-scale) setup && distill_scale ;;
  fidelity) setup && optional_script benchmarks/fidelity_suite.py --out "$OUT/fidelity" "$@" ;;
  serve-load) setup && optional_script benchmarks/serve_load.py "$@" ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac

# On the GPU machine: `matvlm bench` on the TinyLLaVA-3.1B shape, split so each call stays under 10 minutes.
# Usage: bash scripts/device_bench.sh PART   with PART = 1 (engine decode), 2 (HF decode), 3 (memory, batch, TTFT).
# Results merge into benchmarks/bench_<device>.json; copy them back from $OUT and commit them with the plots.
set -o pipefail
source scripts/device_setup.sh
mkdir -p runs/bench
cp benchmarks/bench_*.json runs/bench/ 2>/dev/null || true  # parts measured on an earlier machine merge in
case "$1" in
  1) args="--parts decode --engines matvlm" ;;
  2) args="--parts decode --engines hf --hf-max-length 1024" ;;
  3) args="--parts memory,batch,ttft" ;;
  *) echo "usage: bash scripts/device_bench.sh 1|2|3"; exit 2 ;;
esac
timeout 560 python3 -m matvlm.bench --shape tinyllava-3b --out runs/bench $args 2>&1 | tail -40
cp runs/bench/bench_* "$OUT"/ 2>/dev/null || true

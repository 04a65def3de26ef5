# On the GPU machine, alone (session 7's first try shared it with two teachers and printed nothing in 450 s):
#   bash benchmarks/probes/position_sweep.sh [STEPS]
# Eight variants of position_readout.py side by side on GPU 0, two CPU threads each; logs in $OUT/where_*.txt.
# Five ask where the one object is; three ask where a named one of three is (two after 4,000 colour steps).
source scripts/device_setup.sh
set +e
STEPS=${1:-5000}
# render the 3,000 images of each world once
python3 benchmarks/probes/position_readout.py steps=0 > /dev/null 2>&1 & python3 benchmarks/probes/position_readout.py steps=0 objects=3 > /dev/null 2>&1; wait
i=0
for v in "" "pos_std=1" "pos_lr=30 pos_std=1" "patch_lr=0.2 pos_std=1" "grounded=1 pos_std=1" \
         "objects=3" "objects=3 attr_steps=4000 pos_std=1" "objects=3 attr_steps=4000 pos_lr=30 pos_std=1"; do
  THREADS=2 OMP_NUM_THREADS=2 python3 benchmarks/probes/position_readout.py steps=$STEPS $v > "$OUT/where_$i.txt" 2>&1 &
  i=$((i + 1))
done
wait
for f in "$OUT"/where_*.txt; do grep -v Warn "$f" | head -n 1; grep -v Warn "$f" | awk 'NR % 10 == 1' | tail -n 6; done

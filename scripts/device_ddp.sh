# On a 2-GPU machine: distillation on 1 GPU vs 2 GPUs (DDP through accelerate) at the same global batch.
# Usage: bash scripts/device_ddp.sh. Writes ddp_1gpu.csv, ddp_2gpu.csv and ddp_summary.json into $OUT.
set -o pipefail
source scripts/device_setup.sh
[ -f runs/ddp_world/train.json ] || python3 -m matvlm.cli data synth runs/ddp_world --train 20000 --test 100 --seed 1 --workers 16 2>&1 | tail -1
# A mid-size teacher (random after 2 steps; the loss curve and the speed are what is measured, not quality).
[ -f runs/ddp_teacher/config.json ] || timeout 300 python3 -m matvlm.cli teacher --data runs/ddp_world --out runs/ddp_teacher \
  --config configs/ddp_teacher.json 2>&1 | tail -2
for n in 1 2; do
  rm -rf runs/ddp_$n runs/ddp_$n.run
  timeout 200 python3 -m accelerate.commands.launch --num_processes $n --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m matvlm.cli distill --teacher runs/ddp_teacher --data runs/ddp_world/train.json --out runs/ddp_$n \
    --config configs/ddp_distill.json 2>&1 | tr '\r' '\n' | grep -E "distilled|rror" | tail -3
  cp runs/ddp_$n.run/log.csv $OUT/ddp_${n}gpu.csv
done
python3 - <<'PY'
import csv, json, os
rows = {n: list(csv.DictReader(open(f"runs/ddp_{n}.run/log.csv"))) for n in (1, 2)}
def speed(r):  # tokens/s over the steps after the first 5 (warm-up)
    t = [float(x["seconds"]) for x in r]; tok = [float(x["tokens"]) for x in r]
    return sum(tok[5:]) / (t[-1] - t[4])
l1 = [float(x["loss"]) for x in rows[1]]; l2 = [float(x["loss"]) for x in rows[2]]
import torch
out = {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "steps": len(l1),
       "max_abs_loss_diff": max(abs(a - b) for a, b in zip(l1, l2)), "max_rel_loss_diff": max(abs(a - b) / abs(a) for a, b in zip(l1, l2)),
       "tokens_per_s_1gpu": speed(rows[1]), "tokens_per_s_2gpu": speed(rows[2])}
out["scaling"] = out["tokens_per_s_2gpu"] / out["tokens_per_s_1gpu"]
print(json.dumps(out, indent=1)); json.dump(out, open(os.environ["OUT"] + "/ddp_summary.json", "w"), indent=1)
PY

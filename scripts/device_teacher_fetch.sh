# On the GPU machine: bring back a teacher run's latest weights (bf16, with the step) and, in run_meta.tgz, its config,
# tokenizer, loss log, profile and console log: two files a run, so four runs fit the eight files a call returns.
# Usage: bash scripts/device_teacher_fetch.sh [RUN_DIR] [DEST] (defaults runs/teacher.run and $OUT).
RUN=${1:-runs/teacher.run}
DEST=${2:-$OUT}
mkdir -p "$DEST"
RUN=$RUN DEST=$DEST python3 - <<'PY' || true
import os, torch
from safetensors.torch import save_file
from matvlm.training import list_checkpoints, load_checkpoint
ckpts = list_checkpoints(os.environ["RUN"])
if ckpts:
    tensors, _, meta = load_checkpoint(ckpts[-1])
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              os.environ["DEST"] + "/weights.safetensors", metadata={"step": str(meta["step"])})
    print("weights of step", meta["step"], "in", os.environ["DEST"] + "/weights.safetensors")
PY
name=$(basename "$RUN" .run)
tar czf "$DEST/run_meta.tgz" -C "$(dirname "$RUN")" --ignore-failed-read "$(basename "$RUN")"/config.json \
  "$(basename "$RUN")"/tokenizer "$(basename "$RUN")"/log.csv "$(basename "$RUN")"/profile.txt "${name}_bg.log" 2>/dev/null || true

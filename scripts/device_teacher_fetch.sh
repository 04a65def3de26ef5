# On the GPU machine: bring back a teacher run's latest weights (bf16, with the step), config, tokenizer and log.
# Usage: bash scripts/device_teacher_fetch.sh [RUN_DIR] [DEST] (defaults runs/teacher.run and $OUT).
RUN=${1:-runs/teacher.run}
DEST=${2:-$OUT}
mkdir -p "$DEST"
cp "$RUN/log.csv" "$DEST/teacher_log.csv" 2>/dev/null || true
cp "$RUN/profile.txt" "$DEST/teacher_profile.txt" 2>/dev/null || true
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
tar czf "$DEST/run_meta.tgz" -C "$(dirname "$RUN")" "$(basename "$RUN")"/config.json "$(basename "$RUN")"/tokenizer \
  "$(basename "$RUN")"/log.csv "${name}_bg.log" 2>/dev/null || true

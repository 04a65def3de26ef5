# On the GPU machine: bring back a teacher run's latest weights (bf16, with the step), config, tokenizer and log.
# Usage: bash scripts/device_teacher_fetch.sh [RUN_DIR] (default runs/teacher.run); writes into $OUT.
RUN=${1:-runs/teacher.run}
cp "$RUN/log.csv" "$OUT/teacher_log.csv" 2>/dev/null || true
cp "$RUN/profile.txt" "$OUT/teacher_profile.txt" 2>/dev/null || true
RUN=$RUN python3 - <<'PY' || true
import os, torch
from safetensors.torch import save_file
from matvlm.training import list_checkpoints, load_checkpoint
ckpts = list_checkpoints(os.environ["RUN"])
if ckpts:
    tensors, _, meta = load_checkpoint(ckpts[-1])
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              os.environ["OUT"] + "/weights.safetensors", metadata={"step": str(meta["step"])})
    print("weights of step", meta["step"], "in $OUT/weights.safetensors")
PY
tar czf "$OUT/run_meta.tgz" -C "$(dirname "$RUN")" "$(basename "$RUN")"/config.json "$(basename "$RUN")"/tokenizer "$(basename "$RUN")"/log.csv 2>/dev/null || true

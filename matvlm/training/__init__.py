"""The training loop shared by `matvlm teacher` and `matvlm distill`, and its parts.

    loop.py          the loop: `train(job, settings, run, ...)`, the `Job` a trainer supplies, `start_run`
    batches.py       resumable batch orders, per-process shares of a batch, micro-batches
    schedule.py      learning-rate schedules, AdamW parameter groups
    checkpoint.py    atomic checkpoints (full tensors whatever the sharding), random state, resume checks
    distributed.py   the process group (torchrun / accelerate launch), small collectives
    log.py           log.csv and TensorBoard
    profiling.py     a profile of a window of steps from inside a run
"""

from matvlm.training.batches import (EpochOrder, ResumableBatches, StagedOrder, SubsetOrder, even_micro_batches,
                                     micro_batch_bounds, micro_batches, row_chunks)
from matvlm.training.checkpoint import (check_same_run, list_checkpoints, load_checkpoint, rng_state, save_checkpoint,
                                        set_rng_state)
from matvlm.training.distributed import end_process_group, start_process_group
from matvlm.training.log import read_log
from matvlm.training.loop import Job, LoopSettings, Run, TrainResult, start_run, train
from matvlm.training.schedule import adamw_param_groups, lr_factor

__all__ = [
    "EpochOrder", "Job", "LoopSettings", "ResumableBatches", "Run", "StagedOrder", "SubsetOrder", "TrainResult",
    "adamw_param_groups", "check_same_run", "end_process_group", "even_micro_batches", "list_checkpoints",
    "load_checkpoint", "lr_factor", "micro_batch_bounds", "micro_batches", "read_log", "rng_state", "row_chunks",
    "save_checkpoint", "set_rng_state", "start_process_group", "start_run", "train",
]

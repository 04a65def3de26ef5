"""One process group for every job, under `torchrun` or `accelerate launch` alike.

Both launchers start one process per GPU (or per CPU slot) and set RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; the process group is then plain torch.distributed (NCCL on GPUs, gloo on the CPU). The
launcher's own options (accelerate's mixed precision, its DDP or FSDP wrappers) are not used: each job sets its
dtypes and the loop its DDP wrapper; FSDP2 is read from accelerate's environment by the distillation job.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_process_group() -> Processes:
    """(rank, process count, device) of this process. With several processes (WORLD_SIZE > 1) this starts the
    process group once; each process takes the GPU of its LOCAL_RANK (none under ACCELERATE_USE_CPU, which
    `accelerate launch --cpu` sets). The group ends at exit (`end_process_group`) if the caller has not ended it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true")
    if torch.cuda.is_available() and not use_cpu:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(end_process_group)
    return Processes(dist.get_rank() if world > 1 else 0, world, device)


def end_process_group() -> None:
    """Close the process group of a multi-process run once every process is done (each waits for the others).
    Left open, gloo's threads outlive the interpreter and may abort the process at exit ("terminate called
    without an active exception"). Safe to call twice, and in a single-process run.

    The wait goes through the group's store, not a collective: a gloo worker thread may still be releasing a
    just-finished barrier's work when the group's last reference goes, and the group's destructor, which joins
    that thread while holding the GIL, then deadlocks with it (the thread needs the GIL to free a tensor). That
    hung ~1 in 30 two-process CPU runs at exit."""
    if dist.is_available() and dist.is_initialized():
        store = dist.distributed_c10d._get_default_store()
        store.set(f"matvlm/done/{dist.get_rank()}", "1")
        store.wait([f"matvlm/done/{rank}" for rank in range(dist.get_world_size())])
        dist.destroy_process_group()


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over all processes (in place; unchanged with one process)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def max_over_processes(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def wait_for_everyone() -> None:
    if dist.is_initialized():
        dist.barrier()

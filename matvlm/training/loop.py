"""The training loop of every job (`matvlm teacher`, `matvlm distill`): one process or several, one resume, one
checkpoint format, one log.

A job (a `Job` subclass) says what trains and how: the module and its trained tensors, the AdamW groups, the
data set and its batch order, and the loss of a micro-batch. The loop does the rest, the same way for every job:

- resume: refuse a fresh start over an earlier run's checkpoints and a resume whose options changed; load the
  last checkpoint's trained tensors, optimizer state and random state, and continue at its step with the
  batches an uninterrupted run would see (`batches.ResumableBatches`);
- processes: each takes its rows of every global batch; gradients are averaged by DDP, or by FSDP2 when the job
  shards its module itself (`Job.sharded`); losses are divided by counts over the whole global batch, so the loss
  curve is the one of one process;
- a step: the learning rate of the schedule, micro-batches of at most `max_batch_tokens` padded tokens, one
  gradient reduction per step (DDP), gradient clipping, AdamW;
- the log: one row a step (step, loss, the job's loss parts, grad_norm, lr, tokens, seconds), read back from the
  device in groups (no host sync a step), checked for a non-finite loss, in log.csv and the checkpoints;
- cadence: a checkpoint every `save_every` steps, at the end and at `stop_at`; an evaluation every `eval_every`
  steps; a progress bar; an optional profile of a window of steps.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from matvlm.data.llava import collate
from matvlm.errors import TrainingDiverged
from matvlm.training.batches import ResumableBatches, even_micro_batches, micro_batches
from matvlm.training.checkpoint import (
    check_same_run,
    full_optimizer_state,
    full_tensors,
    list_checkpoints,
    load_checkpoint,
    load_full_optimizer_state,
    load_trained,
    save_checkpoint,
    set_rng_state,
)
from matvlm.training.distributed import (
    Processes,
    max_over_processes,
    start_process_group,
    sum_over_processes,
)
from matvlm.training.log import RunLog
from matvlm.training.profiling import StepProfiler, quiet_window_start
from matvlm.training.schedule import lr_factor

READ_BACK_EVERY = 25  # steps whose losses are read back from the device together


@dataclass
class Run:
    """Where a run lives and which process this is; `checkpoint` is the one to resume from (None: a fresh run)."""

    dir: Path
    processes: Processes
    checkpoint: Path | None

    @property
    def main(self) -> bool:
        return self.processes.main

    @property
    def device(self) -> torch.device:
        return self.processes.device


def start_run(out: str | Path, resume: bool) -> Run:
    """Start the process group and find the run's folder (OUT.run/ next to the output OUT) and the checkpoint to
    resume from. A folder with checkpoints is resumed only when asked: a fresh start would overwrite them."""
    out = Path(out)
    run_dir = out.with_name(out.name + ".run")
    processes = start_process_group()
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not resume:
        raise FileExistsError(f"{run_dir} holds checkpoints of an earlier run: resume it (--resume), or use a new "
                              "--out (or delete that folder) to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    return Run(run_dir, processes, checkpoints[-1] if checkpoints else None)


@dataclass
class LoopSettings:
    """The options of the loop itself, which each job fills from its own config."""

    steps: int
    lr: float
    grad_clip: float
    max_batch_tokens: int  # padded tokens per micro-batch per process
    save_every: int
    eval_every: int = 0  # 0: no periodic evaluation
    schedule: str = "cosine"  # see `lr_factor`
    warmup: float = 0.03
    decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    pad_to_multiple: int = 1  # micro-batch widths rounded up to this (fewer shapes for GPU kernels)
    bf16: bool = False  # bf16 autocast
    num_workers: int = 4
    preloaded: bool = False  # the data set is in memory: fewer loader workers
    profile_at: int = 0  # profile 10 steps from this one into RUN/profile.txt (0: off)


class Job:
    """What a job supplies to the loop. Subclasses set the attributes and implement `counts` and `loss`."""

    name: str  # the progress bar's label
    metrics: tuple[str, ...] = ()  # loss parts logged after the loss, e.g. ("layer", "kl", "ce")
    module: nn.Module  # holds every trained tensor; `loss` calls it (or its DDP wrapper)
    dataset: Dataset
    order: Any  # the batch order: `EpochOrder`, `SubsetOrder` or `StagedOrder`
    pad_token_id: int
    sharded: bool = False  # the job shards `module` with FSDP2 in `place` (no DDP wrapper)
    find_unused_parameters: bool = False  # DDP: a process's rows may leave some trained tensors without gradient

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds, by name (they share storage with the module's)."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """AdamW groups of the trained parameters; a group may carry `lr_scale` (its rate relative to the schedule)."""
        raise NotImplementedError

    def place(self) -> None:
        """Move the module to its device, or shard it, once a checkpoint's tensors are in (before the optimizer)."""

    def params_without_gradient(self) -> list[nn.Parameter]:
        """Trained parameters that never get a gradient, which DDP must not wait for."""
        return []

    def counts(self, batch: dict) -> list[float]:
        """This process's share of the global batch's normalisers (e.g. target tokens); the loop sums them over
        processes and passes the totals to `loss`."""
        raise NotImplementedError

    def loss(self, model: nn.Module, chunk: dict, totals: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss to differentiate, detached float64 vector of (loss, *metrics)), for one micro-batch already on
        the device. Both are sums over the chunk divided by the global `totals`, so that they add up over
        micro-batches and processes to the global batch's means."""
        raise NotImplementedError

    def evaluate(self, step: int) -> str | None:
        """A periodic evaluation, called in every process; returns a line for the progress bar (or None)."""
        return None

    def memory_advice(self) -> str:
        return ""


@dataclass
class TrainResult:
    columns: list[str]
    history: list[list]  # one row a step, as in log.csv
    step: int  # the last step trained
    seconds: float  # training time of this process's part of the run (since its start or resumption)
    stopped: bool = False  # ended at `stop_at` before the last step

    def column(self, name: str) -> list:
        j = self.columns.index(name)
        return [row[j] for row in self.history]


def log_columns(job: Job) -> list[str]:
    return ["step", "loss", *job.metrics, "grad_norm", "lr", "tokens", "seconds"]


def train(job: Job, settings: LoopSettings, run: Run, config: Any, resumable: set[str], progress: bool = True,
          stop_at: int | None = None) -> TrainResult:
    """Train `job` for `settings.steps` steps (or until `stop_at`, with a checkpoint), resuming `run.checkpoint`.
    `config` (a dataclass) is saved as the run's config.json; a resumed run may change only its `resumable` options."""
    main, device, world = run.main, run.device, run.processes.world
    start, history = 0, []
    state = None
    if run.checkpoint is not None:  # trained tensors go in before sharding, the optimizer state once it exists
        check_same_run(run.dir / "config.json", config, resumable)
        tensors, state, meta = load_checkpoint(run.checkpoint)
        load_trained(job.trainable_state(), tensors, run.checkpoint)
        start, history = meta["step"], meta["history"]
    job.place()
    optimizer = torch.optim.AdamW(job.param_groups(), lr=settings.lr, betas=tuple(settings.betas),
                                  fused=(device.type == "cuda" and not job.sharded) or None)
    if state is not None:
        load_full_optimizer_state(optimizer, state["optimizer"])
        set_rng_state(state["rng"])
        if main:
            print(f"resuming {run.dir} from step {start}")
    if main:
        (run.dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    trained = [p for group in optimizer.param_groups for p in group["params"]]

    model = job.module
    if world > 1 and not job.sharded:  # wraps compiled layers, as torchtitan does
        for p in job.params_without_gradient():  # after the optimizer: its layout stays that of one process
            p.requires_grad_(False)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=job.find_unused_parameters)

    loader = data_loader(job, settings, ResumableBatches(job.order, start, settings.steps, run.processes.rank, world),
                         pin_memory=device.type == "cuda")
    columns = log_columns(job)
    log = RunLog(run.dir, columns, enabled=main)
    bar = tqdm(total=settings.steps, initial=start, desc=job.name, disable=not (progress and main))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)
    profile_at = quiet_window_start(settings.profile_at, [settings.save_every, settings.eval_every])
    if profile_at != settings.profile_at and main:
        bar.write(f"profile_at {settings.profile_at} -> {profile_at}: the window holds no checkpoint or evaluation")
    profiler = StepProfiler(profile_at if main else 0, run.dir / "profile.txt", last=settings.steps)
    step, tokens, began = start, 0, time.perf_counter()
    pending: list[tuple[int, torch.Tensor, torch.Tensor, float, float]] = []

    def read_back() -> None:
        """Sum the pending steps' losses and token counts over processes, check them and log them."""
        nonlocal tokens
        if not pending:
            return
        sums = torch.stack([torch.cat([parts, parts.new_tensor([n])]) for _, parts, _, n, _ in pending])
        sums = sum_over_processes(sums).tolist()
        norms = torch.stack([norm.double() for _, _, norm, _, _ in pending]).tolist()  # the same in every process
        for (at, _, _, _, seconds), (*parts, n), norm in zip(pending, sums, norms):
            if not math.isfinite(parts[0]):
                raise TrainingDiverged(f"the loss became {parts[0]} at step {at}: training diverged; the last "
                                         f"checkpoint is from before it. Lower the learning rate (now {settings.lr}) "
                                         "and start a new run")
            lr = settings.lr * lr_factor(at - 1, settings.steps, settings.warmup, settings.decay, settings.schedule)
            row = [at, *parts, norm, lr, int(n), round(seconds, 3)]
            history.append(row)
            log.add(row)
            tokens += int(n)
        pending.clear()
        shown = {name: f"{value:.4g}" for name, value in zip(("loss", *job.metrics), history[-1][1:])}
        bar.set_postfix(**shown, tok_s=f"{tokens / (time.perf_counter() - began):,.0f}")

    job.module.train()
    stopping = False
    for batch in loader:
        profiler.begin(step + 1)
        lr = settings.lr * lr_factor(step, settings.steps, settings.warmup, settings.decay, settings.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        totals = sum_over_processes(torch.tensor(job.counts(batch), dtype=torch.float64, device=device))
        totals = totals.clamp_min(1).tolist()
        chunks = micro_batches(batch, settings.max_batch_tokens, settings.pad_to_multiple)
        if job.sharded:  # every micro-batch gathers parameters: all processes must run as many
            count = max_over_processes(len(chunks), device)
            chunks = even_micro_batches(batch, settings.max_batch_tokens, settings.pad_to_multiple, count)
        parts = torch.zeros(1 + len(job.metrics), dtype=torch.float64, device=device)
        try:
            for n, chunk in enumerate(chunks):
                chunk = {k: v.to(device, non_blocking=True) if v is not None else None for k, v in chunk.items()}
                # DDP: one gradient all-reduce a step, after the last micro-batch (processes may run different
                # numbers). FSDP2 reduce-scatters every micro-batch into sharded gradients instead.
                last = n == len(chunks) - 1
                with nullcontext() if last or model is job.module else model.no_sync():
                    with autocast:
                        loss, chunk_parts = job.loss(model, chunk, totals)
                    # DDP and FSDP2 average gradients over processes: each process's share of the global mean is
                    # scaled back up by their number.
                    (loss * world).backward()
                parts += chunk_parts
        except torch.OutOfMemoryError as err:
            raise RuntimeError(f"out of GPU memory in step {step + 1}: lower max_batch_tokens (now "
                               f"{settings.max_batch_tokens}){job.memory_advice()}; resume the run to go on") from err
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, settings.grad_clip)
        if isinstance(grad_norm, DTensor):  # sharded: the norm of the full gradient
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if profiled := profiler.end(step):
            bar.write(f"profile: {profiled} ({run.dir / 'profile.txt'})")
        pending.append((step, parts, grad_norm.detach(), float(batch["attention_mask"].sum()),
                        time.perf_counter() - began))
        bar.update(1)
        stopping = stop_at is not None and step >= stop_at
        saving = step % settings.save_every == 0 or step == settings.steps or stopping
        evaluating = bool(settings.eval_every) and step % settings.eval_every == 0 and step < settings.steps
        if len(pending) >= READ_BACK_EVERY or saving or evaluating:
            read_back()
        if saving:
            save(run, job, optimizer, step, history, log)
        if evaluating:
            if (line := job.evaluate(step)) and main:
                bar.write(f"step {step}: {line}")
            job.module.train()
        if stopping:
            break
    bar.close()
    log.close()
    return TrainResult(columns, history, step, time.perf_counter() - began, stopped=step < settings.steps)


def save(run: Run, job: Job, optimizer: torch.optim.Optimizer, step: int, history: list[list], log: RunLog) -> None:
    """A checkpoint of full tensors (gathered from every process when sharded) and the log, by the main process."""
    if job.sharded:
        trained = full_tensors(job.trainable_state(), run.main)
        optimizer_state = full_optimizer_state(optimizer, run.main)
    else:
        trained, optimizer_state = job.trainable_state(), optimizer.state_dict()
    if run.main:
        save_checkpoint(run.dir, step, trained, optimizer_state, {"history": history})
        log.write(history)


def data_loader(job: Job, settings: LoopSettings, sampler: ResumableBatches, pin_memory: bool) -> DataLoader:
    # Preloaded items are shared with forked workers; padding a batch of 128 still costs the main process more than
    # a small model's step on a GPU, so collation stays in workers either way.
    workers = min(settings.num_workers, 4) if settings.preloaded else settings.num_workers
    # Batches in flight sit in shared memory: about 4,096 records in flight in all, however they are batched.
    prefetch = max(2, 4096 // (job.order.batch_size * max(workers, 1)))
    return DataLoader(
        job.dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
        collate_fn=partial(collate, pad_token_id=job.pad_token_id, pad_to_multiple_of=settings.pad_to_multiple),
        prefetch_factor=prefetch if workers else None,
    )

"""`matvlm distill`: distillation of a hybrid from its teacher, on one process or many.

Recipe `staged` (default) first aligns each mixer to the attention it replaced (align.py), then runs the
end-to-end loop below; `single` is the paper's one stage.

One GPU or several through `accelerate launch`; each process takes its share of every global batch.
Two ways to use several GPUs (option `sharding`, in a config file or the DistillConfig):

- DDP (`accelerate launch --num_processes N -m matvlm.cli distill ...`): every process holds the whole
  model; gradients are averaged.
- FSDP2 (`accelerate launch --num_processes N --use_fsdp --fsdp_version 2 -m matvlm.cli distill ...`, or
  `"sharding": "fsdp2"` under any launcher): for students that do not fit on one card. Every process
  loads the teacher and builds the student on its CPU (host memory: about two model copies per process),
  then torch's `fully_shard` keeps 1/N of each group of tensors on each GPU (see `sharding.py` for the
  groups); a group is gathered while it runs. The distiller chooses its own groups, so accelerate's wrap
  policy, mixed-precision policy, state-dict type and RAM-efficient loading are not used: bf16 autocast
  follows the `bf16` option as on one GPU, reshard_after_forward is honoured, CPU offload and accelerate's
  activation checkpointing are refused (use --gradient-checkpointing). Held-out evaluation runs on every
  process together. Micro-batches are reduce-scattered one by one (no unsharded gradient copies).
  The default `sharding: auto` picks FSDP2 exactly when the launcher asks for it, else DDP.

Both give the loss curve of one process at the same global batch. A run lives in `OUT.run/` (resolved
config, checkpoints, log.csv, TensorBoard events when tensorboard is installed); `--resume` continues it
exactly. Checkpoints hold full tensors in one layout whatever the sharding, so a run may resume under the
other one. The final hybrid, a checkpoint the model class loads, is written atomically to OUT (by the
first process, from full tensors) with the teacher's processor.
"""

from __future__ import annotations

import csv
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..convert import to_hybrid
from ..data.preload import PreloadedDataset
from ..data.llava import SupervisedDataset, collate, load_records, warn_truncated_answers
from ..eval.report import write_json_atomic
from ..eval.runner import MODEL_INFO_FILE, evaluate, guess_template, read_model_info
from ..io import atomic_directory, copy_side_files, load_processor, load_vlm
from ..training import (
    EpochOrder,
    check_same_run,
    ResumableBatches,
    adamw_param_groups,
    list_checkpoints,
    load_checkpoint,
    lr_factor,
    micro_batches,
    save_checkpoint,
    set_rng_state,
)
from .distiller import Distiller, LossSettings
from .fused_loss import missing_requirements
from .sharding import (
    StateOnly,
    clip_grad_norm,
    even_micro_batches,
    full_optimizer_state,
    full_tensors,
    launcher_settings,
    load_full_optimizer_state,
    load_weights_everywhere,
    max_over_ranks,
    resolve_sharding,
    root_unsharded,
    shard_distiller,
)

LOG_COLUMNS = ["step", "loss", "layer", "kl", "ce", "grad_norm", "lr", "tokens", "seconds"]


@dataclass
class DistillConfig:
    teacher: str = ""
    out: str = ""
    data: str = ""  # LLaVA JSON (train)
    images: list[str] = field(default_factory=list)  # image folders, searched in order
    student: str = ""  # an already converted hybrid; else the teacher is converted here
    ratio: float = 0.25
    placement: str = "even"
    mamba_layers: list[int] = field(default_factory=list)  # explicit layers instead of ratio/placement
    attn_bias: bool = False
    conv_init: str = "random"
    random_init: bool = False  # ablation: mixers not initialised from attention
    template: str = ""  # default: the teacher's (matvlm.json), else guessed from its tokenizer
    # losses
    alpha_layer: float = 1.0
    beta_kl: float = 1.0
    gamma_ce: float = 1.0  # the paper uses 0; CE helped in every ablation we ran (benchmarks/distill_ablations.md)
    temperature: float = 1.0
    layer_loss: str = "mse"
    kl_positions: str = "all"
    normalize: str = "token"
    train_connector: bool = True
    logit_impl: str = "chunked"  # chunked (torch, any device) | liger (fused kernels: CUDA + liger-kernel)
    # optimisation
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    schedule: str = "wsd"
    warmup: float = 0.1
    decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 64  # global: over all processes and micro-batches
    max_batch_tokens: int = 16384  # padded tokens per micro-batch per process; bigger batches are split
    pad_to_multiple: int = 64  # sequence widths rounded up: fewer shapes for GPU kernels to compile and tune
    steps: int = 0  # 0: one epoch
    epochs: float = 1.0
    max_length: int = 2048
    bf16: bool = True  # autocast on the GPU; frozen weights in bf16 there
    bf16_cpu: bool = False  # the same on the CPU: slow, for tests that reproduce a GPU run's dtypes
    gradient_checkpointing: bool = False
    compile_layers: bool = False  # torch.compile each decoder layer and the vision tower (GPU: ~2x at 3.1B)
    num_workers: int = 4
    preload: bool = False  # tokenise and decode the whole data set once, in memory (small worlds)
    seed: int = 0
    save_every: int = 200
    eval_data: str = ""  # held-out LLaVA JSON for periodic and final evaluation
    eval_every: int = 0
    eval_records: int = 512
    save_dtype: str = "auto"  # auto: the teacher's dtype
    sharding: str = "auto"  # auto (FSDP2 when `accelerate launch --use_fsdp --fsdp_version 2`, else DDP) | ddp | fsdp2
    # staged: align each mixer to its attention first (distill/align.py), then the end-to-end loop;
    # single: the paper's one stage
    recipe: str = "staged"
    align_steps: int = 0  # 0: a tenth of the end-to-end steps
    align_lr: float = 1e-3
    ranking: str = ""  # rank-layers JSON for placement "auto"
    chunk_size: int = 256  # the mixers' scan chunk; the same result at any size (smaller is faster on a CPU)

    def loss_settings(self) -> LossSettings:
        names = {f.name for f in fields(LossSettings)}
        return LossSettings(**{k: v for k, v in asdict(self).items() if k in names})

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "DistillConfig":
        """Defaults < the JSON file < overrides that are not None. Unknown keys are an error."""
        values: dict = {}
        if path:
            path = Path(path)
            try:
                values = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"cannot read config file {path}: {err}") from err
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"{path}: unknown options {', '.join(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("images"), str):
            values["images"] = [values["images"]]
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


# Options that may change when a run resumes; every other one must match the saved config.
RESUMABLE_CHANGES = {"num_workers", "preload", "save_every", "eval_every", "eval_records", "eval_data", "out", "data", "images",
                     "teacher", "student", "max_batch_tokens", "gradient_checkpointing", "sharding",
                     "compile_layers"}


def build_student(cfg: DistillConfig, teacher) -> torch.nn.Module:
    if cfg.student:
        student = load_vlm(cfg.student, dtype=next(teacher.parameters()).dtype)
        return student.to(next(teacher.parameters()).device)
    student = to_hybrid(
        teacher, ratio=None if cfg.mamba_layers else cfg.ratio, placement=cfg.placement,
        mamba_layers=cfg.mamba_layers or None, attn_bias=cfg.attn_bias, conv_init=cfg.conv_init, seed=cfg.seed,
        ranking=cfg.ranking or None, chunk_size=cfg.chunk_size,
    )
    if cfg.random_init:  # ablation: keep the layout, forget the attention weights
        torch.manual_seed(cfg.seed)
        for mixer in student.mixers().values():
            for name, p in mixer.named_parameters():
                if p.ndim >= 2:
                    torch.nn.init.normal_(p, std=0.02)
    return student


def _oom_advice(cfg: DistillConfig) -> str:
    tips = [f"lower --max-batch-tokens (now {cfg.max_batch_tokens})"]
    if not cfg.gradient_checkpointing:
        tips.append("turn on --gradient-checkpointing")
    tips.append(f"or lower --max-length (now {cfg.max_length})")
    return "out of GPU memory in a distillation step: " + ", ".join(tips) + "; the run can be resumed with --resume"


class _Logs:
    """CSV (always) and TensorBoard (when installed) logs, written by the main process only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / "log.csv"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, history: list[list]) -> None:
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows([LOG_COLUMNS, *history])

    def scalars(self, row: list) -> None:
        if self.tb is not None:
            for name, value in zip(LOG_COLUMNS[1:], row[1:]):
                self.tb.add_scalar(f"train/{name}", value, row[0])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True, stop_at: int | None = None) -> dict:
    """Run (or resume) a distillation. Returns a summary; `stop_at` ends early with a checkpoint (tests)."""
    from accelerate import Accelerator

    for name in ("teacher", "out", "data"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    cfg.loss_settings().check()
    if cfg.recipe not in ("staged", "single"):
        raise ValueError(f"recipe {cfg.recipe!r}: choose staged (align the mixers, then end to end) or single")
    launcher = launcher_settings()
    sharding = resolve_sharding(cfg.sharding, launcher)
    accelerator = Accelerator()
    device = accelerator.device
    if cfg.logit_impl == "liger" and (missing := missing_requirements(device)):  # fail before loading models
        raise RuntimeError("logit_impl=liger needs " + " and ".join(missing) + "; use logit_impl=chunked")
    on_gpu = device.type == "cuda"
    main = accelerator.is_main_process
    # FSDP2 builds on the CPU (the model may not fit on one card) whatever the process count, so that one
    # process with `sharding: fsdp2` starts from the same initialisation as N (CPU and GPU generators differ).
    # It leaves accelerate's model preparation out (no DDP wrapper, no accelerate FSDP wrapping).
    fsdp = sharding == "fsdp2"
    sharded = fsdp and accelerator.num_processes > 1
    build_device = torch.device("cpu") if fsdp else device
    if fsdp:
        load_weights_everywhere()
    out = Path(cfg.out)
    run_dir = out.with_name(out.name + ".run")

    checkpoints = list_checkpoints(run_dir)
    if checkpoints and not resume:
        raise FileExistsError(f"{run_dir} holds checkpoints of an earlier run; pass --resume, or use a new --out")
    if checkpoints:
        check_same_run(run_dir / "config.json", cfg, RESUMABLE_CHANGES)

    bf16 = cfg.bf16 and (on_gpu or cfg.bf16_cpu)
    dtype = torch.bfloat16 if bf16 else torch.float32
    teacher = load_vlm(cfg.teacher, dtype=dtype, device=str(build_device))
    student = build_student(cfg, teacher)
    distiller = Distiller(teacher, student, cfg.loss_settings(), train_connector=cfg.train_connector)
    del teacher  # what the distiller needs of it is kept inside; the rest is the student's shared copy
    for module in distiller.trainable_modules():
        module.float()  # master weights of what trains stay fp32; autocast runs the matmuls in bf16
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile_layers:  # before sharding and DDP, as torchtitan does: they wrap the compiled modules
        student.compile_layers()
    distiller.train()

    processor = load_processor(cfg.teacher)
    tokenizer = processor.tokenizer
    template = cfg.template or read_model_info(cfg.teacher).get("template") or guess_template(tokenizer)
    records = load_records(cfg.data)
    dataset = SupervisedDataset(
        records, cfg.images, tokenizer, processor.image_processor, template,
        num_image_tokens=student.config.image_seq_length, max_length=cfg.max_length, source=cfg.data,
    )
    if main:
        warn_truncated_answers(dataset)
    order = EpochOrder(dataset.lengths, cfg.batch_size, cfg.seed)
    total_steps = cfg.steps or max(1, int(cfg.epochs * order.batches_per_epoch))
    align_stats = None
    if cfg.recipe == "staged" and not checkpoints:  # stage 1 (a resumed run has done it)
        from .align import run_align_stage

        align_stats = run_align_stage(cfg, distiller, dataset, tokenizer.pad_token_id, total_steps, bf16, sharded,
                                      progress and main)

    start, history, state = 0, [], None
    if checkpoints:  # trained tensors go in before sharding, the optimizer state once it exists
        tensors, state, meta = load_checkpoint(checkpoints[-1])
        trainable = distiller.trainable_state()
        missing = sorted(set(trainable) - set(tensors))
        if missing:
            raise RuntimeError(f"checkpoint {checkpoints[-1]} lacks trained tensors {missing[:4]}; it is from another run")
        with torch.no_grad():
            for k, p in trainable.items():
                p.copy_(tensors[k])
        start, history = meta["step"], meta["history"]
    if sharded:
        shard_distiller(distiller, device, launcher.reshard_after_forward)
    elif build_device != device:
        distiller.to(device)
    optimizer = torch.optim.AdamW(
        adamw_param_groups(distiller, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), foreach=on_gpu
    )
    if state is not None:
        load_full_optimizer_state(optimizer, state["optimizer"])
        set_rng_state(state["rng"])
        if main:
            print(f"resuming {run_dir} from step {start}")
    if main and fsdp and not sharded:
        print("sharding fsdp2 with one process: nothing to shard, the model runs whole")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    if fsdp:  # sharded above; accelerate's own FSDP preparation would re-wrap the distiller
        model = distiller
    else:
        model, optimizer = accelerator.prepare(distiller, optimizer)
    sampler = ResumableBatches(order, start, total_steps, accelerator.process_index, accelerator.num_processes)
    if cfg.preload:
        dataset = PreloadedDataset(dataset, workers=cfg.num_workers, progress=progress and main)
    pad = partial(collate, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=cfg.pad_to_multiple)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=pad,
        num_workers=0 if cfg.preload else cfg.num_workers, pin_memory=on_gpu,
    )
    eval_records = load_records(cfg.eval_data)[: cfg.eval_records] if cfg.eval_data else []
    logs = _Logs(run_dir, enabled=main)
    bar = tqdm(total=total_steps, initial=start, desc="distill", disable=not (progress and main))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    step, tokens, began = start, 0, time.perf_counter()
    trained_params = [p for g in optimizer.param_groups for p in g["params"]]
    weights = {"layer": cfg.alpha_layer, "kl": cfg.beta_kl, "ce": cfg.gamma_ce}

    for batch in loader:
        lr = cfg.lr * lr_factor(step, total_steps, cfg.warmup, cfg.decay, shape=cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Each loss is divided by its count over the whole global batch (all processes, all micro-batches);
        # DDP averages gradients over processes, so each process scales its sums by the process count.
        counts = distiller.normalizers(batch["attention_mask"], batch["labels"], batch["input_ids"])
        global_counts = accelerator.reduce(torch.tensor(list(counts.values()), device=device, dtype=torch.float64), "sum")
        div = dict(zip(counts, global_counts.clamp_min(1).tolist()))
        chunks = micro_batches(batch, cfg.max_batch_tokens, cfg.pad_to_multiple)
        if sharded:  # every micro-batch gathers parameters: all ranks must run as many
            count = max_over_ranks(len(chunks), device)
            chunks = even_micro_batches(batch, cfg.max_batch_tokens, cfg.pad_to_multiple, count)
        sums = torch.zeros(len(div) + 1, device=device, dtype=torch.float64)  # loss parts, then tokens
        try:
            for n, chunk in enumerate(chunks):
                chunk = {k: v.to(device, non_blocking=True) if v is not None else None for k, v in chunk.items()}
                sync = n == len(chunks) - 1
                # FSDP2 reduce-scatters every micro-batch into sharded gradients (no unsharded copies kept).
                with accelerator.no_sync(model) if not (sync or fsdp) else nullcontext(), autocast:
                    parts = model(**chunk)
                    loss = sum(weights[k] * parts[k] / div[k] for k in parts) * accelerator.num_processes
                accelerator.backward(loss)
                sums[:-1] += torch.stack([parts[k].detach().double() for k in div])  # no host sync here
        except torch.OutOfMemoryError as err:
            raise RuntimeError(_oom_advice(cfg)) from err
        if fsdp:
            grad_norm = clip_grad_norm(trained_params, cfg.grad_clip)
        else:
            grad_norm = accelerator.clip_grad_norm_(trained_params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        sums[-1] = float(batch["attention_mask"].sum())
        totals = accelerator.reduce(sums, "sum").tolist()
        parts_mean = {k: totals[j] / div[k] for j, k in enumerate(div)}
        loss_value = sum(weights[k] * parts_mean[k] for k in div)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}; lower --lr (now {cfg.lr})")
        tokens += int(totals[-1])
        elapsed = time.perf_counter() - began
        row = [step, loss_value, parts_mean["layer"], parts_mean["kl"], parts_mean["ce"], float(grad_norm), lr,
               int(totals[-1]), elapsed]
        history.append(row)
        logs.scalars(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", layer=f"{parts_mean['layer']:.3g}", kl=f"{parts_mean['kl']:.3g}",
                        ce=f"{parts_mean['ce']:.3g}", tok_s=f"{tokens / elapsed:,.0f}")
        stopping = stop_at is not None and step >= stop_at
        if step % cfg.save_every == 0 or step == total_steps or stopping:
            trained, opt_state = distiller.trainable_state(), optimizer
            if sharded:  # gathered on every rank (a collective), kept by the writer
                trained, opt_state = full_tensors(trained, main), StateOnly(full_optimizer_state(optimizer, main))
            if main:
                save_checkpoint(run_dir, step, trained, opt_state, {"history": history})
                logs.write(history)
            accelerator.wait_for_everyone()
        if (main or sharded) and cfg.eval_every and eval_records and step % cfg.eval_every == 0 and step < total_steps:
            res = _evaluate(distiller, processor, eval_records, cfg.images, template, autocast)  # sharded: all ranks alike
            if main:
                bar.write(f"step {step}: held-out average {res['average']:.3f}")
            distiller.train()
        if stopping:
            break
    bar.close()
    logs.close()
    summary = {"steps": step, "history": history, "train_seconds": time.perf_counter() - began}
    if align_stats is not None:
        summary["align"] = align_stats
    if stop_at is not None and step < total_steps:
        return summary

    if main or sharded:  # sharded: every rank takes part in evaluation and in gathering the weights
        distiller.eval()
        if eval_records:
            summary["heldout"] = _evaluate(distiller, processor, eval_records, cfg.images, template, autocast)
        full = full_tensors(distiller.student.state_dict(), main) if sharded else None
        if main:
            _write_output(cfg, distiller, template, summary, history, run_dir, full)
    accelerator.wait_for_everyone()
    return summary


def _evaluate(distiller: Distiller, processor, records: list[dict], images: list[str], template: str,
              autocast: torch.autocast) -> dict:
    """Held-out scores of the student as it trains: under the training autocast, since the trained parts
    (connector, mixers) keep fp32 master weights next to bf16 frozen ones."""
    distiller.eval()
    with root_unsharded(distiller), autocast:
        res = evaluate(distiller.student, processor.tokenizer, processor.image_processor, records, images, template,
                       batch_size=64, progress=False)
    return {k: v for k, v in res.items() if k != "records"}


def _write_output(cfg: DistillConfig, distiller: Distiller, template: str, summary: dict, history: list, run_dir: Path,
                  full_state: dict[str, torch.Tensor] | None = None) -> None:
    """`full_state`: the student's gathered tensors when it is sharded (else its own are saved)."""
    student = distiller.student
    if student.is_activation_checkpointing:
        student.gradient_checkpointing_disable()
    teacher_dtype = next(distiller.teacher_attention.parameters()).dtype
    save_dtype = teacher_dtype if cfg.save_dtype == "auto" else getattr(torch, cfg.save_dtype)
    info = read_model_info(cfg.teacher)
    info.update(template=template, distilled_from=str(cfg.teacher), mixer_layers=student.config.mamba_layers,
                distill_steps=summary["steps"], distill_tokens=sum(int(r[7]) for r in history))
    with atomic_directory(cfg.out, overwrite=True) as tmp:
        if full_state is None:
            student.to(save_dtype).save_pretrained(tmp)
        else:
            student.save_pretrained(tmp, state_dict={k: v.to(save_dtype) for k, v in full_state.items()})
            student.config.dtype = str(save_dtype).split(".")[1]  # save_pretrained wrote the sharded model's
            student.config.save_pretrained(tmp)
        copy_side_files(cfg.teacher, tmp)
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "distill_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        write_json_atomic(tmp / "distill_summary.json", {k: v for k, v in summary.items() if k != "history"})
        (tmp / "log.csv").write_text((run_dir / "log.csv").read_text() if (run_dir / "log.csv").exists() else "")

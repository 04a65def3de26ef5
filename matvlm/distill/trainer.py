"""`matvlm distill`: distillation of a hybrid from its teacher, on one process or many.

Recipe `staged` (default) first aligns each mixer to the attention it replaced (align.py), then runs the
end-to-end loop; `single` is the paper's one stage.

The loop is matvlm.training's (as `matvlm teacher`'s); this module says what trains and how: the distiller (the
student's mixers and connector against the teacher's layers and logits), its losses, and the hybrid it writes.
One GPU or several through `accelerate launch` or `torchrun`; each process takes its share of every global
batch. Two ways to use several GPUs (option `sharding`, in a config file or the DistillConfig):

- DDP (`accelerate launch --num_processes N -m matvlm.cli distill ...`, or `torchrun --nproc_per_node N -m
  matvlm.cli distill ...`): every process holds the whole model; gradients are averaged.
- FSDP2 (`accelerate launch --num_processes N --use_fsdp --fsdp_version 2 -m matvlm.cli distill ...`, or
  `"sharding": "fsdp2"` under any launcher): for students that do not fit on one card. Every process
  loads the teacher and builds the student on its CPU (host memory: about two model copies per process),
  then torch's `fully_shard` keeps 1/N of each group of tensors on each GPU (see `sharding.py` for the
  groups); a group is gathered while it runs. The distiller chooses its own groups, so accelerate's wrap
  policy, mixed-precision policy, state-dict type and RAM-efficient loading are not used (nor, under any
  launcher, accelerate's mixed precision): bf16 autocast follows the `bf16` option as on one GPU, reshard_after_forward is honoured, CPU offload and accelerate's
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

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from matvlm.data.checks import checked_records
from matvlm.data.llava import SupervisedDataset, warn_truncated_answers
from matvlm.data.preload import PreloadedDataset
from matvlm.distill.align import run_align_stage
from matvlm.distill.distiller import Distiller, LossSettings
from matvlm.distill.fused_loss import missing_requirements
from matvlm.distill.sharding import (launcher_settings, load_weights_everywhere, resolve_sharding, root_unsharded,
                                     shard_distiller)
from matvlm.eval.runner import evaluate
from matvlm.io import (MODEL_INFO_FILE, atomic_directory, copy_side_files, load_processor, load_vlm, model_template,
                       read_model_info, write_json_atomic)
from matvlm.io.fingerprint import check_same_inputs, input_fingerprints
from matvlm.model.convert import to_hybrid
from matvlm.training import EpochOrder, Job, LoopSettings, Run, adamw_param_groups, start_run, train
from matvlm.training.checkpoint import full_tensors
from matvlm.training.distributed import wait_for_everyone

LOSS_PARTS = ("layer", "kl", "ce")


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
    gamma_ce: float = 1.0  # the paper uses 0; benchmarks/fidelity_suite.py compares both
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
    skip_bad: bool = False  # leave out (and list) bad records found by the scan before training, instead of stopping
    fingerprints: dict = field(default_factory=dict)  # of teacher, student, data: set at the start, matched on resume
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


class DistillJob(Job):
    """The weighted sum of the distiller's losses, each a sum over the global batch divided by its count there."""

    name = "distill"
    metrics = LOSS_PARTS

    def __init__(self, cfg: DistillConfig, distiller: Distiller, dataset, order: EpochOrder, processor, template: str,
                 run: Run, sharded: bool, reshard_after_forward: bool):
        self.cfg, self.module, self.dataset, self.order, self.run = cfg, distiller, dataset, order, run
        self.processor, self.template, self.sharded = processor, template, sharded
        self.reshard_after_forward = reshard_after_forward
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.weights = {"layer": cfg.alpha_layer, "kl": cfg.beta_kl, "ce": cfg.gamma_ce}
        self.eval_records = checked_records(cfg.eval_data, cfg.images, skip_bad=cfg.skip_bad, limit=cfg.eval_records,
                                            log=print if run.main else None) if cfg.eval_data else []
        bf16 = cfg.bf16 and (run.device.type == "cuda" or cfg.bf16_cpu)
        self.autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=bf16)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.module.trainable_state()

    def param_groups(self) -> list[dict]:
        return adamw_param_groups(self.module, self.cfg.weight_decay)

    def place(self) -> None:
        if self.sharded:
            shard_distiller(self.module, self.run.device, self.reshard_after_forward)
        else:
            self.module.to(self.run.device)

    def counts(self, batch: dict) -> list[float]:
        counts = self.module.normalizers(batch["attention_mask"], batch["labels"], batch["input_ids"])
        return [float(counts[k]) for k in LOSS_PARTS]

    def loss(self, model, chunk: dict, totals: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = model(**chunk)
        means = {k: parts[k] / total for k, total in zip(LOSS_PARTS, totals)}
        loss = sum(self.weights[k] * means[k] for k in LOSS_PARTS)
        logged = torch.stack([loss.detach().double(), *(means[k].detach().double() for k in LOSS_PARTS)])
        return loss, logged

    def evaluate(self, step: int) -> str | None:
        if not self.eval_records or not (self.run.main or self.sharded):  # sharded: every process takes part
            return None
        res = evaluate_student(self.module, self.processor, self.eval_records, self.cfg.images, self.template,
                               self.autocast)
        return f"held-out average {res['average']:.3f}"

    def memory_advice(self) -> str:
        tips = "" if self.cfg.gradient_checkpointing else ", turn on --gradient-checkpointing"
        return f"{tips} or lower --max-length (now {self.cfg.max_length})"


def loop_settings(cfg: DistillConfig, total_steps: int, bf16: bool) -> LoopSettings:
    return LoopSettings(
        steps=total_steps, lr=cfg.lr, grad_clip=cfg.grad_clip, max_batch_tokens=cfg.max_batch_tokens,
        save_every=cfg.save_every, eval_every=cfg.eval_every, schedule=cfg.schedule, warmup=cfg.warmup,
        decay=cfg.decay, betas=tuple(cfg.betas), pad_to_multiple=cfg.pad_to_multiple, bf16=bf16,
        num_workers=cfg.num_workers, preloaded=cfg.preload,
    )


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True, stop_at: int | None = None) -> dict:
    """Run (or resume) a distillation. Returns a summary; `stop_at` ends early with a checkpoint (tests)."""
    for name in ("teacher", "out", "data"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    cfg.loss_settings().check()
    if cfg.recipe not in ("staged", "single"):
        raise ValueError(f"recipe {cfg.recipe!r}: choose staged (align the mixers, then end to end) or single")
    launcher = launcher_settings()
    sharding = resolve_sharding(cfg.sharding, launcher)
    run = start_run(cfg.out, resume)
    device, main = run.device, run.main
    if cfg.logit_impl == "liger" and (missing := missing_requirements(device)):  # fail before loading models
        raise RuntimeError("logit_impl=liger needs " + " and ".join(missing) + "; use logit_impl=chunked")
    cfg.fingerprints = input_fingerprints(cfg.teacher, cfg.student, cfg.data)
    if run.checkpoint is not None:  # before loading anything: a resume with other inputs is another run
        check_same_inputs(run.dir / "config.json", cfg.fingerprints,
                          {"teacher": cfg.teacher, "student": cfg.student, "data": cfg.data})
    # FSDP2 builds on the CPU (the model may not fit on one card) whatever the process count, so that one
    # process with `sharding: fsdp2` starts from the same initialisation as N (CPU and GPU generators differ).
    fsdp = sharding == "fsdp2"
    sharded = fsdp and run.processes.world > 1
    build_device = torch.device("cpu") if fsdp else device
    if fsdp:
        load_weights_everywhere()

    bf16 = cfg.bf16 and (device.type == "cuda" or cfg.bf16_cpu)
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

    processor = load_processor(cfg.teacher)
    tokenizer = processor.tokenizer
    template = model_template(cfg.teacher, tokenizer, cfg.template)
    records = checked_records(cfg.data, cfg.images, skip_bad=cfg.skip_bad, log=print if main else None)
    dataset = SupervisedDataset(
        records, cfg.images, tokenizer, processor.image_processor, template,
        num_image_tokens=student.config.image_seq_length, max_length=cfg.max_length, source=cfg.data,
    )
    if main:
        warn_truncated_answers(dataset)
    order = EpochOrder(dataset.lengths, cfg.batch_size, cfg.seed)
    total_steps = cfg.steps or max(1, int(cfg.epochs * order.batches_per_epoch))
    if cfg.preload:
        dataset = PreloadedDataset(dataset, workers=cfg.num_workers, progress=progress and main)
    if main and fsdp and not sharded:
        print("sharding fsdp2 with one process: nothing to shard, the model runs whole")

    align_stats = None
    if cfg.recipe == "staged" and run.checkpoint is None:  # stage 1; a resumed run has done it
        align_stats = run_align_stage(cfg, distiller, dataset, tokenizer.pad_token_id, total_steps, bf16, fsdp,
                                      progress and main)
    job = DistillJob(cfg, distiller, dataset, order, processor, template, run, sharded, launcher.reshard_after_forward)
    result = train(job, loop_settings(cfg, total_steps, bf16), run, cfg, RESUMABLE_CHANGES, progress=progress,
                   stop_at=stop_at)
    summary = {"steps": result.step, "history": result.history, "train_seconds": result.seconds}
    if align_stats is not None:
        summary["align"] = align_stats
    if result.stopped:
        return summary

    if main or sharded:  # sharded: every rank takes part in evaluation and in gathering the weights
        distiller.eval()
        if job.eval_records:
            summary["heldout"] = evaluate_student(distiller, processor, job.eval_records, cfg.images, template,
                                                  job.autocast)
        full = full_tensors(distiller.student.state_dict(), main) if sharded else None
        if main:
            write_output(cfg, distiller, template, summary, sum(result.column("tokens")), run.dir, full)
    wait_for_everyone()  # the next run of this process group (or its end) finds the output written
    return summary


def evaluate_student(distiller: Distiller, processor, records: list[dict], images: list[str], template: str,
                     autocast: torch.autocast) -> dict:
    """Held-out scores of the student as it trains: under the training autocast, since the trained parts
    (connector, mixers) keep fp32 master weights next to bf16 frozen ones."""
    distiller.eval()
    with root_unsharded(distiller), autocast:
        res = evaluate(distiller.student, processor.tokenizer, processor.image_processor, records, images, template,
                       batch_size=64, progress=False)
    return {k: v for k, v in res.items() if k != "records"}


def write_output(cfg: DistillConfig, distiller: Distiller, template: str, summary: dict, tokens: int, run_dir: Path,
                 full_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the hybrid to cfg.out atomically, with the teacher's processor, its model info (`tokens`: trained on)
    and the run's config, summary and log. `full_state`: the student's gathered tensors when it is sharded (else
    its own are saved)."""
    student = distiller.student
    if student.is_activation_checkpointing:
        student.gradient_checkpointing_disable()
    teacher_dtype = next(distiller.teacher_attention.parameters()).dtype
    save_dtype = teacher_dtype if cfg.save_dtype == "auto" else getattr(torch, cfg.save_dtype)
    info = read_model_info(cfg.teacher)
    info.update(template=template, distilled_from=str(cfg.teacher), mixer_layers=student.config.mamba_layers,
                distill_steps=summary["steps"], distill_tokens=tokens)
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

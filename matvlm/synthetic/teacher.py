"""Train a small LLaVA teacher from scratch on a LLaVA-format data set (the synthetic world by default).

The result is a standard transformers Llava checkpoint plus tokenizer and processor, loadable by stock
transformers: SigLIP-style vision encoder, two-layer MLP connector, Phi-style LM with partial rotary
(or a Llama-style LM with GQA), trained with next-token CE on answer tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PhiConfig,
    PreTrainedTokenizerBase,
    SiglipVisionConfig,
)

from matvlm.data.llava import (
    SupervisedDataset,
    build_image_processor,
    load_records,
    record_words,
    warn_truncated_answers,
)
from matvlm.data.preload import PreloadedDataset
from matvlm.data.tokenizer import keeps_number_space, train_tokenizer
from matvlm.eval.runner import evaluate
from matvlm.io import MODEL_INFO_FILE, atomic_directory, write_json_atomic
from matvlm.model.modeling import compile_llava_layers
from matvlm.synthetic.generated import GeneratedDataset, GeneratedRecords
from matvlm.synthetic.world import TEXT_FAMILIES
from matvlm.training import (
    EpochOrder,
    Job,
    LoopSettings,
    Run,
    StagedOrder,
    SubsetOrder,
    adamw_param_groups,
    list_checkpoints,
    load_checkpoint,
    lr_factor,
    read_log,
    start_run,
    train,
)
from matvlm.training.distributed import wait_for_everyone


@dataclass
class TeacherConfig:
    data: str  # world directory: train.json, test.json, images/
    out: str
    family: str = "phi"  # phi | llama
    template: str = "phi"
    vocab_size: int = 2048
    digit_group: int = 3  # tokenizer: digits per number token at most (1: one token per digit)
    # tokenizer: a number keeps its leading space (" 35" -> "Ġ35") so that copying it is a plain induction step
    # (train_tokenizer). From an init_from teacher whose tokenizer differs, a new one is trained and the
    # embeddings are carried over (transfer_vocab). None: as init_from's tokenizer (False from scratch), so that
    # continuing a teacher never changes its tokenizer unless asked; the run's config.json records the value.
    number_space: bool | None = None
    image_size: int = 128
    patch_size: int = 16
    vision_hidden: int = 192
    vision_layers: int = 5  # features come from the second-to-last layer, as in TinyLLaVA
    vision_heads: int = 4
    vision_feature_layer: int = -2
    hidden: int = 192
    layers: int = 8
    heads: int = 6
    kv_heads: int = 0  # 0: same as heads (phi) / heads // 3 (llama)
    intermediate: int = 768
    max_length: int = 2048
    max_batch_tokens: int = 65536  # padded tokens per forward pass; longer batches are split (same gradient)
    batch_size: int = 64
    steps: int = 4000
    lr: float = 1e-3
    weight_decay: float = 0.1
    # The vision patch projection's learning rate relative to lr. Adam moves every weight by about lr per step,
    # so a projection of 3 * patch**2 pixels grows its output ~patch**2 times faster than the position table
    # grows: at 1.0 image content can swamp position (token norm ~300 against a position norm of 0.7 in one
    # from-scratch run), and the model cannot tell where anything is. Keeps the weight decay per step of 1.0.
    patch_lr_scale: float = 1.0
    position_init_std: float = 0.0  # SigLIP's position table starts N(0, this**2) per entry (0: SigLIP's own init)
    warmup: float = 0.03
    lr_schedule: str = "cosine"  # cosine (to 10% of peak) | constant, after warm-up
    grad_clip: float = 1.0
    eval_every: int = 1000
    eval_records: int = 1024  # periodic evaluation on the first N held-out records
    final_eval_records: int = 0  # final evaluation on the first N (0: all)
    save_every: int = 500
    num_workers: int = 8
    warmup_families: list[str] = field(default_factory=list)  # curriculum: the first warmup_steps batches
    warmup_steps: int = 0  # come only from these families (e.g. caption), then the full mix
    stages: list[dict] = field(default_factory=list)  # more curriculum stages after the warm-up, each
    # {"steps": N, "families": [...], "max_words": W}: N batches from those families' records of at most W words
    family_weights: dict[str, int] = field(default_factory=dict)  # after warm-up, each record of a family appears
    # this many times per epoch (1 when absent; 0 leaves the family out): more of the families still learning
    # Batches of similar lengths (less padding). Lengths follow the family, so grouped batches hold one or two
    # families each; false draws every batch at random from the mix (recall and repeat records in the same
    # batches: how the shipped teacher learned the recall look-up), at the cost of padding.
    length_grouped: bool = True
    preload: bool = False  # tokenise and decode the whole data set once, in memory (small worlds)
    # Train on this many of the world's training records, made on demand in the loader's workers (record i is the
    # one `data synth --train N` writes as i) instead of DATA/train.json, which then only trains a new tokenizer.
    # DATA still gives world.json (seed, image size) and the held-out test.json. 0: read DATA/train.json.
    generated_train: int = 0
    generated_start: int = 0  # with generated_train: records start .. start + N - 1 (a continuation's fresh records)
    # With generated_train: training-only families (world.TRAIN_ONLY_FAMILIES) that join the world's in turn, e.g.
    # ["repeat"]; never scored. repeat's plain-text copying is what starts the recall look-up.
    train_only_families: list[str] = field(default_factory=list)
    compile: bool = False  # torch.compile each decoder layer and the vision tower (fewer kernel launches on a GPU)
    # Scaled-dot-product attention kernels the run may use, e.g. ["flash", "efficient", "math"] ([]: PyTorch's choice).
    # On an H100 PyTorch picks cuDNN's, which plans a graph per new shape: a profile measured 2.8-3.0 ms of CPU
    # per attention call (1.1 s of 2.5 s of CPU in 10 steps) with the world's varying lengths.
    sdpa_backends: list[str] = field(default_factory=list)
    profile_at: int = 0  # profile 10 steps from this one into OUT.run/profile.txt (0: off)
    # Intra-op CPU threads of a GPU run's training process (0: torch's default, one per core). It only launches
    # kernels and counts tokens; with one thread per core in each of several runs on one host, its small CPU ops
    # contend (profiled: 3 ms for a `labels != -100` of a batch-512 step).
    host_threads: int = 4
    init_from: str = ""  # a teacher directory whose weights and tokenizer start this run (fresh optimizer); its
    # patch size may be a multiple of this run's (the vision embeddings are resampled: `resample_patches`)
    seed: int = 0
    bf16: bool = True
    save_dtype: str = "bfloat16"  # shipped weights: bf16 halves the size; loaders may upcast

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_records", "final_eval_records"):  # 0: off (eval) or all (final)
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        lr_factor(0, 1, shape=self.lr_schedule)  # names the schedule if unknown
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if self.train_only_families and not self.generated_train:
            raise ValueError("train_only_families are made on demand: they need generated_train")
        if self.generated_train and self.preload:
            raise ValueError("generated_train makes records on demand: it cannot be combined with preload")


def build_teacher(cfg: TeacherConfig, tokenizer) -> LlavaForConditionalGeneration:
    special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_length,
        tie_word_embeddings=False, **special,
    )
    if cfg.family == "phi":
        text = PhiConfig(**text_kwargs, num_key_value_heads=cfg.kv_heads or cfg.heads, partial_rotary_factor=0.5,
                         resid_pdrop=0.0, embd_pdrop=0.0)
    elif cfg.family == "llama":
        text = LlamaConfig(**text_kwargs, num_key_value_heads=cfg.kv_heads or max(1, cfg.heads // 3))
    else:
        raise ValueError(f"unknown teacher family {cfg.family!r}; choose phi or llama")
    vision = SiglipVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2, vision_feature_select_strategy="full",
        vision_feature_layer=cfg.vision_feature_layer, projector_hidden_act="gelu",
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    if cfg.position_init_std > 0:
        with torch.no_grad():
            model.model.vision_tower.embeddings.position_embedding.weight.normal_(0.0, cfg.position_init_std)
    return model


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def sdpa_choice(names: list[str]):
    """A factory of contexts that limit attention to these kernels (none named: PyTorch's own choice). A factory,
    since sdpa_kernel's context is single-use; the names are checked here, before a run spends time on data."""
    unknown = [n for n in names if n not in SDPA_BACKENDS]
    if unknown:
        raise ValueError(f"sdpa_backends: unknown {unknown}; choose from {sorted(SDPA_BACKENDS)}")
    backends = [SDPA_BACKENDS[n] for n in names]
    return partial(sdpa_kernel, backends) if backends else contextlib.nullcontext


def teacher_param_groups(model: LlavaForConditionalGeneration, cfg: TeacherConfig) -> list[dict]:
    """AdamW groups; each carries `lr_scale` (its learning rate relative to the schedule's)."""
    patch = {id(p) for p in model.model.vision_tower.embeddings.patch_embedding.parameters()}
    groups = []
    for group in adamw_param_groups(model, cfg.weight_decay):
        by_scale: dict[float, list] = {}
        for p in group["params"]:
            by_scale.setdefault(cfg.patch_lr_scale if id(p) in patch else 1.0, []).append(p)
        # AdamW decays by lr * weight_decay a step: dividing by the scale keeps that pull as it is at 1.0.
        groups += [{**group, "params": params, "lr_scale": scale, "weight_decay": group["weight_decay"] / scale}
                   for scale, params in by_scale.items()]
    return groups


# Options that may change between a run and its resumption; every other one must stay the same.
RESUMABLE_CHANGES = {"num_workers", "preload", "compile", "profile_at", "host_threads", "eval_every", "eval_records", "final_eval_records", "save_every", "out", "data"}


PATCH_KEY, POSITION_KEY = "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"


def resample_patches(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """Fit another teacher's vision embeddings to this one's smaller patches, in place; returns the keys changed.

    A patch of p/k pixels with the kernel summed over k x k blocks sees exactly what the p-pixel kernel sees on
    the image enlarged k times (nearest): the vision tower starts on a zoomed-in image with k^2 times the
    tokens (the FlexiViT view). The position table is resized bicubically to the finer grid (also when only
    the image size differs)."""
    changed = []
    for key, value in tensors.items():
        if key not in own or own[key].shape == value.shape:
            continue
        if key.endswith(PATCH_KEY):
            (o, c, p, _), q = value.shape, own[key].shape[-1]
            if p % q:
                raise ValueError(f"init_from: patch {p} cannot be split into patches of {q} ({key})")
            tensors[key] = value.reshape(o, c, q, p // q, q, p // q).sum((3, 5))
        elif key.endswith(POSITION_KEY):
            g, h = math.isqrt(value.shape[0]), math.isqrt(own[key].shape[0])
            grid = value.T.reshape(1, -1, g, g)
            tensors[key] = F.interpolate(grid, size=(h, h), mode="bicubic", align_corners=False).reshape(-1, h * h).T
        else:
            continue
        changed.append(key)
    return changed


VOCAB_KEYS = ("embed_tokens.weight", "lm_head.weight")


def transfer_vocab(tensors: dict[str, torch.Tensor], old: PreTrainedTokenizerBase, new: PreTrainedTokenizerBase) -> list[str]:
    """Fit the token embeddings and output rows of a model with tokenizer `old` to tokenizer `new`, in place;
    returns the keys changed. A token both vocabularies hold keeps its row; any other gets the mean of the
    rows of the old tokens its text encodes to ("Ġ35" <- mean("Ġ", "35")), a common start for a new vocabulary."""
    old_vocab = old.get_vocab()
    pieces: list[list[int]] = [[] for _ in range(len(new))]
    for token, j in new.get_vocab().items():
        pieces[j] = [old_vocab[token]] if token in old_vocab else old.encode(
            new.convert_tokens_to_string([token]), add_special_tokens=False)
    if empty := [new.convert_ids_to_tokens(j) for j, p in enumerate(pieces) if not p]:
        raise ValueError(f"init_from: the old tokenizer cannot encode the new tokens {empty[:5]}")
    changed = []
    for key, value in tensors.items():
        if key.endswith(VOCAB_KEYS) and value.shape[0] == len(old):
            tensors[key] = torch.stack([value[p].mean(0) for p in pieces])
            changed.append(key)
    return changed


def init_weights(model: LlavaForConditionalGeneration, source: str | Path,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Start from another teacher's weights (e.g. the shipped one, to train it further). A teacher of larger
    patches (a multiple of this one's) also fits: see `resample_patches`; so does one of another tokenizer
    than `tokenizer` (this run's): see `transfer_vocab`."""
    # from_pretrained maps the saved key layout onto the current one.
    tensors = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).state_dict()
    own = model.state_dict()
    if tokenizer is not None:
        old = AutoTokenizer.from_pretrained(source)
        if old.get_vocab() != tokenizer.get_vocab():
            transfer_vocab(tensors, old, tokenizer)
    resample_patches(tensors, own)
    bad = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if bad or missing or unexpected:
        raise ValueError(f"init_from {source} does not fit this config: shapes differ for {bad[:5]}, "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


def conversation_texts(records: list[dict]):
    for record in records:
        for turn in record["conversations"]:
            yield turn["value"].replace("<image>", "")


def record_families(records: Sequence[dict]) -> list:
    """Each record's family; generated records know theirs without being made."""
    if isinstance(records, GeneratedRecords):
        return [records.family(i) for i in range(len(records))]
    return [r.get("family") for r in records]


def record_word_counts(records: Sequence[dict]) -> list[int]:
    return records.words if isinstance(records, GeneratedRecords) else [record_words(r) for r in records]


def mixed_order(records: list[dict], lengths: list[int], cfg: TeacherConfig) -> EpochOrder | SubsetOrder:
    """The main stage's batch order: every record once per epoch, or repeated by `cfg.family_weights`."""
    if not cfg.family_weights:
        return EpochOrder(lengths, cfg.batch_size, cfg.seed, cfg.length_grouped)
    families = record_families(records)
    known = set(families)
    for family, weight in cfg.family_weights.items():
        if family not in known:
            raise ValueError(f"family_weights names {family!r}, which no training record has (families: {sorted(map(str, known))})")
        if not isinstance(weight, int) or weight < 0:
            raise ValueError(f"family_weights[{family!r}] must be a whole number >= 0, got {weight!r}")
    repeated = [i for i, f in enumerate(families) for _ in range(cfg.family_weights.get(f, 1))]
    return SubsetOrder(repeated, lengths, cfg.batch_size, cfg.seed, cfg.length_grouped)


def curriculum_order(records: list[dict], lengths: list[int], cfg: TeacherConfig):
    """The whole run's batch order: the warm-up stage, the further stages, then the (weighted) full mix."""
    stages = list(cfg.stages)
    if cfg.warmup_steps and cfg.warmup_families:
        stages.insert(0, {"steps": cfg.warmup_steps, "families": cfg.warmup_families})
    order = mixed_order(records, lengths, cfg)
    for n, stage in reversed(list(enumerate(stages))):  # nest from the last stage outwards
        unknown = set(stage) - {"steps", "families", "max_words"}
        if unknown or not isinstance(stage.get("steps"), int) or stage["steps"] < 1:
            raise ValueError(f"curriculum stage {n} {stage}: needs a whole number 'steps' >= 1 and at most "
                             f"'families' and 'max_words' besides (unknown keys: {sorted(unknown)})")
        families, max_words = set(stage.get("families") or []), stage.get("max_words")
        words = record_word_counts(records) if max_words is not None else None
        picked = [i for i, f in enumerate(record_families(records))
                  if (not families or f in families) and (words is None or words[i] <= max_words)]
        if len(picked) < cfg.batch_size:
            raise ValueError(f"curriculum stage {n} {stage} matches {len(picked)} training records, "
                             f"fewer than one batch of {cfg.batch_size}")
        order = StagedOrder(SubsetOrder(picked, lengths, cfg.batch_size, cfg.seed + n, cfg.length_grouped),
                             stage["steps"], order)
    return order


def params_without_gradient(model: LlavaForConditionalGeneration) -> list[torch.nn.Parameter]:
    """The vision tower's parameters that never get a gradient: Llava reads hidden_states[vision_feature_layer],
    so the encoder layers after that one and the post-layernorm (applied to the last layer only) go unused."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    read = model.config.vision_feature_layer % (len(layers) + 1)  # hidden_states[k]: the output of k layers
    unused = list(tower.post_layernorm.parameters())
    for layer in layers[read:]:
        unused += list(layer.parameters())
    return unused


def limit_host_threads(device: torch.device, threads: int) -> None:
    """On a GPU, keep at most `threads` intra-op CPU threads (0: leave torch's default): see `host_threads`."""
    if device.type == "cuda" and threads:
        torch.set_num_threads(min(torch.get_num_threads(), threads))


def teacher_tokenizer(cfg: TeacherConfig, tok_dir: Path, texts) -> PreTrainedTokenizerBase:
    """The run's tokenizer: the one saved in the run folder, else init_from's (unless number_space asks for
    other number tokens than it has), else one trained on `texts()`."""
    if (tok_dir / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(cfg.init_from) if cfg.init_from else None
    if tokenizer is None or cfg.number_space not in (None, keeps_number_space(tokenizer)):
        tokenizer = train_tokenizer(conversation_texts(texts()), vocab_size=cfg.vocab_size, template=cfg.template,
                                    digit_group=cfg.digit_group, number_space=bool(cfg.number_space))
    tokenizer.save_pretrained(tok_dir)
    return tokenizer


def training_records(cfg: TeacherConfig, progress: bool = True) -> Sequence[dict]:
    """The run's training records: DATA/train.json, or `generated_train` records made on demand."""
    data = Path(cfg.data)
    if not cfg.generated_train:
        return load_records(data / "train.json")
    # Sizing (one word count a record, ~0.3 ms each) runs once at start-up: share the host's cores among the
    # host's training processes rather than use only the loader's few workers (2 M records: ~11 core-minutes).
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    sizing_workers = max(cfg.num_workers, (os.cpu_count() or 1) // local_world)
    return GeneratedRecords.from_world(data, cfg.generated_train, train_only=cfg.train_only_families,
                                       workers=sizing_workers, progress=progress, start=cfg.generated_start)


class TeacherJob(Job):
    """Next-token cross-entropy on the answer tokens of the whole global batch."""

    name = "teacher"

    def __init__(self, cfg: TeacherConfig, model: LlavaForConditionalGeneration, dataset, order, tokenizer,
                 image_processor, run: Run):
        self.cfg, self.module, self.dataset, self.order, self.run = cfg, model, dataset, order, run
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.pad_token_id = tokenizer.pad_token_id
        self.attention = sdpa_choice(cfg.sdpa_backends)
        self.eval_records = load_records(Path(cfg.data) / "test.json")[: cfg.eval_records]
        # Every world record has an image, so the vision tower gets a gradient from every process's rows; with
        # plain-text records a process's rows may hold no image, and DDP must then look for unused parameters.
        self.find_unused_parameters = any(f in TEXT_FAMILIES for f in cfg.train_only_families)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def param_groups(self) -> list[dict]:
        return teacher_param_groups(self.module, self.cfg)

    def params_without_gradient(self) -> list[torch.nn.Parameter]:
        return params_without_gradient(self.module)

    def counts(self, batch: dict) -> list[float]:
        return [float((batch["labels"][:, 1:] != -100).sum())]  # the answer tokens the loss predicts

    def loss(self, model, chunk: dict, totals: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.attention():  # backward runs the kernel that the forward chose
            loss = model(**chunk, use_cache=False, num_items_in_batch=totals[0]).loss
        return loss, loss.detach().double().reshape(1)

    def evaluate(self, step: int) -> str | None:
        if not self.run.main:  # the others wait for it at the next step's all-reduce
            return None
        with torch.compiler.set_stance("force_eager"):  # generation's shapes would recompile the layers
            res = evaluate(self.module, self.tokenizer, self.image_processor, self.eval_records,
                           [Path(self.cfg.data) / "images"], self.cfg.template, batch_size=128, progress=False)
        return f"held-out average {res['average']:.3f} " + " ".join(
            f"{k}={v['score']:.2f}" for k, v in res["families"].items())


def loop_settings(cfg: TeacherConfig, device: torch.device) -> LoopSettings:
    return LoopSettings(
        steps=cfg.steps, lr=cfg.lr, grad_clip=cfg.grad_clip, max_batch_tokens=cfg.max_batch_tokens,
        save_every=cfg.save_every, eval_every=cfg.eval_every, schedule=cfg.lr_schedule, warmup=cfg.warmup,
        betas=(0.9, 0.95), bf16=cfg.bf16 and device.type == "cuda", num_workers=cfg.num_workers,
        preloaded=cfg.preload, profile_at=cfg.profile_at,
    )


def train_teacher(cfg: TeacherConfig, resume: bool = True, progress: bool = True, stop_at: int | None = None) -> dict | None:
    """Train (or resume) a teacher; returns the final held-out results. Writes cfg.out atomically at the end.

    `stop_at` ends the run after that step with a checkpoint and returns None, as an interruption would.
    Under `torchrun` / `accelerate launch` with several processes, each takes its rows of every batch
    (`batch_size` is the global batch) and DDP averages the gradients; process 0 logs, evaluates and saves,
    and only it returns the results (the others return None).
    """
    data = Path(cfg.data)
    sdpa_choice(cfg.sdpa_backends)  # unknown names fail before any work
    if cfg.init_from and not (Path(cfg.init_from) / "config.json").exists():
        raise FileNotFoundError(f"init_from: {cfg.init_from} holds no config.json (a teacher directory written by `matvlm teacher`)")
    run = start_run(cfg.out, resume)
    rank, world, device = run.processes.rank, run.processes.world, run.device
    limit_host_threads(device, cfg.host_threads)
    progress = progress and run.main
    train_records = training_records(cfg, progress)
    if world > 1 and isinstance(train_records, GeneratedRecords):  # each process sizes its share of the records
        shares: list = [None] * world
        dist.all_gather_object(shares, train_records.size_blocks(rank, world))
        train_records.join_blocks(shares)

    texts = (lambda: load_records(data / "train.json")) if cfg.generated_train else (lambda: train_records)
    if run.main:  # trains (or copies) the tokenizer into the run folder; the others then read it
        tokenizer = teacher_tokenizer(cfg, run.dir / "tokenizer", texts)
    wait_for_everyone()
    if not run.main:
        tokenizer = teacher_tokenizer(cfg, run.dir / "tokenizer", texts)
    cfg.number_space = keeps_number_space(tokenizer)  # an unset number_space: what init_from's tokenizer does
    image_processor = build_image_processor(cfg.image_size)
    model = build_teacher(cfg, tokenizer).to(device)
    if cfg.init_from and run.checkpoint is None:
        init_weights(model, cfg.init_from, tokenizer)
    if cfg.compile:  # in place: the same modules and state_dict keys
        compile_llava_layers(model)

    # bf16 pixels on a GPU: the same values the autocast patch convolution sees, at half the host traffic
    pixel_dtype = torch.bfloat16 if cfg.bf16 and device.type == "cuda" else None
    items = dict(num_image_tokens=model.config.image_seq_length, max_length=cfg.max_length)
    if cfg.generated_train:
        dataset = GeneratedDataset(train_records, tokenizer, image_processor, cfg.template, pixel_dtype=pixel_dtype, **items)
    else:
        dataset = SupervisedDataset(train_records, [data / "images"], tokenizer, image_processor, cfg.template,
                                    source=data / "train.json", **items)
    if run.main:
        warn_truncated_answers(dataset)
    order = curriculum_order(train_records, dataset.lengths, cfg)
    if cfg.preload:
        dataset = PreloadedDataset(dataset, workers=cfg.num_workers, progress=progress, pixel_dtype=pixel_dtype)

    job = TeacherJob(cfg, model, dataset, order, tokenizer, image_processor, run)
    result = train(job, loop_settings(cfg, device), run, cfg, RESUMABLE_CHANGES, progress=progress, stop_at=stop_at)
    if result.stopped or not run.main:
        return None
    return finish_teacher(model, cfg, tokenizer, image_processor, result.step, sum(result.column("tokens")),
                          result.seconds, progress=progress)


def finish_teacher(model: LlavaForConditionalGeneration, cfg: TeacherConfig, tokenizer, image_processor, steps: int,
                   tokens: int, train_seconds: float | None, progress: bool = True, note: str | None = None) -> dict:
    """Evaluate on the held-out set and write cfg.out atomically: HF Llava checkpoint, processor, scores, and
    model info (`steps` and `tokens` trained, and those of the lineage when the run started from a teacher)."""
    data, out = Path(cfg.data), Path(cfg.out)
    device = next(model.parameters()).device
    model.eval()
    test_records = load_records(data / "test.json")
    final_records = test_records[: cfg.final_eval_records] if cfg.final_eval_records else test_records
    with torch.compiler.set_stance("force_eager"):
        results = evaluate(model, tokenizer, image_processor, final_records, [data / "images"], cfg.template,
                       batch_size=128, progress=progress)
    world = json.loads((data / "world.json").read_text()) if (data / "world.json").exists() else {}
    info = {
        "template": cfg.template,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_steps": steps,
        "train_tokens": tokens,
        "world": {k: world.get(k) for k in ("generator_version", "seed", "image_size", "counts")},
        "config": asdict(cfg),
    }
    if cfg.generated_train:  # the world's counts describe its files on disk, not the records this run made
        info["world"]["generated_train"] = cfg.generated_train
        info["world"]["generated_start"] = cfg.generated_start
        info["world"]["train_only_families"] = cfg.train_only_families
    source_info = Path(cfg.init_from) / MODEL_INFO_FILE if cfg.init_from else None
    if source_info is not None and source_info.exists():  # a continued teacher counts what its start had seen
        source = json.loads(source_info.read_text())
        info["train_tokens_total"] = info["train_tokens"] + source.get("train_tokens_total", source.get("train_tokens", 0))
        info["train_steps_total"] = info["train_steps"] + source.get("train_steps_total", source.get("train_steps", 0))
    if note:
        info["note"] = note
    with atomic_directory(out, overwrite=True) as tmp:
        model.to(getattr(torch, cfg.save_dtype)).save_pretrained(tmp)
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
            vision_feature_select_strategy="full", chat_template=tokenizer.chat_template,
        )
        processor.save_pretrained(tmp)
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        summary = {k: v for k, v in results.items() if k != "records"}
        summary.update(train_seconds=train_seconds, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
        write_json_atomic(tmp / "heldout_scores.json", summary)
    return results


def export_teacher(run_dir: str | Path, out: str | Path, weights: str | Path | None = None, data: str | Path | None = None,
                   progress: bool = True) -> dict:
    """Write a teacher from a run that has not finished: its config, tokenizer and latest checkpoint (or a
    safetensors file of its weights, e.g. brought back from another machine), evaluated on the held-out set."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir / 'config.json'} not found: is {run_dir} a teacher run folder (OUT.run)?")
    cfg = TeacherConfig(**json.loads((run_dir / "config.json").read_text()))
    cfg.out = str(out)
    if data is not None:
        cfg.data = str(data)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    model = build_teacher(cfg, tokenizer)
    if weights is not None:
        with safe_open(str(weights), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            step = int((f.metadata() or {}).get("step", 0))
        source = f"weights {weights} (step {step})"
    else:
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise FileNotFoundError(f"{run_dir} holds no checkpoint to export")
        tensors, _, meta = load_checkpoint(checkpoints[-1])
        step, source = meta["step"], f"checkpoint {checkpoints[-1]}"
    log = run_dir / "log.csv"  # the tokens of the steps up to the exported one
    tokens = sum(int(row["tokens"]) for row in read_log(log) if row["step"] <= step) if log.exists() else 0
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source} does not match the run's model: missing {missing}, unexpected {unexpected}")
    # A run whose last step is saved but whose own export never ran (killed, or its files not brought back).
    when = "its last step" if step >= cfg.steps else "before its end"
    note = f"exported from {source} of a {cfg.steps}-step run, {when}"
    return finish_teacher(model, cfg, tokenizer, build_image_processor(cfg.image_size), step, tokens, None,
                          progress=progress, note=note)

"""Which decoder layers to turn into mixers, measured on the user's own data (`matvlm rank-layers`).

Two measures, each giving every layer a score where lower means "safer to replace":
- kl: convert that layer alone, align its mixer briefly to the attention it replaced (align.py), then
  measure KL(teacher || hybrid) per answer token on held-out batches. Direct, and costs one short
  alignment per layer (KL-guided layer selection, arXiv 2512.20569; Zebra-Llama's sensitivity).
- attention: from the teacher's attention maps alone (one forward): for each layer, the largest share, over
  heads, of the attention that answer positions put on tokens more than `window` positions back. Layers
  whose heads retrieve from far away are the ones a decaying recurrence imitates worst.

A ranking file holds, per measure, the layers ordered safest first and their scores, the teacher's
fingerprint and layer count, and the cost. `pick_layers` takes the k safest layers of one measure
(`--placement auto` or `auto:<measure>`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from matvlm.model.config import check_layer_indices, mamba_layer_indices
from matvlm.distill.align import align_mixers, capture_attention_io, run_captured

MEASURES = ("kl", "attention")
RANKING_FORMAT = 1
AUTO_HINT = "run `matvlm rank-layers TEACHER --data TRAIN.json --out ranking.json` and pass --ranking ranking.json"


def teacher_fingerprint(model: nn.Module, samples: int = 16) -> str:
    """A cheap hash of a model's weights: every tensor's name and shape, and its first `samples` values
    rounded to bf16 (so the same weights loaded in fp32 or bf16 agree)."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        if t.is_floating_point() and t.numel():
            digest.update(t.detach().flatten()[:samples].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _num_layers(model: nn.Module) -> int:
    return model.config.text_config.num_hidden_layers


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _answer_positions(batch: Mapping[str, Any]) -> torch.Tensor:
    """(batch, seq) mask of positions whose next token is a supervised answer token."""
    labels = batch["labels"]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


@torch.no_grad()
def attention_scores(teacher: nn.Module, batches: Iterable[Mapping[str, Any]], window: int = 8) -> dict[int, dict[str, float]]:
    """Per layer: `far_mass` (max over heads of the mean attention mass that answer positions put on keys
    more than `window` positions back) and `entropy` (mean attention entropy at answer positions, nats)."""
    n = _num_layers(teacher)
    device = next(teacher.parameters()).device
    before = teacher.config._attn_implementation
    teacher.set_attn_implementation("eager")  # the only implementation that returns the weights
    far = torch.zeros(n, teacher.config.text_config.num_attention_heads, dtype=torch.float64)
    entropy = torch.zeros(n, dtype=torch.float64)
    count = 0
    try:
        for batch in batches:
            batch = _to(batch, device)
            answer = _answer_positions(batch)
            with capture_attention_io(teacher, list(range(n)), stop_early=False) as seen:
                run_captured(teacher, batch)
            length = answer.shape[1]
            pos = torch.arange(length, device=device)
            far_keys = (pos[:, None] - pos[None, :]) > window  # (query, key)
            for i in range(n):
                w = seen[i]["weights"].float()  # (batch, heads, query, key)
                mass = (w * far_keys).sum(-1)  # (batch, heads, query)
                far[i] += (mass * answer[:, None]).sum((0, 2)).double().cpu()
                ent = -(w * w.clamp_min(1e-12).log()).sum(-1).mean(1)  # (batch, query)
                entropy[i] += float((ent * answer).sum())
            count += int(answer.sum())
    finally:
        teacher.set_attn_implementation(before)
    count = max(count, 1)
    return {i: {"far_mass": float(far[i].max() / count), "entropy": float(entropy[i] / count)} for i in range(n)}


@torch.no_grad()
def _teacher_answer_logprobs(teacher: nn.Module, batches: Sequence[Mapping[str, Any]]) -> list[torch.Tensor]:
    device = next(teacher.parameters()).device
    out = []
    for batch in batches:
        batch = _to(batch, device)
        logits = _logits(teacher, batch)
        out.append(F.log_softmax(logits[_answer_positions(batch)].float(), -1))
    return out


def _logits(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if batch.get("pixel_values") is not None:
        kwargs["pixel_values"] = batch["pixel_values"].to(model.dtype)
    return model(**kwargs).logits


@torch.no_grad()
def answer_kl(model: nn.Module, batches: Sequence[Mapping[str, Any]], teacher_logprobs: Sequence[torch.Tensor]) -> float:
    """Mean KL(teacher || model) per answer position over `batches` (teacher log-probs precomputed)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch, t in zip(batches, teacher_logprobs):
        batch = _to(batch, device)
        s = F.log_softmax(_logits(model, batch)[_answer_positions(batch)].float(), -1)
        total += float((t.exp() * (t - s)).sum())
        count += t.shape[0]
    return total / max(count, 1)


def kl_scores(
    teacher: nn.Module,
    train_batches: Sequence[Mapping[str, Any]],
    heldout_batches: Sequence[Mapping[str, Any]],
    align_steps: int = 30,
    align_lr: float = 3e-3,
    layers: Sequence[int] | None = None,
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """Per layer: `kl` after converting that layer alone and aligning it for `align_steps` steps (cycling
    over `train_batches`), `kl_unaligned` right after conversion, and the mixer's final relative layer loss."""
    from matvlm.model.convert import to_hybrid  # convert imports this package

    teacher_lp = _teacher_answer_logprobs(teacher, heldout_batches)
    out: dict[int, dict[str, float]] = {}
    for i in layers if layers is not None else range(_num_layers(teacher)):
        student = to_hybrid(teacher, mamba_layers=[i]).eval()
        unaligned = answer_kl(student, heldout_batches, teacher_lp)
        stream = (train_batches[k % len(train_batches)] for k in range(align_steps))
        stats = align_mixers(teacher, student, stream, align_steps, align_lr)
        student.eval()
        out[i] = {"kl": answer_kl(student, heldout_batches, teacher_lp), "kl_unaligned": unaligned,
                  "relative_layer_loss": stats.relative_loss_end[i]}
        if progress:
            print(f"layer {i}: KL {out[i]['kl']:.4f} (unaligned {unaligned:.4f})", flush=True)
        del student
    return out


def rank_layers(
    teacher: nn.Module,
    train_batches: Sequence[Mapping[str, Any]],
    heldout_batches: Sequence[Mapping[str, Any]],
    measures: Sequence[str] = MEASURES,
    align_steps: int = 30,
    align_lr: float = 3e-3,
    window: int = 8,
    progress: bool = False,
    teacher_path: str = "",
) -> dict[str, Any]:
    """Score every decoder layer by each of `measures` and return the ranking (see the module docstring)."""
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise ValueError(f"unknown measure(s) {unknown}; choose from {', '.join(MEASURES)}")
    if not heldout_batches or ("kl" in measures and not train_batches):
        raise ValueError("ranking needs held-out batches (and training batches for the kl measure)")
    n = _num_layers(teacher)
    tokens_of = lambda bs: sum(int(b["attention_mask"].sum()) for b in bs)  # noqa: E731
    result: dict[str, Any] = {
        "format": RANKING_FORMAT, "teacher": teacher_path, "fingerprint": teacher_fingerprint(teacher),
        "num_layers": n, "primary": measures[0], "measures": {}, "cost": {},
    }
    for measure in measures:
        began = time.perf_counter()
        if measure == "kl":
            per_layer = kl_scores(teacher, train_batches, heldout_batches, align_steps, align_lr, progress=progress)
            score = {i: v["kl"] for i, v in per_layer.items()}
            # teacher once + per layer: align steps (cycled batches) and the hybrid on the held-out batches
            per_align = tokens_of(train_batches) * align_steps / len(train_batches)
            tokens = int(tokens_of(heldout_batches) * (1 + 2 * n) + per_align * n)
            settings = {"align_steps": align_steps, "align_lr": align_lr}
        else:
            per_layer = attention_scores(teacher, heldout_batches, window)
            score = {i: v["far_mass"] for i, v in per_layer.items()}
            tokens, settings = tokens_of(heldout_batches), {"window": window}
        order = sorted(score, key=lambda i: (score[i], i))
        result["measures"][measure] = {
            "order": order, "scores": {str(i): score[i] for i in range(n)},
            "details": {str(i): per_layer[i] for i in range(n)}, "settings": settings,
        }
        result["cost"][measure] = {"seconds": time.perf_counter() - began, "tokens": tokens}
    result["cost"]["total"] = {k: sum(c[k] for c in result["cost"].values()) for k in ("seconds", "tokens")}
    return result


def write_ranking(path: str | Path, ranking: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ranking, indent=1) + "\n")
    return path


def load_ranking(source: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """A ranking from a file (or an already loaded one), checked for the fields `pick_layers` needs."""
    if source is None or source == "":
        raise ValueError(f"placement auto needs ranking data: {AUTO_HINT}")
    if isinstance(source, Mapping):
        ranking, where = dict(source), "the ranking"
    else:
        where = str(source)
        try:
            ranking = json.loads(Path(source).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"ranking file {source} does not exist; {AUTO_HINT}") from None
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read ranking file {source}: {err}") from err
    missing = [k for k in ("fingerprint", "num_layers", "measures") if k not in ranking]
    if missing:
        raise ValueError(f"{where} is not a rank-layers file: it lacks {', '.join(missing)}")
    return ranking


def parse_auto(placement: str) -> str | None:
    """"auto" -> None (the ranking's primary measure), "auto:kl" -> "kl"; anything else is not auto."""
    if placement == "auto":
        return None
    if placement.startswith("auto:"):
        return placement.split(":", 1)[1]
    raise ValueError(f"{placement!r} is not an auto placement (auto or auto:<measure>)")


def pick_layers(ranking: str | Path | Mapping[str, Any] | None, teacher: nn.Module, ratio: float,
                measure: str | None = None) -> list[int]:
    """The safest round(ratio * layers) layers of `measure` (default: the ranking's primary), after
    checking that the ranking was measured on this teacher."""
    ranking = load_ranking(ranking)
    n = _num_layers(teacher)
    if ranking["num_layers"] != n:
        raise ValueError(f"the ranking is of a teacher with {ranking['num_layers']} decoder layers; this one has {n}")
    fingerprint = teacher_fingerprint(teacher)
    if ranking["fingerprint"] != fingerprint:
        raise ValueError(
            f"the ranking was measured on another teacher ({ranking.get('teacher') or 'unnamed'}, fingerprint "
            f"{ranking['fingerprint']}; this teacher's is {fingerprint}): rank this teacher's layers again"
        )
    measure = measure or ranking.get("primary") or next(iter(ranking["measures"]))
    if measure not in ranking["measures"]:
        raise ValueError(f"the ranking has no measure {measure!r}; it has {', '.join(ranking['measures'])}")
    order = [int(i) for i in ranking["measures"][measure]["order"]]
    if sorted(order) != list(range(n)):
        raise ValueError(f"the ranking's {measure} order {order} is not a permutation of layers 0..{n - 1}")
    count = len(mamba_layer_indices(n, ratio, "even"))  # same rounding and range checks as other placements
    return check_layer_indices(order[:count], n)


def rank_layers_from_files(
    teacher_dir: str | Path,
    data: str | Path,
    images: Sequence[str | Path] = (),
    out: str | Path = "ranking.json",
    measures: Sequence[str] = MEASURES,
    heldout_records: int = 256,
    train_records: int = 1024,
    batch_size: int = 32,
    align_steps: int = 30,
    align_lr: float = 3e-3,
    max_length: int = 2048,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """`matvlm rank-layers`: rank a teacher's layers on records of `data` (the first `heldout_records` of a
    seeded shuffle score, the next `train_records` align) and write the ranking to `out`."""
    import random
    from functools import partial

    from matvlm.data.llava import SupervisedDataset, collate, load_records
    from matvlm.io import model_template
    from matvlm.io import load_processor, load_vlm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_vlm(teacher_dir, device=device).eval()
    processor = load_processor(teacher_dir)
    template = model_template(teacher_dir, processor.tokenizer)
    records = load_records(data)
    random.Random(seed).shuffle(records)
    if len(records) < 2:
        raise ValueError(f"{data} has {len(records)} records; ranking needs held-out and training records")
    held = max(1, min(heldout_records, len(records) // 2))
    folders = list(images) or [Path(data).parent / "images"]
    pad = partial(collate, pad_token_id=processor.tokenizer.pad_token_id)

    def batches(part: list[dict]) -> list[dict]:
        ds = SupervisedDataset(part, folders, processor.tokenizer, processor.image_processor, template,
                               num_image_tokens=teacher.config.image_seq_length, max_length=max_length, source=data)
        order = sorted(range(len(ds)), key=lambda k: ds.lengths[k])  # similar lengths: little padding
        return [pad([ds[k] for k in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]

    heldout = batches(records[:held])
    train = batches(records[held : held + train_records]) if "kl" in measures else []
    random.Random(seed + 1).shuffle(train)
    ranking = rank_layers(teacher, train, heldout, measures, align_steps, align_lr, progress=progress,
                          teacher_path=str(teacher_dir))
    ranking["data"] = {"path": str(data), "heldout_records": held, "train_records": len(records[held: held + train_records]),
                       "device": device}
    write_ranking(out, ranking)
    return ranking

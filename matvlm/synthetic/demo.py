"""`matvlm demo`: the whole method on the embedded default, offline, in minutes.

teacher (the shipped one, or one given with --teacher; without either, a small teacher is trained here)
  -> convert a fraction of its layers to Mamba-2 mixers
  -> distil for a time budget (the number of steps is calibrated on this machine)
  -> evaluate teacher and hybrid on held-out records of the synthetic world
  -> compare generation speed and cache memory
  -> a markdown report with plots.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from matvlm.model.convert import summarize_conversion
from matvlm.data.llava import load_records
from matvlm.synthetic.world import generate_world
from matvlm.distill import DistillConfig, distill
from matvlm.eval.recall import describe_flags, flag_families
from matvlm.eval.runner import evaluate
from matvlm.errors import OutputError, ResumeMismatch
from matvlm.io import load_processor, load_vlm, read_model_info, write_json_atomic
from matvlm.io.fingerprint import input_changes, model_fingerprint
from matvlm.io.outputs import check_output_dir
from matvlm.synthetic import SHIPPED_TEACHER


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    teacher: str = ""  # default: the shipped teacher, else one trained here
    ratio: float = 0.25
    minutes: float = 4.0  # distillation budget (wall clock)
    train_records: int = 3000
    test_records: int = 270
    batch_size: int = 8  # more, smaller steps: a CPU budget of minutes buys ~150 steps of 8 per 2 minutes
    lr: float = 3e-3
    seed: int = 0
    # Left out of the distillation records (not of the evaluation); none: recall is distilled too (length-grouped
    # batches keep its ~1,000-token records from padding the short ones).
    skip_families: tuple[str, ...] = ()
    align_per_step: float = 1.0  # staged recipe: alignment steps per end-to-end step (an alignment step is ~1/3 the cost)
    chunk_size: int = 32  # the mixers' scan chunk: the same result, several times faster than 256 on a CPU
    overwrite: bool = False  # start afresh in `out` whatever it holds


# Which teacher a demo folder belongs to: a later demo there continues it only with the same teacher.
DEMO_INPUTS = "demo_inputs.json"


def _say(message: str) -> None:
    print(message, flush=True)


def ensure_teacher(cfg: DemoConfig, out: Path) -> tuple[Path, bool]:
    """-> (teacher directory, whether it is a quality teacher). Trains a small one when none ships."""
    if cfg.teacher:
        return Path(cfg.teacher), True
    if (SHIPPED_TEACHER / "config.json").exists():
        return SHIPPED_TEACHER, True
    from matvlm.synthetic.teacher import TeacherConfig, train_teacher

    teacher_dir = out / "teacher"
    if not (teacher_dir / "config.json").exists():
        _say("no teacher ships with this version: training a small one here for ~2 minutes "
             "(its answers are near chance; pass --teacher DIR for a trained one)")
        world = out / "teacher_world"
        if not (world / "train.json").exists():
            generate_world(world, n_train=2000, n_test=0, seed=cfg.seed + 1, image_size=128, workers=2)
        train_teacher(TeacherConfig(
            data=str(world), out=str(teacher_dir), template="phi_short", vocab_size=1024, patch_size=32,
            vision_hidden=96, vision_layers=2, vision_heads=4, vision_feature_layer=-1, hidden=128, layers=4,
            heads=4, intermediate=512, batch_size=16, steps=150, lr=2e-3, eval_every=0, final_eval_records=1,
            save_every=150, num_workers=1, save_dtype="float32",
        ))
    return teacher_dir, False


def world_for(teacher_dir: Path, cfg: DemoConfig, out: Path) -> Path:
    """The teacher's world (same generator seed and image size), regenerated small enough for a CPU."""
    info = read_model_info(teacher_dir).get("world") or {}
    seed = info.get("seed", cfg.seed + 1)
    size = info.get("image_size", 128)
    world = out / "world"
    if not (world / "test.json").exists():
        generate_world(world, n_train=cfg.train_records, n_test=cfg.test_records, seed=seed, image_size=size, workers=2)
    return world


def distillation_records(world: Path, skip_families: tuple[str, ...]) -> Path:
    """The world's training records without `skip_families` (a new JSON file beside them), or all of them."""
    if not skip_families:
        return world / "train.json"
    kept = [r for r in load_records(world / "train.json") if r.get("family") not in skip_families]
    path = world / "train_distill.json"
    path.write_text(json.dumps(kept))
    return path


def mean_record_tokens(teacher_dir: Path, train_json: Path) -> float:
    """Mean tokens per distillation record (text tokenised, image tokens counted)."""
    from matvlm.data.llava import SupervisedDataset

    processor = load_processor(teacher_dir)
    template = read_model_info(teacher_dir).get("template") or "phi"
    config = json.loads((Path(teacher_dir) / "config.json").read_text())
    ds = SupervisedDataset(load_records(train_json), [], processor.tokenizer, processor.image_processor, template,
                           num_image_tokens=config.get("image_seq_length", 1), max_length=2048)
    return sum(ds.lengths) / len(ds.lengths)


def typical_step_seconds(history: list[list], batch_size: int, mean_tokens: float) -> float:
    """Seconds of an average step, from calibration steps' seconds per token (the first, warm-up, left out):
    batches are length-grouped, so a few calibration steps alone may all be short ones (or long ones)."""
    seconds = [row[8] for row in history]
    tokens = sum(row[7] for row in history[1:])
    return (seconds[-1] - seconds[0]) / max(tokens, 1) * mean_tokens * batch_size


def ranked_placement(teacher_dir: Path) -> dict:
    """Placement from the ranking shipped beside the teacher (`matvlm rank-layers`), else even spacing."""
    ranking = Path(teacher_dir) / "ranking.json"
    return {"placement": "auto", "ranking": str(ranking)} if ranking.exists() else {"placement": "even"}


def decode_speed(model, image_tokens: int, new_tokens: int = 64) -> float:
    """Greedy decode tokens/s at batch 1 in matvlm's engine (the same engine for teacher and hybrid)."""
    from matvlm.engine import Engine

    cfg = model.config
    size = cfg.vision_config.image_size
    ids = torch.tensor([[cfg.text_config.bos_token_id or 0] + [cfg.image_token_index] * image_tokens + [5, 6, 7]])
    engine = Engine(model, max_batch_size=1, max_seq_len=ids.shape[1] + new_tokens + 8)
    kwargs = dict(pixel_values=torch.randn(1, 3, size, size), stop_at_eos=False,
                  suppress_tokens=[cfg.image_token_index])
    engine.generate(ids, max_new_tokens=4, **kwargs)  # warm-up
    return engine.generate(ids, max_new_tokens=new_tokens, **kwargs).decode_tokens_per_s


def claim_output(cfg: DemoConfig, out: Path) -> None:
    """Make `out` this demo's folder. A folder of an earlier demo with the same teacher is continued (its runs
    resume); one with another teacher, or with files that are not a demo's, is refused unless `overwrite`."""
    teacher = Path(cfg.teacher) if cfg.teacher else SHIPPED_TEACHER if (SHIPPED_TEACHER / "config.json").exists() else None
    check_output_dir(out, {"teacher": teacher}, overwrite=True)  # never the teacher, whatever overwrite says
    now = {"teacher": model_fingerprint(teacher) if teacher else "trained in this folder"}
    paths = {"teacher": str(teacher or out / "teacher")}
    record = out / DEMO_INPUTS
    if out.is_dir() and any(out.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(out)
        elif not record.is_file():
            raise OutputError(f"--out {out} is not empty and holds no demo; pass --overwrite to replace it, or choose "
                              "another folder")
        else:
            saved = json.loads(record.read_text())
            changes = input_changes(saved.get("fingerprints", {}), now, saved.get("paths"), paths)
            if changes:
                raise ResumeMismatch(f"--out {out} holds a demo of another teacher: " + "; ".join(changes)
                                     + ". Pass --overwrite to start afresh there, or choose another --out")
    write_json_atomic(record, {"fingerprints": now, "paths": paths})


def run_demo(cfg: DemoConfig) -> Path:
    out = Path(cfg.out)
    claim_output(cfg, out)
    torch.manual_seed(cfg.seed)
    teacher_dir, trained = ensure_teacher(cfg, out)
    _say(f"1. teacher: {teacher_dir}")
    world = world_for(teacher_dir, cfg, out)
    _say(f"2. held-out and distillation records of the teacher's world: {world}")

    train_json = distillation_records(world, () if torch.cuda.is_available() else cfg.skip_families)
    base = dict(teacher=str(teacher_dir), data=str(train_json), images=[str(world / "images")],
                ratio=cfg.ratio, batch_size=cfg.batch_size, lr=cfg.lr, num_workers=1, seed=cfg.seed,
                chunk_size=cfg.chunk_size, **ranked_placement(teacher_dir))
    calib_out = out / "calibration"
    calib = distill(DistillConfig(out=str(calib_out), steps=5, save_every=1000, recipe="single", **base), resume=True,
                    progress=False)
    per_step = typical_step_seconds(calib["history"], cfg.batch_size, mean_record_tokens(teacher_dir, train_json))
    # alignment steps cost about a third of an end-to-end step
    steps = max(4, int(cfg.minutes * 60 / (per_step * (1 + cfg.align_per_step / 3)) * 0.85))
    align_steps = max(1, int(steps * cfg.align_per_step))
    _say(f"3. converting {cfg.ratio:.1%} of the layers ({base['placement']} placement), aligning the mixers for "
         f"{align_steps} steps, then distilling for {steps} steps "
         f"(~{cfg.minutes:g} min at {per_step:.2f} s/step, calibrated here)")
    hybrid_dir = out / "hybrid"
    summary = distill(DistillConfig(out=str(hybrid_dir), steps=steps, save_every=max(steps // 4, 1),
                                    recipe="staged", align_steps=align_steps, align_lr=cfg.lr, **base), resume=True)

    _say("4. evaluating teacher and hybrid on the held-out records")
    processor = load_processor(teacher_dir)
    template = read_model_info(hybrid_dir).get("template")
    records = load_records(world / "test.json")
    teacher = load_vlm(teacher_dir)
    hybrid = load_vlm(hybrid_dir)
    scores = {}
    for name, model in (("teacher", teacher), ("hybrid", hybrid)):
        res = evaluate(model, processor.tokenizer, processor.image_processor, records, [world / "images"], template,
                       batch_size=32, progress=False)
        scores[name] = {k: v for k, v in res.items() if k != "records"}

    _say("5. generation speed and cache memory")
    image_tokens = teacher.config.image_seq_length
    speed = {name: decode_speed(m, image_tokens) for name, m in (("teacher", teacher), ("hybrid", hybrid))}
    conv = summarize_conversion(teacher, hybrid)
    contexts = [512, 2048, 8192, 32768]
    cache = {n: conv.cache_bytes(n) for n in contexts}
    report = write_report(out, cfg, teacher_dir, trained, steps, summary, scores, speed, cache, hybrid_dir)
    _say(f"done: report in {report}")
    return report


def write_report(out: Path, cfg: DemoConfig, teacher_dir: Path, trained: bool, steps: int, summary: dict,
                 scores: dict, speed: dict, cache: dict, hybrid_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted(set(scores["teacher"]["families"]) | set(scores["hybrid"]["families"]))
    t, h = scores["teacher"], scores["hybrid"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = range(len(fams))
    axes[0].bar([i - 0.2 for i in x], [t["families"].get(f, {}).get("score", 0) for f in fams], 0.4, label="teacher")
    axes[0].bar([i + 0.2 for i in x], [h["families"].get(f, {}).get("score", 0) for f in fams], 0.4, label="hybrid")
    axes[0].set_xticks(list(x), fams, rotation=45, ha="right")
    axes[0].set(title="held-out score per family")
    axes[0].legend()
    with open(hybrid_dir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    axes[1].plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
    axes[1].set(title="distillation loss", xlabel="step", yscale="log")
    ctx = list(cache)
    axes[2].plot(ctx, [cache[c][0] / 2**20 for c in ctx], "o-", label="teacher")
    axes[2].plot(ctx, [cache[c][1] / 2**20 for c in ctx], "o-", label="hybrid")
    axes[2].set(title="cache per sequence (bf16)", xlabel="context tokens", ylabel="MiB", xscale="log", yscale="log")
    axes[2].legend()
    fig.tight_layout()
    png = out / "demo.png"
    fig.savefig(png, dpi=110)

    lines = [
        "# matvlm demo report", "",
        f"Teacher: `{teacher_dir}`" + ("" if trained else " (trained here in ~2 minutes: near chance, a pipeline check only)"),
        f"Hybrid: `{hybrid_dir}`: {cfg.ratio:.1%} of the decoder layers are Mamba-2 mixers, distilled for {steps} steps "
        f"({sum(int(r[7]) for r in summary['history']):,} tokens, {summary['train_seconds']:.0f} s on "
        f"{'the GPU' if torch.cuda.is_available() else 'the CPU'}"
        + (f"; families left out of distillation: {', '.join(cfg.skip_families)}" if cfg.skip_families and not torch.cuda.is_available() else "")
        + ").", "",
        "| | teacher | hybrid |", "|---|---|---|",
        f"| held-out average ({t['n']} records) | {t['average']:.3f} | {h['average']:.3f} |",
    ]
    lines += [f"| {f} | {t['families'].get(f, {}).get('score', float('nan')):.3f} | "
              f"{h['families'].get(f, {}).get('score', float('nan')):.3f} |" for f in fams]
    lines += [f"| recall, {name} words between fact and question | {t['recall_by_distance'][name]['score']:.3f} | "
              f"{h.get('recall_by_distance', {}).get(name, {}).get('score', float('nan')):.3f} |"
              for name in t.get("recall_by_distance", {})]
    lines += [f"| decode tokens/s (matvlm engine, batch 1, CPU) | {speed['teacher']:.1f} | {speed['hybrid']:.1f} |"]
    lines += [f"| cache per sequence at {c:,} tokens | {cache[c][0] / 2**20:.2f} MiB | {cache[c][1] / 2**20:.2f} MiB |"
              for c in cache]
    lines += ["", "Retention gate: " + describe_flags(flag_families(t, h)) + "."]
    lines += ["", f"![plots]({png.name})", "",
              "Speed on the CPU with a tiny model says little about a GPU: see the README's benchmark section for "
              "measured H100 figures."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"scores": scores, "speed": speed, "cache": {str(k): v for k, v in cache.items()},
                                                 "steps": steps}, indent=1, default=str))
    return path

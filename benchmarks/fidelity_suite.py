"""The fidelity suite: how much of the shipped teacher each hybrid recipe keeps, family by family.

One command on one GPU (several small runs share it as separate processes):

    python benchmarks/fidelity_suite.py --out runs/fidelity [--only NAME,...] [--parallel 6] [--deadline-minutes 8]
    python benchmarks/fidelity_suite.py --out runs/fidelity_smoke --cpu-smoke      # the plumbing, on a CPU
    python benchmarks/fidelity_suite.py --out runs/fidelity --previous OLD/summary.json   # go on, on a fresh machine

It generates the world with the project's generator when absent (seed-0 training records; 2,700 held-out
records of seed 1, the teacher never saw them), ranks the teacher's layers once (`matvlm rank-layers`, for
the auto placements), scores the teacher, then runs the matrix below: each run is `matvlm distill` followed
by `matvlm eval` on every held-out record. Each run writes runs/NAME/result.json; a call skips finished
runs and resumes interrupted ones from their checkpoints, and stops starting (and, at the deadline,
interrupts) runs so that it ends within `--deadline-minutes`: repeat the command until the summary says
the matrix is complete. Every call rewrites summary.json, fidelity_table.md and fidelity.png in --out.

Matrix: ratios 12.5 / 25 / 50% x placements even / begin / end / auto (ranked by KL) / attn (ranked by the
attention measure) with the default recipe (staged, KL + layer + CE); at 25% and 50% (even and auto), the
single-stage recipe and the paper's loss (alpha = beta = 1, gamma = 0) crossed with the staged one.
Single and staged runs read the same number of batches: staged spends `align_steps` of them on alignment
(cheaper steps) and the rest end to end, so staged never uses more tokens or time than single.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TEACHER = REPO / "matvlm" / "synthetic" / "assets" / "teacher"
TARGETS = {0.25: {"average": 0.99, "family": 0.95}, 0.5: {"average": 0.97, "recall": 0.90}}
TOKEN_CAP = 0.01  # share of the teacher's training tokens

RECIPES = {  # name -> DistillConfig overrides
    "staged_ours": {"recipe": "staged"},
    "single_ours": {"recipe": "single"},
    "staged_paper": {"recipe": "staged", "gamma_ce": 0.0},
    "single_paper": {"recipe": "single", "gamma_ce": 0.0},
}
PLACEMENTS = {"even": "even", "begin": "begin", "end": "end", "auto": "auto:kl", "attn": "auto:attention"}


def run_name(ratio: float, placement: str, recipe: str) -> str:
    return f"r{ratio * 100:g}".replace(".", "_") + f"_{placement}_{recipe}"


def matrix() -> dict[str, dict]:
    """In priority order (a call that runs out of time has done the first ones): the target ratios with the
    default recipe, the recipe and loss comparisons, then the other placements and 12.5%."""
    runs: dict[str, dict] = {}

    def add(ratio: float, placement: str, recipe: str) -> None:
        runs.setdefault(run_name(ratio, placement, recipe), {"ratio": ratio, "placement": placement, "recipe": recipe})

    for ratio in (0.25, 0.5):
        for placement in ("auto", "even"):
            add(ratio, placement, "staged_ours")
    for ratio in (0.25, 0.5):
        for placement in ("auto", "even"):
            for recipe in RECIPES:
                add(ratio, placement, recipe)
    for ratio in (0.125, 0.25, 0.5):
        for placement in PLACEMENTS:
            add(ratio, placement, "staged_ours")
    return runs


def smoke_matrix() -> dict[str, dict]:
    return {run_name(0.25, "auto", "staged_ours"): {"ratio": 0.25, "placement": "auto", "recipe": "staged_ours"},
            run_name(0.25, "even", "single_paper"): {"ratio": 0.25, "placement": "even", "recipe": "single_paper"}}


def settings(args) -> dict:
    if args.cpu_smoke:
        return dict(train=120, test=18, steps=3, align_steps=2, batch_size=4, lr=1e-3, eval_limit=9, workers=0,
                    rank_heldout=4, rank_train=4, rank_steps=1, rank_batch=4, eval_batch=32)
    return dict(train=100_000, test=2700, steps=args.steps, align_steps=args.align_steps, batch_size=args.batch_size,
                lr=args.lr, eval_limit=0, workers=args.workers, rank_heldout=256, rank_train=1024, rank_steps=30,
                rank_batch=32, eval_batch=256)


def ensure_world(out: Path, s: dict, cpu: bool) -> tuple[Path, Path]:
    """(training world, held-out world): seed 0 for training, seed 1's test split held out."""
    from matvlm.synthetic.world import generate_world

    train, held = out / "world_seed0", out / "world_seed1"
    workers = 1 if cpu else max(1, (os.cpu_count() or 2) - 1)
    if not (train / "train.json").exists():
        generate_world(train, n_train=s["train"], n_test=0, seed=0, image_size=128, workers=workers)
    if not (held / "test.json").exists():
        generate_world(held, n_train=0, n_test=s["test"], seed=1, image_size=128, workers=workers)
    return train, held


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "matvlm.cli", *args]


def evaluate(model: Path, held: Path, out: Path, s: dict, log) -> dict:
    cmd = cli("eval", str(model), "--data", str(held / "test.json"), "--batch-size", str(s["eval_batch"]), "--out", str(out))
    if s["eval_limit"]:
        cmd += ["--per-family", str(max(1, s["eval_limit"] // 9))]
    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    res = json.loads(out.read_text())
    return {"average": res["average"], "n": res["n"], "families": {k: v["score"] for k, v in res["families"].items()},
            "recall_by_distance": res.get("recall_by_distance", {})}


def teacher_info(teacher: Path, held: Path, out: Path, s: dict) -> dict:
    path = out / "teacher.json"
    if path.exists():
        return json.loads(path.read_text())
    from matvlm.distill.placement import teacher_fingerprint
    from matvlm.io import load_vlm

    info = json.loads((teacher / "matvlm.json").read_text())
    with open(out / "teacher_eval.log", "w") as log:
        scores = evaluate(teacher, held, out / "teacher_eval.json", s, log)
    result = {"dir": str(teacher), "fingerprint": teacher_fingerprint(load_vlm(teacher)),
              "train_tokens": info.get("train_tokens_total", info.get("train_tokens")), "eval": scores}
    path.write_text(json.dumps(result, indent=1))
    return result


def ensure_ranking(teacher: Path, train: Path, out: Path, s: dict) -> Path:
    path = out / "ranking.json"
    if not path.exists():
        cmd = cli("rank-layers", str(teacher), "--data", str(train / "train.json"), "--out", str(path),
                  "--heldout-records", str(s["rank_heldout"]), "--train-records", str(s["rank_train"]),
                  "--align-steps", str(s["rank_steps"]), "--batch-size", str(s["rank_batch"]))
        with open(out / "ranking.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return path


def run_config(name: str, spec: dict, teacher: Path, train: Path, ranking: Path, out: Path, s: dict) -> Path:
    recipe = RECIPES[spec["recipe"]]
    staged = recipe["recipe"] == "staged"
    cfg = {
        "teacher": str(teacher), "out": str(out / "hybrid"), "data": str(train / "train.json"),
        "images": [str(train / "images")], "ratio": spec["ratio"], "placement": PLACEMENTS[spec["placement"]],
        "ranking": str(ranking), "batch_size": s["batch_size"], "lr": s["lr"], "num_workers": s["workers"],
        # the same number of batches for both recipes: staged aligns on the first align_steps of them
        "steps": s["steps"] - (s["align_steps"] if staged else 0), "align_steps": s["align_steps"],
        "save_every": max(1, s["steps"] // 6), "seed": 0, **recipe,
    }
    path = out / "config.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def finish_run(name: str, spec: dict, out: Path, held: Path, teacher: dict, s: dict, seconds: float) -> dict:
    from matvlm.eval.recall import flag_families

    hybrid = out / "hybrid"
    summary = json.loads((hybrid / "distill_summary.json").read_text())
    info = json.loads((hybrid / "matvlm.json").read_text())
    with open(out / "eval.log", "w") as log:
        scores = evaluate(hybrid, held, out / "eval.json", s, log)
    align = summary.get("align") or {}
    tokens = int(info.get("distill_tokens", 0)) + int(align.get("tokens", 0))
    t = teacher["eval"]
    result = {
        "name": name, **spec, "mixer_layers": info.get("mixer_layers"), "eval": scores,
        "retention": {"average": scores["average"] / t["average"],
                      **{f: scores["families"].get(f, 0.0) / v for f, v in t["families"].items() if v}},
        "flags": flag_families({"families": {f: {"score": v, "n": 1} for f, v in t["families"].items()},
                                "recall_by_distance": t.get("recall_by_distance", {})},
                               {"families": {f: {"score": v, "n": 1} for f, v in scores["families"].items()},
                                "recall_by_distance": scores.get("recall_by_distance", {})}),
        "tokens": tokens, "align_tokens": int(align.get("tokens", 0)),
        "token_share": tokens / teacher["train_tokens"] if teacher.get("train_tokens") else None,
        "distill_seconds": seconds, "align_seconds": align.get("seconds"), "e2e_seconds": summary.get("train_seconds"),
        "steps": summary.get("steps"), "align_steps": align.get("steps", 0),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def adopt_previous(path: Path, out: Path) -> None:
    """Take the teacher's scores, the ranking and the finished runs of an earlier call's summary.json (a fresh
    machine has none of that call's files): those runs are skipped, and the report includes them."""
    prev = json.loads(path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "teacher.json").exists():
        (out / "teacher.json").write_text(json.dumps(prev["teacher"], indent=1))
    if not (out / "ranking.json").exists() and prev.get("ranking_file"):
        (out / "ranking.json").write_text(json.dumps(prev["ranking_file"], indent=1))
    for r in prev.get("runs", []):
        dest = out / "runs" / r["name"] / "result.json"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(r, indent=1))


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    deadline = began + args.deadline_minutes * 60
    s = settings(args)
    teacher_dir = Path(args.teacher)
    if args.previous:
        adopt_previous(Path(args.previous), out)
    train, held = ensure_world(out, s, args.cpu_smoke)
    print(f"world ready ({time.time() - began:.0f} s)", flush=True)
    teacher = teacher_info(teacher_dir, held, out, s)
    ranking = ensure_ranking(teacher_dir, train, out, s)
    print(f"teacher scored, layers ranked ({time.time() - began:.0f} s)", flush=True)
    runs = smoke_matrix() if args.cpu_smoke else matrix()
    names = [n for n in runs if not args.only or n in args.only.split(",")]
    unknown = sorted(set(args.only.split(",")) - set(runs)) if args.only else []
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; known: {', '.join(runs)}")
    todo = [n for n in names if not (out / "runs" / n / "result.json").exists()]
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    durations: list[float] = []
    while todo or running:
        # Start runs while slots are free and a typical run still fits before the deadline.
        typical = max(durations) if durations else 0.0
        while todo and len(running) < args.parallel and time.time() + typical < deadline:
            name = todo.pop(0)
            run_dir = out / "runs" / name
            cfg = run_config(name, runs[name], teacher_dir, train, ranking, run_dir, s)
            log = open(run_dir / "distill.log", "a")
            proc = subprocess.Popen(cli("distill", "--config", str(cfg), "--resume"), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            running[name] = (proc, time.time(), log)
            print(f"started {name}", flush=True)
        if not running:
            break
        time.sleep(2)
        for name, (proc, start, log) in list(running.items()):
            if proc.poll() is None:
                if time.time() > deadline:  # resumed by the next call from its last checkpoint
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait()
                    print(f"interrupted {name} at the deadline", flush=True)
                    del running[name]
                continue
            log.close()
            del running[name]
            seconds = time.time() - start
            if proc.returncode != 0:
                print(f"{name} failed (rc {proc.returncode}); see {out / 'runs' / name / 'distill.log'}", flush=True)
                continue
            durations.append(seconds)
            r = finish_run(name, runs[name], out / "runs" / name, held, teacher, s, seconds)
            print(f"{name}: layers {r['mixer_layers']}, average {r['eval']['average']:.3f} "
                  f"({100 * r['retention']['average']:.1f}% of the teacher), {seconds:.0f} s", flush=True)
    report(out, runs, teacher, s, time.time() - began, args)


def report(out: Path, runs: dict, teacher: dict, s: dict, wall: float, args) -> None:
    results = [json.loads((out / "runs" / n / "result.json").read_text()) for n in runs
               if (out / "runs" / n / "result.json").exists()]
    ranking = json.loads((out / "ranking.json").read_text())
    t = teacher["eval"]
    fams = list(t["families"])
    summary = {"teacher": teacher, "settings": s, "device": device_name(), "complete": len(results) == len(runs),
               "missing": [n for n in runs if not (out / "runs" / n / "result.json").exists()],
               "ranking": {m: {"order": v["order"], "scores": v["scores"]} for m, v in ranking["measures"].items()},
               "ranking_cost": ranking["cost"], "ranking_file": ranking, "runs": results,
               "targets": check_targets(results)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"Teacher `{teacher['dir']}` (fingerprint {teacher['fingerprint']}): held-out average {t['average']:.3f} on "
             f"{t['n']} records of another seed; device {summary['device']}. Retention = hybrid / teacher score. Tokens: "
             f"alignment + end to end, as a share of the teacher's {teacher['train_tokens'] / 1e9:.2f} G training tokens. "
             f"Seconds: wall clock of the distillation process while up to {args.parallel} runs shared the device.", "",
             "Layer ranking (safest first): " + "; ".join(f"{m} {v['order']} ({ranking['cost'][m]['seconds']:.0f} s)"
                                                          for m, v in ranking["measures"].items()), "",
             "| run | mixer layers | avg | retention | " + " | ".join(fams) + " | tokens (% of teacher) | s |",
             "|---|---|---|---|" + "---|" * len(fams) + "---|---|",
             "| teacher | - | {:.3f} | 100% | ".format(t["average"]) + " | ".join(f"{t['families'][f]:.3f}" for f in fams) + " | - | - |"]
    for r in results:
        ret = r["retention"]
        lines.append(f"| {r['name']} | {r['mixer_layers']} | {r['eval']['average']:.3f} | {100 * ret['average']:.1f}% | "
                     + " | ".join(f"{100 * ret.get(f, 0):.0f}%" for f in fams)
                     + f" | {100 * (r['token_share'] or 0):.2f}% | {r['distill_seconds']:.0f} |")
    lines += ["", "Targets: " + "; ".join(f"{k}: {v}" for k, v in summary["targets"].items())]
    if summary["missing"]:
        lines += ["", f"Not finished yet: {', '.join(summary['missing'])} (run the command again)."]
    (out / "fidelity_table.md").write_text("\n".join(lines) + "\n")
    plot(out, results, t)
    print("\n".join(lines), flush=True)
    print(f"suite call took {wall:.0f} s; summary in {out / 'summary.json'}", flush=True)


def check_targets(results: list[dict]) -> dict[str, str]:
    """The issue's targets, per ratio: the best run that meets them, else the closest miss."""
    out = {}
    for ratio, target in TARGETS.items():
        cands = [r for r in results if r["ratio"] == ratio]
        if not cands:
            out[f"{ratio:.0%}"] = "no run"
            continue

        def misses(r: dict) -> list[str]:
            m = []
            ret = r["retention"]
            if ret["average"] < target["average"]:
                m.append(f"average {100 * ret['average']:.1f}% < {100 * target['average']:.0f}%")
            if "family" in target:
                worst = min((v, f) for f, v in ret.items() if f != "average")
                if worst[0] < target["family"]:
                    m.append(f"{worst[1]} {100 * worst[0]:.1f}% < {100 * target['family']:.0f}%")
            if "recall" in target and ret.get("recall", 0) < target["recall"]:
                m.append(f"recall {100 * ret.get('recall', 0):.1f}% < {100 * target['recall']:.0f}%")
            if (r["token_share"] or 0) > TOKEN_CAP:
                m.append(f"tokens {100 * r['token_share']:.2f}% > 1%")
            return m

        best = max(cands, key=lambda r: (not misses(r), r["retention"]["average"]))
        out[f"{ratio:.0%}"] = f"met by {best['name']}" if not misses(best) else f"missed; best {best['name']}: " + ", ".join(misses(best))
    return out


def plot(out: Path, results: list[dict], t: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    fams = list(t["families"])
    fig, axes = plt.subplots(1, 2, figsize=(16, max(4, 0.3 * len(results) + 2)))
    names = [r["name"] for r in results]
    axes[0].barh(names, [100 * r["retention"]["average"] for r in results])
    axes[0].axvline(100, color="k", lw=0.8)
    axes[0].set(xlabel="held-out average, % of teacher", title="retention")
    grid = [[100 * r["retention"].get(f, 0) for f in fams] for r in results]
    im = axes[1].imshow(grid, vmin=50, vmax=100, cmap="RdYlGn", aspect="auto")
    axes[1].set_xticks(range(len(fams)), fams, rotation=45, ha="right")
    axes[1].set_yticks(range(len(names)), names)
    axes[1].set(title="retention per family, %")
    fig.colorbar(im, ax=axes[1])
    fig.tight_layout()
    fig.savefig(out / "fidelity.png", dpi=110)
    plt.close(fig)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", default=str(SHIPPED_TEACHER))
    p.add_argument("--only", default="", help="comma-separated run names (default: the whole matrix)")
    p.add_argument("--parallel", type=int, default=6, help="runs sharing the device at once")
    p.add_argument("--deadline-minutes", type=float, default=8.0, help="end the call within this wall clock")
    p.add_argument("--steps", type=int, default=1200, help="batches per run (staged: alignment + end to end)")
    p.add_argument("--align-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=2, help="data loader workers per run")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny version on the CPU: checks the plumbing only")
    p.add_argument("--list", action="store_true", help="print the run names and exit")
    p.add_argument("--previous", default="", help="summary.json of an earlier call: its runs count as done")
    args = p.parse_args()
    if args.list:
        print("\n".join(smoke_matrix() if args.cpu_smoke else matrix()))
        return
    if args.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        args.parallel = min(args.parallel, 1)
    run(args)


if __name__ == "__main__":
    main()

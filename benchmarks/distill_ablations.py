"""The paper's distillation ablations in miniature, on the synthetic world (issue 5).

    python benchmarks/distill_ablations.py run --teacher T --world W --out runs/abl [--steps 400] [--parallel 4]
    python benchmarks/distill_ablations.py report runs/abl/results.json --out benchmarks/

`run` distils one hybrid per variant (several side by side on one GPU: the models are small), evaluates the
teacher and every hybrid on the same held-out records with `matvlm eval`, and writes results.json with the
scores, each run's loss log and its distillation tokens. `report` turns results.json into a markdown table
and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from matvlm.io import write_json_atomic

# name -> DistillConfig overrides; the base is the default recipe at 25%.
VARIANTS: dict[str, dict] = {
    "ratio_12.5": {"ratio": 0.125},
    "ratio_25 (default)": {},
    "ratio_50": {"ratio": 0.5},
    "place_begin": {"placement": "begin"},
    "place_middle": {"placement": "middle"},
    "place_end": {"placement": "end"},
    "loss_ce": {"alpha_layer": 0.0, "beta_kl": 0.0, "gamma_ce": 1.0},
    "loss_layer": {"alpha_layer": 1.0, "beta_kl": 0.0},
    "loss_kl": {"alpha_layer": 0.0, "beta_kl": 1.0},
    "loss_kl_layer_ce": {"gamma_ce": 1.0},
    "ratio_50_ce": {"ratio": 0.5, "gamma_ce": 1.0},  # the 50% hybrid with the CE term (tried for its target)
    "init_random": {"random_init": True},
    "attn_bias": {"attn_bias": True},
    "conv_identity": {"conv_init": "identity"},
    "temperature_2": {"temperature": 2.0},
    "released_normalisation": {"layer_loss": "frobenius", "normalize": "sequence"},
}


def slug(name: str) -> str:
    return name.split(" ")[0].replace(".", "_")


def run_variant(name: str, overrides: dict, args) -> dict:
    out = Path(args.out) / slug(name)
    cfg = {
        "teacher": args.teacher, "out": str(out / "hybrid"), "data": str(Path(args.world) / "train.json"),
        "images": [str(Path(args.world) / "images")], "steps": args.steps, "batch_size": args.batch_size,
        "lr": args.lr, "num_workers": args.workers, "save_every": max(1, args.steps // 4),
        "gamma_ce": 0.0, **overrides,  # the base recipe measured: KL + layer (the paper's); variants add CE
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    began = time.time()
    with open(out / "distill.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "matvlm.cli", "distill", "--config", str(out / "config.json"),
                               "--resume"], stdout=log, stderr=subprocess.STDOUT)
    result = {"name": name, "overrides": overrides, "returncode": proc.returncode, "seconds": time.time() - began}
    if proc.returncode == 0:
        result["eval"] = evaluate(out / "hybrid", args, out / "eval.json")
        with open(out / "hybrid" / "log.csv") as f:
            rows = list(csv.DictReader(f))
        result["log"] = {k: [float(r[k]) for r in rows] for k in ("step", "loss", "layer", "kl", "ce", "tokens")}
        result["distill_tokens"] = int(sum(result["log"]["tokens"]))
    print(f"{name}: rc {proc.returncode}, {result.get('eval', {}).get('average', float('nan')):.4f}", flush=True)
    return result


def evaluate(model_dir: Path, args, out: Path) -> dict:
    """Scores of `model_dir` on the first eval_records held-out records, written to `out` (never into a
    model directory that is not this run's: the teacher may be the shipped one)."""
    subprocess.run([sys.executable, "-m", "matvlm.cli", "eval", str(model_dir), "--data", str(Path(args.world) / "test.json"),
                    "--limit", str(args.eval_records), "--batch-size", "256", "--out", str(out)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    res = json.loads(out.read_text())
    return {"average": res["average"], "families": {k: v["score"] for k, v in res["families"].items()},
            "tokens_per_second": res.get("tokens_per_second")}


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 of a model's safetensors files: which teacher a results file was measured against."""
    digest = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def run(args) -> None:
    """Run the chosen variants; results.json keeps the variants of earlier calls (`--only` splits a suite)."""
    names = [n for n in VARIANTS if not args.only or slug(n) in args.only.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    earlier = json.loads(path.read_text()) if path.exists() else None
    fingerprint = weights_fingerprint(Path(args.teacher))
    if earlier and earlier["teacher"].get("fingerprint") == fingerprint:
        teacher = earlier["teacher"]
    else:  # another teacher (or the same path with new weights): earlier variants are not comparable
        teacher_info = json.loads((Path(args.teacher) / "matvlm.json").read_text())
        teacher = {"dir": args.teacher, "train_tokens": teacher_info.get("train_tokens_total", teacher_info.get("train_tokens")), "fingerprint": fingerprint,
                   "eval": evaluate(Path(args.teacher), args, out / "teacher_eval.json")}
        earlier = None
    variants = {v["name"]: v for v in (earlier or {}).get("variants", [])}
    lock = threading.Lock()

    def one(name: str) -> None:
        result = run_variant(name, VARIANTS[name], args)
        with lock:  # written after every variant: a call cut short keeps what finished
            variants[name] = result
            order = list(VARIANTS)
            ordered = sorted(variants.values(), key=lambda v: order.index(v["name"]) if v["name"] in order else len(order))
            results = {"teacher": teacher, "settings": vars(args), "device": device_name(), "variants": ordered}
            write_json_atomic(path, results, indent=1)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(one, names))
    print("wrote", path)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def pct(a: float, b: float) -> float:
    return 100 * a / b if b else float("nan")


# The length-grouped order sorts each run of 50 batches by length, so per-step losses cycle with period 50:
# curves and figures average over one such cycle.
WINDOW = 50


def smoothed(values: list[float], at: int, window: int = WINDOW) -> float:
    """Mean of the `window` values before step `at` (1-based)."""
    part = values[max(0, at - window) : at]
    return sum(part) / len(part) if part else float("nan")


def steps_to(values: list[float], threshold: float, window: int = WINDOW) -> int | None:
    """First step at which the smoothed value is at or below `threshold`."""
    for at in range(window, len(values) + 1):
        if smoothed(values, at, window) <= threshold:
            return at
    return None


KL_THRESHOLD = 0.1  # per position, at the variant's own temperature


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(args.results).read_text())
    teacher = res["teacher"]["eval"]
    families = list(teacher["families"])
    steps = res["settings"]["steps"]
    lines = [f"Teacher held-out average {teacher['average']:.3f} on {res['settings']['eval_records']} records; "
             f"device {res['device']}; {steps} steps of {res['settings']['batch_size']} records. KL columns: "
             f"KL(teacher || student) per position, mean of the {WINDOW} steps before; steps to KL <= {KL_THRESHOLD}.", "",
             "| variant | avg | retention | " + " | ".join(families) + f" | KL@100 | KL@{steps} | steps to KL<={KL_THRESHOLD} | distill tokens (% of teacher) |",
             "|---|---|---|" + "---|" * len(families) + "---|---|---|---|",
             "| teacher | {:.3f} | 100% | ".format(teacher["average"]) + " | ".join(
                 f"{teacher['families'][f]:.3f}" for f in families) + " | - | - | - | - |"]
    for v in res["variants"]:
        share = 100 * v.get("distill_tokens", 0) / res["teacher"]["train_tokens"] if res["teacher"]["train_tokens"] else float("nan")
        kl = v.get("log", {}).get("kl", [])
        uses_kl = any(x > 0 for x in kl)
        curve = (f"{smoothed(kl, 100):.3f} | {smoothed(kl, len(kl)):.3f} | {steps_to(kl, KL_THRESHOLD) or '-'}"
                 if uses_kl else "- | - | -")
        if "eval" in v:
            e = v["eval"]
            scores = f"{e['average']:.3f} | {pct(e['average'], teacher['average']):.1f}% | " + " | ".join(
                f"{e['families'].get(f, float('nan')):.3f}" for f in families)
        elif "log" in v:
            scores = "not evaluated | - | " + " | ".join("-" for _ in families)
        else:
            lines.append(f"| {v['name']} | failed (rc {v['returncode']}) |")
            continue
        lines.append(f"| {v['name']} | {scores} | {curve} | {share:.1f}% |")
    out = Path(args.out)
    (out / "distill_ablations_table.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    panels = [
        (axes[0], ("ratio_25", "init_random", "conv_identity", "attn_bias"), "initialisation (25%)"),
        (axes[1], ("ratio_12_5", "ratio_25", "ratio_50", "ratio_50_ce", "place_begin", "place_middle", "place_end"), "ratio and placement"),
    ]
    for ax, picked, title in panels:
        for v in res["variants"]:
            if "log" in v and slug(v["name"]) in picked:
                kl = v["log"]["kl"]
                at = range(WINDOW, len(kl) + 1)
                ax.plot(at, [smoothed(kl, i) for i in at], label=v["name"])
        ax.set(xlabel="step", ylabel=f"KL(teacher || student) per position ({WINDOW}-step mean)", yscale="log", title=title)
        ax.legend(fontsize=8)
    ok = [v for v in res["variants"] if "eval" in v]
    axes[2].barh([v["name"] for v in ok], [pct(v["eval"]["average"], teacher["average"]) for v in ok])
    axes[2].axvline(100, color="k", lw=0.8)
    axes[2].set(xlabel="held-out average, % of teacher", title="retention", xlim=(70, 110))
    fig.tight_layout()
    fig.savefig(out / "distill_ablations.png", dpi=120)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--teacher", required=True)
    r.add_argument("--world", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=400)
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--parallel", type=int, default=4)
    r.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 4) // 4))
    r.add_argument("--eval-records", type=int, default=900)
    r.add_argument("--only", default="")
    g = sub.add_parser("report")
    g.add_argument("results")
    g.add_argument("--out", default="benchmarks")
    args = p.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()

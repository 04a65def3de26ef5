"""Terminal tables and JSON output for :func:`matvlm.eval.metrics.score_records` results."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

__all__ = ["format_pct", "format_extra", "results_table", "compare_table"]

_DASH = "\u2014"


def format_pct(value: float | None, digits: int = 1) -> str:
    """0.8534 -> "85.3"; None -> an em dash."""
    return _DASH if value is None else f"{100.0 * value:.{digits}f}"


def format_extra(family: Mapping[str, Any]) -> str:
    """Short text of the extras of one family summary (f1, subsets, ...)."""
    parts: list[str] = []
    for key, label in (("f1", "F1"), ("acc_plus", "acc+"), ("token_f1", "tokF1"), ("bleu4", "BLEU4")):
        if key in family:
            parts.append(f"{label} {format_pct(family[key])}")
    if "yes_ratio" in family:
        parts.append(f"yes {format_pct(family['yes_ratio'])}%")
    if family.get("unparsed"):
        parts.append(f"unparsed {family['unparsed']}")
    if family.get("missing"):
        parts.append(f"missing {family['missing']}")
    text = " · ".join(parts)
    subsets = family.get("subsets") or {}
    if subsets:
        subs = ", ".join(f"{name} {format_pct(s.get('score'))}" for name, s in subsets.items())
        text = f"{text}\n{subs}" if text else subs
    return text


def results_table(results: Mapping[str, Any], title: str) -> Table:
    """One model: a row per family (metric, n, score %, extras) and the average."""
    table = Table(title=title)
    table.add_column("Family", style="bold")
    table.add_column("Metric")
    table.add_column("N", justify="right")
    table.add_column("Score %", justify="right")
    table.add_column("Extra", overflow="fold")
    for name, fam in results.get("families", {}).items():
        table.add_row(name, str(fam.get("metric", "")), str(fam.get("n", 0)),
                      format_pct(fam.get("score") if fam.get("n") else None), format_extra(fam))
    missing = results.get("missing") or []
    table.add_row("Average", "", str(results.get("n", 0)), format_pct(results.get("average")),
                  f"missing {len(missing)}" if missing else "", style="bold", end_section=True)
    return table


def _score(results: Mapping[str, Any], family: str) -> float | None:
    fam = results.get("families", {}).get(family)
    if not fam or not fam.get("n"):
        return None
    return fam.get("score")


def _retention(score: float | None, base: float | None) -> str:
    if score is None or not base:
        return _DASH
    return f"{100.0 * score / base:.1f}"


def compare_table(named_results: Mapping[str, Mapping[str, Any]], title: str = "Comparison") -> Table:
    """Families as rows, one score column per model, then retention vs the first.

    Retention = model score / first model score, in %. The average row is
    the mean over the families that every model scored (so all columns
    average the same tasks) and its retention is the ratio of those means;
    families some model lacks show an em dash and are named in the caption.
    """
    names = list(named_results)
    if not names:
        raise ValueError("compare_table needs at least one result")
    families: list[str] = []
    metrics: dict[str, str] = {}
    for res in named_results.values():
        for fam, summary in res.get("families", {}).items():
            if fam not in metrics:
                families.append(fam)
                metrics[fam] = str(summary.get("metric", ""))

    table = Table(title=title)
    table.add_column("Family", style="bold")
    table.add_column("Metric")
    for name in names:
        table.add_column(f"{name} %", justify="right")
    for name in names[1:]:
        table.add_column(f"{name} ret. %", justify="right")

    base = names[0]
    shared: list[str] = []
    for fam in families:
        scores = [_score(named_results[n], fam) for n in names]
        if all(s is not None for s in scores):
            shared.append(fam)
        table.add_row(
            fam, metrics[fam],
            *(format_pct(s) for s in scores),
            *(_retention(s, scores[0]) for s in scores[1:]),
        )

    means: list[float | None] = []
    for n in names:
        vals = [_score(named_results[n], f) for f in shared]
        means.append(sum(vals) / len(vals) if vals else None)  # type: ignore[arg-type]
    table.add_row("Average", "", *(format_pct(m) for m in means),
                  *(_retention(m, means[0]) for m in means[1:]), style="bold", end_section=True)
    left_out = [f for f in families if f not in shared]
    if left_out:
        table.caption = f"Average over shared families only; left out: {', '.join(left_out)}"
    table.caption = (table.caption + "\n" if table.caption else "") + f"Retention relative to {base}"
    return table

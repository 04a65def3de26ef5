"""Can these records be scored? Asked before generating, so a scoring error never costs the generation."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from matvlm.eval.metrics import score_record


def scoring_problems(records: Sequence[Mapping], source: str | Path | None = None) -> dict[int, str]:
    """Index -> why the record cannot be scored: a repeated id, a family that mixes metrics, and whatever
    `score_record` refuses (no `answers`, an unknown metric, a yes/no or multiple-choice reference it cannot
    read), found by scoring each record against an empty prediction."""
    where = f" in {source}" if source else ""
    first_index: dict[str, int] = {}
    family_metric: dict[str, object] = {}
    problems: dict[int, str] = {}
    for index, record in enumerate(records):
        rid = str(record.get("id"))
        if rid in first_index:
            problems[index] = f"record {rid!r}{where}: duplicate id (first at position {first_index[rid]})"
            continue
        first_index[rid] = index
        family = str(record.get("family") or "default")
        metric = record.get("metric")
        if family_metric.setdefault(family, metric) != metric:
            problems[index] = (f"record {rid!r}{where}: family {family!r} is scored with {family_metric[family]!r} "
                               f"elsewhere, {metric!r} here")
            continue
        try:
            score_record(record, "")
        except ValueError as err:
            problems[index] = f"{err}{where}" if where and str(source) not in str(err) else str(err)
    return problems

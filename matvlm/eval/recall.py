"""Recall as a gate: accuracy by distance between the fact and the question, and families that fell behind.

Recall records of the synthetic world carry `distance`: the words of the conversation between the turn
that states the facts and the question that asks for one (`synthetic/world.py`, `_fam_recall`). Hybrids tend to
keep short-range recall and lose the long range, which one recall average hides.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

# Lower edges of the distance bins, in words; the last bin is open.
DISTANCE_BINS: tuple[int, ...] = (0, 1, 50, 200, 500)
RETENTION_GATE = 0.9  # a family below 90% of the teacher's score is flagged


def _bin_name(lo: int, hi: int | None) -> str:
    if hi == lo + 1:
        return str(lo)
    return f"{lo}-{hi - 1}" if hi is not None else f"{lo}+"


def recall_by_distance(records: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                       bins: Sequence[int] = DISTANCE_BINS, family: str = "recall") -> dict[str, dict[str, Any]]:
    """{bin name: {"n", "score", "lo", "hi"}} over the scored `rows` (score_records' "records") of `family`
    records that carry a distance; bins without records are left out. Empty when there are none."""
    distance = {str(r.get("id")): r.get("distance") for r in records
                if r.get("family") == family and isinstance(r.get("distance"), (int, float))}
    edges = list(bins)
    groups: dict[int, list[float]] = {k: [] for k in range(len(edges))}
    for row in rows:
        d = distance.get(str(row.get("id")))
        if d is None:
            continue
        k = max(j for j, lo in enumerate(edges) if d >= lo) if d >= edges[0] else 0
        groups[k].append(float(row["score"]))
    out: dict[str, dict[str, Any]] = {}
    for k, scores in groups.items():
        if scores:
            hi = edges[k + 1] if k + 1 < len(edges) else None
            out[_bin_name(edges[k], hi)] = {"n": len(scores), "score": sum(scores) / len(scores), "lo": edges[k], "hi": hi}
    return out


def _scores(results: Mapping[str, Any]) -> dict[str, float]:
    return {f: s["score"] for f, s in results.get("families", {}).items() if s.get("n")}


def flag_families(teacher: Mapping[str, Any], student: Mapping[str, Any], gate: float = RETENTION_GATE) -> list[dict[str, Any]]:
    """Every family (and recall distance bin) whose student score is below `gate` x the teacher's, worst
    first: [{"family", "teacher", "student", "retention"}]. A family the student was not scored on counts
    as flagged (retention None). Inputs are score_records / evaluate results."""
    t, s = _scores(teacher), _scores(student)
    for name, b in teacher.get("recall_by_distance", {}).items():
        t[f"recall@{name}"] = b["score"]
    for name, b in student.get("recall_by_distance", {}).items():
        s[f"recall@{name}"] = b["score"]
    flagged = []
    for family, base in t.items():
        if base <= 0:
            continue  # nothing to keep
        score = s.get(family)
        retention = None if score is None else score / base
        if retention is None or retention < gate:
            flagged.append({"family": family, "teacher": base, "student": score, "retention": retention})
    return sorted(flagged, key=lambda f: -1.0 if f["retention"] is None else f["retention"])


def describe_flags(flags: Sequence[Mapping[str, Any]], gate: float = RETENTION_GATE) -> str:
    """One line for a report."""
    if not flags:
        return f"every family keeps at least {gate:.0%} of the teacher's score"
    parts = [f"{f['family']} {'not scored' if f['retention'] is None else format(f['retention'], '.0%')}" for f in flags]
    return f"below {gate:.0%} of the teacher: " + ", ".join(parts)

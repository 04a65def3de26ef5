"""Generations written as they are made, so that a late failure (scoring, writing the results) loses none.

`PredictionLog` appends each batch's answers to `PATH.partial` (one JSON line per record, flushed to disk), and
`finish` writes `PATH` atomically: a first line `{"meta": {...}}` (model, data, template, throughput), then the
records' lines. `matvlm rescore PATH` scores such a file again without the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matvlm.errors import InputError
from matvlm.io.files import write_text_atomic


def predictions_path(results_path: str | os.PathLike[str]) -> Path:
    """Where the generations behind a results file go: `scores.json` -> `scores.predictions.jsonl`."""
    path = Path(results_path)
    return path.with_name(path.stem + ".predictions.jsonl")


class PredictionLog:
    """Answers appended batch by batch to `path.partial`; `finish` turns them into `path`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.partial, "w", encoding="utf-8")

    def add(self, predictions: dict[str, str]) -> None:
        for record_id, text in predictions.items():
            self._file.write(json.dumps({"id": record_id, "prediction": text}, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # a kill after this batch keeps it

    def finish(self, meta: dict[str, Any]) -> Path:
        self._file.close()
        lines = self.partial.read_text(encoding="utf-8")
        write_text_atomic(self.path, json.dumps({"meta": meta}, ensure_ascii=False, default=str) + "\n" + lines)
        self.partial.unlink()
        return self.path

    def close(self) -> None:
        """Stop without finishing: `path.partial` keeps the answers made so far."""
        self._file.close()


def read_predictions(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """-> (meta, record id -> answer) from a file `PredictionLog` wrote (or its `.partial`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"predictions file {path} not found")
    meta: dict[str, Any] = {}
    predictions: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "meta" in row:
                meta = row["meta"]
            else:
                predictions[str(row["id"])] = str(row["prediction"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{path}:{number}: not a predictions line ({err})") from err
    return meta, predictions

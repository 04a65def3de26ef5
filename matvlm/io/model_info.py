"""What our commands record next to a model (matvlm.json) and the chat template a model uses."""

from __future__ import annotations

import json
from pathlib import Path

# Written next to a model by our own commands: what a model directory cannot say by itself.
MODEL_INFO_FILE = "matvlm.json"


def read_model_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MODEL_INFO_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def guess_template(tokenizer) -> str:
    """Template from the tokenizer's end token when the model directory does not name one."""
    return "phi" if tokenizer.eos_token == "<|endoftext|>" else "vicuna_v1"


def model_template(model_dir: str | Path | None, tokenizer, template: str | None = None) -> str:
    """The chat template to use: the one asked for, else the one recorded with the model, else a guess."""
    if template:
        return template
    recorded = read_model_info(model_dir).get("template") if model_dir is not None else None
    return recorded or guess_template(tokenizer)

"""Checks of command options before any work: ranges, types, devices and lengths, each failure one sentence
naming the option (`OptionError`)."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from matvlm.errors import OptionError


def flag(name: str) -> str:
    """`batch_size` -> `--batch-size`: how the user typed it on the command line (or in a config file)."""
    return "--" + name.replace("_", "-")


def check_at_least(minimum: float, **values: Any) -> None:
    """Refuse any of `values` (option name -> value; None: not given) below `minimum`."""
    for name, value in values.items():
        if value is not None and value < minimum:
            raise OptionError(f"{flag(name)} must be >= {minimum}, got {value}")


def check_range(name: str, value: float | None, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Refuse `value` outside [low, high] (an open end excludes it); NaN is always out."""
    if value is None:
        return
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise OptionError(f"{flag(name)} must be in {interval}, got {value}")


def resolve_device(device: str | None) -> str:
    """The device to run on: the one asked for if this machine has it, else a sentence; None: cuda if available."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return device
    if kind != "cuda" or (index and not index.isdigit()):
        raise OptionError(f"--device {device!r} is not a device this command runs on; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise OptionError(f"--device {device}: no CUDA GPU is visible here (torch {torch.__version__}, {built}); "
                          "use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise OptionError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")
    return device


def max_positions(model_config) -> int | None:
    """The longest sequence the model's positions cover (text_config.max_position_embeddings), if it says."""
    text = getattr(model_config, "text_config", model_config)
    return getattr(text, "max_position_embeddings", None)


def check_max_new_tokens(max_new_tokens: int, model_config, prompt_tokens: int = 1, option: str = "--max-new-tokens") -> None:
    """Refuse an answer length the model cannot hold: the prompt plus the answer must fit its positions (the
    engine would otherwise allocate a cache for all of them, e.g. 768 GB for 10^9 tokens)."""
    if max_new_tokens < 1:
        raise OptionError(f"{option} must be >= 1, got {max_new_tokens}")
    limit = max_positions(model_config)
    if limit and prompt_tokens + max_new_tokens > limit:
        room = limit - prompt_tokens
        raise OptionError(f"{option} {max_new_tokens:,} is too long: the prompt ({prompt_tokens:,} tokens) and the "
                          f"answer must fit the model's {limit:,} positions (max_position_embeddings); "
                          + (f"use at most {room:,}" if room > 0 else "the prompt alone fills them"))


# Declared field type -> (accepted Python types, how to say it); bool is an int in Python but never a count.
_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
          "str": ((str,), "a string")}


def check_field_types(config, source: str = "") -> None:
    """Refuse dataclass fields whose value is not of the declared simple type (e.g. "steps": "100" in a JSON
    config), naming the option and the file."""
    where = f" in {source}" if source else ""
    for f in fields(config):
        if str(f.type) not in _TYPES:
            continue
        accepted, wanted = _TYPES[str(f.type)]
        value = getattr(config, f.name)
        if not isinstance(value, accepted) or (bool not in accepted and isinstance(value, bool)):
            raise OptionError(f"{f.name}{where} must be {wanted}, got {value!r}")


def check_distill_options(cfg, source: str = "") -> None:
    """Ranges of a DistillConfig that would otherwise give a wrong run (steps -1: a hybrid never distilled) or a
    late crash; the loss settings and layer choices are checked by their own code."""
    check_field_types(cfg, source)
    check_at_least(0, steps=cfg.steps, num_workers=cfg.num_workers, eval_every=cfg.eval_every,
                   eval_records=cfg.eval_records)
    check_at_least(1, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens, save_every=cfg.save_every,
                   max_length=cfg.max_length, pad_to_multiple=cfg.pad_to_multiple)
    check_range("lr", cfg.lr, 0, math.inf, low_open=True, high_open=True)
    check_range("epochs", cfg.epochs, 0, math.inf, low_open=True, high_open=True)
    check_range("grad_clip", cfg.grad_clip, 0, math.inf, low_open=True, high_open=True)
    check_range("weight_decay", cfg.weight_decay, 0, math.inf, high_open=True)
    for name in ("warmup", "decay"):
        check_range(name, getattr(cfg, name), 0, 1)
    if cfg.warmup + cfg.decay > 1:
        raise OptionError(f"warmup + decay must be <= 1 (fractions of the run), got {cfg.warmup} + {cfg.decay}")
    if not cfg.mamba_layers:
        check_range("ratio", cfg.ratio, 0, 1, low_open=True, high_open=True)

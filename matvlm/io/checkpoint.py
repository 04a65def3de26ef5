"""Loading model directories: clear errors for what is not a model; copying their side files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoModelForImageTextToText, PreTrainedModel

from matvlm.io.weights import check_weight_files

SUPPORTED_MODEL_TYPES = ("llava", "matvlm")
# Files of a model directory that are not weights or the model config: tokenizer, processor, templates.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def read_model_type(path: str | Path) -> str:
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    model_type = config.get("model_type")
    if model_type == "tinyllava":
        raise ValueError(
            f"{path} is a TinyLLaVA-format checkpoint; convert it to the HF Llava format first: "
            f"`matvlm import-tinyllava {path} OUT_DIR`"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(LLaVA-style models in the transformers Llava format, and matvlm hybrids)"
        )
    return model_type


def load_vlm(path: str | Path, dtype=None, device: str | None = None) -> PreTrainedModel:
    """Load a Llava teacher or a matvlm hybrid from a local directory (no remote code, ever).

    Default dtype: float32 on the CPU, bfloat16 on a GPU, whatever the checkpoint was saved in.
    """
    read_model_type(path)
    check_weight_files(path)  # a missing or truncated weight file gets a sentence naming it, not a traceback
    import torch

    import matvlm  # noqa: F401  (registers the "matvlm" model type)

    if dtype is None:
        dtype = torch.float32 if device in (None, "cpu") else torch.bfloat16

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_processor(path: str | Path):
    """The model directory's LlavaProcessor, its image processor on the PIL backend that training used
    (with torchvision installed, transformers would switch to torchvision's resize, which differs)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, backend="pil")


def load_image_processor(path: str | Path):
    """The model directory's image processor on the PIL backend (see `load_processor`)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path, backend="pil")


# What a model directory says about that model alone: a model made from it must not inherit them.
MODEL_DOCUMENTS = ("config.json", "README.md", "heldout_scores.json", "ranking.json")


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer / processor / template files of a model directory (not its weights, config, model card or
    scores)."""
    copied = []
    for item in sorted(Path(src).iterdir()):
        if item.is_file() and item.name not in MODEL_DOCUMENTS and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, Path(dst) / item.name)
            copied.append(item.name)
    return copied

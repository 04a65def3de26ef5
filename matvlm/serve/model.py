"""One served model: weights, tokenizer, image processor, chat template, engine and scheduler together.

Chat messages become model inputs through the same code as evaluation and `matvlm generate`
(`matvlm.data.llava.generation_inputs`: the model's chat template, segment-wise tokenization, the
expanded image block, the checked image loader and the model's own image processor).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from matvlm.data.llava import generation_inputs
from matvlm.data.records import BadRecordError
from matvlm.data.templates import IMAGE_TOKEN, TemplateError
from matvlm.engine import Engine
from matvlm.engine.cache import decoder_layers
from matvlm.engine.scheduler import Scheduler
from matvlm.devices import parse_dtype
from matvlm.engine.text import stop_ids_for


class PromptError(ValueError):
    """The conversation cannot become a prompt for this model (bad turns, bad image)."""


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str
    image: bytes | None = None  # the encoded image file (PNG, JPEG, ...), user turns only


class ServedModel:
    """A model directory (teacher or hybrid) behind a continuous-batching scheduler."""

    def __init__(self, model, tokenizer, image_processor, template: str, name: str, max_batch: int,
                 max_seq_len: int, max_queue: int = 64, use_cuda_graph: bool | str = "auto"):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.template, self.name = template, name
        self.engine = Engine(model, max_batch_size=max_batch, max_seq_len=max_seq_len, use_cuda_graph=use_cuda_graph)
        self.scheduler = Scheduler(self.engine, max_queue=max_queue, stop_token_ids=stop_ids_for(self.engine, tokenizer))

    @classmethod
    def load(cls, model_dir: str | Path, max_batch: int = 8, max_seq_len: int = 2048, max_queue: int = 64,
             device: str | None = None, dtype: str | None = None, name: str | None = None) -> ServedModel:
        from transformers import AutoTokenizer

        from matvlm.io import model_template
        from matvlm.io import load_image_processor, load_vlm

        model_dir = Path(model_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_vlm(model_dir, dtype=parse_dtype(dtype, device), device=device)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        template = model_template(model_dir, tokenizer)
        return cls(model, tokenizer, load_image_processor(model_dir), template, name or model_dir.name,
                   max_batch, max_seq_len, max_queue)

    # ------------------------------------------------------------------ prompts
    def prompt(self, turns: list[Turn]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input_ids (L,), pixel_values (3, H, W) or None) for a conversation ending with a user turn."""
        images = [t.image for t in turns if t.image is not None]
        if len(images) > 1:
            raise PromptError(f"the conversation holds {len(images)} images; this model takes at most one")
        record = {"id": "request", "conversations": []}
        for turn in turns:
            text = f"{IMAGE_TOKEN}\n{turn.text}" if turn.image is not None else turn.text
            record["conversations"].append({"from": "human" if turn.role == "user" else "gpt", "value": text})
        with tempfile.TemporaryDirectory(prefix="matvlm-serve-") as folder:
            # The project's image loader reads files: it checks size, truncation and odd modes.
            if images:
                (Path(folder) / "image").write_bytes(images[0])
                record["image"] = "image"
            try:
                item = generation_inputs(record, self.tokenizer, self.template, self.model.config.image_seq_length,
                                         [folder], self.image_processor)
            except (BadRecordError, TemplateError) as err:
                raise PromptError(str(err).replace(f" in {folder}", "")) from err
        return item["input_ids"], item["pixel_values"]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # ------------------------------------------------------------------ description
    def info(self) -> dict:
        """What the page and /v1/models show: kind, layers, cache geometry."""
        mixers = sorted(getattr(self.model.config, "mamba_layers", None) or [])
        layers = len(decoder_layers(self.model))
        total = self.engine.cache_nbytes()
        return {
            "id": self.name,
            "kind": "hybrid" if mixers else "teacher",
            "layers": layers,
            "mixer_layers": mixers,
            "attention_layers": [i for i in range(layers) if i not in mixers],
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype).removeprefix("torch."),
            "max_batch": self.engine.max_batch_size,
            "max_seq_len": self.engine.max_seq_len,
            "cache_bytes_total": total.total,
            "cache_bytes_kv": total.kv,
            "cache_bytes_mixer": total.mixer,
            "cuda_graph": self.engine.use_cuda_graph,
        }

"""Import a TinyLLaVA_Factory checkpoint (config.json with model_type "tinyllava") as an HF Llava checkpoint.

TinyLLaVA (the MaTVLM teacher, TinyLLaVA-Phi-2-SigLIP-3.1B) is a Llava with other names and one extra:

    TinyLLaVA state dict                        transformers Llava state dict
    language_model.model.*                  ->  model.language_model.*
    language_model.lm_head.{weight,bias}    ->  lm_head.{weight,bias}
    vision_tower._vision_tower.vision_model.* -> model.vision_tower.*  (the tower's own names)
    connector._connector.{0,2}.*            ->  model.multi_modal_projector.linear_{1,2}.*

* Image features: TinyLLaVA takes `hidden_states[vision_feature_layer]` (-2) of the vision tower and its
  'patch' strategy drops the first token. SigLIP has no CLS token, so a real patch goes: 729 - 1 = 728
  image tokens at 384 px / patch 14. Llava's "default" strategy drops token 0 in the same way, so we
  write `vision_feature_select_strategy="default"` and `image_seq_length = patches - 1`.
* Phi's output head has a bias that transformers' Llava has no slot for. We never drop it: a checkpoint
  with an lm_head bias is written as our "matvlm" model type (a Llava subclass with `lm_head_bias=True`
  and no mixer layers; load it after `import matvlm`). One without a bias (Llama) is a plain "llava"
  that stock transformers loads. Writing our own type, rather than folding the bias away or dropping it,
  keeps the logits exact and the checkpoint small; the price is that stock transformers alone cannot
  load a Phi import.
* TinyLLaVA marks the image position with input id -200, not a vocabulary id. We add a real "<image>"
  token to the tokenizer; if the vocabulary then outgrows the embedding matrix, new rows are the mean of
  the existing ones (also for the lm_head weight and bias). Phi-2's matrix has spare rows (51,200 rows,
  50,295 tokens), so nothing grows there.
* Tokenizer, chat template (TinyLLaVA's 'phi' or 'llama' conversation format), a LlavaProcessor with
  the SigLIP image settings and `matvlm.json` (template name, source) are written next to the weights.

Only the configurations TinyLLaVA's released models use are accepted (SigLIP tower, mlp2x_gelu
connector, Phi or Llama LM); anything else is refused with its name rather than converted wrongly.
Weights are read from safetensors, or from a torch .bin with `weights_only=True` (never unpickling code).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
)

from matvlm.model.config import MaTVLMConfig
from matvlm.data.llava import build_image_processor
from matvlm.data.templates import get_template
from matvlm.data.tokenizer import TokenizerError, check_tokenizer
from matvlm.devices import DTYPES
from matvlm.io.files import atomic_directory
from matvlm.io.model_info import MODEL_INFO_FILE
from matvlm.model.modeling import MaTVLMForConditionalGeneration

IMAGE_TOKEN = "<image>"
SUPPORTED_LMS = ("phi", "llama")
SUPPORTED_VISION = ("siglip_vision_model",)
SUPPORTED_CONNECTORS = ("mlp2x_gelu",)
# TinyLLaVA's feature strategies -> Llava's: 'patch' drops the first token, 'cls_patch' keeps all.
STRATEGIES = {"patch": "default", "cls_patch": "full"}
# TinyLLaVA conversation templates (conv_version) -> ours; the LM decides when the config names none.
TEMPLATES = {"phi": "phi", "llama": "vicuna_v1", "pretrain": "plain"}
DEFAULT_TEMPLATE = {"phi": "phi", "llama": "vicuna_v1"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# Non-persistent buffers that old transformers versions saved; today's models rebuild them.
STALE_BUFFERS = (".position_ids", ".rotary_emb.inv_freq")
# Config keys TinyLLaVA adds to the nested configs, or that describe the source files, not the model.
NOISE_KEYS = ("model_name_or_path", "model_name_or_path2", "architectures", "auto_map", "torch_dtype", "dtype")
SHOW = 20  # tensors named in an error before "... and N more"


class TinyLlavaImportError(ValueError):
    """A source directory that is not a TinyLLaVA checkpoint we can import faithfully."""


@dataclass
class ImportSummary:
    out: Path
    model_type: str  # "llava" or "matvlm" (Llava + lm_head bias)
    parameters: int
    image_tokens: int
    patches: int
    vision_feature_layer: int
    lm_head_bias: bool
    template: str
    vocab_size: int
    image_token_id: int
    resized_from: int | None  # embedding rows before "<image>" was added, when they had to grow
    dtype: str
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        model = "matvlm (Llava + lm_head bias; load after `import matvlm`)" if self.model_type == "matvlm" else "llava"
        vocab = f"{self.vocab_size:,} rows, <image> = id {self.image_token_id}"
        if self.resized_from is not None:
            vocab += f" (grown from {self.resized_from:,}; new rows = mean of the old)"
        lines = [
            f"imported TinyLLaVA checkpoint -> {self.out}",
            f"  model type    {model}",
            f"  parameters    {self.parameters:,} ({self.dtype})",
            f"  image tokens  {self.image_tokens} per image ({self.patches} patches"
            + (", first dropped" if self.image_tokens < self.patches else "")
            + f"; vision layer {self.vision_feature_layer})",
            f"  lm_head bias  {'kept' if self.lm_head_bias else 'none'}",
            f"  vocabulary    {vocab}",
            f"  template      {self.template}",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- config
@dataclass
class _Plan:
    """What the TinyLLaVA config says, checked: enough to build the Llava config."""

    lm: str
    text_config: dict
    vision_config: dict
    feature_layer: int
    strategy: str
    patches: int
    template: str
    pad_token: str | None
    max_length: int | None
    notes: list[str]


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOISE_KEYS and not k.startswith("_")}


def read_tinyllava_config(src: Path, template: str | None = None) -> _Plan:
    config_file = src / "config.json"
    if not src.is_dir():
        raise TinyLlavaImportError(f"{src} is not a directory")
    if not config_file.is_file():
        raise TinyLlavaImportError(f"{src} is not a TinyLLaVA checkpoint: it has no config.json")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise TinyLlavaImportError(f"{config_file} is not valid JSON: {err}") from err
    model_type = cfg.get("model_type")
    if model_type in ("llava", "matvlm"):
        raise TinyLlavaImportError(f"{src} is already an HF {model_type} checkpoint; use it directly")
    if model_type != "tinyllava":
        raise TinyLlavaImportError(
            f"{config_file}: model_type {model_type!r} is not a TinyLLaVA_Factory checkpoint (expected 'tinyllava'; "
            "legacy TinyLLaVA v1 checkpoints must first go through TinyLLaVA_Factory's legacy converter)"
        )
    if (src / "adapter_config.json").exists():
        raise TinyLlavaImportError(f"{src} is a LoRA checkpoint; merge the adapters into the model first")

    text, vision = cfg.get("text_config"), cfg.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        missing = [k for k, v in (("text_config", text), ("vision_config", vision)) if not isinstance(v, dict)]
        raise TinyLlavaImportError(
            f"{config_file} has no {' / '.join(missing)}; TinyLLaVA saves both (the LM and the vision tower "
            f"configs). Add them from {cfg.get('llm_model_name_or_path')!r} / {cfg.get('vision_model_name_or_path')!r}"
        )
    lm = text.get("model_type")
    if lm not in SUPPORTED_LMS:
        raise TinyLlavaImportError(
            f"{config_file}: language model {lm!r} ({cfg.get('llm_model_name_or_path')!r}) is not supported; "
            f"supported: {', '.join(SUPPORTED_LMS)}"
        )
    tower = vision.get("model_type")
    if tower not in SUPPORTED_VISION or cfg.get("vision_model_name_or_path2"):
        name = cfg.get("vision_model_name_or_path") or tower
        if cfg.get("vision_model_name_or_path2"):
            name = f"{name} + {cfg['vision_model_name_or_path2']} (two towers)"
        raise TinyLlavaImportError(
            f"{config_file}: vision tower {tower!r} ({name}) is not supported; supported: SigLIP ({', '.join(SUPPORTED_VISION)})"
        )
    connector = cfg.get("connector_type")
    if connector not in SUPPORTED_CONNECTORS:
        raise TinyLlavaImportError(
            f"{config_file}: connector_type {connector!r} is not supported; supported: {', '.join(SUPPORTED_CONNECTORS)} "
            "(Linear, GELU, Linear: the Llava projector)"
        )
    # Newer configs say vision_feature_*, older ones mm_vision_select_* (TinyLlavaConfig.load_from_config).
    layer = cfg.get("vision_feature_layer", cfg.get("mm_vision_select_layer", -2))
    select = cfg.get("vision_feature_select_strategy", cfg.get("mm_vision_select_feature", "patch"))
    if not isinstance(layer, int):
        raise TinyLlavaImportError(f"{config_file}: vision_feature_layer must be one integer, got {layer!r}")
    if select not in STRATEGIES:
        raise TinyLlavaImportError(
            f"{config_file}: vision_feature_select_strategy {select!r} is unknown; TinyLLaVA has {', '.join(STRATEGIES)}"
        )
    try:
        patches = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
    except (KeyError, TypeError, ValueError) as err:
        raise TinyLlavaImportError(f"{config_file}: vision_config needs integer image_size and patch_size") from err

    notes = []
    conv = cfg.get("conv_version") or cfg.get("template")
    if template is None:
        if conv is not None and conv not in TEMPLATES:
            raise TinyLlavaImportError(
                f"{config_file}: conversation template {conv!r} has no matvlm equivalent (known: {', '.join(TEMPLATES)}); "
                "pass a template explicitly"
            )
        template = TEMPLATES[conv] if conv else DEFAULT_TEMPLATE[lm]
    get_template(template)  # unknown names fail here, with the list of known ones
    aspect = cfg.get("image_aspect_ratio", "square")
    if aspect != "square":
        notes.append(
            f"the checkpoint was trained with image_aspect_ratio={aspect!r}; the processor only resizes to a "
            "square (pad images to a square yourself for exact parity)"
        )
    return _Plan(
        lm=lm, text_config=_clean(text), vision_config=_clean(vision), feature_layer=layer, strategy=STRATEGIES[select],
        patches=patches, template=template, pad_token=cfg.get("pad_token"),
        max_length=cfg.get("tokenizer_model_max_length"), notes=notes,
    )


# --------------------------------------------------------------------------- weights
def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise TinyLlavaImportError(
            f"{path} holds pickled objects other than tensors (possibly code); refusing to load it "
            f"(torch.load weights_only=True said: {str(err).splitlines()[0]}). Convert it to safetensors where you trust it"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise TinyLlavaImportError(f"{path} is not a readable torch checkpoint: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TinyLlavaImportError(f"{path} is not a flat state dict of tensors")
    return state


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise TinyLlavaImportError(f"{path} is not a readable safetensors file: {err}") from err
    return _load_bin(path)


def load_tinyllava_tensors(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors (single or sharded) first, else torch .bin."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (src / index).is_file():
            try:
                weight_map = json.loads((src / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise TinyLlavaImportError(f"{src / index} is not a valid shard index (needs a weight_map)") from err
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (src / s).is_file()]
            if missing:
                raise TinyLlavaImportError(f"{src / index} names shards that are not in {src}: {', '.join(missing)}")
            tensors = {}
            for shard in shards:
                tensors.update(_load_one(src / shard))
            return tensors
        if (src / single).is_file():
            return _load_one(src / single)
    raise TinyLlavaImportError(
        f"{src} has no weights: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin "
        "or pytorch_model.bin.index.json"
    )


def _renames(vision_prefix: str) -> list[tuple[str, str]]:
    return [
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("vision_tower._vision_tower.vision_model.", vision_prefix),
        ("connector._connector.0.", "model.multi_modal_projector.linear_1."),
        ("connector._connector.2.", "model.multi_modal_projector.linear_2."),
    ]


def _rename(name: str, rules: list[tuple[str, str]], reverse: bool = False) -> str | None:
    for old, new in rules:
        a, b = (new, old) if reverse else (old, new)
        if name.startswith(a):
            return b + name[len(a):]
    return None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:SHOW])
    return shown + (f" ... and {len(names) - SHOW} more" if len(names) > SHOW else "")


def _meta_model(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """The target model without memory: its state dict tells which tensors, and which shapes, it needs."""
    cls = MaTVLMForConditionalGeneration if isinstance(config, MaTVLMConfig) else LlavaForConditionalGeneration
    with torch.device("meta"):
        return cls(config)


def to_llava_state_dict(tensors: dict[str, torch.Tensor], config: LlavaConfig, src: Path) -> dict[str, torch.Tensor]:
    """TinyLLaVA names -> the target model's names; every tensor accounted for, shapes checked."""
    expected = {k: tuple(v.shape) for k, v in _meta_model(config).state_dict().items()}
    # The vision tower's own names vary across transformers versions (with or without "vision_model.").
    vision_prefix = "model.vision_tower.vision_model." if any(k.startswith("model.vision_tower.vision_model.") for k in expected) else "model.vision_tower."
    rules = _renames(vision_prefix)
    out, unexpected = {}, []
    for name, tensor in tensors.items():
        new = _rename(name, rules)
        if new in expected:
            out[new] = tensor
        elif not name.endswith(STALE_BUFFERS):
            unexpected.append(name)
    text = config.text_config
    if getattr(text, "tie_word_embeddings", False) and "lm_head.weight" not in out and "model.language_model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.language_model.embed_tokens.weight"]
    missing = [_rename(k, rules, reverse=True) or k for k in expected if k not in out]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_listing(sorted(unexpected))}")
    wrong = [
        f"{_rename(k, rules, reverse=True)} {tuple(v.shape)} (config says {expected[k]})"
        for k, v in out.items() if tuple(v.shape) != expected[k]
    ]
    if wrong:
        problems.append(f"tensors whose shape does not match config.json ({len(wrong)}): {_listing(wrong)}")
    if problems:
        raise TinyLlavaImportError(f"{src}: the weights do not match its config.json: " + "; ".join(problems))
    return out


def grow_vocab(tensors: dict[str, torch.Tensor], rows: int) -> None:
    """Give the embedding and the lm_head `rows` rows; new rows are the mean of the existing ones."""
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
        t = tensors.get(name)
        if t is None or t.shape[0] >= rows:
            continue
        mean = t.float().mean(dim=0, keepdim=True).to(t.dtype)
        tensors[name] = torch.cat([t, mean.expand(rows - t.shape[0], *t.shape[1:])], dim=0)


# --------------------------------------------------------------------------- tokenizer
def load_tinyllava_tokenizer(src: Path, plan: _Plan):
    """The checkpoint's tokenizer with a real <image> token, a pad token and the chat template."""
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise TinyLlavaImportError(
            f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the LM's tokenizer into it"
        )
    try:
        # An empty config keeps AutoTokenizer from parsing the "tinyllava" config.json (unknown to transformers).
        tokenizer = AutoTokenizer.from_pretrained(
            src, config=PretrainedConfig(), extra_special_tokens={"image_token": IMAGE_TOKEN},
            trust_remote_code=False, local_files_only=True,
        )
    except (OSError, ValueError, KeyError) as err:
        raise TinyLlavaImportError(f"cannot load the tokenizer in {src} (without remote code): {err}") from err
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise TinyLlavaImportError(f"the tokenizer in {src} has no eos token; answers must end with one")
    # TinyLLaVA pads with the config's pad_token, else (its post-load hook) with unk; we fall back to eos.
    vocab = tokenizer.get_vocab()
    pad = next((t for t in (plan.pad_token, tokenizer.pad_token, tokenizer.unk_token, tokenizer.eos_token) if t in vocab), None)
    tokenizer.pad_token = pad
    if plan.max_length:
        tokenizer.model_max_length = plan.max_length
    chat = get_template(plan.template)
    tokenizer.chat_template = chat.to_jinja()
    if chat.eos_token != tokenizer.eos_token:
        plan.notes.append(
            f"template {chat.name!r} ends answers with {chat.eos_token!r} but the tokenizer's eos is "
            f"{tokenizer.eos_token!r}: generation stops at the tokenizer's eos"
        )
    try:
        check_tokenizer(tokenizer, image_token=IMAGE_TOKEN)
    except TokenizerError as err:
        raise TinyLlavaImportError(f"{src}: {err}") from err
    return tokenizer


# --------------------------------------------------------------------------- import
def _llava_config(plan: _Plan, text_config: dict, image_token_id: int, lm_head_bias: bool) -> LlavaConfig:
    common = dict(
        text_config=text_config,
        vision_config=plan.vision_config,
        image_token_index=image_token_id,
        image_seq_length=plan.patches - (1 if plan.strategy == "default" else 0),
        vision_feature_select_strategy=plan.strategy,
        vision_feature_layer=plan.feature_layer,
        projector_hidden_act="gelu",  # TinyLLaVA's connector uses nn.GELU(): exact, not tanh
        multimodal_projector_bias=True,
    )
    return MaTVLMConfig(**common, lm_head_bias=True) if lm_head_bias else LlavaConfig(**common)


def import_tinyllava(
    src: str | Path,
    out: str | Path,
    dtype: str = "auto",
    *,
    template: str | None = None,
    overwrite: bool = False,
) -> ImportSummary:
    """Convert the TinyLLaVA checkpoint in `src` into an HF Llava-format checkpoint in `out` (atomically).

    dtype: "auto" keeps the checkpoint's dtypes; "float32" / "bfloat16" / "float16" casts floating tensors.
    template: our chat template name; default from the checkpoint (TinyLLaVA 'phi' -> phi, 'llama' -> vicuna_v1).
    """
    src, out = Path(src), Path(out)
    if dtype != "auto" and dtype not in DTYPES:
        raise TinyLlavaImportError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()) and not overwrite:  # before reading gigabytes, not after
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite to replace it)")
    plan = read_tinyllava_config(src, template)
    tokenizer = load_tinyllava_tokenizer(src, plan)
    tensors = load_tinyllava_tensors(src)

    lm_head_bias = "language_model.lm_head.bias" in tensors or plan.lm == "phi"  # Phi always has one
    source_config = _llava_config(plan, plan.text_config, tokenizer.image_token_id, lm_head_bias)
    state = to_llava_state_dict(tensors, source_config, src)
    del tensors

    rows = state["model.language_model.embed_tokens.weight"].shape[0]
    resized_from = None
    if len(tokenizer) > rows:
        grow_vocab(state, len(tokenizer))
        resized_from, rows = rows, len(tokenizer)
    if dtype != "auto":
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    saved_dtype = max(set(floats), key=floats.count)

    # The tokenizer decides the special ids; every sub-config states the dtype the weights are saved in.
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_config = dict(plan.text_config, vocab_size=rows, **special)
    config = _llava_config(plan, text_config, tokenizer.image_token_id, lm_head_bias)
    for c in (config, config.text_config, config.vision_config):
        c.dtype = saved_dtype
    model = _meta_model(config)
    model.load_state_dict(state, strict=True, assign=True)  # keys and shapes were checked above
    model.generation_config = GenerationConfig(**special)
    vision = config.vision_config
    processor = LlavaProcessor(
        image_processor=build_image_processor(vision.image_size),  # SigLIP: resize, 1/255, mean = std = 0.5
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=plan.strategy,
        num_additional_image_tokens=0,  # SigLIP has no CLS token
        chat_template=tokenizer.chat_template,
    )
    notes = list(plan.notes)
    if lm_head_bias:
        notes.append(
            "the lm_head has a bias, which transformers' Llava cannot hold: written as model type 'matvlm' "
            "(Llava + lm_head bias, no mixer layers)"
        )
    info = {
        "template": plan.template,
        "source": {"format": "tinyllava", "path": str(src), "lm": plan.lm},
        "lm_head_bias": lm_head_bias,
        "imported_by": "matvlm import-tinyllava",
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    unique = {v.data_ptr(): v.numel() for v in state.values()}
    return ImportSummary(
        out=out, model_type=config.model_type, parameters=sum(unique.values()), image_tokens=config.image_seq_length,
        patches=plan.patches, vision_feature_layer=plan.feature_layer, lm_head_bias=lm_head_bias,
        template=plan.template, vocab_size=rows, image_token_id=tokenizer.image_token_id, resized_from=resized_from,
        dtype=str(saved_dtype).removeprefix("torch."), notes=notes,
    )

"""`import_tinyllava`: tiny checkpoints in TinyLLaVA_Factory's layout become HF Llava checkpoints whose logits
equal a direct computation from the original tensors (SigLIP hidden_states[-2] minus the first patch, a hand-written
GELU MLP, features spliced where TinyLLaVA's -200 placeholder was, the LM with its lm_head bias)."""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
    SiglipVisionModel,
)

import matvlm
from matvlm.data.templates import get_template
from matvlm.io import load_vlm
from matvlm.testing import tiny_llava_config
from matvlm.io.tinyllava import TinyLlavaImportError, import_tinyllava

TINYLLAVA_IMAGE = -200  # TinyLLaVA's placeholder input id
PATCHES = 16  # 32 px / patch 8
CORPUS = [("A chat between a curious user and an artificial intelligence assistant. USER: What is on the table? "
           "ASSISTANT: a red cube and two blue balls")] * 20


def byte_bpe(specials: list[str], vocab_size: int) -> Tokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    return bpe


def write_phi_tokenizer(folder: Path) -> None:
    """Phi-2's tokenizer files: vocab.json + merges.txt, CodeGenTokenizer, <|endoftext|> as bos/eos/unk."""
    byte_bpe(["<|endoftext|>"], 290).model.save(str(folder))
    special = "<|endoftext|>"
    config = {"tokenizer_class": "CodeGenTokenizer", "bos_token": special, "eos_token": special, "unk_token": special,
              "add_prefix_space": False, "model_max_length": 2048}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_llama_tokenizer(folder: Path, eos: bool = True) -> None:
    """A Llama-style tokenizer (<unk>, <s>, </s>) saved as tokenizer.json."""
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"} if eos else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_bpe(["<unk>", "<s>", "</s>"], 290), **specials)
    tok.save_pretrained(folder)


def legacy_text_config(text) -> dict:
    """The LM config as TinyLLaVA saves it (transformers 4.39 names: partial_rotary_factor, rope_theta)."""
    d = text.to_dict()
    rope = d.pop("rope_parameters", None) or {}
    d.update(rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=None, _name_or_path="microsoft/phi-2",
             architectures=["PhiForCausalLM" if d["model_type"] == "phi" else "LlamaForCausalLM"],
             torch_dtype="float16", transformers_version="4.39.1", temperature=1.0, top_k=50)
    if d["model_type"] == "phi":
        d["partial_rotary_factor"] = 0.25  # not PhiConfig's default, so a dropped key would show
    return d


@dataclass
class Source:
    dir: Path
    family: str
    tensors: dict  # TinyLLaVA names
    config: dict  # config.json


def build_source(folder: Path, family: str, fmt: str = "safetensors") -> Source:
    folder.mkdir(parents=True)
    if family == "phi":
        write_phi_tokenizer(folder)
    else:
        write_llama_tokenizer(folder)
    tokens = len(AutoTokenizer.from_pretrained(folder))
    # Phi-2 has spare embedding rows (51,200 for 50,295 tokens); TinyLlama has none (32,000 for 32,000).
    vocab = 300 if family == "phi" else tokens
    vision = tiny_llava_config("phi").vision_config  # SigLIP, 32 px, patch 8, hidden 32
    text = tiny_llava_config(family, vocab_size=vocab, num_layers=2).text_config
    text_dict = legacy_text_config(text)
    lm_class = PhiForCausalLM if family == "phi" else LlamaForCausalLM
    torch.manual_seed(0)
    lm = lm_class(type(text)(**text_dict))
    tower = SiglipVisionModel(vision)
    hidden, vision_hidden = text.hidden_size, vision.hidden_size
    tensors = {f"language_model.{k}": v for k, v in lm.state_dict().items()}
    tensors.update({f"vision_tower._vision_tower.vision_model.{k}": v for k, v in tower.state_dict().items()})
    tensors.update({
        "connector._connector.0.weight": torch.zeros(hidden, vision_hidden), "connector._connector.0.bias": torch.zeros(hidden),
        "connector._connector.2.weight": torch.zeros(hidden, hidden), "connector._connector.2.bias": torch.zeros(hidden),
    })
    # Every tensor distinct and nonzero (init leaves biases at 0 and norms at 1, which would hide swaps).
    gen = torch.Generator().manual_seed(1)
    tensors = {k: (v + 0.1 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in tensors.items()}
    vision_dict = vision.to_dict()
    vision_dict.update(model_name_or_path="google/siglip-so400m-patch14-384", model_name_or_path2="")
    config = {
        "architectures": ["TinyLlavaForConditionalGeneration"], "model_type": "tinyllava",
        "llm_model_name_or_path": "microsoft/phi-2" if family == "phi" else "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "tokenizer_name_or_path": "microsoft/phi-2", "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
        "vision_model_name_or_path2": "", "connector_type": "mlp2x_gelu", "text_config": text_dict,
        "vision_config": vision_dict, "hidden_size": hidden, "vocab_size": vocab, "vision_hidden_size": vision_hidden,
        "ignore_index": -100, "image_token_index": TINYLLAVA_IMAGE, "pad_token": None, "pad_token_id": None,
        "tokenizer_padding_side": "right", "tokenizer_model_max_length": 3072, "tokenizer_use_fast": False,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "patch", "image_aspect_ratio": "square",
        "resampler_hidden_size": None, "num_queries": None, "num_resampler_layers": None, "use_cache": False,
        "cache_dir": None, "tune_type_llm": "full", "tune_type_connector": "full", "tune_type_vision_tower": "frozen",
        "tune_vision_tower_from_layer": 0, "torch_dtype": "float32", "transformers_version": "4.39.1",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_weights(folder, tensors, fmt)
    return Source(folder, family, tensors, config)


def write_weights(folder: Path, tensors: dict, fmt: str) -> None:
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    if fmt == "safetensors":
        save_file(tensors, folder / "model.safetensors")
    elif fmt == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    elif fmt in ("sharded", "sharded_bin"):
        ext, index = (".safetensors", "model.safetensors.index.json") if fmt == "sharded" else (".bin", "pytorch_model.bin.index.json")
        weight_map = {}
        for i, part in enumerate(halves, 1):
            shard = f"{'model' if fmt == 'sharded' else 'pytorch_model'}-0000{i}-of-00002{ext}"
            chunk = {k: tensors[k] for k in part}
            save_file(chunk, folder / shard) if fmt == "sharded" else torch.save(chunk, folder / shard)
            weight_map.update(dict.fromkeys(part, shard))
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(fmt)


def strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@torch.no_grad()
def reference_logits(source: Source, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    """TinyLLaVA's forward from the original tensors, with stock transformers modules and a hand-written MLP."""
    t, cfg = source.tensors, source.config
    tower = SiglipVisionModel(tiny_llava_config("phi").vision_config).eval()
    tower.load_state_dict(strip(t, "vision_tower._vision_tower.vision_model."))
    text = (PhiConfig if source.family == "phi" else type(tiny_llava_config("llama").text_config))(**cfg["text_config"])
    lm = (PhiForCausalLM if source.family == "phi" else LlamaForCausalLM)(text).eval()
    lm.load_state_dict(strip(t, "language_model."))  # strict: includes Phi's lm_head.bias
    features = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]  # 'patch': drop the first
    features = F.linear(F.gelu(F.linear(features, t["connector._connector.0.weight"], t["connector._connector.0.bias"])),
                        t["connector._connector.2.weight"], t["connector._connector.2.bias"])
    at = ids.index(TINYLLAVA_IMAGE)
    embed = lm.get_input_embeddings()
    embeds = torch.cat([embed(torch.tensor(ids[:at])), features[0], embed(torch.tensor(ids[at + 1:]))])
    return lm(inputs_embeds=embeds[None]).logits[0]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyllava")
    return {family: build_source(root / family, family) for family in ("phi", "llama")}


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    return {family: (root / family, import_tinyllava(src.dir, root / family)) for family, src in sources.items()}


def random_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))


@pytest.mark.parametrize("family", ["phi", "llama"])
def test_logits_equal_a_direct_computation_from_the_original_tensors(sources, imported, family):
    source, (out, summary) = sources[family], imported[family]
    model = AutoModelForImageTextToText.from_pretrained(out).eval()  # after `import matvlm`
    assert model.config.model_type == ("matvlm" if family == "phi" else "llava")
    assert (model.config.image_seq_length, model.config.vision_feature_select_strategy, model.config.vision_feature_layer) == (
        PATCHES - 1, "default", -2)
    if family == "phi":
        assert model.config.text_config.rope_parameters["partial_rotary_factor"] == 0.25  # the legacy key was read
        torch.testing.assert_close(model.lm_head.bias, source.tensors["language_model.lm_head.bias"], rtol=0, atol=0)

    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": "<image>\nWhat is on the table?"}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == get_template(summary.template).render(messages, add_generation_prompt=True)
    image = random_image()
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    image_id = model.config.image_token_index
    assert ids.count(image_id) == PATCHES - 1 and processor.tokenizer.convert_tokens_to_ids("<image>") == image_id
    # SigLIP preprocessing by hand: 32 x 32 bicubic, x / 255, (x - 0.5) / 0.5.
    manual = np.asarray(image.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    manual = torch.from_numpy((manual - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(inputs["pixel_values"][0], manual, rtol=0, atol=1e-5)

    with torch.no_grad():
        logits = model(**inputs).logits[0]
    first = ids.index(image_id)
    tinyllava_ids = ids[:first] + [TINYLLAVA_IMAGE] + ids[first + PATCHES - 1:]
    expected = reference_logits(source, tinyllava_ids, inputs["pixel_values"])
    vocab = source.config["vocab_size"]
    assert logits.shape == (len(ids), summary.vocab_size) and expected.shape == (len(ids), vocab)
    torch.testing.assert_close(logits[:, :vocab], expected, rtol=1e-4, atol=1e-5)


def test_phi_is_written_as_matvlm_with_the_bias_and_llama_as_stock_llava(sources, imported):
    phi_out, phi = imported["phi"]
    assert (phi.model_type, phi.lm_head_bias, phi.template, phi.image_tokens, phi.resized_from) == ("matvlm", True, "phi", 15, None)
    assert phi.parameters == sum(v.numel() for v in sources["phi"].tensors.values())
    assert "kept" in phi.describe() and "15 per image" in phi.describe() and any("matvlm" in n for n in phi.notes)
    assert json.loads((phi_out / "matvlm.json").read_text())["template"] == "phi"
    assert type(load_vlm(phi_out)).__name__ == "MaTVLMForConditionalGeneration"
    tok = AutoTokenizer.from_pretrained(phi_out)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.model_max_length == 3072
    assert tok.image_token == "<image>" and tok("a<image>b")["input_ids"].count(phi.image_token_id) == 1

    llama_out, llama = imported["llama"]
    assert (llama.model_type, llama.lm_head_bias, llama.template) == ("llava", False, "vicuna_v1")
    model = LlavaForConditionalGeneration.from_pretrained(llama_out)  # the stock class
    rows = sources["llama"].config["vocab_size"]
    assert llama.resized_from == rows and llama.vocab_size == rows + 1 == model.config.text_config.vocab_size
    assert llama.image_token_id == rows  # the new token got the new row
    src = sources["llama"].tensors
    for name, new in (("language_model.model.embed_tokens.weight", model.get_input_embeddings().weight),
                      ("language_model.lm_head.weight", model.lm_head.weight)):
        torch.testing.assert_close(new[:rows], src[name], rtol=0, atol=0)
        torch.testing.assert_close(new[rows], src[name].mean(0))
    assert AutoTokenizer.from_pretrained(llama_out).pad_token == "<unk>"  # TinyLLaVA pads Llama with unk
    assert json.loads((llama_out / "matvlm.json").read_text())["template"] == "vicuna_v1"


@pytest.mark.parametrize("fmt", ["sharded", "bin", "sharded_bin"])
def test_sharded_and_bin_inputs_give_the_same_checkpoint(sources, imported, tmp_path, fmt):
    source = sources["phi"]
    src = tmp_path / "src"
    shutil.copytree(source.dir, src, ignore=shutil.ignore_patterns("*.safetensors"))
    write_weights(src, source.tensors, fmt)
    import_tinyllava(src, tmp_path / "out")
    a = AutoModelForImageTextToText.from_pretrained(imported["phi"][0]).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_option(sources, tmp_path):
    summary = import_tinyllava(sources["phi"].dir, tmp_path / "bf16", dtype="bfloat16")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert summary.dtype == "bfloat16" and model.dtype == torch.bfloat16 and model.lm_head.bias.dtype == torch.bfloat16
    with pytest.raises(TinyLlavaImportError, match="unknown dtype 'int8'"):
        import_tinyllava(sources["phi"].dir, tmp_path / "x", dtype="int8")


def test_to_hybrid_keeps_the_lm_head_bias(sources, imported, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(imported["phi"][0])
    hybrid = matvlm.to_hybrid(model, ratio=0.5)
    bias = sources["phi"].tensors["language_model.lm_head.bias"]
    assert hybrid.config.lm_head_bias and hybrid.config.mamba_layers == [0]
    torch.testing.assert_close(hybrid.lm_head.bias, bias, rtol=0, atol=0)
    hybrid.save_pretrained(tmp_path / "hybrid")
    torch.testing.assert_close(load_vlm(tmp_path / "hybrid").lm_head.bias, bias, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad inputs
class Payload:
    """Pickles to a call of os.system: what weights_only=True must refuse to run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            cfg[outer][inner] = value
        else:
            cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))


def rewrite_tensors(src: Path, tensors: dict) -> None:
    (src / "model.safetensors").unlink()
    save_file(tensors, src / "model.safetensors")


BAD_INPUTS = {
    "no config": (lambda s, t: (s / "config.json").unlink(), "has no config.json"),
    "hf llava": (lambda s, t: edit_config(s, model_type="llava"), "already an HF llava checkpoint"),
    "other format": (lambda s, t: edit_config(s, model_type="bunny"), "'bunny' is not a TinyLLaVA_Factory checkpoint"),
    "connector": (lambda s, t: edit_config(s, connector_type="resampler"), "connector_type 'resampler' is not supported"),
    "vision tower": (lambda s, t: edit_config(s, **{"vision_config.model_type": "clip_vision_model"}),
                     "vision tower 'clip_vision_model'"),
    "two towers": (lambda s, t: edit_config(s, vision_model_name_or_path2="facebook/dinov2-large"), r"two towers"),
    "lm": (lambda s, t: edit_config(s, **{"text_config.model_type": "qwen2"}), "language model 'qwen2'"),
    "template": (lambda s, t: edit_config(s, conv_version="gemma"), "template 'gemma' has no matvlm equivalent"),
    "strategy": (lambda s, t: edit_config(s, vision_feature_select_strategy="cls"), "strategy 'cls' is unknown"),
    "missing": (lambda s, t: rewrite_tensors(s, {k: v for k, v in t.items() if k not in (
        "language_model.lm_head.bias", "connector._connector.2.weight")}),
        r"missing tensors \(2\): .*connector._connector.2.weight.*language_model.lm_head.bias"),
    "unexpected": (lambda s, t: rewrite_tensors(s, {**t, "connector._connector.4.weight": torch.ones(2),
                                                      "language_model.extra_head.weight": torch.ones(2)}),
                   r"unexpected tensors \(2\): connector._connector.4.weight, language_model.extra_head.weight"),
    "shape": (lambda s, t: rewrite_tensors(s, {**t, "connector._connector.0.bias": torch.ones(3)}),
              r"connector._connector.0.bias \(3,\) \(config says \(64,\)\)"),
    "no weights": (lambda s, t: (s / "model.safetensors").unlink(), "has no weights"),
    "damaged": (lambda s, t: (s / "model.safetensors").write_bytes(b"garbage"), "not a readable safetensors file"),
    "missing shard": (lambda s, t: (s / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}})), "names shards that are not in"),
    "no tokenizer": (lambda s, t: [(s / f).unlink() for f in ("vocab.json", "merges.txt", "tokenizer_config.json")],
                     "no tokenizer files"),
    "no eos": (lambda s, t: ([(s / f).unlink() for f in ("vocab.json", "merges.txt", "tokenizer_config.json")],
                             write_llama_tokenizer(s, eos=False)), "has no eos token"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(sources, tmp_path, case):
    src = tmp_path / "src"
    shutil.copytree(sources["phi"].dir, src)
    damage, message = BAD_INPUTS[case]
    damage(src, sources["phi"].tensors)
    with pytest.raises(TinyLlavaImportError, match=message):
        import_tinyllava(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bin_with_pickled_code_is_refused_without_running_it(sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sources["phi"].dir, src, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "ran"
    torch.save({**sources["phi"].tensors, "evil": Payload(marker)}, src / "pytorch_model.bin")
    with pytest.raises(TinyLlavaImportError, match="pickled objects other than tensors"):
        import_tinyllava(src, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_existing_output_is_not_replaced_without_overwrite(sources, imported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        import_tinyllava(sources["llama"].dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    import_tinyllava(sources["llama"].dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_load_vlm_points_tinyllava_dirs_to_the_importer(sources):
    with pytest.raises(ValueError, match="matvlm import-tinyllava"):
        load_vlm(sources["phi"].dir)


def test_cls_patch_strategy_keeps_every_token(sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sources["phi"].dir, src)
    edit_config(src, vision_feature_select_strategy="cls_patch", conv_version="pretrain")
    summary = import_tinyllava(src, tmp_path / "out")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert summary.image_tokens == PATCHES and summary.template == "plain"
    assert (model.config.image_seq_length, model.config.vision_feature_select_strategy) == (PATCHES, "full")
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    ids = processor(images=random_image(), text="<image>hi", return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(model.config.image_token_index) == PATCHES

"""Layer placement, conversion options and every bad-input error."""

import json

import pytest
import torch

import matvlm
from matvlm.model.config import check_layer_indices, mamba_layer_indices
from matvlm.io import atomic_directory, load_vlm, read_model_type
from matvlm.testing import tiny_llava


@pytest.mark.parametrize(
    "ratio,expected",
    [(0.125, [0, 8, 16, 24]), (0.25, list(range(0, 32, 4))), (0.5, list(range(0, 32, 2)))],
)
def test_even_placement_for_32_layers(ratio, expected):
    assert mamba_layer_indices(32, ratio, "even") == expected


def test_block_placements():
    assert mamba_layer_indices(32, 0.25, "begin") == list(range(0, 8))
    assert mamba_layer_indices(32, 0.25, "end") == list(range(24, 32))
    assert mamba_layer_indices(32, 0.25, "middle") == list(range(12, 20))
    assert mamba_layer_indices(10, 0.3, "even") == [0, 3, 6]


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\)"):
        mamba_layer_indices(32, ratio)


def test_ratio_rounding_to_nothing_or_everything():
    with pytest.raises(ValueError, match="no mixer layer"):
        mamba_layer_indices(4, 0.1)
    with pytest.raises(ValueError, match="every attention layer"):
        mamba_layer_indices(4, 0.9)


def test_unknown_placement():
    with pytest.raises(ValueError, match="unknown placement 'random'"):
        mamba_layer_indices(32, 0.25, "random")


@pytest.mark.parametrize(
    "layers,message",
    [([0, 4], "out of range"), ([-1], "out of range"), ([1, 1], "repeated"), ([0, 1, 2, 3], "no attention layer"), ([], "no mixer")],
)
def test_bad_explicit_layers(layers, message):
    with pytest.raises(ValueError, match=message):
        check_layer_indices(layers, 4)


def test_to_hybrid_argument_errors():
    teacher = tiny_llava("phi")
    with pytest.raises(ValueError, match="not both"):
        matvlm.to_hybrid(teacher, ratio=0.5, mamba_layers=[0])
    with pytest.raises(ValueError, match="give a ratio"):
        matvlm.to_hybrid(teacher)
    with pytest.raises(ValueError, match="unknown conv_init"):
        matvlm.to_hybrid(teacher, mamba_layers=[0], conv_init="zeros")
    hybrid = matvlm.to_hybrid(teacher, mamba_layers=[0])
    with pytest.raises(ValueError, match="already a hybrid"):
        matvlm.to_hybrid(hybrid, mamba_layers=[1])
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        matvlm.to_hybrid(teacher.model.language_model, ratio=0.5)


def test_unsupported_decoder_is_named():
    teacher = tiny_llava("phi")
    teacher.config.text_config.model_type = "gpt_neox"
    with pytest.raises(ValueError, match="unsupported decoder 'gpt_neox'; supported: phi, llama"):
        matvlm.to_hybrid(teacher, ratio=0.5)


def test_teacher_is_left_unchanged():
    teacher = tiny_llava("llama")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    hybrid = matvlm.to_hybrid(teacher, ratio=0.5)
    with torch.no_grad():
        for p in hybrid.parameters():
            p.add_(1.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert type(teacher.model.language_model.layers[0].self_attn).__name__ == "LlamaAttention"


def test_summary_counts_cache_and_parameters():
    teacher = tiny_llava("llama", num_heads=4, num_kv_heads=2)  # hidden 64, head dim 16
    hybrid = matvlm.to_hybrid(teacher, mamba_layers=[0, 2])
    s = matvlm.summarize_conversion(teacher, hybrid, dtype_bytes=2)
    per_layer = 2 * 2 * 16 * 2  # K and V, 2 KV heads, head dim 16, bf16
    assert s.kv_bytes_per_token_before == 4 * per_layer
    assert s.kv_bytes_per_token_after == 2 * per_layer
    conv_dim = 64 + 2 * 4 * 16
    assert s.mixer_state_bytes == 2 * 2 * (conv_dim * 4 + 4 * 16 * 16)
    assert s.cache_bytes(100) == (400 * per_layer, 200 * per_layer + s.mixer_state_bytes)
    assert s.params_added == sum(p.numel() for m in hybrid.mixers().values() for p in m.parameters())


def test_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        read_model_type(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_model_type(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_model_type(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' is not supported; supported: llava, matvlm"):
        load_vlm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tinyllava"}))
    with pytest.raises(ValueError, match="TinyLLaVA-format"):
        read_model_type(tmp_path)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(out) as tmp:
        (tmp / "whole.bin").write_text("x")
    assert (out / "whole.bin").exists()
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(out):
            pass


def test_side_files_leave_the_source_models_card_scores_and_weights(tmp_path):
    from matvlm.io import copy_side_files

    src, dst = tmp_path / "teacher", tmp_path / "hybrid"
    src.mkdir()
    dst.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja", "matvlm.json", "config.json", "README.md",
                 "heldout_scores.json", "ranking.json", "model.safetensors"):
        (src / name).write_text("{}")
    assert copy_side_files(src, dst) == ["chat_template.jinja", "matvlm.json", "tokenizer.json"]
    assert sorted(p.name for p in dst.iterdir()) == ["chat_template.jinja", "matvlm.json", "tokenizer.json"]

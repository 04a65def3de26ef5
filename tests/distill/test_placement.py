"""Layer ranking and `--placement auto`: the measures find what matters, bad rankings are refused."""

import pytest
import torch

from matvlm.model.config import mamba_layer_indices
from matvlm.model.convert import to_hybrid
from matvlm.distill.placement import attention_scores, load_ranking, pick_layers, rank_layers, teacher_fingerprint
from matvlm.testing import tiny_llava

from .test_align import batch


@pytest.fixture(scope="module")
def phi():
    return tiny_llava("phi", num_layers=4)


@pytest.fixture(scope="module")
def ranking(phi):
    """The teacher with layer 1's attention output silenced and layer 3's amplified."""
    teacher = tiny_llava("phi", num_layers=4)
    with torch.no_grad():
        layers = teacher.model.language_model.layers
        layers[1].self_attn.dense.weight.zero_()
        layers[1].self_attn.dense.bias.zero_()
        layers[3].self_attn.dense.weight.mul_(30)
    train = [batch(teacher.config, i) for i in range(3)]
    held = [batch(teacher.config, 50 + i) for i in range(2)]
    return teacher, rank_layers(teacher, train, held, align_steps=4, teacher_path="tiny")


def test_kl_ranking_finds_the_silent_and_the_loud_layer(ranking):
    teacher, r = ranking
    order = r["measures"]["kl"]["order"]
    assert order[0] == 1 and order[-1] == 3, r["measures"]["kl"]["scores"]
    assert r["measures"]["kl"]["scores"]["1"] < 1e-6  # a layer that adds nothing costs nothing to replace
    assert r["num_layers"] == 4 and r["fingerprint"] == teacher_fingerprint(teacher)
    assert r["cost"]["total"]["seconds"] > 0 and r["cost"]["kl"]["tokens"] > r["cost"]["attention"]["tokens"]
    assert pick_layers(r, teacher, 0.25) == [1]
    assert pick_layers(r, teacher, 0.5, "kl") == sorted(order[:2])
    student = to_hybrid(teacher, ratio=0.5, placement="auto", ranking=r)
    assert student.config.mamba_layers == sorted(order[:2])


def test_attention_measure_on_uniform_attention():
    """With zero queries every position attends uniformly to itself and all before it, so the far mass of
    position p is (p - window) / (p + 1): the measure must give exactly that average."""
    teacher = tiny_llava("phi", num_layers=2)
    with torch.no_grad():
        for layer in teacher.model.language_model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.q_proj.bias.zero_()
    b = batch(teacher.config, 0, pad_last=0)
    window = 8
    answer = torch.zeros_like(b["labels"], dtype=torch.bool)
    answer[:, :-1] = b["labels"][:, 1:] != -100
    p = torch.arange(b["labels"].shape[1]).expand_as(answer)[answer].double()
    expected = float(((p - window).clamp_min(0) / (p + 1)).mean())
    scores = attention_scores(teacher, [b], window=window)
    for i in (0, 1):
        assert scores[i]["far_mass"] == pytest.approx(expected, rel=1e-4)
    assert teacher.config._attn_implementation != "eager"  # restored


def test_auto_placement_refuses_bad_rankings(ranking, phi):
    teacher, r = ranking
    with pytest.raises(ValueError, match="another teacher"):
        pick_layers(r, phi, 0.25)  # same shapes, other weights
    with pytest.raises(ValueError, match="another teacher"):
        to_hybrid(phi, ratio=0.25, placement="auto", ranking=r)
    with pytest.raises(ValueError, match="rank-layers"):
        to_hybrid(teacher, ratio=0.25, placement="auto")  # no ranking at all
    with pytest.raises(ValueError, match="rank-layers"):
        mamba_layer_indices(4, 0.25, "auto")
    with pytest.raises(ValueError, match="8 decoder layers"):
        pick_layers({**r, "num_layers": 8}, teacher, 0.25)
    bad = {**r, "measures": {"kl": {**r["measures"]["kl"], "order": [0, 1, 2, 7]}}}
    with pytest.raises(ValueError, match="not a permutation"):
        pick_layers(bad, teacher, 0.25)
    with pytest.raises(ValueError, match="no measure"):
        pick_layers(r, teacher, 0.25, "entropy")
    with pytest.raises(ValueError, match="every attention layer"):
        pick_layers(r, teacher, 0.99)
    with pytest.raises(ValueError, match="not a rank-layers file"):
        load_ranking({"order": [0]})


def test_ranking_file_round_trip_and_missing_file(ranking, tmp_path):
    from matvlm.distill.placement import write_ranking

    teacher, r = ranking
    path = write_ranking(tmp_path / "r.json", r)
    assert pick_layers(str(path), teacher, 0.25) == pick_layers(r, teacher, 0.25)
    with pytest.raises(FileNotFoundError, match="rank-layers"):
        pick_layers(str(tmp_path / "nope.json"), teacher, 0.25)


def test_fingerprint_ignores_dtype_but_not_weights():
    model = tiny_llava("phi", num_layers=4).to(torch.bfloat16)  # bf16 values: the same in fp32
    f = teacher_fingerprint(model)
    assert teacher_fingerprint(model.float()) == f
    other = tiny_llava("phi", num_layers=4, seed=1)
    assert teacher_fingerprint(other) != f

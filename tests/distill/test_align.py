"""Stage 1 alignment: mixers trained on the teacher's attention input/output, nothing else touched."""

import pytest
import torch

from matvlm.model.convert import to_hybrid
from matvlm.distill import Distiller, LossSettings
from matvlm.distill.align import align_mixers, capture_attention_io, relative_layer_loss, run_captured
from matvlm.testing import tiny_llava

from .test_distill import tiny_teacher  # noqa: F401  (a fixture: the trained tiny teacher and its world)


def batch(config, seed, rows=4, length=40, pad_last=5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (rows, length), generator=gen)
    ids[:, 1 : 1 + config.image_seq_length] = config.image_token_index
    mask = torch.ones_like(ids)
    mask[0, length - pad_last :] = 0
    labels = ids.clone()
    labels[:, : length // 2] = -100
    labels[mask == 0] = -100
    size = config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "has_image": torch.ones(rows, dtype=torch.bool),
            "pixel_values": torch.randn(rows, 3, size, size, generator=gen)}


def test_capture_stops_after_last_layer(teacher):
    seen_layers = []
    layers = teacher.model.language_model.layers
    hook = layers[3].register_forward_pre_hook(lambda *a: seen_layers.append(3))
    with capture_attention_io(teacher, [0, 1]) as seen:
        run_captured(teacher, batch(teacher.config, 0))
    hook.remove()
    assert set(seen) == {0, 1} and seen_layers == []  # layer 3 never ran
    # the captured input is the normed hidden state the attention reads, not the residual stream
    assert seen[1]["input"].shape == seen[1]["output"].shape


def test_alignment_reduces_layer_loss_and_touches_only_mixers(teacher):
    student = to_hybrid(teacher, mamba_layers=[1, 2])
    frozen = {k: v.clone() for k, v in student.state_dict().items() if ".self_attn." not in k}
    held = [batch(teacher.config, 100)]
    before = relative_layer_loss(teacher, student, held)
    stats = align_mixers(teacher, student, (batch(teacher.config, i) for i in range(25)), 25, lr=3e-3)
    after = relative_layer_loss(teacher, student, held)
    assert stats.steps == 25 and stats.tokens > 0
    for i in (1, 2):
        assert after[i] < 0.6 * before[i], (before, after)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in frozen.items())


def test_alignment_through_distiller_matches_direct(family):
    """Inside `matvlm distill` the teacher is the distiller (student with the teacher's attention swapped
    in): the same batches must give the same aligned mixers as with the teacher itself."""
    teacher = tiny_llava(family)
    direct = to_hybrid(teacher, mamba_layers=[2])
    via = to_hybrid(teacher, mamba_layers=[2])
    distiller = Distiller(teacher, via, LossSettings())
    a = align_mixers(teacher, direct, (batch(teacher.config, i) for i in range(3)), 3)
    b = align_mixers(distiller, via, (batch(teacher.config, i) for i in range(3)), 3)
    assert a.history == pytest.approx(b.history, rel=1e-5)
    assert isinstance(via.model.language_model.layers[2].self_attn, type(direct.mixers()[2]))
    torch.testing.assert_close(direct.mixers()[2].in_proj.weight, via.mixers()[2].in_proj.weight)


def test_micro_batches_give_the_same_alignment_step(teacher):
    """A batch split into row chunks (long records on a GPU) takes the same step as the whole batch."""
    whole, split = to_hybrid(teacher, mamba_layers=[1]), to_hybrid(teacher, mamba_layers=[1])
    a = align_mixers(teacher, whole, [batch(teacher.config, 0)], 1, lr=3e-3)
    b = align_mixers(teacher, split, [batch(teacher.config, 0)], 1, lr=3e-3, max_batch_tokens=80)
    assert a.tokens == b.tokens and a.history == pytest.approx(b.history, rel=1e-5)
    torch.testing.assert_close(whole.mixers()[1].in_proj.weight, split.mixers()[1].in_proj.weight)


def test_alignment_rejects_bad_input(teacher):
    with pytest.raises(ValueError, match="no mixer layers"):
        align_mixers(teacher, _no_mixers(teacher), [], 1)
    with pytest.raises(ValueError, match="steps"):
        align_mixers(teacher, to_hybrid(teacher, mamba_layers=[0]), [], 0)


def _no_mixers(teacher):
    class Empty:
        def mixers(self):
            return {}
    return Empty()


def test_staged_recipe_aligns_before_the_end_to_end_loop(tiny_teacher, tmp_path):
    from matvlm.distill import distill

    from .test_distill import _cfg

    staged = distill(_cfg(tiny_teacher, tmp_path / "staged", steps=3, save_every=3, align_steps=4, align_lr=3e-3),
                     progress=False)
    single = distill(_cfg(tiny_teacher, tmp_path / "single", steps=3, save_every=3, recipe="single"), progress=False)
    assert staged["align"]["steps"] == 4 and staged["align"]["tokens"] > 0 and "align" not in single
    # the end-to-end loop starts from aligned mixers: a lower layer loss at its first step
    assert staged["history"][0][2] < single["history"][0][2]
    with pytest.raises(ValueError, match="recipe"):
        distill(_cfg(tiny_teacher, tmp_path / "bad", recipe="two"), progress=False)


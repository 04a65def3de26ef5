"""The hybrid model class: conversion output, cache, generation, padding, save/load, training mode."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

import matvlm
from matvlm.model.mixer import Mamba2Mixer
from matvlm.testing import tiny_llava

from ..conftest import greedy_no_cache, make_prompt


def banned_tokens(config):
    text = config.text_config
    return [config.image_token_index, text.eos_token_id, text.bos_token_id, text.pad_token_id]


@pytest.fixture
def hybrid(teacher):
    return matvlm.to_hybrid(teacher, ratio=0.5, chunk_size=8).eval()


def test_non_mixer_weights_are_bit_identical(teacher, hybrid):
    t_state = teacher.state_dict()
    mixer_prefixes = tuple(f"model.language_model.layers.{i}.self_attn." for i in hybrid.config.mamba_layers)
    checked = 0
    for name, tensor in hybrid.state_dict().items():
        if name.startswith(mixer_prefixes):
            continue
        assert torch.equal(tensor, t_state[name]), name
        assert tensor.data_ptr() != t_state[name].data_ptr(), f"{name} shares memory with the teacher"
        checked += 1
    assert checked > 20
    for i in hybrid.config.mamba_layers:
        assert isinstance(hybrid.model.language_model.layers[i].self_attn, Mamba2Mixer)
    assert hybrid.config.text_config.layer_types == [
        "linear_attention" if i in hybrid.config.mamba_layers else "full_attention" for i in range(4)
    ]


def test_mixer_init_copies_attention_slices(teacher, hybrid):
    for i, mixer in hybrid.mixers().items():
        attn = teacher.model.language_model.layers[i].self_attn
        inner, gn = mixer.inner_size, mixer.num_groups * mixer.state_size
        w = mixer.in_proj.weight
        rep = mixer.num_heads * mixer.head_dim // attn.k_proj.weight.shape[0]
        kv = lambda t: t.unflatten(0, (-1, mixer.head_dim)).repeat_interleave(rep, 0).flatten(0, 1)  # noqa: E731
        assert torch.equal(w[inner : 2 * inner], kv(attn.v_proj.weight))
        assert torch.equal(w[2 * inner : 2 * inner + gn], kv(attn.k_proj.weight))
        assert torch.equal(w[2 * inner + gn : 2 * inner + 2 * gn], attn.q_proj.weight)
        out = attn.dense if hasattr(attn, "dense") else attn.o_proj
        assert torch.equal(mixer.out_proj.weight, out.weight)
        assert w.shape[0] == 2 * inner + 2 * gn + mixer.num_heads  # [z | x | B | C | dt]
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert (dt > 0.9e-4).all() and (dt < 0.11).all()
        assert (torch.exp(mixer.A_log) >= 1).all() and (torch.exp(mixer.A_log) <= 16).all()
        assert torch.equal(mixer.D, torch.ones_like(mixer.D))


def test_gqa_teacher_repeats_kv_rows(family):
    if family != "llama":
        pytest.skip("GQA is the llama family")
    t = tiny_llava("llama", num_heads=4, num_kv_heads=2)
    h = matvlm.to_hybrid(t, mamba_layers=[1])
    attn, mixer = t.model.language_model.layers[1].self_attn, h.mixers()[1]
    k = attn.k_proj.weight.view(2, mixer.head_dim, -1)
    inner = mixer.inner_size
    B_rows = mixer.in_proj.weight[2 * inner : 3 * inner].view(4, mixer.head_dim, -1)
    # query heads 0,1 use KV head 0; heads 2,3 use KV head 1
    for head, kv_head in enumerate([0, 0, 1, 1]):
        assert torch.equal(B_rows[head], k[kv_head])


def test_bias_and_identity_conv_options(teacher):
    h = matvlm.to_hybrid(teacher, mamba_layers=[1], attn_bias=True, conv_init="identity")
    attn, mixer = teacher.model.language_model.layers[1].self_attn, h.mixers()[1]
    inner = mixer.inner_size
    if attn.q_proj.bias is not None:
        assert torch.equal(mixer.in_proj.bias[3 * inner : 4 * inner], attn.q_proj.bias)
    else:
        assert torch.equal(mixer.in_proj.bias, torch.zeros_like(mixer.in_proj.bias))
    assert torch.equal(mixer.in_proj.bias[:inner], torch.zeros(inner))  # z rows
    w = mixer.conv1d.weight
    assert torch.equal(w[:, 0, -1], torch.ones(w.shape[0])) and w[:, 0, :-1].abs().sum() == 0
    default = matvlm.to_hybrid(teacher, mamba_layers=[1]).mixers()[1]
    assert default.in_proj.bias is None and default.out_proj.bias is None
    assert default.conv1d.weight[:, 0, :-1].abs().sum() > 0


def test_save_load_round_trip_through_auto_class(hybrid, tmp_path):
    hybrid.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "matvlm"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is matvlm.MaTVLMForConditionalGeneration
    assert loaded.config.mamba_layers == hybrid.config.mamba_layers
    ids, px = make_prompt(hybrid.config, [5, 6, 7, 8, 9])
    with torch.no_grad():
        a = hybrid(input_ids=ids, pixel_values=px).logits
        b = loaded(input_ids=ids, pixel_values=px).logits
    assert torch.equal(a, b)


def test_prefill_plus_steps_equals_full_forward(hybrid):
    ids, px = make_prompt(hybrid.config, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
    n_prefill = ids.shape[1] - 6
    with torch.no_grad():
        full = hybrid(input_ids=ids, pixel_values=px, use_cache=False).logits
        out = hybrid(input_ids=ids[:, :n_prefill], pixel_values=px, use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(n_prefill, ids.shape[1]):
            out = hybrid(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_cached_generate_equals_no_cache_greedy_loop(hybrid):
    ids, px = make_prompt(hybrid.config, [5, 6, 7, 8])
    banned = banned_tokens(hybrid.config)
    out = hybrid.generate(
        input_ids=ids, pixel_values=px, max_new_tokens=12, do_sample=False,
        suppress_tokens=banned, attention_mask=torch.ones_like(ids),
    )
    ref = greedy_no_cache(hybrid, ids, px, 12, banned)
    assert torch.equal(out[:, ids.shape[1]:], ref)


def test_left_padded_batch_equals_one_by_one(hybrid):
    config = hybrid.config
    prompts = [make_prompt(config, [5, 6, 7, 8, 9, 10, 11, 12], seed=0), make_prompt(config, [13, 14], seed=1)]
    pad = 3  # an ordinary token: its embedding is not zero, so pads that leak in would show
    width = max(p[0].shape[1] for p in prompts)
    ids = torch.full((2, width), pad)
    mask = torch.zeros((2, width), dtype=torch.long)
    for row, (p_ids, _) in enumerate(prompts):
        ids[row, width - p_ids.shape[1]:] = p_ids[0]
        mask[row, width - p_ids.shape[1]:] = 1
    pixels = torch.cat([p[1] for p in prompts])
    banned = banned_tokens(config)
    kw = dict(max_new_tokens=10, do_sample=False, suppress_tokens=banned, output_scores=True, return_dict_in_generate=True)
    batched = hybrid.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, **kw)
    for row, (p_ids, p_px) in enumerate(prompts):
        alone = hybrid.generate(input_ids=p_ids, pixel_values=p_px, attention_mask=torch.ones_like(p_ids), **kw)
        assert torch.equal(batched.sequences[row, width:], alone.sequences[0, p_ids.shape[1]:])
        for s_b, s_a in zip(batched.scores, alone.scores):
            torch.testing.assert_close(s_b[row], s_a[0], rtol=1e-4, atol=1e-4)


def test_padding_mask_reaches_mixers(hybrid):
    """Without the padding mask the mixers would see pads: the logits of the real tokens change."""
    ids, px = make_prompt(hybrid.config, [5, 6, 7])
    pad = 3  # an ordinary token with a non-zero embedding
    padded = torch.cat([torch.full((1, 3), pad), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        alone = hybrid(input_ids=ids, pixel_values=px).logits
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        masked = hybrid(input_ids=padded, pixel_values=px, attention_mask=mask, position_ids=position_ids).logits[:, 3:]
        unmasked_pad = hybrid(
            input_ids=padded, pixel_values=px, attention_mask=torch.ones_like(padded), position_ids=position_ids
        ).logits[:, 3:]
    torch.testing.assert_close(masked, alone, rtol=1e-4, atol=1e-5)
    assert (unmasked_pad - alone).abs().max() > 1e-3


def test_eval_turns_dropout_off_and_train_mode_uses_it(family):
    t = tiny_llava(family)
    t.config.text_config.attention_dropout = 0.5
    for name in ("resid_pdrop", "embd_pdrop"):
        if hasattr(t.config.text_config, name):
            setattr(t.config.text_config, name, 0.5)
    t = type(t)(t.config)
    h = matvlm.to_hybrid(t, ratio=0.5)
    ids, px = make_prompt(h.config, [5, 6, 7])
    h.eval()
    with torch.no_grad():
        a, b = (h(input_ids=ids, pixel_values=px).logits for _ in range(2))
    assert torch.equal(a, b)
    assert not any(m.training for m in h.modules())
    if family == "phi":  # Phi has residual dropout in every layer; Llama only on attention weights
        h.train()
        with torch.no_grad():
            c = h(input_ids=ids, pixel_values=px).logits
        assert not torch.equal(a, c)


def test_gradient_checkpointing_gives_same_gradients(hybrid):
    ids, px = make_prompt(hybrid.config, [5, 6, 7, 8, 9])
    labels = ids.clone()
    labels[:, : -5] = -100

    def grads(checkpointing):
        hybrid.zero_grad()
        if checkpointing:
            hybrid.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hybrid.activation_checkpointing_disable()
        hybrid.train()
        loss = hybrid(input_ids=ids, pixel_values=px, labels=labels, use_cache=False).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in hybrid.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    mixer_grads = [n for n in plain if ".self_attn.in_proj" in n]
    assert mixer_grads and plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6)

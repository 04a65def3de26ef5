"""The fast generation engine against transformers' generate(), one-by-one runs and hand-made references."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

import matvlm
from matvlm.data.llava import build_image_processor
from matvlm.data.records import BadImageError
from matvlm.data.tokenizer import train_tokenizer
from matvlm.engine import (
    Engine,
    SamplingParams,
    cache_bytes,
    generate_command,
    next_tokens,
)
from matvlm.engine.engine import check_text_config
from matvlm.engine.sampling import filter_logits
from matvlm.io import load_vlm
from matvlm.testing import tiny_llava, tiny_llava_config

from ..conftest import make_prompt

PAD = 3  # an ordinary token: its embedding is not zero, so pads that leak into a state would show



def banned_tokens(config):
    return [config.image_token_index, config.text_config.eos_token_id]


@pytest.fixture(scope="module", params=[("phi", "teacher"), ("phi", "hybrid"), ("llama", "teacher"), ("llama", "hybrid")],
                ids=lambda p: "-".join(p))
def model(request):
    family, kind = request.param
    teacher = tiny_llava(family)
    return teacher if kind == "teacher" else matvlm.to_hybrid(teacher, ratio=0.5, chunk_size=8).eval()


@pytest.fixture(scope="module")
def hybrid():
    """One model for the tests of decoding logic (sampling, stop tokens, streaming): GQA teacher + mixers."""
    return matvlm.to_hybrid(tiny_llava("llama"), ratio=0.5, chunk_size=8).eval()


def left_padded(config, prompts):
    """Batch prompts [(ids, pixels or None)] with left padding; pixel_values only for the rows with one."""
    width = max(ids.shape[1] for ids, _ in prompts)
    input_ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (ids, _) in enumerate(prompts):
        input_ids[row, width - ids.shape[1]:] = ids[0]
        mask[row, width - ids.shape[1]:] = 1
    pixels = [px for _, px in prompts if px is not None]
    return input_ids, mask, torch.cat(pixels) if pixels else None


def three_prompts(config):
    return [
        make_prompt(config, [5, 6, 7, 8, 9, 10, 11, 12], seed=0),
        make_prompt(config, [13, 14], seed=1),
        make_prompt(config, [15, 16, 17], image=False),
    ]


# ---------------------------------------------------------------------------------------------- correctness
def test_greedy_equals_hf_generate(model):
    """Tokens and raw logits of every step equal transformers' generate() with its dynamic cache.
    Small KV buckets make the run cross bucket boundaries (16 -> 32 -> 64 slots)."""
    config = model.config
    ids, px = make_prompt(config, [5, 6, 7, 8])
    banned = banned_tokens(config)
    ref = model.generate(
        input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False,
        suppress_tokens=banned, output_logits=True, return_dict_in_generate=True,
    )
    engine = Engine(model, max_batch_size=2, max_seq_len=64, min_kv_bucket=16)
    assert engine.buckets == [16, 32, 64] and ids.shape[1] < 32 < ids.shape[1] + 14
    out = engine.generate(ids, pixel_values=px, max_new_tokens=14, suppress_tokens=banned, return_logits=True)
    assert torch.equal(out.tokens[0], ref.sequences[0, ids.shape[1]:])
    torch.testing.assert_close(out.logits, torch.stack(ref.logits, dim=1), rtol=1e-4, atol=1e-4)
    assert out.lengths.tolist() == [14] and out.decode_steps == 13
    assert out.prefill_seconds > 0 and out.decode_tokens_per_s > 0


def test_left_padded_batch_equals_each_prompt_alone(model):
    config = model.config
    prompts = three_prompts(config)
    ids, mask, pixels = left_padded(config, prompts)
    banned = banned_tokens(config)
    engine = Engine(model, max_batch_size=4, max_seq_len=64, min_kv_bucket=16)
    batched = engine.generate(ids, mask, pixels, max_new_tokens=8, suppress_tokens=banned, return_logits=True)
    for row, (p_ids, p_px) in enumerate(prompts):
        alone = engine.generate(p_ids, None, p_px, max_new_tokens=8, suppress_tokens=banned, return_logits=True)
        assert torch.equal(batched.tokens[row], alone.tokens[0]), row
        torch.testing.assert_close(batched.logits[row], alone.logits[0], rtol=1e-4, atol=1e-4)


def test_mixer_sees_no_padding(model):
    """The batched state must not depend on the pad token: a different pad id gives the same logits."""
    config = model.config
    ids, mask, pixels = left_padded(config, three_prompts(config))
    engine = Engine(model, max_batch_size=3, max_seq_len=48)
    a = engine.generate(ids, mask, pixels, max_new_tokens=4, suppress_tokens=banned_tokens(config), return_logits=True)
    other = torch.where(mask.bool(), ids, torch.full_like(ids, 40))
    b = engine.generate(other, mask, pixels, max_new_tokens=4, suppress_tokens=banned_tokens(config), return_logits=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_seeded_and_limits_equal_greedy(hybrid):
    config = hybrid.config
    ids, mask, pixels = left_padded(config, three_prompts(config))
    engine = Engine(hybrid, max_batch_size=3, max_seq_len=64)
    kw = dict(max_new_tokens=8, suppress_tokens=banned_tokens(config))
    greedy = engine.generate(ids, mask, pixels, **kw).tokens
    s1 = engine.generate(ids, mask, pixels, temperature=1.0, seed=7, **kw).tokens
    s2 = engine.generate(ids, mask, pixels, temperature=1.0, seed=7, **kw).tokens
    s3 = engine.generate(ids, mask, pixels, temperature=1.0, seed=8, **kw).tokens
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3) and not torch.equal(s1, greedy)  # 24 draws over ~126 tokens
    assert torch.equal(engine.generate(ids, mask, pixels, temperature=1e-5, seed=1, **kw).tokens, greedy)
    assert torch.equal(engine.generate(ids, mask, pixels, temperature=1.0, top_p=1e-6, seed=1, **kw).tokens, greedy)
    assert torch.equal(engine.generate(ids, mask, pixels, temperature=2.0, top_k=1, seed=1, **kw).tokens, greedy)


def test_sampler_frequencies_follow_filtered_distribution():
    """Draw counts match the distribution renormalised over the top-p / top-k set (independent reference)."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log().repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    cases = [
        (SamplingParams(temperature=1.0), probs),
        (SamplingParams(temperature=1.0, top_p=0.7), torch.tensor([0.4, 0.25, 0.15, 0, 0, 0])),  # 0.65 < 0.7
        (SamplingParams(temperature=1.0, top_k=2), torch.tensor([0.4, 0.25, 0, 0, 0, 0])),
        (SamplingParams(temperature=0.5), probs**2),
    ]
    for params, expected in cases:
        expected = expected / expected.sum()
        counts = torch.bincount(next_tokens(logits, params, gen), minlength=6).float() / logits.shape[0]
        assert (counts - expected).abs().max() < 0.015, (params, counts, expected)
    assert torch.equal(filter_logits(torch.tensor([[0.0, 1.0, 2.0]]), top_p=1e-9), torch.tensor([[-float("inf"), -float("inf"), 2.0]]))


# ---------------------------------------------------------------------------------------------- stop, stream
def test_stop_tokens_end_rows_early_and_others_continue(hybrid):
    config = hybrid.config
    ids, mask, pixels = left_padded(config, three_prompts(config))
    engine = Engine(hybrid, max_batch_size=3, max_seq_len=64)
    kw = dict(max_new_tokens=12, suppress_tokens=banned_tokens(config))
    free = engine.generate(ids, mask, pixels, **kw).tokens
    stop = int(free[0, 2])
    out = engine.generate(ids, mask, pixels, stop_token_ids=[stop], **kw)
    for row in range(3):
        seq = free[row].tolist()
        n = seq.index(stop) + 1 if stop in seq else 12
        assert out.lengths[row] == n and out.tokens[row, :n].tolist() == seq[:n]
        assert (out.tokens[row, n:] == engine.pad_token_id).all()
    assert out.lengths[0] <= 3 and out.sequences()[0][-1] == stop
    # every row stops at its first token: the loop ends early (checked each step with check_every=1)
    firsts = free[:, 0].tolist()
    out = engine.generate(ids, mask, pixels, stop_token_ids=firsts, check_every=1, **kw)
    assert out.tokens.shape == (3, 1) and out.lengths.tolist() == [1, 1, 1]


def test_eos_stops_unless_disabled():
    model = tiny_llava("phi")
    config = model.config
    ids, px = make_prompt(config, [5, 6, 7])
    engine = Engine(model, max_batch_size=1, max_seq_len=48)
    free = engine.generate(ids, None, px, max_new_tokens=10, stop_at_eos=False, suppress_tokens=[config.image_token_index])
    first = int(free.tokens[0, 0])
    model.generation_config.eos_token_id = first  # the model's own end token now is what it says first
    engine = Engine(model, max_batch_size=1, max_seq_len=48)
    assert engine.generate(ids, None, px, max_new_tokens=10).lengths.tolist() == [1]
    assert engine.generate(ids, None, px, max_new_tokens=10, stop_at_eos=False).lengths.tolist() == [10]


def test_streaming_yields_the_same_tokens(hybrid):
    config = hybrid.config
    ids, mask, pixels = left_padded(config, three_prompts(config))
    engine = Engine(hybrid, max_batch_size=3, max_seq_len=64)
    kw = dict(max_new_tokens=6, suppress_tokens=banned_tokens(config), temperature=0.8, seed=3)
    whole = engine.generate(ids, mask, pixels, **kw)
    stream = engine.generate(ids, mask, pixels, stream=True, **kw)
    steps = list(stream)
    assert len(steps) == 6 and all(s.shape == (3,) for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), whole.tokens)
    assert torch.equal(stream.result.tokens, whole.tokens)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_give_clear_errors():
    model = tiny_llava("llama")
    config = model.config
    ids, px = make_prompt(config, [5, 6, 7])  # 1 + 16 image tokens + 3
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    cases = [
        (dict(max_new_tokens=20), r"prompt of 20 tokens .* 20 new tokens needs 39 cache slots.*max_seq_len=32"),
        (dict(input_ids=ids.repeat(3, 1), pixel_values=px.repeat(3, 1, 1, 1)), r"batch of 3 prompts .* max_batch_size=2"),
        (dict(temperature=-0.5), r"temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), r"top_k must be an integer >= 0"),
        (dict(stop_token_ids=[5, 999]), r"stop_token_ids \[999\] not in the vocabulary \(ids 0..127\)"),
        (dict(stop_token_ids=[-1]), r"stop_token_ids \[-1\] not in the vocabulary"),
        (dict(suppress_tokens=[128]), r"suppress_tokens \[128\]"),
        (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1"),
        (dict(pixel_values=torch.randn(1, 3, 64, 64)), r"pixel_values has shape \(1, 3, 64, 64\).*\(images, 3, 32, 32\)"),
        (dict(pixel_values=torch.randn(1, 1, 32, 32)), r"pixel_values has shape .*RGB"),
        (dict(pixel_values=None), r"16 image tokens \(1 images\) but 0 images were given"),
        (dict(pixel_values=px.repeat(2, 1, 1, 1)), r"but 2 images were given"),
        (dict(attention_mask=torch.cat([torch.ones(1, 19), torch.zeros(1, 1)], 1).long()), r"left-padded.*rows \[0\]"),
        (dict(input_ids=ids.clone().fill_(500)), r"outside the vocabulary"),
    ]
    for change, message in cases:
        kw = dict(input_ids=ids, pixel_values=px, max_new_tokens=4) | change
        with pytest.raises(ValueError, match=message):
            engine.generate(**kw)
    with pytest.raises(ValueError, match="use_cuda_graph=True needs a CUDA model"):
        Engine(model, use_cuda_graph=True)
    with pytest.raises(TypeError, match="not a Llava-style model"):
        Engine(torch.nn.Linear(2, 2))
    windowed = SimpleNamespace(sliding_window=16, rope_parameters={"rope_type": "default"})
    with pytest.raises(ValueError, match=r"sliding-window attention \(16 tokens\) and max_seq_len=32"):
        check_text_config(windowed, 32, cuda_graph=False)
    with pytest.raises(ValueError, match="use_cuda_graph=False"):
        check_text_config(SimpleNamespace(rope_parameters={"rope_type": "dynamic"}), 32, cuda_graph=True)
    assert engine.generate(ids, pixel_values=px, max_new_tokens=13).tokens.shape == (1, 13)  # exactly fills 32 slots


# ---------------------------------------------------------------------------------------------- memory
def test_cache_bytes_counts_kv_and_mixer_state(family):
    teacher = tiny_llava(family)
    hybrid = matvlm.to_hybrid(teacher, ratio=0.5)
    text = teacher.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    kv_heads = text.num_key_value_heads
    per_layer_kv = lambda batch, seq, item: 2 * batch * kv_heads * seq * head_dim * item
    t = cache_bytes(teacher, batch=3, seq_len=100, dtype=torch.bfloat16)
    assert t.kv == 4 * per_layer_kv(3, 100, 2) and t.mixer == 0
    h = cache_bytes(hybrid, batch=3, seq_len=100, dtype=torch.bfloat16)
    mixer = hybrid.mixers()[0]
    conv_dim = 3 * text.hidden_size  # x | B | C at full width, one group per head, state = head dim
    per_mixer = 3 * (conv_dim * 4 * 2 + text.num_attention_heads * head_dim * head_dim * 4)
    assert mixer.conv_dim == conv_dim
    assert h.kv == 2 * per_layer_kv(3, 100, 2) and h.mixer == 2 * per_mixer and h.total == h.kv + h.mixer
    assert cache_bytes(hybrid, 3, 10_000, torch.bfloat16).mixer == h.mixer  # fixed size, whatever the length
    for m in (teacher, hybrid):
        assert Engine(m, max_batch_size=3, max_seq_len=100).cache_nbytes() == cache_bytes(m, 3, 100)


# ---------------------------------------------------------------------------------------------- text and CLI function
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny teacher directory as `matvlm teacher` writes it (weights, tokenizer, processor, matvlm.json) and its hybrid."""
    root = tmp_path_factory.mktemp("engine")
    texts = ["What colour is the square? It is red.", "How many circles are there? There are 3 circles."] * 20
    tok = train_tokenizer(texts, vocab_size=300, template="phi")
    config = tiny_llava_config("phi", vocab_size=len(tok))
    config.image_token_index = tok.image_token_id
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, name, tok.eos_token_id)
    torch.manual_seed(0)
    teacher = LlavaForConditionalGeneration(config).eval()
    teacher.generation_config.eos_token_id = tok.eos_token_id
    processor = LlavaProcessor(image_processor=build_image_processor(32), tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="full", chat_template=tok.chat_template)
    dirs = {"teacher": root / "teacher", "hybrid": root / "hybrid"}
    for kind, m in (("teacher", teacher), ("hybrid", matvlm.to_hybrid(teacher, ratio=0.5))):
        m.save_pretrained(dirs[kind])
        processor.save_pretrained(dirs[kind])
        (dirs[kind] / "matvlm.json").write_text(json.dumps({"template": "phi"}))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8), mode="L").save(root / "grey.png")
    Image.fromarray(rng.random((20, 20), dtype=np.float32), mode="F").save(root / "float.tiff")
    return dirs, root, processor


@pytest.mark.parametrize("kind", ["teacher", "hybrid"])
def test_generate_command_and_generate_text(model_dirs, kind):
    dirs, root, processor = model_dirs
    res = generate_command(dirs[kind], root / "rgb.png", "What colour is the square?", max_new_tokens=8, device="cpu")
    assert res["template"] == "phi" and res["dtype"] == "float32" and not res["cuda_graph"]
    assert 1 <= res["new_tokens"] <= 8 and res["decode_tokens_per_s"] >= 0
    pieces = []
    streamed = generate_command(dirs[kind], root / "rgb.png", "What colour is the square?", max_new_tokens=8,
                                device="cpu", stream=True, write=pieces.append)
    assert streamed["tokens"] == res["tokens"] and "".join(pieces).strip() == res["text"]
    # the same answer through generate_text in a batch with another (longer, grey) prompt
    model = load_vlm(dirs[kind])
    engine = Engine(model, max_batch_size=2, max_seq_len=256)
    both = engine.generate_text(processor, [root / "rgb.png", root / "grey.png"],
                                ["What colour is the square?", "How many circles are there in this picture?"],
                                template="phi", max_new_tokens=8)
    assert both.texts[0] == res["text"] and both.output.sequences()[0] == res["tokens"]


def test_generate_command_errors(model_dirs):
    dirs, root, _ = model_dirs
    with pytest.raises(BadImageError, match="mode F"):
        generate_command(dirs["teacher"], root / "float.tiff", "What is it?", device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.png not found"):
        generate_command(dirs["teacher"], root / "missing.png", "What is it?", device="cpu")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        generate_command(dirs["teacher"], root / "rgb.png", "What is it?", device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="top_p must be"):
        generate_command(dirs["teacher"], root / "rgb.png", "What is it?", device="cpu", top_p=2.0)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        generate_command(root, root / "rgb.png", "What is it?", device="cpu")


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(model, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = type(model)(model.config).to("cuda", dtype).eval()
    m.load_state_dict(model.state_dict())
    config = m.config
    ids, mask, pixels = left_padded(config, three_prompts(config))
    kw = dict(max_new_tokens=40, suppress_tokens=banned_tokens(config), return_logits=True)
    eager = Engine(m, max_batch_size=4, max_seq_len=96, use_cuda_graph=False, min_kv_bucket=16)
    graph = Engine(m, max_batch_size=4, max_seq_len=96, use_cuda_graph=True, min_kv_bucket=16)
    a = eager.generate(ids, mask, pixels, **kw)
    b = graph.generate(ids, mask, pixels, **kw)
    assert len(graph._graphs) == len(graph.buckets)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    c = graph.generate(ids, mask, pixels, temperature=1.0, seed=5, **kw)  # sampling, graphs replayed again
    d = eager.generate(ids, mask, pixels, temperature=1.0, seed=5, **kw)
    assert torch.equal(c.tokens, d.tokens)
    if dtype == torch.float32:  # and the GPU engine still equals transformers' generate on a single prompt
        p_ids, p_px = three_prompts(config)[0]
        ref = m.generate(input_ids=p_ids.cuda(), pixel_values=p_px.cuda(), attention_mask=torch.ones_like(p_ids).cuda(),
                         max_new_tokens=40, do_sample=False, suppress_tokens=banned_tokens(config))
        assert torch.equal(graph.generate(p_ids, None, p_px, **kw).tokens[0], ref[0, p_ids.shape[1]:].cpu())


def test_timing_decode_steps_at_a_context(hybrid):
    engine = Engine(hybrid, max_batch_size=2, max_seq_len=64, use_cuda_graph=False)
    seconds = engine.time_decode_steps(batch=2, context=40, steps=4, token_id=5)
    assert seconds > 0 and engine.positions[:2].tolist() == [40 + 2 + 4] * 2  # warm-up steps, then the timed ones
    with pytest.raises(ValueError, match="exceed max_seq_len 64"):
        engine.time_decode_steps(batch=1, context=60, steps=4, token_id=5)


@pytest.mark.slow
def test_compiled_decode_step_equals_eager(hybrid):
    """torch.compile of the decode step (what the GPU graphs capture with compile_step) changes no token."""
    config = hybrid.config
    ids, mask, pixels = left_padded(config, three_prompts(config))
    kw = dict(max_new_tokens=12, suppress_tokens=banned_tokens(config), return_logits=True)
    eager = Engine(hybrid, max_batch_size=4, max_seq_len=64, use_cuda_graph=False, min_kv_bucket=32)
    compiled = Engine(hybrid, max_batch_size=4, max_seq_len=64, use_cuda_graph=False, min_kv_bucket=32, compile_step=True)
    a, b = eager.generate(ids, mask, pixels, **kw), compiled.generate(ids, mask, pixels, **kw)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["phi", "llama"])
def test_compiled_cuda_graph_decode_equals_eager(family):
    """Supported on CUDA: one sequence, one KV bucket (what the decode benchmark measures)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hybrid = matvlm.to_hybrid(tiny_llava(family), ratio=0.5, chunk_size=8).eval()
    m = type(hybrid)(hybrid.config).to("cuda", torch.float32).eval()
    m.load_state_dict(hybrid.state_dict())
    ids, px = make_prompt(m.config, [5, 6, 7, 8])
    kw = dict(max_new_tokens=40, suppress_tokens=banned_tokens(m.config), return_logits=True)
    eager = Engine(m, max_batch_size=1, max_seq_len=96, use_cuda_graph=False, min_kv_bucket=96)
    graph = Engine(m, max_batch_size=1, max_seq_len=96, use_cuda_graph=True, min_kv_bucket=96, compile_step=True)
    a, b = eager.generate(ids, None, px, **kw), graph.generate(ids, None, px, **kw)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(NotImplementedError, match="one KV bucket"):
        Engine(m, max_batch_size=2, max_seq_len=96, use_cuda_graph=True, compile_step=True)

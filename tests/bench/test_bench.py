"""`matvlm bench` on the CPU with the tiny shape: the result file, the floors and cache sizes against hand
calculations, the plots, both engines, and the batch sweep's out-of-memory handling."""

import json

import pytest
import torch

import matvlm
from matvlm import bench
import matvlm.bench.measure  # noqa: F401  (monkeypatched below)
from matvlm.bench import (
    build_teacher,
    bytes_per_decode_step,
    decode_weight_bytes,
    floor_generation_tokens_per_s,
    floor_tokens_per_s,
    headline_table,
    run_bench,
    throughput_vs_batch,
)
from matvlm.engine import cache_bytes

# The tiny bench shape: Phi, hidden 64, 4 heads of 16, MHA, 8 layers, MLP 128, vocab 128, 16 image tokens.
H, HEADS, HEAD_DIM, LAYERS, MLP, VOCAB, IMAGE_TOKENS = 64, 4, 16, 8, 128, 128, 16
PROMPT = 1 + IMAGE_TOKENS + 32  # BOS + image + the default 32 text tokens
CONV_DIM = H + 2 * HEADS * HEAD_DIM  # x | B | C (expand 1, one group per head, state = head dim)
MIXER_STATE = CONV_DIM * 4 * 4 + HEADS * HEAD_DIM * HEAD_DIM * 4  # float32 conv window (kernel 4) + float32 SSM
KV_PER_TOKEN_PER_LAYER = 2 * HEADS * HEAD_DIM * 4  # keys + values, float32
COMMAND = "matvlm bench --shape tiny (test)"


SETTINGS = dict(ratios=(0.5,), lengths=(16, 32, 64), hf_max_length=32, contexts=(32, 64), memory_lengths=(16, 256),
                batches=(1, 2), batch_context=32, decode_steps=4, ttft_repeats=2, memory_decode_tokens=4,
                concurrent_length=256, memory_gib=0.01)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    messages = []
    results = run_bench(out, shape="tiny", device="cpu", merge=False, command=COMMAND, log=messages.append, **SETTINGS)
    return out, results, messages


@pytest.fixture(scope="module")
def tiny_models():
    teacher = build_teacher("tiny", "cpu", torch.float32)
    return teacher, matvlm.to_hybrid(teacher, ratio=0.5).eval()


def test_result_file_has_every_part_and_the_device(run):
    out, _, messages = run
    saved = json.loads((out / "bench_cpu.json").read_text())
    assert saved["device"] == "cpu" and saved["shape"] == "tiny" and saved["dtype"] == "float32"
    assert saved["torch"] == torch.__version__ and saved["transformers"]
    assert saved["runs"][-1]["command"] == COMMAND
    assert saved["runs"][-1]["settings"]["lengths"] == [16, 32, 64]
    assert saved["bandwidth_gb_s"] > 0
    assert list(saved["models"]) == ["teacher", "hybrid-0.5"]
    assert saved["models"]["hybrid-0.5"]["mixer_layers"] == [0, 2, 4, 6]
    for part in ("decode", "memory", "batch", "ttft"):
        assert set(saved[part]) == {"teacher", "hybrid-0.5"}, part
    for name in ("teacher", "hybrid-0.5"):
        assert set(saved["decode"][name]) == {"matvlm", "hf", "at_context"}
        assert set(saved["ttft"][name]) == {"matvlm", "hf"}
    assert (out / "bench_cpu.md").read_text().startswith("| model |")
    assert any("teacher" in m for m in messages) and any("hybrid-0.5" in m for m in messages)


def test_both_engines_run_and_speeds_are_positive(run):
    _, results, _ = run
    for name in ("teacher", "hybrid-0.5"):
        decode = results["decode"][name]
        assert decode["matvlm"]["lengths"] == [16, 32, 64]
        assert decode["hf"]["lengths"] == [16, 32]  # HF only up to hf_max_length
        for engine in ("matvlm", "hf"):
            r = decode[engine]
            assert r["prompt_tokens"] == PROMPT
            assert all(v > 0 for v in r["tokens_per_s"] + r["window_tokens_per_s"])
            assert all(0 < v < f for v, f in zip(r["tokens_per_s"], r["floor_tokens_per_s"]))
            assert r["peak_bytes"] is None  # CPU
        assert decode["matvlm"]["run_tokens_per_s"] > 0
        assert all(v > 0 for v in decode["at_context"]["tokens_per_s"])
        batch = results["batch"][name]
        assert batch["batches"] == [1, 2] and all(v > 0 for v in batch["tokens_per_s"])
        assert batch["oom_at"] is None and batch["max_batch"] == 2
        for engine in ("matvlm", "hf"):
            assert results["ttft"][name][engine]["seconds"] > 0
            assert results["ttft"][name][engine]["prompt_tokens"] == 1 + IMAGE_TOKENS + 100


def test_hybrid_cache_is_smaller_by_the_replaced_layers(run, tiny_models):
    _, results, _ = run
    teacher_row = results["memory"]["teacher"]["rows"][-1]
    hybrid_row = results["memory"]["hybrid-0.5"]["rows"][-1]
    slots = PROMPT + 256
    assert teacher_row["length"] == 256 and teacher_row["cache_slots"] == slots and teacher_row["peak_bytes"] is None
    # Hand: teacher keeps KV in 8 layers; the hybrid in 4, plus 4 fixed mixer states.
    assert teacher_row["cache_bytes"] == LAYERS * KV_PER_TOKEN_PER_LAYER * slots
    assert hybrid_row["cache_bytes"] == 4 * KV_PER_TOKEN_PER_LAYER * slots + 4 * MIXER_STATE
    assert teacher_row["cache_bytes"] - hybrid_row["cache_bytes"] == 4 * KV_PER_TOKEN_PER_LAYER * slots - 4 * MIXER_STATE
    teacher, hybrid = tiny_models
    assert hybrid_row["cache_bytes"] == cache_bytes(hybrid, 1, slots).total  # the engine allocated what cache_bytes says
    assert teacher_row["cache_bytes"] == cache_bytes(teacher, 1, slots).total
    # The models' summary: the same formula at the concurrent length.
    info = results["models"]
    assert info["hybrid-0.5"]["cache_bytes_at_concurrent_length"] == 4 * KV_PER_TOKEN_PER_LAYER * 256 + 4 * MIXER_STATE
    assert info["hybrid-0.5"]["concurrent_sequences"] > info["teacher"]["concurrent_sequences"]


def test_floor_against_a_hand_count(tiny_models):
    teacher, hybrid = tiny_models
    # Decode weights, by hand: per layer q/k/v/dense with biases, fc1/fc2 with biases, one LayerNorm;
    # then the final LayerNorm and lm_head (no bias). The embedding table is not read by a decode step.
    attention = 4 * (H * H + H)
    per_layer = attention + (H * MLP + MLP) + (MLP * H + H) + 2 * H
    teacher_weights = 4 * (LAYERS * per_layer + 2 * H + VOCAB * H)
    assert decode_weight_bytes(teacher) == teacher_weights
    # A mixer: in_proj [z|x|B|C|dt] without bias, conv with bias, dt_bias / A_log / D, gated norm, out_proj.
    mixer = (4 * H + HEADS) * H + (CONV_DIM * 4 + CONV_DIM) + 3 * HEADS + H + H * H
    hybrid_weights = teacher_weights + 4 * 4 * (mixer - attention)
    assert decode_weight_bytes(hybrid) == hybrid_weights

    context, batch, bandwidth = 100, 3, 50.0  # GB/s
    teacher_step = teacher_weights + batch * LAYERS * KV_PER_TOKEN_PER_LAYER * context
    hybrid_step = hybrid_weights + batch * (4 * KV_PER_TOKEN_PER_LAYER * context + 2 * 4 * MIXER_STATE)
    assert bytes_per_decode_step(teacher, context, batch) == teacher_step
    assert floor_tokens_per_s(teacher, context, batch, bandwidth) == pytest.approx(batch * 50e9 / teacher_step)
    assert floor_tokens_per_s(hybrid, context, batch, bandwidth) == pytest.approx(batch * 50e9 / hybrid_step)

    # A generation's floor: the sum of its steps' bytes, step s attending to prompt + s keys.
    prompt, new = 49, 40
    total = sum(bytes_per_decode_step(hybrid, prompt + s, 1) for s in range(1, new))
    assert floor_generation_tokens_per_s(hybrid, prompt, new, bandwidth) == pytest.approx((new - 1) * 50e9 / total)


def test_plots_are_written(run):
    out, results, _ = run
    assert results["plots"] == ["bench_cpu_decode.png", "bench_cpu_memory.png", "bench_cpu_batch.png"]
    for name in results["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_headline_table(run):
    _, results, _ = run
    table = headline_table(results)
    lines = table.splitlines()
    assert "tokens/s @ 32" in lines[0] and "tokens/s @ 64" in lines[0] and "cache @ 256" in lines[0]
    teacher = next(line for line in lines if line.startswith("| teacher |"))
    hybrid = next(line for line in lines if line.startswith("| hybrid-0.5 |"))
    assert teacher.count("1.00x") == 5  # every ratio of the teacher to itself
    cells = [c.strip() for c in hybrid.strip("|").split("|")]
    cache_ratio = float(cells[9].rstrip("x"))
    expected = (4 * KV_PER_TOKEN_PER_LAYER * 256 + 4 * MIXER_STATE) / (LAYERS * KV_PER_TOKEN_PER_LAYER * 256)
    assert cache_ratio == pytest.approx(expected, abs=0.006)


def test_merge_keeps_earlier_parts_and_refuses_another_shape(run, tmp_path):
    out, _, _ = run
    again = run_bench(out, shape="tiny", parts=("ttft",), device="cpu", ratios=(), command="second", plots=False,
                      log=lambda m: None, ttft_repeats=1)
    assert [r["command"] for r in again["runs"]] == [COMMAND, "second"]
    assert set(again["decode"]) == {"teacher", "hybrid-0.5"}  # kept from the first run
    (tmp_path / "bench_cpu.json").write_text(json.dumps({"device": "cpu", "shape": "tinyllava-3b", "dtype": "bfloat16"}))
    with pytest.raises(ValueError, match="tinyllava-3b"):
        run_bench(tmp_path, shape="tiny", device="cpu", log=lambda m: None)


def test_batch_sweep_stops_at_out_of_memory(monkeypatch, tiny_models):
    teacher, _ = tiny_models
    tried = []

    class TightEngine(bench.measure.Engine):
        def __init__(self, model, max_batch_size=1, *args, **kwargs):
            tried.append(max_batch_size)
            if max_batch_size > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            super().__init__(model, max_batch_size, *args, **kwargs)

    monkeypatch.setattr(bench.measure, "Engine", TightEngine)
    r = throughput_vs_batch(teacher, context=16, batches=(1, 2, 4, 8), steps=2, bandwidth=10.0)
    assert tried == [1, 2, 4]  # stops at the first failure
    assert r["batches"] == [1, 2] and r["max_batch"] == 2 and r["oom_at"] == 4 and not r["oom_predicted"]
    assert len(r["tokens_per_s"]) == len(r["floor_tokens_per_s"]) == 2

    class BrokenEngine(bench.measure.Engine):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("some other failure")

    monkeypatch.setattr(bench.measure, "Engine", BrokenEngine)
    with pytest.raises(RuntimeError, match="some other failure"):  # only out-of-memory ends the sweep quietly
        throughput_vs_batch(teacher, context=16, batches=(1,), steps=1)


def test_tinyllava_3b_shape_on_meta():
    """The 3.1B shape's numbers without allocating it: decode weights and the batch-1 floor."""
    teacher = build_teacher("tinyllava-3b", "meta", torch.bfloat16)
    lm_params = sum(p.numel() for p in teacher.model.language_model.parameters()) + teacher.lm_head.weight.numel()
    embed = 51200 * 2560
    assert lm_params == 2_779_632_640  # as measured for the TinyLLaVA-shaped teacher (scale_3b_h100.json)
    assert decode_weight_bytes(teacher) == 2 * (lm_params - embed)
    assert cache_bytes(teacher, 1, 16384).kv == 32 * 2 * 2560 * 16384 * 2
    # ~5.3 GB of weights per step at 3 TB/s: about 550 tokens/s at a short context.
    assert floor_tokens_per_s(teacher, 512, 1, 3000.0) == pytest.approx(549, abs=2)


def test_replot_from_the_result_file(run, tmp_path):
    out, _, _ = run
    copy = tmp_path / "bench_cpu.json"
    copy.write_text((out / "bench_cpu.json").read_text())
    written = bench.replot(copy)
    assert [p.name for p in written] == ["bench_cpu_decode.png", "bench_cpu_memory.png", "bench_cpu_batch.png"]
    assert (tmp_path / "bench_cpu.md").read_text().startswith("| model |")

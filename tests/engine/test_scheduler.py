"""Continuous batching: under load every request gets exactly the tokens (and logits) it gets alone."""

import threading

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

import matvlm
from matvlm.synthetic import SHIPPED_TEACHER
from matvlm.engine import Engine, SamplingParams
from matvlm.engine.scheduler import QueueFull, Request, Scheduler, run_alone
from matvlm.engine.text import prompt_inputs, stop_ids_for
from matvlm.io import load_image_processor, load_vlm

TEACHER = str(SHIPPED_TEACHER)
QUESTIONS = [  # different lengths, with and without an image
    ("What color is the large shape?", True),
    ("Describe the image.", False),
    ("How many objects are there in this picture? Count them all carefully.", True),
    ("What is in the picture? Answer briefly please.", False),
    ("Is there a red square?", True),
    ("Name the shapes.", True),
]


@pytest.fixture(scope="module")
def parts():
    return AutoTokenizer.from_pretrained(TEACHER), load_image_processor(TEACHER)


@pytest.fixture(scope="module", params=["teacher", "hybrid"])
def model(request):
    teacher = load_vlm(TEACHER)
    return teacher if request.param == "teacher" else matvlm.to_hybrid(teacher, ratio=0.5).eval()


@pytest.fixture(scope="module")
def prompts(parts, tmp_path_factory):
    tokenizer, image_processor = parts
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i, (question, with_image) in enumerate(QUESTIONS):
        path = None
        if with_image:
            path = folder / f"{i}.png"
            Image.new("RGB", (128, 128), (40 * i, 200 - 30 * i, 90)).save(path)
        item = prompt_inputs(tokenizer, image_processor, question, path, "phi_short", 64, index=i)
        out.append((item["input_ids"], item["pixel_values"]))
    return out


def run(scheduler, arrivals, jobs, max_rounds=500):
    """Submit jobs[j] before round r for (r, j) in arrivals; run rounds until every job is done."""
    for step in range(max_rounds):
        for r, j in arrivals:
            if r == step:
                scheduler.submit(jobs[j])
        scheduler.step()
        if step >= max(r for r, _ in arrivals) and all(job.done for job in jobs):
            return step
    raise AssertionError("the scheduler did not finish its requests")


def test_under_load_equals_alone(model, prompts, parts):
    """Six requests of different lengths arrive at different rounds into three rows (rows are reused);
    each gets the tokens and the logits of a single-request Engine.generate."""
    stops = stop_ids_for(Engine(model, 1, 8), parts[0])
    lengths = [24, 12, 30, 8, 20, 16]
    jobs = [Request(ids, px, max_new_tokens=n, keep_logits=True) for (ids, px), n in zip(prompts, lengths)]
    rows_seen = []
    scheduler = Scheduler(Engine(model, max_batch_size=3, max_seq_len=160), stop_token_ids=stops)
    for job in jobs:
        job.on_event = lambda kind, value, job=job: rows_seen.append(scheduler.rows.index(job)) if kind == "token" and len(job.tokens) == 1 else None
    run(scheduler, [(0, 0), (0, 1), (2, 2), (3, 3), (6, 4), (9, 5)], jobs)
    assert len(rows_seen) == 6 and len(set(rows_seen)) <= 3  # six requests went through three rows
    alone = Engine(model, max_batch_size=1, max_seq_len=160)
    for i, job in enumerate(jobs):
        ref = alone.generate(job.input_ids, pixel_values=job.pixel_values, max_new_tokens=job.max_new_tokens,
                             stop_token_ids=stops, return_logits=True)
        assert job.tokens == ref.sequences()[0], f"request {i}"
        got = torch.stack(job.logits)
        torch.testing.assert_close(got, ref.logits[0, : len(job.tokens)], rtol=1e-4, atol=1e-4)
        assert job.finish_reason == ("length" if len(job.tokens) == job.max_new_tokens else "stop")
    assert all(r is None for r in scheduler.rows) and scheduler.stats().cache_bytes_in_use == 0


def test_reused_row_starts_from_a_clean_cache(model, prompts):
    """Poison every row (KV, conv window, SSM state, key mask) with NaN/True: answers are unchanged."""
    engine = Engine(model, max_batch_size=2, max_seq_len=160)
    for store in (engine.cache.keys, engine.cache.values, engine.cache.conv, engine.cache.ssm):
        for t in store.values():
            t.fill_(float("nan"))
    engine.key_valid.fill_(True)
    scheduler = Scheduler(engine)
    jobs = [Request(ids, px, max_new_tokens=10, stop_at_eos=False) for ids, px in prompts[:4]]
    run(scheduler, [(0, 0), (1, 1), (4, 2), (5, 3)], jobs)
    alone = Engine(model, max_batch_size=1, max_seq_len=160)
    for job in jobs:
        assert job.tokens == run_alone(alone, job)
        assert len(job.tokens) == 10


def test_seeded_sampling_under_load_equals_alone(model, prompts):
    engine = Engine(model, max_batch_size=3, max_seq_len=160)
    scheduler = Scheduler(engine)
    params = SamplingParams(temperature=0.9, top_p=0.9)
    jobs = [Request(ids, px, max_new_tokens=12, params=params, seed=7 + i, stop_at_eos=False)
            for i, (ids, px) in enumerate(prompts[:3])]
    jobs.append(Request(*prompts[3], max_new_tokens=12))  # a greedy one in the same batch
    run(scheduler, [(0, 0), (1, 1), (1, 3), (3, 2)], jobs)
    alone = Engine(model, max_batch_size=1, max_seq_len=160)
    for job in jobs:
        assert job.tokens == run_alone(alone, job)


def test_cancel_timeout_queue_and_length_limits(prompts):
    model = load_vlm(TEACHER)
    scheduler = Scheduler(Engine(model, max_batch_size=1, max_seq_len=120), max_queue=1)
    first = scheduler.submit(Request(*prompts[0], max_new_tokens=40, stop_at_eos=False))  # will take the free row
    second = scheduler.submit(Request(*prompts[1], max_new_tokens=3, stop_at_eos=False))  # waits
    with pytest.raises(QueueFull, match="queue holds 1"):
        scheduler.submit(Request(*prompts[2], max_new_tokens=3))
    with pytest.raises(ValueError, match="cache holds 120"):
        scheduler.check(Request(*prompts[0], max_new_tokens=60))
    scheduler.step()
    assert scheduler.rows[0] is first and scheduler.stats().running == 1 and scheduler.stats().waiting == 1
    first.cancel()
    scheduler.step()  # the cancelled request leaves and the waiting one takes its row in the same round
    assert first.finish_reason == "cancelled" and scheduler.rows[0] is second
    while not second.done:
        scheduler.step()
    assert second.finish_reason == "length" and len(second.tokens) == 3
    late = scheduler.submit(Request(*prompts[1], max_new_tokens=50, stop_at_eos=False, timeout_s=0.0))
    scheduler.step()
    assert late.finish_reason == "timeout" and scheduler.rows == [None]


def test_background_thread_serves_and_shuts_down(prompts):
    model = load_vlm(TEACHER)
    scheduler = Scheduler(Engine(model, max_batch_size=2, max_seq_len=160))
    done = threading.Event()
    events = []

    def on_event(kind, value):
        events.append((kind, value))
        if kind == "done" and sum(k == "done" for k, _ in events) == 3:
            done.set()

    scheduler.start()
    try:
        jobs = [scheduler.submit(Request(ids, px, max_new_tokens=8, on_event=on_event)) for ids, px in prompts[:3]]
        assert done.wait(120)
    finally:
        scheduler.shutdown()
    assert sum(k == "token" for k, _ in events) == sum(len(j.tokens) for j in jobs)
    stats = scheduler.stats()
    assert stats.finished_requests == 3 and stats.generated_tokens == sum(len(j.tokens) for j in jobs)

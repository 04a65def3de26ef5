"""The API over raw HTTP: answers under concurrent load equal the single-request engine's, streaming, usage,
stop strings, models, health and metrics."""

import json
from concurrent.futures import ThreadPoolExecutor

from matvlm.engine import Engine
from matvlm.engine.text import generate_text
from matvlm.io import load_processor

from .conftest import TEACHER, image_message, scene_png

QUESTIONS = ["What color is the large shape?", "Describe the image.",
             "How many objects are there in this picture? Count them all carefully.", "Name the shapes.",
             "Is there a red circle?"]


def chat(client, url, messages, **options):
    r = client.post(f"{url}/v1/chat/completions", json={"messages": messages, "temperature": 0, **options})
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:])
    return events


def test_concurrent_greedy_answers_equal_generate_text(server, client, tmp_path):
    """Five image/text questions at once (more than the four rows): each answer equals `generate_text` alone."""
    pngs = [scene_png(i) if i % 2 == 0 else None for i in range(len(QUESTIONS))]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda qp: chat(client, server.url, [image_message(*qp)], max_tokens=24),
                                zip(QUESTIONS, pngs)))
    engine = Engine(server.served.model, max_batch_size=1, max_seq_len=256)
    processor = load_processor(TEACHER)
    for i, (question, png, answer) in enumerate(zip(QUESTIONS, pngs, answers)):
        path = None
        if png is not None:
            path = tmp_path / f"{i}.png"
            path.write_bytes(png)
        ref = generate_text(engine, processor, path, question, template="phi_short", max_new_tokens=24)
        assert answer["choices"][0]["message"]["content"].strip() == ref.texts[0], question
        assert answer["usage"]["completion_tokens"] == int(ref.output.lengths[0])
        assert answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"] == answer["usage"]["total_tokens"]
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        assert answer["model"] == server.served.name
    assert server.idle()


def test_stream_equals_plain_answer_and_ends_with_done(teacher_server, client):
    messages = [image_message("Describe the image.", scene_png(2))]
    plain = chat(client, teacher_server.url, messages, max_tokens=30)
    body = {"messages": messages, "temperature": 0, "max_tokens": 30, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", f"{teacher_server.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 1  # really streamed
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_stop_string_ends_the_answer_before_it(teacher_server, client):
    messages = [image_message("Describe the image.", scene_png(2))]
    full = chat(client, teacher_server.url, messages, max_tokens=30)["choices"][0]["message"]["content"]
    word = full.split()[2]
    cut = chat(client, teacher_server.url, messages, max_tokens=30, stop=[word])
    assert cut["choices"][0]["message"]["content"] == full[: full.index(word)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert teacher_server.idle()


def test_seeded_sampling_repeats(hybrid_server, client):
    messages = [image_message("Describe the image.", scene_png(1))]
    runs = [chat(client, hybrid_server.url, messages, max_tokens=16, temperature=1.0, top_p=0.95, seed=11)
            for _ in range(2)]
    assert runs[0]["choices"][0]["message"]["content"] == runs[1]["choices"][0]["message"]["content"]


def test_models_health_info_and_metrics(server, client):
    assert client.get(f"{server.url}/health").json()["status"] == "ok"
    models = client.get(f"{server.url}/v1/models").json()
    (entry,) = models["data"]
    assert entry["id"] == server.served.name and entry["object"] == "model"
    info = entry["matvlm"]
    assert info["kind"] == server.served.name
    assert info["mixer_layers"] == ([0, 2, 4, 6] if info["kind"] == "hybrid" else [])
    assert info["attention_layers"] == [i for i in range(8) if i not in info["mixer_layers"]]
    chat(client, server.url, [image_message("Name the shapes.")], max_tokens=4)
    metrics = client.get(f"{server.url}/metrics").text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    for name in ("matvlm_queue_depth", "matvlm_running_requests", "matvlm_generated_tokens_per_second",
                 "matvlm_cache_bytes_in_use", "matvlm_cache_bytes_free", "matvlm_cache_bytes_total"):
        assert name in values, name
    assert values["matvlm_generated_tokens_total"] >= 1
    assert values["matvlm_cache_bytes_free"] + values["matvlm_cache_bytes_in_use"] == values["matvlm_cache_bytes_total"]
    assert "# TYPE matvlm_queue_depth gauge" in metrics

"""Bad requests get a 4xx naming the problem and the server keeps serving; back-pressure, timeouts and
clients that leave mid-stream free their rows."""

import json
import threading

import httpx
import pytest

from .conftest import image_message, scene_png

GOOD = {"messages": [image_message("Describe the image.", scene_png(0))], "max_tokens": 4, "temperature": 0}
LONG = {"messages": [image_message("Describe the image.")], "max_tokens": 150, "temperature": 0, "ignore_eos": True}


def post(client, url, body=None, content=None):
    return client.post(f"{url}/v1/chat/completions", json=body, content=content,
                       headers={"content-type": "application/json"})


BAD_REQUESTS = [  # (body or raw bytes, status, words the message must hold)
    (b'{"messages": [', 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({"max_tokens": 4}, 400, "'messages' is missing"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "content is empty"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role must be"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "last message"),
    ({"messages": [{"role": "user", "content": "hi " * 400}]}, 400, "cache holds 256"),
    ({**GOOD, "max_tokens": 500}, 400, "cache holds 256"),
    ({"messages": [image_message("What is it?", b"not an image at all")]}, 400, "image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                                                 {"type": "text", "text": "hi"}]}]}, 400, "base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}},
                                                 {"type": "text", "text": "hi"}]}]}, 400, "remote image URLs"),
    ({**GOOD, "logprobs": True}, 400, "unsupported parameter 'logprobs'"),
    ({**GOOD, "functions": []}, 400, "unsupported parameter(s): functions"),
    ({**GOOD, "n": 2}, 400, "'n' must be 1"),
    ({**GOOD, "temperature": -1}, 400, "'temperature'"),
    ({**GOOD, "top_p": 0}, 400, "top_p"),
    ({**GOOD, "max_tokens": 0}, 400, "'max_tokens'"),
    ({**GOOD, "stop": [1]}, 400, "'stop'"),
    ({**GOOD, "messages": [{"role": "system", "content": "be nice"}, image_message("hi")]}, 400, "system messages"),
    ({**GOOD, "model": "gpt-4o"}, 404, "'gpt-4o' is not served here"),
]


@pytest.mark.parametrize("body,status,words", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_request_is_refused_by_name_and_the_server_goes_on(teacher_server, client, body, status, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = post(client, teacher_server.url, content=raw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"], error
    assert error["type"] == "invalid_request_error"
    ok = post(client, teacher_server.url, GOOD)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"].strip()


def test_two_images_are_refused(teacher_server, client):
    png = scene_png(1)
    messages = [image_message("a?", png), {"role": "assistant", "content": "b"}, image_message("c?", png)]
    r = post(client, teacher_server.url, {"messages": messages})
    assert r.status_code == 400 and "2 images" in r.json()["error"]["message"]


def test_full_queue_answers_429_with_retry_after(teacher_server, client):
    scheduler = teacher_server.served.scheduler
    before = scheduler.max_queue
    scheduler.max_queue = 0  # nothing may wait: a request that finds every row busy is refused
    results = []
    try:
        def one():
            with httpx.Client(timeout=120) as c:
                results.append(post(c, teacher_server.url, LONG))

        threads = [threading.Thread(target=one) for _ in range(8)]  # 4 rows
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        scheduler.max_queue = before
    codes = sorted(r.status_code for r in results)
    assert 429 in codes and 200 in codes, codes
    refused = next(r for r in results if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["error"]["message"]
    assert teacher_server.idle()
    assert post(client, teacher_server.url, GOOD).status_code == 200


def test_disconnect_mid_stream_cancels_and_frees_the_row(teacher_server, client):
    served = teacher_server.served
    cancelled = teacher_server.app.state.outcomes["cancelled"]
    with client.stream("POST", f"{teacher_server.url}/v1/chat/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few chunks, then hang up
        assert any('"content"' in line for line in got)
        assert served.scheduler.stats().running == 1
    assert teacher_server.idle(), "the row was not freed"
    finished = [r for r in served.scheduler.rows if r is not None]
    assert not finished
    assert post(client, teacher_server.url, GOOD).status_code == 200
    assert teacher_server.app.state.outcomes["cancelled"] >= cancelled  # counted once its done event is read


def test_request_timeout(teacher_server, client):
    teacher_server.app.state.request_timeout_s = 0.05
    try:
        r = post(client, teacher_server.url, {**LONG, "max_tokens": 200})
    finally:
        teacher_server.app.state.request_timeout_s = 120.0
    assert r.status_code == 504 and "per-request limit" in r.json()["error"]["message"]
    assert teacher_server.idle()
    assert post(client, teacher_server.url, GOOD).status_code == 200

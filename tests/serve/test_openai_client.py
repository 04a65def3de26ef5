"""The official openai client against the server, plain and streamed."""

import openai
import pytest

from .conftest import image_message, scene_png


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_openai_client_plain_and_streamed(server, oai):
    messages = [image_message("Describe the image.", scene_png(0))]
    (model,) = oai.models.list().data
    assert model.id == server.served.name
    plain = oai.chat.completions.create(model=model.id, messages=messages, max_tokens=20, temperature=0)
    answer = plain.choices[0].message.content
    assert answer and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens > 64  # the image block is 64 tokens

    stream = oai.chat.completions.create(model=model.id, messages=messages, max_tokens=20, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == answer and finish == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_openai_client_sees_errors(oai):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="remote image URLs"):
        oai.chat.completions.create(model=oai.models.list().data[0].id, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}, {"type": "text", "text": "hi"}]}])

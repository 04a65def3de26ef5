"""The OpenAI chat-completions request, checked by hand so that every refusal names its problem.

`parse_chat_request(body)` turns the decoded JSON body into a `ChatRequest` or raises `ApiError` with an
HTTP status and an OpenAI-style error body. Images come inline only, as base64 `data:` URLs: the server
may run offline, so it never fetches a remote URL.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from matvlm.serve.model import Turn

# Parameters the server honours, and those it accepts only at their no-op value.
SUPPORTED = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "seed",
    "stream", "stream_options", "n", "user", "ignore_eos",
}
NO_OP_VALUES = {
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logprobs": (False, None),
    "logit_bias": (None,), "tools": (None,), "tool_choice": (None, "none"), "response_format": (None,),
    "parallel_tool_calls": (None,),
}
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


@dataclass
class ChatRequest:
    model: str | None
    turns: list[Turn]
    max_tokens: int | None = None
    temperature: float = 1.0  # the OpenAI default; 0 is greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def _number(body: dict, name: str, default, low: float | None = None, high: float | None = None, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise bad(f"'{name}' must be {bounds}, got {value!r}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {value!r}", name)
    return value


def decode_image_url(url: Any, where: str) -> bytes:
    """The bytes of a base64 `data:` URL; remote URLs are refused (the server does not go online)."""
    if isinstance(url, Mapping):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise bad(f"{where}: image_url must be an object with a 'url' string", where)
    if url.startswith(("http://", "https://", "ftp://", "file:")):
        raise bad(f"{where}: remote image URLs are not fetched (the server may be offline); send the image inline as "
                  "a base64 data URL, e.g. data:image/png;base64,...", where)
    if not url.startswith("data:"):
        raise bad(f"{where}: the image URL must be a base64 data URL (data:image/...;base64,...)", where)
    head, _, payload = url.partition(",")
    if not head.endswith(";base64"):
        raise bad(f"{where}: the data URL is not base64-encoded (expected data:<type>;base64,<data>)", where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad(f"{where}: the image's base64 data does not decode: {err}", where) from err
    if not data:
        raise bad(f"{where}: the image data is empty", where)
    return data


def _turn(message: Any, i: int) -> Turn:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise bad(f"{where} must be an object with 'role' and 'content'", where)
    role, content = message.get("role"), message.get("content")
    if role == "system":
        raise bad(f"{where}: system messages are not supported (the model's chat template has a fixed system prompt)",
                  where)
    if role not in ("user", "assistant"):
        raise bad(f"{where}: role must be 'user' or 'assistant', got {role!r}", where)
    if isinstance(content, str):
        if not content.strip():
            raise bad(f"{where}: content is empty", where)
        return Turn(role, content)
    if not isinstance(content, list) or not content:
        raise bad(f"{where}: content must be a non-empty string or a non-empty list of parts", where)
    texts, image = [], None
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{here}: a text part needs a 'text' string", here)
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise bad(f"{here}: only user messages may hold images", here)
            if image is not None:
                raise bad(f"{here}: one image per message at most (this model takes one image)", here)
            image = decode_image_url(part.get("image_url"), here)
        else:
            raise bad(f"{here}: part type must be 'text' or 'image_url', got {kind!r}", here)
    text = "\n".join(texts)
    if not text.strip():
        raise bad(f"{where}: no text (an image needs a question with it)", where)
    return Turn(role, text, image)


def parse_chat_request(body: Any) -> ChatRequest:
    """Check a decoded /v1/chat/completions body; raises ApiError(400) naming the first problem."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(k for k in body if k not in SUPPORTED and k not in NO_OP_VALUES)
    if unknown:
        raise bad(f"unsupported parameter(s): {', '.join(unknown)}; supported: {', '.join(sorted(SUPPORTED))}",
                  unknown[0])
    for name, allowed in NO_OP_VALUES.items():
        if name in body and body[name] not in allowed and body[name] != []:
            raise bad(f"unsupported parameter '{name}'={body[name]!r}: this server does not implement it", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"'model' must be a string, got {model!r}", "model")
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is missing: give a list of {role, content} messages", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} messages", "messages")
    turns = [_turn(m, i) for i, m in enumerate(messages)]
    if turns[-1].role != "user":
        raise bad("the last message must come from the user", f"messages[{len(turns) - 1}]")
    if _number(body, "n", 1, low=1, integer=True) != 1:
        raise bad("'n' must be 1: this server returns one choice per request", "n")
    max_tokens = _number(body, "max_completion_tokens", None, low=1, integer=True)
    max_tokens = _number(body, "max_tokens", max_tokens, low=1, integer=True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping) or set(options) - {"include_usage"}:
        raise bad("'stream_options' may only hold 'include_usage'", "stream_options")
    return ChatRequest(
        model=model, turns=turns, max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, low=0, high=2)),
        top_p=float(_number(body, "top_p", 1.0, low=0, high=1)),
        top_k=_number(body, "top_k", 0, low=0, integer=True),
        stop=stop, seed=_number(body, "seed", None, integer=True), stream=_flag(body, "stream"),
        include_usage=_flag(options, "include_usage"), ignore_eos=_flag(body, "ignore_eos"),
    )

"""The HTTP API: OpenAI chat completions (plain and streamed), models, health, metrics, and the chat page.

Requests are checked on the event loop (`schema.parse_chat_request`), prompts are built in a worker
thread (tokenizer and image decoding), and generation runs in the scheduler's thread; its events come
back to the request's coroutine through an asyncio queue. A request that ends on the client's side
(disconnect, stop string) is cancelled in the scheduler, which frees its cache row before the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from matvlm.engine.sampling import SamplingParams
from matvlm.engine.scheduler import QueueFull
from matvlm.engine.scheduler import Request as Job
from matvlm.serve.metrics import prometheus_text
from matvlm.serve.model import PromptError, ServedModel
from matvlm.serve.schema import ApiError, ChatRequest, bad, parse_chat_request
from matvlm.serve.text import TextStream

STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5


def create_app(served: ServedModel, request_timeout_s: float = 600.0) -> FastAPI:
    """The ASGI app for one served model. The scheduler thread starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.scheduler.start()
        yield
        served.scheduler.shutdown()

    app = FastAPI(title="matvlm serve", lifespan=lifespan)
    app.state.served = served
    app.state.request_timeout_s = request_timeout_s
    app.state.outcomes = Counter()  # finish reasons and refusals, for /metrics

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        app.state.outcomes[f"http_{err.status}"] += 1
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": served.name}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "matvlm",
                                            "matvlm": served.info()}]}

    @app.get("/info")
    async def info() -> dict:
        stats = served.scheduler.stats()
        return {**served.info(), "waiting": stats.waiting, "running": stats.running,
                "tokens_per_s": stats.tokens_per_s, "cache_bytes_in_use": stats.cache_bytes_in_use,
                "cache_bytes_free": stats.cache_bytes_free}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = prometheus_text(served.name, served.scheduler.stats(), app.state.outcomes)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise bad(f"the request body is not valid JSON: {err}") from err
        chat = parse_chat_request(body)
        if chat.model is not None and chat.model != served.name:
            raise ApiError(404, f"model {chat.model!r} is not served here; this server serves {served.name!r}",
                           "model", "model_not_found")
        job, events = await _submit(chat)
        answer = TextStream(served.decode, chat.stop)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": served.name}
        if chat.stream:
            return StreamingResponse(_sse(request, chat, job, events, answer, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(request, chat, job, events, answer, meta)

    async def _submit(chat: ChatRequest) -> tuple[Job, asyncio.Queue]:
        try:
            params = SamplingParams(temperature=chat.temperature, top_p=chat.top_p, top_k=chat.top_k)
        except ValueError as err:
            raise bad(str(err)) from err
        try:
            input_ids, pixel_values = await run_in_threadpool(served.prompt, chat.turns)
        except PromptError as err:
            raise bad(str(err), "messages") from err
        room = served.engine.max_seq_len - len(input_ids) + 1
        if room < 1:
            raise bad(f"the prompt has {len(input_ids)} tokens but the cache holds {served.engine.max_seq_len} per "
                      "request: shorten the conversation or the question", "messages")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(input_ids, pixel_values, max_new_tokens=chat.max_tokens or room, params=params, seed=chat.seed,
                  stop_at_eos=not chat.ignore_eos, timeout_s=app.state.request_timeout_s,
                  on_event=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))
        try:
            served.scheduler.submit(job)
        except ValueError as err:
            raise bad(str(err), "max_tokens" if chat.max_tokens else "messages") from err
        except QueueFull as err:
            raise ApiError(429, f"the server is busy: {err}; retry after {RETRY_AFTER_S} s", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from err
        return job, events

    async def _next(request: Request, job: Job, events: asyncio.Queue):
        """The job's next event; cancels the job when the client has gone away while it waits."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise asyncio.CancelledError("client disconnected") from None

    def _finish_reason(job: Job, answer: TextStream) -> str:
        app.state.outcomes[job.finish_reason] += 1
        if job.finish_reason == "timeout":
            raise ApiError(504, f"the answer took longer than the server's per-request limit of "
                                f"{app.state.request_timeout_s:g} s", code="timeout")
        if job.finish_reason == "error":
            raise ApiError(500, f"generation failed: {job.error}", code="generation_error")
        if job.finish_reason == "cancelled" and not answer.stopped:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        return "stop" if answer.stopped else job.finish_reason

    def _usage(job: Job) -> dict:
        n = len(job.tokens)
        return {"prompt_tokens": job.prompt_len, "completion_tokens": n, "total_tokens": job.prompt_len + n}

    async def _consume(request: Request, job: Job, events: asyncio.Queue, answer: TextStream):
        """Yield released text pieces until the job is done (or a stop string ends it)."""
        while True:
            kind, value = await _next(request, job, events)
            if kind == "done":
                rest = answer.finish()
                if rest:
                    yield rest
                return
            piece = answer.add(value)
            if piece:
                yield piece
            if answer.stopped:
                job.cancel()  # frees the row; the scheduler still sends "done"

    async def _complete(request, chat, job, events, answer, meta) -> dict:
        try:
            text = "".join([piece async for piece in _consume(request, job, events, answer)])
        finally:
            job.cancel()  # no-op when done; frees the row when the client left
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": _finish_reason(job, answer), "logprobs": None}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(job)}

    async def _sse(request, chat, job, events, answer, meta):
        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {**meta, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for piece in _consume(request, job, events, answer):
                yield chunk({"content": piece})
            try:
                yield chunk({}, _finish_reason(job, answer))
            except ApiError as err:  # headers are gone: report the error in the stream
                app.state.outcomes[f"http_{err.status}"] += 1
                yield f"data: {json.dumps(err.body())}\n\n"
            if chat.include_usage:
                yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(job)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client disconnected mid-stream, or the stream ended: free the row

    return app

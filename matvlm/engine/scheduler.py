"""Continuous batching on the engine: requests join and leave the running batch between decode steps.

Each request owns one row of the engine's static cache while it runs. A new request is prefilled alone
(batch 1, no padding: the same computation as a single-request `Engine.generate`) straight into a free
row, which is zeroed first; then every decode step advances all running rows at once, each row writing
at its own cache slot. A request that stops (stop token, max tokens, cancel, timeout) gives its row back
before the next step, so the next waiting request can take it.

The decode step covers rows [:n], n = 1 + the highest busy row; idle rows inside that range compute on
a harmless dummy token and are cleared when reused. With CUDA graphs n is rounded up to a captured
size (powers of two), and every graph is captured in `start()`, before any request holds a row.

`Scheduler.step()` does one admit + decode round and is what tests drive; `start()` runs it in a
background thread for the server. Events go to each request's `on_event(kind, value)`, called from
the scheduler's thread: ("token", id) per token, then ("done", finish_reason) once.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from matvlm.engine.cache import cache_bytes
from matvlm.engine.engine import Engine
from matvlm.engine.sampling import SamplingParams, next_tokens

FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")
_ids = itertools.count()


class QueueFull(Exception):
    """The waiting queue is at its bound; retry later."""


@dataclass(eq=False)
class Request:
    """One generation: an unpadded prompt (L,) or (1, L), its image (if any) and sampling options."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    max_new_tokens: int = 32
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop_at_eos: bool = True  # False: only `stop_token_ids` end it (load tests that need full lengths)
    timeout_s: float | None = None
    on_event: Callable[[str, object], None] | None = None
    keep_logits: bool = False  # keep each step's (vocab,) float32 logits in `logits` (tests)
    # Filled in by the scheduler.
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    _cancelled: bool = False
    _generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        ids = torch.as_tensor(self.input_ids, dtype=torch.long)
        self.input_ids = ids.reshape(1, -1)
        if self.pixel_values is not None and self.pixel_values.dim() == 3:
            self.pixel_values = self.pixel_values[None]

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the scheduler to stop this request (thread-safe); its row is freed before the next step."""
        self._cancelled = True

    def _emit(self, kind: str, value: object) -> None:
        if self.on_event is not None:
            self.on_event(kind, value)


@dataclass
class SchedulerStats:
    waiting: int
    running: int
    max_batch: int
    generated_tokens: int  # since start
    finished_requests: int
    tokens_per_s: float  # generated tokens over the last `window_s` seconds
    cache_bytes_total: int
    cache_bytes_in_use: int  # rows held by running requests: their mixer state + KV of their tokens so far

    @property
    def cache_bytes_free(self) -> int:
        return self.cache_bytes_total - self.cache_bytes_in_use


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes the decode step runs at under CUDA graphs: powers of two, then max_batch."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch]


class Scheduler:
    """Continuous batching over one `Engine`; see the module docstring.

    max_queue: requests that may wait for a row (beyond those that free rows will take at the next round);
        `submit` raises `QueueFull` beyond it.
    stop_token_ids: stop ids for every request (the model's EOS and the chat template's end), added
        to each request's own.
    """

    def __init__(self, engine: Engine, max_queue: int = 64, stop_token_ids: Sequence[int] = (), window_s: float = 10.0):
        self.engine = engine
        self.max_queue = max_queue
        self.stop_token_ids = list(dict.fromkeys([*engine.eos_token_ids, *stop_token_ids]))
        self.window_s = window_s
        self.rows: list[Request | None] = [None] * engine.max_batch_size
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per round, for tokens/s
        self.generated_tokens = 0
        self.finished_requests = 0
        per_seq = cache_bytes(engine.model, 1, 1, engine.dtype)
        self._kv_per_token, self._mixer_per_row = per_seq.kv, per_seq.mixer
        self._sizes = capture_sizes(engine.max_batch_size) if engine.use_cuda_graph else None

    # ------------------------------------------------------------------ intake (any thread)
    def check(self, request: Request) -> None:
        """Raise ValueError when the request can never run on this engine (too long, bad options)."""
        n = request.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        needed = request.prompt_len + n - 1  # the last new token is never fed back
        if needed > self.engine.max_seq_len:
            raise ValueError(
                f"the prompt has {request.prompt_len} tokens and {n} new tokens were asked for: that needs {needed} "
                f"cache slots, but the cache holds {self.engine.max_seq_len} per request; shorten the prompt or max_tokens"
            )

    def submit(self, request: Request) -> Request:
        """Queue a request (thread-safe). Raises ValueError (see `check`) or QueueFull."""
        self.check(request)
        with self._cond:
            free = sum(r is None for r in self.rows)  # requests beyond the free rows wait: those are bounded
            if len(self._waiting) - free >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the queue holds {self.max_queue})")
            request.submitted_at = time.monotonic()
            if request.seed is not None and not request.params.greedy:
                request._generator = torch.Generator(device=self.engine.device).manual_seed(int(request.seed))
            self._waiting.append(request)
            self._cond.notify()
        return request

    # ------------------------------------------------------------------ one round (scheduler thread)
    @torch.no_grad()
    def step(self) -> bool:
        """Drop stopped requests, admit waiting ones into free rows, run one decode step. Returns whether
        anything was running or waiting."""
        now = time.monotonic()
        for row, req in enumerate(self.rows):
            if req is not None:
                self._check_stopped(req, now, row)
        self._expire_waiting(now)
        produced = self._admit()
        busy = [row for row, req in enumerate(self.rows) if req is not None]
        if busy:
            produced += self._decode(busy)
        if produced:
            self._recent.append((time.monotonic(), produced))
        return bool(busy or self._waiting)

    def _check_stopped(self, req: Request, now: float, row: int | None) -> bool:
        if req._cancelled:
            self._finish(req, "cancelled", row)
        elif req.timeout_s is not None and now - req.submitted_at > req.timeout_s:
            self._finish(req, "timeout", row)
        return req.done

    def _expire_waiting(self, now: float) -> None:
        with self._cond:
            stopped = [r for r in self._waiting if r._cancelled or (r.timeout_s is not None and now - r.submitted_at > r.timeout_s)]
            for req in stopped:
                self._waiting.remove(req)
        for req in stopped:
            self._check_stopped(req, now, None)

    def _admit(self) -> int:
        produced = 0
        while True:
            free = next((row for row, req in enumerate(self.rows) if req is None), None)
            if free is None:
                return produced
            with self._cond:
                if not self._waiting:
                    return produced
                req = self._waiting.popleft()
            try:
                logits = self.engine.prefill_row(free, req.input_ids, req.pixel_values)
            except (ValueError, RuntimeError) as err:  # a bad input, or out of memory for this prompt
                req.error = str(err)
                self._finish(req, "error", None)
                continue
            self.rows[free] = req
            produced += 1
            self._accept(req, free, self._choose(req, logits[0]))

    def _decode(self, busy: list[int]) -> int:
        engine = self.engine
        n = busy[-1] + 1
        if self._sizes is not None:
            n = next(s for s in self._sizes if s >= n)
        tokens = torch.full((n,), engine.pad_token_id, dtype=torch.long)
        slots = torch.zeros(n, dtype=torch.long)
        for row in busy:
            req = self.rows[row]
            tokens[row] = req.tokens[-1]
            slots[row] = req.prompt_len + len(req.tokens) - 1  # where the last token's key goes (= its position)
        engine.tokens[:n].copy_(tokens)
        engine.positions[:n].copy_(slots)  # prompts are unpadded: a token's position is its slot
        try:
            logits = engine.decode_rows(n, slots.tolist())
        except RuntimeError as err:  # the step itself failed: no running request can go on
            for row in busy:
                self.rows[row].error = f"decode step failed: {err}"
                self._finish(self.rows[row], "error", row)
            return 0
        greedy = [row for row in busy if self.rows[row].params.greedy]
        chosen = {}
        if greedy:
            ids = logits[greedy].argmax(-1).tolist()  # one host sync for all greedy rows
            chosen = dict(zip(greedy, ids))
        for row in busy:
            req = self.rows[row]
            if row in chosen and req.keep_logits:
                req.logits.append(logits[row].clone())
            token = chosen[row] if row in chosen else self._choose(req, logits[row])
            self._accept(req, row, token)
        return len(busy)

    def _choose(self, req: Request, logits: torch.Tensor) -> int:
        if req.keep_logits:
            req.logits.append(logits.clone())
        return int(next_tokens(logits[None], req.params, req._generator)[0])

    def _accept(self, req: Request, row: int, token: int) -> None:
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        req.tokens.append(token)
        self.generated_tokens += 1
        req._emit("token", token)
        if (req.stop_at_eos and token in self.stop_token_ids) or token in req.stop_token_ids:
            self._finish(req, "stop", row)
        elif len(req.tokens) >= req.max_new_tokens:
            self._finish(req, "length", row)
        else:
            self._check_stopped(req, time.monotonic(), row)

    def _finish(self, req: Request, reason: str, row: int | None) -> None:
        if row is not None:
            self.rows[row] = None  # the row is free for the next request at once
        if req.done:
            return
        req.finish_reason, req.finished_at = reason, time.monotonic()
        self.finished_requests += 1
        req._emit("done", reason)

    # ------------------------------------------------------------------ numbers
    def stats(self) -> SchedulerStats:
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()
        recent = list(self._recent)
        rate = 0.0
        if recent:
            span = max(now - recent[0][0], 1.0)  # at least a second: one burst is not a rate
            rate = sum(n for _, n in recent) / span
        running = [r for r in self.rows if r is not None]
        in_use = sum(self._mixer_per_row + self._kv_per_token * (r.prompt_len + len(r.tokens)) for r in running)
        return SchedulerStats(
            waiting=len(self._waiting), running=len(running), max_batch=self.engine.max_batch_size,
            generated_tokens=self.generated_tokens, finished_requests=self.finished_requests, tokens_per_s=rate,
            cache_bytes_total=self.engine.cache_nbytes().total, cache_bytes_in_use=in_use,
        )

    # ------------------------------------------------------------------ background thread
    def start(self) -> None:
        """Capture the decode graphs (CUDA) and run rounds in a daemon thread until `shutdown`."""
        if self._thread is not None:
            return
        for size in self._sizes or ():
            self.engine.warmup(size)  # writes garbage into rows; no request holds one yet
        self._thread = threading.Thread(target=self._loop, name="matvlm-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._waiting and all(r is None for r in self.rows):
                    self._cond.wait()
                if self._closing:
                    break
            self.step()
        for row, req in enumerate(self.rows):
            if req is not None:
                self._finish(req, "cancelled", row)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting:
            self._finish(req, "cancelled", None)

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def run_alone(engine: Engine, request: Request, stop_token_ids: Sequence[int] = ()) -> list[int]:
    """The request's tokens from a plain single-request `Engine.generate` (the reference for batching).
    It uses rows of `engine`'s cache: call it on an engine that no running scheduler holds."""
    stops = [*stop_token_ids, *request.stop_token_ids] if request.stop_at_eos else list(request.stop_token_ids)
    out = engine.generate(
        request.input_ids, pixel_values=request.pixel_values, max_new_tokens=request.max_new_tokens,
        temperature=request.params.temperature, top_p=request.params.top_p, top_k=request.params.top_k,
        stop_token_ids=stops, stop_at_eos=request.stop_at_eos, seed=request.seed,
    )
    return out.sequences()[0]

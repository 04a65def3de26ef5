"""Fast batched generation for Llava teachers and matvlm hybrids alike: static cache, CUDA graphs.

One engine runs both kinds of model, so speed comparisons are like for like.

- Prefill: the model's own forward (vision tower + LM) over the left-padded batch, with transformers'
  dynamic cache; its states are then copied into the engine's static cache (`EngineCache`). Attention
  sees the padding through the 2-D mask, mixers through the hybrid's `mixer_padding_mask`.
- Decode: one token per step through the decoder layers themselves (the teacher's modules and the
  mixers, unchanged), with the static cache in place of transformers' cache. Everything the step
  reads is a device tensor at a fixed address (tokens, positions, the write slot, the key mask), so on
  CUDA the step is captured once per (batch size, KV length bucket) in a CUDA graph and replayed.
  Attention reads only the smallest bucket of slots that holds every key so far (256, 512, ... up to
  max_seq_len), not the whole preallocated cache.
- Sampling (greedy, temperature, top-k, top-p), stop tokens and per-row finished flags run after the
  step, on the device; the host checks "all finished" every few steps (every step when streaming).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from matvlm.engine.cache import CacheBytes, EngineCache, decoder_layers
from matvlm.engine.sampling import SamplingParams, next_tokens

CUDA_GRAPH_CHOICES = ("auto", True, False)


def kv_buckets(max_seq_len: int, smallest: int = 256) -> list[int]:
    """KV lengths the decode step is specialised for: powers of two from `smallest`, then max_seq_len."""
    buckets, size = [], smallest
    while size < max_seq_len:
        buckets.append(size)
        size *= 2
    return buckets + [max_seq_len]


def check_text_config(text_config, max_seq_len: int, cuda_graph: bool) -> None:
    """Refuse what the static decode step does not model: sliding-window attention beyond its window
    (the step's mask has no window), and RoPE variants that recompute frequencies from the position
    on the host (a CUDA graph cannot hold that)."""
    window = getattr(text_config, "sliding_window", None)
    if window and getattr(text_config, "use_sliding_window", True) and max_seq_len > window:
        raise ValueError(
            f"the decoder uses sliding-window attention ({window} tokens) and max_seq_len={max_seq_len} exceeds it; "
            "the engine's mask has no window: use max_seq_len <= the window"
        )
    rope = getattr(text_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if cuda_graph and rope_type in ("dynamic", "longrope"):
        raise ValueError(f"RoPE type {rope_type!r} updates its frequencies on the host; use use_cuda_graph=False")


@dataclass
class GenerationOutput:
    """What `Engine.generate` returns.

    tokens: (batch, steps) new token ids on the CPU; after a row's stop token it holds `pad_token_id`.
    lengths: (batch,) tokens each row generated, its stop token included.
    Timing: `prefill_seconds` covers the vision tower, the prompt forward and the cache copy;
    `decode_seconds` the rest. `decode_tokens_per_s` counts every row of every decode step (the
    engine's throughput, independent of where rows stop); `generated_tokens` the real tokens only.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    logits: torch.Tensor | None = None  # (batch, steps, vocab) float32, before banning / sampling

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def generated_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def sequences(self) -> list[list[int]]:
        """Each row's generated ids up to and including its stop token."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


class GenerationStream:
    """Iterate to get each step's new tokens, a (batch,) CPU tensor (`pad_token_id` for rows that had
    already stopped); after the loop, `result` holds the `GenerationOutput`."""

    def __init__(self, steps: Iterator[torch.Tensor]):
        self._steps = steps
        self.result: GenerationOutput | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.result = yield from self._steps


class Engine:
    """Static-cache generation for one model; see the module docstring.

    max_batch_size, max_seq_len: the cache size (prompt slots, padding included, plus new tokens).
    dtype: the dtype to run in; when it differs from the model's, the model is converted in place.
    use_cuda_graph: "auto" (on CUDA devices), True (CUDA only) or False (eager everywhere).
    min_kv_bucket: the smallest KV length bucket (see `kv_buckets`).
    compile_step: torch.compile the decode step (one compile per batch size and KV bucket) before the
        CUDA graph captures it: fuses the step's many small elementwise kernels.
    The model is put in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        max_batch_size: int = 1,
        max_seq_len: int = 2048,
        dtype: torch.dtype | None = None,
        use_cuda_graph: bool | str = "auto",
        min_kv_bucket: int = 256,
        compile_step: bool = False,
    ):
        layers = decoder_layers(model)
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"need max_batch_size >= 1 and max_seq_len >= 2, got {max_batch_size} and {max_seq_len}")
        if use_cuda_graph not in CUDA_GRAPH_CHOICES:
            raise ValueError(f"use_cuda_graph must be 'auto', True or False, got {use_cuda_graph!r}")
        if dtype is not None and dtype != next(model.parameters()).dtype:
            model.to(dtype)
        self.model = model.eval()
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        if use_cuda_graph is True and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graph=True needs a CUDA model; this one is on {self.device}")
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph == "auto" else use_cuda_graph
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.buckets = kv_buckets(max_seq_len, min_kv_bucket)

        config = model.config
        check_text_config(config.text_config, max_seq_len, self.use_cuda_graph)
        self.vocab_size = model.lm_head.out_features
        self.image_token_id = getattr(config, "image_token_index", None)
        self.image_seq_length = getattr(config, "image_seq_length", None)
        self.image_size = getattr(getattr(config, "vision_config", None), "image_size", None)
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(config.text_config, "eos_token_id", None)
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad = getattr(gen, "pad_token_id", None) if gen is not None else None
        if pad is None:
            pad = getattr(config.text_config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)

        lm = model.model.language_model
        self._lm, self._layers = lm, layers
        self._final_norm = getattr(lm, "norm", None) or getattr(lm, "final_layernorm", None)
        if self._final_norm is None:
            raise TypeError(f"{type(lm).__name__} has no final norm named norm or final_layernorm")

        # Everything a decode step reads lives at a fixed address (CUDA graphs replay on addresses).
        self.cache = EngineCache.allocate(model, max_batch_size, max_seq_len, self.dtype, self.device)
        self.tokens = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self.key_valid = torch.zeros(max_batch_size, max_seq_len, dtype=torch.bool, device=self.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        self._step_fn, self._compiled = self._step, compile_step
        if compile_step and self.use_cuda_graph and (len(self.buckets) > 1 or max_batch_size > 1):
            # Measured on an H100 (torch 2.11): inductor fails on the in-place cache writes when the step
            # sees a slice of the cache (fewer rows than allocated, or a smaller KV bucket).
            raise NotImplementedError(
                "compile_step with CUDA graphs needs max_batch_size=1 and one KV bucket "
                "(min_kv_bucket=max_seq_len); compiled steps over cache slices fail in inductor")
        if compile_step:
            # Every (batch, bucket) is its own compiled graph: allow as many as there can be.
            limit = len(self.buckets) * max_batch_size + 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
            self._step_fn = torch.compile(self._step, dynamic=False)

    # ------------------------------------------------------------------ the decode step
    def _step(self, batch: int, kv_len: int) -> torch.Tensor:
        """One token for rows [:batch] at slot `cache.slot` (< kv_len); returns (batch, vocab) float32 logits."""
        view = self.cache.view(batch, kv_len)
        valid, tokens, positions = self.key_valid[:batch, :kv_len], self.tokens[:batch], self.positions[:batch]
        valid.scatter_(1, view.slot[:, None], True)
        mask = (~valid)[:, None, None, :].to(self.dtype) * torch.finfo(self.dtype).min  # additive, all heads
        positions = positions[:, None]
        hidden = self._lm.embed_tokens(tokens[:, None])
        rotary = self._lm.rotary_emb(hidden, position_ids=positions)
        for layer in self._layers:
            hidden = layer(
                hidden, attention_mask=mask, position_ids=positions, cache=view, use_cache=True,
                position_embeddings=rotary,
            )
        hidden = self._final_norm(hidden)
        return self.model.lm_head(hidden[:, -1]).float()

    def _bucket(self, slot: int) -> int:
        return next(b for b in self.buckets if b > slot)

    def _decode(self, batch: int, slot: int) -> torch.Tensor:
        self.cache.slot.fill_(slot)
        return self._replay(batch, self._bucket(slot))

    @torch.no_grad()
    def decode_rows(self, batch: int, slots: Sequence[int]) -> torch.Tensor:
        """One decode step for rows [:batch], row i writing its token (in `tokens`) at `slots[i]`: rows of a
        continuous batch sit at different lengths. Returns (batch, vocab) float32 logits."""
        self.cache.slot[:batch].copy_(torch.as_tensor(slots, dtype=torch.long))
        return self._replay(batch, self._bucket(max(slots)))

    def _replay(self, batch: int, kv_len: int) -> torch.Tensor:
        if not self.use_cuda_graph:
            return self._step_fn(batch, kv_len)
        graph, logits = self._graphs[(batch, kv_len)]
        graph.replay()
        return logits

    @torch.no_grad()
    def warmup(self, batch_size: int) -> None:
        """Capture the decode step for `batch_size` rows in every KV bucket (once; no-op without graphs).

        It runs the step eagerly first, which writes garbage into rows [:batch_size] of the cache, so
        it must not run between a prefill and its decode (`generate` calls it before the prefill).
        """
        if not self.use_cuda_graph:
            return
        for kv_len in self.buckets:
            if (batch_size, kv_len) in self._graphs:
                continue
            self.cache.slot.fill_(kv_len - 1)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
                for _ in range(2 if self._compiled else 1):  # the first call compiles
                    self._step_fn(batch_size, kv_len)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._step_fn(batch_size, kv_len)
            self._graphs[(batch_size, kv_len)] = (graph, logits)

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill_row(self, row: int, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Prefill one unpadded prompt (1, L) into cache row `row` (first cleared); returns (1, vocab) float32
        logits of its last position. The same computation as a batch-1 `generate`, so its answer matches."""
        input_ids, attention_mask, pixel_values = self._check_inputs(input_ids, None, pixel_values, 1)
        if input_ids.shape[0] != 1 or not 0 <= row < self.max_batch_size:
            raise ValueError(f"prefill_row takes one prompt and a row in 0..{self.max_batch_size - 1}")
        self.cache.reset_row(row)
        return self._prefill(input_ids, attention_mask, pixel_values, row)

    def _prefill(self, input_ids, attention_mask, pixel_values, row: int = 0) -> torch.Tensor:
        batch, width = input_ids.shape
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            position_ids=position_ids, use_cache=True, logits_to_keep=1,
        )
        self.cache.load_prefill(out.cache, width, row)
        rows = slice(row, row + batch)
        self.key_valid[rows].zero_()
        self.key_valid[rows, :width] = attention_mask.bool()
        self.positions[rows] = attention_mask.sum(-1)
        return out.logits[:, -1].float()

    # ------------------------------------------------------------------ checks
    def _check_ids(self, ids: Sequence[int], what: str) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{what} {bad} not in the vocabulary (ids 0..{self.vocab_size - 1})")
        return ids

    def _check_inputs(self, input_ids, attention_mask, pixel_values, max_new_tokens: int):
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
        batch, width = input_ids.shape
        if batch > self.max_batch_size:
            raise ValueError(
                f"batch of {batch} prompts is larger than this engine's max_batch_size={self.max_batch_size}: "
                f"split it into batches of at most {self.max_batch_size}, or build the Engine with max_batch_size>={batch}"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        needed = width + max_new_tokens - 1  # the last new token is never fed back
        if needed > self.max_seq_len:
            raise ValueError(
                f"prompt of {width} tokens (padded batch width) + {max_new_tokens} new tokens needs {needed} cache "
                f"slots, but this engine holds max_seq_len={self.max_seq_len}; shorten the prompt or max_new_tokens, "
                "or build the Engine with a larger max_seq_len"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        mask = attention_mask.long().cpu()
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        if (mask[:, 1:] < mask[:, :-1]).any() or (mask[:, -1] == 0).any():
            rows = sorted(set(torch.nonzero((mask[:, 1:] < mask[:, :-1]).any(1) | (mask[:, -1] == 0)).flatten().tolist()))
            raise ValueError(f"prompts must be left-padded (padding only before the tokens); rows {rows} are not")
        ids = input_ids.cpu()
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"input_ids hold ids outside the vocabulary 0..{self.vocab_size - 1}")
        self._check_images(ids, mask, pixel_values)
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.device, dtype=self.dtype)
        return input_ids.to(self.device), attention_mask.to(self.device, dtype=torch.long), pixel_values

    def _check_images(self, ids: torch.Tensor, mask: torch.Tensor, pixel_values) -> None:
        if self.image_token_id is None:
            return
        per_row = ((ids == self.image_token_id) & (mask == 1)).sum(1)
        images = 0 if pixel_values is None else pixel_values.shape[0]
        if pixel_values is not None:
            size = self.image_size
            if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or (size and tuple(pixel_values.shape[2:]) != (size, size)):
                raise ValueError(
                    f"pixel_values has shape {tuple(pixel_values.shape)}; the vision tower takes (images, 3, {size}, {size}): "
                    "run RGB images through the model's image processor"
                )
        per_image = self.image_seq_length
        if per_image and (per_row % per_image).any():
            raise ValueError(
                f"image tokens per prompt {per_row.tolist()} are not multiples of the {per_image} tokens one image "
                "fills; expand each image placeholder to image_seq_length tokens"
            )
        if per_image and int(per_row.sum()) != images * per_image:
            raise ValueError(
                f"the prompts hold {int(per_row.sum())} image tokens ({int(per_row.sum()) // per_image} images) "
                f"but {images} images were given"
            )

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop_token_ids: Sequence[int] = (),
        stop_at_eos: bool = True,
        suppress_tokens: Sequence[int] = (),
        seed: int | None = None,
        stream: bool = False,
        return_logits: bool = False,
        check_every: int = 8,
    ) -> GenerationOutput | GenerationStream:
        """Generate for a left-padded batch; see `GenerationOutput` for what comes back.

        temperature 0 is greedy; otherwise sampling with top_k / top_p from a generator seeded with
        `seed` (the global RNG when None). Rows stop at the model's EOS ids (unless `stop_at_eos` is
        False) and at `stop_token_ids`; `suppress_tokens` are never generated. With `stream=True` a
        `GenerationStream` comes back at once: iterate it for each step's tokens. Without streaming the
        host checks every `check_every` steps whether all rows have stopped.
        """
        params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=top_k)
        stops = self._check_ids(stop_token_ids, "stop_token_ids")
        stops += self.eos_token_ids if stop_at_eos else []
        banned = self._check_ids(suppress_tokens, "suppress_tokens")
        input_ids, attention_mask, pixel_values = self._check_inputs(input_ids, attention_mask, pixel_values, max_new_tokens)
        generator = None
        if seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        steps = self._run(
            input_ids, attention_mask, pixel_values, max_new_tokens, params, stops, banned, generator,
            stream, return_logits, max(1, check_every),
        )
        output = GenerationStream(steps)
        if stream:
            return output
        for _ in output:
            pass
        return output.result

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _run(self, input_ids, attention_mask, pixel_values, max_new_tokens, params, stops, banned, generator,
             stream, return_logits, check_every):
        batch, width = input_ids.shape
        self.warmup(batch)
        self.synchronize()
        began = time.perf_counter()
        logits = self._prefill(input_ids, attention_mask, pixel_values)
        self.synchronize()
        prefill_seconds = time.perf_counter() - began

        began = time.perf_counter()
        stop_ids = torch.tensor(stops, dtype=torch.long, device=self.device)
        banned_ids = torch.tensor(banned, dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        tokens = torch.full((batch, max_new_tokens), self.pad_token_id, dtype=torch.long, device=self.device)
        kept_logits = []
        step = 0
        while True:
            if return_logits:
                kept_logits.append(logits.clone())
            if banned:
                logits = logits.index_fill(1, banned_ids, float("-inf"))
            new = next_tokens(logits, params, generator)
            new = torch.where(finished, self.pad_token_id, new)
            lengths += (~finished).long()
            finished |= torch.isin(new, stop_ids)
            tokens[:, step] = new
            step += 1
            if stream:
                yield new.cpu()
            if step == max_new_tokens:
                break
            if (stream or step % check_every == 0) and bool(finished.all()):
                break
            self.tokens[:batch].copy_(new)
            logits = self._decode(batch, width + step - 1)  # token `step - 1` goes to slot width + step - 1
            self.positions[:batch] += 1
        self.synchronize()
        decode_seconds = time.perf_counter() - began
        return GenerationOutput(
            tokens=tokens[:, :step].cpu(),
            lengths=lengths.cpu(),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            decode_steps=step - 1,
            logits=torch.stack(kept_logits, dim=1).cpu() if return_logits else None,
        )

    def generate_text(self, processor, images, prompts, template: str | None = None, **generate_kwargs):
        """Prompts (and image files) in, answers out; see `matvlm.engine.text.generate_text`."""
        from matvlm.engine.text import generate_text

        return generate_text(self, processor, images, prompts, template=template, **generate_kwargs)

    # ------------------------------------------------------------------ memory
    @torch.no_grad()
    def time_decode_steps(self, batch: int, context: int, steps: int, token_id: int, warm: int = 2) -> float:
        """Seconds for `steps` greedy decode steps of `batch` rows whose cache holds `context` tokens.

        For benchmarks: the cache is marked valid up to `context` without a prefill (a step costs the same
        whatever the cached values are), so long contexts are measured without the prefill's time.
        """
        if context + warm + steps > self.max_seq_len:
            raise ValueError(f"context {context} + {warm + steps} steps exceed max_seq_len {self.max_seq_len}")
        self.warmup(batch)
        self.key_valid[:batch].zero_()
        self.key_valid[:batch, :context] = True
        self.positions[:batch] = context
        self.tokens[:batch] = token_id
        began = 0.0
        for s in range(warm + steps):
            if s == warm:
                self.synchronize()
                began = time.perf_counter()
            logits = self._decode(batch, context + s)
            self.tokens[:batch].copy_(logits.argmax(-1))
            self.positions[:batch] += 1
        self.synchronize()
        return time.perf_counter() - began

    def cache_nbytes(self) -> CacheBytes:
        """Bytes this engine's static cache holds (KV and mixer state)."""
        return self.cache.nbytes()

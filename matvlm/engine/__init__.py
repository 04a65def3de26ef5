"""Fast generation: static KV cache + mixer states, CUDA graphs, batched decode, sampling."""

from matvlm.engine.cache import CacheBytes, EngineCache, cache_bytes
from matvlm.engine.engine import Engine, GenerationOutput, GenerationStream, kv_buckets
from matvlm.engine.sampling import SamplingParams, filter_logits, next_tokens
from matvlm.engine.text import TextGeneration, generate_command, generate_text

__all__ = [
    "CacheBytes",
    "Engine",
    "EngineCache",
    "GenerationOutput",
    "GenerationStream",
    "SamplingParams",
    "TextGeneration",
    "cache_bytes",
    "filter_logits",
    "generate_command",
    "generate_text",
    "kv_buckets",
    "next_tokens",
]

"""Prometheus text exposition of the scheduler's numbers (format 0.0.4, written by hand: a few gauges)."""

from __future__ import annotations

from collections.abc import Mapping

from matvlm.engine.scheduler import SchedulerStats


def prometheus_text(model: str, stats: SchedulerStats, outcomes: Mapping[str, int]) -> str:
    label = f'model="{model}"'
    rows = [
        ("matvlm_queue_depth", "gauge", "Requests waiting for a cache row.", stats.waiting),
        ("matvlm_running_requests", "gauge", "Requests holding a cache row.", stats.running),
        ("matvlm_max_batch", "gauge", "Cache rows (requests that can run at once).", stats.max_batch),
        ("matvlm_generated_tokens_per_second", "gauge", "Generated tokens per second over the recent window.",
         round(stats.tokens_per_s, 3)),
        ("matvlm_generated_tokens_total", "counter", "Tokens generated since start.", stats.generated_tokens),
        ("matvlm_cache_bytes_in_use", "gauge", "Cache bytes holding running requests (mixer states + KV so far).",
         stats.cache_bytes_in_use),
        ("matvlm_cache_bytes_free", "gauge", "Cache bytes not holding a running request.", stats.cache_bytes_free),
        ("matvlm_cache_bytes_total", "gauge", "Bytes of the preallocated cache.", stats.cache_bytes_total),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {value}"]
    lines += ["# HELP matvlm_requests_total Requests by outcome (finish reason or HTTP error status).",
              "# TYPE matvlm_requests_total counter"]
    lines += [f'matvlm_requests_total{{{label},outcome="{k}"}} {v}' for k, v in sorted(outcomes.items())]
    return "\n".join(lines) + "\n"

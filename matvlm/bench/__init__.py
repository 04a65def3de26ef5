"""Speed and memory benchmark: the teacher and its hybrids in the same engine, with the same settings.

    matvlm bench --shape tinyllava-3b --out benchmarks/ --parts decode,memory,batch,ttft

Models (random weights: speed and memory do not depend on the values) come from `build_models`, one at a
time: the teacher, then each hybrid made from a freshly built teacher that is dropped right after the
conversion, so only one model is resident while it is measured.

Parts (each measurement returns a plain, JSON-ready dict):
- decode  `decode_vs_length`: batch-1 decode tokens/s against generated length (paper Fig. 1b), one image
          + a short prompt, EOS banned so every run goes the full length; the matvlm engine and HF
          `generate` (dynamic cache; only up to `hf_max_length`, it is slow). One run of the longest
          length per model and engine, timed at every step: tokens/s at N = (N - 1) decode steps over
          their time (prefill excluded). Also `decode_at_context`: the engine's decode step alone with the
          cache filled to a given context (2,048 and 16,384 tokens), the headline numbers.
- memory  `peak_memory_vs_length`: peak device memory (weights included) of a batch-1 generation whose
          cache holds prompt + N tokens (Fig. 1c). The engine's cache is static and its CUDA graphs are
          captured for every KV bucket before the prefill, so a short decode already reaches the peak of
          the full one (`memory_decode_tokens`; None decodes all N). On the CPU only the cache bytes are
          reported (peak None).
- batch   `throughput_vs_batch`: decode tokens/s at a fixed context for batch 1, 2, 4, ... until memory
          runs out (the limit is reported), plus how many 16,384-token sequences fit in 80 GiB next to
          the weights (from `cache_bytes`).
- ttft    `time_to_first_token`: one image + a 100-token prompt to the first new token (median of repeats).

Floors. Decode at small batch is bound by memory traffic: every step reads the decoder weights, each
sequence's keys and values up to its context, and reads and writes each mixer state. `floor_tokens_per_s`
divides those bytes by the measured device bandwidth (`measure_bandwidth`: a large device-to-device copy,
read + write bytes over time); every speed is also given as a fraction of its floor. The memory floor is
weights + the static cache. TTFT is compute-bound: no floor.

`run_bench` writes `bench_<device>.json` (device, versions, command line, every setting, every
measurement; later runs with other parts or models merge into it), `bench_<device>.md` (the headline
table) and PNG plots.
"""

from matvlm.bench.common import BenchConfig, build_models, build_teacher, bytes_per_decode_step, decode_weight_bytes, floor_generation_tokens_per_s, floor_tokens_per_s, measure_bandwidth, tinyllava_3b_config, weight_bytes
from matvlm.bench.measure import concurrent_sequences, decode_at_context, decode_vs_length, peak_memory_vs_length, throughput_vs_batch, time_to_first_token
from matvlm.bench.report import headline_table, plot_results
from matvlm.bench.run import bench_command, main, replot, run_bench

__all__ = [
    "BenchConfig",
    "bench_command",
    "build_models",
    "build_teacher",
    "bytes_per_decode_step",
    "concurrent_sequences",
    "decode_at_context",
    "decode_vs_length",
    "decode_weight_bytes",
    "floor_generation_tokens_per_s",
    "floor_tokens_per_s",
    "headline_table",
    "main",
    "measure_bandwidth",
    "peak_memory_vs_length",
    "plot_results",
    "replot",
    "run_bench",
    "throughput_vs_batch",
    "time_to_first_token",
    "tinyllava_3b_config",
    "weight_bytes",
]

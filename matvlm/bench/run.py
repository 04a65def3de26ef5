"""Running a benchmark: result files (merged across runs), the command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from matvlm.model import kernels
from matvlm.engine import cache_bytes
from matvlm.devices import parse_dtype
from matvlm.io.files import write_text_atomic
from matvlm.bench.common import SHAPES, PARTS, ENGINES, GIB, BenchConfig, free_memory, build_models, decode_weight_bytes, device_name, device_slug, measure_bandwidth, powers_of_two, weight_bytes
from matvlm.bench.measure import concurrent_sequences, decode_at_context, decode_vs_length, peak_memory_vs_length, throughput_vs_batch, time_to_first_token
from matvlm.bench.report import headline_table, plot_results


# ---------------------------------------------------------------------------------------------- the run
def describe_model(model: nn.Module, cfg: BenchConfig) -> dict:
    mixers = list(getattr(model.config, "mamba_layers", None) or [])
    per_token = cache_bytes(model, 1, 1)
    at_length = cache_bytes(model, 1, cfg.concurrent_length).total
    memory = int(cfg.memory_gib * GIB)
    return {
        "kind": "hybrid" if mixers else "teacher",
        "ratio": len(mixers) / model.config.text_config.num_hidden_layers,
        "num_layers": model.config.text_config.num_hidden_layers,
        "mixer_layers": mixers,
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes(model),
        "decode_weight_bytes": decode_weight_bytes(model),
        "kv_bytes_per_token": per_token.kv,
        "mixer_state_bytes": per_token.mixer,
        "concurrent_length": cfg.concurrent_length,
        "cache_bytes_at_concurrent_length": at_length,
        "memory_bytes": memory,
        "concurrent_sequences": concurrent_sequences(model, cfg.concurrent_length, memory),
    }


def _console_log() -> Callable[[str], None]:
    try:
        from rich.console import Console
    except ImportError:  # a bare GPU image: plain lines
        return lambda message: print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)
    console = Console(stderr=True)
    return lambda message: console.print(f"{time.strftime('%H:%M:%S')} {message}", highlight=False, markup=False)


def run_bench(
    out_dir: str | Path,
    shape: str = "tinyllava-3b",
    parts: Sequence[str] = PARTS,
    device: str | None = None,
    merge: bool = True,
    plots: bool = True,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    **settings,
) -> dict:
    """Measure the parts for the teacher and each hybrid; write `bench_<device>.json`, `.md` and plots.

    `settings` are `BenchConfig` fields (ratios, lengths, hf_max_length, contexts, memory_lengths,
    batches, ...). With `merge`, an existing result file of the same device, shape and dtype keeps what
    this run does not measure (other parts or models); a file of another shape or dtype is an error.
    The file is rewritten after every model, so a run cut short keeps what it measured.
    """
    cfg = BenchConfig(shape=shape, parts=tuple(parts), device=device, **settings)
    log = log or _console_log()
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dtype = parse_dtype(cfg.dtype, dev.type)
    dtype_name = str(dtype).removeprefix("torch.")
    name = device_name(dev)
    out_dir = Path(out_dir)
    path = out_dir / f"bench_{device_slug(name)}.json"

    results = _start_results(path, merge, name, cfg.shape, dtype_name)
    bandwidth = measure_bandwidth(dev)
    log(f"bench {cfg.shape} on {name} ({dtype_name}): copy bandwidth {bandwidth:.0f} GB/s; parts {', '.join(cfg.parts)}")
    results["bandwidth_gb_s"] = bandwidth
    results["runs"].append({
        "command": command or shlex.join(sys.argv),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": _jsonable(asdict(cfg)),
        "bandwidth_gb_s": bandwidth,
        "cuda_graph": dev.type == "cuda" if cfg.use_cuda_graph == "auto" else bool(cfg.use_cuda_graph),
        "scan_backend": kernels.scan_backend(dev.type),
    })
    graph = cfg.use_cuda_graph

    for model_key, model in build_models(cfg.shape, cfg.ratios, dev, dtype, cfg.teacher, cfg.seed):
        log(f"{model_key}: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters")
        results["models"][model_key] = describe_model(model, cfg)
        if "decode" in cfg.parts:
            entry = {}
            for engine in cfg.engines:
                lengths = [n for n in cfg.lengths if engine == "matvlm" or n <= cfg.hf_max_length]
                if lengths:
                    log(f"{model_key}: decode, {engine} engine, {lengths[-1]} tokens")
                    entry[engine] = decode_vs_length(model, lengths, engine, cfg.prompt_tokens, bandwidth, graph,
                                                     cfg.seed, log)
            log(f"{model_key}: decode step at contexts {list(cfg.contexts)}")
            entry["at_context"] = decode_at_context(model, cfg.contexts, 1, cfg.decode_steps, bandwidth, graph)
            results["decode"][model_key] = {**results["decode"].get(model_key, {}), **entry}  # keep other engines
        if "memory" in cfg.parts:
            log(f"{model_key}: memory at {list(cfg.memory_lengths)} tokens")
            results["memory"][model_key] = peak_memory_vs_length(
                model, cfg.memory_lengths, cfg.prompt_tokens, cfg.memory_decode_tokens, graph, cfg.seed, log)
        if "batch" in cfg.parts:
            log(f"{model_key}: batch sweep at {cfg.batch_context} tokens")
            results["batch"][model_key] = throughput_vs_batch(
                model, cfg.batch_context, cfg.batches, cfg.decode_steps, bandwidth, int(cfg.memory_gib * GIB),
                cfg.concurrent_length, graph, log)
        if "ttft" in cfg.parts:
            entry = {}
            for engine in cfg.engines:
                entry[engine] = time_to_first_token(model, cfg.ttft_prompt_tokens, engine, cfg.ttft_repeats, graph,
                                                    cfg.seed)
                log(f"{model_key}: time to first token ({engine}) {entry[engine]['seconds'] * 1e3:.1f} ms")
            results["ttft"][model_key] = {**results["ttft"].get(model_key, {}), **entry}
        del model
        free_memory(dev)
        results["headline"] = headline_table(results)
        write_text_atomic(path, json.dumps(results, indent=2) + "\n")  # after every model: a run cut short keeps it

    write_text_atomic(out_dir / f"{path.stem}.md", results["headline"] + "\n")
    if plots:
        try:
            results["plots"] = [p.name for p in plot_results(results, out_dir, path.stem)]
            write_text_atomic(path, json.dumps(results, indent=2) + "\n")
        except ImportError:
            log(f"matplotlib is not installed: no plots; make them elsewhere with `python -m matvlm.bench --replot {path}`")
    log(f"results in {path}")
    return results


def replot(path: str | Path) -> list[Path]:
    """Plots and headline table again from a result file (e.g. one made on a machine without matplotlib)."""
    path = Path(path)
    results = json.loads(path.read_text())
    results["headline"] = headline_table(results)
    write_text_atomic(path.with_suffix(".md"), results["headline"] + "\n")
    written = plot_results(results, path.parent, path.stem)
    results["plots"] = [p.name for p in written]
    write_text_atomic(path, json.dumps(results, indent=2) + "\n")
    return written


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _start_results(path: Path, merge: bool, name: str, shape: str, dtype: str) -> dict:
    import transformers

    from matvlm import __version__

    header = {"device": name, "shape": shape, "dtype": dtype}
    if merge and path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); move it away or run without merging") from err
        theirs = {k: old.get(k) for k in header}
        if theirs != header:
            raise ValueError(
                f"{path} holds results for {theirs}, this run is {header}: choose another output folder or "
                "start a fresh file (--fresh)"
            )
        old.update(torch=torch.__version__, transformers=transformers.__version__, matvlm=__version__)
        return old
    return {
        **header,
        "device_type": "cuda" if name != "cpu" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "matvlm": __version__,
        "python": sys.version.split()[0],
        "runs": [],
        "models": {},
        **{part: {} for part in PARTS},
    }



# ---------------------------------------------------------------------------------------------- command
def _split(text: str, kind: Callable, what: str) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}") from err


def bench_command(
    shape: str = "tinyllava-3b",
    out: str | Path = "runs/bench",
    parts: str = ",".join(PARTS),
    max_length: int = 16384,
    max_memory_length: int = 32768,
    hf_max_length: int = 1024,
    ratios: str = "0.125,0.25,0.5",
    teacher: bool = True,
    engines: str = ",".join(ENGINES),
    contexts: str = "2048,16384",
    batch_context: int = 4096,
    device: str | None = None,
    dtype: str | None = None,
    fresh: bool = False,
) -> dict:
    """`matvlm bench`: the options as strings and numbers, lengths as powers of two from 256 (smaller
    maxima are measured as given). Raises ValueError on a bad option."""
    start = min(256, max_length)
    return run_bench(
        out, shape=shape, parts=_split(parts, str.strip, "--parts"), device=device, merge=not fresh,
        ratios=_split(ratios, float, "--ratios"), teacher=teacher, engines=_split(engines, str.strip, "--engines"),
        lengths=powers_of_two(start, max_length), memory_lengths=powers_of_two(min(256, max_memory_length), max_memory_length),
        hf_max_length=hf_max_length, contexts=_split(contexts, int, "--contexts"), batch_context=batch_context,
        dtype=dtype,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m matvlm.bench ...`: the same options as `matvlm bench`, for machines without typer."""
    p = argparse.ArgumentParser(prog="python -m matvlm.bench", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tinyllava-3b", choices=SHAPES)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--max-length", type=int, default=16384)
    p.add_argument("--max-memory-length", type=int, default=32768)
    p.add_argument("--hf-max-length", type=int, default=1024)
    p.add_argument("--ratios", default="0.125,0.25,0.5")
    p.add_argument("--no-teacher", action="store_true")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--contexts", default="2048,16384")
    p.add_argument("--batch-context", type=int, default=4096)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--fresh", action="store_true", help="start a new result file instead of merging")
    p.add_argument("--replot", default=None, help="only redraw plots and table from this result file")
    a = p.parse_args(argv)
    if a.replot:
        for path in replot(a.replot):
            print(path)
        return
    results = bench_command(a.shape, a.out, a.parts, a.max_length, a.max_memory_length, a.hf_max_length, a.ratios,
                            not a.no_teacher, a.engines, a.contexts, a.batch_context, a.device, a.dtype, a.fresh)
    print(results["headline"])



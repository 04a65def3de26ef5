"""The headline table and the plots of a benchmark result file."""

from __future__ import annotations

from pathlib import Path

from matvlm.bench.common import GIB




# ---------------------------------------------------------------------------------------------- report
def _model_order(results: dict) -> list[str]:
    names = list(results.get("models", {}))
    return sorted(names, key=lambda n: (n != "teacher", results["models"][n].get("ratio", 0)))


def format_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _ratio(value, reference) -> str:
    return f"{value / reference:.2f}x" if value and reference else "–"


def headline_table(results: dict) -> str:
    """Markdown: per model, decode tokens/s at each headline context (and % of its floor), the cache at
    the concurrent length, how many such sequences fit next to the weights, TTFT, each also vs the teacher."""
    contexts = next((list(e["at_context"]["contexts"]) for e in results.get("decode", {}).values()
                     if "at_context" in e), [])
    models = results.get("models", {})
    teacher = models.get("teacher", {})
    t_decode = results.get("decode", {}).get("teacher", {}).get("at_context", {})
    t_ttft = results.get("ttft", {}).get("teacher", {}).get("matvlm", {}).get("seconds")
    length = next(iter(models.values()), {}).get("concurrent_length", 16384)
    memory_gib = next(iter(models.values()), {}).get("memory_bytes", 80 * GIB) / GIB
    head = ["model", "mixer layers"]
    for c in contexts:
        head += [f"tokens/s @ {c:,}", "% of floor", "vs teacher"]
    head += [f"cache @ {length:,}", "vs teacher", f"{length:,}-token sequences in {memory_gib:g} GiB", "vs teacher",
             "TTFT (ms)", "vs teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in _model_order(results):
        info = models[name]
        row = [name, ", ".join(map(str, info["mixer_layers"])) or "–"]
        at = results.get("decode", {}).get(name, {}).get("at_context", {})
        for i, c in enumerate(contexts):
            tps = at.get("tokens_per_s", [None] * len(contexts))[i] if at.get("contexts") == contexts else None
            pct = at.get("pct_of_floor", [None] * len(contexts))[i] if at.get("contexts") == contexts else None
            ref = t_decode.get("tokens_per_s", [None] * len(contexts))[i] if t_decode.get("contexts") == contexts else None
            row += [f"{tps:,.1f}" if tps else "–", f"{pct:.0f}%" if pct else "–", _ratio(tps, ref)]
        cache = info["cache_bytes_at_concurrent_length"]
        row += [format_bytes(cache), _ratio(cache, teacher.get("cache_bytes_at_concurrent_length"))]
        row += [f"{info['concurrent_sequences']:,}", _ratio(info["concurrent_sequences"], teacher.get("concurrent_sequences"))]
        ttft = results.get("ttft", {}).get(name, {}).get("matvlm", {}).get("seconds")
        row += [f"{ttft * 1e3:.1f}" if ttft else "–", _ratio(ttft, t_ttft)]
        lines.append("| " + " | ".join(row) + " |")
    note = (f"{results.get('device', '?')}, {results.get('dtype', '?')}, batch 1, matvlm engine; floor = bytes per "
            f"decode step / {results.get('bandwidth_gb_s', 0):,.0f} GB/s copy bandwidth; cache = KV + mixer state of "
            f"one sequence; sequences = (memory - weights) / cache.")
    return "\n".join(lines) + "\n\n" + note


def _log2_x(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)
    return path


def plot_results(results: dict, out_dir: str | Path, stem: str) -> list[Path]:
    """PNG plots of what `results` holds: decode tokens/s vs length, memory vs length, throughput vs batch;
    each floor dashed in its model's colour."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    out_dir = Path(out_dir)
    names = _model_order(results)
    colours = {n: f"C{i}" for i, n in enumerate(names)}
    where = f"{results.get('device', '?')}, {results.get('dtype', '?')}"
    written = []

    decode = results.get("decode", {})
    if any(e for e in decode.values()):
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        for n in names:
            for engine, style in (("matvlm", "-o"), ("hf", ":s")):
                r = decode.get(n, {}).get(engine)
                if not r:
                    continue
                pts = [(x, y) for x, y in zip(r["lengths"], r["tokens_per_s"]) if y]
                ax.plot(*zip(*pts), style, color=colours[n], label=f"{n} ({engine})", markersize=4)
                if engine == "matvlm" and r.get("floor_tokens_per_s"):
                    ax.plot(r["lengths"], r["floor_tokens_per_s"], "--", color=colours[n], alpha=0.5, linewidth=1)
        ax.set(yscale="log", xlabel="generated tokens", ylabel="decode tokens/s (batch 1)",
               title=f"Decode speed vs length ({where}); dashed: bandwidth floor")
        _log2_x(ax)
        written.append(_save(fig, out_dir / f"{stem}_decode.png"))

    memory = results.get("memory", {})
    if any(memory.values()):
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        for n in names:
            r = memory.get(n)
            if not r:
                continue
            x = [row["length"] for row in r["rows"]]
            peaks = [row["peak_bytes"] for row in r["rows"]]
            if all(p is not None for p in peaks):
                ax.plot(x, [p / GIB for p in peaks], "-o", color=colours[n], label=f"{n} peak", markersize=4)
            ax.plot(x, [row["floor_bytes"] / GIB for row in r["rows"]], "--", color=colours[n], alpha=0.6,
                    label=f"{n} weights + cache")
        ax.set(xlabel="generated tokens", ylabel="GiB", title=f"Memory vs length, batch 1 ({where})")
        _log2_x(ax)
        written.append(_save(fig, out_dir / f"{stem}_memory.png"))

    batch = results.get("batch", {})
    if any(batch.values()):
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        for n in names:
            r = batch.get(n)
            if not r or not r["batches"]:
                continue
            label = n + (f" (out of memory at {r['oom_at']})" if r.get("oom_at") else "")
            ax.plot(r["batches"], r["tokens_per_s"], "-o", color=colours[n], label=label, markersize=4)
            if r.get("floor_tokens_per_s"):
                ax.plot(r["batches"], r["floor_tokens_per_s"], "--", color=colours[n], alpha=0.5, linewidth=1)
        context = next((r["context"] for r in batch.values() if r), "?")
        ax.set(yscale="log", xlabel="batch", ylabel="decode tokens/s (all rows)",
               title=f"Throughput vs batch at {context} tokens ({where}); dashed: floor")
        _log2_x(ax)
        written.append(_save(fig, out_dir / f"{stem}_batch.png"))
    return written

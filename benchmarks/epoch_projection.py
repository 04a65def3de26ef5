"""How long one distillation epoch over YOUR data takes, from a measured throughput.

    python benchmarks/epoch_projection.py --teacher runs/tinyllava-hf --data sharegpt4v_mix665k.json \
        --bench benchmarks/results/distill_3b_h100_2026-11/scale_3b_h100_b4_liger_compilelayers.json [--sample 20000] [--out proj.json]

`scale_3b.py` projects an epoch as if every record had the 1,428-token maximum. Real records are shorter:
this script counts the exact tokens of (a random sample of) the data set with the teacher's tokenizer and
template, image blocks included and cut at --max-length as training does, and divides the epoch's tokens
by the benchmark's tokens/s. It assumes tokens/s does not depend on length, which is close for batches of
similar lengths (the length-grouped sampler) and errs on the slow side for short ones (attention is cheaper).
No image is read: the counts need only the JSON. The benchmark must be of the teacher's shape (for a
TinyLLaVA-3.1B teacher: a `scale_3b.py` run), on the GPUs the epoch will use.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matvlm.data.llava import SupervisedDataset, load_records
from matvlm.io import guess_template, read_model_info, write_json_atomic
from matvlm.io import load_processor


def project(counts: list[int], records: int, tokens_per_second: float) -> dict:
    """Epoch tokens and hours from the sampled token counts, scaled to `records`."""
    mean = statistics.fmean(counts)
    ordered = sorted(counts)
    tokens = mean * records
    return {
        "records": records, "sampled": len(counts), "mean_tokens": round(mean, 1),
        "median_tokens": ordered[len(ordered) // 2], "p90_tokens": ordered[int(0.9 * (len(ordered) - 1))],
        "max_tokens": ordered[-1], "epoch_tokens": round(tokens), "tokens_per_second": tokens_per_second,
        "epoch_hours": round(tokens / tokens_per_second / 3600, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="HF Llava teacher directory (its tokenizer and image tokens)")
    p.add_argument("--data", required=True, help="LLaVA JSON training records")
    p.add_argument("--bench", required=True, help="a scale_3b.py / ddp_scaling.py JSON with tokens_per_second")
    p.add_argument("--sample", type=int, default=20000, help="records to tokenise (0: all)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--template", default="", help="chat template (default: the teacher's)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    processor = load_processor(args.teacher)
    config = json.loads((Path(args.teacher) / "config.json").read_text())
    template = args.template or read_model_info(args.teacher).get("template") or guess_template(processor.tokenizer)
    records = load_records(args.data)
    dataset = SupervisedDataset(records, [], processor.tokenizer, None, template, config["image_seq_length"],
                                args.max_length, source=args.data)
    counts = dataset.token_counts(sample=args.sample or None)
    if not counts:
        raise SystemExit(f"{args.data}: no usable record to count (see SupervisedDataset.find_problems)")
    bench = json.loads(Path(args.bench).read_text())
    result = project(counts, len(records), float(bench["tokens_per_second"]))
    result.update(data=args.data, teacher=args.teacher, bench=args.bench, bench_device=bench.get("device") or bench.get("devices"),
                  bench_command=bench.get("command"), skipped_bad=min(len(records), args.sample or len(records)) - len(counts))
    print(json.dumps(result, indent=1))
    if args.out:
        write_json_atomic(Path(args.out), result, indent=1)
    return result


if __name__ == "__main__":
    main()

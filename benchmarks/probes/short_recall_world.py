"""Write a probe world whose held-out split is short recall records only, so that a teacher run's periodic
evaluation (or `matvlm eval`) measures the look-up where distance does not hide it.

    python benchmarks/probes/short_recall_world.py runs/world runs/world_short_recall [--n 120] [--family F] [--text-only]

OUT gets WORLD's world.json, a test.json of N records of a training-only short recall family (recall_short: 0-3
filler turns, the default; recall_next: none; named "recall" so that the evaluator scores them as recall) drawn
in a split of their own ("probe", never a training split), and their images. A teacher run pointed at OUT
(`--data OUT` with `generated_train`) trains on generated records as usual and evaluates on these. --text-only
writes them without their image (for runs that train the family as text: `text_only_families`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from matvlm.data import synth
from matvlm.data.generated import without_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--family", default="recall_short", choices=["recall_short", "recall_next"])
    parser.add_argument("--text-only", action="store_true", help="records without their image")
    args = parser.parse_args()
    meta = json.loads((args.world / "world.json").read_text())
    world = synth._World.make(meta["seed"], meta["image_size"])
    (args.out / "images" / "probe").mkdir(parents=True, exist_ok=True)
    shutil.copy(args.world / "world.json", args.out / "world.json")
    records = []
    for i in range(args.n):
        record, image = synth._make_record(world, "probe", i, args.family, i)
        if args.text_only:
            record = without_image(record)
        else:
            image.save(args.out / "images" / record["image"])
        records.append({**record, "family": "recall"})
    (args.out / "test.json").write_text(json.dumps(records))
    turns = [r["distance_turns"] for r in records]
    print(f"wrote {len(records)} {args.family} records to {args.out} (filler turns: "
          + ", ".join(f"{k}: {turns.count(k)}" for k in sorted(set(turns))) + ")")


if __name__ == "__main__":
    main()

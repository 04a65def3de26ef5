"""How a teacher answers the world's recall records: does it copy one of the stated numbers, and does its accuracy
follow 1 / facts (a random pick among them) or rise above it (the look-up)?

    python benchmarks/probes/recall_errors.py matvlm/assets/teacher --data runs/world [--out recall_errors.json]

Reads the held-out recall records (test.json), answers them greedily (matvlm.eval.runner.generate_answers) and
prints accuracy, the share of answers that are a stated number, the chance of a random stated number (mean of
1 / facts), and accuracy by number of facts and by distance (words between the facts and the question).
"""

from __future__ import annotations

import re
from collections import defaultdict

from teacher_answers import answer_family, probe_args, report

FACT = re.compile(r"The key for the \w+ \w+ is (\d+)\.")


def stated_numbers(record: dict) -> list[str]:
    return FACT.findall(record["conversations"][0]["value"])


DISTANCE_BINS = ("<50", "<200", "<500", ">=500")


def distance_bin(words: int) -> str:
    for edge in (50, 200, 500):
        if words < edge:
            return f"<{edge}"
    return ">=500"


def summarise(records: list[dict], predictions: dict[str, str]) -> dict:
    by_facts, by_distance = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    right = stated = chance = 0
    for r in records:
        answer, numbers = predictions[r["id"]], stated_numbers(r)
        ok = answer == r["answers"][0]
        right += ok
        stated += answer in numbers
        chance += 1 / len(numbers)
        for table, key in ((by_facts, len(numbers)), (by_distance, distance_bin(r["distance"]))):
            table[key][0] += ok
            table[key][1] += 1
    n = len(records)
    return {
        "n": n,
        "accuracy": right / n,
        "answers_a_stated_number": stated / n,
        "chance_of_a_random_stated_number": chance / n,
        "by_facts": {str(k): {"accuracy": v[0] / v[1], "n": v[1]} for k, v in sorted(by_facts.items())},
        "by_distance_words": {k: {"accuracy": by_distance[k][0] / by_distance[k][1], "n": by_distance[k][1]}
                              for k in DISTANCE_BINS if k in by_distance},
    }


def main() -> None:
    args = probe_args(__doc__)
    records, predictions = answer_family(args.teacher, args.data, "recall", args.batch_size)
    result = {"teacher": str(args.teacher), **summarise(records, predictions)}
    report(result, args.out)


if __name__ == "__main__":
    main()

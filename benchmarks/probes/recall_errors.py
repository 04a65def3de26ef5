"""How a teacher answers the world's recall records: does it copy one of the stated numbers, and does its accuracy
follow 1 / facts (a random pick among them) or rise above it (the look-up)?

    python benchmarks/probes/recall_errors.py matvlm/assets/teacher --data runs/world [--out recall_errors.json]

Reads the held-out recall records (test.json), answers them greedily (matvlm.eval.runner.generate_answers) and
prints accuracy, the share of answers that are a stated number, the chance of a random stated number (mean of
1 / facts), accuracy by number of facts and by distance (words between the facts and the question), and which
wrong fact a wrong stated answer comes from: its key's overlap with the asked key (same colour, same noun) and its
place in the list (first, last), each beside its share among the wrong facts (what a random wrong pick gives).
"""

from __future__ import annotations

import re
from collections import defaultdict

from teacher_answers import answer_family, probe_args, report

FACT = re.compile(r"The key for the (\w+) (\w+) is (\d+)\.")


def stated_facts(record: dict) -> list[tuple[str, str, str]]:
    """-> [(colour, noun, number)] in the order stated."""
    return FACT.findall(record["conversations"][0]["value"])


def stated_numbers(record: dict) -> list[str]:
    return [number for _, _, number in stated_facts(record)]


def _wrong_pick_traits(facts: list[tuple[str, str, str]], asked: int, index: int) -> list[str]:
    """What sets wrong fact `index` apart from the asked one: key overlap and place in the list."""
    (colour, noun, _), (c, n, _) = facts[asked], facts[index]
    traits = ["same colour" if c == colour else "same noun" if n == noun else "no shared word"]
    traits += ["first"] * (index == 0) + ["last"] * (index == len(facts) - 1)
    return traits


DISTANCE_BINS = ("<50", "<200", "<500", ">=500")


def distance_bin(words: int) -> str:
    for edge in (50, 200, 500):
        if words < edge:
            return f"<{edge}"
    return ">=500"


def summarise(records: list[dict], predictions: dict[str, str]) -> dict:
    by_facts, by_distance = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    picked, expected = defaultdict(float), defaultdict(float)  # wrong stated picks: observed and random
    right = stated = chance = wrong_stated = 0
    for r in records:
        answer, facts = predictions[r["id"]], stated_facts(r)
        numbers = [number for _, _, number in facts]
        ok = answer == r["answers"][0]
        right += ok
        stated += answer in numbers
        chance += 1 / len(numbers)
        if not ok and answer in numbers and r["answers"][0] in numbers:
            asked = numbers.index(r["answers"][0])  # the values are distinct (drawn without replacement)
            wrong = [i for i in range(len(facts)) if i != asked]
            wrong_stated += 1
            for trait in _wrong_pick_traits(facts, asked, numbers.index(answer)):
                picked[trait] += 1
            for i in wrong:
                for trait in _wrong_pick_traits(facts, asked, i):
                    expected[trait] += 1 / len(wrong)
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
        "wrong_stated_picks": {"n": wrong_stated, **{
            trait: {"share": picked[trait] / wrong_stated, "random_wrong_pick": expected[trait] / wrong_stated}
            for trait in ("same colour", "same noun", "no shared word", "first", "last") if wrong_stated}},
    }


def main() -> None:
    args = probe_args(__doc__)
    records, predictions = answer_family(args.teacher, args.data, "recall", args.batch_size)
    result = {"teacher": str(args.teacher), **summarise(records, predictions)}
    report(result, args.out)


if __name__ == "__main__":
    main()

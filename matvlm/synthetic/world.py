"""The synthetic visual question-answering world: a deterministic generator of LLaVA-format data.

`generate_world(out_dir, n_train, n_test, seed)` writes images and LLaVA JSON records for nine task
families that mirror the paper's benchmarks (perception, counting, spatial relations, OCR-like copying,
POPE-like presence, multiple choice, captions, multi-turn follow-ups, long-context associative recall).

Design choices:
- every record carries its scene, and `answer_from_scene` recomputes the answer by parsing the question
  text against the same templates, so the data can be checked, not trusted;
- the test split uses its own RNG stream and contains combinations never seen in training
  (colour-shape pairs, OCR words), listed in world.json;
- each record has its own RNG (seeded from seed, split and index), so output is byte-identical for the
  same arguments and a record does not change when the split gets longer.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matvlm.io.files import write_text_atomic
from matvlm.synthetic.scene import (
    BACKGROUNDS, COLORS, GRID, PLURALS, SHAPES, SIZES, Obj, cell_size, place, png_bytes, render, text_layout,
)

GENERATOR_VERSION = "1.0.0"

# family -> metric of its scored (last) answer
FAMILIES: dict[str, str] = {
    "attribute": "exact",
    "count": "exact",
    "spatial": "exact",
    "ocr": "vqa",
    "presence": "yesno",
    "mc": "mc",
    "caption": "caption",
    "multiturn": "exact",
    "recall": "exact",
}
# Training-only families: made for a teacher's training mix (`GeneratedRecords`), never written to a test split
# nor scored. Without dense copying in its data a small LM does not learn the recall look-up:
# - repeat: plain text (a prompt-completion record, no chat template, no image): 8-24 words, then the same
#   words again, the second copy supervised. This is what starts the look-up;
# - copy: the same inside a chat record ("Repeat these words: ..." -> the words), learned as a copy without the
#   look-up following;
# - recall_short: recall with 0-RECALL_SHORT_MAX_FILLER filler turns, a distance curriculum (the world's recall
#   has 0-96 filler turns);
# - recall_next: recall with no filler turn, the question right after the facts' acknowledgement: the shortest
#   distance, where a small LM starts the look-up;
# - ocr_pseudo: OCR of made-up words (consonant-vowel syllables), which no word prior can guess, so a teacher
#   learns to read letters instead of answering a seen word of similar shape.
TRAIN_ONLY_FAMILIES: dict[str, str] = {"copy": "exact", "repeat": "exact", "recall_short": "exact",
                                       "recall_next": "exact", "ocr_pseudo": "vqa"}
TEXT_FAMILIES: tuple[str, ...] = ("repeat",)  # plain-text records: no scene, no image
COPY_WORDS = (8, 24)  # words a copy or repeat record repeats
_METRIC_OF: dict[str, str] = FAMILIES | TRAIN_ONLY_FAMILIES  # every family make_record can make
METRICS: tuple[str, ...] = ("exact", "vqa", "yesno", "mc", "caption")
PRESENCE_SUBSETS: tuple[str, ...] = ("random", "popular", "adversarial")
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"
RECALL_ACK = "OK, I will remember them."
RECALL_NOUNS: tuple[str, ...] = ("door", "box", "gate", "locker", "chest", "drawer", "safe", "cabinet")
RECALL_MAX_FILLER_TURNS = 96  # about 1,000 words for the longest conversations
RECALL_SHORT_MAX_FILLER = 3
N_HELDOUT_PAIRS = 6
HELDOUT_WORD_FRACTION = 0.2
HELDOUT_TEST_RATE = 0.2  # share of test objects drawn from the held-out colour-shape pairs
ATTRS: tuple[str, ...] = ("size", "color", "shape")  # also the word order of descriptions

# Real words for OCR (no colour or shape names, so that a misread cannot look like another answer).
LONG_WORDS: tuple[str, ...] = tuple("""
garden window basket silver planet rocket forest bridge candle castle dragon engine falcon guitar
hammer island jacket kitten ladder marble needle pepper rabbit saddle tunnel violin walnut zipper
anchor butter carpet dinner fabric goblet harbor insect jungle kettle mirror napkin oyster parrot
ribbon salmon ticket velvet wizard author beacon cactus donkey empire feather glacier helmet iceberg
journey kingdom lantern meadow nectar orchard pillow rainbow shadow thunder unicorn village whisper
blanket compass eclipse fortune giraffe horizon justice kitchen library mission network octopus
pyramid rooster sunrise teacher volcano weather balloon captain dolphin factory gallery history
jasmine lobster machine penguin picture printer pumpkin railway science station trumpet wallet
biscuit chimney costume crystal curtain harvest holiday mustard oatmeal package panther pelican
program sandwich scooter stadium teapot tornado trolley waffle whistle airport backpack birthday
building calendar campfire carnival chocolate computer dinosaur elephant envelope fireworks football
hospital keyboard mountain notebook painting platform sailboat skeleton snowball spaceship squirrel
sunflower telephone treasure umbrella universe vacation waterfall blueprint butterfly cardboard
classroom crocodile adventure astronaut breakfast lighthouse microphone motorcycle photograph
strawberry supermarket thunderstorm toothbrush watermelon wheelbarrow grasshopper refrigerator
playground newspaper pineapple raspberry snowflake submarine telescope tractor
""".split())
SHORT_WORDS: tuple[str, ...] = tuple("""
oak pine sun moon bay hill lake park road lane cafe shop bank farm mill port dock inn club gym zoo
fish wolf bear lion fox owl duck frog rose lily fern sea sky ice fire rock gold iron salt tea jam pie
cake bread soup rice corn bean old new big top north south east west city town hall house tower
street room exit
""".split())
# Mixed codes avoid characters that look alike in the font (0/o, 1/l/i).
CODE_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"


# ----------------------------------------------------------------------------------------------------
# Question templates. The same table generates questions and parses them back (answer_from_scene).

_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_FIELD_PATTERNS: dict[str, str] = {
    "obj": rf"it|the (?:(?:small|large) )?(?:(?:{_C}) )?(?:{_S}|object)",
    "group": rf"(?:(?:small|large) )?(?:(?:{_C}) )?(?:{'|'.join(PLURALS.values())}|objects)",
    "a_pair": rf"an? (?:{_C}) (?:{_S})",
    "rel": "to the left of|to the right of|above|below",
    "attr": "color|shape",
    "color": _C,
    "noun": "|".join(RECALL_NOUNS),
    "words": r"[a-z0-9]+(?: [a-z0-9]+)*",
    "facts": rf"(?: The key for the (?:{_C}) (?:{'|'.join(RECALL_NOUNS)}) is \d+\.)+",
}
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color_of": ("What color is {obj}?", "What is the color of {obj}?", "Which color does {obj} have?"),
    "shape_of": ("What shape is {obj}?", "What is the shape of {obj}?", "Which shape does {obj} have?"),
    "size_of": ("What size is {obj}?", "Is {obj} small or large?", "Is {obj} large or small?"),
    "count": ("How many {group} are there?", "How many {group} are in the image?", "How many {group} can you see?"),
    "more": ("Are there more {group} than {group2}?",),
    "rel": ("Is {obj} {rel} {obj2}?",),
    "left_right": ("Is {obj} to the left or to the right of {obj2}?",),
    "above_below": ("Is {obj} above or below {obj2}?",),
    "near_color": ("What color is the object nearest to {obj}?", "What color is the object closest to {obj}?"),
    "near_shape": ("What shape is the object nearest to {obj}?", "What shape is the object closest to {obj}?"),
    "same_count": ("How many other objects have the same {attr} as {obj}?",),
    "present": ("Is there {a_pair} in the image?", "Do you see {a_pair} in the image?",
                "Does the image contain {a_pair}?"),
    "which_present": ("Which of these objects is in the image?",),
    "ocr": ("What is written in the image?", "What does the sign say?", "What text is shown in the image?",
            "Read the text in the image."),
    "caption": ("Describe the image briefly.", "Give a short description of the image.",
                "What does the image show? Answer with one sentence."),
    "facts": ("Remember these facts.{facts}",),
    "recall": ("What is the key for the {color} {noun}?", "Which number is the key for the {color} {noun}?"),
    "copy": ("Repeat these words: {words}", "Say these words again: {words}"),
}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # a field name; obj2 / group2 use the pattern of obj / group
            out.append(f"(?P<{part}>{_FIELD_PATTERNS[part.rstrip('0123456789')]})")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


_PARSERS: list[tuple[str, re.Pattern[str]]] = [(k, _compile(t)) for k, ts in TEMPLATES.items() for t in ts]
_MC_RE = re.compile(r"(?P<stem>[\s\S]+?)\nA\. (?P<A>[^\n]+)\nB\. (?P<B>[^\n]+)\nC\. (?P<C>[^\n]+)"
                    r"\nD\. (?P<D>[^\n]+)\n" + re.escape(MC_INSTRUCTION))
_FACT_RE = re.compile(rf"The key for the ({_C}) ({_FIELD_PATTERNS['noun']}) is (\d+)\.")


def parse_question(text: str) -> tuple[str, dict[str, str]]:
    """(kind, fields) of a question written by this generator; ValueError unless exactly one template fits."""
    hits = [(kind, m.groupdict()) for kind, pat in _PARSERS if (m := pat.fullmatch(text))]
    if len(hits) != 1:
        raise ValueError(f"{len(hits)} templates match question {text!r}")
    return hits[0]


# ----------------------------------------------------------------------------------------------------
# Reading a scene: descriptions, filters, answers.

def _matches(o: dict[str, Any], want: dict[str, str]) -> bool:
    for k, v in want.items():
        if o[k] != v:
            return False
    return True


def _describe(o: dict[str, Any], attrs: Sequence[str]) -> str:
    """'the large red circle' using only `attrs` (noun 'object' when the shape is not used)."""
    words = [o[a] for a in ("size", "color") if a in attrs]
    return "the " + " ".join(words + [o["shape"] if "shape" in attrs else "object"])


def _group_text(want: dict[str, str]) -> str:
    words = [want[a] for a in ("size", "color") if a in want]
    return " ".join(words + [PLURALS[want["shape"]] if "shape" in want else "objects"])


def _parse_words(text: str) -> dict[str, str]:
    """Attribute filter from a description or group ('the small red object', 'large stars')."""
    want: dict[str, str] = {}
    plural_to_shape = {p: s for s, p in PLURALS.items()}
    for w in text.split():
        if w in SIZES:
            want["size"] = w
        elif w in COLORS:
            want["color"] = w
        elif w in SHAPES or w in plural_to_shape:
            want["shape"] = plural_to_shape.get(w, w)
    return want


# Attribute subsets usable in a description, given the attribute a question asks about (not usable).
_SUBSETS: dict[str | None, list[tuple[str, ...]]] = {
    ex: [s for k in (1, 2, 3) for s in itertools.combinations([a for a in ATTRS if a != ex], k)]
    for ex in (None, *ATTRS)
}


def _descriptions(objs: Sequence[dict[str, Any]], exclude: str | None = None) -> dict[int, list[list[str]]]:
    """For each object that can be singled out without `exclude`: the attribute subsets that do it."""
    out: dict[int, list[list[str]]] = {}
    for subset in _SUBSETS[exclude]:
        proj = [tuple(o[a] for a in subset) for o in objs]
        counts = Counter(proj)
        for i, p in enumerate(proj):
            if counts[p] == 1:
                out.setdefault(i, []).append(list(subset))
    return out


def _resolve(desc: str, scene: dict[str, Any], context: Sequence[str]) -> dict[str, Any]:
    """The one object a description refers to; 'it' is the object of the previous question."""
    if desc == "it":
        if not context:
            raise ValueError("'it' without a previous question")
        _, fields = parse_question(context[-1])
        if fields.get("obj") in (None, "it"):
            raise ValueError(f"no referent for 'it' in {context[-1]!r}")
        return _resolve(fields["obj"], scene, context[:-1])
    found = [o for o in scene["objects"] if _matches(o, _parse_words(desc))]
    if len(found) != 1:
        raise ValueError(f"{desc!r} matches {len(found)} objects")
    return found[0]


def _nearest(scene: dict[str, Any], target: dict[str, Any], margin: float = 1.0) -> dict[str, Any] | None:
    """Nearest other object, or None if the runner-up is not `margin` times farther."""
    others = sorted((((o["x"] - target["x"]) ** 2 + (o["y"] - target["y"]) ** 2) ** 0.5, k)
                    for k, o in enumerate(scene["objects"]) if o is not target)
    if not others or (len(others) > 1 and others[1][0] < margin * others[0][0]) or others[0][0] == 0:
        return None
    return scene["objects"][others[0][1]]


def caption_of(scene: dict[str, Any]) -> str:
    """Fixed grammar: objects in reading order, then the background."""
    objs = sorted(scene["objects"], key=lambda o: (o["row"], o["col"]))
    items = [f"a {o['size']} {o['color']} {o['shape']}" for o in objs]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{listed} on a {scene['background']} background"


def _article(color: str, shape: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def _solve(question: str, scene: dict[str, Any], context: Sequence[str]) -> str:
    """Canonical answer of one question about `scene`; `context` = earlier human turns, oldest first."""
    mc = _MC_RE.fullmatch(question)
    if mc:
        options = [mc.group(L) for L in LETTERS]
        kind, f = parse_question(mc.group("stem"))
        if kind == "which_present":
            good = [k for k, opt in enumerate(options)
                    if any(f"{o['color']} {o['shape']}" == opt for o in scene["objects"])]
        else:
            ans = _solve(mc.group("stem"), scene, context)
            good = [k for k, opt in enumerate(options) if opt == ans]
        if len(good) != 1:
            raise ValueError(f"{len(good)} correct options in {question!r}")
        return LETTERS[good[0]]

    kind, f = parse_question(question)
    objs = scene["objects"]
    if kind in ("color_of", "shape_of", "size_of"):
        return _resolve(f["obj"], scene, context)[kind.removesuffix("_of")]
    if kind == "count":
        return str(sum(_matches(o, _parse_words(f["group"])) for o in objs))
    if kind == "more":
        n1, n2 = (sum(_matches(o, _parse_words(f[g])) for o in objs) for g in ("group", "group2"))
        return "yes" if n1 > n2 else "no"
    if kind in ("rel", "left_right", "above_below"):
        a, b = _resolve(f["obj"], scene, context), _resolve(f["obj2"], scene, context)
        if kind == "left_right":
            return "left" if a["x"] < b["x"] else "right"
        if kind == "above_below":
            return "above" if a["y"] < b["y"] else "below"
        holds = {"to the left of": a["x"] < b["x"], "to the right of": a["x"] > b["x"],
                 "above": a["y"] < b["y"], "below": a["y"] > b["y"]}[f["rel"]]
        return "yes" if holds else "no"
    if kind in ("near_color", "near_shape"):
        near = _nearest(scene, _resolve(f["obj"], scene, context))
        if near is None:
            raise ValueError(f"no unique nearest object for {question!r}")
        return near["color" if kind == "near_color" else "shape"]
    if kind == "same_count":
        it = _resolve(f["obj"], scene, context)
        return str(sum(o[f["attr"]] == it[f["attr"]] for o in objs if o is not it))
    if kind == "present":
        _, color, shape = f["a_pair"].split()
        return "yes" if any(o["color"] == color and o["shape"] == shape for o in objs) else "no"
    if kind == "ocr":
        return scene["text"]["string"]
    if kind == "caption":
        return caption_of(scene)
    if kind == "facts":
        return RECALL_ACK
    if kind == "copy":
        return f["words"]
    if kind == "recall":
        facts = {(c, n): v for turn in context for c, n, v in _FACT_RE.findall(turn)}
        return facts[(f["color"], f["noun"])]
    raise ValueError(f"question kind {kind!r} has no answer on its own")


def answer_from_scene(record: dict[str, Any]) -> str:
    """Recompute the canonical answer of the record's last gpt turn from its scene and conversation."""
    humans = [t["value"] for t in record["conversations"] if t["from"] == "human"]
    humans[0] = humans[0].removeprefix("<image>\n")
    return _solve(humans[-1], record["scene"], humans[:-1])


# ----------------------------------------------------------------------------------------------------
# The world: held-out combinations and object popularity, derived from the seed only.

@dataclass(frozen=True)
class World:
    seed: int
    image_size: int
    heldout_pairs: tuple[tuple[str, str], ...]
    heldout_words: tuple[str, ...]
    popularity: dict[tuple[str, str], float]  # train frequency weight of each allowed (colour, shape)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def make(seed: int, image_size: int) -> World:
        rng = random.Random(f"matvlm-synth:{seed}:world")
        # Held-out pairs use distinct colours and shapes, so each colour and shape stays common in train.
        colors, shapes = rng.sample(list(COLORS), N_HELDOUT_PAIRS), rng.sample(list(SHAPES), N_HELDOUT_PAIRS)
        heldout = tuple(sorted(zip(colors, shapes)))
        allowed = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in heldout]
        # A skewed prior (Zipf-like) gives POPE's 'popular' negatives something to mean.
        ranked = rng.sample(allowed, len(allowed))
        popularity = {p: 1.0 / (rank + 1) ** 0.5 for rank, p in enumerate(ranked)}
        words = sorted(set(LONG_WORDS) | set(SHORT_WORDS))
        held_words = tuple(sorted(rng.sample(words, round(HELDOUT_WORD_FRACTION * len(words)))))
        return World(seed, image_size, heldout, held_words, popularity)

    def candidates(self, split: str, color: str | None, shape: str | None) -> tuple[list[tuple[str, str]], list[float]]:
        """Pairs of the split that fit the constraints, and their cumulative weights (cached)."""
        key = (split, color, shape)
        if key not in self._cache:
            weights = self.pair_weights(split)
            pairs = [p for p in weights if color in (None, p[0]) and shape in (None, p[1])]
            self._cache[key] = (pairs, list(itertools.accumulate(weights[p] for p in pairs)))
        return self._cache[key]

    def pair_weights(self, split: str) -> dict[tuple[str, str], float]:
        weights = dict(self.popularity)
        if split == "test":  # held-out pairs get HELDOUT_TEST_RATE of all objects in test
            each = HELDOUT_TEST_RATE / (1 - HELDOUT_TEST_RATE) * sum(weights.values()) / len(self.heldout_pairs)
            weights.update({p: each for p in self.heldout_pairs})
        return weights

    def words(self, pool: Sequence[str], heldout: bool) -> list[str]:
        held = set(self.heldout_words)
        return [w for w in pool if (w in held) == heldout]


# ----------------------------------------------------------------------------------------------------
# Generation helpers.

class _Retry(Exception):
    """The sampled scene cannot carry the wanted question; sample again."""


@dataclass
class _Draft:
    turns: list[tuple[str, str]]
    objects: list[dict[str, Any]]
    kind: str
    text: dict[str, Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class _Gen:
    """Sampling state of one record: its RNG, the split's allowed pairs, and the family-local index."""

    def __init__(self, world: World, split: str, stream: str, k: int) -> None:
        self.world, self.split, self.k = world, split, k
        self.rng = random.Random(f"matvlm-synth:{world.seed}:{split}:{stream}")
        self._memo: dict[tuple[Any, ...], Any] = {}
        self.pairs = world.candidates(split, None, None)[0]
        self.size = world.image_size
        self.background = self.rng.choice(list(BACKGROUNDS))

    # --- objects
    def obj(self, color: str | None = None, shape: str | None = None, size: str | None = None) -> Obj:
        pairs, cum = self.world.candidates(self.split, color, shape)
        if not pairs:
            raise _Retry
        (c, s), = self.rng.choices(pairs, cum_weights=cum)
        return Obj(s, c, size or self.rng.choice(SIZES))

    def near(self, seed: Obj) -> Obj:
        """An object sharing one or two attributes with `seed`: the distractors that make tasks hard."""
        for _ in range(20):
            keep = self.rng.sample(ATTRS, self.rng.randint(1, 2))
            o = self.obj(**{a: getattr(seed, a) for a in keep})
            if o != seed:
                return o
        return self.obj()

    def objects(self, n: int, near_rate: float = 0.5) -> list[Obj]:
        if n == 0:
            return []
        seed = self.obj()
        return [seed] + [self.near(seed) if self.rng.random() < near_rate else self.obj() for _ in range(n - 1)]

    def place(self, objs: list[Obj], rows: Sequence[int] = range(GRID)) -> list[dict[str, Any]]:
        cells = [(r, c) for r in rows for c in range(GRID)]
        if len(objs) > len(cells):
            raise ValueError("more objects than grid cells")
        order = self.rng.sample(objs, len(objs))  # shuffle so the seed object is not always first
        return place(self.rng, order, self.rng.sample(cells, len(objs)), self.size)

    # --- text
    def ask(self, kind: str, **fields: str) -> str:
        return self.rng.choice(TEMPLATES[kind]).format(**fields)

    def describable(self, objs: list[dict[str, Any]], exclude: str | None = None) -> dict[int, list[list[str]]]:
        # Memoised: long recall conversations ask about the same scene ~100 times.
        key = (id(objs), exclude)
        if key not in self._memo:
            self._memo[key] = _descriptions(objs, exclude)
        return self._memo[key]

    def allowed(self, color: str, shape: str) -> bool:
        return (color, shape) in self.pairs


def _separated(a: dict[str, Any], b: dict[str, Any], axis: str, size: int) -> bool:
    """Far enough apart along an axis that left/right or above/below is clear to the eye."""
    return abs(a[axis] - b[axis]) >= cell_size(size) // 2


# --- questions that can be asked about any placed scene (multi-turn context and recall fillers)

def _attribute_q(g: _Gen, objs: list[dict[str, Any]], attr: str) -> tuple[str, str, int, list[str]]:
    cands = g.describable(objs, exclude=attr)
    if not cands:
        raise _Retry
    i = g.rng.choice(sorted(cands))
    subset = g.rng.choice(cands[i])
    return g.ask(f"{attr}_of", obj=_describe(objs[i], subset)), objs[i][attr], i, subset


def _count_q(g: _Gen, objs: list[dict[str, Any]]) -> tuple[str, str]:
    o = g.rng.choice(objs)
    keep = g.rng.choice([[], ["color"], ["shape"], ["size"], ["color", "shape"], ["size", "shape"]])
    want = {a: o[a] for a in keep}
    if g.rng.random() < 0.2:  # sometimes a group that is absent: the answer 0 must be seen too
        want = {a: g.obj()._asdict()[a] for a in keep}
    if "color" in want and "shape" in want and not g.allowed(want["color"], want["shape"]):
        raise _Retry
    return g.ask("count", group=_group_text(want)), str(sum(_matches(x, want) for x in objs))


def _relation_q(g: _Gen, objs: list[dict[str, Any]], i: int | None = None) -> tuple[str, str]:
    """'Is A left of B?' (or 'left or right?'); A = objs[i] (then asked as 'it') or any describable one."""
    cands = g.describable(objs)
    key = ("pairs", id(objs), i)
    if key not in g._memo:
        firsts = [i] if i is not None else sorted(cands)
        g._memo[key] = [(a, b, axis) for a in firsts for b in sorted(cands) if a != b
                        for axis in ("x", "y") if _separated(objs[a], objs[b], axis, g.size)]
    pairs = g._memo[key]
    if not pairs:
        raise _Retry
    a, b, axis = g.rng.choice(pairs)
    da = "it" if i is not None else _describe(objs[a], g.rng.choice(cands[a]))
    db = _describe(objs[b], g.rng.choice(cands[b]))
    before = objs[a][axis] < objs[b][axis]
    form = g.rng.random()
    if form < 0.3:
        if axis == "x":
            return g.ask("left_right", obj=da, obj2=db), "left" if before else "right"
        return g.ask("above_below", obj=da, obj2=db), "above" if before else "below"
    rel = g.rng.choice(["to the left of", "to the right of"] if axis == "x" else ["above", "below"])
    return g.ask("rel", obj=da, rel=rel, obj2=db), "yes" if before == (rel in ("to the left of", "above")) else "no"


def _nearest_q(g: _Gen, objs: list[dict[str, Any]], i: int | None = None, attr: str | None = None) -> tuple[str, str]:
    cands = g.describable(objs)
    key = ("nearest", id(objs), i)
    if key not in g._memo:  # object index -> its clearly nearest neighbour
        firsts = [i] if i is not None else sorted(cands)
        scene = {"objects": objs}
        g._memo[key] = {a: n for a in firsts if (n := _nearest(scene, objs[a], margin=1.25)) is not None}
    ok = g._memo[key]
    if not ok:
        raise _Retry
    a = g.rng.choice(sorted(ok))
    near = ok[a]
    desc = "it" if i is not None else _describe(objs[a], g.rng.choice(cands[a]))
    attr = attr or g.rng.choice(["color", "shape"])
    return g.ask(f"near_{attr}", obj=desc), near[attr]


def _presence_q(g: _Gen, objs: list[dict[str, Any]]) -> tuple[str, str]:
    if g.rng.random() < 0.5:
        o = g.rng.choice(objs)
        color, shape = o["color"], o["shape"]
    else:
        o2 = g.obj()
        color, shape = o2.color, o2.shape
    present = any(o["color"] == color and o["shape"] == shape for o in objs)
    return g.ask("present", a_pair=_article(color, shape)), "yes" if present else "no"


def _simple_qa(g: _Gen, objs: list[dict[str, Any]]) -> tuple[str, str]:
    """Any self-contained question about the scene (no context needed)."""
    for _ in range(20):
        try:
            r = g.rng.random()
            if r < 0.35:
                q, a, _, _ = _attribute_q(g, objs, g.rng.choice(ATTRS))
                return q, a
            if r < 0.55:
                return _count_q(g, objs)
            if r < 0.75:
                return _relation_q(g, objs)
            if r < 0.85:
                return _nearest_q(g, objs)
            return _presence_q(g, objs)
        except _Retry:
            continue
    raise _Retry


# --- the families. Each returns a draft whose last gpt turn is the scored answer.

def _fam_attribute(g: _Gen) -> _Draft:
    attr = ATTRS[g.k % 3]
    objs = g.place(g.objects(g.rng.randint(3, 9), near_rate=0.6))
    q, a, _, _ = _attribute_q(g, objs, attr)
    return _Draft([(q, a)], objs, kind=f"{attr}_of")


def _count_scene(g: _Gen, hi: int) -> tuple[list[Obj], dict[str, str], int]:
    """Exactly c objects of a random group (c <= hi; 3..16 for 'objects'), plus distractors outside it."""
    seed = g.obj()
    keep = g.rng.choice([[], ["color"], ["shape"], ["color"], ["shape"], ["color", "shape"], ["size", "shape"],
                         ["size", "color"]])
    want = {a: getattr(seed, a) for a in keep}
    cells = GRID * GRID
    if not want:
        c = g.rng.randint(3, cells)
        return [g.obj() for _ in range(c)], want, c
    c = 0 if g.rng.random() < 0.06 else g.rng.randint(1, hi)
    objs = [g.obj(**want) for _ in range(c)]
    for _ in range(g.rng.randint(1 if c else 2, min(6, cells - c))):
        while _matches((o := (g.near(seed) if g.rng.random() < 0.5 else g.obj()))._asdict(), want):
            pass
        objs.append(o)
    return objs, want, c


def _fam_count(g: _Gen) -> _Draft:
    if g.rng.random() < 0.25:  # comparison of two counts
        attr = g.rng.choice(["color", "shape"])
        v1, v2 = g.rng.sample(list(COLORS) if attr == "color" else list(SHAPES), 2)
        c1, c2 = g.rng.sample(range(1, 9), 2)
        objs = [g.obj(**{attr: v1}) for _ in range(c1)] + [g.obj(**{attr: v2}) for _ in range(c2)]
        for _ in range(g.rng.randint(0, min(3, GRID * GRID - c1 - c2))):
            while getattr(o := g.obj(), attr) in (v1, v2):
                pass
            objs.append(o)
        placed = g.place(objs)
        q = g.ask("more", group=_group_text({attr: v1}), group2=_group_text({attr: v2}))
        return _Draft([(q, "yes" if c1 > c2 else "no")], placed, kind="more")
    objs, want, c = _count_scene(g, 12)
    return _Draft([(g.ask("count", group=_group_text(want)), str(c))], g.place(objs), kind="count")


def _fam_spatial(g: _Gen) -> _Draft:
    objs = g.place(g.objects(g.rng.randint(4, 10)))
    if g.rng.random() < 0.75:
        q, a = _relation_q(g, objs)
    else:
        q, a = _nearest_q(g, objs)
    return _Draft([(q, a)], objs, kind=parse_question(q)[0])


def _ocr_string(g: _Gen) -> tuple[str, str]:
    """(string, type): a word, two words, a word and a number, a long number or a mixed code."""
    rng = g.rng
    held = g.split == "test" and rng.random() < 0.5  # half the test words were never seen in training
    longs = g.world.words(LONG_WORDS, held) or g.world.words(LONG_WORDS, False)
    shorts = g.world.words(SHORT_WORDS, held) or g.world.words(SHORT_WORDS, False)
    kind = rng.choice(["word", "phrase", "number", "code"])
    if kind == "word":
        s = rng.choice(longs)
    elif kind == "phrase":
        r = rng.random()
        if r < 0.4:
            s = f"{rng.choice(longs)} {rng.choice(shorts)}"
        elif r < 0.7:
            s = f"{rng.choice(shorts)} {rng.choice(longs)}"
        else:
            s = f"{rng.choice(shorts + longs)} {rng.randint(1, 9999)}"
    elif kind == "number":
        n = rng.randint(6, 12)
        s = str(rng.randint(1, 9)) + "".join(rng.choice("0123456789") for _ in range(n - 1))
    else:
        while True:
            s = "".join(rng.choice(CODE_ALPHABET) for _ in range(rng.randint(6, 16)))
            if any(ch.isdigit() for ch in s) and any(ch.isalpha() for ch in s):
                break
    if not 6 <= len(s) <= 16:
        raise _Retry
    return s, kind


_KNOWN_WORDS = frozenset((*LONG_WORDS, *SHORT_WORDS, *COLORS, *SHAPES, *SIZES, *RECALL_NOUNS))
_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "cl", "dr", "fl",
           "gr", "pl", "sh", "st", "tr", "ch", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "oo", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "t", "m", "ck", "nd", "st")


def _pseudo_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _pseudo_string(g: _Gen) -> tuple[str, str]:
    """(string, type): one or two made-up words, or one and a number; never one of the world's words."""
    rng = g.rng
    s, r = _pseudo_word(rng, rng.randint(2, 3)), rng.random()
    if r >= 0.5:
        s += f" {_pseudo_word(rng, rng.randint(1, 2))}" if r < 0.8 else f" {rng.randint(1, 9999)}"
    if not 6 <= len(s) <= 16 or set(s.split()) & _KNOWN_WORDS:
        raise _Retry
    return s, "pseudo"


def _fam_ocr(g: _Gen, string: Callable[[_Gen], tuple[str, str]] = _ocr_string) -> _Draft:
    s, kind = string(g)
    top = g.rng.random() < 0.5
    text = text_layout(s, g.size, top)
    if text is None:
        raise _Retry
    rows = range(2, GRID) if top else range(0, GRID - 2)
    objs = g.place(g.objects(g.rng.randint(0, 5)) if g.rng.random() < 0.9 else [], rows)
    return _Draft([(g.ask("ocr"), s)], objs, kind="ocr", text=text, extras={"text_type": kind})


def _fam_presence(g: _Gen) -> _Draft:
    # The family-local index balances yes/no and the three subsets exactly.
    truth, subset = g.k % 2 == 0, PRESENCE_SUBSETS[(g.k // 2) % 3]
    objs = g.place(g.objects(g.rng.randint(3, 8)))
    shown = {(o["color"], o["shape"]) for o in objs}
    if truth:
        pair = g.rng.choice(sorted(shown))
    else:
        absent = sorted(p for p in g.pairs if p not in shown)
        if subset == "popular":  # the most frequent pairs of the training prior
            ranked = sorted((p for p in absent if p in g.world.popularity), key=lambda p: -g.world.popularity[p])
            pool = ranked[:3]
        elif subset == "adversarial":  # binds a shown colour to a shown shape
            colors, shapes = {c for c, _ in shown}, {s for _, s in shown}
            pool = [p for p in absent if p[0] in colors and p[1] in shapes]
            pool = pool or [p for p in absent if p[0] in colors or p[1] in shapes]
        else:
            pool = absent
        if not pool:
            raise _Retry
        pair = g.rng.choice(pool)
    q = g.ask("present", a_pair=_article(*pair))
    return _Draft([(q, "yes" if truth else "no")], objs, kind="present", extras={"subset": subset})


def _fam_mc(g: _Gen) -> _Draft:
    rng = g.rng
    stem_kind = rng.choice(["color_of", "shape_of", "count", "which_present", "near_color"])
    if stem_kind in ("color_of", "shape_of"):
        attr = stem_kind.removesuffix("_of")
        objs = g.place(g.objects(rng.randint(3, 9), near_rate=0.6))
        stem, answer, _, _ = _attribute_q(g, objs, attr)
        domain = list(COLORS) if attr == "color" else list(SHAPES)
        shown = sorted({o[attr] for o in objs} - {answer})  # options seen in the image are harder
        wrong = rng.sample(shown, min(2, len(shown)))
        wrong += rng.sample(sorted(set(domain) - set(wrong) - {answer}), 3 - len(wrong))
    elif stem_kind == "count":
        objs_raw, want, c = _count_scene(g, 10)
        objs = g.place(objs_raw)
        stem, answer = g.ask("count", group=_group_text(want)), str(c)
        wrong = [str(v) for v in rng.sample([v for v in range(max(0, c - 3), c + 4) if v != c], 3)]
    elif stem_kind == "near_color":
        objs = g.place(g.objects(rng.randint(4, 10)))
        stem, answer = _nearest_q(g, objs, attr="color")
        wrong = rng.sample(sorted(set(COLORS) - {answer}), 3)
    else:
        objs = g.place(g.objects(rng.randint(3, 7)))
        shown = {(o["color"], o["shape"]) for o in objs}
        colors, shapes = {c for c, _ in shown}, {s for _, s in shown}
        absent = sorted(p for p in g.pairs if p not in shown and (p[0] in colors or p[1] in shapes))
        if len(absent) < 3:
            raise _Retry
        stem = g.ask("which_present")
        answer = " ".join(rng.choice(sorted(shown)))
        wrong = [" ".join(p) for p in rng.sample(absent, 3)]
    rng.shuffle(wrong)
    pos = g.k % 4  # balanced letters
    choices = wrong[:pos] + [answer] + wrong[pos:]
    q = stem + "\n" + "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, choices)) + "\n" + MC_INSTRUCTION
    return _Draft([(q, LETTERS[pos])], objs, kind=f"mc_{stem_kind}", extras={"choices": choices})


def _fam_caption(g: _Gen) -> _Draft:
    objs = g.place(g.objects(g.rng.randint(2, 9), near_rate=0.3))
    ans = caption_of({"objects": objs, "background": g.background})
    return _Draft([(g.ask("caption"), ans)], objs, kind="caption")


def _fam_multiturn(g: _Gen) -> _Draft:
    """2-4 turns; the last refers back to the previous turn's object as 'it'."""
    rng = g.rng
    objs = g.place(g.objects(rng.randint(4, 10), near_rate=0.6))
    n_turns = 2 + g.k % 3
    turns = [_simple_qa(g, objs) for _ in range(n_turns - 2)]
    asked = rng.choice(ATTRS)
    q, a, i, subset = _attribute_q(g, objs, asked)
    turns.append((q, a))
    # Follow-ups must need the image: never ask for what the previous question already names.
    unknown = [x for x in ATTRS if x not in subset and x != asked]
    unnamed = [x for x in ("color", "shape") if x not in subset]
    options = (["attr"] if unknown else []) + (["same"] if unnamed else []) + ["rel", "near"]
    for choice in rng.sample(options, len(options)):
        try:
            if choice == "attr":
                attr = rng.choice(unknown)
                last = (g.ask(f"{attr}_of", obj="it"), objs[i][attr])
            elif choice == "same":
                attr = rng.choice(unnamed)
                n = sum(o[attr] == objs[i][attr] for j, o in enumerate(objs) if j != i)
                last = (g.ask("same_count", attr=attr, obj="it"), str(n))
            elif choice == "rel":
                last = _relation_q(g, objs, i)
            else:
                last = _nearest_q(g, objs, i)
            break
        except _Retry:
            continue
    else:
        raise _Retry
    turns.append(last)
    return _Draft(turns, objs, kind="followup_" + parse_question(last[0])[0])


def _fam_recall(g: _Gen, n_filler: int | None = None) -> _Draft:
    """`n_filler` fixes the number of filler turns (curricula); None draws it as the world does."""
    rng = g.rng
    objs = g.place(g.objects(rng.randint(5, 10)))
    keys: list[tuple[str, str]] = [(rng.choice(list(COLORS)), rng.choice(RECALL_NOUNS))]
    for _ in range(rng.randint(1, 4)):  # near-miss facts: same colour or same noun
        c, n = rng.choice(keys)
        key = (c, rng.choice(RECALL_NOUNS)) if rng.random() < 0.5 else (rng.choice(list(COLORS)), n)
        if key not in keys:
            keys.append(key)
    values = rng.sample(range(100), len(keys))
    facts = "".join(f" The key for the {c} {n} is {v}." for (c, n), v in zip(keys, values))
    turns = [(g.ask("facts", facts=facts), RECALL_ACK)]
    # Log-uniform distance: short gaps are common, the longest (~1,000 words) still well represented,
    # and long records do not dominate the training tokens.
    drawn = round((RECALL_MAX_FILLER_TURNS + 1) ** rng.random()) - 1  # drawn either way: the same stream
    n_filler = drawn if n_filler is None else n_filler
    turns += [_simple_qa(g, objs) for _ in range(n_filler)]
    distance = sum(len(q.split()) + len(a.split()) for q, a in turns[1:])
    t = rng.randrange(len(keys))
    turns.append((g.ask("recall", color=keys[t][0], noun=keys[t][1]), str(values[t])))
    return _Draft(turns, objs, kind="recall", extras={"distance": distance, "distance_turns": n_filler,
                                                      "n_facts": len(keys)})


# The words of questions and answers (colours, shapes, sizes, recall nouns, numbers): one token each.
_WORLD_WORDS: tuple[str, ...] = (*COLORS, *SHAPES, *SIZES, *RECALL_NOUNS, *map(str, range(100)))


def _repeat_record(world: World, split: str, index: int) -> dict[str, Any]:
    """Training only: a plain-text record of one-token world words (colours, shapes, sizes, recall nouns,
    numbers) said twice, the second time as the completion."""
    rng = random.Random(f"matvlm-synth:{world.seed}:{split}:{index}:repeat")
    words = " ".join(rng.choice(_WORLD_WORDS) for _ in range(rng.randint(*COPY_WORDS)))
    return {"id": f"{split}-{index:07d}", "prompt": " " + words, "completion": " " + words, "family": "repeat",
            "metric": TRAIN_ONLY_FAMILIES["repeat"], "answers": [words], "kind": "repeat", "heldout": False}


def _fam_recall_short(g: _Gen) -> _Draft:
    """Training only: a recall record with 0-RECALL_SHORT_MAX_FILLER filler turns."""
    return _fam_recall(g, g.rng.randint(0, RECALL_SHORT_MAX_FILLER))


def _fam_copy(g: _Gen) -> _Draft:
    """Training only: repeat 8-24 words drawn from the world's vocabulary (colours, shapes, sizes, recall nouns,
    numbers, the training split's OCR words; never a held-out word). The image is a scene like any other."""
    rng = g.rng
    objs = g.place(g.objects(rng.randint(1, 6)))
    pool = list(_WORLD_WORDS) + g.world.words(SHORT_WORDS + LONG_WORDS, heldout=False)
    words = " ".join(rng.choice(pool) for _ in range(rng.randint(*COPY_WORDS)))
    return _Draft([(g.ask("copy", words=words), words)], objs, kind="copy")


_FAMILY_FUNCS = {
    "attribute": _fam_attribute, "count": _fam_count, "spatial": _fam_spatial, "ocr": _fam_ocr,
    "presence": _fam_presence, "mc": _fam_mc, "caption": _fam_caption, "multiturn": _fam_multiturn,
    "recall": _fam_recall, "copy": _fam_copy, "recall_short": _fam_recall_short,
    "recall_next": lambda g: _fam_recall(g, 0),
    "ocr_pseudo": lambda g: _fam_ocr(g, _pseudo_string),
}


# ----------------------------------------------------------------------------------------------------
# Records and the world on disk.

def _mentions_heldout(world: World, draft: _Draft) -> bool:
    if any((o["color"], o["shape"]) in world.heldout_pairs for o in draft.objects):
        return True
    texts = " ".join(q + " " + a for q, a in draft.turns) + " " + " ".join(map(str, draft.extras.get("choices", [])))
    if any(f"{c} {s}" in texts for c, s in world.heldout_pairs):
        return True
    return bool(draft.text) and any(w in world.heldout_words for w in draft.text["string"].split())


def _make_record(world: World, split: str, index: int, family: str, k: int) -> tuple[dict[str, Any], Any]:
    """One record and its PIL image; deterministic in (world, split, index)."""
    record = make_record(world, split, index, family, k)
    return record, render(record["scene"])


def make_record(world: World, split: str, index: int, family: str, k: int) -> dict[str, Any]:
    """One record without its image (its `scene` draws it; a TEXT_FAMILIES record is plain text, with neither);
    deterministic in (world, split, index)."""
    if family in TEXT_FAMILIES:
        return _repeat_record(world, split, index)
    rid = f"{split}-{index:07d}"
    for attempt in range(100):
        g = _Gen(world, split, f"{index}" if attempt == 0 else f"{index}/{attempt}", k)
        try:
            draft = _FAMILY_FUNCS[family](g)
            break
        except _Retry:
            continue
    else:  # pragma: no cover - every family succeeds within a few tries
        raise RuntimeError(f"could not generate {family} record {rid}")
    scene: dict[str, Any] = {"image_size": world.image_size, "background": g.background, "objects": draft.objects}
    if draft.text:
        scene["text"] = draft.text
    conv = []
    for t, (q, a) in enumerate(draft.turns):
        conv.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    record = {"id": rid, "image": f"{split}/{rid}.png", "conversations": conv, "family": family,
              "metric": _METRIC_OF[family], "answers": [draft.turns[-1][1]], "scene": scene, "kind": draft.kind,
              "heldout": _mentions_heldout(world, draft), **draft.extras}
    return record


def _write_json(path: Path, obj: Any, one_record_per_line: bool = False) -> None:
    if one_record_per_line:  # still one JSON list, but greppable
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in obj) + "\n]\n"
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
    write_text_atomic(path, text)


def _make_block(job: tuple, world: World | None = None) -> list[dict[str, Any]]:
    """Make records for a block of indices and write their PNGs; returns the records."""
    seed, image_size, split, indices, families, img_dir = job
    world = world or World.make(seed, image_size)
    records = []
    for i in indices:
        family = families[i % len(families)]
        record, image = _make_record(world, split, i, family, i // len(families))
        (Path(img_dir) / f"{record['id']}.png").write_bytes(png_bytes(image))
        records.append(record)
    return records


def generate_world(out_dir: str | os.PathLike[str], n_train: int, n_test: int, seed: int = 0,
                   image_size: int = 128, families: list[str] | None = None, progress: bool = False,
                   workers: int = 1) -> dict[str, Any]:
    """Write the synthetic world to out_dir (images/, train.json, test.json, world.json); returns world.json.

    Families are assigned round-robin in the given order, so every family gets n/len(families) records.
    """
    families = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        only = [f for f in unknown if f in TRAIN_ONLY_FAMILIES]
        raise ValueError(f"unknown or no families {unknown}; choose from {list(FAMILIES)}"
                         + (f" ({only} are training-only: a teacher's train_only_families makes them)" if only else ""))
    if image_size < 64:
        raise ValueError("image_size must be >= 64 (text and small shapes become unreadable below)")
    if n_train < 0 or n_test < 0:
        raise ValueError("record counts must be >= 0")
    world = World.make(seed, image_size)
    out = Path(out_dir)
    counts: dict[str, dict[str, int]] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        if workers > 1:
            # Records are deterministic in (world, split, index), so blocks can be made in parallel.
            blocks = [range(a, min(a + 512, n)) for a in range(0, n, 512)]
            jobs = [(seed, image_size, split, list(b), families, str(img_dir)) for b in blocks]
            with ProcessPoolExecutor(workers) as pool:
                parts = pool.map(_make_block, jobs)
                if progress:
                    from tqdm import tqdm
                    parts = tqdm(parts, total=len(jobs), desc=f"synth {split}", unit="block")
                records = [r for part in parts for r in part]
        else:
            indices: Any = range(n)
            if progress:
                from tqdm import tqdm
                indices = tqdm(indices, desc=f"synth {split}", unit="rec")
            records = _make_block((seed, image_size, split, indices, families, str(img_dir)), world)
        _write_json(out / f"{split}.json", records, one_record_per_line=True)
        counts[split] = {f: sum(r["family"] == f for r in records) for f in families}
    info = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "families": {f: FAMILIES[f] for f in families},
        "counts": counts,
        "heldout": {"color_shape_pairs": [list(p) for p in world.heldout_pairs],
                    "ocr_words": list(world.heldout_words)},
        "colors": {c: list(rgb) for c, rgb in COLORS.items()},
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "grid": GRID,
    }
    _write_json(out / "world.json", info)  # written last: its presence marks a complete world
    return info

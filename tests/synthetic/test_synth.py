"""The synthetic world generator: determinism, schema, held-out split, answers and images agree with scenes."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from matvlm.synthetic.scene import BACKGROUNDS, COLORS, GRID, PANEL_FILL, PLURALS, SHAPES, SIZES, cell_size, font
from matvlm.synthetic.world import (
    FAMILIES,
    GENERATOR_VERSION,
    LETTERS,
    METRICS,
    PRESENCE_SUBSETS,
    RECALL_NOUNS,
    TRAIN_ONLY_FAMILIES,
    World,
    answer_from_scene,
    caption_of,
    generate_world,
    make_record,
    parse_question,
)

N_TRAIN, N_TEST, SEED = 18 * len(FAMILIES), 9 * len(FAMILIES), 3
WORLD_ARGS = dict(n_train=N_TRAIN, n_test=N_TEST, seed=SEED)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, **WORLD_ARGS)
    return out


def _records(root: Path, split: str) -> list[dict]:
    return json.loads((root / f"{split}.json").read_text())


def _all(root: Path) -> list[dict]:
    return _records(root, "train") + _records(root, "test")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ determinism

def test_same_arguments_give_identical_files(world, tmp_path):
    # Another process with another hash seed: catches any dependence on set or dict-of-set ordering.
    # The stub package skips matvlm/__init__ (torch, transformers): the generator needs neither.
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('matvlm'); pkg.__path__ = [sys.argv[2]]; sys.modules['matvlm'] = pkg\n"
        "from matvlm.synthetic.world import generate_world\n"
        f"generate_world(sys.argv[1], {N_TRAIN}, {N_TEST}, seed={SEED})"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    package_dir = Path(__import__("matvlm.synthetic.world").__file__).parent
    subprocess.run([sys.executable, "-c", code, str(tmp_path), str(package_dir)], check=True, env=env, timeout=120)
    first, second = _files(world), _files(tmp_path)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    assert len([k for k in first if k.endswith(".png")]) == N_TRAIN + N_TEST


def test_other_seed_gives_other_world(world, tmp_path):
    generate_world(tmp_path, n_train=len(FAMILIES), n_test=0, seed=SEED + 1)
    assert (tmp_path / "train.json").read_bytes() != (world / "train.json").read_bytes()


def test_records_do_not_depend_on_split_length(world, tmp_path):
    # Each record has its own RNG stream: a shorter world is a prefix of a longer one.
    generate_world(tmp_path, n_train=len(FAMILIES), n_test=3, seed=SEED)
    assert _records(tmp_path, "train") == _records(world, "train")[: len(FAMILIES)]
    assert _records(tmp_path, "test") == _records(world, "test")[:3]


# ------------------------------------------------------------------------------------------ schema

def test_every_record_follows_the_llava_schema(world):
    for split in ("train", "test"):
        for r in _records(world, split):
            assert isinstance(r["id"], str) and r["id"].startswith(split + "-")
            assert r["image"] == f"{split}/{r['id']}.png"
            assert (world / "images" / r["image"]).is_file()
            conv = r["conversations"]
            assert len(conv) >= 2 and len(conv) % 2 == 0
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert all(isinstance(t["value"], str) and t["value"].strip() for t in conv)
            assert conv[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in conv) == 1
            assert r["family"] in FAMILIES and r["metric"] == FAMILIES[r["family"]] and r["metric"] in METRICS
            assert r["answers"] and all(isinstance(a, str) and a for a in r["answers"])
            assert r["answers"][0] == conv[-1]["value"]
            assert isinstance(r["scene"], dict) and r["scene"]["image_size"] == 128
            if r["metric"] == "mc":
                assert len(r["choices"]) == 4 and r["answers"][0] in LETTERS
                assert f"\n{r['answers'][0]}. " in conv[-2]["value"]
            else:  # short, lower-case answers (captions are long by design)
                assert r["answers"][0] == r["answers"][0].lower()
                if r["metric"] != "caption":
                    assert len(r["answers"][0].split()) <= 3
            if r["family"] == "presence":
                assert r["subset"] in PRESENCE_SUBSETS and r["answers"][0] in ("yes", "no")
            if r["family"] == "recall":
                assert isinstance(r["distance"], int) and r["distance"] >= 0


def test_every_family_is_present_and_counted(world):
    info = json.loads((world / "world.json").read_text())
    assert info["generator_version"] == GENERATOR_VERSION and info["seed"] == SEED and info["image_size"] == 128
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        recs = _records(world, split)
        assert len(recs) == n
        counts = {f: sum(r["family"] == f for r in recs) for f in FAMILIES}
        assert counts == info["counts"][split]
        assert all(c == n // len(FAMILIES) for c in counts.values())


def test_return_value_is_world_json(tmp_path):
    info = generate_world(tmp_path, n_train=4, n_test=2, families=["ocr", "presence"])
    assert info == json.loads((tmp_path / "world.json").read_text())
    assert {r["family"] for r in _all(tmp_path)} == {"ocr", "presence"}
    assert set(info["counts"]["train"]) == {"ocr", "presence"}


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError):
        generate_world(tmp_path, 1, 1, families=["nope"])
    with pytest.raises(ValueError):
        generate_world(tmp_path, 1, 1, image_size=32)
    with pytest.raises(ValueError, match="copy"):  # training-only: never written to a (test) split
        generate_world(tmp_path, 1, 1, families=["copy"])


def test_progress_bar(tmp_path, capsys):
    generate_world(tmp_path, n_train=2, n_test=1, progress=True)
    assert "synth train" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ held-out split

def test_splits_are_disjoint_and_held_out_combinations_stay_out_of_train(world):
    info = json.loads((world / "world.json").read_text())
    pairs = [tuple(p) for p in info["heldout"]["color_shape_pairs"]]
    words = set(info["heldout"]["ocr_words"])
    assert len(pairs) >= 4 and len(words) >= 20
    train, test = _records(world, "train"), _records(world, "test")
    assert not {r["id"] for r in train} & {r["id"] for r in test}

    def objects_with_heldout_pair(r):
        return [o for o in r["scene"]["objects"] if (o["color"], o["shape"]) in pairs]

    def text(r):
        return " ".join(t["value"] for t in r["conversations"]) + " " + " ".join(r.get("choices", []))

    for r in train:
        assert not objects_with_heldout_pair(r), r["id"]
        assert not any(f"{c} {s}" in text(r) for c, s in pairs), r["id"]
        if "text" in r["scene"]:
            assert not set(r["scene"]["text"]["string"].split()) & words, r["id"]
        assert r["heldout"] is False
    # ... and the test split really uses them.
    assert sum(bool(objects_with_heldout_pair(r)) for r in test) > len(test) // 4
    assert any(set(r["scene"]["text"]["string"].split()) & words for r in test if "text" in r["scene"])
    assert all(r["heldout"] == bool(objects_with_heldout_pair(r) or any(f"{c} {s}" in text(r) for c, s in pairs)
                                    or ("text" in r["scene"] and set(r["scene"]["text"]["string"].split()) & words))
               for r in test)


def test_test_split_uses_its_own_random_stream(world):
    train, test = _records(world, "train"), _records(world, "test")
    assert [r["conversations"] for r in train[:20]] != [r["conversations"] for r in test[:20]]


# ------------------------------------------------------------------------------------------ answers

def test_every_answer_can_be_recomputed_from_the_scene(world):
    checked = 0
    for r in _all(world):
        assert answer_from_scene(r) == r["answers"][0], r["id"]
        conv = r["conversations"]  # earlier gpt turns too: truncate after each of them
        for end in range(2, len(conv), 2):
            assert answer_from_scene(dict(r, conversations=conv[:end])) == conv[end - 1]["value"], (r["id"], end)
            checked += 1
    assert checked > 100


def test_answer_from_scene_notices_a_changed_scene(world):
    recs = _records(world, "train")
    count = next(r for r in recs if r["kind"] == "count" and int(r["answers"][0]) > 0)
    group = parse_question(count["conversations"][-2]["value"].removeprefix("<image>\n"))[1]["group"]
    shape_of_plural = {p: s for s, p in PLURALS.items()}
    want = {("size" if w in SIZES else "color" if w in COLORS else "shape"): shape_of_plural.get(w, w)
            for w in group.split() if w != "objects"}
    changed = copy.deepcopy(count)
    objs = changed["scene"]["objects"]
    del objs[next(i for i, o in enumerate(objs) if all(o[k] == v for k, v in want.items()))]
    assert answer_from_scene(changed) == str(int(count["answers"][0]) - 1)

    ocr = next(r for r in recs if r["family"] == "ocr")
    changed = copy.deepcopy(ocr)
    changed["scene"]["text"]["string"] = "something else"
    assert answer_from_scene(changed) != ocr["answers"][0]

    with pytest.raises(ValueError):
        parse_question("What is the meaning of life?")


def test_caption_lists_objects_in_reading_order(world):
    captions = [r for r in _records(world, "train") if r["family"] == "caption"]
    assert captions
    for r in captions:
        objs = sorted(r["scene"]["objects"], key=lambda o: (o["row"], o["col"]))
        cap = r["answers"][0]
        assert cap == caption_of(r["scene"])
        assert re.findall(r"a (small|large) (\w+) (\w+)", cap) == [(o["size"], o["color"], o["shape"]) for o in objs]
        assert cap.endswith(f" on a {r['scene']['background']} background")


def test_balance_of_presence_and_multiple_choice(world):
    recs = _records(world, "train")
    presence = [r for r in recs if r["family"] == "presence"]
    for subset in PRESENCE_SUBSETS:
        answers = [r["answers"][0] for r in presence if r["subset"] == subset]
        assert answers.count("yes") == answers.count("no") > 0
    letters = [r["answers"][0] for r in recs if r["family"] == "mc"]
    assert max(map(letters.count, LETTERS)) - min(map(letters.count, LETTERS)) <= 1  # letters in turn
    for r in recs:
        if r["family"] == "mc":
            assert len(set(r["choices"])) == 4


def test_task_ranges_are_not_trivial(tmp_path):
    generate_world(tmp_path, n_train=120, n_test=0, families=["count", "ocr", "spatial", "attribute"])
    recs = _records(tmp_path, "train")
    counts = [int(r["answers"][0]) for r in recs if r["kind"] == "count"]
    assert max(counts) >= 11 and min(counts) <= 2
    strings = [r["answers"][0] for r in recs if r["family"] == "ocr"]
    assert min(map(len, strings)) >= 6 and max(map(len, strings)) <= 16 and max(map(len, strings)) >= 13
    assert max(len(r["scene"]["objects"]) for r in recs if r["family"] == "spatial") >= 9
    # attribute questions need more than one attribute to pick their object, at least sometimes
    assert any(len(parse_question(r["conversations"][0]["value"][8:])[1]["obj"].split()) >= 3
               for r in recs if r["family"] == "attribute")


def test_follow_ups_need_the_image(tmp_path):
    # A follow-up about 'it' must not be answerable from the previous question's words alone.
    generate_world(tmp_path, n_train=120, n_test=0, families=["multiturn"])
    seen = 0
    for r in _records(tmp_path, "train"):
        kind, fields = parse_question(r["conversations"][-2]["value"])
        assert "it" in fields.values()
        previous = r["conversations"][-4]["value"].removeprefix("<image>\n")
        named = parse_question(previous)[1]["obj"].split()[1:]  # drop "the"
        referent = [o for o in r["scene"]["objects"]
                    if all(w == "object" or w in (o["size"], o["color"], o["shape"]) for w in named)]
        assert len(referent) == 1
        attr = fields["attr"] if kind == "same_count" else kind.removesuffix("_of")
        if attr in ("color", "shape", "size"):
            assert referent[0][attr] not in named, r["conversations"]
            seen += 1
    assert seen > 10


def test_recall_distance_spans_a_range(tmp_path):
    generate_world(tmp_path, n_train=90, n_test=0, families=["recall"])
    recs = _records(tmp_path, "train")
    dist = [r["distance"] for r in recs]
    assert min(dist) < 150 and max(dist) > 600
    for r in recs:
        filler = r["conversations"][2:-2]
        assert r["distance"] == sum(len(t["value"].split()) for t in filler)
        assert r["distance_turns"] == len(filler) // 2
        words = sum(len(t["value"].split()) for t in r["conversations"])
        assert words <= 1100
        assert "Remember these facts." in r["conversations"][0]["value"]


def test_copy_records_repeat_training_words_only():
    """The training-only copy family: the answer is the question's words, recomputable from the text, in the
    training vocabulary (no held-out OCR word), deterministic, and different from record to record."""
    assert "copy" in TRAIN_ONLY_FAMILIES and "copy" not in FAMILIES
    world = World.make(SEED, 128)
    records = [make_record(world, "train", i, "copy", i) for i in range(200)]
    assert records[7] == make_record(world, "train", 7, "copy", 7)
    assert len({r["answers"][0] for r in records}) == len(records)
    held = set(world.heldout_words)
    for r in records:
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert question.startswith("<image>\n") and len(r["conversations"]) == 2
        assert r["family"] == "copy" and r["metric"] == "exact" and r["answers"] == [answer]
        assert question.endswith(": " + answer) and 8 <= len(answer.split()) <= 24
        assert answer_from_scene(r) == answer
        assert not held & set(answer.split()) and not r["heldout"]
    numbers = sum(w.isdigit() for r in records for w in r["answers"][0].split())
    assert numbers > 200  # numbers, the recall family's values, are among the copied words


@pytest.mark.parametrize("family,turns", [("recall_short", {0, 1, 2, 3}), ("recall_next", {0})])
def test_short_recall_families_are_recall_with_few_filler_turns(tmp_path, family, turns):
    """The training-only recall_short (0-3 filler turns, each count made) and recall_next (none) families: the
    recall family's wording and answer, deterministic, never written to a split."""
    assert family in TRAIN_ONLY_FAMILIES and family not in FAMILIES
    world = World.make(SEED, 128)
    records = [make_record(world, "train", i, family, i) for i in range(80)]
    assert records[5] == make_record(world, "train", 5, family, 5)
    assert {r["distance_turns"] for r in records} == turns
    for r in records:
        assert r["family"] == family and r["kind"] == "recall" and r["metric"] == "exact"
        assert len(r["conversations"]) == 2 * (r["distance_turns"] + 2)
        assert "Remember these facts." in r["conversations"][0]["value"]
        assert answer_from_scene(r) == r["answers"][0] == r["conversations"][-1]["value"]
    with pytest.raises(ValueError, match=family):
        generate_world(tmp_path, 1, 1, families=[family])


def test_ocr_pseudo_records_show_made_up_words():
    """The training-only ocr_pseudo family: the OCR question about a string of made-up words (never one of the
    world's words), drawn on the image, recomputable from the scene, deterministic."""
    assert "ocr_pseudo" in TRAIN_ONLY_FAMILIES and "ocr_pseudo" not in FAMILIES
    world = World.make(SEED, 128)
    records = [make_record(world, "train", i, "ocr_pseudo", i) for i in range(100)]
    assert records[3] == make_record(world, "train", 3, "ocr_pseudo", 3)
    assert len({r["answers"][0] for r in records}) == len(records)
    ocr = [make_record(world, "train", i, "ocr", i) for i in range(200)]
    known = set(world.heldout_words) | {w for r in ocr for w in r["answers"][0].split()}
    for r in records:
        answer = r["answers"][0]
        assert r["family"] == "ocr_pseudo" and r["metric"] == "vqa" and r["text_type"] == "pseudo"
        assert r["scene"]["text"]["string"] == answer == answer_from_scene(r) and 6 <= len(answer) <= 16
        assert not known & set(answer.split())
    assert sum(" " in r["answers"][0] for r in records) > 20  # two-part strings too


def test_repeat_records_are_plain_text_said_twice():
    """The training-only repeat family: a prompt-completion record (no scene, image or chat), its completion
    the prompt's words again, one-token world words only, deterministic."""
    world = World.make(SEED, 128)
    records = [make_record(world, "train", i, "repeat", i) for i in range(100)]
    assert records[5] == make_record(world, "train", 5, "repeat", 5)
    assert len({r["completion"] for r in records}) == len(records)
    vocab = set(COLORS) | set(SHAPES) | set(SIZES) | set(RECALL_NOUNS) | {str(v) for v in range(100)}
    for r in records:
        assert r["prompt"] == r["completion"] and r["completion"].startswith(" ") and r["family"] == "repeat"
        assert "conversations" not in r and "image" not in r and "scene" not in r and r["kind"] == "repeat"
        words = r["completion"].split()
        assert 8 <= len(words) <= 24 and r["answers"] == [" ".join(words)]
        assert set(words) <= vocab


# ------------------------------------------------------------------------------------------ images

def test_images_agree_with_scenes(world):
    cell = cell_size(128)
    for r in _all(world):
        scene = r["scene"]
        img = Image.open(world / "images" / r["image"])
        assert img.mode == "RGB" and img.size == (128, 128)
        px = np.asarray(img)
        bg = np.array(BACKGROUNDS[scene["background"]], dtype=np.uint8)
        assert (px[0, 0] == bg).all()
        occupied = {(o["row"], o["col"]): o for o in scene["objects"]}
        assert len(occupied) == len(scene["objects"])  # one object per cell: no overlaps
        text_rows = set()
        if "text" in scene:
            x0, y0, x1, y1 = scene["text"]["box"]
            text_rows = {y0 // cell, y1 // cell}
            panel = px[y0 + 1:y1, x0 + 1:x1]
            assert (panel == PANEL_FILL).all(axis=-1).mean() > 0.5
            assert (panel.max(axis=-1) < 100).sum() > 30  # dark text pixels are there
            width = font(scene["text"]["font_size"]).getlength(scene["text"]["string"])
            assert width <= x1 - x0
        for row in range(GRID):
            for col in range(GRID):
                if row in text_rows:
                    continue
                block = px[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]
                fg = ~(block == bg).all(axis=-1)
                o = occupied.get((row, col))
                if o is None:
                    assert not fg.any(), (r["id"], row, col)
                    continue
                # the centre pixel and every drawn pixel have exactly the object's colour
                assert tuple(px[o["y"], o["x"]]) == COLORS[o["color"]], r["id"]
                assert (block[fg] == COLORS[o["color"]]).all(), r["id"]
                ys, xs = np.nonzero(fg)
                extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
                assert 1.5 * o["r"] <= extent <= 2 * o["r"] + 2, (r["id"], o)
        assert len([o for o in scene["objects"] if o["row"] not in text_rows]) == len(scene["objects"])


def test_parallel_generation_is_identical(tmp_path):
    a, b = tmp_path / "serial", tmp_path / "parallel"
    generate_world(a, 40, 12, seed=5, image_size=64)
    generate_world(b, 40, 12, seed=5, image_size=64, workers=2)
    for name in ("train.json", "test.json", "world.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    pngs = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(pngs) == 52
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in pngs)

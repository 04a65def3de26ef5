"""LLaVA data pipeline: tokenizer, records, images, dataset labels/truncation, collate, sampler."""

from __future__ import annotations

import itertools
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerFast

from matvlm.data.llava import (
    IGNORE_INDEX,
    BadImageError,
    BadRecordError,
    DataError,
    LengthGroupedSampler,
    SupervisedDataset,
    build_image_processor,
    check_segment_tokenization,
    collate,
    generation_inputs,
    load_image,
    load_records,
    record_words,
)
from matvlm.data.templates import get_template
from matvlm.data.tokenizer import TokenizerError, check_tokenizer, train_tokenizer

N_IMG = 5  # image tokens per image in these tests
SIZE = 16  # image side in pixels after processing
EOS = "<|endoftext|>"

CORPUS = [
    "What is shown in the image? A red square on a white background.",
    "How many dots are there? There are 12 dots. Count them: 3 rows of 4.",
    "Describe the picture in detail. The picture shows a small blue circle.",
    "Tell me a joke. Why did the square cross the road? To get to the other side.",
]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS * 3, vocab_size=512, template="phi")


@pytest.fixture(scope="module")
def proc():
    return build_image_processor(SIZE)


def save_png(path: Path, color=(255, 0, 0), size=(20, 12), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def rec(rid, *values, image=None, **extra):
    r = {"id": rid, "conversations": [
        {"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)
    ]}
    if image is not None:
        r["image"] = image
    r.update(extra)
    return r


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def make_ds(records, folders, tok, proc, max_length=512, **kw):
    return SupervisedDataset(records, folders, tok, proc, "phi", num_image_tokens=N_IMG, max_length=max_length, **kw)


def supervised_runs(labels: torch.Tensor) -> list[list[int]]:
    runs, cur = [], []
    for t in labels.tolist():
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_special_tokens_and_roundtrip(tok, tmp_path):
    assert tok.eos_token == tok.pad_token == EOS and tok.bos_token is None
    assert tok.image_token == "<image>"
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = tok("look <image>\nhere", add_special_tokens=False)["input_ids"]
    assert ids.count(image_id) == 1
    assert tok("hello")["input_ids"][0] != tok.eos_token_id  # no BOS-like prefix
    # numbers in groups of at most 3 digits, even for numbers seen whole in the corpus
    pieces = [tok.decode([d]) for d in tok("2024 12", add_special_tokens=False)["input_ids"]]
    assert "".join(pieces) == "2024 12" and max(len(p.strip()) for p in pieces) <= 3 and len(pieces) >= 3
    text = "Odd bytes: ü 😀 \t tabs <image> and" + EOS
    assert tok.decode(tok(text)["input_ids"]) == text

    tok.save_pretrained(tmp_path / "tk")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tk")
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.convert_tokens_to_ids("<image>") == image_id
    assert loaded.eos_token_id == loaded.pad_token_id == tok.eos_token_id
    assert loaded.chat_template == get_template("phi").to_jinja()
    check_tokenizer(loaded)


def test_vicuna_tokenizer_uses_s_end_token():
    t = train_tokenizer(CORPUS, vocab_size=300, template="vicuna_v1")
    assert t.eos_token == t.pad_token == "</s>"
    assert len(t("x</s>", add_special_tokens=False)["input_ids"]) == 2


def test_vocab_too_small_is_clear():
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_check_tokenizer_names_every_missing_token():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare = PreTrainedTokenizerFast(tokenizer_object=bpe)
    with pytest.raises(TokenizerError) as err:
        check_tokenizer(bare)
    msg = str(err.value)
    assert "<image>" in msg and "eos" in msg and "pad" in msg


def test_check_tokenizer_names_only_what_is_missing(tok):
    t = train_tokenizer(CORPUS, vocab_size=300)
    t.pad_token = None
    with pytest.raises(TokenizerError) as err:
        check_tokenizer(t)
    msg = str(err.value)
    assert "no pad token" in msg and "not in the vocabulary" not in msg and "no eos token" not in msg
    with pytest.raises(TokenizerError, match="<img>"):
        check_tokenizer(tok, image_token="<img>")


def test_segment_tokenization_check_catches_prefix_space_tokenizers(tok):
    check_segment_tokenization(tok, "phi")  # ours passes
    # A tokenizer whose merges cross word boundaries (no whitespace pre-split, like SentencePiece):
    # "ASSISTANT: It" becomes one token in a whole string but not across the prompt/answer split.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS, "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["USER: What? ASSISTANT: It is 19. Sure!"] * 20, trainer=trainer)
    odd = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS,
                                  extra_special_tokens={"image_token": "<image>"})
    with pytest.raises(TokenizerError, match="segment by segment"):
        check_segment_tokenization(odd, "phi")


# ----------------------------------------------------------------------------- records
def test_load_records_good(tmp_path):
    records = [rec("a", "<image>\nQ?", "A.", image="a.png"), rec(7, "Text only?", "Yes.")]
    assert load_records(write_json(tmp_path / "d.json", records)) == records
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert load_records(jl) == records


BAD_RECORDS = [
    (rec("r1", "<image>\nQ?", "A."), "no 'image'"),  # placeholder without image
    (rec("r2", "Q?", "A.", image="x.png"), "no <image> placeholder"),
    (rec("r3", "<image>\nQ <image>?", "A.", image="x.png"), "2 <image> placeholders"),
    (rec("r4", "<image>\nQ?", "A.", "Q2 <image>", "B.", image="x.png"), "2 <image> placeholders"),
    (rec("r5", "Q?", "A <image>."), "in a gpt answer"),
    (rec("r6", "Q?"), "end with a gpt answer"),
    (rec("r7", "Q?", ""), "empty or non-string"),
    (rec("r8", "Q?", "A.", image=["a.png", "b.png"]), "multi-image"),
    ({"id": "r9", "conversations": [{"from": "gpt", "value": "A."}]}, "expected 'human'"),
    ({"id": "r10", "conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q"}]}, "alternate"),
    ({"id": "r11", "conversations": []}, "non-empty list"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "missing 'id'"),
    ("not a record", "JSON object"),
]


@pytest.mark.parametrize("bad, reason", BAD_RECORDS)
def test_bad_record_raises_clear_error(tmp_path, bad, reason):
    path = write_json(tmp_path / "d.json", [rec("ok", "Q?", "A."), bad])
    with pytest.raises(BadRecordError) as err:
        load_records(path)
    e = err.value
    assert reason in e.reason and str(path) in str(e)
    expected_label = bad["id"] if isinstance(bad, dict) and "id" in bad else 1  # id, else index
    assert e.record == expected_label and repr(expected_label) in str(e)


def test_skip_bad_collects_every_problem(tmp_path):
    records = [rec("ok1", "Q?", "A.")] + [b for b, _ in BAD_RECORDS] + [rec("ok2", "<image>", "A.", image="i.png")]
    good, problems = load_records(write_json(tmp_path / "d.json", records), skip_bad=True)
    assert [r["id"] for r in good] == ["ok1", "ok2"]
    assert len(problems) == len(BAD_RECORDS)
    assert all(isinstance(p, BadRecordError) for p in problems)
    assert [p.reason for p in problems][0].startswith("<image> placeholder")


def test_unreadable_record_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    with pytest.raises(DataError, match="invalid JSON"):
        load_records(tmp_path / "broken.json")
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="JSON list"):
        load_records(tmp_path / "obj.json")


def test_bad_record_error_pickles():
    err = pickle.loads(pickle.dumps(BadImageError("/x.png", "r1", "file not found")))
    assert isinstance(err, BadImageError) and err.record == "r1" and "r1" in str(err) and "/x.png" in str(err)


# ----------------------------------------------------------------------------- images
def test_load_image_errors_name_record_and_file(tmp_path):
    with pytest.raises(BadImageError, match="file not found") as err:
        load_image(tmp_path / "nope.png", record="rec-1")
    assert "rec-1" in str(err.value) and "nope.png" in str(err.value)

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(BadImageError, match="not a readable image") as err:
        load_image(junk, record="rec-2")
    assert "rec-2" in str(err.value) and "junk.png" in str(err.value)

    full = save_png(tmp_path / "full.png", size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    with pytest.raises(BadImageError, match="cannot be decoded"):
        load_image(cut, record="rec-3")

    with pytest.raises(BadImageError, match="too large"):
        load_image(full, max_pixels=64 * 63, record="rec-4")
    assert load_image(full, max_pixels=64 * 64).size == (64, 64)

    f = tmp_path / "float.tiff"
    Image.new("F", (4, 4), 0.5).save(f)
    with pytest.raises(BadImageError, match="mode F"):
        load_image(f)


def test_load_image_converts_odd_modes(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (10, 20, 30)

    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (200, 100, 50) and out.getpixel((2, 2)) == (255, 255, 255)

    save_png(tmp_path / "l.png", color=77, mode="L")
    assert load_image(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60  # red

    grey16 = np.array([[0, 65535], [32896, 257 * 10]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png")
    assert [out.getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 255, 128, 10]


def test_build_image_processor(proc, tmp_path):
    img = Image.new("RGB", (30, 10), (255, 0, 255))
    pv = proc(images=img, return_tensors="pt")["pixel_values"]
    assert pv.shape == (1, 3, SIZE, SIZE)
    assert torch.allclose(pv[0, 0], torch.ones(SIZE, SIZE)) and torch.allclose(pv[0, 1], -torch.ones(SIZE, SIZE))
    proc.save_pretrained(tmp_path / "ip")
    again = AutoImageProcessor.from_pretrained(tmp_path / "ip")
    assert torch.equal(again(images=img, return_tensors="pt")["pixel_values"], pv)


# ----------------------------------------------------------------------------- dataset
@pytest.fixture
def folders(tmp_path):
    a, b = tmp_path / "imgs_a", tmp_path / "imgs_b"
    save_png(a / "red.png", (255, 0, 0))
    save_png(b / "blue.png", (0, 0, 255))
    save_png(a / "both.png", (255, 255, 255))
    save_png(b / "both.png", (0, 0, 0))
    return [a, b]


def test_labels_cover_answers_and_eos_only(tok, proc, folders):
    record = rec("m", "What is shown in the image?\n<image>", "A red square.", "How many dots?", "12 dots.",
                 image="red.png")
    item = make_ds([record], folders, tok, proc)[0]
    runs = supervised_runs(item["labels"])
    assert [tok.decode(r) for r in runs] == [" A red square." + EOS, " 12 dots." + EOS]
    # labels equal input ids where supervised
    mask = item["labels"] != IGNORE_INDEX
    assert torch.equal(item["labels"][mask], item["input_ids"][mask])
    # the sequence is the chat template's rendering with the image block expanded
    text = tok.apply_chat_template(
        [{"role": "user" if i % 2 == 0 else "assistant", "content": t["value"]}
         for i, t in enumerate(record["conversations"])], tokenize=False)
    ref = tok(text)["input_ids"]
    image_id = tok.convert_tokens_to_ids("<image>")
    p = ref.index(image_id)
    assert item["input_ids"].tolist() == ref[:p] + [image_id] * N_IMG + ref[p + 1:]
    assert item["length"] == len(ref) + N_IMG - 1 and item["id"] == "m"


def test_image_block_expanded_and_masked(tok, proc, folders):
    item = make_ds([rec("r", "<image>\nWhat is shown?", "Red.", image="red.png")], folders, tok, proc)[0]
    image_id = tok.convert_tokens_to_ids("<image>")
    pos = (item["input_ids"] == image_id).nonzero().flatten().tolist()
    assert len(pos) == N_IMG and pos == list(range(pos[0], pos[0] + N_IMG))
    assert (item["labels"][pos] == IGNORE_INDEX).all()
    assert item["pixel_values"].shape == (3, SIZE, SIZE)
    assert torch.allclose(item["pixel_values"][0], torch.ones(SIZE, SIZE))  # red channel = 1.0


def test_first_folder_that_has_the_image_wins(tok, proc, folders):
    ds = make_ds([rec("w", "<image>", "White.", image="both.png"), rec("b", "<image>", "Blue.", image="blue.png")],
                 folders, tok, proc)
    assert torch.allclose(ds[0]["pixel_values"], torch.ones(3, SIZE, SIZE))  # white from imgs_a
    assert torch.allclose(ds[1]["pixel_values"][2], torch.ones(SIZE, SIZE))  # only in imgs_b


def test_text_only_record(tok, proc, folders):
    item = make_ds([rec("t", "Tell me a joke.", "Why did the square cross the road?")], folders, tok, proc)[0]
    assert item["pixel_values"] is None
    assert tok.convert_tokens_to_ids("<image>") not in item["input_ids"].tolist()
    assert [tok.decode(r) for r in supervised_runs(item["labels"])] == [" Why did the square cross the road?" + EOS]


def test_plain_text_record_has_no_template_and_supervises_its_completion(tok, proc, folders):
    """A prompt-completion record (the world's training-only repeat family): the tokens of prompt + completion,
    no chat template and no image, the loss on the completion and its end token; it batches with image records."""
    text = {"id": "r", "prompt": " red 12 box", "completion": " red 12 box"}
    ds = make_ds([text, rec("i", "<image>", "Red.", image="red.png")], folders, tok, proc)
    item = ds[0]
    assert item["pixel_values"] is None
    assert tok.decode(item["input_ids"]) == " red 12 box red 12 box" + EOS
    assert [tok.decode(r) for r in supervised_runs(item["labels"])] == [" red 12 box" + EOS]
    assert record_words(text) == 6 and ds.lengths[0] == ds.length_estimate(6, False)  # no image block
    batch = collate([ds[0], ds[1]], tok.pad_token_id)
    assert batch["has_image"].tolist() == [False, True] and batch["pixel_values"].shape[0] == 1
    for bad, reason in [({"id": "a", "completion": " "}, "completion"), ({"id": "b", "prompt": 3, "completion": "x"}, "prompt"),
                        ({"id": "c", "completion": "x", "image": "red.png"}, "cannot have an 'image'")]:
        with pytest.raises(BadRecordError, match=reason):
            make_ds([bad], folders, tok, proc)[0]


def test_truncation_keeps_image_block_and_errors_when_impossible(tok, proc, folders):
    record = rec("long", "What is shown in the image? <image>", "A red square on a white background. " * 5,
                 image="red.png")
    full = make_ds([record], folders, tok, proc)[0]
    image_id = tok.convert_tokens_to_ids("<image>")
    start = full["input_ids"].tolist().index(image_id)
    first_sup = next(i for i, t in enumerate(full["labels"].tolist()) if t != IGNORE_INDEX)

    cut = first_sup + 3
    item = make_ds([record], folders, tok, proc, max_length=cut)[0]
    assert item["length"] == len(item["input_ids"]) == len(item["labels"]) == cut
    assert torch.equal(item["input_ids"], full["input_ids"][:cut])
    assert (item["input_ids"] == image_id).sum() == N_IMG
    assert (item["labels"] != IGNORE_INDEX).sum() == 3

    with pytest.raises(BadRecordError, match="no supervised token") as err:
        make_ds([record], folders, tok, proc, max_length=first_sup)[0]
    assert "'long'" in str(err.value)
    with pytest.raises(BadRecordError, match="image block .* does not fit"):
        make_ds([record], folders, tok, proc, max_length=start + N_IMG - 1)[0]
    # exactly fitting the image block is not an image error (but has no answer left)
    with pytest.raises(BadRecordError, match="no supervised token"):
        make_ds([record], folders, tok, proc, max_length=start + N_IMG)[0]


def test_records_that_lose_answer_tokens_to_truncation_are_counted(tok, proc, folders, capsys):
    from matvlm.data.llava import warn_truncated_answers

    long = rec("long", "What is shown? <image>", "A red square on a white background. " * 5, image="red.png")
    short = rec("short", "<image>\nQ?", "Red.", image="red.png")
    full = len(make_ds([long], folders, tok, proc)[0]["input_ids"])
    roomy = make_ds([long, short, short], folders, tok, proc, source="train.json")
    assert roomy.truncated_answers() == (0, 3) and warn_truncated_answers(roomy) == 0.0
    tight = make_ds([long, short, short], folders, tok, proc, max_length=full - 2, source="train.json")
    assert tight.truncated_answers() == (1, 3)
    assert abs(warn_truncated_answers(tight) - 1 / 3) < 1e-9
    out = capsys.readouterr().out
    assert "1 of 3 sampled records" in out and "train.json" in out and f"max_length={full - 2}" in out


def test_dataset_bad_inputs_and_find_problems(tok, proc, folders, tmp_path):
    corrupt = folders[0] / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    records = [
        rec("good", "<image>\nQ?", "Red.", image="red.png"),
        rec("missing", "<image>\nQ?", "A.", image="nowhere.png"),
        rec("corrupt", "<image>\nQ?", "A.", image="corrupt.png"),
        rec("two", "<image>\nQ <image>?", "A.", image="red.png"),
        {"id": "malformed", "conversations": [{"from": "gpt", "value": "A."}]},
    ]
    ds = make_ds(records, folders, tok, proc, source="train.json")
    assert ds[0]["id"] == "good"
    with pytest.raises(BadImageError, match="not found in any image folder") as err:
        ds[1]
    assert "'missing'" in str(err.value) and "nowhere.png" in str(err.value) and str(folders[1]) in str(err.value)
    with pytest.raises(BadImageError, match="'corrupt'.*corrupt.png"):
        ds[2]
    with pytest.raises(BadRecordError, match="'two' in train.json: 2 <image>"):
        ds[3]
    with pytest.raises(BadRecordError, match="'malformed'"):
        ds[4]

    quick = ds.find_problems()
    assert sorted(p.record for p in quick) == ["malformed", "missing", "two"]  # corrupt needs decoding
    full = ds.find_problems(check_images=True)
    assert sorted(p.record for p in full) == ["corrupt", "malformed", "missing", "two"]


def test_dataset_needs_image_token(tok, proc, folders):
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="x", pad_token="x")
    with pytest.raises(TokenizerError, match="<image>"):
        make_ds([], folders, bare, proc)


def test_lengths_estimate_orders_records(tok, proc, folders):
    ds = make_ds([rec("s", "Q?", "A."), rec("l", "Q?", "word " * 50), rec("i", "<image>", "A.", image="red.png")],
                 folders, tok, proc, max_length=40)
    short, long_, img = ds.lengths
    assert short < img <= 40 and long_ == 40  # capped at max_length


# ----------------------------------------------------------------------------- collate
def test_collate_right_and_left(tok, proc, folders):
    ds = make_ds([rec("t", "Tell me a joke.", "No."), rec("i", "<image>\nWhat is shown in the image?",
                                                         "A red square on a white background.", image="red.png")],
                 folders, tok, proc)
    items = [ds[0], ds[1]]
    n0, n1 = items[0]["length"], items[1]["length"]
    assert n0 < n1
    pad = tok.pad_token_id

    right = collate(items, pad)
    assert right["input_ids"].shape == right["labels"].shape == right["attention_mask"].shape == (2, n1)
    assert torch.equal(right["input_ids"][0, :n0], items[0]["input_ids"])
    assert (right["input_ids"][0, n0:] == pad).all() and (right["labels"][0, n0:] == IGNORE_INDEX).all()
    assert right["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert right["attention_mask"][1].all()
    assert right["pixel_values"].shape == (1, 3, SIZE, SIZE)  # only the record with an image
    assert right["has_image"].tolist() == [False, True] and right["ids"] == ["t", "i"]

    left = collate(items, pad, padding_side="left")
    assert torch.equal(left["input_ids"][0, n1 - n0:], items[0]["input_ids"])
    assert torch.equal(left["labels"][0, n1 - n0:], items[0]["labels"])
    assert (left["labels"][0, : n1 - n0] == IGNORE_INDEX).all()
    assert left["attention_mask"][0].tolist() == [0] * (n1 - n0) + [1] * n0

    assert collate(items, pad, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0
    assert collate([items[0]], pad)["pixel_values"] is None
    with pytest.raises(ValueError, match="padding_side"):
        collate(items, pad, padding_side="middle")


def test_dataloader_end_to_end(tok, proc, folders):
    records = [rec(str(i), "<image>\nWhat is shown?", "Red " * (i + 1), image="red.png") for i in range(4)]
    ds = make_ds(records, folders, tok, proc)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, sampler=LengthGroupedSampler(ds.lengths, 2, seed=0),
        collate_fn=lambda b: collate(b, tok.pad_token_id))
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == 4
    assert all(b["pixel_values"].shape[0] == 2 for b in batches)


# ----------------------------------------------------------------------------- generation inputs
def test_generation_inputs_match_training_prefix(tok, proc, folders):
    record = rec("g", "<image>\nWhat is shown in the image?", "A red square.", "How many dots?", "12 dots.",
                 image="red.png")
    train = make_ds([record], folders, tok, proc)[0]
    gen = generation_inputs(record, tok, "phi", N_IMG, folders, proc)
    assert gen["references"] == ["12 dots."] and gen["id"] == "g"
    assert gen["prompt"].endswith("USER: How many dots? ASSISTANT:")
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t["value"]}
            for i, t in enumerate(record["conversations"][:-1])]
    assert gen["prompt"] == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # the prompt is exactly the training sequence up to the last answer
    last_answer_start = len(train["labels"]) - len(supervised_runs(train["labels"])[-1])
    assert torch.equal(gen["input_ids"], train["input_ids"][:last_answer_start])
    assert (gen["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum() == N_IMG
    assert torch.equal(gen["pixel_values"], train["pixel_values"])

    # a text-only eval record that ends with the question and carries its own references
    text_only = generation_inputs(
        {"id": "t", "conversations": [{"from": "human", "value": "Hi"}], "answers": ["a", "b"]}, tok, "phi", N_IMG)
    assert text_only["references"] == ["a", "b"] and text_only["pixel_values"] is None
    batch = collate([gen, text_only], tok.pad_token_id, padding_side="left")
    assert "labels" not in batch and batch["pixel_values"].shape[0] == 1
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1


def test_generation_inputs_references_and_errors(tok, proc, folders):
    g = generation_inputs(rec("v", "<image>\nColor?", "red", image="red.png", answers="red"), tok, "phi", N_IMG,
                          folders, proc)
    assert g["references"] == ["red"]
    with pytest.raises(BadRecordError, match="no image_processor"):
        generation_inputs(rec("v", "<image>\nColor?", "red", image="red.png"), tok, "phi", N_IMG, folders)
    with pytest.raises(BadImageError, match="'v'"):
        generation_inputs(rec("v", "<image>\nColor?", "red", image="gone.png"), tok, "phi", N_IMG, folders, proc)


# ----------------------------------------------------------------------------- sampler
def test_length_grouped_sampler():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, size=203).tolist()
    bs = 4
    s = LengthGroupedSampler(lengths, batch_size=bs, seed=3)
    order = list(s)
    assert sorted(order) == list(range(203)) and len(s) == 203
    assert list(LengthGroupedSampler(lengths, bs, seed=3)) == order  # deterministic
    assert list(LengthGroupedSampler(lengths, bs, seed=4)) != order
    s.set_epoch(1)
    assert list(s) != order and sorted(s) == list(range(203))
    assert lengths[order[0]] == max(lengths)  # longest first: an OOM shows at step 0

    def padding(idx):
        return sum(max(lengths[i] for i in idx[k:k + bs]) * len(idx[k:k + bs]) - sum(lengths[i] for i in idx[k:k + bs])
                   for k in range(0, len(idx), bs))

    random_order = torch.randperm(203, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(order) < padding(random_order) / 4
    assert list(LengthGroupedSampler([], 4)) == []


def test_fast_pixel_path_matches_the_processor():
    import numpy as np
    from PIL import Image

    from matvlm.data.llava import _pixel_values_fast, build_image_processor

    processor = build_image_processor(48)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    fast = _pixel_values_fast(processor, image)
    reference = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert fast is not None and fast.shape == reference.shape == (3, 48, 48)
    assert torch.allclose(fast, reference, atol=1e-6)
    assert _pixel_values_fast(processor, image.resize((40, 40))) is None  # other sizes: the processor runs


def test_template_text_gets_compact_tokens():
    # The chat template's fixed text is in every turn; the tokenizer must merge it, not spell it out.
    from matvlm.data.templates import get_template

    chat = get_template("phi_short")
    rng = random.Random(0)  # many distinct words: the few merges a 300-token vocabulary allows are contested
    texts = [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3)) for _ in range(8)) for _ in range(600)]
    t = train_tokenizer(texts, vocab_size=300, template="phi_short")
    for fixed in (chat.user_prefix, chat.assistant_prompt):
        assert len(t(fixed.strip(), add_special_tokens=False)["input_ids"]) <= 2, fixed


def test_numbers_are_cut_into_groups_of_digits():
    texts = [f"the key for the red door is {n} . the code is {n * 7919 % 100000}" for n in range(100)] * 5
    grouped = train_tokenizer(texts, vocab_size=600, template="phi_short")
    single = train_tokenizer(texts, vocab_size=600, template="phi_short", digit_group=1)
    assert grouped.tokenize("42") == ["42"] and single.tokenize("42") == ["4", "2"]
    pieces = grouped.tokenize("1234567")  # cut as 123 | 456 | 7 before BPE: no token spans a group boundary
    assert len(pieces) >= 3 and max(map(len, pieces)) <= 3
    assert grouped.decode(grouped("code 1234567")["input_ids"]) == "code 1234567"
    with pytest.raises(ValueError, match="digit_group"):
        train_tokenizer(texts, digit_group=0)


def test_number_space_keeps_the_space_in_the_number_token():
    """With number_space, " 42" is one token "Ġ42" (a copied number then follows its key directly, the plain
    induction pattern); without it a lone "Ġ" precedes every number. Numbers not after a space are unchanged."""
    from matvlm.data.tokenizer import keeps_number_space

    texts = [f"the key for the red door is {n} . code a{n}" for n in range(100)] * 5
    lone = train_tokenizer(texts, vocab_size=600, template="phi_short")
    kept = train_tokenizer(texts, vocab_size=600, template="phi_short", number_space=True)
    assert lone.tokenize(" 42") == ["Ġ", "42"] and kept.tokenize(" 42") == ["Ġ42"]
    assert kept.tokenize("a42") == ["a", "42"] and kept.tokenize("\n42") == ["Ċ", "42"]
    assert len(kept.tokenize(" 1234567")) >= 3 and kept.tokenize(" 1234567")[0].startswith("Ġ")
    assert not keeps_number_space(lone) and keeps_number_space(kept)
    for text in ("is 42 .", "code 1234567 and 7", " 0 00 000"):
        assert kept.decode(kept(text)["input_ids"]) == text


def test_length_grouped_batches_come_in_random_order():
    # Two kinds of record whose lengths differ, as the world's families do: a batch holds one kind (but where a
    # mega-batch turns from one to the other), and the batch order interleaves them (not a run of every long
    # batch, then every short one).
    lengths = [100 + i % 7 for i in range(400)] + [10 + i % 7 for i in range(400)]
    bs = 8
    order = LengthGroupedSampler(lengths, bs, seed=0).indices()  # 4 mega-batches of 25 batches
    batches = [order[k:k + bs] for k in range(0, len(order), bs)]
    assert sum(len({lengths[i] >= 100 for i in b}) > 1 for b in batches) <= 5
    kinds = [sum(lengths[i] >= 100 for i in b) > bs // 2 for b in batches]
    runs = [len(list(run)) for _, run in itertools.groupby(kinds)]
    assert len(runs) > 30 and max(runs) < 15  # of 100 batches; sorted mega-batches gave runs of ~25

"""The data path for real training sets, on a small LLaVA-665K / ShareGPT4V-shaped file.

What tests/data/test_llava_data.py already checks one case at a time (records, images, labels, truncation,
collate, sampler) is checked here on the shape of the real mix: multi-turn records with the image in the
first human turn (before or after the question), text-only records, images in several roots (the second
one an overlay, as ShareGPT4V's extra images are), a Llama-style tokenizer with a BOS for vicuna_v1
next to Phi's, every truncation point, DataLoader workers, the sampler on the data set's own length
estimates, and a report of every bad record of a file.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import processors
from torch.utils.data import DataLoader

from matvlm.data.llava import (
    IGNORE_INDEX,
    BadImageError,
    BadRecordError,
    LengthGroupedSampler,
    SupervisedDataset,
    build_image_processor,
    collate,
    load_records,
)
from matvlm.data.templates import get_template
from matvlm.data.tokenizer import train_tokenizer

N_IMG = 4  # image tokens per image
SIZE = 16
IMAGE_ID_NAME = "<image>"

# (id, image or None, [q1, a1, q2, a2, ...]): the shapes that occur in llava_v1_5_mix665k.json
RECORDS = [
    ("000000033471", "coco/train2017/000000033471.jpg",
     ["<image>\nWhat are the colors of the bus in the image?", "The bus in the image is white and red.",
      "What feature can be seen on the back of the bus?", "The back of the bus features an advertisement.",
      "Is the bus driving down the street or pulled off to the side?",
      "The bus is driving down the street, which is crowded with people and other vehicles."]),
    ("000000052846", "coco/train2017/000000052846.jpg",
     ["Where is the cat positioned in the image?\n<image>", "The cat is on top of the back of the couch."]),
    ("sa_10001", "sam/images/sa_10001.jpg", ["<image>\nDescribe this image in detail.",
                                             "A blue square sits alone on a plain background."]),
    ("2354786", "gqa/images/2354786.jpg", ["<image>\nIs the sky dark?\nAnswer the question using a single word or phrase.",
                                           "Yes"]),
    ("i6IyJda_0", None, ["How to tell if a customer segment is well segmented? In 3 bullet points.",
                         "1. Homogeneity 2. Distinctiveness 3. Stability", "Thanks!", "You are welcome."]),
    (4242, None, ["Tell me a joke.", "Why did the square cross the road? To get to the other side."]),
]


def record(rid, image, turns, **extra):
    r = {"id": rid, "conversations": [{"from": "gpt" if i % 2 else "human", "value": v} for i, v in enumerate(turns)]}
    if image is not None:
        r["image"] = image
    r.update(extra)
    return r


def answers(r):
    return [t["value"] for t in r["conversations"][1::2]]


def texts():
    return [v for _, _, turns in RECORDS for v in turns] * 3


def save_image(path, color, mode="RGB", size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Two image roots: `a` (LLaVA's) first, `b` (an overlay) second; one file is in both."""
    a, b = tmp_path_factory.mktemp("llava_images"), tmp_path_factory.mktemp("sharegpt4v_images")
    save_image(a / "coco/train2017/000000033471.jpg", (255, 0, 0))
    save_image(a / "coco/train2017/000000052846.jpg", (255, 255, 255))
    save_image(b / "coco/train2017/000000052846.jpg", (0, 0, 0))  # shadowed by a's copy
    save_image(b / "sam/images/sa_10001.jpg", (0, 0, 255))
    save_image(a / "gqa/images/2354786.jpg", 90, mode="L")  # greyscale JPEG, as some GQA/VG images are
    return [a, b]


def llama_style_tokenizer():
    """vicuna_v1's `</s>` and, like Llama's tokenizer, a `<s>` BOS prepended to every call."""
    tok = train_tokenizer(texts(), vocab_size=400, template="vicuna_v1")
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


@pytest.fixture(scope="module")
def toks():
    return {"phi": train_tokenizer(texts(), vocab_size=400, template="phi"), "vicuna_v1": llama_style_tokenizer()}


@pytest.fixture(scope="module")
def proc():
    return build_image_processor(SIZE)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("json") / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps([record(*r, model="") if r[1] is None else record(*r) for r in RECORDS]))
    return path


def make_ds(records, roots, tok, proc, template, max_length=512, **kw):
    return SupervisedDataset(records, roots, tok, proc, template, num_image_tokens=N_IMG, max_length=max_length, **kw)


def runs_of(mask):
    """Index runs where mask is True."""
    out, cur = [], []
    for i, m in enumerate(mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def collapse_image_block(ids, image_id):
    """The sequence as the tokenizer made it: the expanded image block back to one placeholder."""
    out = []
    for t in ids:
        if t == image_id and out and out[-1] == image_id:
            continue
        out.append(t)
    return out


# ------------------------------------------------------------------------------------------- records + images
def test_llava_665k_file_every_record_becomes_an_item(data_file, roots, toks, proc):
    records = load_records(data_file)
    assert [r["id"] for r in records] == [r[0] for r in RECORDS]
    tok = toks["vicuna_v1"]
    ds = make_ds(records, roots, tok, proc, "vicuna_v1", source=data_file)
    assert ds.find_problems(check_images=True) == []
    image_id = tok.convert_tokens_to_ids(IMAGE_ID_NAME)
    items = {item["id"]: item for item in (ds[i] for i in range(len(ds)))}
    for rid, image, _ in RECORDS:
        item = items[rid]
        assert int((item["input_ids"] == image_id).sum()) == (N_IMG if image else 0), rid
        assert (item["pixel_values"] is None) == (image is None), rid
        assert item["input_ids"][0] == tok.bos_token_id and item["labels"][0] == IGNORE_INDEX
    red, white, blue, grey = (items[k]["pixel_values"] for k in ("000000033471", "000000052846", "sa_10001", "2354786"))
    close = lambda x, v: torch.allclose(x, torch.full_like(x, v), atol=0.03)  # JPEG: not exact
    assert close(red[0], 1.0) and close(red[1], -1.0) and close(red[2], -1.0)
    assert close(white, 1.0)  # root a's copy, not the overlay's black one
    assert close(blue[2], 1.0) and close(blue[0], -1.0)  # only in root b
    assert close(grey, 90 / 127.5 - 1)  # L -> RGB, 3 equal channels
    # "Question\n<image>" is rendered as LLaVA does: the placeholder first, then a newline and the question.
    text = tok.decode(collapse_image_block(items["000000052846"]["input_ids"].tolist(), image_id))
    assert "USER: <image>\nWhere is the cat positioned in the image? ASSISTANT:" in text


# ------------------------------------------------------------------------------------------- label masks
@pytest.mark.parametrize("template", ["phi", "vicuna_v1"])
def test_labels_are_exactly_each_answer_and_its_end_token(data_file, roots, toks, proc, template):
    tok, chat = toks[template], get_template(template)
    records = load_records(data_file)
    ds = make_ds(records, roots, tok, proc, template)
    image_id = tok.convert_tokens_to_ids(IMAGE_ID_NAME)
    bos = [tok.bos_token_id] if template == "vicuna_v1" else []
    for index, r in enumerate(records):
        item = ds[index]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        supervised = [lab != IGNORE_INDEX for lab in labels]
        assert all(lab == t for lab, t, s in zip(labels, ids, supervised) if s)
        # supervised: one run per turn, decoding to " answer" + the end token, nothing else
        pieces = [tok.decode([ids[i] for i in run]) for run in runs_of(supervised)]
        assert pieces == [" " + a + chat.end for a in answers(r)], r["id"]
        # unsupervised: the rest of the rendered conversation (system, USER: ..., ASSISTANT:), BOS and image
        whole = collapse_image_block(ids, image_id)
        assert whole == bos + tok(chat.render(r["conversations"]), add_special_tokens=False)["input_ids"]
        # the same mask as transformers computes from the chat template's {% generation %} blocks
        messages = [{"role": "assistant" if i % 2 else "user", "content": t["value"]}
                    for i, t in enumerate(r["conversations"])]
        hf = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert bos + hf["input_ids"] == whole
        mask_collapsed = [s for t, s, prev in zip(ids, supervised, [None] + ids[:-1])
                          if not (t == image_id and prev == image_id)]
        assert mask_collapsed == [False] * len(bos) + [bool(m) for m in hf["assistant_masks"]]


# ------------------------------------------------------------------------------------------- truncation
TRUNCATION_CASES = {
    # the LLaVA-665K shape: the block right after the system prompt, answers after it
    "front-image": ["<image>\nWhat is shown?", "A red bus.", "Is it driving?", "Yes, down a crowded street."],
    # the block mid-sequence, after a first answer: cuts before, in and after it
    "late-image": ["Tell me a joke.", "Why did the square cross the road?", "<image>\nWhat is shown?", "A red bus.",
                   "Is it driving?", "Yes, down a crowded street."],
}


@pytest.mark.parametrize("rid", list(TRUNCATION_CASES))
def test_every_truncation_keeps_the_image_block_whole_or_is_reported(roots, toks, proc, rid):
    """Cut the record at every length: an item keeps a prefix with the whole image block (a cut before or
    through the block would leave pixels without their tokens) and at least one answer token; any other
    cut is reported with the record's id, by __getitem__ and by find_problems alike."""
    tok = toks["vicuna_v1"]
    image_id = tok.convert_tokens_to_ids(IMAGE_ID_NAME)
    r = record(rid, "coco/train2017/000000033471.jpg", TRUNCATION_CASES[rid])
    full = make_ds([r], roots, tok, proc, "vicuna_v1")[0]
    n, ids, labels = full["length"], full["input_ids"].tolist(), full["labels"].tolist()
    start = ids.index(image_id)
    first_sup = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert (first_sup < start) == (rid == "late-image") and start + N_IMG < n
    for max_length in range(1, n + 3):
        ds = make_ds([r], roots, tok, proc, "vicuna_v1", max_length=max_length)
        problems = ds.find_problems()
        if max_length < start + N_IMG:
            expected = "image block"
        elif max_length <= first_sup:
            expected = "no supervised token"
        else:
            expected = None
        if expected:
            with pytest.raises(BadRecordError, match=expected) as err:
                ds[0]
            assert err.value.record == rid and [p.reason for p in problems] == [err.value.reason], max_length
            continue
        item = ds[0]
        assert problems == []
        keep = min(max_length, n)
        assert item["length"] == keep and torch.equal(item["input_ids"], full["input_ids"][:keep])
        assert torch.equal(item["labels"], full["labels"][:keep])
        assert int((item["input_ids"] == image_id).sum()) == N_IMG and item["pixel_values"] is not None


# ------------------------------------------------------------------------------------------- workers + sampler
class PidDataset(SupervisedDataset):
    """Records which process built each item (and so read its image)."""

    def __getitem__(self, index):
        item = super().__getitem__(index)
        item["pid"] = os.getpid()
        return item


def collate_with_pids(batch, pad_token_id):
    out = collate(batch, pad_token_id)
    out["pids"] = [item["pid"] for item in batch]
    return out


def many_records(n, seed=0):
    rng = np.random.default_rng(seed)
    images = [r[1] for r in RECORDS if r[1]]
    words = ["the", "bus", "cat", "is", "on", "a", "red", "white", "blue", "square", "street"]
    out = []
    for i in range(n):
        answer = " ".join(rng.choice(words, size=int(rng.integers(1, 60))))
        image = images[i % len(images)] if i % 3 else None
        question = ("<image>\n" if image else "") + "What is shown?"
        out.append(record(f"r{i}", image, [question, answer]))
    return out


def test_workers_give_the_same_batches_and_read_images_in_the_workers(roots, toks, proc):
    tok = toks["phi"]
    ds = PidDataset(many_records(24), roots, tok, proc, "phi", num_image_tokens=N_IMG, max_length=512)
    sampler = LengthGroupedSampler(ds.lengths, batch_size=4, seed=1)

    def batches(workers):
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers,
                            collate_fn=lambda b: collate_with_pids(b, tok.pad_token_id))
        return list(loader)

    main, workers = batches(0), batches(2)
    assert len(main) == len(workers) == 6
    for a, b in zip(main, workers):
        assert a["ids"] == b["ids"]
        for key in ("input_ids", "attention_mask", "labels", "pixel_values", "has_image"):
            assert torch.equal(a[key], b[key]), key
    assert {p for b in main for p in b["pids"]} == {os.getpid()}
    worker_pids = {p for b in workers for p in b["pids"]}
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids


def test_a_bad_image_in_a_worker_names_its_record(roots, toks, proc, tmp_path):
    broken = tmp_path / "broken" / "coco" / "train2017" / "000000099999.jpg"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    records = many_records(6) + [record("cut-jpeg", "coco/train2017/000000099999.jpg", ["<image>\nWhat?", "This."])]
    ds = make_ds(records, [*roots, tmp_path / "broken"], toks["phi"], proc, "phi")
    loader = DataLoader(ds, batch_size=7, num_workers=2, collate_fn=lambda b: collate(b, 0))
    batches = iter(loader)
    message = ""
    try:
        next(batches)
    except BadRecordError as err:  # the type survives the worker; torch puts the traceback in the text
        message = str(err)
    del batches  # no traceback keeps the workers alive (their shutdown would stall a later test)
    assert "BadImageError" in message and "'cut-jpeg'" in message and "000000099999.jpg" in message


def test_length_grouping_on_estimated_lengths_cuts_real_padding(roots, toks, proc):
    tok, bs = toks["phi"], 4
    records = many_records(96, seed=3)
    ds = make_ds(records, roots, tok, proc, "phi")
    real = [ds[i]["length"] for i in range(len(ds))]
    est = ds.lengths
    # the cheap estimate (no tokenization) orders records nearly like the real lengths
    rank = lambda xs: np.argsort(np.argsort(xs))
    assert np.corrcoef(rank(est), rank(real))[0, 1] > 0.9

    def padding(order):
        return sum(max(real[i] for i in order[k:k + bs]) * len(order[k:k + bs]) - sum(real[i] for i in order[k:k + bs])
                   for k in range(0, len(order), bs))

    grouped = [padding(LengthGroupedSampler(est, bs, seed=s).indices()) for s in range(3)]
    shuffled = [padding(torch.randperm(len(ds), generator=torch.Generator().manual_seed(s)).tolist()) for s in range(3)]
    assert max(grouped) < 0.4 * min(shuffled), (grouped, shuffled)


# ------------------------------------------------------------------------------------------- bad-record report
def test_every_bad_record_of_a_file_is_reported_once_with_its_id(roots, toks, proc, tmp_path):
    corrupt = roots[0] / "coco/train2017/000000000666.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:300])  # truncated JPEG
    good = [record(*r) for r in RECORDS]
    bad_record = {  # found by load_records
        "roles": {"id": "roles", "conversations": [{"from": "gpt", "value": "A."}, {"from": "human", "value": "Q"}]},
        "empty": record("empty", None, ["Q?", "  "]),
        "two-images": record("two-images", ["a.jpg", "b.jpg"], ["<image>\nQ?", "A."]),
        "no-image-key": record("no-image-key", None, ["<image>\nQ?", "A."]),
        "not-a-list": {"id": "not-a-list", "conversations": "Q? A."},
    }
    bad_data = {  # found by the data set: files and lengths
        "missing": record("missing", "coco/train2017/000000000404.jpg", ["<image>\nQ?", "A."]),
        "corrupt": record("corrupt", "coco/train2017/000000000666.jpg", ["<image>\nQ?", "A."]),
        "too-long": record("too-long", "coco/train2017/000000033471.jpg",
                           ["Tell me a joke.", "word " * 300, "<image>\nAnd this?", "A bus."]),
    }
    everything = good[:3] + list(bad_record.values()) + good[3:] + list(bad_data.values())
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(everything))

    kept, problems = load_records(path, skip_bad=True)
    assert [r["id"] for r in kept] == [r["id"] for r in good] + list(bad_data)
    assert [p.record for p in problems] == list(bad_record)
    assert all(str(path) in str(p) and repr(p.record) in str(p) for p in problems)

    ds = make_ds(kept, roots, toks["vicuna_v1"], proc, "vicuna_v1", max_length=200, source=path)
    found = ds.find_problems(check_images=True)
    assert [p.record for p in found] == list(bad_data)
    by_id = {p.record: p for p in found}
    assert isinstance(by_id["missing"], BadImageError) and "000000000404.jpg" in str(by_id["missing"])
    assert isinstance(by_id["corrupt"], BadImageError) and "000000000666.jpg" in str(by_id["corrupt"])
    assert "image block" in by_id["too-long"].reason and str(path) in str(by_id["too-long"])
    # what is reported is exactly what fails; everything else loads
    for index, r in enumerate(kept):
        if r["id"] in bad_data:
            with pytest.raises(BadRecordError, match=repr(r["id"])):
                ds[index]
        else:
            assert ds[index]["id"] == r["id"]

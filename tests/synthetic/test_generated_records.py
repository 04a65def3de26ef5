"""Records made on demand are the records `data synth` writes, and a teacher trains on them."""

import json
from collections import Counter

import pytest
import torch

from matvlm.synthetic.generated import GeneratedDataset, GeneratedRecords
from matvlm.data.llava import SupervisedDataset, build_image_processor, load_records, record_words
from matvlm.synthetic.world import generate_world
from matvlm.data.tokenizer import train_tokenizer
from matvlm.synthetic.teacher import TeacherConfig, conversation_texts, curriculum_order, train_teacher


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen_world")
    generate_world(out, n_train=30, n_test=9, seed=5, image_size=64)
    return out


def test_sizing_shared_by_processes_joins_to_the_whole(world, monkeypatch):
    """DDP runs size every `parts`-th block in each process and gather: the joined counts are one process's."""
    import matvlm.synthetic.generated as generated

    monkeypatch.setattr(generated, "_BLOCK", 7)  # 30 records: 5 blocks, the last one short
    whole = GeneratedRecords.from_world(world, 30).words
    for parts in (2, 3, 6):
        made = GeneratedRecords.from_world(world, 30)
        made.join_blocks([made.size_blocks(p, parts) for p in range(parts)])
        assert made.words == whole
    with pytest.raises(ValueError, match="word counts"):
        made.join_blocks([made.size_blocks(0, 2)])
    late = GeneratedRecords.from_world(world, 20, start=10)  # records 10..29: their own blocks, the same counts
    late.join_blocks([late.size_blocks(p, 3) for p in range(3)])
    assert late.words == whole[10:]


def test_generated_records_are_the_written_ones(world):
    written = load_records(world / "train.json")
    made = GeneratedRecords.from_world(world, len(written))
    assert [json.loads(json.dumps(made[i])) for i in range(len(made))] == written
    assert [made.family(i) for i in range(len(made))] == [r["family"] for r in written]
    assert made.words == [record_words(r) for r in written]
    assert GeneratedRecords.from_world(world, len(written), workers=2).words == made.words  # the parallel count
    more = GeneratedRecords.from_world(world, 1000)  # beyond what was written: new records, same world
    assert more[0] == made[0] and more[999]["id"] == "train-0000999"
    with pytest.raises(IndexError):
        made[len(written)]
    late = GeneratedRecords.from_world(world, len(written) - 5, start=5)  # a continuation's later records
    assert [late[i] for i in range(len(late))] == [made[i] for i in range(5, len(made))]
    assert [late.family(i) for i in range(len(late))] == [r["family"] for r in written[5:]]
    with pytest.raises(ValueError, match="start"):
        GeneratedRecords.from_world(world, 5, start=-1)


def test_generated_items_equal_the_items_read_from_disk(world):
    written = load_records(world / "train.json")
    tokenizer = train_tokenizer(conversation_texts(written), vocab_size=400, template="phi")
    processor = build_image_processor(64)
    kw = dict(num_image_tokens=16, max_length=1024)
    disk = SupervisedDataset(written, [world / "images"], tokenizer, processor, "phi", **kw)
    made = GeneratedDataset(GeneratedRecords.from_world(world, len(written)), tokenizer, processor, "phi", **kw)
    assert made.lengths == disk.lengths
    for i in (0, 7, 29):
        a, b = disk[i], made[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])  # PNG is lossless: the same pixels
    half = GeneratedDataset(made.records, tokenizer, processor, "phi", pixel_dtype=torch.bfloat16, **kw)
    assert torch.equal(half[7]["pixel_values"], disk[7]["pixel_values"].to(torch.bfloat16))


def test_generated_records_need_a_world_of_this_generator(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="world.json"):
        GeneratedRecords.from_world(tmp_path, 10)
    info = json.loads((world / "world.json").read_text())
    (tmp_path / "world.json").write_text(json.dumps({**info, "generator_version": "0.1"}))
    with pytest.raises(ValueError, match="generator 0.1"):
        GeneratedRecords.from_world(tmp_path, 10)
    with pytest.raises(ValueError, match="n >= 1"):
        GeneratedRecords(5, 64, 0)
    with pytest.raises(ValueError, match="train-only"):
        GeneratedRecords.from_world(world, 10, train_only=["recall"])


def test_train_only_families_join_the_world_families_in_turn(world):
    made = GeneratedRecords.from_world(world, 20, train_only=["copy"])  # 9 world families + copy: a cycle of 10
    assert [made.family(i) for i in (0, 9, 10, 19)] == ["attribute", "copy", "attribute", "copy"]
    assert made[9]["family"] == "copy" and made[9]["answers"][0] in made[9]["conversations"][0]["value"]
    assert made[3] == GeneratedRecords.from_world(world, 20)[3]  # a world family's record i is unchanged


def test_generated_plain_text_records_have_no_image(world):
    written = load_records(world / "train.json")
    tokenizer = train_tokenizer(conversation_texts(written), vocab_size=400, template="phi")
    made = GeneratedRecords.from_world(world, 20, train_only=["repeat"])
    ds = GeneratedDataset(made, tokenizer, build_image_processor(64), "phi", num_image_tokens=16, max_length=1024)
    item = ds[9]
    assert made.family(9) == "repeat" and item["pixel_values"] is None
    assert tokenizer.decode(item["input_ids"]) == made[9]["prompt"] + made[9]["completion"] + tokenizer.eos_token
    assert ds.lengths[9] == ds.length_estimate(made.words[9], False) and ds[8]["pixel_values"] is not None


def test_family_weights_and_stages_over_generated_records(world):
    made = GeneratedRecords.from_world(world, 90)  # 10 of each family
    cfg = TeacherConfig(data=str(world), out="unused", batch_size=4, family_weights={"recall": 3, "caption": 0},
                        stages=[{"steps": 2, "families": ["count"], "max_words": 1000}])
    order = curriculum_order(made, [10] * len(made), cfg)
    batches = [b for _, (_, b) in zip(range(2), order.iterate(0))]
    assert all(made.family(i) == "count" for b in batches for i in b)
    mixed = order.then
    epoch = Counter(made.family(mixed.indices[j]) for batch in mixed.order.epoch_batches(0) for j in batch)
    assert "caption" not in epoch and epoch["recall"] >= 3 * 10 - 4


def test_teacher_trains_on_generated_records(world, tmp_path):
    out = tmp_path / "teacher"
    cfg = TeacherConfig(data=str(world), out=str(out), vocab_size=400, image_size=64, patch_size=16, vision_hidden=32,
                        vision_layers=2, vision_heads=2, hidden=32, layers=2, heads=2, intermediate=64, max_length=1024,
                        batch_size=4, steps=4, eval_every=2, eval_records=3, save_every=4, num_workers=0,
                        final_eval_records=3, generated_train=200, generated_start=1000)
    # (eval_every: test images are read from DATA; generated_start: records 1000..1199)
    from matvlm.synthetic.teacher import training_records

    records = training_records(cfg, progress=False)
    assert len(records) == 200 and records[0]["id"] == "train-0001000"
    results = train_teacher(cfg, progress=False)
    assert results["n"] == 3
    info = json.loads((out / "matvlm.json").read_text())
    assert info["config"]["generated_train"] == 200 and info["train_tokens"] > 0
    assert info["world"]["generated_train"] == 200 and info["world"]["generated_start"] == 1000
    with pytest.raises(ValueError, match="preload"):
        train_teacher(TeacherConfig(data=str(world), out=str(tmp_path / "t2"), generated_train=10, preload=True))
    with pytest.raises(ValueError, match="generated_train"):
        train_teacher(TeacherConfig(data=str(world), out=str(tmp_path / "t3"), train_only_families=["copy"]))


def test_teacher_trains_with_copy_records_and_scores_only_world_families(world, tmp_path):
    out = tmp_path / "teacher"
    cfg = TeacherConfig(data=str(world), out=str(out), vocab_size=400, image_size=64, patch_size=16, vision_hidden=32,
                        vision_layers=2, vision_heads=2, hidden=32, layers=2, heads=2, intermediate=64, max_length=1024,
                        batch_size=4, steps=3, eval_every=100, save_every=3, num_workers=0, final_eval_records=9,
                        generated_train=44, train_only_families=["copy", "repeat"], family_weights={"copy": 2, "repeat": 2})
    from matvlm.synthetic.teacher import training_records

    records = training_records(cfg, progress=False)
    assert sum(records.family(i) == "copy" for i in range(len(records))) == 4
    assert sum(records.family(i) == "repeat" for i in range(len(records))) == 4
    results = train_teacher(cfg, progress=False)
    assert "copy" not in results["families"] and len(results["families"]) == 9
    info = json.loads((out / "matvlm.json").read_text())
    assert info["world"]["train_only_families"] == ["copy", "repeat"]


def test_an_unknown_lr_schedule_is_refused(world):
    with pytest.raises(ValueError, match="unknown schedule"):
        TeacherConfig(data=str(world), out="unused", lr_schedule="step")

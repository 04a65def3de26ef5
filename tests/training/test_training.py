"""The training package: schedules, parameter groups, resumable order, micro-batches, checkpoints, and the loop
itself on a toy job (exact resume, the log, the non-finite loss check)."""

import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from matvlm.testing import tiny_llava
from matvlm.training import (
    EpochOrder,
    Job,
    LoopSettings,
    adamw_param_groups,
    list_checkpoints,
    load_checkpoint,
    lr_factor,
    micro_batch_bounds,
    micro_batches,
    read_log,
    save_checkpoint,
    set_rng_state,
    start_run,
    train,
)


def test_wsd_schedule_shape():
    f = [lr_factor(s, 100, warmup=0.1, decay=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:90])
    assert f[90] == pytest.approx(1.0) and f[99] == pytest.approx(0.1) and f[95] < f[90]
    cos = [lr_factor(s, 100, warmup=0.1, shape="cosine") for s in range(100)]
    assert cos[10] == pytest.approx(1.0) and cos[-1] >= 0.1 and cos[-1] < 0.11
    const = [lr_factor(s, 100, warmup=0.1, shape="constant") for s in range(100)]
    assert const[:10] == f[:10] and all(v == 1.0 for v in const[10:])
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, 10, shape="step")


def test_no_weight_decay_on_vectors_and_ssm_parameters():
    import matvlm

    hybrid = matvlm.to_hybrid(tiny_llava("phi"), mamba_layers=[1])
    decay, no_decay = adamw_param_groups(hybrid, 0.01)
    names = {id(p): n for n, p in hybrid.named_parameters()}
    no_decay_names = {names[id(p)].split(".")[-1] for p in no_decay["params"]}
    assert {"A_log", "D", "dt_bias", "bias"} <= no_decay_names
    assert all(p.ndim == 2 or p.ndim > 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01


def test_epoch_order_resumes_at_any_batch():
    order = EpochOrder([random.Random(i).randint(5, 50) for i in range(37)], batch_size=4, seed=3)
    it = order.iterate()
    first = [next(it) for _ in range(25)]
    it = order.iterate(start_batch=11)
    assert [next(it) for _ in range(14)] == first[11:]
    epoch0 = sorted(i for _, b in first[:9] for i in b)
    assert len(epoch0) == 36 and len(set(epoch0)) == 36  # one epoch: every index at most once
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochOrder([1, 2], batch_size=4, seed=0)


def test_epoch_order_ungrouped_mixes_lengths_in_a_batch():
    # Two kinds of record, short and long, as repeat and recall records are: length-grouped batches hold one
    # kind each; ungrouped ones draw from both.
    lengths = [10] * 200 + [100] * 200
    mixed = {False: 0, True: 0}
    for grouped in (True, False):
        batches = EpochOrder(lengths, batch_size=8, seed=0, grouped=grouped).epoch_batches(0)
        assert sorted(i for b in batches for i in b) == list(range(400))  # every record once an epoch
        mixed[grouped] = sum(len({lengths[i] for i in b}) > 1 for b in batches)
    assert mixed[True] <= 8 and mixed[False] >= 40  # of 50 (grouped: a switch a mega-batch; the longest-first swap)

def test_micro_batches_give_the_same_gradient():
    model = tiny_llava("phi").train()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    rows, width = 5, 40
    lengths = [40, 35, 20, 20, 18]
    has_image = torch.tensor([True, False, True, True, False])
    input_ids = torch.randint(3, 100, (rows, width), generator=gen)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
        if has_image[r]:
            input_ids[r, 1 : 1 + cfg.image_seq_length] = cfg.image_token_index
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, : 1 + cfg.image_seq_length] = -100
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "has_image": has_image,
             "pixel_values": torch.randn(3, 3, 32, 32, generator=gen)}
    n_targets = int((labels[:, 1:] != -100).sum())

    def grads(max_tokens):
        model.zero_grad()
        chunks = micro_batches(batch, max_tokens)
        for chunk in chunks:
            model(**chunk, use_cache=False, num_items_in_batch=n_targets).loss.backward()
        return len(chunks), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    n_whole, whole = grads(10_000)
    n_split, split = grads(45)
    assert n_whole == 1 and n_split >= 3
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6)


def test_checkpoint_round_trip_and_rotation(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        path = save_checkpoint(tmp_path, step, dict(model.state_dict()), opt.state_dict(), {"history": [step]}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002", "checkpoint-00000003"]
    expected = (random.random(), np.random.rand(), torch.rand(1))
    tensors, state, meta = load_checkpoint(path)
    assert meta == {"step": 3, "history": [3]}
    assert torch.equal(tensors["weight"], model.weight.detach())
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    set_rng_state(state["rng"])
    # the RNG state saved at step 3 was taken before `expected` was drawn
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_micro_batch_widths_round_up_to_the_multiple():
    from matvlm.data.llava import collate

    items = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (70, 5, 3, 130)]
    batch = collate(items, pad_token_id=0, pad_to_multiple_of=64)
    assert batch["input_ids"].shape[1] == 192
    chunks = micro_batches(batch, max_tokens=300, multiple=64)
    assert [c["input_ids"].shape[1] for c in chunks] == [128, 192]  # 70 -> 128 (rows 0-2 fit), 130 -> 192
    assert sum(int(c["attention_mask"].sum()) for c in chunks) == 70 + 5 + 3 + 130


def test_staged_order_warms_up_on_a_subset_then_resumes_anywhere():
    from matvlm.training import EpochOrder, StagedOrder, SubsetOrder

    lengths = [5 + (i * 7) % 23 for i in range(40)]
    subset = [i for i in range(40) if i % 4 == 0]
    staged = StagedOrder(SubsetOrder(subset, lengths, 4, seed=1), 3, EpochOrder(lengths, 4, seed=1))
    from itertools import islice

    run = list(islice(staged.iterate(0), 12))
    assert [n for n, _ in run] == list(range(12))
    assert all(i in subset for _, batch in run[:3] for i in batch)  # warm-up: only the subset
    assert any(i not in subset for _, batch in run[3:] for i in batch)  # then the full mix
    for start in (0, 2, 3, 7):  # resuming at any batch gives the same batches
        assert list(islice(staged.iterate(start), 12 - start)) == run[start:]


def test_micro_batch_bounds_are_greedy_and_fit():
    # each chunk: consecutive rows, rows x longest row <= max_tokens (or a single row), and no row could join it
    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 40))]
        max_tokens = rng.randint(1, 400)
        mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        bounds = micro_batch_bounds({"attention_mask": mask}, max_tokens)
        assert [a for a, _ in bounds] == [0] + [b for _, b in bounds[:-1]] and bounds[-1][1] == len(lengths)
        for a, b in bounds:
            assert b - a == 1 or (b - a) * max(lengths[a:b]) <= max_tokens
            if b < len(lengths):
                assert (b + 1 - a) * max(lengths[a : b + 1]) > max_tokens


def test_bf16_pixels_change_nothing_under_bf16_autocast():
    # the teacher preloads pixels in bf16 on a GPU: the autocast patch convolution rounds fp32 pixels to bf16
    # itself, so the loss must be bit-identical (and it is not without autocast, so the test can fail)
    model = tiny_llava("phi")
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = torch.tensor([[1] + [cfg.image_token_index] * n_img + [5, 6, 7, 8]])
    pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    rounded = pixels.to(torch.bfloat16)

    def loss(px):
        return model(input_ids=ids, pixel_values=px, labels=ids).loss

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(loss(pixels), loss(rounded))
    with torch.no_grad():
        assert not torch.equal(loss(pixels), loss(rounded.float()))


@pytest.mark.parametrize("workers", [0, 2])  # 2: the cast runs in workers and crosses processes as raw bits
def test_preloaded_pixels_in_the_dtype_asked_for(workers):
    from matvlm.data.preload import PreloadedDataset

    items = [{"input_ids": torch.arange(5), "labels": torch.arange(5), "pixel_values": torch.randn(3, 4, 4), "id": i}
             for i in range(3)] + [{"input_ids": torch.arange(3), "labels": torch.arange(3), "pixel_values": None, "id": 3}]
    kept = PreloadedDataset(items, workers=workers, progress=False)
    half = PreloadedDataset(items, workers=workers, progress=False, pixel_dtype=torch.bfloat16)
    assert kept[0]["pixel_values"].dtype == torch.float32 and torch.equal(kept[0]["pixel_values"], items[0]["pixel_values"])
    assert half[0]["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(half[2]["pixel_values"], items[2]["pixel_values"].to(torch.bfloat16))
    assert half[3]["pixel_values"] is None and half[3]["input_ids"].dtype == torch.long


# ------------------------------------------------------------------------------------------ the loop on a toy job
@dataclass
class ToyConfig:
    out: str
    lr: float = 0.05
    steps: int = 6
    num_workers: int = 0  # resumable: may change between a run and its resumption


class ToyJob(Job):
    """Per-token linear regression of labels from ids; `nan_at`: the loss becomes NaN from that step on."""

    name = "toy"
    metrics = ("error",)
    pad_token_id = 0

    def __init__(self, run, nan_at=0):
        torch.manual_seed(0)
        self.module = torch.nn.Linear(1, 1)
        gen = torch.Generator().manual_seed(1)
        lengths = torch.randint(2, 9, (24,), generator=gen).tolist()
        self.dataset = [{"input_ids": (ids := torch.randint(1, 5, (n,), generator=gen)), "labels": 3 * ids + 1}
                        for n in lengths]
        self.order = EpochOrder(lengths, batch_size=4, seed=0)
        self.run, self.nan_at, self.calls = run, nan_at, 0

    def trainable_state(self):
        return self.module.state_dict()

    def param_groups(self):
        return adamw_param_groups(self.module, 0.0)

    def counts(self, batch):
        return [float(batch["attention_mask"].sum())]

    def loss(self, model, chunk, totals):
        self.calls += 1
        mask = chunk["attention_mask"].bool()
        pred = model(chunk["input_ids"][mask].float()[:, None])[:, 0]
        error = (pred - chunk["labels"][mask].float()).abs().sum() / totals[0]
        loss = (pred - chunk["labels"][mask].float()).pow(2).sum() / totals[0]
        if self.nan_at and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, torch.stack([loss.detach().double(), error.detach().double()])


def _toy_run(cfg, resume=True, stop_at=None, nan_at=0, max_batch_tokens=1000):
    run = start_run(cfg.out, resume)
    job = ToyJob(run, nan_at)
    settings = LoopSettings(steps=cfg.steps, lr=cfg.lr, grad_clip=10.0, max_batch_tokens=max_batch_tokens,
                            save_every=2, num_workers=cfg.num_workers)
    return train(job, settings, run, cfg, resumable={"num_workers"}, progress=False, stop_at=stop_at), job


def test_the_loop_resumes_exactly_and_logs_what_the_job_declares(tmp_path):
    straight, _ = _toy_run(ToyConfig(str(tmp_path / "a")))
    assert straight.columns == ["step", "loss", "error", "grad_norm", "lr", "tokens", "seconds"]
    losses = straight.column("loss")
    assert losses[-1] < losses[0] and straight.step == 6 and not straight.stopped
    assert _toy_run(ToyConfig(str(tmp_path / "b")), stop_at=3)[0].stopped
    with pytest.raises(FileExistsError, match="--resume"):
        _toy_run(ToyConfig(str(tmp_path / "b")), resume=False)
    with pytest.raises(ValueError, match=r"options changed \(lr: 0.05 -> 0.1\)"):
        _toy_run(ToyConfig(str(tmp_path / "b"), lr=0.1))
    resumed, job = _toy_run(ToyConfig(str(tmp_path / "b"), num_workers=1))  # from step 3's checkpoint
    assert [row[0] for row in resumed.history] == list(range(1, 7))
    assert [row[:6] for row in resumed.history] == [row[:6] for row in straight.history]  # bit for bit
    rows = read_log(tmp_path / "b.run" / "log.csv")
    assert [r["loss"] for r in rows] == losses and rows[-1]["tokens"] == straight.history[-1][5]
    tensors, _, meta = load_checkpoint(list_checkpoints(tmp_path / "a.run")[-1])
    assert meta["step"] == 6 and torch.equal(tensors["weight"], job.module.weight.detach())
    # micro-batches of a few tokens each give the same step as whole batches (sums over global counts)
    split, _ = _toy_run(ToyConfig(str(tmp_path / "c")), max_batch_tokens=8)
    torch.testing.assert_close(torch.tensor(split.column("loss")), torch.tensor(losses), rtol=1e-6, atol=0)


def test_a_non_finite_loss_stops_the_run_naming_its_step(tmp_path):
    with pytest.raises(FloatingPointError, match="at step 4: training diverged"):
        _toy_run(ToyConfig(str(tmp_path / "nan")), nan_at=4)  # one micro-batch a step: the 4th step's
    assert [p.name for p in list_checkpoints(tmp_path / "nan.run")] == ["checkpoint-00000002"]  # none after it

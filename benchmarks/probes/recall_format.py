# Usage (from the repository root): PYTHONPATH=benchmarks/probes python benchmarks/probes/recall_format.py
#   --format FORMAT [options]   (findings: recall_format.log beside this file)
# Which part of the world's recall wording stops a small LM from learning the key look-up? recall_lookup.py
# found a 2-layer d64 Phi copying a stated number 100% of the time while picking the right one at chance for
# 13,000 steps. This probe keeps the same facts, keys and values (recall_lookup.recall_record: the world's
# near-miss keys, 0 filler turns) and the same tokenizer and model, and changes only the wording around them:
#   bare      "orange door 17 orange gate 62 purple gate 35 ? purple gate" -> 35  (associative-recall style)
#   sentence  "The key for the orange door is 17. ... What is the key for the purple gate?" -> 35  (no chat)
#   chat      the world's record through the phi_short template, as recall_lookup.py trains it
#   chatmq    chat asking for every key in turn (one question a turn, every answer supervised)
#   word      chat with one-word keys: 2-5 distinct nouns ("The key for the gate is 62."), one question
#   wordmq    word with every key asked in turn
#   tail      chat with the key repeated right before the answer: "... ASSISTANT: purple gate" -> 35
#   echo      chat answered with the fact's own sentence: "... ASSISTANT: The key for the purple gate is" -> 35
#             (a training-only wording in which the answer follows the key, as in the facts)
#   codes     a candidate world wording, one-word keys with the value right after them and the answer naming
#             the key first: "Remember these keys: door 17, gate 62. ... What is the key for the gate?
#             ASSISTANT: gate" -> 62 (the look-up is then the plain induction step, as in single)
#   codes2    codes with the world's two-word near-miss keys: "... blue gate 62, green gate 35. ... ASSISTANT:
#             green gate" -> 35
#   copy      the world's training-only copy family through the chat template: "Repeat these words: blue 35
#             door ... ASSISTANT: blue 35 door ...", every answer token after the first supervised and scored
#             (copy = a token of the prompt); a world-made dense copy task, as repeat is a bare one
#   twice     "Say these words twice: X" -> "X X" (chat; the answer copies the prompt, then itself)
#   saytwice  "Say some words twice." -> "X X" (repeat inside an answer: the first X is unpredictable and
#             not scored; the second is scored)
#   single    sanity check, one-word keys: 2-5 distinct nouns, "door 17 gate 62 safe 35 ? gate" -> 62
#   repeat    8-24 random words said twice, the second copy supervised (forms induction heads; no look-up)
#   mqar      4-12 random colour-noun keys in bare form, then every key asked, each answer supervised
# Only the number tokens are supervised and scored (teacher-forced argmax at the answer positions), so all
# formats are compared on the same quantities: exact (the right number; `first`: on each record's first
# question only) and copy (one of the stated numbers).
from __future__ import annotations

import argparse
import functools
import random
import re
import sys
import time

import torch

from matvlm.data import synth
from matvlm.data.synth import COLORS, RECALL_ACK, RECALL_NOUNS, make_record
from matvlm.data.tokenizer import keeps_number_space
from recall_lookup import _WORLD, TEACHER, Encoder, build_model, itertools_accumulate, pad, parse_stages, recall_record, stage_at

FACT = re.compile(r"The key for the (\w+) (\w+) is (\d+)\.")
QUERY = re.compile(r"the (\w+) (\w+)\?$")
FORMATS = ["bare", "sentence", "chat", "chatmq", "tail", "echo", "single", "mqar", "word", "wordmq", "repeat", "codes", "codes2", "copy", "twice", "saytwice"]


def encode(enc: Encoder, fmt: str, index: int, split: str) -> tuple[list[int], list[int], list[int]]:
    """-> (ids, positions of the supervised number tokens, ids of the stated numbers). 'chat@6': the format with
    6 filler turns (a number or 'log'), whatever --filler says."""
    name, _, filler = fmt.partition("@")
    item = _encode(enc, name, index, split, parse_filler(filler) if filler else FILLER[0])
    return drop_number_spaces(enc, item) if DROP_SPACE[0] else item


def parse_filler(text: str) -> int | str:
    return text if text == "log" else int(text)


def _encode(enc: Encoder, fmt: str, index: int, split: str, filler: int | str) -> tuple[list[int], list[int], list[int]]:
    if fmt in ("single", "mqar"):
        return _synthetic(enc, fmt, random.Random(f"{split}:{index}"))
    if fmt == "repeat":
        return _repeat(enc, random.Random(f"{split}:{index}"))
    if fmt in ("word", "wordmq"):
        return _one_word_chat(enc, fmt == "wordmq", random.Random(f"{split}:{index}"))
    if fmt == "copy":
        return _world_copy(enc, split, index)
    if fmt in ("twice", "saytwice"):
        return _chat_twice(enc, fmt == "twice", random.Random(f"{split}:{index}"))
    if fmt in ("codes", "codes2"):
        return _codes_chat(enc, fmt == "codes2", split, index, filler)
    turns, values = recall_record(split, index, filler, "near")
    facts = FACT.findall(turns[0][0])
    color, noun = QUERY.search(turns[-1][0]).groups()
    answer = turns[-1][1]

    def ids(text: str) -> list[int]:
        return enc.tok.encode(text, add_special_tokens=False)

    if fmt == "bare":
        prompt = ids(" " + " ".join(f"{c} {n} {v}" for c, n, v in facts) + f" ? {color} {noun}") + ids(" ")
    elif fmt == "sentence":
        prompt = ids(turns[0][0] + " " + turns[-1][0]) + ids(" ")
    elif fmt == "chatmq":  # the world's record asking for every key, one turn each, all answers supervised
        order = [facts[i] for i in _asked(random.Random(f"{split}:{index}:order"), len(facts), len(facts))]
        turns = turns[:1] + [(f"What is the key for the {c} {n}?", v) for c, n, v in order]
        seq, labels = enc.train_item(turns, "all")
        nums = [_num(enc, v) for v in values]
        return seq, [i for i, (t, l) in enumerate(zip(seq, labels)) if l == t and t in nums], nums
    elif fmt == "echo":  # ends "... ASSISTANT: The key for the purple gate is Ġ35 . <eos>"
        said = turns[:-1] + [(turns[-1][0], f"The key for the {color} {noun} is {answer}.")]
        full, _ = enc.train_item(said, "final")
        if full[-3] != _num(enc, answer):
            raise ValueError("echo: the answer number is not the third token from the end")
        return full[:-2], [len(full) - 3], [_num(enc, v) for v in values]
    elif fmt in ("chat", "tail"):
        full, _ = enc.train_item(turns, "final")  # ends "... ASSISTANT: Ġ 35 <eos>"
        prompt = full[:-2]
        if fmt == "tail":
            prompt = prompt[:-1] + ids(f" {color} {noun}") + ids(" ")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    seq = prompt + [_num(enc, answer)]
    return seq, [len(seq) - 1], [_num(enc, v) for v in values]


QUERY_ORDER = ["perm"]  # set by --queries
DROP_SPACE = [False]  # set by --drop-space
FILLER: list[int | str] = [0]  # set by --filler


def drop_number_spaces(enc: Encoder, item: tuple[list[int], list[int], list[int]]):
    """Remove the lone space token the tokenizer puts before every number (" 35" -> "Ġ", "35"), so that a
    number follows its key directly, as " 35" -> "Ġ35" would in a GPT-2-style tokenizer."""
    seq, positions, nums = item
    space, numbers = _space_and_numbers(enc)
    keep = [i for i, t in enumerate(seq) if not (t == space and i + 1 < len(seq) and seq[i + 1] in numbers)]
    new_index = {old: new for new, old in enumerate(keep)}
    return [seq[i] for i in keep], [new_index[p] for p in positions if p in new_index], nums


def _asked(rng: random.Random, n: int, k: int) -> list[int]:
    """Which of n keys k questions ask for: 'perm' asks each once (later answers can then be found by
    elimination), 'draw' draws with replacement (no elimination)."""
    if QUERY_ORDER[0] == "perm":
        return rng.sample(range(n), k)
    return [rng.randrange(n) for _ in range(k)]


@functools.cache
def _space_and_numbers(enc: Encoder) -> tuple[int, frozenset[int]]:
    """The lone space token and the tokens of 0..99 (encoded once, not once a record)."""
    return enc.tok.encode(" ", add_special_tokens=False)[-1], frozenset(_num(enc, v) for v in range(100))


def _num(enc: Encoder, v) -> int:  # the tokenizer keeps the space apart: " 35" -> ["Ġ", "35"]
    return enc.tok.encode(f" {v}", add_special_tokens=False)[-1]


def _synthetic(enc: Encoder, fmt: str, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """single: 2-5 one-noun keys and one query. mqar: 4-12 colour-noun keys, then every key queried in a
    random order, each answer supervised (dense supervision, as in associative-recall benchmarks)."""
    if fmt == "single":
        keys = [(n,) for n in rng.sample(RECALL_NOUNS, rng.randint(2, 5))]
        queries = [rng.randrange(len(keys))]
    else:
        keys = rng.sample([(c, n) for c in COLORS for n in RECALL_NOUNS], rng.randint(4, 12))
        queries = _asked(rng, len(keys), len(keys))
    values = rng.sample(range(100), len(keys))
    seq = enc.tok.encode(" " + " ".join(f"{' '.join(k)} {v}" for k, v in zip(keys, values)) + " ?",
                         add_special_tokens=False)
    positions = []
    for q in queries:
        seq += enc.tok.encode(f" {' '.join(keys[q])} {values[q]}", add_special_tokens=False)
        positions.append(len(seq) - 1)
    return seq, positions, [_num(enc, v) for v in values]


def _repeat(enc: Encoder, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """8-24 random words (colours, nouns, numbers) said twice; every word of the second copy after its first
    is supervised. The dense, shortcut-free signal that forms induction heads in small LMs."""
    vocab = list(COLORS) + list(RECALL_NOUNS) + [str(v) for v in range(100)]
    once = enc.tok.encode(" " + " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 24))), add_special_tokens=False)
    seq = once + once
    space, _ = _space_and_numbers(enc)  # numbers come as "Ġ", "35": score the words only
    return seq, [i for i in range(len(once) + 1, len(seq)) if seq[i] != space], sorted(set(once))


def _one_word_chat(enc: Encoder, every_key: bool, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """The world's chat wording with one-word keys (2-5 distinct nouns, no near misses); one question, or
    every key asked in turn."""
    nouns = rng.sample(RECALL_NOUNS, rng.randint(2, 5))
    values = rng.sample(range(100), len(nouns))
    facts = "".join(f" The key for the {n} is {v}." for n, v in zip(nouns, values))
    asked = _asked(rng, len(nouns), len(nouns)) if every_key else [rng.randrange(len(nouns))]
    turns = [("Remember these facts." + facts, RECALL_ACK)]
    turns += [(f"What is the key for the {nouns[q]}?", str(values[q])) for q in asked]
    seq, labels = enc.train_item(turns, "all")
    nums = [_num(enc, v) for v in values]
    return seq, [i for i, (t, lab) in enumerate(zip(seq, labels)) if lab == t and t in nums], nums


def _codes_chat(enc: Encoder, two_words: bool, split: str, index: int, filler: int | str) -> tuple[list[int], list[int], list[int]]:
    """Facts as "key value" pairs and an answer that names the key before its value, in the chat template."""
    if two_words:
        turns, values = recall_record(split, index, filler, "near")
        keys = [f"{c} {n}" for c, n, _ in FACT.findall(turns[0][0])]
        asked = keys.index(" ".join(QUERY.search(turns[-1][0]).groups()))
    else:
        rng = random.Random(f"{split}:{index}")
        keys = rng.sample(RECALL_NOUNS, rng.randint(2, 5))
        values = rng.sample(range(100), len(keys))
        asked = rng.randrange(len(keys))
    facts = ", ".join(f"{k} {v}" for k, v in zip(keys, values))
    turns = [(f"Remember these keys: {facts}.", RECALL_ACK),
             (f"What is the key for the {keys[asked]}?", f"{keys[asked]} {values[asked]}")]
    seq, labels = enc.train_item(turns, "all")
    nums = [_num(enc, v) for v in values]
    return seq, [i for i, (t, lab) in enumerate(zip(seq, labels)) if lab == t and t in nums], nums


def _world_copy(enc: Encoder, split: str, index: int) -> tuple[list[int], list[int], list[int]]:
    """A record of the world's copy family (training split: copy is never in a test split)."""
    record = make_record(_WORLD, "train", index + (10**8 if split == "test" else 0), "copy", index)
    turns = [(record["conversations"][0]["value"].removeprefix("<image>\n"), record["conversations"][1]["value"])]
    seq, labels = enc.train_item(turns, "all")
    answer = [i for i, (t, lab) in enumerate(zip(seq, labels)) if lab == t]
    return seq, answer[1:-1], sorted(set(seq[: answer[0]]))  # not the first word (no cue) nor the eos


def _chat_twice(enc: Encoder, shown: bool, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    vocab = list(COLORS) + list(RECALL_NOUNS) + [str(v) for v in range(100)]
    words = " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 24)))
    prompt = f"Say these words twice: {words}" if shown else "Say some words twice."
    seq, labels = enc.train_item([(prompt, f"{words} {words}")], "all")
    answer = [i for i, (t, lab) in enumerate(zip(seq, labels)) if lab == t][:-1]  # not the eos
    half = len(answer) // 2
    scored = answer[1:] if shown else answer[half + 1:]
    return seq, scored, sorted(set(seq[answer[0]: answer[half]]))


def batch_tensors(items, device: str):
    x = pad([s for s, _, _ in items], 0).to(device)
    mask = pad([[1] * len(s) for s, _, _ in items], 0).to(device)
    rows = torch.tensor([r for r, (_, ps, _) in enumerate(items) for _ in ps], device=device)
    pos = torch.tensor([p for _, ps, _ in items for p in ps], device=device)
    return x, mask, rows, pos


def answer_logits(model, x, mask, rows, pos):
    h = model.model(input_ids=x, attention_mask=mask).last_hidden_state
    return model.lm_head(h[rows, pos - 1]).float()  # the positions that predict the numbers


@torch.no_grad()
def evaluate(model, items, device: str) -> tuple[float, float, float]:
    """Exact over every supervised number, exact over each record's first question only, and copy (one of
    the stated numbers), by teacher-forced argmax. A record asking for every key can be partly answered by
    elimination (the last question's answer is the one number not yet given: H_k / k of them right for
    k keys, ~0.58 for 2-5 keys); its first question cannot."""
    model.eval()
    x, mask, rows, pos = batch_tensors(items, device)
    pred = answer_logits(model, x, mask, rows, pos).argmax(-1).tolist()
    target = x[rows, pos].tolist()
    rows = rows.tolist()
    first = [i == 0 or rows[i - 1] != r for i, r in enumerate(rows)]
    right = [p == t for p, t in zip(pred, target)]
    model.train()
    return (sum(right) / len(right), sum(r for r, f in zip(right, first) if f) / sum(first),
            sum(p in items[r][2] for p, r in zip(pred, rows)) / len(pred))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--format", required=True, help=f"one of {FORMATS}, a mix ('mqar+chat') or stages, e.g. 'mqar:2000,chat'; "
                   "'chat@6': with 6 filler turns")
    p.add_argument("--queries", default="perm", choices=["perm", "draw"],
                   help="multi-question formats: each key once (perm) or drawn with replacement (draw)")
    p.add_argument("--copy-pool", default="world", choices=["world", "short"],
                   help="copy: the world's word pool, or without its OCR words (one-token words only)")
    p.add_argument("--filler", default="0",
                   help="filler turns between the facts and the question: a number, or 'log' (the world's 0..96)")
    p.add_argument("--drop-space", action="store_true", help="remove the lone space token before every number")
    p.add_argument("--tokenizer", default=TEACHER,
                   help="tokenizer folder (default: the shipped teacher's, which keeps the space with the number "
                        "since session 13; session 12's runs used the one of commit 4d60861)")
    p.add_argument("--eval-formats", default="chat", help="comma list evaluated besides the training formats")
    p.add_argument("--arch", default="phi", choices=["phi", "llama"])
    p.add_argument("--init", default="scratch", help="scratch, teacher (the shipped one) or a teacher folder")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--rotary", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=256)
    p.add_argument("--max-minutes", type=float, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    QUERY_ORDER[0] = args.queries
    FILLER[0] = parse_filler(args.filler)
    if args.copy_pool == "short":  # _fam_copy reads these at call time; the probe makes no OCR record
        synth.SHORT_WORDS, synth.LONG_WORDS = (), ()
    enc = Encoder("digits", args.tokenizer)
    # A number_space tokenizer has no lone space before numbers, but the bare wordings below add one (ids(" ")):
    # drop it, so that every wording reads numbers as the tokenizer would.
    DROP_SPACE[0] = args.drop_space or keeps_number_space(enc.tok)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    print("args:", " ".join(sys.argv[1:]), flush=True)
    stages = parse_stages(args.format)
    bounds = itertools_accumulate([n for n, _ in stages])
    trained = [f for _, spec in stages for f in spec.split("+")]
    names = list(dict.fromkeys(trained + [f for f in args.eval_formats.split(",") if f]))
    if unknown := {f.partition("@")[0] for f in names} - set(FORMATS):
        raise SystemExit(f"unknown format(s) {sorted(unknown)}; known: {FORMATS}")
    evals = {f: [encode(enc, f, 10**6 + i, "test") for i in range(args.eval_n)] for f in names}
    for f, items in evals.items():
        chance = sum(len(ps) / len(n) for _, ps, n in items) / sum(len(ps) for _, ps, _ in items)
        first = sum(1 / len(n) for _, _, n in items) / len(items)
        example = enc.tok.convert_ids_to_tokens(items[0][0])
        print(f"{f}: chance (pick a stated number) {chance:.3f}, first question {first:.3f}; example ({len(example)} tokens): "
              f"{' '.join(example)}", flush=True)
    model = build_model(args, len(enc.tok)).to(args.device)
    shape = f"L{args.layers} d{args.hidden} h{args.heads}" if args.init == "scratch" else f"the LM of {args.init}"
    print(f"model {shape}: {sum(q.numel() for q in model.parameters()) / 1e6:.2f} M params", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    t0, losses, counter = time.time(), [], 0
    rng = random.Random(args.seed)
    for step in range(1, args.steps + 1):
        fmt = stage_at(bounds, stages, step)
        mix = fmt.split("+")  # 'mqar+chat': each record in one of the formats, drawn uniformly
        items = [encode(enc, rng.choice(mix), rng.randrange(10**9), "train") for _ in range(args.batch)]
        counter += args.batch
        x, mask, rows, pos = batch_tensors(items, args.device)
        loss = torch.nn.functional.cross_entropy(answer_logits(model, x, mask, rows, pos), x[rows, pos])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        out_of_time = time.time() - t0 > args.max_minutes * 60
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            recent = losses[-args.eval_every:]
            parts = " | ".join("%s: exact %.3f first %.3f copy %.3f" % (f, *evaluate(model, items, args.device))
                               for f, items in evals.items())
            print(f"step {step} ({fmt}, {counter} records) loss {sum(recent) / len(recent):.3f} | {parts} | "
                  f"{time.time() - t0:.0f}s", flush=True)
        if out_of_time:
            print(f"stopped by --max-minutes at step {step}", flush=True)
            break


if __name__ == "__main__":
    main()

# Usage: python benchmarks/probes/recall_lookup.py [options]   (findings: recall_lookup.log beside this file)
# Text-only probe of the world's "recall" family: can a Phi LM of the teacher's shape learn the key look-up,
# and after how many steps? Records use the world's exact wording (synth.py's templates, RECALL_ACK,
# RECALL_NOUNS, COLORS, near-miss keys, _simple_qa fillers), rendered with the phi_short template and the
# shipped teacher's tokenizer, without the <image> token. The number of filler turns is controlled
# (--fillers LO-HI, uniform; or 'log' for the world's log-uniform 0..96), optionally as a curriculum.
# Reports, every --eval-every steps, held-out exact accuracy of the final answer (greedy) and the rate at
# which the greedy answer is one of the numbers given in the facts ("copy").
from __future__ import annotations

import argparse
import collections
import contextlib
import multiprocessing
import random
import re
import sys
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

from matvlm.data.llava import IGNORE_INDEX, _tokenize_segments
from matvlm.data.synth import (COLORS, RECALL_ACK, RECALL_MAX_FILLER_TURNS, RECALL_NOUNS, _Draft, _fam_recall, _Gen,
                               _Retry, _simple_qa, _World)
from matvlm.data.templates import get_template

TEACHER = "matvlm/assets/teacher"
_WORLD = _World.make(0, 128)


def _random_keys_recall(g: _Gen, n_filler: int | None) -> _Draft:
    """_fam_recall's wording with 2-5 independent keys instead of near misses: matching the colour or the noun
    alone is then usually enough (session 11: does partial matching give the look-up a gradient?)."""
    rng = g.rng
    objs = g.place(g.objects(rng.randint(5, 10)))
    keys = rng.sample([(c, n) for c in COLORS for n in RECALL_NOUNS], rng.randint(2, 5))
    values = rng.sample(range(100), len(keys))
    facts = "".join(f" The key for the {c} {n} is {v}." for (c, n), v in zip(keys, values))
    n_filler = round((RECALL_MAX_FILLER_TURNS + 1) ** rng.random()) - 1 if n_filler is None else n_filler
    turns = [(g.ask("facts", facts=facts), RECALL_ACK)] + [_simple_qa(g, objs) for _ in range(n_filler)]
    t = rng.randrange(len(keys))
    turns.append((g.ask("recall", color=keys[t][0], noun=keys[t][1]), str(values[t])))
    return _Draft(turns, objs, kind="recall")


def recall_record(split: str, index: int, n_filler: int | str, keys: str = "near") -> tuple[list[tuple[str, str]], list[int]]:
    """One recall conversation made by the world's own synth._fam_recall (keys 'near': near-miss keys, as in the
    world; 'random': independent keys), with n_filler filler turns ('log': the world's log-uniform 0..96).
    Returns the turns and the fact values."""
    make = _fam_recall if keys == "near" else _random_keys_recall
    for attempt in range(50):
        g = _Gen(_WORLD, split, f"probe-recall:{index}:{attempt}", index)
        try:
            draft = make(g, None if n_filler == "log" else int(n_filler))
        except _Retry:
            continue
        values = [int(v) for v in re.findall(r" is (\d+)\.", draft.turns[0][0])]
        return draft.turns, values
    raise RuntimeError("could not sample a record")


def to_messages(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


class Encoder:
    """phi_short rendering + the teacher tokenizer, labels as the teacher's trainer makes them
    (' ' + answer + eos of every assistant turn); numtok='one' maps each number 0-99 to one new token."""

    def __init__(self, numtok: str, tokenizer: str = TEACHER) -> None:
        self.tok = AutoTokenizer.from_pretrained(tokenizer)
        self.chat = get_template("phi_short")
        self.numtok = numtok
        if numtok == "one":
            self.tok.add_tokens([f"<n{v}>" for v in range(100)])

    def _num(self, text: str) -> str:
        return re.sub(r"\d+", lambda m: f"<n{int(m.group())}>", text) if self.numtok == "one" else text

    def train_item(self, turns, supervise: str) -> tuple[list[int], list[int]]:
        turns = [(self._num(q), self._num(a)) for q, a in turns]
        ids, labels = _tokenize_segments(self.chat.segments(to_messages(turns)), self.tok, None)
        if supervise == "prompt":  # every token, the human turns' too: dense copy signal (session 11)
            return ids, list(ids)
        if supervise == "final":  # keep only the last supervised run (the final ' answer<eos>')
            last = max(i for i, l in enumerate(labels) if l == IGNORE_INDEX)
            labels = [IGNORE_INDEX] * (last + 1) + labels[last + 1:]
        return ids, labels

    def eval_item(self, turns) -> tuple[list[int], str]:
        turns = [(self._num(q), self._num(a)) for q, a in turns]
        segs = self.chat.generation_segments(to_messages(turns)[:-1])
        ids, _ = _tokenize_segments(segs, self.tok, None)
        return ids, turns[-1][1]

    def decode(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=False).split(self.tok.eos_token)[0].strip()
        return text


def build_model(args, vocab: int) -> torch.nn.Module:
    if args.init != "scratch":  # "teacher" (the shipped one) or a teacher folder: its LM, without the vision side
        from transformers import LlavaForConditionalGeneration
        full = LlavaForConditionalGeneration.from_pretrained(TEACHER if args.init == "teacher" else args.init,
                                                             dtype=torch.float32)
        cfg = full.config.text_config
        lm = PhiForCausalLM(cfg)
        lm.model.load_state_dict(full.model.language_model.state_dict())
        lm.lm_head.weight.data.copy_(full.lm_head.weight.data)  # Llava's head has no bias; Phi's is zeroed
        torch.nn.init.zeros_(lm.lm_head.bias)
        if vocab > cfg.vocab_size:
            lm.resize_token_embeddings(vocab)
        return lm
    common = dict(vocab_size=vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, intermediate_size=4 * args.hidden, max_position_embeddings=4096,
                  attention_dropout=0.0, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    if args.arch == "phi":  # as teacher.build_teacher: gelu_new MLP, partial rotary, LayerNorm, untied head
        cfg = PhiConfig(**common, resid_pdrop=0.0, embd_pdrop=0.0, partial_rotary_factor=args.rotary,
                        tie_word_embeddings=False)
        return PhiForCausalLM(cfg)
    cfg = LlamaConfig(**common, num_key_value_heads=args.heads, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def parse_stages(spec: str) -> list[tuple[int, str]]:
    """'0-0:500,2-5:1000,0-5' -> [(500, '0-0'), (1000, '2-5'), (inf, '0-5')] (steps per stage)."""
    out = []
    for part in spec.split(","):
        rng, _, n = part.partition(":")
        out.append((int(n) if n else 10**9, rng))
    return out


def stage_at(bounds: list[int], stages: list[tuple[int, str]], step: int) -> str:
    """The spec of the stage that `step` falls in (bounds: the stages' cumulative step counts)."""
    return next(spec for bound, (_, spec) in zip(bounds, stages) if step <= bound)


def draw_fillers(spec: str, rng: random.Random) -> int | str:
    if spec == "log":
        return "log"
    lo, hi = map(int, spec.split("-"))
    return rng.randint(lo, hi)


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    n = max(map(len, seqs))
    return torch.tensor([([value] * (n - len(s)) + s) if left else (s + [value] * (n - len(s))) for s in seqs])


@torch.no_grad()
def evaluate(model, enc: Encoder, items, batch: int = 64) -> tuple[float, float]:
    """Greedy answer (up to 4 new tokens, KV cache off for simplicity): exact and copy-from-facts rates."""
    model.eval()
    exact = copy = 0
    for b in range(0, len(items), batch):
        chunk = items[b:b + batch]
        device = next(model.parameters()).device
        x = pad([c[0] for c in chunk], 0, left=True).to(device)
        mask = pad([[1] * len(c[0]) for c in chunk], 0, left=True).to(device)
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             pad_token_id=0, eos_token_id=enc.tok.eos_token_id)
        for (ids, target, values), gen in zip(chunk, out[:, x.shape[1]:].tolist()):
            pred = enc.decode(gen)
            exact += pred == target
            copy += pred in {enc._num(str(v)) for v in values}
    model.train()
    return exact / len(items), copy / len(items)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="phi", choices=["phi", "llama"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--rotary", type=float, default=0.5)
    p.add_argument("--init", default="scratch", help="scratch, teacher (the shipped one) or a teacher folder")
    p.add_argument("--fillers", default="0-0", help="LO-HI or log; stages: '0-0:500,0-5' (steps per stage)")
    p.add_argument("--eval-fillers", default="", help="comma list of LO-HI sets to evaluate (default: last stage)")
    p.add_argument("--supervise", default="all", choices=["all", "final", "prompt"])
    p.add_argument("--numtok", default="digits", choices=["digits", "one"])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--n-train", type=int, default=0, help="fixed pool of training records (0: fresh each step)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=256)
    p.add_argument("--max-minutes", type=float, default=5.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-first", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    p.add_argument("--workers", type=int, default=0, help="processes that make the training records (0: this one)")
    p.add_argument("--keys", default="near", help="training keys: near (the world's near misses), random, or "
                   "stages as for --fillers, e.g. 'random:1500,near'")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    print("args:", " ".join(sys.argv[1:]), flush=True)

    enc = Encoder(args.numtok)
    stages = parse_stages(args.fillers)
    eval_specs = args.eval_fillers.split(",") if args.eval_fillers else [stages[-1][1]]
    erng = random.Random(12345)
    eval_sets = {}
    key_stages = parse_stages(args.keys)
    eval_keys = ["near"] + (["random"] if any(k == "random" for _, k in key_stages) else [])
    for kind in eval_keys:
        for spec in eval_specs if kind == "near" else eval_specs[:1]:
            items = []
            for i in range(args.eval_n):
                turns, values = recall_record("test", 10**6 + i, draw_fillers(spec, erng), kind)
                ids, target = enc.eval_item(turns)
                items.append((ids, target, values))
            eval_sets[spec if kind == "near" else f"{spec} random keys"] = items
    # Chance of a random pick among the given numbers: the copy-only baseline.
    chance = {s: sum(1 / len(v) for _, _, v in items) / len(items) for s, items in eval_sets.items()}

    bounds = list(itertools_accumulate([n for n, _ in stages]))
    key_bounds = list(itertools_accumulate([n for n, _ in key_stages]))

    def step_jobs(st: int) -> list[tuple]:  # drawn in step order: the records one process would make
        spec_, keys_ = stage_at(bounds, stages, st), stage_at(key_bounds, key_stages, st)
        return [(j, draw_fillers(spec_, rng), keys_, args.supervise) for j in range((st - 1) * args.batch, st * args.batch)]

    if args.workers and args.n_train:
        raise SystemExit("--workers makes fresh records: it cannot be combined with --n-train")
    # Fresh records made ahead by a process pool (a GPU step outruns one process), at most 16 steps ahead so
    # that memory stays bounded; forked before the model touches the GPU.
    workers = multiprocessing.get_context("fork").Pool(args.workers, _init_worker, (args.numtok,)) if args.workers else None
    ahead = collections.deque(workers.map_async(_make_item, step_jobs(st), chunksize=8)
                              for st in range(1, min(args.steps, 16) + 1)) if workers else None

    model = build_model(args, len(enc.tok)).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.init}/{args.arch} L{args.layers} d{args.hidden} h{args.heads} rot{args.rotary}: "
          f"{n_params / 1e6:.2f} M params; chance(pick a given number) {chance}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))

    if args.eval_first:  # step 0: what the initial weights (e.g. the shipped teacher) already do
        print("step 0 | " + " | ".join("fillers %s: exact %.3f copy %.3f" % (s, *evaluate(model, enc, it))
                                       for s, it in eval_sets.items()), flush=True)
    pool: list[tuple[list[int], list[int]]] = []
    t0, seen, counter, losses, tokens = time.time(), 0, 0, [], 0
    autocast = torch.autocast("cuda", torch.bfloat16) if args.device.startswith("cuda") else contextlib.nullcontext()
    for step in range(1, args.steps + 1):
        spec, keys = stage_at(bounds, stages, step), stage_at(key_bounds, key_stages, step)
        batch = []
        if ahead is not None:
            batch = ahead.popleft().get()
            if step + 16 <= args.steps:
                ahead.append(workers.map_async(_make_item, step_jobs(step + 16), chunksize=8))
        for _ in range(args.batch if ahead is None else 0):
            if args.n_train and len(pool) >= args.n_train:
                batch.append(pool[rng.randrange(args.n_train)])
                continue
            turns, _ = recall_record("train", counter, draw_fillers(spec, rng), keys)
            counter += 1
            item = enc.train_item(turns, args.supervise)
            if args.n_train:
                pool.append(item)
            batch.append(item)
        x = pad([b[0] for b in batch], 0).to(args.device)
        y = pad([b[1] for b in batch], IGNORE_INDEX).to(args.device)
        mask = pad([[1] * len(b[0]) for b in batch], 0).to(args.device)
        tokens += x.numel()
        with autocast:
            loss = answer_loss(model, x, mask, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seen += args.batch
        out_of_time = time.time() - t0 > args.max_minutes * 60
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            parts = []
            for s, items in eval_sets.items():
                ex, cp = evaluate(model, enc, items)
                parts.append(f"fillers {s}: exact {ex:.3f} copy {cp:.3f}")
            mean = sum(losses[-args.eval_every:]) / len(losses[-args.eval_every:])
            print(f"step {step} (fillers {spec}, keys {keys}, {seen} records, {tokens / 1e6:.1f} M padded tokens) "
                  f"loss {mean:.3f} | " + " | ".join(parts) + f" | {time.time() - t0:.0f}s", flush=True)
        if out_of_time:
            print(f"stopped by --max-minutes at step {step}", flush=True)
            break


_ENC: Encoder | None = None


def _init_worker(numtok: str) -> None:
    global _ENC
    _ENC = Encoder(numtok)


def _make_item(job) -> tuple[list[int], list[int]]:
    index, n_filler, keys, supervise = job
    turns, _ = recall_record("train", index, n_filler, keys)
    return _ENC.train_item(turns, supervise)


def answer_loss(model, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss on supervised tokens, the same value as model(labels=y).loss; the LM head runs only
    at the supervised positions (on the CPU the 2048-way head costs as much as a small layer)."""
    h = model.model(input_ids=x, attention_mask=mask).last_hidden_state[:, :-1]
    target = y[:, 1:]
    keep = target != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(model.lm_head(h[keep]).float(), target[keep])


def itertools_accumulate(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total = min(10**9, total + x)
        out.append(total)
    return out


if __name__ == "__main__":
    main()

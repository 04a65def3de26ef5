"""lmms-eval adapter: run a matvlm teacher or hybrid on the standard VLM benchmarks (MME, MMBench, POPE, ...).

Optional: needs ``pip install "matvlm[lmms]"`` (lmms-eval 0.7.3). Only this module imports lmms_eval.

Three ways in, all with the model name ``matvlm`` and ``pretrained=DIR`` (any matvlm hybrid or HF Llava dir)::

    python -m matvlm.eval.lmms --model matvlm --model_args pretrained=DIR --tasks mme,pope --batch_size 16
    lmms-eval --model matvlm --model_args pretrained=DIR --tasks mme      # via the "lmms_eval.models" entry point
    simple_evaluate(model=MaTVLM(pretrained=DIR), tasks=["mme"])           # from Python

The first is lmms-eval's own command line with this model registered first (it takes every lmms-eval
option, also under ``accelerate launch -m matvlm.eval.lmms``). Prompts are built exactly as
``matvlm eval`` and training build them: the model's chat template (``matvlm.json``, else guessed from the
tokenizer), images first as ``<image>\\n`` placeholders, each expanded to the model's image tokens.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ModuleNotFoundError as err:
    if err.name != "lmms_eval":
        raise
    raise ImportError('the lmms-eval adapter needs the optional extra: pip install "matvlm[lmms]"') from err

from matvlm.data.records import to_rgb  # the same RGB conversion training images get
from matvlm.data.templates import IMAGE_TOKEN, get_template
from matvlm.io import model_template

MODEL_NAME = "matvlm"
CLASS_PATH = "matvlm.eval.lmms.MaTVLM"
# Our templates move every "<image>" of a question to its front; the adapter places images itself, so the
# template gets a placeholder that never occurs in text and leaves the question as it is.
_NO_PLACEHOLDER = "\x00matvlm-images-placed-already\x00"
# Generation settings the adapter reads; others (e.g. LLaVA's image_aspect_ratio) do not apply to matvlm.
_KNOWN_GEN_KWARGS = {"until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams"}


class MaTVLM(lmms):
    """An lmms-eval model for matvlm hybrids and HF Llava teachers.

    Model args (``--model_args k=v,...`` or keyword arguments): ``pretrained`` (model dir), ``device``
    (default: cuda if available), ``dtype`` (float32 / bfloat16 / float16; default: float32 on the CPU,
    bfloat16 on a GPU), ``batch_size``, ``template`` (chat template name; default: the model's),
    ``max_new_tokens`` (when a task does not set it).
    """

    is_simple = True  # lmms-eval "simple" interface: text prompt + visuals per request

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        template: str | None = None,
        max_new_tokens: int | str = 1024,
        max_batch_size: int | None = None,  # passed by lmms-eval's command line; unused
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model args for --model {MODEL_NAME}: {', '.join(sorted(unknown))}; "
                "known: pretrained, device, dtype, batch_size, template, max_new_tokens"
            )
        from transformers import AutoTokenizer

        from matvlm.data.tokenizer import check_tokenizer
        from matvlm.io import load_image_processor, load_vlm

        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the matvlm model; give a number (--batch_size 16)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        local_rank = os.environ.get("LOCAL_RANK")
        if device == "cuda" and local_rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = f"cuda:{local_rank}"  # data parallel (accelerate launch): one model copy per process
        torch_dtype = None if dtype in (None, "auto") else getattr(torch, str(dtype), None)
        if dtype not in (None, "auto") and not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype (use float32, bfloat16 or float16)")

        self.pretrained = str(pretrained)
        self._model = load_vlm(pretrained, dtype=torch_dtype, device=device)
        self._device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        # PIL backend, as training and `matvlm eval` (lmms-eval installs torchvision, whose resize differs).
        self.image_processor = load_image_processor(pretrained)
        check_tokenizer(self.tokenizer, image_token=IMAGE_TOKEN)
        self.template = model_template(pretrained, self.tokenizer, template)
        self.chat = replace(get_template(self.template), image_token=_NO_PLACEHOLDER)
        self.image_token_id: int = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.image_tokens: int = self._model.config.image_seq_length
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else self.tokenizer.eos_token_id
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ properties lmms-eval reads
    @property
    def model(self):
        return self._model

    @property
    def config(self):
        return self._model.config  # lmms-eval names results after config._name_or_path

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def clean(self) -> None:
        """lmms-eval calls this after a run's requests to free GPU memory (for a local judge model). The
        base class deletes the model; we move it to the CPU instead, so this object can run again."""
        self._model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _on_device(self):
        if next(self._model.parameters()).device != self.device:
            self._model.to(self.device)
        return self._model

    # ------------------------------------------------------------------ prompts
    def prompt_ids(self, context: str, n_images: int) -> list[int]:
        """Token ids of the generation prompt for one request, image blocks expanded.

        Images go first, one ``<image>\\n`` each, as in LLaVA training data; a task's own ``<image>``
        placeholders are removed first (their count need not match the images the task hands over).
        """
        text = context.replace(IMAGE_TOKEN, "").strip()
        text = "\n".join([IMAGE_TOKEN] * n_images + [text]) if n_images else text
        prompt = self.chat.generation_prompt([{"role": "user", "content": text}])
        ids = self.tokenizer(prompt)["input_ids"]  # adds BOS where the tokenizer does (Llama), as training
        if ids.count(self.image_token_id) != n_images:  # e.g. the "plain" template drops the question
            raise ValueError(
                f"chat template {self.template!r} kept {ids.count(self.image_token_id)} of {n_images} image "
                "placeholder(s); evaluate with a chat template (--model_args template=phi, vicuna_v1, ...)"
            )
        expanded: list[int] = []
        for token in ids:
            expanded.extend([token] * self.image_tokens if token == self.image_token_id else [token])
        return expanded

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor | None:
        if not images:
            return None
        rgb = [to_rgb(image, lambda reason: ValueError(f"bad image: {reason}")) for image in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, dtype=self.model.dtype)

    def _visuals(self, doc_to_visual: Callable | None, doc_id, task: str, split: str) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        flat = [v for item in visuals for v in (item if isinstance(item, (list, tuple)) else [item])]
        for v in flat:
            if not isinstance(v, Image.Image):
                raise TypeError(
                    f"task {task!r} doc {doc_id}: matvlm models take images, got a {type(v).__name__} "
                    "(video and audio tasks are not supported)"
                )
        return flat

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            print(f"[matvlm] warning: {message}")

    # ------------------------------------------------------------------ generate_until
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in batches of ``batch_size`` prompts of similar length (left padding), one batch per
        setting: greedy unless the task asks for sampling, cut at the first ``until`` string."""
        self._on_device()
        keys, lengths = [], []
        for request in requests:
            context, gen_kwargs, _, _, task, _ = request.args
            keys.append(json.dumps(self._generation_settings(gen_kwargs, task), sort_keys=True))
            lengths.append(len(self.tokenizer(context)["input_ids"]))
        # Same settings together, longest first within them (an out-of-memory shows up at once).
        order = sorted(range(len(requests)), key=lambda i: (keys[i], -lengths[i]))
        answers: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="matvlm generating", disable=self.rank != 0)
        for key, group in itertools.groupby(order, key=lambda i: keys[i]):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                for i, answer in zip(chunk, self._generate_batch([requests[i] for i in chunk], json.loads(key))):
                    answers[i] = answer
                bar.update(len(chunk))
        bar.close()
        return answers

    def _generation_settings(self, gen_kwargs: dict, task: str) -> dict:
        gen_kwargs = dict(gen_kwargs or {})
        for key in sorted(set(gen_kwargs) - _KNOWN_GEN_KWARGS):
            self._warn_once(f"task {task!r}: generation setting {key!r} does not apply to matvlm models; ignored")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        # Sample only when asked and the temperature is above 0. An explicit do_sample wins: MM-Vet's task
        # sets temperature 0.2 with do_sample false, which is greedy (as LLaVA's evaluation scripts run it).
        asked = gen_kwargs.get("do_sample")
        do_sample = temperature > 0 and (asked is None or bool(asked))
        if int(gen_kwargs.get("num_beams") or 1) != 1:
            raise ValueError(f"task {task!r} asks for beam search (num_beams > 1); matvlm decodes greedily or samples")
        return {
            "until": until,
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "do_sample": do_sample,
            "temperature": temperature if do_sample else None,
            "top_p": float(gen_kwargs["top_p"]) if do_sample and gen_kwargs.get("top_p") is not None else None,
        }

    @torch.no_grad()
    def _generate_batch(self, requests: list[Instance], settings: dict) -> list[str]:
        prompts, images = [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prompts.append(self.prompt_ids(context, len(visuals)))
            images.extend(visuals)
        input_ids, attention_mask = left_pad(prompts, self.pad_id)
        eos_text = self.tokenizer.eos_token
        stop_strings = [s for s in settings["until"] if s and s != eos_text]
        extra = {"stop_strings": stop_strings, "tokenizer": self.tokenizer} if stop_strings else {}
        if settings["do_sample"]:
            extra.update(temperature=settings["temperature"], top_p=settings["top_p"])
        if images:  # generate() in transformers 5.24 runs the vision tower on pixel_values=None: leave it out
            extra["pixel_values"] = self.pixel_values(images)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_new_tokens=settings["max_new_tokens"],
            do_sample=settings["do_sample"],
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.pad_id,
            **extra,
        )
        answers = []
        for row in out[:, input_ids.shape[1]:].tolist():
            if self.tokenizer.eos_token_id in row:
                row = row[: row.index(self.tokenizer.eos_token_id)]
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for stop in settings["until"]:
                if stop:
                    text = text.split(stop)[0]
            answers.append(text.strip())
        return answers

    # ------------------------------------------------------------------ loglikelihood
    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(negative log-likelihood of the continuation in nats, whether greedy decoding picks every one
        of its tokens) for each (context, continuation) request.

        A loss, not a log-probability: lmms-eval's multiple-choice scoring takes the argmin over the
        choices, as its own LLaVA adapters return a loss. The continuation is tokenized on its own after
        the assistant cue, as answers are in training.
        """
        self._on_device()
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), desc="matvlm loglikelihood", disable=self.rank != 0)
        for start in range(0, len(requests), self.batch_size):
            sequences, spans, images = [], [], []
            for request in requests[start : start + self.batch_size]:
                context, target, doc_to_visual, doc_id, task, split = _loglikelihood_args(request.args)
                if callable(target):  # output_type loglikelihood: the task's doc_to_target
                    target = target(self.task_dict[task][split][doc_id])
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
                prompt = self.prompt_ids(context, len(visuals))
                continuation = self.tokenizer(str(target), add_special_tokens=False)["input_ids"]
                sequences.append(prompt + continuation)
                spans.append((len(prompt), len(continuation)))
                images.extend(visuals)
            width = max(len(s) for s in sequences)
            # Right padding: pads come after every scored position, so causal models never see them.
            input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, seq in enumerate(sequences):
                input_ids[row, : len(seq)] = torch.tensor(seq)
                attention_mask[row, : len(seq)] = 1
            logits = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                pixel_values=self.pixel_values(images),
            ).logits
            for row, (prompt_len, n) in enumerate(spans):
                if n == 0:
                    results.append((0.0, True))
                    continue
                # Position p predicts token p + 1: the continuation is predicted from prompt_len - 1 on.
                scores = torch.log_softmax(logits[row, prompt_len - 1 : prompt_len - 1 + n].float(), dim=-1)
                target_ids = input_ids[row, prompt_len : prompt_len + n].to(scores.device)
                nll = -scores.gather(-1, target_ids[:, None]).sum().item()
                results.append((nll, bool((scores.argmax(-1) == target_ids).all())))
            bar.update(len(sequences))
        bar.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "the matvlm model does not implement multi-round generation (only video/agent tasks use it)"
        )


def _loglikelihood_args(args: tuple) -> tuple:
    """lmms-eval's unconditional requests (acc_mutual_info) carry only (context, continuation)."""
    if len(args) == 2:
        return args[0], args[1], None, None, None, None
    return args


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every sequence right-aligned, for batched generation."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------- registration
def manifest():
    """The model manifest for lmms-eval's registry (the ``lmms_eval.models`` entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Make ``--model matvlm`` known to lmms-eval in this process (no installed entry point needed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)


def main() -> None:
    """lmms-eval's command line, with the matvlm model registered: same arguments as ``lmms-eval``."""
    register()
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    lmms_eval_main()


if __name__ == "__main__":
    main()

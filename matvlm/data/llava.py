"""LLaVA-format supervised data for HF Llava-style models: dataset, collate, eval prompts, sampler.

Token layout of one item (phi template, one image)::

    [system USER: ] <image> x num_image_tokens [\\nWhat is ...? ASSISTANT:] [ The answer<|endoftext|>] ...
     labels -100     labels -100                 labels -100                  labels = input ids

The single ``<image>`` placeholder is expanded to ``num_image_tokens`` copies of the image token id,
as transformers' ``LlavaProcessor`` does, so the sequence can go straight into
``LlavaForConditionalGeneration`` (it scatters the image features into those positions).

Record/image validation lives in :mod:`matvlm.data.records` and is re-exported here.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from matvlm.data.records import (
    DEFAULT_MAX_PIXELS,
    BadImageError,
    BadRecordError,
    DataError,
    find_image,
    is_text_record,
    load_image,
    load_records,
    record_label,
    validate_record,
)
from matvlm.data.templates import IMAGE_TOKEN, ChatTemplate, get_template
from matvlm.data.tokenizer import TokenizerError, check_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "DEFAULT_MAX_PIXELS",
    "DataError",
    "BadRecordError",
    "BadImageError",
    "load_records",
    "validate_record",
    "find_image",
    "is_text_record",
    "load_image",
    "check_segment_tokenization",
    "SupervisedDataset",
    "collate",
    "generation_inputs",
    "LengthGroupedSampler",
    "build_image_processor",
]

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- tokenization helpers
def _bos_id(tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends one by itself (Llama), else None (Phi, ours)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _tokenize_each_segment(
    segments: Sequence[tuple[str, bool]], tokenizer, bos_id: int | None
) -> tuple[list[int], list[int]]:
    """Token ids and labels with each segment tokenized on its own (the fallback for slow tokenizers,
    and what :func:`check_segment_tokenization` compares against the whole string)."""
    ids: list[int] = [] if bos_id is None else [bos_id]
    labels: list[int] = [] if bos_id is None else [IGNORE_INDEX]
    encoded = tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
    for (_, supervised), piece in zip(segments, encoded):
        ids.extend(piece)
        labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))
    return ids, labels


def _tokenize_segments(
    segments: Sequence[tuple[str, bool]], tokenizer, bos_id: int | None
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation tokenized as ONE string, exactly as inference sees it;
    a token is supervised when its last character lies in a supervised segment.

    Tokenizing segment by segment would be simpler, but SentencePiece tokenizers (Llama, Vicuna) add a
    prefix space to every call, so the pieces would differ from the inference tokens.
    """
    if not getattr(tokenizer, "is_fast", False):  # no character offsets: per-segment tokenization
        return _tokenize_each_segment(segments, tokenizer, bos_id)
    text = "".join(t for t, _ in segments)
    supervised = bytearray(len(text))
    at = 0
    for piece, flag in segments:
        if flag:
            supervised[at : at + len(piece)] = b"\x01" * len(piece)
        at += len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = [] if bos_id is None else [bos_id]
    labels: list[int] = [] if bos_id is None else [IGNORE_INDEX]
    for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        ids.append(token)
        labels.append(token if end > start and supervised[end - 1] else IGNORE_INDEX)
    return ids, labels


def check_segment_tokenization(
    tokenizer, template: str | ChatTemplate, image_token: str = IMAGE_TOKEN
) -> None:
    """Raise :class:`TokenizerError` if tokenizing a conversation segment by segment (as training
    does) differs from tokenizing the rendered string at once (as ``apply_chat_template`` users and
    generation servers do). Byte-level BPE tokenizers pass; SentencePiece tokenizers that add a
    prefix space to every call do not, and would train on token sequences never seen at inference."""
    chat = get_template(template)
    if chat.image_token != image_token:
        chat = _with_image_token(chat, image_token)
    messages = [
        {"from": "human", "value": f"{image_token}\nWhat is 12 + 7?"},
        {"from": "gpt", "value": "It is 19. Sure!"},
        {"from": "human", "value": "And twice that?"},
        {"from": "gpt", "value": "38, I think."},
    ]
    if chat.max_turns is not None:
        messages = messages[: 2 * chat.max_turns]
    bos_id = _bos_id(tokenizer)
    pieces, _ = _tokenize_each_segment(chat.segments(messages), tokenizer, bos_id)
    whole = tokenizer(chat.render(messages))["input_ids"]
    if pieces != whole:
        raise TokenizerError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} tokenizes the {chat.name!r} template "
            "differently segment by segment than as one string (first difference at token "
            f"{_first_difference(pieces, whole)}); training labels would not match inference inputs. "
            "Use a byte-level BPE tokenizer or pass check_tokenization=False if you accept this."
        )


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _with_image_token(chat: ChatTemplate, image_token: str) -> ChatTemplate:
    from dataclasses import replace

    return replace(chat, image_token=image_token)


def _expand_image(
    ids: list[int], labels: list[int], image_id: int, count: int, expected: int, bad
) -> tuple[list[int], list[int], int | None]:
    """Replace the image placeholder id by ``count`` copies; returns the block start (or None)."""
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if len(positions) != expected:
        raise bad(
            f"found {len(positions)} image token(s) after tokenization, expected {expected} "
            "(does the text contain the image token literally?)"
        )
    if not positions:
        return ids, labels, None
    p = positions[0]
    ids = ids[:p] + [image_id] * count + ids[p + 1 :]
    labels = labels[:p] + [IGNORE_INDEX] * count + labels[p + 1 :]
    return ids, labels, p


def pixel_values_of(image_processor, image: Image.Image) -> torch.Tensor:
    fast = _pixel_values_fast(image_processor, image)
    if fast is not None:
        return fast
    out = image_processor(images=image, return_tensors="pt")["pixel_values"]
    return out[0]


def _pixel_values_fast(image_processor, image: Image.Image) -> torch.Tensor | None:
    """SigLIP-style processing (resize to a square, rescale, normalise) of an RGB image that already has
    the target size: the same numbers as the processor, about ten times faster (the data loader's hot path).
    Returns None when the generic processor must run."""
    if not type(image_processor).__name__.startswith("SiglipImageProcessor") or image.mode != "RGB":
        return None
    size = image_processor.size
    if image.size != (size.get("width"), size.get("height")):
        return None
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    if image_processor.do_rescale:
        x = x * image_processor.rescale_factor
    if image_processor.do_normalize:
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        x = (x - mean) / std
    return x


# --------------------------------------------------------------------------- dataset
class SupervisedDataset(Dataset):
    """LLaVA records -> model-ready items, lazily (images are read in ``__getitem__``, i.e. in
    DataLoader workers).

    Item: ``{"input_ids": LongTensor[L], "labels": LongTensor[L], "pixel_values": FloatTensor[3,H,W]
    or None, "id": record id, "length": L}``. Labels are IGNORE_INDEX except on answer tokens and
    each answer's closing end token. Sequences longer than ``max_length`` are cut at the end, but
    never through the image block; a record whose image block cannot fit, or that keeps no
    supervised token, raises :class:`BadRecordError` (use :meth:`find_problems` to list them all
    before training).
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        image_folders: Sequence[str | Path],
        tokenizer,
        image_processor,
        template: str | ChatTemplate,
        num_image_tokens: int,
        max_length: int,
        image_token: str = IMAGE_TOKEN,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        source: str | Path | None = None,
        check_tokenization: bool = True,
    ) -> None:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        check_tokenizer(tokenizer, image_token=image_token)
        chat = get_template(template)
        if chat.image_token != image_token:
            chat = _with_image_token(chat, image_token)
        if check_tokenization and not getattr(tokenizer, "is_fast", False):
            # Fast tokenizers label the whole-string tokenization (always what inference sees); slow
            # ones fall back to per-segment tokenization, which must then agree with the whole string.
            check_segment_tokenization(tokenizer, chat, image_token)
        self.records = records
        self.image_folders = [Path(f) for f in image_folders]
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = chat
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_token = image_token
        self.image_token_id: int = tokenizer.convert_tokens_to_ids(image_token)
        self.max_pixels = max_pixels
        self.source = None if source is None else str(source)
        self._bos_id = _bos_id(tokenizer)
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, ids, labels = self._encode_text(index)
        pixel_values = None
        if _has_image(record):
            pixel_values = self._load_pixels(record, index)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "id": record["id"],
            "length": len(ids),
        }

    def _encode_full(self, index: int) -> tuple[Mapping[str, Any], list[int], list[int], int | None, Callable]:
        """Record, ids, labels and image-block start before truncation, and its error maker."""
        record = self.records[index]
        validate_record(record, index=index, path=self.source, image_token=self.image_token)
        label = record_label(record, index)

        def bad(reason: str) -> BadRecordError:
            return BadRecordError(self.source, label, reason)

        if is_text_record(record):  # no template: the completion and its end token are supervised
            end = self.tokenizer.eos_token or ""
            segments = [(record.get("prompt", ""), False), (record["completion"] + end, True)]
        else:
            segments = self.template.segments(record["conversations"])
        ids, labels = _tokenize_segments(segments, self.tokenizer, self._bos_id)
        expected = 1 if _has_image(record) else 0
        ids, labels, start = _expand_image(
            ids, labels, self.image_token_id, self.num_image_tokens, expected, bad
        )
        return record, ids, labels, start, bad

    def _encode_text(self, index: int) -> tuple[Mapping[str, Any], list[int], list[int]]:
        record, ids, labels, start, bad = self._encode_full(index)
        if len(ids) > self.max_length:
            if start is not None and start + self.num_image_tokens > self.max_length:
                raise bad(
                    f"the image block (tokens {start}..{start + self.num_image_tokens - 1}) does not fit "
                    f"in max_length={self.max_length}"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise bad(
                f"no supervised token left after truncation to max_length={self.max_length} "
                f"(the prompt alone is {_first_supervised(labels, len(ids))} tokens or more)"
            )
        return record, ids, labels

    def _load_pixels(self, record: Mapping[str, Any], index: int) -> torch.Tensor:
        label = record_label(record, index)
        if self.image_processor is None:
            raise BadRecordError(self.source, label, "the record has an image but no image_processor was given")
        path = find_image(record["image"], self.image_folders, label)
        image = load_image(path, max_pixels=self.max_pixels, record=label)
        return pixel_values_of(self.image_processor, image)

    @property
    def lengths(self) -> list[int]:
        """Cheap length estimates for :class:`LengthGroupedSampler` (no tokenization: 665K records
        would take minutes): about 4/3 tokens per whitespace word, plus the image block, capped at
        max_length. Only the ordering matters for grouping."""
        if self._lengths is None:
            self._lengths = [self.length_estimate(record_words(r), _has_image(r)) for r in self.records]
        return self._lengths

    def length_estimate(self, words: int, has_image: bool) -> int:
        n = math.ceil(words * 4 / 3) + (self.num_image_tokens if has_image else 0)
        return min(n, self.max_length)

    def _sample_indices(self, sample: int | None, seed: int) -> Sequence[int]:
        """Every record's index, or `sample` of them drawn at random (seeded)."""
        if sample is None or sample >= len(self.records):
            return range(len(self.records))
        return random.Random(seed).sample(range(len(self.records)), sample)

    def token_counts(self, sample: int | None = None, seed: int = 0) -> list[int]:
        """Exact tokens per record as training sees them (image block included, cut at max_length), over
        every record or a random sample; no image is read. Bad records are left out (find_problems)."""
        counts = []
        for index in self._sample_indices(sample, seed):
            try:
                counts.append(len(self._encode_text(index)[1]))
            except BadRecordError:
                continue
        return counts

    def truncated_answers(self, sample: int = 2000, seed: int = 0) -> tuple[int, int]:
        """(records that lose answer tokens to max_length, records checked) over a random sample: a record
        cut at the end keeps training on what is left, so this is the only sign its answers never count."""
        indices = self._sample_indices(sample, seed)
        cut = 0
        for index in indices:
            try:
                _, ids, labels, _, _ = self._encode_full(index)
            except BadRecordError:
                continue  # reported by find_problems / __getitem__
            cut += any(t != IGNORE_INDEX for t in labels[self.max_length :])
        return cut, len(indices)

    def find_problems(self, check_images: bool = False) -> list[BadRecordError]:
        """Every error ``__getitem__`` would raise, without stopping at the first. Text and
        truncation are always checked and image files are looked up; ``check_images=True`` also
        decodes them (slow on a large dataset)."""
        problems: list[BadRecordError] = []
        for index in range(len(self.records)):
            try:
                record, _, _ = self._encode_text(index)
                if _has_image(record):
                    label = record_label(record, index)
                    path = find_image(record["image"], self.image_folders, label)
                    if check_images:
                        load_image(path, max_pixels=self.max_pixels, record=label)
            except BadRecordError as err:
                problems.append(err)
        return problems


def record_words(record: Mapping[str, Any]) -> int:
    """Whitespace words over a record's turns (or prompt and completion): a length estimate, no tokenizer."""
    if is_text_record(record):
        return len(str(record.get("prompt", "")).split()) + len(str(record["completion"]).split())
    return sum(len(str(t.get("value", "")).split()) for t in record.get("conversations", []))


def warn_truncated_answers(dataset: SupervisedDataset, sample: int = 2000) -> float:
    """Print a warning when sampled records lose answer tokens to max_length; returns the share."""
    cut, checked = dataset.truncated_answers(sample)
    share = cut / checked if checked else 0.0
    if cut:
        print(f"warning: {cut} of {checked} sampled records ({share:.1%}) of {dataset.source or 'the data'} lose answer "
              f"tokens to max_length={dataset.max_length}; raise max_length or shorten those records", flush=True)
    return share


def _has_image(record: Mapping[str, Any]) -> bool:
    return record.get("image") is not None


def _first_supervised(labels: Sequence[int], default: int) -> int:
    for i, t in enumerate(labels):
        if t != IGNORE_INDEX:
            return i
    return default


# --------------------------------------------------------------------------- collate
def collate(
    batch: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Pad a list of items (from :class:`SupervisedDataset` or :func:`generation_inputs`).

    Returns ``input_ids`` [B, T], ``attention_mask`` [B, T], ``labels`` [B, T] with IGNORE_INDEX at
    pads (only when the items have labels), ``pixel_values`` [N, 3, H, W] stacked for the N items
    that have an image, in batch order (None when none has), ``has_image`` [B] bool and ``ids``.
    ``padding_side="left"`` is for batched generation.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not batch:
        raise ValueError("collate() got an empty batch")
    seqs = [torch.as_tensor(item["input_ids"], dtype=torch.long) for item in batch]
    with_labels = all(item.get("labels") is not None for item in batch)
    width = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (item, seq) in enumerate(zip(batch, seqs)):
        n = len(seq)
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, span] = seq
        attention_mask[row, span] = 1
        if with_labels:
            labels[row, span] = torch.as_tensor(item["labels"], dtype=torch.long)
    images = [item["pixel_values"] for item in batch if item.get("pixel_values") is not None]
    out: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack(images) if images else None,
        "has_image": torch.tensor([item.get("pixel_values") is not None for item in batch]),
        "ids": [item.get("id") for item in batch],
    }
    if with_labels:
        out["labels"] = labels
    return out


# --------------------------------------------------------------------------- evaluation prompts
def generation_inputs(
    record: Mapping[str, Any],
    tokenizer,
    template: str | ChatTemplate,
    num_image_tokens: int,
    image_folders: Sequence[str | Path] = (),
    image_processor=None,
    image_token: str = IMAGE_TOKEN,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    source: str | Path | None = None,
) -> dict[str, Any]:
    """Inputs for ``generate()`` from a LLaVA record: the prompt is every turn up to (not including)
    the last gpt answer, followed by the assistant cue, tokenized exactly as the same prefix is in
    training (same segment boundaries, expanded image block).

    Returns ``{"input_ids": LongTensor[L], "pixel_values": FloatTensor[3,H,W] or None,
    "references": list[str], "prompt": str, "id": ...}``. ``references`` is the record's
    ``"answers"`` (a string or list of strings, e.g. VQAv2's ten) when present, else the last gpt
    answer, else empty (a record may end with a human turn). Batch with
    ``collate(items, pad_id, padding_side="left")``.
    """
    check_tokenizer(tokenizer, image_token=image_token)
    chat = get_template(template)
    if chat.image_token != image_token:
        chat = _with_image_token(chat, image_token)
    validate_record(record, path=source, image_token=image_token, require_answer=False)
    label = record_label(record, None)

    def bad(reason: str) -> BadRecordError:
        return BadRecordError(source, label, reason)

    convs = list(record["conversations"])
    references: list[str] = []
    if convs[-1]["from"] == "gpt":
        references = [convs[-1]["value"]]
        convs = convs[:-1]
    if "answers" in record:
        answers = record["answers"]
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise bad("'answers' must be a string or a list of strings")
        references = list(answers)

    segments = chat.generation_segments(convs)
    ids, _ = _tokenize_segments(segments, tokenizer, _bos_id(tokenizer))
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    ids, _, _ = _expand_image(ids, list(ids), image_id, num_image_tokens, int(_has_image(record)), bad)

    pixel_values = None
    if _has_image(record):
        if image_processor is None:
            raise bad("the record has an image but no image_processor was given")
        path = find_image(record["image"], image_folders, label)
        pixel_values = pixel_values_of(image_processor, load_image(path, max_pixels=max_pixels, record=label))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "pixel_values": pixel_values,
        "references": references,
        "prompt": "".join(text for text, _ in segments),
        "id": record["id"],
    }


# --------------------------------------------------------------------------- sampler
class LengthGroupedSampler(Sampler[int]):
    """Shuffles, then sorts by length inside mega-batches of ``batch_size * mega_batch_mult``
    indices, so each batch holds similar lengths (less padding), then shuffles the batches, so that
    batch order stays random. The batch holding the longest sequence comes first, so an out-of-memory
    shows up at step 0.

    Deterministic for ``(seed, epoch)``; call :meth:`set_epoch` each epoch for a new order. Every
    index is yielded exactly once per epoch. Use with ``DataLoader(batch_size=batch_size)``; when
    a distributed wrapper splits batches across ranks, pass the global batch size.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        mega_batch_mult: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        if mega_batch_mult is None:
            # ~4 mega-batches at least, at most 50 batches each (enough grouping, still random).
            mega_batch_mult = max(1, min(len(self.lengths) // (batch_size * 4), 50))
        self.mega_batch_mult = mega_batch_mult

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.mega_batch_mult
        ordered = [i for k in range(0, len(perm), size)
                   for i in sorted(perm[k : k + size], key=lambda i: self.lengths[i], reverse=True)]
        if not ordered:
            return []
        b = self.batch_size
        batches = [ordered[k : k + b] for k in range(0, len(ordered), b)]
        tail = [batches.pop()] if len(batches[-1]) < b else []  # a partial batch stays last
        # Batches in random order: a mega-batch read in its sorted order would run from its longest records to
        # its shortest, and the world's lengths follow the family, so a run would see tens of steps of one family,
        # then tens of another (e.g. 25 steps of recall, then 25 of repeat).
        batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()] + tail
        order = [i for batch in batches for i in batch]
        # The longest record to the very front (swapping two items keeps every batch boundary where it was).
        longest = max(range(len(order)), key=lambda k: self.lengths[order[k]])
        order[0], order[longest] = order[longest], order[0]
        return order


# --------------------------------------------------------------------------- images
def build_image_processor(
    image_size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
):
    """A SigLIP-style processor (no torchvision needed): resize to ``image_size`` square (bicubic,
    no padding, as TinyLLaVA's 'square' mode), rescale by 1/255, normalise with ``mean``/``std``.
    It saves as a ``SiglipImageProcessor`` config, loadable with ``AutoImageProcessor``."""
    from transformers.image_utils import PILImageResampling

    try:
        from transformers import SiglipImageProcessorPil as Processor
    except ImportError:  # other transformers versions: the torchvision-free class may not exist
        from transformers import SiglipImageProcessor as Processor

    return Processor(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )

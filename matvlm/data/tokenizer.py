"""Tiny offline tokenizers for tests and toy runs, and a check that any tokenizer is usable.

A trained tokenizer mirrors Phi-2's conventions so code paths are the same as with the real teacher:
byte-level BPE, no BOS, ``eos == pad`` (``<|endoftext|>`` for the phi template), plus ``<image>`` as a
real special vocabulary token (HF Llava needs an id, not TinyLLaVA's -200). Digits are split one by
one: small models learn counting and reading numbers far more easily that way.
"""

from __future__ import annotations

import itertools

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from matvlm.data.templates import IMAGE_TOKEN, ChatTemplate, get_template

__all__ = ["TokenizerError", "train_tokenizer", "check_tokenizer", "keeps_number_space"]


class TokenizerError(ValueError):
    """A tokenizer lacks something the data pipeline needs."""


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    template: str | ChatTemplate = "phi",
    image_token: str = IMAGE_TOKEN,
    model_max_length: int | None = None,
    digit_group: int = 3,
    number_space: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (offline) and wrap it for transformers.

    Special tokens: the template's eos (also used as pad) and ``image_token`` (exposed as
    ``tokenizer.image_token`` / ``tokenizer.image_token_id``, as transformers' Llava tokenizers do).
    The template's chat format is attached as ``chat_template``. Runs of digits are cut into groups of at most
    ``digit_group`` (as Llama 3 does with 3), so frequent numbers such as counts or 0-99 become single tokens
    while long numbers stay readable; 1 gives one token per digit. A group missing from the vocabulary is cut
    further by BPE ("158" -> "15" "8").

    ``number_space`` keeps the space before a number in the number's first token (" 35" -> "Ġ35", as GPT-2's
    tokenizer does) instead of a lone "Ġ" token before it. With the lone space, copying a number from the
    context is no longer the plain induction step (find the earlier place where the current token occurs,
    copy the token after it): every number follows the same "Ġ". Small LMs then copy *a* stated number but
    never learn which; with the space kept they learn the look-up.
    """
    if digit_group < 1:
        raise ValueError(f"digit_group must be >= 1, got {digit_group}")
    chat = get_template(template)
    specials = list(dict.fromkeys([chat.eos_token, image_token]))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the byte alphabet and special tokens alone "
            f"need {len(alphabet) + len(specials)}"
        )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(rf"{' ?' if number_space else ''}\d{{1,{digit_group}}}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets for assistant masks
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,  # every byte is encodable, whatever the corpus
        show_progress=False,
    )
    # The template's fixed text is part of every turn. BPE merges by pair frequency, so it is fed once per
    # training text: fed only once, "USER:" stayed 5 byte tokens and "ASSISTANT:" 10, ~15 tokens a turn.
    fixed = [chat.system, chat.user_prefix, chat.assistant_prompt]
    bpe.train_from_iterator(_chain(texts, fixed), trainer=trainer)

    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=chat.eos_token,
        pad_token=chat.eos_token,
        extra_special_tokens={"image_token": image_token},
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
        chat_template=chat.to_jinja(),
        **kwargs,
    )
    check_tokenizer(tokenizer, image_token=image_token)
    return tokenizer


def keeps_number_space(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` pre-tokenizes " 5" as one piece (see `train_tokenizer`'s number_space)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return False
    return len(backend.pre_tokenizer.pre_tokenize_str(" 5")) == 1


def _chain(texts: Iterable[str], extra: list[str]) -> Iterable[str]:
    """The texts, then each non-empty `extra` string as many times as there were texts."""
    count = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer: texts must be strings, got {type(text).__name__}")
        count += 1
        yield text
    for t in extra:
        if t:
            yield from itertools.repeat(t, max(1, count))


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> None:
    """Raise :class:`TokenizerError` naming every missing piece: the image token (must be one
    vocabulary id that text containing it encodes to), an eos token and a pad token."""
    problems: list[str] = []
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    unk = tokenizer.unk_token_id
    if image_id is None or (unk is not None and image_id == unk):
        problems.append(f"image token {image_token!r} is not in the vocabulary (add it as a special token)")
    else:
        ids = tokenizer(f"a{image_token}b", add_special_tokens=False)["input_ids"]
        if ids.count(image_id) != 1:
            problems.append(
                f"image token {image_token!r} is in the vocabulary but text is not split on it "
                "(add it as a special/added token)"
            )
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        problems.append("no eos token (answers must end with one)")
    if tokenizer.pad_token is None or tokenizer.pad_token_id is None:
        problems.append("no pad token (set pad_token, e.g. to the eos token)")
    if problems:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TokenizerError(f"tokenizer {name!r} is missing: " + "; ".join(problems))

"""Chat templates: how a LLaVA conversation becomes one training string, and which parts are supervised.

Three template styles, matching the reference implementations character for character:

* ``phi`` (TinyLLaVA-Phi-2, the MaTVLM teacher)::

      {system} USER: <image>\\n{q1} ASSISTANT: {a1}<|endoftext|>USER: {q2} ASSISTANT: {a2}<|endoftext|>

  Only the first turn has a space before ``USER:`` (it belongs to the system prompt); later turns
  follow the end token directly. That is what TinyLLaVA_Factory produces, so we keep it.
* ``vicuna_v1`` (LLaVA-1.5 ``--version v1``): the same layout with ``</s>`` as the end token.
  ``llava_v1`` is the same with LLaVA's "curious human" system prompt.
* ``plain`` (LLaVA / TinyLLaVA pretraining): ``<image>{caption}\\n``; the question text is dropped.

Supervision (labels) covers exactly: the space after ``ASSISTANT:``, the answer text and the closing
end token. The space is put on the supervised side on purpose: byte-level BPE tokenizers merge it into
the first answer token (" The"), so the prompt/answer boundary is also a token boundary and a
generation prompt ending in ``ASSISTANT:`` (as TinyLLaVA and LLaVA build it) tokenizes exactly as the
prefix of the training sequence.

Messages may be given in LLaVA form (``{"from": "human"|"gpt", "value": ...}``) or in HF chat form
(``{"role": "system"|"user"|"assistant", "content": ...}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = [
    "IMAGE_TOKEN",
    "ChatTemplate",
    "TemplateError",
    "TEMPLATES",
    "get_template",
    "list_templates",
]

IMAGE_TOKEN = "<image>"

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class TemplateError(ValueError):
    """A conversation that a template cannot render (bad roles, order, types)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation layout: ``system + system_sep`` then, per turn,
    ``user_prefix + question + user_suffix`` and ``assistant_prompt | answer_prefix + answer + end``
    (``|`` marks where supervision starts)."""

    name: str
    system: str
    system_sep: str
    user_prefix: str
    user_suffix: str
    assistant_prompt: str
    answer_prefix: str
    end: str
    eos_token: str  # the tokenizer eos of this LM (pad = eos for matvlm's own tokenizers)
    keep_question: bool = True  # False for "plain": only the image placeholder of a question remains
    max_turns: int | None = None
    image_token: str = IMAGE_TOKEN

    # ------------------------------------------------------------------ rendering
    def format_question(self, question: str) -> str:
        """Move the image placeholder to the front, followed by a newline (LLaVA and TinyLLaVA both
        do this regardless of where the data put it)."""
        if self.image_token in question:
            if not self.keep_question:
                return self.image_token
            rest = question.replace(self.image_token, "").strip()
            return (self.image_token + "\n" + rest).strip()
        return question if self.keep_question else ""

    def segments(
        self, messages: Sequence[Mapping[str, Any]], system: str | None = None
    ) -> list[tuple[str, bool]]:
        """Text pieces of a whole conversation, ``True`` where the piece is supervised.

        The conversation must alternate user/assistant, start with the user and end with an
        assistant answer. Adjacent pieces with the same flag are merged; the concatenation of the
        pieces is exactly :meth:`render` of the same messages.
        """
        system, turns = self._normalise(messages, system)
        if not turns or turns[-1][0] != "assistant":
            raise TemplateError("segments() needs a conversation that ends with an assistant answer")
        return _merge(self._pieces(system, turns, add_generation_prompt=False))

    def generation_prompt(
        self, messages: Sequence[Mapping[str, Any]], system: str | None = None
    ) -> str:
        """The prompt for ``generate()``: every message (the last one from the user) followed by the
        assistant cue (``"ASSISTANT:"``, no trailing space)."""
        return "".join(text for text, _ in self.generation_segments(messages, system))

    def generation_segments(
        self, messages: Sequence[Mapping[str, Any]], system: str | None = None
    ) -> list[tuple[str, bool]]:
        """:meth:`generation_prompt` split at the same boundaries as :meth:`segments` (earlier
        answers flagged ``True``), so tokenizing piece by piece reproduces the training prefix."""
        system, turns = self._normalise(messages, system)
        if not turns or turns[-1][0] != "user":
            raise TemplateError("generation_prompt() needs a conversation that ends with a user message")
        return _merge(self._pieces(system, turns, add_generation_prompt=True))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        system: str | None = None,
    ) -> str:
        """The full string, as ``tokenizer.apply_chat_template(messages, tokenize=False)`` gives it
        with the template from :meth:`to_jinja`."""
        system, turns = self._normalise(messages, system)
        return "".join(text for text, _ in self._pieces(system, turns, add_generation_prompt))

    def _pieces(
        self, system: str, turns: list[tuple[str, str]], add_generation_prompt: bool
    ) -> list[tuple[str, bool]]:
        pieces: list[tuple[str, bool]] = []
        if turns:
            pieces.append((system + self.system_sep, False))
        for role, text in turns:
            if role == "user":
                pieces.append((self.user_prefix + self.format_question(text) + self.user_suffix, False))
            else:
                pieces.append((self.assistant_prompt, False))
                pieces.append((self.answer_prefix + text + self.end, True))
        if add_generation_prompt:
            pieces.append((self.assistant_prompt, False))
        return pieces

    def _normalise(
        self, messages: Sequence[Mapping[str, Any]], system: str | None
    ) -> tuple[str, list[tuple[str, str]]]:
        """Returns (system prompt, [(role, text)]) after checking roles, order and types."""
        turns: list[tuple[str, str]] = []
        message_system: str | None = None
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TemplateError(f"message {i} is {type(message).__name__}, expected a dict")
            raw_role = message.get("role", message.get("from"))
            text = message.get("content", message.get("value"))
            if raw_role == "system":
                if i != 0:
                    raise TemplateError(f"message {i}: a system message is only allowed first")
                if not isinstance(text, str):
                    raise TemplateError("the system message content must be a string")
                message_system = text
                continue
            role = _ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
            if role is None:
                raise TemplateError(
                    f"message {i}: unknown role {raw_role!r} (expected human/gpt or user/assistant)"
                )
            if not isinstance(text, str):
                raise TemplateError(f"message {i}: content must be a string, got {type(text).__name__}")
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise TemplateError(
                    f"message {i}: expected a {expected} message (turns must alternate, user first), "
                    f"got {role}"
                )
            turns.append((role, text))
        n_questions = (len(turns) + 1) // 2
        if self.max_turns is not None and n_questions > self.max_turns:
            raise TemplateError(
                f"template {self.name!r} takes at most {self.max_turns} turn(s), got {n_questions}"
            )
        if system is None:
            system = message_system if message_system is not None else self.system
        return system, turns

    # ------------------------------------------------------------------ HF chat template
    def to_jinja(self) -> str:
        """An HF chat template (jinja) that renders ``messages`` exactly like :meth:`render`,
        including ``add_generation_prompt`` and a leading system message. The supervised part of each
        answer is wrapped in ``{% generation %}`` so ``return_assistant_tokens_mask=True`` marks the
        same tokens as our labels."""
        s = _jinja_str
        img = s(self.image_token)
        if self.keep_question:
            with_image = f"({img} + '\\n' + content.replace({img}, '').strip()).strip()"
            without_image = "content"
        else:
            with_image, without_image = img, "''"
        max_turns_check = ""
        if self.max_turns is not None:
            max_turns_check = (
                f"{{%- if loop.index0 >= {2 * self.max_turns} -%}}"
                f"{{{{ raise_exception({s(f'template {self.name} takes at most {self.max_turns} turn(s)')}) }}}}"
                "{%- endif -%}\n"
            )
        return (
            "{%- if messages and messages[0]['role'] == 'system' -%}\n"
            "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}\n"
            f"{{%- else -%}}{{%- set system = {s(self.system)} -%}}{{%- set loop_messages = messages -%}}\n"
            "{%- endif -%}\n"
            f"{{%- if loop_messages -%}}{{{{ system + {s(self.system_sep)} }}}}{{%- endif -%}}\n"
            "{%- for message in loop_messages -%}\n"
            "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
            "{{ raise_exception('messages must alternate user/assistant, starting with the user') }}"
            "{%- endif -%}\n"
            f"{max_turns_check}"
            "{%- set content = message['content'] -%}\n"
            "{%- if message['role'] == 'user' -%}\n"
            f"{{%- if {img} in content -%}}{{%- set question = {with_image} -%}}"
            f"{{%- else -%}}{{%- set question = {without_image} -%}}{{%- endif -%}}\n"
            f"{{{{ {s(self.user_prefix)} + question + {s(self.user_suffix)} }}}}\n"
            "{%- else -%}\n"
            f"{{{{ {s(self.assistant_prompt)} }}}}"
            f"{{% generation %}}{{{{ {s(self.answer_prefix)} + content + {s(self.end)} }}}}{{% endgeneration %}}\n"
            "{%- endif -%}\n"
            "{%- endfor -%}\n"
            f"{{%- if add_generation_prompt -%}}{{{{ {s(self.assistant_prompt)} }}}}{{%- endif -%}}"
        )


def _merge(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for text, supervised in pieces:
        if not text:
            continue
        if out and out[-1][1] == supervised:
            out[-1] = (out[-1][0] + text, supervised)
        else:
            out.append((text, supervised))
    return out


def _jinja_str(text: str) -> str:
    """A jinja string literal. Jinja decodes literals with 'unicode-escape', so anything outside
    printable ASCII is written as a \\U escape (which also covers characters beyond the BMP)."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("\\'")
        elif ch == "\n":
            out.append("\\n")
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "'" + "".join(out) + "'"


_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def _two_sep(name: str, system: str, end: str) -> ChatTemplate:
    return ChatTemplate(
        name=name,
        system=system,
        system_sep=" ",
        user_prefix="USER: ",
        user_suffix=" ",
        assistant_prompt="ASSISTANT:",
        answer_prefix=" ",
        end=end,
        eos_token=end,
    )


TEMPLATES: dict[str, ChatTemplate] = {
    "phi": _two_sep("phi", _USER_SYSTEM, "<|endoftext|>"),
    # phi without the system prompt: for teachers trained from scratch, where a long constant prefix
    # lengthens the plateau before a small model learns look-ups. Real TinyLLaVA checkpoints use "phi".
    "phi_short": ChatTemplate(
        name="phi_short", system="", system_sep="", user_prefix="USER: ", user_suffix=" ",
        assistant_prompt="ASSISTANT:", answer_prefix=" ", end="<|endoftext|>", eos_token="<|endoftext|>",
    ),
    "vicuna_v1": _two_sep("vicuna_v1", _USER_SYSTEM, "</s>"),
    "llava_v1": _two_sep("llava_v1", _HUMAN_SYSTEM, "</s>"),
    "plain": ChatTemplate(
        name="plain",
        system="",
        system_sep="",
        user_prefix="",
        user_suffix="",
        assistant_prompt="",
        answer_prefix="",
        end="\n",  # LLaVA's pretraining separator; the caption ends with a newline, not eos
        eos_token="<|endoftext|>",
        keep_question=False,
        max_turns=1,
    ),
}
_ALIASES = {"v1": "vicuna_v1", "pretrain": "plain"}


def list_templates() -> list[str]:
    """Known template names (aliases not included)."""
    return sorted(TEMPLATES)


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """Look a template up by name (a :class:`ChatTemplate` is returned unchanged)."""
    if isinstance(name, ChatTemplate):
        return name
    key = _ALIASES.get(name, name)
    if key not in TEMPLATES:
        known = ", ".join(list_templates() + [f"{a} (= {t})" for a, t in sorted(_ALIASES.items())])
        raise ValueError(f"unknown chat template {name!r}; known templates: {known}")
    return TEMPLATES[key]

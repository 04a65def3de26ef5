"""Tokens to text as they arrive: incremental decoding and OpenAI `stop` strings.

The whole answer is decoded again at each token (cheap at chat lengths, and exact for byte-level BPE,
whose pieces only make sense together); text is released only when it cannot be the start of a stop
string and does not end inside a multi-byte character. The same object serves streamed and
non-streamed answers, so both give the same text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decode, self._stop = decode, list(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""  # released so far
        self.stopped = False  # a stop string was found: the answer ends before it

    def _full(self) -> str:
        return self._decode(self.tokens).lstrip()  # answers start with the space after the assistant cue

    def add(self, token: int) -> str:
        """Take one token; returns the newly released text ('' while held back)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        full = self._full()
        cut = min((i for i in (full.find(s, max(0, len(self.text) - len(s))) for s in self._stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(full[:cut])
        if full.endswith("\ufffd"):  # the rest of a multi-byte character is still to come
            return ""
        return self._release(full[: len(full) - self._hold])

    def finish(self) -> str:
        """The text still held back, once no more tokens come."""
        return "" if self.stopped else self._release(self._full().rstrip("\ufffd"))

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            return ""
        new, self.text = upto[len(self.text):], upto
        return new

"""Errors whose message is written for the person running a command: the CLI prints them as one sentence.

Library code raises these (or the built-in errors they extend, so existing `except ValueError` callers keep
working); `matvlm.cli` catches `UserError` around every command and exits with status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for or gave (options, inputs, outputs); the message says what to do."""


class OptionError(UserError, ValueError):
    """An option out of range, of the wrong type, or impossible on this machine."""


class OutputError(UserError, FileExistsError):
    """An output that would destroy data: an existing folder, or one that is, holds or lies inside an input."""


class InputError(UserError, ValueError):
    """Inputs that cannot be used: bad records or images (all of them listed), a damaged model file."""


class ResumeMismatch(UserError, ValueError):
    """A resumed run whose teacher, student or data differ from those it started with."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""

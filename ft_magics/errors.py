"""Errors a user can fix.

Core code raises :class:`FtUsageError` for every mistake a user can make (a bad flag value, a
missing dataset column, an unknown adapter). It knows nothing of IPython; the magics layer turns it
into IPython's ``UsageError`` so the notebook shows the message without a traceback. A traceback
therefore always means a bug in this project (the jupysql convention).
"""
from __future__ import annotations

import difflib
from typing import Iterable


class FtUsageError(ValueError):
    """A mistake the user can fix; the message names the cause and the fix."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string. Where no choice is close as a
    whole, the ones that contain the word, case aside (``mistral`` -> ``Mistral-7B-v0.1``), up to three."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    low = str(word).lower().strip("-_ ./")
    holding = [c for c in choices if len(low) >= 3 and low in c.lower()]
    if 0 < len(holding) <= 3:
        return " (did you mean " + " or ".join(repr(c) for c in holding) + "?)"
    return ""


def unknown(kind: str, word: str, choices: Iterable[str], fix: str = "") -> FtUsageError:
    """The standard error for a name that is not one of ``choices``."""
    choices = sorted(set(map(str, choices)))
    msg = f"unknown {kind} {word!r}{did_you_mean(word, choices)}."
    if choices:
        shown = ", ".join(choices[:30]) + (" ..." if len(choices) > 30 else "")
        msg += f" Valid: {shown}."
    if fix:
        msg += f" {fix}"
    return FtUsageError(msg)


def need_text(value, what: str, example: str, path: bool = False, fix: str = ""):
    """``value`` itself when it is text (or, where ``path``, a path); otherwise the error that says so. The
    Python API's counterpart of a magic's argument, which is always text: ``None`` or ``123`` fails here, in
    words, rather than in a ``.strip()`` far below."""
    import os

    if isinstance(value, str) or (path and isinstance(value, os.PathLike)):
        return value
    got = repr(value)
    if len(got) > 80 or "\n" in got:  # a model's repr runs for pages
        name = type(value).__name__
        got = ("an " if name[:1].lower() in "aeiou" else "a ") + name
    raise FtUsageError(f"{what} must be text{' or a path' if path else ''}, e.g. {example} (got {got}).{fix}")

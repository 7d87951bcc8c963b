"""Paths as users type them."""
from __future__ import annotations

from pathlib import Path

from .errors import FtUsageError, need_text


def user_path(text, what: str = "a path", example: str = "'data/train.jsonl'") -> Path:
    """``Path(text)`` with ``~`` / ``~user`` expanded; an unknown ``~user`` is a usage error, not a crash, and so
    are a value that is no path (``None``, ``123``) and an empty one (``Path('')`` is the working folder: an
    export there replaced it, a load read it). ``what`` names the argument in the message, ``example`` shows one."""
    need_text(text, what, example, path=True)
    if not str(text).strip():
        raise FtUsageError(f"{what} is empty: give a path, e.g. {example}.")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory" for ~name with no such user
        raise FtUsageError(f"{str(text)!r}: no user {str(text).split('/')[0][1:]!r} to expand '~' for; write the "
                           "full path (or ~/... for your own home folder).") from None

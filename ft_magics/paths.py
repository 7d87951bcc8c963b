"""Paths as users type them."""
from __future__ import annotations

from pathlib import Path

from .errors import FtUsageError


def user_path(text) -> Path:
    """``Path(text)`` with ``~`` / ``~user`` expanded; an unknown ``~user`` is a usage error, not a crash."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory" for ~name with no such user
        raise FtUsageError(f"{str(text)!r}: no user {str(text).split('/')[0][1:]!r} to expand '~' for; write the "
                           "full path (or ~/... for your own home folder).") from None

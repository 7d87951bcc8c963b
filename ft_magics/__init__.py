"""ft_magics: LoRA and QLoRA fine-tuning as IPython/Jupyter magics.

    %load_ext ft_magics

Importing this package (and loading the extension) imports neither torch nor transformers; they
load on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Session", "get_session", "TrainConfig", "FtUsageError", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython) -> None:
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython) -> None:
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)


def __getattr__(name: str):
    if name == "Session":
        from .session import Session

        return Session
    if name == "get_session":
        from .magics import get_session

        return get_session
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "FtUsageError":
        from .errors import FtUsageError

        return FtUsageError
    raise AttributeError(f"module 'ft_magics' has no attribute {name!r}")

"""ft_magics: LoRA and QLoRA fine-tuning as IPython/Jupyter magics.

    %load_ext ft_magics

Importing this package (and loading the extension) imports neither torch nor transformers; they
load on first use.
"""
from __future__ import annotations

import os as _os

# oneDNN (bf16/fp32 matmuls on the CPU) and PyTorch's ideep layer each keep up to 1024 compiled kernels,
# one set per input shape, and a training run meets a new shape with every new padded batch length: about
# 14 MB per shape on the demo model, never freed. 64 entries hold a step's kernels; measured on the demo
# model (20 checkpointed steps, 2 cores) the peak RSS fell from 1.30-1.41 GB to 1.10 GB with no slower
# steps. Read when torch first runs such a kernel, so set here, on import; a value already set is kept.
CPU_KERNEL_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
CPU_KERNEL_CACHE_ENTRIES = "64"
for _var in CPU_KERNEL_CACHE_VARS:
    _os.environ.setdefault(_var, CPU_KERNEL_CACHE_ENTRIES)

# PEFT 0.21 asks every model it wraps for `is_gradient_checkpointing`, which transformers 5 deprecates with a
# FutureWarning: shown in the first training cell of every session, about a call the user never made and
# cannot change. Only that message is hidden.
import warnings as _warnings

_warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# An adapter named 'a' (or 'lo', 'ra', ...: any part of 'lora_') made PEFT warn that its weights "may be
# reinitialised during loading": PEFT 0.21 inserts and strips adapter names by whole key parts, and every
# adapter ft_magics loads is then filled from its file exactly (core.adapters.load_exact); such an adapter
# reloads with the same outputs (tests/test_adapters_ops.py). The alarm is hidden.
_warnings.filterwarnings("ignore", message=r"Adapter name '.*' should not be contained in the prefix", category=UserWarning)
# bitsandbytes' "Paged optimizers are not supported on CPU" (a paged optimizer off CUDA): the run says so in its
# own words (core.training.run_notes), with what runs instead.
_warnings.filterwarnings("ignore", message=r"Paged optimizers are not supported on CPU", category=UserWarning)

# bitsandbytes' CPU backend, wherever it is first imported (a 4-bit load, or PEFT attaching an adapter to a
# 16-bit base), warns that it could not fetch an optional kernel from the Hugging Face Hub ("pip install
# kernels"): offline that is the normal case, and its built-in kernels run instead. With `kernels` installed (as
# transformers 5.25 has it), that package first notes that offline it skips the kernel's publisher trust check.
# Only messages naming kernels-community are dropped, from those two loggers.
import logging as _logging


class _HubKernelNote(_logging.Filter):
    def filter(self, record) -> bool:
        return "kernels-community" not in str(record.msg)


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    _logging.getLogger(_name).addFilter(_HubKernelNote())


# transformers' checkpoint bookkeeping, printed amid a run's progress lines: "mtime may not be reliable on this
# filesystem" (checkpoints a second apart: it orders them by step instead, as ft_magics does), and on a resume
# "the following arguments do not match ... trainer_state.json" for logging/eval/save intervals, which change
# no result (ft_magics' own resume check names the settings that do). Only those two messages are dropped.
class _CheckpointChatter(_logging.Filter):
    def filter(self, record) -> bool:
        msg = str(record.msg)
        return "mtime may not be reliable" not in msg and "do not match the ones in the `trainer_state.json`" not in msg


_logging.getLogger("transformers.trainer_utils").addFilter(_CheckpointChatter())

# bitsandbytes makes torch.compile wrappers as it is imported, which loads torch's compiler stack (~40 MB of
# RSS), and transformers' Trainer imports datasets (~80 MB), for what a QLoRA run never uses: their first
# imports are made lean (see _lean_imports).
from . import _lean_imports

_lean_imports.install()

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

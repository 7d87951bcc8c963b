"""Memory probes: CUDA allocator statistics where there is a GPU, process RSS on the CPU."""
from __future__ import annotations

import os
import sys
from typing import Optional

import psutil

from .events import MemoryReading

_PROC = psutil.Process(os.getpid())


def _cuda_ready(device: Optional[str]) -> bool:
    if device is not None and not str(device).startswith("cuda"):
        return False
    torch = sys.modules.get("torch")  # never import torch just to read memory
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def rss_bytes() -> int:
    return _PROC.memory_info().rss


def read_memory(device: Optional[str] = None, peak_bytes: int = 0) -> MemoryReading:
    """A reading for ``device`` ("cuda..." or "cpu"; None means CUDA when it is in use).

    On the CPU ``peak_bytes`` is the caller's running maximum (RSS has no resettable peak counter).
    """
    if _cuda_ready(device):
        import torch

        idx = torch.cuda.current_device() if device in (None, "cuda") else torch.device(device).index or 0
        total = torch.cuda.get_device_properties(idx).total_memory
        reserved = torch.cuda.memory_reserved(idx)
        return MemoryReading(
            kind="cuda",
            used_bytes=torch.cuda.memory_allocated(idx),
            peak_bytes=torch.cuda.max_memory_allocated(idx),
            total_bytes=total,
            available_bytes=max(total - reserved, 0),
            reserved_bytes=reserved,
            label=f"CUDA {idx} ({torch.cuda.get_device_name(idx)}) allocated",
        )
    rss = rss_bytes()
    vm = psutil.virtual_memory()
    return MemoryReading(
        kind="cpu",
        used_bytes=rss,
        peak_bytes=max(peak_bytes, rss),
        total_bytes=vm.total,
        available_bytes=vm.available,
        label="CPU process RSS",
    )


def reset_peak(device: Optional[str] = None) -> None:
    if _cuda_ready(device):
        import torch

        torch.cuda.reset_peak_memory_stats()


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _clear_traceback(tb) -> None:
    import traceback

    traceback.clear_frames(tb)  # frames still executing are skipped by clear_frames
    while tb is not None:
        try:  # Python < 3.13 keeps a snapshot dict of the locals (made when the traceback was printed);
            tb.tb_frame.f_locals  # reading it after clear() drops the cleared names from it
        except Exception:  # noqa: BLE001 - best effort
            pass
        tb = tb.tb_next


def _clear_stored_frames() -> None:
    seen: set = set()
    todo = [getattr(sys, "last_value", None), getattr(sys, "last_exc", None)]
    if getattr(sys, "last_traceback", None) is not None:
        _clear_traceback(sys.last_traceback)
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen or not isinstance(exc, BaseException):
            continue
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            _clear_traceback(exc.__traceback__)
        todo += [exc.__cause__, exc.__context__]


def release_memory() -> None:
    """Free what Python and the CUDA caching allocator hold after models were dropped."""
    import gc

    # A stored traceback keeps the failing frames (and the tensors in their locals) alive, and not only
    # through sys: IPython's last_execution_result still holds the exception while the next cell (the
    # one running %ft_unload) executes. Clearing the frames frees their locals wherever they are held;
    # the exception and its message survive.
    _clear_stored_frames()
    sys.last_traceback = None
    sys.last_value = None
    if hasattr(sys, "last_exc"):
        sys.last_exc = None
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:  # hand freed heap pages back to the OS so RSS reflects reality
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass

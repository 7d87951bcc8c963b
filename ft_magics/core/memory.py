"""Memory probes: CUDA allocator statistics where there is a GPU, process RSS on the CPU."""
from __future__ import annotations

import contextlib
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


def _nvml_used(idx: int) -> int:
    """Memory used on the whole device as NVML reports it (all processes, CUDA context included); 0 without NVML."""
    try:
        import torch

        return int(torch.cuda.device_memory_used(idx))  # needs the nvidia-ml-py package (pip install ft-magics[gpu])
    except Exception:  # noqa: BLE001 - NVML absent or unusable: the allocator figures still stand
        return 0


def rss_bytes() -> int:
    return _PROC.memory_info().rss


def process_peak_bytes() -> int:
    """The highest RSS this process has reached (the kernel's high-water mark), 0 where it cannot be read.

    On Linux it is /proc/self/status' VmHWM, this program's own. ``ru_maxrss`` starts at the RSS of the process
    that started this one (fork keeps it across exec): a kernel or script started by a 1.6 GB process read a
    1.6 GB peak before doing anything, which hid a run's own peak below it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, OSError, ValueError):
        return 0


def read_memory(device: Optional[str] = None, peak_bytes: int = 0, since: Optional[int] = None) -> MemoryReading:
    """A reading for ``device`` ("cuda..." or "cpu"; None means CUDA when it is in use).

    On the CPU ``peak_bytes`` is the caller's running maximum of its readings. ``since`` (what
    :func:`reset_peak` returned when the measured work began) makes the peak exact: the kernel's high-water
    mark, where the work raised it. Readings between steps miss what a step frees before it ends (a batch's
    full-vocabulary logits, attention scores): 0.6 GB read where the process had reached 3 GB. The mark itself
    cannot be reset without also resetting the process's peak (``%ft_memory``'s, a benchmark's), so where the
    work stayed below it the running maximum is the figure.
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
            device_used_bytes=_nvml_used(idx),
            label=f"CUDA {idx} ({torch.cuda.get_device_name(idx)}) allocated",
        )
    rss = rss_bytes()
    vm = psutil.virtual_memory()
    peak = max(peak_bytes, rss)
    if since is not None:
        mark = process_peak_bytes()
        if mark > since:  # the work raised the process's high-water mark: that is its peak
            peak = max(peak, mark)
    return MemoryReading(
        kind="cpu",
        used_bytes=rss,
        peak_bytes=peak,
        total_bytes=vm.total,
        available_bytes=vm.available,
        label="CPU process RSS",
    )


def describe(m: Optional[MemoryReading], sep: str = " · ") -> str:
    """One line that says what was measured: CUDA allocator (and NVML) figures, or the process RSS on the CPU."""
    if m is None:
        return "memory: not measured yet"
    if m.kind == "cuda":
        pct = 100.0 * m.used_bytes / max(m.total_bytes, 1)
        parts = [f"{m.label or 'CUDA'}: allocated {human_bytes(m.used_bytes)}", f"reserved {human_bytes(m.reserved_bytes)}",
                 f"peak {human_bytes(m.peak_bytes)} of {human_bytes(m.total_bytes)} ({pct:.0f}%)"]
        if m.device_used_bytes:
            parts.append(f"device in use (NVML, all processes) {human_bytes(m.device_used_bytes)}")
        return sep.join(parts)
    return sep.join([f"RAM (CPU): process RSS {human_bytes(m.used_bytes)}", f"peak {human_bytes(m.peak_bytes)}",
                     f"system available {human_bytes(m.available_bytes)} of {human_bytes(m.total_bytes)}"])


def reset_peak(device: Optional[str] = None) -> int:
    """Start measuring a peak: on CUDA the allocator's peak is reset; on the CPU the process's high-water mark
    now is returned, for :func:`read_memory`'s ``since``."""
    if _cuda_ready(device):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return 0
    return process_peak_bytes()


def human_bytes(n: Optional[float]) -> str:
    """``n`` bytes in decimal units (1 GB = 1e9 bytes), the units of %ft_plan, model cards and the seed's
    memory table, so a plan and a reading of the same memory show the same figure."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
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
    trim_heap()


MMAP_THRESHOLD = 1 << 20  # bytes; FT_MAGICS_MMAP_THRESHOLD=0 leaves glibc's own setting alone
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def fix_mmap_threshold() -> int:
    """Serve heap blocks of 1 MB and more from their own mmap, so that freeing one returns it to the OS.

    glibc's default threshold moves up (to 32 MB) each time a large block is freed, after which tensors
    of a few MB come from the shared heap, where freed space is kept rather than returned. Loading a
    model frees hundreds of such blocks, so on the CPU the process RSS grows far past what is in use.
    Measured on the demo model (make bench, 2 cores): the load-time peak falls from 1.14 GB to 0.70 GB.
    Training raises it again for its duration (:func:`heap_for_training`). Returns the threshold set (0: left
    alone, or not glibc).
    """
    value = int(os.environ.get("FT_MAGICS_MMAP_THRESHOLD", MMAP_THRESHOLD))
    if value <= 0:
        return 0
    return value if set_mmap_threshold(value) else 0


def set_mmap_threshold(value: int) -> bool:
    """glibc's M_MMAP_THRESHOLD (it also stops glibc moving it); False where refused or not glibc on Linux."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(value)) == 1
    except (OSError, AttributeError):
        return False


TRAINING_MMAP_THRESHOLD = 32 << 20  # glibc's largest


@contextlib.contextmanager
def heap_for_training(device: str, reuse: bool = True):
    """While training on the CPU with ``reuse`` (the ``heap_reuse`` setting): heap blocks up to 32 MB are
    kept for reuse when freed instead of being returned to the OS one by one. Yields the threshold set (0:
    left as it was).

    A training step allocates and frees its activations again every step. With the 1 MB threshold each
    of them is a fresh mapping whose pages the kernel faults in and zeroes on first touch, every step
    (and unmaps after). Measured on the demo model, 2 cores, batch 8 (12 steps, each setting in its own
    process): on the set with lengths up to ~500 tokens, 155 instead of 109 loss tokens/s (peak RSS 4.17
    instead of 3.03 GB), and with gradient checkpointing 119 instead of 72 (1.53 instead of 1.14 GB); on the
    bundled set (~80 tokens) the same speed and memory either way. On exit the 1 MB threshold is back and
    the freed heap is returned. FT_MAGICS_MMAP_THRESHOLD, where set, pins the threshold throughout.

    On the CPU the heap is trimmed first (after a garbage collection): the holes that loading, tokenising and
    building the Trainer left are returned instead of being where the step's small long-lived allocations
    land. Bundled set with gradient checkpointing, 20 steps, two runs each in turns: peak 862-867 MB against
    868-940 MB, the same speed.
    """
    if str(device).startswith("cpu"):  # start from a compact heap: what loading and tokenising freed goes back
        import gc

        gc.collect()
        trim_heap()
    if (not str(device).startswith("cpu") or not reuse or "FT_MAGICS_MMAP_THRESHOLD" in os.environ
            or not set_mmap_threshold(TRAINING_MMAP_THRESHOLD)):
        yield 0
        return
    try:
        yield TRAINING_MMAP_THRESHOLD
    finally:
        set_mmap_threshold(MMAP_THRESHOLD)
        trim_heap()


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so RSS reflects what is in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


@contextlib.contextmanager
def read_weights_into_memory():
    """While active, transformers reads each safetensors tensor into memory of its own (``pread``) instead
    of mapping the whole file.

    Loading through a mapping leaves every page it read resident in the process: quantising a model reads
    all of its 16-bit weights, so the 16-bit file stays in RSS beside the quantised copy until the mapping
    goes (and the tensors kept unchanged, such as the embeddings, are views that pin it). Read one tensor at
    a time, each 16-bit weight is freed once it is quantised. Measured on the demo model in 4-bit (2 cores):
    load-time peak RSS 774 MB -> 564 MB, the same load time, the same weights. transformers calls safetensors'
    ``safe_open(..., backend="mmap")``; the switch asks for its ``"pread"`` backend (the one transformers uses
    on Windows). A transformers without that call is left as it is.
    """
    try:
        from transformers import modeling_utils as mu
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield False
        return
    original = getattr(mu, "safe_open", None)
    if original is None:
        yield False
        return

    def safe_open_pread(filename, framework="pt", device="cpu", backend=None, **kw):
        if backend in (None, "mmap") and str(device) == "cpu":
            try:
                return original(filename, framework=framework, device=device, backend="pread", **kw)
            except TypeError:  # a safetensors without the backend argument
                pass
        if backend is None:
            return original(filename, framework=framework, device=device, **kw)
        return original(filename, framework=framework, device=device, backend=backend, **kw)

    mu.safe_open = safe_open_pread
    try:
        yield True
    finally:
        mu.safe_open = original


def _file_mappings(suffix: str) -> list:
    """(start, end) address ranges of this process's mappings of files whose name ends in ``suffix`` (Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n").endswith(suffix):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:  # no /proc (not Linux): nothing to find
        pass
    return ranges


def detach_from_files(module, suffix: str = ".safetensors") -> int:
    """Copy every parameter and buffer of ``module`` that still lies in a memory-mapped weights file into
    memory of its own, so that the mapping (the whole file) can go. Returns the bytes copied.

    transformers loads safetensors through mmap, and the tensors it keeps unchanged (on a quantised model:
    the embeddings and norms) stay views into that mapping - which keeps every page of the file that loading
    touched resident: the full 16-bit weights that quantisation has already replaced. On the demo model in
    4-bit, 56 MB of embeddings kept a 256 MB mapping alive. Tied parameters stay tied: the Parameter
    objects keep their identity, only their storage moves.
    """
    ranges = _file_mappings(suffix)
    if not ranges:
        return 0
    copied = 0
    seen: set = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen or t.device.type != "cpu":
            continue
        seen.add(id(t))
        ptr = t.untyped_storage().data_ptr()
        if any(start <= ptr < end for start, end in ranges):
            t.data = t.data.clone()
            copied += t.nbytes
    if copied:
        import gc

        gc.collect()  # the storages that held the mapping are gone with their last tensor
    return copied

"""Cached checks of what the hardware and the optional backends can do (peft's import_utils style)."""
from __future__ import annotations

import functools
import time

from ..errors import FtUsageError


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not cuda_available():
        raise FtUsageError(
            "--device cuda was asked for but no CUDA GPU is visible to torch "
            "(torch.cuda.is_available() is False). Use --device cpu or --device auto, or install a "
            "CUDA build of torch. See README 'Troubleshooting: no GPU found'."
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise FtUsageError(f"unknown device {device!r}: use auto, cpu or cuda[:N].")
    return device


def cpu_matmul_gflops(dtype_name: str, n: int = 512, reps: int = 8) -> float:
    """One measurement of the CPU's matrix-multiply rate for ``dtype_name`` (a few ms)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up: first call picks kernels
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    dt = time.perf_counter() - t
    return 2 * n**3 * reps / dt / 1e9


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(rounds: int = 3) -> float:
    """How many times as fast this CPU multiplies bf16 matrices as fp32 ones (cached per process): the best of
    ``rounds`` alternating measurements of each, so that other work on the cores slows both alike instead of
    tipping the choice. One measurement of each, taken while another process kept both cores of this 2-core
    machine busy, chose fp32 on a CPU whose bf16 is several times faster."""
    bf16 = fp32 = 0.0
    for _ in range(rounds):
        bf16 = max(bf16, cpu_matmul_gflops("bfloat16"))
        fp32 = max(fp32, cpu_matmul_gflops("float32"))
    return bf16 / fp32


BF16_INSTRUCTIONS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs that multiply bf16 natively


@functools.lru_cache(maxsize=None)
def cpu_bf16_instructions() -> str | None:
    """The bf16 matrix instructions this CPU lists (Linux's /proc/cpuinfo), or None (none, or not Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return None
    return next((f for f in BF16_INSTRUCTIONS if f in flags), None)


def fast_bf16_on_cpu() -> bool:
    """bf16 is worth it on this CPU only when it actually multiplies faster than fp32 (AMX/AVX512-BF16). A CPU
    that lists those instructions has it, whatever a timing says: timings taken while other work filled the
    cores chose fp32 on such a CPU now and then, so the same notebook trained at another precision."""
    return cpu_bf16_instructions() is not None or cpu_bf16_speedup() > 1.2


def resolve_dtype(dtype: str, device: str):
    """The compute dtype: bf16 where the hardware is fast at it, else fp16 (GPU) or fp32 (CPU)."""
    import torch

    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype != "auto":
        if dtype not in names:
            raise FtUsageError(f"unknown dtype {dtype!r}: use auto, bf16, fp16 or fp32.")
        if dtype == "fp16" and device == "cpu":
            raise FtUsageError(
                "--dtype fp16 on the CPU has no fast kernels (thousands of times slower than bf16 here). "
                "Use --dtype bf16 or fp32, or auto."
            )
        return names[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if fast_bf16_on_cpu() else torch.float32


@functools.lru_cache(maxsize=None)
def bitsandbytes_available() -> bool:
    try:  # (its import-time note about an optional hub kernel is filtered in ft_magics/__init__.py)
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True

"""Out-of-memory during training: recognise it, free what the failed step held, and say what to change.

Trainer's ``auto_find_batch_size`` (accelerate's ``find_executable_batch_size``) does the retrying when
``auto_batch_size: true``; this module only decides whether an exception is an OOM and turns it into
an :class:`FtUsageError` whose message names the concrete settings to change.
"""
from __future__ import annotations

from typing import Optional

from ..errors import FtUsageError

_OOM_TEXT = (" out of memory", "DefaultCPUAllocator: can't allocate memory", "MPS backend out of memory",
             "No executable batch size found")


def is_oom(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError (CUDA and others) and the allocators' OOM RuntimeErrors."""
    import sys

    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or any(t in str(exc) for t in _OOM_TEXT)
    )


def suggestions(cfg, bits: Optional[int] = None) -> list:
    """Concrete changes, most effective first, for settings ``cfg`` on a model loaded at ``bits``."""
    out = []
    if cfg.batch_size > 1:
        half = max(1, cfg.batch_size // 2)
        out.append(f"batch_size: {half} with grad_accum: {cfg.grad_accum * (cfg.batch_size // half)} "
                   "(same effective batch, about half the activation memory)")
    if not cfg.auto_batch_size and cfg.batch_size > 1:
        out.append("auto_batch_size: true (retry with smaller batches until one fits)")
    if cfg.max_seq_len > 128:
        out.append(f"max_seq_len: {max(128, cfg.max_seq_len // 2)} (activations grow with sequence length)")
    if cfg.gradient_checkpointing is not True:
        out.append("gradient_checkpointing: true (recompute activations: less memory, ~30% slower)")
    if bits is not None and bits > 4:
        out.append("load the model in 4-bit: %qlora_load ... --bits 4 (QLoRA)")
    if cfg.r > 8:
        out.append(f"r: {max(4, cfg.r // 2)} (a smaller adapter and optimizer state)")
    return out


def oom_error(exc: BaseException, cfg, bits: Optional[int] = None, device: str = "") -> FtUsageError:
    where = "GPU" if str(device).startswith("cuda") else "memory"
    tried = f" at batch_size {cfg.batch_size}, max_seq_len {cfg.max_seq_len}"
    if "No executable batch size found" in str(exc):
        tried = " even at batch_size 1 (auto_batch_size tried every size)"
    lines = [f"training ran out of {where}{tried}. The run stopped cleanly and its memory was released; "
             "the model is still loaded. Try one of these settings (cell body or --flags):"]
    lines += [f"  - {s}" for s in suggestions(cfg, bits)] or ["  - a smaller model"]
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    lines.append(f"({type(exc).__name__}: {first})")
    lines.append("See README 'Troubleshooting: out of memory'.")
    return FtUsageError("\n".join(lines))


def free_after_oom(trainer) -> None:
    """Drop what a failed step holds (optimizer state, gradients, cached blocks)."""
    import gc
    import sys

    if trainer is not None:
        for attr in ("optimizer", "lr_scheduler"):
            if hasattr(trainer, attr):
                setattr(trainer, attr, None)
        model = getattr(trainer, "model", None)
        if model is not None:
            for p in model.parameters():
                p.grad = None
        acc = getattr(trainer, "accelerator", None)
        if acc is not None:
            try:
                acc.free_memory()
            except Exception:  # noqa: BLE001 - best effort cleanup after a failure
                pass
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()

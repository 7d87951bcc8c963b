"""The worker of a training job: ``python -m ft_magics.train DIR/job.yaml``.

Run it directly for one process, or under a launcher for several::

    accelerate launch --config_file DIR/accelerate.yaml -m ft_magics.train DIR/job.yaml
    torchrun --nproc_per_node 2 -m ft_magics.train DIR/job.yaml

Every process loads the model, prepares the same data and runs the same ``run_training`` as the
notebook; the Trainer splits each global batch between the processes and averages the gradients
(DDP over gloo on the CPU, nccl on CUDA). Only rank 0 writes the adapter, its run record and the
event file; a stop request (the STOP file the notebook writes on interrupt) is agreed by all ranks
at a step boundary, so they stop together.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from .core.training import StopFlag
from .errors import FtUsageError


def dist_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) as torchrun / accelerate set them; (0, 0, 1) for one process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


STOP_CODES = ("", "stopped", "interrupted")  # what the ranks all-reduce (max): 0 is "go on"


class SharedStopFlag(StopFlag):
    """A stop flag every rank agrees on at the same step boundary.

    One rank stopping alone would leave the others waiting for it in the next gradient all-reduce,
    so each check is an all-reduce (max) of "anyone wants to stop", on every rank. ``run_training``
    checks the flag at the same points on every rank, which keeps these collectives in step.
    """

    def __init__(self, stop_file: Optional[str] = None) -> None:
        super().__init__()
        self.stop_file = stop_file
        self._agreed = False
        # the notebook kernel that started the job: killed, it can no longer stop the job, read its events or
        # see its end, and a new kernel offered --resume on the checkpoints this job went on writing
        self.notebook_pid = int(os.environ.get("FT_MAGICS_NOTEBOOK_PID") or 0)

    def _notebook_gone(self) -> bool:
        if not self.notebook_pid:
            return False
        try:
            os.kill(self.notebook_pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, another user's
            return False
        return False

    def is_set(self) -> bool:
        if self._agreed:
            return True
        local = super().is_set()
        if not local and self.stop_file and os.path.exists(self.stop_file):
            local = True
            reason = Path(self.stop_file).read_text().strip() or "stopped"
            self.set(reason if reason in STOP_CODES[1:] else "stopped")
        elif not local and self._notebook_gone():  # stop at this step and save the adapter, as %lora_stop would
            local = True
            self.set("stopped")
        # the ranks agree on the largest code, so a rank that learns of the stop from the others records the
        # same reason as the one that read the file
        mine = (STOP_CODES.index(self.reason) if self.reason in STOP_CODES[1:] else 1) if local else 0
        code = mine
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            dev = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([mine], device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        if code:
            self._agreed = True
            if not super().is_set():
                self.set(STOP_CODES[code])
            elif code > mine:
                self.reason = STOP_CODES[code]  # another rank read the interrupt: the agreed reason wins
        return bool(code)


def _init_process_group(world: int, local_rank: int, device: str) -> str:
    """Join the other processes explicitly: gloo on the CPU, nccl on CUDA (the Trainer reuses it)."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if world > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return backend


def _check_layout() -> None:
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        raise FtUsageError(
            "FSDP + QLoRA is not wired into ft_magics jobs yet: sharding 4-bit weights needs bf16 quant storage, "
            "loading without a device map and a gathered state dict for the adapter save, and none of that has run "
            "here (no GPU; on the CPU, transformers and accelerate fall back to DDP even under an FSDP config). "
            "Use DDP instead: accelerate launch --config_file accelerate-multi-gpu.yaml, which runs any model that "
            "fits one GPU in 4-bit on every GPU (README: Several GPUs on one machine)."
        )


def padded_for_processes(examples: list, world: int, batch_size: int) -> list:
    """Eval examples padded to a multiple of ``world x batch_size`` with copies that carry no loss: to even out
    the processes' batches, the dataloader repeats examples from the start, and the run's eval loss (the token
    sums of every process) counted those twice (15 eval rows on 2 processes: 5.9520 where %lora_eval gave
    5.9546). Rows without a loss-bearing token add nothing to the sums. Preference pairs are left as they are."""
    from .core.data import TokenizedExample

    if world <= 1 or not examples or not all(type(e) is TokenizedExample for e in examples):
        return examples
    short = -len(examples) % (world * batch_size)
    blank = TokenizedExample(examples[0].input_ids, [-100] * len(examples[0].input_ids),
                             getattr(examples[0], "position_ids", None))
    return list(examples) + [blank] * short


def require_job_resumable(spec) -> None:
    """``--resume`` of a job with nothing to resume (a completed run, no checkpoint, other settings) fails here,
    before the launcher starts processes and each of them loads the model."""
    from .core.checkpoints import checkpoint_root, require_resumable

    require_resumable(checkpoint_root(spec.adapter_dir.parent, spec.name), spec.name, spec.settings)


def run_job(job_path: str, events: Optional[str] = None, resume: bool = False) -> int:
    """Train the job in this process (one rank of several, or alone); with ``resume``, continue from the
    adapter's latest complete checkpoint. Returns the exit code."""
    from .config import TrainConfig
    from .core.atomic import atomic_write_json
    from .core.data import prepare
    from .core.jobs import EVENTS_FILE, JsonlEventWriter, load_job
    from .core.events import Message, emit
    from .core import hardware
    from .core.loading import load_model
    from .core.training import RUN_RECORD, run_training

    _check_layout()
    rank, local_rank, world = dist_env()
    if rank > 0:  # rank 0 speaks for the run: the others' "Loading weights" bars only repeated its own
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    spec = load_job(job_path)
    if resume:
        require_job_resumable(spec)
    run_dir = Path(os.environ.get("FT_MAGICS_RUN_DIR") or spec.path.parent)
    events_path = Path(events) if events else run_dir / EVENTS_FILE
    stop_file = os.environ.get("FT_MAGICS_STOP_FILE") or str(run_dir / "STOP")
    if world > 1:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")
    want = spec.model.get("device", "auto")
    device = f"cuda:{local_rank}" if want != "cpu" and hardware.cuda_available() else "cpu"
    backend = _init_process_group(world, local_rank, device)
    listeners: list = []
    writer = None
    if rank == 0:
        from .widgets.text import TextReporter

        writer = JsonlEventWriter(events_path)
        listeners = [writer] if os.environ.get("FT_MAGICS_QUIET") else [
            writer, TextReporter(sys.stdout, stop_hint=TextReporter.TERMINAL_STOP_HINT)]
    try:
        handle = load_model(spec.model_source, bits=int(spec.model.get("bits", 4)), dtype=spec.model.get("dtype", "auto"),
                            device=device, trust_remote_code=bool(spec.model.get("trust_remote_code", False)),
                            allow_pickle=bool(spec.model.get("allow_pickle", False)))
        cfg = TrainConfig.from_dict(spec.settings)
        if world > 1 and getattr(cfg, "chunked_loss", False):
            # The chunked loss calls the decoder inside the model directly; under DDP the forward must go
            # through the DDP wrapper for gradients to be averaged, so the standard loss is used.
            cfg.chunked_loss = False
        if world > 1 and getattr(cfg, "save_every_minutes", 0):
            # Ranks must decide to checkpoint at the same step; each one's clock would not agree.
            cfg.save_every_minutes = 0.0
            emit(listeners, Message("time-based checkpoints are off with several processes (the ranks must agree "
                                    "on the step); set save_every: N steps for resumable checkpoints."))
        import inspect

        extra = {"model": handle.model} if "model" in inspect.signature(prepare).parameters else {}
        train_ex, eval_ex, report = prepare(spec.resolve(spec.data), handle.tokenizer, cfg,
                                            eval_src=spec.resolve(spec.eval_data), **extra)
        emit(listeners, Message(report.text()))
        eval_ex = padded_for_processes(eval_ex, world, cfg.batch_size)
        if world > 1:
            emit(listeners, Message(
                f"{world} processes ({backend}); global batch {cfg.batch_size} x {cfg.grad_accum} x {world} = "
                f"{cfg.batch_size * cfg.grad_accum * world} examples per step"))
        result = run_training(handle, spec.name, train_ex, eval_ex, cfg, spec.adapter_dir, listeners,
                              flag=SharedStopFlag(stop_file), data_report=report, resume=resume, job=spec.path)
        if rank == 0 and result.adapter_path:
            record = dict(result.record, launch={
                "processes": world, "backend": backend if world > 1 else None, "job": str(spec.path),
                "global_batch": cfg.batch_size * cfg.grad_accum * world,
            })
            atomic_write_json(Path(result.adapter_path) / RUN_RECORD, record)
        if world > 1:
            import torch.distributed as dist

            # Leave together: a rank that tore its gloo group down while rank 0 was still saving the adapter
            # aborted at exit ("terminate called without an active exception", SIGABRT), and the launcher
            # then reported the finished job as failed.
            dist.barrier()
        return 0 if result.status != "failed" else 1
    finally:
        if writer is not None:
            writer.close()
        if world > 1:  # the pid file is for watching the run while it lasts (it was left in the job folder)
            (run_dir / f"rank{rank}.pid").unlink(missing_ok=True)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ft_magics.train",
                                     description="Run an ft_magics training job (one rank of it under a launcher).")
    parser.add_argument("job", help="the job.yaml written by %%lora_export_job (or its folder)")
    parser.add_argument("--events", default=None, help="JSON-lines event file rank 0 appends to (default: next to the job)")
    parser.add_argument("--resume", action="store_true", help="continue from the adapter's latest complete checkpoint")
    args = parser.parse_args(argv)
    try:
        return run_job(args.job, args.events, args.resume)
    except FtUsageError as exc:
        print(f"ft_magics: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

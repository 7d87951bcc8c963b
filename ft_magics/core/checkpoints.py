"""Resumable checkpoints: Trainer's own checkpoint-N folders, made crash-safe and found again on resume.

``transformers.Trainer`` writes a checkpoint (adapter weights, optimizer, scheduler, RNG states and the
trainer state with the data position) straight into ``checkpoint-N/``. A process killed halfway
through that write leaves a folder that looks like a checkpoint but is not. So a checkpoint only
counts once :class:`CheckpointCallback` has fsynced its files and written the completion marker
(``on_save`` runs after Trainer has finished writing); on resume every folder without the marker, or
with an unreadable file, is skipped and removed. ``save_total_limit=2`` keeps the previous complete
checkpoint until the next one is complete, so a kill at any moment loses at most the steps since
the last complete checkpoint.

Layout: ``<adapters folder>/.checkpoints/<NAME>/checkpoint-<step>/``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from ..errors import FtUsageError
from .atomic import COMPLETE_MARKER, _fsync_dir, atomic_write_json
from .events import Message, counted, emit

CHECKPOINTS_DIRNAME = ".checkpoints"
META = "ft_checkpoint.json"
KEEP = 2  # the newest complete checkpoint survives while the next one is being written
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def checkpoint_root(adapters_root: Path, name: str) -> Path:
    return Path(adapters_root) / CHECKPOINTS_DIRNAME / name


def _checkpoints(root: Path) -> list:
    """``[(step, path)]`` of every checkpoint-N folder under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def checkpoint_problem(path: Path) -> Optional[str]:
    """What is wrong with checkpoint folder ``path`` (None when it is complete and readable)."""
    path = Path(path)
    if not (path / COMPLETE_MARKER).exists():
        return "no completion marker (the process stopped while writing it)"
    for f in _REQUIRED:
        if not (path / f).is_file() or (path / f).stat().st_size == 0:
            return f"{f} is missing or empty"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"trainer_state.json is unreadable ({exc})"
    m = _CKPT_RE.match(path.name)
    if m and state.get("global_step") != int(m.group(1)):
        return f"trainer_state.json says step {state.get('global_step')}, folder says {m.group(1)}"
    weights = list(path.glob("adapter_model.safetensors")) + list(path.glob("*/adapter_model.safetensors"))
    if not weights:
        return "no adapter_model.safetensors"
    try:
        from safetensors import safe_open

        for w in weights:
            with safe_open(str(w), framework="pt") as fh:
                list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        return f"{w.relative_to(path)} is corrupt ({type(exc).__name__})"
    return None


def checkpoint_step(path: Path) -> int:
    """The step a ``checkpoint-N`` folder was written at."""
    return int(_CKPT_RE.match(Path(path).name).group(1))


def latest_valid(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None."""
    for _step, path in reversed(_checkpoints(root)):
        if checkpoint_problem(path) is None:
            return path
    return None


def discard_invalid(root: Path) -> list:
    """Remove checkpoint folders that are not complete; return ``[(name, problem)]``."""
    removed = []
    for _step, path in _checkpoints(root):
        problem = checkpoint_problem(path)
        if problem is not None:
            shutil.rmtree(path, ignore_errors=True)
            removed.append((path.name, problem))
    return removed


def prior_losses(path: Path) -> list:
    """``[[step, loss], ...]`` logged before checkpoint ``path`` (so a resumed run keeps its whole curve)."""
    try:
        state = json.loads((Path(path) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return []
    return [[int(e["step"]), float(e["loss"])] for e in state.get("log_history", []) if "loss" in e and "step" in e]


def prior_evals(path: Path) -> list:
    try:
        state = json.loads((Path(path) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return []
    return [[int(e["step"]), float(e["eval_loss"])] for e in state.get("log_history", [])
            if "eval_loss" in e and "step" in e]


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return {}


def rename_checkpoints(root: Path, name: str, new: str) -> list:
    """In run ``root``'s checkpoints (already moved to the new name's folder), the adapter's weights folder
    ``checkpoint-N/NAME`` becomes ``checkpoint-N/NEW``: a resume under the new name loads it from there, and
    found nothing under the old one (it trained a fresh adapter while saying it resumed). Returns the undo
    steps, newest last."""
    undo = []
    for _, ckpt in _checkpoints(root):
        src, dst = ckpt / name, ckpt / new
        if src.is_dir() and not os.path.lexists(dst):
            os.rename(src, dst)
            undo.append(lambda src=src, dst=dst: os.rename(dst, src))
    return undo


def holds_weights(path: Path, name: str) -> bool:
    """Whether checkpoint ``path`` holds adapter ``name``'s weights, where a resume loads them from."""
    return any(Path(path, *where, f"adapter_model.{ext}").is_file()
               for where in ((name,), ()) for ext in ("safetensors", "bin"))


# settings a resumed run may change, and which shape its steps
STEP_SETTINGS = ("batch_size", "grad_accum", "max_steps", "epochs", "learning_rate", "seed", "alpha")


def earlier_settings(old_s: dict, new_s: dict) -> dict:
    """``{key: the checkpoint's value}`` of the :data:`STEP_SETTINGS` a resumed run changes."""
    return {k: old_s[k] for k in STEP_SETTINGS if k in old_s and k in new_s and old_s[k] != new_s[k]}


def resume_differences(old: dict, meta: dict) -> list:
    """What a resumed run changes against the checkpoint it continues (``old``: the checkpoint's metadata,
    ``meta``: this run's): the data, the step-shaping settings, a preference run's beta; each in words."""
    changed = [f"data ({old.get('data_source') or 'other rows'} before, {meta.get('data_source') or 'other rows'} now)"
               if old.get("data_source") != meta.get("data_source") else "data (the rows changed)"
               for k in ("data_fingerprint",) if old.get(k) and meta.get(k) and old[k] != meta[k]]
    old_s, new_s = old.get("settings") or {}, meta.get("settings") or {}
    changed += [f"{k} ({v} before, {new_s[k]} now)" for k, v in earlier_settings(old_s, new_s).items()]
    objective = new_s.get("objective", "sft")
    if objective != "sft":  # what the preference loss is made of (a run records the beta it used; 0: the usual)
        from ..config import PAIR_BETA

        used = {"beta": lambda v: v or PAIR_BETA.get(objective, 0.1), "simpo_gamma": lambda v: v}
        changed += [f"{k} ({used[k](old_s[k]):g} before, {used[k](new_s[k]):g} now)" for k in used
                    if k in old_s and k in new_s and used[k](old_s[k]) != used[k](new_s[k])
                    and (k == "beta" or objective == "simpo")]
    return changed


def resume_warning(name: str, changed: list) -> str:
    return (f"resuming {name!r} with different {', '.join(changed)} than the checkpoint was made with; the result "
            "will not match an uninterrupted run.")


RUNNING_FILE = "ft_running.json"  # in a run's checkpoints folder while a process trains it


def _first_rank() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (Linux: /proc/PID/stat's starttime), so a reused pid is not taken for it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def mark_running(root: Path) -> None:
    """Say in ``root`` that this process trains the run (another kernel's list and train read it)."""
    import socket

    if _first_rank():
        atomic_write_json(Path(root) / RUNNING_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                                      "start": _process_start(os.getpid())})


def unmark_running(root: Path) -> None:
    if _first_rank():
        try:
            (Path(root) / RUNNING_FILE).unlink()
        except OSError:
            pass


def running_elsewhere(root: Path) -> Optional[int]:
    """The pid of another live process on this machine that is training the run whose checkpoints are ``root``
    (its mark is left behind by a killed one: then None)."""
    import socket

    try:
        mark = json.loads((Path(root) / RUNNING_FILE).read_text())
        pid = int(mark["pid"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if pid == os.getpid() or mark.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    if mark.get("start") is not None and _process_start(pid) not in (None, mark["start"]):
        return None  # the pid now names another process
    return pid


def refuse_if_trained_elsewhere(root: Path, name: str) -> None:
    """A run another process on this machine is training now (its mark in ``root``) is not trained here too."""
    other = running_elsewhere(root)
    if other is not None:
        raise FtUsageError(f"{name!r} is being trained now by another process on this machine (pid {other}), in "
                           f"{Path(root).parent.parent}: wait for it to finish (%lora_adapters list names it then), "
                           "or train under another name.")


def begin(root: Path, name: str, resume: bool, listeners: list, meta: dict) -> Optional[Path]:
    """Prepare ``root`` for a run; return the checkpoint to resume from (None for a fresh run).

    A fresh run starts from an empty folder (old checkpoints of NAME belong to the adapter it replaces).
    A resumed run drops incomplete checkpoints, says which, and warns when the data or settings differ.
    A run another process on this machine is training now (another notebook on the same adapters folder) is
    refused: both would write the same checkpoints and adapter.
    """
    root = Path(root)
    if _first_rank():
        refuse_if_trained_elsewhere(root, name)
    if not resume:
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        return None
    removed = discard_invalid(root)
    for folder, problem in removed:
        emit(listeners, Message(f"skipped incomplete checkpoint {folder} of {name!r}: {problem}", "warning"))
    path = latest_valid(root)
    if path is None:
        raise no_checkpoint_error(root, name)
    old = check_resumable(path, name, meta.get("settings") or {})
    step = checkpoint_step(path)
    changed = resume_differences(old, meta)
    if changed:
        emit(listeners, Message(resume_warning(name, changed), "warning"))
    was, now, new_s = old.get("processes", 1), meta.get("processes", 1), meta.get("settings") or {}
    if was != now and old.get("global_batch") and old.get("global_batch") != meta.get("global_batch"):
        per = old["global_batch"] // max(now * int(new_s.get("grad_accum", 1) or 1), 1)
        emit(listeners, Message(
            f"{path.name} of {name!r} was made on {counted(was, 'process')} with a global batch of "
            f"{old['global_batch']} examples per step; this run has {counted(now, 'process')} and "
            f"{meta.get('global_batch')}, so its steps differ from an uninterrupted run's"
            + (f" (batch_size: {per} keeps the global batch)" if per * now * int(new_s.get('grad_accum', 1) or 1)
               == old["global_batch"] else "") + ".", "warning"))
    emit(listeners, Message(f"resuming {name!r} from {path.name} (step {step})"))
    return path


# settings that fix the adapter's tensors: a checkpoint made with others cannot be loaded into this run
SHAPE_SETTINGS = ("r", "target_modules", "use_dora")


def check_resumable(path: Path, name: str, settings: dict) -> dict:
    """Refuse to resume from checkpoint ``path`` what cannot continue it: a run whose max_steps is already
    reached, whose adapter has another shape (``SHAPE_SETTINGS``), or whose objective is another (another loss,
    and for sft against the others, other rows). Returns the checkpoint's metadata."""
    old = read_meta(path)
    step = checkpoint_step(path)
    if not holds_weights(path, name):  # else the Trainer goes on from step N with a fresh adapter, unsaid
        held = sorted(p.name for p in Path(path).iterdir() if p.is_dir() and holds_weights(p.parent, p.name))
        raise FtUsageError(
            f"{Path(path).name} of {name!r} holds no adapter weights under that name"
            + (f" (it holds {', '.join(repr(h) for h in held)}: its folder was renamed outside ft_magics)" if held
               else "") + ", so resuming would train a fresh adapter from its step on. Rename the run back, or "
            "train afresh without --resume (that replaces the adapter).")
    limit = settings.get("max_steps", -1)
    if isinstance(limit, int) and 0 < limit <= step:
        started = (old.get("settings") or {}).get("max_steps")
        raise FtUsageError(
            f"{Path(path).name} of {name!r} is already at step {step}, so max_steps={limit} leaves nothing to train. "
            f"Resume with --max-steps above {step}" + (f" (the run was started with {started})" if started else "")
            + ", or train afresh without --resume (that replaces the adapter).")
    old_s = old.get("settings") or {}
    shape = [k for k in SHAPE_SETTINGS if k in old_s and k in settings and old_s[k] != settings[k]]
    if shape:
        was = ", ".join(f"{k}: {old_s[k]}" for k in shape)
        raise FtUsageError(
            f"{Path(path).name} of {name!r} holds an adapter made with {was}; this run asks for "
            f"{', '.join(f'{k}: {settings[k]}' for k in shape)}, which changes the adapter's tensors, so the "
            f"checkpoint cannot continue it. Resume with {was}, or train afresh without --resume (that replaces "
            "the adapter).")
    was, now = old_s.get("objective", "sft"), settings.get("objective")  # (checkpoints from before objective: sft)
    if old_s and now is not None and was != now:
        raise FtUsageError(
            f"{Path(path).name} of {name!r} was made with objective: {was}; this run asks for objective: {now}, "
            f"another loss{' on other rows (preference pairs against single examples)' if 'sft' in (was, now) else ''}"
            f", so the checkpoint (its optimizer state and steps) cannot continue it. Resume with objective: {was}, "
            "or train afresh without --resume (that replaces the adapter), or under a new name to keep this one.")
    return old


def no_checkpoint_error(root: Path, name: str) -> FtUsageError:
    try:  # the adapter's own folder, beside .checkpoints/: a run that completed keeps no checkpoints
        record = json.loads((Path(root).parent.parent / name / "ft_run.json").read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("status") == "completed":
        return FtUsageError(
            f"{name!r} completed its run ({record.get('steps')} steps; the adapter is saved) and a completed run keeps "
            "no checkpoints, so there is nothing to resume. To train longer from its weights, run it without "
            f"--resume with init_from: {name} in the body (under this name, or a new one to keep this one); without "
            "init_from a run starts from a fresh adapter.")
    return FtUsageError(
        f"no complete checkpoint of {name!r} to resume from (looked in {root}). "
        f"Train it without --resume: %%lora_train {name} --data ... (see README 'Troubleshooting: interrupted runs')."
    )


def require_resumable(root: Path, name: str, settings: Optional[dict] = None) -> Path:
    """Fail before any work (the model untouched, the adapter left loaded) when ``--resume`` has nothing to
    resume, or nothing these ``settings`` can continue (:func:`check_resumable`)."""
    path = latest_valid(root)
    if path is None:
        raise no_checkpoint_error(root, name)
    if settings is not None:
        check_resumable(path, name, settings)
    return path


def finish(root: Path, status: str) -> None:
    """A completed run needs no checkpoints (they hold optimizer state: often larger than the adapter); a run
    that ended before its first checkpoint leaves no empty folder behind either."""
    if status == "completed" or not any(Path(root).glob("checkpoint-*")):
        discard(root)
    else:
        unmark_running(root)


def discard(root: Path) -> None:
    """Remove a run's checkpoints (and the checkpoints folder once it is empty)."""
    shutil.rmtree(root, ignore_errors=True)
    parent = Path(root).parent
    try:  # (every process of a run finishes it: another may have removed the folder between the look and this)
        if parent.name == CHECKPOINTS_DIRNAME and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    except OSError:  # gone already, or another run's checkpoints arrived meanwhile: either way nothing to do
        pass


def resume_hint(name: str, adapter_path: Optional[str], root: Path, step: int, world: int = 1,
                job: Optional[Path] = None) -> str:
    """What a stopped run says of resuming it. Under several processes it names ``--processes`` (the same number
    keeps the global batch) and the output folder when the checkpoints are not in the notebook's adapters folder
    (an exported job's). A run of job file ``job`` names the command that resumes the job first."""
    ckpt = latest_valid(root)
    where = f"adapter (step {step}) saved to {adapter_path}" if adapter_path else "no adapter was saved"
    if ckpt is None:
        return f"training of {name!r} stopped: {where}."
    flags = "" if (world <= 1 and job is None) or root.parent.parent.resolve() == Path("adapters").resolve() else \
        f" --output-dir {root.parent.parent}"  # an exported job's checkpoints sit in its own adapters folder
    if job is not None:
        import shlex

        return (f"training of {name!r} stopped: {where}. Continue it from {ckpt.name} with ft-magics train "
                f"{shlex.quote(str(job))} --resume, or from a notebook with %%lora_train {name} --resume --processes "
                f"{world}{flags} (same --data and settings).")
    if world > 1:
        return (f"training of {name!r} stopped: {where}. Continue it from {ckpt.name} with %%lora_train {name} "
                f"--resume --processes {world}{flags} (same --data and settings), or Session.train_processes("
                f"{name!r}, ..., processes={world}, resume=True), or ft-magics train JOB --resume for an exported job.")
    return (f"training of {name!r} stopped: {where}. Continue it from {ckpt.name} with "
            f"%%lora_train {name} --resume{flags} (same --data and settings), or Session.train({name!r}, ..., "
            "resume=True).")


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            try:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            except FileNotFoundError:  # a temporary file renamed away between the listing and the open
                continue
    for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        _fsync_dir(d)


def make_callback(cfg, flag, meta: dict, listeners=()):
    """A TrainerCallback that asks Trainer to checkpoint every ``save_every`` steps, every
    ``save_every_minutes``, and when the run is being stopped; and marks each finished checkpoint.
    It also says which batch size ``auto_batch_size`` settled on."""
    from transformers import TrainerCallback

    every = int(cfg.save_every or 0)
    every_s = float(cfg.save_every_minutes or 0) * 60.0

    class CheckpointCallback(TrainerCallback):
        def __init__(self):
            self.last = time.monotonic()

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.monotonic()
            used = getattr(state, "train_batch_size", None)
            if cfg.auto_batch_size and used and used != cfg.batch_size:
                emit(listeners, Message(
                    f"auto_batch_size: batch_size {cfg.batch_size} did not fit in memory; training with batch_size "
                    f"{used}. Put batch_size: {used} in the cell body to skip the search next time.", "warning"))

        def on_step_end(self, args, state, control, **kw):
            step = state.global_step
            stopping = flag.is_set()
            due = (every and step % every == 0) or (every_s and time.monotonic() - self.last >= every_s)
            # at the last step the adapter itself is the result; a checkpoint there would be wasted I/O
            if stopping or (due and step < state.max_steps):
                control.should_save = True
                flag.saving = True  # a further interrupt must not break the write
            return control

        def on_save(self, args, state, control, **kw):
            try:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                # under several processes only the first marks the checkpoint, once its own save (the weights,
                # the optimizer) is done: another one walked the folder while the first was still writing it, and
                # crashed the run on a temporary file renamed away (or marked a checkpoint not yet written)
                if folder.is_dir() and state.is_world_process_zero:
                    atomic_write_json(folder / META, {**meta, "step": state.global_step, "saved": time.time()})
                    _fsync_tree(folder)
                    (folder / COMPLETE_MARKER).write_text("ok\n")
                    _fsync_dir(folder)
                self.last = time.monotonic()
            finally:
                flag.saving = False
            return control

    return CheckpointCallback()

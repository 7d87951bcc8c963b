"""The state one notebook holds: the base model, its tokenizer, the adapters and the run history.

``Session`` is also the Python API (``ft_magics.Session``): everything the magics do goes through
it, and it imports no IPython and no widget.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .config import TrainConfig
from .core.adapters import adapter_name_text
from .errors import FtUsageError, did_you_mean, need_text
from .paths import user_path


class Session:
    def __init__(self, adapters_dir: str | Path = "adapters", namespace: Optional[dict] = None) -> None:
        self.adapters_dir = Path(adapters_dir)
        self.namespace = namespace if namespace is not None else {}
        self.handle = None  # core.loading.ModelHandle
        from .core.adapters import AdapterRegistry

        self.adapters = AdapterRegistry()
        self.runs: list = []  # TrainResult of every run in this session
        self._lock = threading.RLock()
        self._training: Optional[threading.Thread] = None
        self._exit_hook = False  # _stop_at_exit registered (once, at the first background run)
        self._stop = None  # StopFlag of the run in progress
        self.last_data_report = None
        self._merged = None  # core.adapters.MergeState while an adapter is folded into the base weights
        self._router = None  # core.routing.AdapterRouter, made by serve()
        self.conversation = None  # core.chat.Conversation of chat(), kept across adapter switches and loads
        self.heldout: dict = {}  # adapter name -> (data, eval_data, TrainConfig) of its run's held-out examples

    # ------------------------------------------------------------------ model
    @property
    def model(self):
        self._require_model()
        return self.handle.model

    @property
    def tokenizer(self):
        self._require_model()
        return self.handle.tokenizer

    @property
    def loaded_as(self) -> dict:
        """``{"dtype": "bfloat16", "bits": 4}`` of the loaded model (empty before a load): what other tools' switches
        (``bf16``, ``load_in_4bit``) are read against in training settings."""
        if self.handle is None:
            return {}
        return {"dtype": str(self.handle.dtype).replace("torch.", ""), "bits": self.handle.bits}

    def _train_config(self, config: Optional[dict | TrainConfig], overrides: dict) -> TrainConfig:
        """``config`` (settings, or a TrainConfig) with ``overrides`` over it, checked as a whole; other tools'
        precision and quantisation switches are read against the loaded model."""
        cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(
            config or {}, check=not overrides, **self.loaded_as)
        return TrainConfig.from_dict(overrides, base=cfg, **self.loaded_as) if overrides else cfg

    def _require_model(self) -> None:
        if self.handle is None:
            raise FtUsageError("no model is loaded: run %qlora_load first (or Session.load()).")

    @contextlib.contextmanager
    def _model_busy(self, what: str):
        """Training and swapping/generating cannot collide: fail clearly while a run holds the model."""
        if not self._lock.acquire(blocking=False):
            raise FtUsageError(
                f"cannot {what} while a background training run is using the model. Wait for it to finish, "
                "or stop it with the dashboard's Stop button or %lora_stop."
            )
        try:
            yield
        finally:
            self._lock.release()

    def load(self, model: str = "demo", bits: int = 4, dtype: str = "auto", device: str = "auto",
             trust_remote_code: bool = False, allow_pickle: bool = False):
        """Load a base model (replacing the current one and its adapters); returns the ModelHandle."""
        from .core.loading import load_model, plan_load

        model = os.fspath(model) if isinstance(model, os.PathLike) else model  # a pathlib.Path is a folder too
        with self._model_busy("load a model"):
            # a wrong argument (a typo in the path, an unknown device) keeps the model and adapters loaded now
            plan = plan_load(model, bits, dtype, device, allow_pickle)
            replaced = None
            if self.handle is not None:
                held = self.adapters.names()
                replaced = (f"replaced {self.handle.name}" + (
                    f"; the adapters it held ({', '.join(held)}) were let go (saved ones load again by name)"
                    if held else ""))
                self._drop_model()  # before the new one: two models at once may not fit
            self.handle = load_model(model, bits=bits, dtype=dtype, device=device,
                                     trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, plan=plan)
            if replaced:
                self.handle.notes.append(replaced)
            if self.conversation is not None and self.conversation.exchanges:
                n = self.conversation.exchanges
                self.handle.notes.append(
                    f"the chat so far ({n} exchange{'s' if n != 1 else ''}) is kept: the next %lora_chat continues it "
                    "on this model; %lora_chat --new starts over")
            self._pin_adapters_dir()
            return self.handle

    def _pin_adapters_dir(self) -> None:
        """The adapters folder, relative to the working folder when the model was loaded, from then on: after a
        %cd, new runs saved into another folder than the earlier ones, and delete left this session's own folders."""
        if not self.adapters_dir.is_absolute():
            self.adapters_dir = user_path(self.adapters_dir).absolute()

    def _drop_model(self) -> None:
        from .core.adapters import AdapterRegistry
        from .core.data import forget_tokenized
        from .core.memory import release_memory

        forget_tokenized()  # keyed by the tokenizer that goes with the model
        self.handle = None
        self.adapters = AdapterRegistry()
        self.heldout.clear()
        self._merged = None
        self._router = None
        release_memory()

    def unload(self) -> None:
        with self._model_busy("unload the model"):
            self._drop_model()

    # ------------------------------------------------------------------ training
    def prepare_data(self, data: Any, cfg: TrainConfig, eval_data: Any = None):
        from .core.data import prepare

        self._require_model()
        if data is None:
            raise FtUsageError("--data is required: a file, demo:NAME, or a notebook variable. Try --data demo:support.")
        # the model is only read, and only for packing: a forward-pass check once the data is validated
        return prepare(data, self.handle.tokenizer, cfg, namespace=self.namespace, eval_src=eval_data,
                       model=self.handle.model)

    def train(self, name: str, data: Any = None, config: Optional[dict | TrainConfig] = None, *,
              eval_data: Any = None, output_dir: Optional[str | Path] = None, listeners: Optional[list] = None,
              background: bool = False, on_done: Optional[Callable] = None, resume: bool = False,
              dry_run: bool = False, **overrides):
        """Train a LoRA adapter ``name``. ``config`` is a dict (YAML body) or TrainConfig; keyword
        overrides win. ``resume=True`` continues from NAME's latest complete checkpoint (same data and
        settings). ``listeners`` see the run's events; by default (None) progress is printed as text, as
        the magic does in a terminal; ``[]`` trains silently. Returns a TrainResult, or the Thread when
        ``background`` is true. ``dry_run``: read, check and report the data, make the run's memory checks, say
        how many steps it would take, and stop there (returns the DataReport; the model is not touched)."""
        from .core.adapters import replacing_note, validate_name
        from .core.events import Message, emit

        listeners = _default_listeners(listeners)
        name = validate_name(name, self.handle.model if self.handle is not None else None)
        cfg = self._train_config(config, overrides)
        self._require_model()
        from .core.training import fit_context

        cfg, context_note = fit_context(cfg, self.handle.model)  # the default 512 on a model that reads 64
        if context_note:
            emit(listeners, Message(context_note))
        out_root = user_path(output_dir, "output_dir", "'runs'") if output_dir is not None else self.adapters_dir
        target = (out_root / name).resolve()
        if target.parent != out_root.resolve():
            raise FtUsageError(f"adapter {name!r} would be written outside {out_root}.")
        if output_dir or not dry_run:  # found now, not when the first checkpoint or the adapter is saved (a
            from .core.atomic import writable_dir  # read-only adapters folder failed with the Trainer's traceback)

            writable_dir(out_root, "the adapter")
        self._check_no_training()
        self._check_not_merged("train")  # it would learn on top of the merged weights
        from .core.checkpoints import checkpoint_root, refuse_if_trained_elsewhere, require_resumable

        refuse_if_trained_elsewhere(checkpoint_root(target.parent, name), name)  # before the data is read
        resume_from = None
        if resume:  # nothing to resume is a user error, found before any work
            resume_from = require_resumable(checkpoint_root(target.parent, name), name, cfg.to_dict())
        # Everything that can be wrong with the data is found before the model is touched.
        from .core.data import data_progress

        with data_progress(_progress_lines(listeners)):  # a large dataset: lines while it is read, not silence
            train_ex, eval_ex, report = self.prepare_data(data, cfg, eval_data)
        self.last_data_report = report
        emit(listeners, Message(report.text()))
        if not resume:
            note = replacing_note(target, name)
            if note:
                emit(listeners, Message(note, "warning"))
        if dry_run:  # the refusals and notes the run would make, then what it would do
            from .core.training import run_checks

            for note in run_checks(cfg, train_ex, eval_ex, self.handle.device):
                emit(listeners, Message(note, "warning"))
            if resume_from is not None:  # what the run's resume would warn about, and where it would continue
                from .core.checkpoints import checkpoint_step, read_meta, resume_differences, resume_warning
                from .core.events import counted

                settings = dict(cfg.to_dict(), **({"beta": cfg.pair_beta} if cfg.pairs else {}))  # as the run records
                changed = resume_differences(read_meta(resume_from), {
                    "settings": settings, "data_fingerprint": report.fingerprint, "data_source": report.source})
                if changed:
                    emit(listeners, Message(resume_warning(name, changed), "warning"))
                step = checkpoint_step(resume_from)
                left = f" of {cfg.max_steps}: {counted(cfg.max_steps - step, 'step')} left" if cfg.max_steps > 0 else ""
                emit(listeners, Message(f"the run would resume {name!r} from {resume_from.name} (step {step}{left})."))
            emit(listeners, Message(self._dry_run_text(cfg, train_ex, eval_ex, report)))
            return report
        # what %lora_eval NAME re-reads as the run's held-out examples (the spec, not the tokenised rows)
        heldout = (data, eval_data, cfg) if eval_ex else None
        from .core.training import StopFlag

        self._stop = StopFlag()  # before the thread starts: a %lora_stop right after the cell must reach the run
        if background:
            thread = threading.Thread(
                target=self._train_guarded, args=(name, train_ex, eval_ex, cfg, target, listeners, report, True, on_done),
                name=f"ft_magics-train-{name}", daemon=True, kwargs={"resume": resume, "heldout": heldout},
            )
            self._training = thread
            if not self._exit_hook:  # the interpreter exiting mid-run aborted the process and saved nothing
                import atexit

                atexit.register(self._stop_at_exit)
                self._exit_hook = True
            thread.start()
            return thread
        return self._train_guarded(name, train_ex, eval_ex, cfg, target, listeners, report, False, on_done,
                                   resume=resume, heldout=heldout)

    def _dry_run_text(self, cfg: TrainConfig, train_ex: list, eval_ex: list, report=None) -> str:
        from .core.events import counted
        from .core.training import planned_steps, preflight

        run_cfg, ckpt_why, notes = preflight(self.handle, cfg, train_ex)  # a batch that cannot fit is refused here too
        steps = planned_steps(run_cfg, len(train_ex))
        per_step = f"{min(run_cfg.batch_size, max(1, len(train_ex)))}" + (f" x grad_accum {cfg.grad_accum}" if cfg.grad_accum > 1 else "")
        span = (f"max_steps {cfg.max_steps}" if cfg.max_steps > 0 else f"{cfg.epochs:g} epoch{'s' if cfg.epochs != 1 else ''}")
        unit = "eval pair" if cfg.pairs else "eval example"
        if not eval_ex:
            evals = "no eval data"
        elif cfg.eval_steps:
            every = "every step" if cfg.eval_steps == 1 else f"every {cfg.eval_steps} steps"
            evals = f"{counted(len(eval_ex), unit)}, {every} and at the end"
        else:
            evals = f"{counted(len(eval_ex), unit)}, at the end"
        ckpt = "on" + (f" ({ckpt_why})" if ckpt_why else "") if run_cfg.gradient_checkpointing else "off"
        if cfg.packing and report is not None:  # the rows are packs of examples: say both, as the run does
            what = f"{counted(report.packed_examples, 'training example')} packed into {counted(len(train_ex), 'row')}"
        else:
            what = counted(len(train_ex), 'training pair' if cfg.pairs else 'training example')
        return ("".join(note + " " for note in notes) + f"Dry run: {what} -> "
                f"{counted(steps, 'optimizer step')} of {per_step} ({span}); "
                f"{evals}; gradient checkpointing {ckpt}. The memory checks passed. Nothing was trained: run the "
                "cell without --dry-run to train.")

    def _train_guarded(self, name, train_ex, eval_ex, cfg, target, listeners, report, background, on_done,
                       resume=False, heldout=None):
        from .core.training import StopFlag, run_training

        if self._stop is None:
            self._stop = StopFlag()
        before = getattr(self.handle.model, "peft_config", {}).get(name)  # to tell whether the run attached its own
        with self._lock:
            try:
                result = run_training(
                    self.handle, name, train_ex, eval_ex, cfg, target, listeners, flag=self._stop,
                    data_report=report, background=background, on_model=self._set_model,
                    resume=resume,
                )
            except BaseException as exc:
                self._forget_unsaved(name, before)
                if background and on_done is not None:
                    on_done(exc)
                if background:
                    return None
                raise
            finally:
                self._stop = None
        if not result.adapter_path:
            self._forget_unsaved(name, before)
        self.runs.append(result)
        if result.adapter_path:
            from .core.adapters import info_from_folder

            self.adapters.add(info_from_folder(name, Path(result.adapter_path), "trained"))
            self.adapters.active = name
            self.heldout.pop(name, None)
            if heldout is not None:
                self.heldout[name] = heldout
        if on_done is not None:
            on_done(result)
        return result

    def _set_model(self, model) -> None:
        self.handle.model = model

    def _forget_unsaved(self, name: str, before) -> None:
        """After a run that saved nothing (it failed, or made no step): take its LoRA layers out of the model
        and ``name`` out of the registry, so memory and the registry agree again. A copy of ``name`` that was
        loaded before the run was replaced by it, and is loaded again from its folder (active if it was).
        ``before``: ``name``'s PEFT config before the run; still there, the run never attached its own (it was
        refused first) and nothing is undone."""
        if self.handle is None or getattr(self.handle.model, "peft_config", {}).get(name) is before:
            return
        prior = next((i for i in self.adapters if i.name == name), None)
        was_active = self.adapters.active == name
        self._drop_from_memory(name)
        if prior is not None and prior.path and Path(prior.path).is_dir():  # the copy the run replaced, back as
            try:                                                            # it was (active too): "as they were"
                self._reload(prior, name, was_active)
            except Exception:  # noqa: BLE001 - it stays on disk and loads by name when used
                self._drop_from_memory(name)

    def _drop_from_memory(self, name: str) -> None:
        """Take adapter ``name`` out of the model's LoRA layers (when it is there) and out of the registry,
        and make the user's choice active again (PEFT leaves another adapter on)."""
        from .core.adapters import activate, drop_adapter

        model = self.handle.model
        if name in getattr(model, "peft_config", {}):
            from peft import PeftModel

            from .core.adapters import strip_lora

            # a plain base holding PEFT's record: a wrap cut short before its PeftModel reached us
            self.handle.model = drop_adapter(model, name) if isinstance(model, PeftModel) else strip_lora(model)
        if name in self.adapters:
            self.adapters.remove(name)
        if self.adapters.active == name:
            self.adapters.active = None
        if hasattr(self.handle.model, "peft_config"):
            activate(self.handle.model, self.adapters.active)
        self.heldout.pop(name, None)

    @property
    def stop_pending(self) -> bool:
        """Whether the run in progress was already asked to stop (it stops at its next step)."""
        return self.training_in_progress and self._stop is not None and self._stop.is_set()

    def stop(self) -> bool:
        """Ask the run in progress to stop at the next step boundary (it saves the adapter)."""
        if self._stop is None:
            return False
        self._stop.set("stopped")
        return True

    def _stop_at_exit(self, timeout: float = 300.0) -> None:
        """At interpreter exit (the end of a script, a kernel shut down): a background run stops at its next step
        and saves, as %lora_stop does. Otherwise the exit tore the daemon thread down mid-step: the process
        aborted ('terminate called without an active exception') and no adapter was written."""
        if not self.training_in_progress:
            return
        import sys

        print(f"ft_magics: the process is exiting; stopping the background run {self._training.name[len('ft_magics-train-'):]!r} "
              "at its next step to save it ...", file=sys.stderr, flush=True)
        self.stop()
        self.wait(timeout)

    def wait(self, timeout: Optional[float] = None):
        if self._training is not None:
            self._training.join(timeout)
        return self.runs[-1] if self.runs else None

    @property
    def training_in_progress(self) -> bool:
        return self._training is not None and self._training.is_alive()

    @property
    def training_in_background(self) -> Optional[str]:
        """The name of the adapter a background run is training now, or None."""
        return self._training.name.removeprefix("ft_magics-train-") if self.training_in_progress else None

    def _check_not_training(self, name: str) -> None:
        """``name`` is the adapter a background run is training: it exists once the run saves it."""
        if name == self.training_in_background:
            raise FtUsageError(f"adapter {name!r} is training in the background; it is saved, and usable, when the "
                               "run ends (%lora_stop ends it early, keeping what it learned).")

    def _check_no_training(self) -> None:
        if self.training_in_progress:
            raise FtUsageError(f"training {self.training_in_background!r} is in progress in the background; stop it "
                               "first (%lora_stop) or wait for it to finish.")

    # ------------------------------------------------------------------ jobs on several processes (core/jobs.py)
    def export_job(self, name: str, job_dir: str | Path, data: Any = None, config: Optional[dict | TrainConfig] = None,
                   *, eval_data: Any = None, processes: int = 1, output_dir: Optional[str | Path] = None,
                   listeners: Optional[list] = None, **overrides) -> Path:
        """Write a standalone job (job.yaml, exported notebook data, accelerate configs) to ``job_dir``
        for ``ft-magics train`` / ``accelerate launch``; returns the job.yaml path."""
        from .core.jobs import export_job

        cfg = self._train_config(config, overrides)
        self._require_model()
        self.prepare_data(data, cfg, eval_data)  # a data mistake is found here, not in N processes later
        return export_job(self.handle, name, job_dir, data, cfg, eval_data=eval_data, namespace=self.namespace,
                          processes=processes, output_dir=output_dir, listeners=listeners)

    def train_processes(self, name: str, data: Any = None, config: Optional[dict | TrainConfig] = None, *,
                        processes: int = 2, launcher: str = "accelerate", eval_data: Any = None,
                        output_dir: Optional[str | Path] = None, listeners: Optional[list] = None,
                        resume: bool = False, **overrides):
        """Train ``name`` on ``processes`` processes (accelerate launch, torchrun or accelerate's notebook
        launcher), streaming progress to ``listeners`` (None: printed as text); the adapter is then loaded here.
        ``resume=True`` continues from NAME's latest complete checkpoint, whether one process or several made it.
        Returns a TrainResult."""
        from .core.jobs import result_from_record, run_job

        from .core.adapters import replacing_note, validate_name
        from .core.events import Message, emit

        listeners = _default_listeners(listeners)
        self._check_no_training()
        self._check_not_merged("train")  # as one process refuses: the run would end unable to load its adapter
        out_root = user_path(output_dir, "output_dir", "'runs'") if output_dir is not None else self.adapters_dir
        name = validate_name(name)
        from .core.checkpoints import checkpoint_root, refuse_if_trained_elsewhere, require_resumable

        refuse_if_trained_elsewhere(checkpoint_root(out_root, name), name)  # before the processes start
        if resume:  # nothing to resume is found here, not after the processes have loaded the model
            cfg = self._train_config(config, overrides)
            require_resumable(checkpoint_root(out_root, name), name, cfg.to_dict())
        else:
            note = replacing_note(out_root / name, name)  # what one process says of a name in use
            if note:
                emit(listeners, Message(note, "warning"))
        job = self.export_job(name, out_root / ".jobs" / name, data, config, eval_data=eval_data, processes=processes,
                              output_dir=out_root.resolve(), listeners=listeners, **overrides)
        result = result_from_record(run_job(job, processes, launcher, listeners, resume=resume))
        self.runs.append(result)
        if result.adapter_path:
            if name in self.adapters:
                self.unload_adapter(name)
            self.load_adapter(result.adapter_path, name)
        return result

    # ------------------------------------------------------------------ adapters
    def use(self, name: Optional[str]) -> float:
        """Make ``name`` the active adapter ('base' or None: no adapter). Returns the swap time in ms."""
        from .core.adapters import BASE, activate

        self._require_model()  # 'use base' with nothing loaded answered "active adapter: base"
        with self._model_busy("switch adapters"):
            if name not in (None, BASE):
                self._require_adapter(name)
            self._check_not_merged("switch adapters", keep=name)
            if not self.adapters:
                self.adapters.active = None
                return 0.0
            ms = activate(self.model, name)
            self.adapters.active = None if name in (None, BASE) else name
            return ms

    def trained_on_another_base(self, name: str) -> Optional[tuple]:
        """``(the base adapter name was trained on, the model loaded now, the fix)``, named so they can be told
        apart, when its run record names another base than the one loaded (e.g. a DPO adapter trained over an
        exported SFT model, used on the plain base), or the same base loaded in other bits (trained on the 16-bit
        base, used on the 4-bit one), else None."""
        from .core.adapters import run_record

        info = self.adapters.require(name) if name in self.adapters else None
        if info is None or not info.path or self.handle is None:
            return None
        base = run_record(info.path).get("base_model") or {}
        source = base.get("source")
        if not source or not self.handle.source:
            return None
        same = Path(str(source)).expanduser().resolve() == Path(str(self.handle.source)).expanduser().resolve()
        bits = base.get("bits")
        if same and bits and self.handle.bits and bits != self.handle.bits:  # the base's weights at another precision:
            return (f"{self.handle.name} in {bits}-bit", f"{self.handle.name} in {self.handle.bits}-bit",
                    f"%qlora_load --bits {bits} to use it as trained")  # its eval loss moved 0.035 -> 0.047
        if same:
            return None
        named = str(base.get("name") or source)  # the names, or where two different folders share one, the paths
        fix = f"%qlora_load it to use {name!r} as trained"
        return (str(source), str(self.handle.source), fix) if named == self.handle.name else (named, self.handle.name, fix)

    def load_adapter(self, path: str | Path, name: Optional[str] = None) -> str:
        """Load a PEFT LoRA adapter folder (made here or by any other tool) under ``name``."""
        from .core.adapters import (check_finite, check_fits, info_from_folder, load_folder, name_from_folder,
                                    read_adapter_folder, unfit_error, validate_name)

        path = user_path(path, "the adapter's folder", "'adapters/support'")
        if not path.exists() and len(path.parts) == 1 and (self.adapters_dir / path).is_dir():
            path = self.adapters_dir / path  # a name 'list' shows on disk: its folder in the adapters folder
        name = validate_name(name_from_folder(path) if name is None else name, self.handle.model if self.handle is not None else None)
        config = read_adapter_folder(path)
        check_finite(path)
        with self._model_busy("load an adapter"):
            model = self.model
            if name in self.adapters:
                raise FtUsageError(f"an adapter named {name!r} is already loaded; pass --name to pick another.")
            own = self._adapter_folder(name)
            if own is not None and own.resolve() != path.resolve():
                raise FtUsageError(f"{own} holds another adapter named {name!r}; load {path} under another name "
                                   "(--name).")
            self._check_not_merged("load another adapter")
            check_fits(model, path, config, self.handle.name)
            if config.get("use_dora"):
                from .core.training import check_dora_supported

                check_dora_supported(self.handle.bits, self.handle.device, name)
            try:
                self.handle.model = load_folder(model, path, name)
            except (KeyError, ValueError, RuntimeError) as exc:
                raise unfit_error(path, self.handle.name, exc) from None
            self.adapters.add(info_from_folder(name, path, "loaded"))
            from .core.adapters import activate

            activate(self.handle.model, name)
            self.adapters.active = name
        return name

    def unload_adapter(self, name: str) -> None:
        """Drop adapter ``name`` from memory (its folder stays on disk)."""
        adapter_name_text(name)
        if name not in self.adapters and self._adapter_folder(name) is not None:
            raise FtUsageError(f"adapter {name!r} is not loaded (its folder {self.adapters_dir / name} is on "
                               "disk), so there is nothing to unload.")
        self._unload(name, "unload an adapter", keep_last_copy=True)

    def _unload(self, name: str, doing: str, keep_last_copy: bool) -> None:
        """Drop loaded adapter ``name`` from memory; with ``keep_last_copy``, refuse where it has no folder to be
        read again from (``unload``: the folder stays; ``delete`` drops it on purpose)."""
        with self._model_busy(doing):
            self._check_not_training(name)
            info = self.adapters.require(name, self.adapters_on_disk(), self.adapters_dir)
            self._check_not_merged(doing)
            gone = self.only_in_memory(info) if keep_last_copy else None
            if gone:
                raise FtUsageError(f"adapter {name!r} is only in memory now: {gone}, so unloading it would lose it. "
                                   f"Keep it with %lora_adapters export {name} DIR (then unload it), or drop it for "
                                   f"good with %lora_adapters delete {name}.")
            self._drop_from_memory(info.name)

    @staticmethod
    def only_in_memory(info) -> Optional[str]:
        """Why loaded adapter ``info`` has no copy on disk (its folder deleted or moved behind the session's back),
        or None where its folder is there to read it again from."""
        if not info.path:
            return "it was never saved to a folder"
        if not (Path(info.path) / "adapter_config.json").is_file():
            return f"its folder {info.path} is gone (deleted or moved outside ft_magics)"
        return None

    def deletable_folder(self, name: str) -> Optional[Path]:
        """The folder ``delete_adapter(name)`` removes: the adapter's own folder ``adapters/NAME``, and no other.
        An adapter loaded from elsewhere, or from another adapter's folder under a new name, keeps its folder."""
        adapter_name_text(name)
        if name not in self.adapters:
            folder = self._adapter_folder(name)
            return folder.resolve() if folder is not None else None
        info = self.adapters.require(name)
        if not info.path:
            return None
        path = Path(info.path).resolve()
        return path if path == (self.adapters_dir / name).resolve() and path.is_dir() else None

    def delete_adapter(self, name: str) -> Optional[str]:
        """Unload adapter ``name`` and delete its folder (``deletable_folder``) and what is left of its run's
        checkpoints beside it (a stopped run keeps them for --resume). Returns the path removed."""
        folder = self.deletable_folder(name)
        if folder is not None:  # another loaded adapter read from this folder would lose its files under it
            others = [a.name for a in self.adapters if a.name != name and a.path
                      and Path(a.path).resolve() == folder.resolve()]
            if others:
                raise FtUsageError(f"the folder of {name!r} ({folder}) is also where the loaded adapter "
                                   f"{others[0]!r} was read from; unload {others[0]!r} first "
                                   f"(%lora_adapters unload {others[0]}), or export it to a folder of its own.")
        if folder is not None:  # before anything goes: a read-only folder left it half-deleted, or unloaded
            from .core.atomic import writable_dir

            writable_dir(folder.parent, "", doing=f"delete {name!r}")
        if name not in self.adapters:
            self._check_not_training(name)
            if folder is None and name in self.resumable_runs():  # a run cut short: its checkpoints are all of it
                from .core.checkpoints import checkpoint_root, discard

                root = checkpoint_root(self.adapters_dir, name)
                with self._model_busy("delete an adapter"):
                    discard(root)
                return str(root)
            if folder is None:  # "no adapter named ...", naming the loaded ones and those in the adapters folder
                self.adapters.require(name, self.adapters_on_disk(), self.adapters_dir)
            with self._model_busy("delete an adapter"):  # on disk only (after a restart): nothing to unload
                return self._remove_folder(folder, name)
        self._unload(name, "delete an adapter", keep_last_copy=False)
        return self._remove_folder(folder, name) if folder is not None else None

    def rename_adapter(self, name: str, new: str) -> Optional[str]:
        """Give adapter ``name`` the name ``new``: its own folder ``adapters/NAME`` (renamed in one step, its
        record rewritten atomically), its stopped run's checkpoints, and in memory the loaded adapter (read again
        from the renamed folder, active if it was). An adapter loaded from elsewhere is renamed in memory only.
        Returns the new folder, or None. Anything that fails midway is put back as it was."""
        import os

        from .core.adapters import run_record, validate_name
        from .core.atomic import atomic_write_json
        from .core.checkpoints import checkpoint_root

        adapter_name_text(name)
        new = validate_name(new, self.handle.model if self.handle is not None else None)
        for n in (name, new):
            self._check_not_training(n)
        if new == name:
            raise FtUsageError(f"adapter {name!r} already has that name.")
        with self._model_busy("rename an adapter"):
            loaded = name in self.adapters
            folder = self.deletable_folder(name)
            if not loaded and folder is None:  # "no adapter named ...", naming the loaded ones and those on disk
                self._require(name, delete_hint=True)
            gone = self.only_in_memory(self.adapters.require(name)) if loaded else None
            if gone:  # a rename reads the adapter again under its new name: with nothing to read, it was lost
                raise FtUsageError(f"cannot rename {name!r}: {gone}, and a rename reads it again under the new name. "
                                   f"Write it out first with %lora_adapters export {name} DIR, then %lora_adapters "
                                   f"load DIR --name {new}.")
            target = self.adapters_dir / new
            if folder is not None:  # a read-only adapters folder: said before anything moves
                from .core.atomic import writable_dir

                writable_dir(folder.parent, "", doing=f"rename {name!r}")
            if new in self.adapters or os.path.lexists(target):
                taken = "an adapter loaded under that name" if new in self.adapters else f"{target} exists"
                raise FtUsageError(f"cannot rename {name!r} to {new!r}: {taken}. Pick another name, or delete "
                                   f"that one first (%lora_adapters delete {new}).")
            self._check_not_merged("rename an adapter")
            info = self.adapters.require(name) if loaded else None
            was_active = self.adapters.active == name
            ckpts, new_ckpts = checkpoint_root(self.adapters_dir, name), checkpoint_root(self.adapters_dir, new)
            if os.path.lexists(new_ckpts):  # a cut-short run of that name: --resume would continue it, not this one
                raise FtUsageError(f"cannot rename {name!r} to {new!r}: a cut-short run of {new!r} left checkpoints in "
                                   f"{new_ckpts} (%%lora_train {new} --resume continues it). Pick another name, or "
                                   "remove that folder if the run is not wanted.")
            done: list = []  # the steps taken, undone in reverse if a later one fails
            try:
                if folder is not None:
                    os.rename(folder, target)
                    done.append(lambda: os.rename(target, folder))
                    record = run_record(target)
                    if record:
                        atomic_write_json(target / "ft_run.json", {**record, "name": new})
                        done.append(lambda: atomic_write_json(target / "ft_run.json", record))  # before it moves back
                    if ckpts.is_dir():
                        os.rename(ckpts, new_ckpts)
                        done.append(lambda: os.rename(new_ckpts, ckpts))
                        from .core.checkpoints import rename_checkpoints

                        done += rename_checkpoints(new_ckpts, name, new)
                if loaded:
                    self._drop_from_memory(name)
                    done.insert(0, lambda: self._reload(info, name, was_active))  # last: once its folder is back
                    self._reload(info, new, was_active, path=target if folder is not None else None)
            except BaseException:
                for undo in reversed(done):
                    try:
                        undo()
                    except Exception:  # keep undoing the rest; the first error is the one to report
                        pass
                raise
            if name in self.heldout:
                self.heldout[new] = self.heldout.pop(name)
            if self._router is not None and folder is not None:
                self._router.rename(name, new, folder)
            return str(target.resolve()) if folder is not None else None

    def _reload(self, info, name: str, active: bool, path: Optional[Path] = None) -> None:
        """Load adapter ``info`` (from ``path``, or where it was read from) under ``name``, keeping what the registry
        knew of it (trained here or loaded), and make it active again if it was."""
        from .core.adapters import activate, info_from_folder, load_folder

        path = Path(path or info.path)
        self.handle.model = load_folder(self.model, path, name)
        again = info_from_folder(name, path, info.origin)
        again.extra = {**info.extra, **again.extra}
        self.adapters.add(again)
        if active:
            self.adapters.active = name
        activate(self.handle.model, self.adapters.active)

    @staticmethod
    def _remove_folder(folder: Path, name: str) -> str:
        """Remove adapter folder ``folder`` in one step (renamed aside, then emptied: a file that cannot be removed
        never leaves the adapter half there), and its run's checkpoints."""
        from .core.atomic import remove_dir
        from .core.checkpoints import checkpoint_root, discard

        remove_dir(folder, name)  # (under the name atomic_dir clears as stale the next time NAME is written)
        discard(checkpoint_root(folder.parent, name))  # else 'list' offered to resume a run whose adapter is gone
        return str(folder)

    # ------------------------------------------------------------------ inference
    def generate(self, prompt: str, adapter: Optional[str] = None, *, system: Optional[str] = None,
                 on_text: Optional[Callable[[str], None]] = None, history: Sequence[dict] = (),
                 sampling=None, raw: Optional[bool] = None, **settings):
        """Answer ``prompt`` with ``adapter`` (default: the active one; 'base' for none); ``history``: the
        earlier messages of a conversation (see :meth:`chat`). How it is decoded: ``sampling`` (a
        core.inference.Sampling) and/or its fields as keywords: ``max_new_tokens`` (128), ``temperature``
        (0: greedy), ``top_p``, ``top_k``, ``repetition_penalty``, ``seed``. ``raw``: continue the text as
        typed (no chat template, no turns); None: so where the tokenizer has no chat template and the model
        answering is the base or an adapter trained on plain text (a GPT-2 user's continuation), else not."""
        from .core.adapters import BASE, activate
        from .core.inference import Sampling, generate

        sampling = Sampling.of(sampling, **settings)  # a bad setting is refused before the model is touched
        if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
            raise FtUsageError(f"the prompt and the system prompt are text (got {type(prompt).__name__}"
                               + (f" and {type(system).__name__}" if system is not None else "") + ").")
        _check_history(history)
        with self._model_busy("generate"):
            previous = self.adapters.active
            chosen = previous if adapter is None else adapter
            if chosen not in (None, BASE):
                self._require_adapter(chosen)  # a per-call adapter does not change the selection
            self._check_not_merged("generate with another adapter", keep=chosen)
            model = self.model
            if self._merged is not None:  # the LoRA layers are out of the way: the base model is the merged one,
                model = model.get_base_model()  # and its generate skips PeftModel's per-call wrapping
            if self.adapters and self._merged is None:
                activate(model, chosen)
            if raw is None:
                raw = (not getattr(self.tokenizer, "chat_template", None) and not system and not history
                       and self._learned_plain_text(chosen))
            try:
                return generate(model, self.tokenizer, prompt, system=system, sampling=sampling, on_text=on_text,
                                adapter_label=chosen or BASE, history=history, raw=bool(raw))
            finally:
                if self.adapters and chosen != previous and self._merged is None:
                    activate(model, previous)

    def _learned_plain_text(self, name: Optional[str]) -> bool:
        """Whether ``name`` (None / 'base': the base model) continues text rather than answers turns: the base,
        or an adapter whose run trained on the text format."""
        from .core.adapters import BASE, run_record

        if name in (None, BASE):
            return True
        info = next((i for i in self.adapters if i.name == name), None)
        data = run_record(info.path).get("data") if info is not None and info.path else None
        return isinstance(data, dict) and str(data.get("format", "")).split(" (")[0] == "text"

    def chat(self, message: str, adapter: Optional[str] = None, *, system: Optional[str] = None,
             new: bool = False, on_text: Optional[Callable[[str], None]] = None, sampling=None, **settings):
        """Answer ``message`` as the next turn of this session's conversation (``new``: start another;
        ``system``: its system prompt from now on). Any adapter may answer any turn. Decoding as in
        :meth:`generate`, but ``max_new_tokens`` defaults to 256. Returns ``(Generation, left_out)``:
        ``left_out`` older exchanges did not fit the model's context."""
        from .core.chat import Conversation
        from .core.inference import Sampling

        sampling = Sampling.of(sampling or Sampling(max_new_tokens=256), **settings)
        if message is not None and not isinstance(message, str):
            raise FtUsageError(f"the message is text (got {type(message).__name__}).")
        if not message or not message.strip():
            raise FtUsageError("the message is empty: write it after the flags or in the cell body.")
        # the turn is tried on a copy: a refused turn (unknown adapter, too long) leaves the conversation,
        # its system prompt included, as it was; --new forgets the old one only once the new one has begun
        old = None if (new or self.conversation is None) else self.conversation
        conv = Conversation(system=old.system if old else None, turns=list(old.turns) if old else [])
        if system is not None:
            conv.system = system or None
        history, left_out = conv.fitting_history(self.model, self.tokenizer, message,
                                                 max(1, min(sampling.max_new_tokens, 64)))
        gen = self.generate(message, adapter, system=conv.system, sampling=sampling, on_text=on_text,
                            history=history, raw=False)  # a conversation is turns, from its first one
        conv.add(message, gen.text, gen.adapter, gen.stopped)
        self.conversation = conv
        return gen, left_out

    def adapter_card(self, name: str) -> str:
        """What adapter ``name`` (loaded, or a folder in the adapters folder) is and how it was trained."""
        from .core.adapters import adapter_card

        adapter_name_text(name)
        if name in self.adapters:
            info = self.adapters.require(name)
            gone = self.only_in_memory(info)
            if gone:
                raise FtUsageError(f"adapter {name!r} is loaded and answers, but {gone}, so how it was trained cannot "
                                   f"be read. %lora_adapters export {name} DIR writes its weights out.")
            state = "loaded" + (", active" if self.adapters.active == name else "")
            return adapter_card(name, Path(info.path), state)
        folder = self._adapter_folder(name)
        if folder is None:  # not loaded and not on disk: the error names the ones that are
            self._check_not_training(name)
            self._require(name, delete_hint=True)
        return adapter_card(name, folder, "on disk, not loaded")

    def _adapter_folder(self, name: str) -> Optional[Path]:
        """``adapters_dir / name`` when that folder holds an adapter (its adapter_config.json), else None."""
        from .core.adapters import validate_name

        try:
            folder = self.adapters_dir / validate_name(name)
        except FtUsageError:
            return None  # not a valid name: the registry's "no adapter named" error says more
        return folder if (folder / "adapter_config.json").is_file() else None

    def _recorded_heldout(self, name: str) -> Optional[tuple]:
        """``(data, eval_data, TrainConfig, fingerprint, description)`` of adapter ``name``'s run as its ft_run.json
        records them, for ``%lora_eval NAME`` in a later kernel (this session's own runs are in ``self.heldout``);
        None where the record has no held-out examples or no data a later kernel can read again (a variable)."""
        record = self._run_record(name)
        data = record.get("data") if isinstance(record.get("data"), dict) else {}
        spec, settings = data.get("spec"), record.get("settings")
        if not (isinstance(spec, dict) and spec.get("data") and isinstance(settings, dict) and data.get("eval_rows")):
            return None
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        try:  # the settings as recorded, less what the run noted beside them (why checkpointing was on or off)
            cfg = TrainConfig.from_dict({k: v for k, v in settings.items() if k in fields})
        except FtUsageError:  # a record of another version's settings: ask for --data
            return None
        for key in ("data", "eval"):
            where = spec.get(key)
            if where and not str(where).startswith("demo:") and not any(c in where for c in "*?[") \
                    and not Path(where).exists():
                raise FtUsageError(f"{name!r}'s run read its {'eval ' if key == 'eval' else ''}data from {where}, "
                                   "which is gone, so its held-out examples cannot be rebuilt. Give held-out "
                                   "examples with --data FILE.")
        return spec["data"], spec.get("eval"), cfg, data.get("fingerprint"), spec["data"]

    def _run_record(self, name: str) -> dict:
        """Adapter ``name``'s ft_run.json (loaded: from the folder it was read from; else its folder in the adapters
        folder), or {}."""
        from .core.adapters import run_record

        info = next((i for i in self.adapters if i.name == name), None)
        folder = Path(info.path) if info is not None and info.path else self._adapter_folder(name)
        return run_record(folder) if folder is not None else {}

    def unknown_heldout_why(self, name: str) -> str:
        """Why adapter ``name``'s run held out rows that ``%lora_eval NAME`` cannot rebuild ('' where it held out
        none, or they can be rebuilt): its data was a notebook variable, which a later kernel does not hold as the
        run read it (scoring the variable as it is now could score rows the run trained on)."""
        from .core.events import counted

        if name in self.heldout or not isinstance(name, str):
            return ""
        data = self._run_record(name).get("data")
        if not (isinstance(data, dict) and data.get("eval_rows") and not data.get("spec")):
            return ""
        return (f"its run held out {counted(data['eval_rows'], 'row')} of {data.get('source') or 'its data'}, which "
                "this kernel cannot read again as the run read it (a notebook variable), so they cannot be told from "
                "the rows it trained on")

    def _reload_if_rewritten(self, name: str) -> bool:
        """Read adapter ``name`` again from its folder when the folder's files changed since this session loaded
        it (another notebook or process retrained it there): the session kept answering with the old weights while
        %lora_adapters info showed the new run. Not while this session trains it or has an adapter merged; a folder
        that is gone, or that no longer fits, leaves the loaded copy as it is."""
        from .core.adapters import check_fits, folder_stamp, read_adapter_folder

        info = self.adapters.require(name)
        stamp = (info.extra or {}).get("stamp")
        folder = Path(info.path) if info.path else None
        if not stamp or folder is None or self._merged is not None or self.training_in_background == name:
            return False
        try:
            if folder_stamp(folder) == stamp or not (folder / "adapter_config.json").is_file():
                return False
            check_fits(self.model, folder, read_adapter_folder(folder, parse_weights=False), self.handle.name)
        except (OSError, FtUsageError):
            return False
        active = self.adapters.active
        self._drop_from_memory(name)
        self.load_adapter(folder, name)
        if active != name:  # load_adapter made it active: the user's selection stays
            from .core.adapters import activate

            activate(self.model, active)
            self.adapters.active = active
        print(f"Note: {folder} changed on disk since this session loaded {name!r} (retrained elsewhere?): "
              "reloaded it from there.")
        return True

    def _load_on_demand(self, name: str) -> None:
        """Load adapter ``name`` from the adapters folder if it is there (per-call --adapter NAME)."""
        folder = self._adapter_folder(name)
        if folder is not None:
            self.load_adapter(folder, name)

    def _require_adapter(self, name: str):
        """The registry's entry for ``name``, loading it first from the adapters folder when it is only there
        (trained before a kernel restart, or by another notebook). The active adapter stays as it was."""
        from .core.adapters import activate

        adapter_name_text(name)
        if name in self.adapters:
            self._reload_if_rewritten(name)
        if name not in self.adapters:
            self._check_not_training(name)
            if self._adapter_folder(name) is not None:  # on disk: loading it needs the base as it was
                self._check_not_merged(f"load adapter {name!r}")
        if name not in self.adapters and self._merged is None:
            previous = self.adapters.active
            self._load_on_demand(name)
            if name in self.adapters and previous != name:  # load_adapter made it active: undo that
                activate(self.model, previous)
                self.adapters.active = previous
        # unknown: the error names the loaded adapters and those in the adapters folder (they load by name)
        return self._require(name, () if name in self.adapters else None)

    def _require(self, name: str, on_disk=None, delete_hint: bool = False):
        """``self.adapters.require``: an unknown name's error names the loaded adapters and those in the adapters
        folder, and where ``name`` is a run cut short before it saved an adapter (``list`` names those), how to
        continue it, or with ``delete_hint`` how to drop it."""
        try:
            return self.adapters.require(name, self.adapters_on_disk() if on_disk is None else on_disk,
                                         self.adapters_dir)
        except FtUsageError as exc:
            step = self.resumable_runs().get(name)
            if step is None:
                raise
            raise FtUsageError(f"{exc} Its run was cut short before it saved an adapter; its checkpoint at step {step} "
                               f"continues with %%lora_train {name} --data ... --resume (the same data and "
                               "settings)" + (f", and %lora_adapters delete {name} drops it." if delete_hint else ".")
                               ) from None

    def resumable_runs(self) -> dict:
        """``{name: step}`` of runs in the adapters folder that were cut short (:meth:`unfinished_runs`)."""
        return self.unfinished_runs()[1]

    def unfinished_runs(self) -> tuple:
        """``({name: pid}, {name: step})`` of the runs whose checkpoints are in the adapters folder: those another
        process on this machine is training now, and those that were cut short (a killed kernel, a stop, an
        error) with no saved adapter of their own, at their newest complete checkpoint's step, from which
        ``%%lora_train NAME --data ... --resume`` continues. Each run's mark is read once."""
        from .core.checkpoints import CHECKPOINTS_DIRNAME, checkpoint_step, latest_valid, running_elsewhere

        root = self.adapters_dir / CHECKPOINTS_DIRNAME
        elsewhere: dict = {}
        cut_short: dict = {}
        for run in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
            pid = running_elsewhere(run)
            if pid is not None:  # not cut short: another notebook is training it now
                elsewhere[run.name] = pid
            elif run.name not in self.adapters and self._adapter_folder(run.name) is None:
                latest = latest_valid(run)  # (an adapter that is there, as a stopped run saves one, is listed already)
                if latest is not None:
                    cut_short[run.name] = checkpoint_step(latest)
        return elsewhere, cut_short

    def adapters_on_disk(self, fitting: bool = False) -> list:
        """Names of adapter folders in the adapters folder that this session has not loaded; with ``fitting``
        only those whose layers fit the loaded model (checked from their files, nothing is loaded)."""
        root = self.adapters_dir
        if not root.is_dir():
            return []
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and p.name not in self.adapters and self._adapter_folder(p.name) is not None)
        if fitting and self.handle is not None:
            names = [n for n in names if self.misfit(n) is None]
        return names

    def misfit(self, name: str) -> Optional[str]:
        """Why adapter ``name`` in the adapters folder cannot go on the loaded model (None: it can)."""
        from .core.adapters import check_fits, read_adapter_folder

        folder = self._adapter_folder(name)
        if folder is None:
            return None
        try:
            config = read_adapter_folder(folder, parse_weights=False)  # (unreadable with no model loaded too)
            if self.handle is not None:
                check_fits(self.model, folder, config, self.handle.name)
        except FtUsageError as exc:
            return str(exc)
        return None

    def misnamed_on_disk(self) -> dict:
        """``{folder name: the name it loads under}`` for adapter folders in the adapters folder whose names cannot
        be adapter names (``a2 copy``: a file manager's copy), which are not used by name."""
        from .core.adapters import name_from_folder

        root = self.adapters_dir
        if not root.is_dir():
            return {}
        return {p.name: name_from_folder(p) for p in sorted(root.iterdir())
                if p.is_dir() and not p.name.startswith(".") and (p / "adapter_config.json").is_file()
                and self._adapter_folder(p.name) is None}

    # ------------------------------------------------------------------ merge, combine, export
    def _check_not_merged(self, what: str, keep: Optional[str] = None) -> None:
        m = self._merged
        if m is not None and keep != m.name:
            raise FtUsageError(
                f"cannot {what} while adapter {m.name!r} is merged into the base weights: run "
                "%lora_adapters unmerge first (Session.unmerge_adapter()), which restores the base exactly."
            )

    def merge_adapter(self, name: str) -> float:
        """Fold adapter ``name`` into the base weights for full-speed inference; returns the time in ms.
        Refused on a 4/8-bit base (see core.adapters.merge); undo exactly with :meth:`unmerge_adapter`."""
        from .core.adapters import activate, merge

        with self._model_busy("merge an adapter"):
            self._require_adapter(name)
            if self._merged is not None:
                if self._merged.name == name:
                    raise FtUsageError(f"adapter {name!r} is already merged.")
                self._check_not_merged("merge another adapter")
            activate(self.model, name)
            self._merged = merge(self.model, name)
            self.adapters.active = name
            return self._merged.ms

    def unmerge_adapter(self) -> str:
        """Restore the exact base weights saved at merge time; the adapter stays loaded and active."""
        from .core.adapters import activate, unmerge

        with self._model_busy("unmerge"):
            if self._merged is None:
                raise FtUsageError("no adapter is merged; %lora_adapters merge NAME folds one in.")
            state, self._merged = self._merged, None
            unmerge(state)
            activate(self.model, state.name)
            self.adapters.active = state.name
            return state.name

    @property
    def merged_adapter(self) -> Optional[str]:
        return self._merged.name if self._merged is not None else None

    def combine_adapters(self, weights: dict | str, name: str, method: str = "linear",
                         progress: Optional[Callable[[str], None]] = None) -> str:
        """New adapter ``name`` = weighted combination (``{"a": 0.7, "b": 0.3}`` or ``"a:0.7,b:0.3"``) of
        loaded adapters, by PEFT's add_weighted_adapter; saved to the adapters folder and made active.
        ``progress``: told before a combination that takes a while (svd: one decomposition per layer)."""
        from .core.adapters import (activate, check_finite_adapter, combine, info_from_folder, parse_weights,
                                    save_peft_adapter, validate_name)
        from .core.training import versions

        weights = parse_weights(weights)
        name = validate_name(name, self.handle.model if self.handle is not None else None)
        with self._model_busy("combine adapters"):
            self._check_not_merged("combine adapters")
            if name in self.adapters:
                raise FtUsageError(f"an adapter named {name!r} is already loaded; pick another --name.")
            target = self.adapters_dir / name
            if target.exists():
                raise FtUsageError(f"{target} already exists on disk; pick another --name or delete it first.")
            from .core.atomic import writable_dir

            writable_dir(self.adapters_dir, f"the combined adapter {name!r}")  # before the work, in a clear message
            loaded_here = [a for a in weights if a not in self.adapters]  # from the adapters folder, for this
            try:
                for a in weights:
                    self._require_adapter(a)
                if progress is not None and "svd" in method:
                    first = next(iter(weights))
                    layers = sum(1 for m in self.model.modules() if first in (getattr(m, "lora_A", None) or {}))
                    progress(f"combining by SVD: one decomposition of each adapted layer's update ({layers} layers); "
                             "on a CPU this takes seconds to minutes ...")
                combine(self.model, dict(weights), name, method)
                try:
                    check_finite_adapter(self.model, name, self.adapters.active)
                except FtUsageError:
                    self.model.delete_adapter(name)
                    raise
            except BaseException:  # a refused combination leaves memory as it found it
                for a in loaded_here:
                    if a in self.adapters:
                        self._drop_from_memory(a)
                raise
            record = {"name": name, "status": "combined", "combined_from": dict(weights), "method": method,
                      "base_model": {"name": self.handle.name, "source": self.handle.source, "bits": self.handle.bits},
                      "versions": versions()}
            try:
                save_peft_adapter(self.model, name, target, record)
            except BaseException:
                self.model.delete_adapter(name)
                raise
            self.adapters.add(info_from_folder(name, target, "combined"))
            activate(self.model, name)
            self.adapters.active = name
            return name

    def export_adapter(self, name: str, directory: str | Path, merged: bool = False, dtype: str = "auto",
                       overwrite: bool = False) -> Path:
        """Write adapter ``name`` to ``directory``: PEFT format, or with ``merged`` a standalone model
        (base + adapter folded in, safetensors + tokenizer) that plain transformers loads, in ``dtype``
        (auto = the session's compute dtype; fp32, bf16 or fp16). On a 4/8-bit base the merged model is
        built from the base's source in full precision, never from the quantised weights. An earlier export of
        ``name`` there is replaced; another adapter's export only with ``overwrite``, and never a folder another
        loaded adapter was read from."""
        import tempfile

        from .core.adapters import export_merged, read_adapter_folder, save_peft_adapter
        from .core.atomic import writable_dir

        with self._model_busy("export an adapter"):
            info = self._require_adapter(name)  # also one only in the adapters folder (after a restart)
        target = user_path(directory, "the export folder", "'exports/support'")
        writable_dir(target.parent, "the export")
        if target.exists() and not target.is_dir():
            raise FtUsageError(f"{target} is a file, not a folder: an export writes a folder; choose a new or empty "
                               "folder's path.")
        if target.exists() and any(target.iterdir()) and not _written_by_export(target):
            kept = "a trained adapter" if (target / "ft_run.json").exists() else "other files"
            raise FtUsageError(
                f"{target} already exists and was not written by an export (it holds {kept}); choose a new or "
                "empty folder (an export replaces the whole folder)."
            )
        readers = [a.name for a in self.adapters if a.name != name and a.path and target.exists()
                   and Path(a.path).resolve() == target.resolve()]
        if readers:  # its weights stay in memory, but its card and any reload would read the other adapter's
            raise FtUsageError(
                f"{target} is where adapter {readers[0]!r} was loaded from in this session: exporting {name!r} there "
                f"would put another adapter under {readers[0]!r}'s folder. Choose another folder, or unload it first "
                f"(%lora_adapters unload {readers[0]}).")
        held = _exported_name(target) if target.exists() else None
        if held is not None and held != name and not overwrite:
            raise FtUsageError(
                f"{target} holds the export of another adapter ({held!r}); exporting {name!r} there replaces it. "
                "Choose another folder, or add --overwrite (overwrite=True) to replace it.")
        with self._model_busy("export an adapter"):
            if not merged:  # the run record goes along (a loaded export showed steps=- loss=-), marked as exported
                from .core.adapters import run_record

                record = {**(run_record(info.path) if info.path else {}), "name": name, "exported_from": info.path}
                return save_peft_adapter(self.model, name, target, record=record)
            source_dir = Path(info.path) if info.path else None
            try:
                if source_dir is not None:
                    read_adapter_folder(source_dir)
            except FtUsageError:
                source_dir = None
            with tempfile.TemporaryDirectory(prefix="ft_magics-export-") as tmp:
                if source_dir is None:  # only in memory: write it out first
                    source_dir = save_peft_adapter(self.model, name, Path(tmp) / name)
                import torch

                dtypes = {"auto": self.handle.dtype, "fp32": torch.float32, "bf16": torch.bfloat16,
                          "fp16": torch.float16}
                if dtype not in dtypes:
                    from .errors import unknown

                    raise unknown("dtype", dtype, dtypes)
                dtype = dtypes[dtype]
                return export_merged(self.handle.source, source_dir, self.tokenizer, target, dtype=dtype, name=name,
                                     base_label=self.handle.name)

    # ------------------------------------------------------------------ compare, evaluate, serve
    def compare(self, prompts: list | str, adapters: Optional[list] = None, *, max_new_tokens: int = 64,
                system: Optional[str] = None, repetition_penalty: float = 1.0):
        """Greedy answers of the base and each adapter to every prompt; a core.inference.Comparison."""
        from .core.adapters import BASE, activate
        from .core.inference import compare, split_prompts

        if isinstance(prompts, str):
            prompts = split_prompts(prompts)
        elif not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise FtUsageError("compare needs at least one prompt, each a non-empty string.")
        if isinstance(adapters, str):  # one name, or "a,b" as the magic's flag takes them (not its letters)
            adapters = [a.strip() for a in adapters.split(",") if a.strip()]
        # each adapter once, in the order given (a repeated name made two identical columns)
        named = adapters if adapters is not None else self.adapters.names()
        columns = [BASE] + [a for a in dict.fromkeys(named) if a != BASE]
        with self._model_busy("compare adapters"):
            self._check_not_merged("compare adapters")
            for a in columns[1:]:
                self._require_adapter(a)
            previous = self.adapters.active
            model = self.model
            try:
                return compare(model, self.tokenizer, prompts, columns,
                               switch=lambda n: activate(model, n) if self.adapters else 0.0,
                               max_new_tokens=max_new_tokens, system=system, repetition_penalty=repetition_penalty)
            finally:
                if self.adapters:
                    activate(self.model, previous)

    def evaluate(self, name: Optional[str], data: Any = None, *, general: bool = True, batch_size: int = 8,
                 max_seq_len: Optional[int] = None, answers: int = 0, column_map: Optional[str] = None,
                 progress: Optional[Callable[[str], None]] = None):
        """Loss and perplexity of the base and adapter ``name`` on ``data`` and (forgetting check) on the
        bundled general-text sample; a core.evaluation.EvalReport. ``answers`` > 0: also the greedy answers of
        each to that many held-out questions, scored against the reference answers (exact, first line).
        ``progress``: called with a line of progress (batches done of all, what is being scored) once the
        evaluation has run a few seconds, then every few seconds (``%lora_eval`` prints them)."""
        from .core.adapters import BASE, activate
        from .core.events import counted
        from .core.evaluation import (EvalProgress, EvalReport, answer_scores, batches, data_objective, eval_config,
                                      general_examples, heldout_examples, loss_and_perplexity, pair_scores)
        from .core.preference import PairExample
        from .core.training import training_layout

        self._require_model()
        own = self.heldout.get(name) if data is None else None  # the run's own held-out examples
        recorded = None  # (the run's data fingerprint, its data) where they come from its record
        if own is None and data is None and isinstance(name, str) and name != BASE:
            recorded = self._recorded_heldout(name)
            if recorded is not None:
                own, recorded = recorded[:3], recorded[3:]
        if data is None and own is None and not general:
            why = self.unknown_heldout_why(name)
            raise FtUsageError(f"--data is required: {why}; give held-out examples, e.g. --data FILE." if why else
                               "--data is required: held-out examples, e.g. --data demo:support-eval.")
        if column_map and data is None:
            raise FtUsageError("--map renames the columns of --data: give --data FILE too.")
        from .core.inference import as_number

        batch_size, answers = as_number("batch_size", batch_size, True, False), as_number("answers", answers, True, False)
        max_seq_len = as_number("max_seq_len", max_seq_len, True, True)
        if int(batch_size) < 1:
            raise FtUsageError(f"--batch-size must be at least 1 (got {batch_size}).")
        if max_seq_len is not None and int(max_seq_len) < 16:  # (training's max_seq_len says the same by its name)
            raise FtUsageError(f"--max-seq-len must be at least 16 tokens (got {max_seq_len}).")
        from .core.inference import context_limit

        window = context_limit(self.model)
        if max_seq_len is None:  # 512, or the context of a model that reads fewer
            max_seq_len = min(512, window) if window else 512
        if window and int(max_seq_len) > window:  # positions past the context were never learned: no measure
            raise FtUsageError(f"--max-seq-len {max_seq_len} is beyond the model's context ({window:,} tokens, its "
                               f"max_position_embeddings): a loss on positions it never learned means nothing. Use "
                               f"--max-seq-len {window} or less; longer rows are scored cut to it.")
        if int(answers) < 0:
            raise FtUsageError(f"--answers must be >= 0 questions (got {answers}); 0 scores no answers.")
        cases = []
        if answers:
            from .core.data import answer_cases, split_records

            if data is None and own is None:
                raise FtUsageError("--answers needs held-out questions: give --data FILE (or evaluate an adapter "
                                   "trained in this session with --eval or eval_fraction).")
            src, eval_src, cfg = (data, None, eval_config(max_seq_len, data_objective(data, self.namespace, column_map),
                                                          column_map)) if data is not None else own
            *_, train_records, eval_records, _ = split_records(src, cfg, self.namespace, eval_src)
            held = eval_records if (eval_records or data is None) else train_records  # --data: all of it
            cases = answer_cases(held)[:int(answers)]
            if not cases:
                after_tool = sum(1 for r in held if len(r.messages or []) > 1 and r.messages[-1].get("role") == "assistant"
                                 and r.messages[-2].get("role") == "tool")
                raise FtUsageError("--answers scores answers to questions, and none of the held-out examples is a "
                                   "question with an answer (prompt/completion or a chat ending with the assistant"
                                   " answering a user message)" + (
                                       f"; {counted(after_tool, 'example')} {'ends' if after_tool == 1 else 'end'} with an answer to a tool result, which "
                                       "--answers does not score (their eval loss, without --answers, does)"
                                       if after_tool else "") + ".")
        if name not in (None, BASE):
            with self._model_busy("evaluate"):
                self._require_adapter(name)
        sets, notes = [], []
        if data is not None:
            sets.append((str(data) if isinstance(data, str) else "data",
                         heldout_examples(data, self.tokenizer, self.namespace, max_seq_len, column_map, notes,
                                          self.model)))
        elif own is not None:
            train_src, eval_src, cfg = own
            _, examples, report = self.prepare_data(train_src, dataclasses.replace(cfg, packing=False), eval_src)
            if recorded is not None and recorded[0] and report.fingerprint != recorded[0]:
                raise FtUsageError(
                    f"{name!r}'s held-out examples cannot be rebuilt: {recorded[1]} changed since its run (the rows "
                    "differ), so the split could now hold rows the adapter trained on. Give held-out examples with "
                    "--data FILE.")
            sets.append((f"held out in training ({report.split})", examples))
        pairs = []  # preference pairs: scored as pairs, and their chosen answers as text
        for i, (label, examples) in enumerate(sets):
            if examples and isinstance(examples[0], PairExample):
                pairs, sets[i] = examples, (f"{label}, chosen answers", [p.chosen for p in examples])
        if general:
            sets.append(("general text (forgetting check)", general_examples(self.tokenizer, max_seq_len)))
        columns = [BASE] + ([name] if name not in (None, BASE) else [])
        bs = int(batch_size)
        total = len(columns) * (sum(batches(len(ex), bs) for _, ex in sets) + batches(len(pairs), bs)
                                + batches(len(cases), bs))
        meter = EvalProgress(total, progress or (lambda line: None))
        with self._model_busy("evaluate"):
            self._check_not_merged("evaluate")
            previous = self.adapters.active
            model = self.model
            report = EvalReport(columns=columns, notes=notes)
            if pairs and len(columns) > 1:
                report.reward_beta, report.reward_beta_why = self._reward_beta(columns[1])
            try:
                # the 4-bit layout training evaluates in: after a generate (which repacks the weights for its
                # CPU kernel) the same adapter would otherwise score ~1% differently than its run reported
                with training_layout(model):
                    for col in columns:
                        if self.adapters:
                            activate(model, col)
                        for label, examples in sets:
                            meter.what = f"{col} on {label}"
                            report.add(label, col, *loss_and_perplexity(model, self.tokenizer, examples, batch_size,
                                                                        on_batch=meter.tick, dtype=self.handle.dtype))
                        if pairs:
                            meter.what = f"{col} ranking the preference pairs"
                            report.pairs[col] = pair_scores(model, self.tokenizer, pairs, batch_size, on_batch=meter.tick,
                                                            dtype=self.handle.dtype)
                report.cases = list(cases or [])
                for col in columns if cases else ():  # generation: the inference layout, fused layers
                    if self.adapters:
                        activate(model, col)
                    meter.what = f"{col} answering {counted(len(cases), 'question')}"
                    report.answers[col] = answer_scores(model, self.tokenizer, cases, batch_size, on_batch=meter.tick)
            finally:
                if self.adapters:
                    activate(self.model, previous)
            return report

    def _reward_beta(self, name: str) -> tuple:
        """``(beta, why)`` of the DPO rewards %lora_eval reports for adapter ``name``: the beta its DPO / IPO run
        used, else DPO's usual 0.1."""
        from .config import PAIR_BETA
        from .core.adapters import run_record

        info = self.adapters.require(name) if name in self.adapters else None
        settings = run_record(info.path).get("settings") or {} if info is not None and info.path else {}
        beta = settings.get("beta")
        if settings.get("objective") in ("dpo", "ipo") and isinstance(beta, (int, float)) and beta > 0:
            return float(beta), f"as its {settings['objective'].upper()} run"
        return PAIR_BETA["dpo"], "DPO's usual"

    def serving_text(self) -> str:
        """What :meth:`serve` holds in memory: its slots, least recently used first, and their folders."""
        if self._router is None:
            from .core.routing import DEFAULT_CAPACITY

            return (f"Serving    nothing yet: serve() or %%lora_serve reads adapters from {self.adapters_dir} into at "
                    f"most {DEFAULT_CAPACITY} slots (capacity) as requests name them")
        return self._router.describe()

    def serve(self, requests: list, store: Optional[str | Path] = None, capacity: Optional[int] = None,
              max_new_tokens: int = 64, system: Optional[str] = None, sampling=None, **settings) -> list:
        """Answer a batch of requests, each naming a task adapter (or 'base'): adapters missing from memory
        are loaded from ``store`` (default: the adapters folder), at most ``capacity`` kept (LRU), and the
        mixed batch runs in one generate call with PEFT's per-row ``adapter_names`` where it can. Returns one
        core.routing.Served per request (which adapter served it, cold load and swap times). Answers are
        greedy unless ``sampling`` (a core.inference.Sampling) or its fields as keywords (``temperature``,
        ``top_p``, ``top_k``, ``repetition_penalty``, ``seed``) say otherwise, as for :meth:`generate`."""
        from .core.inference import Sampling
        from .core.routing import DEFAULT_CAPACITY, AdapterRouter, as_requests

        from .core.inference import as_number

        # every argument is checked before any work: a refused call loads nothing and keeps the slots it holds
        sampling = Sampling.of(sampling, max_new_tokens=max_new_tokens, **settings)
        self._require_model()
        requests = as_requests(requests)
        if system is not None:
            need_text(system, "system", "'Answer briefly.'")
        capacity = None if capacity is None else as_number("capacity", capacity, integer=True, optional=False)
        if capacity is not None and capacity < 1:
            raise FtUsageError(f"capacity must be at least 1 adapter in memory (got {capacity}).")
        store = user_path(store, "store", "'adapters'") if store is not None else self.adapters_dir
        if store != self.adapters_dir and not store.is_dir():  # a typo read as "Store holds: nothing"
            raise FtUsageError(f"the store {store} {'is not a folder' if store.exists() else 'does not exist'}: give "
                               f"the folder the adapters were saved in (default: {self.adapters_dir}).")
        if self._router is None:
            self._router = AdapterRouter(self, store, capacity=capacity if capacity is not None else DEFAULT_CAPACITY)
        with self._model_busy("serve requests"):
            # (every row, the base's included, would be answered with the merged adapter's update in the weights)
            self._check_not_merged("serve requests (each would be answered with it in the weights, the base's too)")
            # one router for the session: its slots stay counted against capacity whichever store a call names (a
            # router per store left the last one's slots in the model, uncounted); a slot read from another folder
            # than the one a name means now is filled again
            previous = (self._router.store, self._router.capacity)
            self._router.store = store
            if capacity is not None:
                self._router.capacity = capacity
            try:
                return self._router.serve(requests, max_new_tokens=sampling.max_new_tokens, system=system,
                                          sampling=sampling)
            except FtUsageError:  # refused (a name not in that store): the next call starts from what was
                self._router.store, self._router.capacity = previous
                raise

    # ------------------------------------------------------------------ planning
    def plan(self, model: Optional[str] = None, seq_len: int = 512, batch_size: int = 8, r: int = 16,
             gradient_checkpointing: bool = False, optimizer: str = "adamw", objective: str = "sft"):
        """Estimated memory for full fine-tuning, LoRA and QLoRA of ``model`` (folder, known hub id or a size
        such as ``7B``; None: the loaded model, else the demo model); returns a core.planner.Plan (``.table()``
        for the text). Loads nothing."""
        from .config import OPTIMIZERS
        from .core.inference import as_number
        from .core.planner import dims_from_config, plan

        seq_len, batch_size, r = (as_number(k, v, True, False) for k, v in
                                  (("seq_len", seq_len), ("batch_size", batch_size), ("r", r)))
        if optimizer not in OPTIMIZERS:  # (the magic's --optimizer has these as its choices)
            raise FtUsageError(f"unknown optimizer {optimizer!r}{did_you_mean(str(optimizer), OPTIMIZERS)}; "
                               f"one of {', '.join(OPTIMIZERS)}.")
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise FtUsageError(f"model must be a folder, a hub id or a size such as '7B' (got {model!r}).")
        # read as the training setting reads it (True, False, 'true', 'no', ...): the string 'no' is truthy
        from .config import _coerce

        gradient_checkpointing = _coerce("gradient_checkpointing", TrainConfig.__dataclass_fields__[
            "gradient_checkpointing"], gradient_checkpointing)
        if gradient_checkpointing == "auto":
            raise FtUsageError("gradient_checkpointing='auto' is decided at run time from the free memory; plan with "
                               "True or False, and p.fit_text(memory) (%ft_plan --memory) says where it is needed.")
        if model is None and self.handle is not None:  # the model in this session, by its own config
            model = dims_from_config(self.handle.model.config.to_dict(), name=f"{self.handle.name} (loaded)")
        return plan(model or "demo", seq_len=seq_len, batch_size=batch_size, r=r, gradient_checkpointing=gradient_checkpointing,
                    optimizer=optimizer, objective=objective)


def _check_history(history) -> None:
    """``history`` is a conversation's earlier messages: a list of {'role': 'user' | 'assistant' | 'system',
    'content': text}; anything else is refused in words before the chat template reads it."""
    example = "[{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]"
    if isinstance(history, (str, bytes, dict)) or not isinstance(history, Sequence):
        raise FtUsageError(f"history is a list of messages, e.g. {example} (got {type(history).__name__}).")
    for n, m in enumerate(history):
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                and isinstance(m.get("content"), str)):
            raise FtUsageError(f"history[{n}] is {m!r:.80}: each message is a dict with a 'role' (user, assistant or "
                               f"system) and a text 'content', e.g. {example}.")


def _exported_name(folder: Path) -> Optional[str]:
    """The adapter an export folder holds: its record's name, or the last adapter merged into a merged model."""
    import json

    from .core.adapters import merged_into

    try:
        return json.loads((folder / "ft_run.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        pass
    merged = merged_into(folder)
    return merged[-1].get("name") if merged and isinstance(merged[-1], dict) else None


def _written_by_export(folder: Path) -> bool:
    """Whether ``folder`` is a finished export (which a new export may replace): an adapter whose record says
    it was exported, or a merged model whose config lists the adapters merged into it. A trained adapter's
    folder is neither, and is never overwritten by an export."""
    import json

    from .core.adapters import merged_into
    from .core.atomic import COMPLETE_MARKER

    if not (folder / COMPLETE_MARKER).exists():
        return False
    try:
        if "exported_from" in json.loads((folder / "ft_run.json").read_text()):
            return True
    except (OSError, ValueError, TypeError):
        pass
    return merged_into(folder) is not None


def _progress_lines(listeners, after_s: float = 5.0, every_s: float = 5.0):
    """A :func:`core.data.data_progress` report that says, once reading the data has taken ``after_s`` seconds and
    then every ``every_s``, how far it is (as %lora_eval's progress lines do)."""
    import time

    from .core.events import Message, emit

    start, last = time.monotonic(), [0.0]

    def report(stage: str, done: int, total: int) -> None:
        now = time.monotonic() - start
        if now >= after_s and now - last[0] >= every_s and done < total:
            last[0] = now
            emit(listeners, Message(f"reading the data: {stage} {done:,} of {total:,} examples ({done / total:.0%}), "
                                    f"{now:.0f} s"))

    return report


def _default_listeners(listeners: Optional[list]) -> list:
    """``listeners`` as given, or (None) the text view: the Python API prints progress like the magics do
    in a terminal; ``[]`` runs silently."""
    if listeners is not None:
        if not isinstance(listeners, (list, tuple)):
            raise FtUsageError(f"listeners is a list of views or functions (got {type(listeners).__name__}): e.g. "
                               "listeners=[print], or [] to run silently.")
        return list(listeners)
    from .widgets.text import TextReporter

    return [TextReporter()]

"""Standalone training jobs: one folder that runs the same training on 1..N processes, anywhere.

A job folder holds ``job.yaml`` (settings, model reference, data reference, output folder), the data
itself when it came from a notebook variable (``data.jsonl``: a subprocess cannot see the notebook's
variables), and accelerate config files for the common layouts. It runs as
``ft-magics train DIR/job.yaml`` or ``accelerate launch --config_file DIR/accelerate.yaml -m
ft_magics.train DIR/job.yaml``. We build no launcher of our own: several processes are started by
accelerate's launcher (which wraps torchrun) or by torchrun itself.

From the notebook, :func:`run_job` starts such a launcher as a subprocess and tails the JSON-lines
event file the rank-0 worker writes, re-emitting every event to the notebook's own listeners, so the
same dashboard shows a run on N processes.

Why ``distributed_type: MULTI_GPU`` + ``use_cpu: true`` for CPU processes: ``accelerate launch
--cpu`` selects accelerate's MPI path (it expects ``mpirun`` and a hostfile for several CPU
processes) and otherwise starts a single process, whatever ``--num_processes`` says. The
MULTI_GPU layout makes accelerate start the processes through torchrun; ``use_cpu`` keeps them on
the CPU, where the Trainer then joins them over gloo (measured here: accelerate 1.15, torch 2.13).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import FtUsageError, did_you_mean
from ..paths import user_path
from .atomic import atomic_write_text, writable_dir
from .events import Message, TrainEnd, emit, from_json, to_json

JOB_FILE = "job.yaml"
DATA_FILE = "data.jsonl"
EVAL_FILE = "eval.jsonl"
ACCELERATE_FILE = "accelerate.yaml"  # the layout that fits the machine the job was written on
ACCELERATE_LAYOUTS = {
    "accelerate-cpu.yaml": "N processes on this machine's CPU (gloo); for testing the multi-process path",
    "accelerate-single-gpu.yaml": "one process on one GPU",
    "accelerate-multi-gpu.yaml": "DDP: one process per GPU, each holding the whole (4-bit) model",
    "accelerate-fsdp-qlora.yaml": "FSDP + QLoRA: the model sharded over the GPUs (see README: not wired yet)",
}
LAUNCHERS = ("accelerate", "torchrun", "notebook")
EVENTS_FILE = "events.jsonl"
LOG_FILE = "launch.log"
STOP_FILE = "STOP"
RUNS_DIR = "runs"


def ask_ranks_to_stop(run_dir: Path) -> None:
    """The interrupt, as the training processes see it: the STOP file with its reason, written whole (a
    rank never reads it empty)."""
    atomic_write_text(run_dir / STOP_FILE, "interrupted\n")


# --------------------------------------------------------------------------- the job spec
@dataclass
class JobSpec:
    """Everything a worker process needs to repeat a notebook's training run."""

    name: str
    model: dict  # {"source": path | hub id | "demo", "bits": 4, "dtype": "auto", "trust_remote_code": false}
    data: str  # file path (relative to the job folder or absolute) or demo:NAME
    settings: dict  # TrainConfig.to_dict()
    output_dir: str = "adapters"  # the adapter lands in OUTPUT_DIR/NAME (relative: to the job folder)
    eval_data: Optional[str] = None
    processes: int = 1  # what `ft-magics train` starts by default
    data_note: str = ""  # where the data came from in the notebook
    path: Optional[Path] = field(default=None, compare=False, repr=False)  # job.yaml it was read from

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str = "job.yaml") -> "JobSpec":
        if not isinstance(data, dict):
            raise FtUsageError(f"{where} must be a YAML mapping with keys name, model, data, settings.")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "path"]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise FtUsageError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], names)}. Keys: {', '.join(names)}.")
        missing = [k for k in ("name", "model", "data") if not data.get(k)]
        if missing:
            raise FtUsageError(f"{where}: the key {missing[0]!r} is required (see a job written by %lora_export_job).")
        model = data["model"]
        if isinstance(model, str):
            model = {"source": model}
        if not isinstance(model, dict) or not model.get("source"):
            raise FtUsageError(f"{where}: model must be a mapping with at least 'source' (a folder, hub id or demo).")
        spec = cls(**{k: v for k, v in data.items() if k in names and k != "model"}, model=dict(model))
        spec.settings = dict(spec.settings or {})
        try:
            spec.processes = int(spec.processes)
        except (TypeError, ValueError):
            raise FtUsageError(f"{where}: processes must be a whole number, got {spec.processes!r}.") from None
        if spec.processes < 1:
            raise FtUsageError(f"{where}: processes must be at least 1 (got {spec.processes}).")
        from ..config import TrainConfig

        TrainConfig.from_dict(spec.settings)  # validates every setting, with did-you-mean
        return spec

    # paths are stored relative to the job folder where they can be, so the folder can be copied
    def resolve(self, ref: Optional[str]) -> Optional[str]:
        if ref is None or ref.startswith("demo:") or self.path is None:
            return ref
        p = user_path(ref)
        return str(p if p.is_absolute() else (self.path.parent / p).resolve())

    @property
    def adapter_dir(self) -> Path:
        return Path(self.resolve(self.output_dir)) / self.name

    @property
    def model_source(self) -> str:
        src = str(self.model["source"])
        if src == "demo":
            return src
        p = user_path(src)
        if p.is_absolute() or self.path is None:
            return src
        local = (self.path.parent / p)
        return str(local.resolve()) if local.exists() else src  # else: a hub id such as org/name


def load_job(path: os.PathLike | str) -> JobSpec:
    import yaml

    path = user_path(path)
    if path.is_dir():
        path = path / JOB_FILE
    if not path.is_file():
        raise FtUsageError(f"job file {path} does not exist; write one with %lora_export_job NAME DIR.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FtUsageError(f"{path} is not valid YAML: {exc}") from None
    spec = JobSpec.from_dict(data, where=str(path))
    spec.path = path.resolve()
    return spec


# --------------------------------------------------------------------------- writing a job
def model_reference(handle) -> dict:
    """How a worker reloads the notebook's base model: the same source, bits and dtype."""
    demo = "(embedded demo)" in handle.name
    return {
        "source": "demo" if demo else handle.source,
        "bits": handle.bits,
        "dtype": str(handle.dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
        .replace("float32", "fp32"),
        "name": handle.name,
        # loaded as the notebook loaded it: a pickle-only folder, remote code, and the device it is on (a notebook
        # on the CPU of a GPU machine kept its workers off the GPU)
        "allow_pickle": bool(getattr(handle, "allow_pickle", False)),
        "trust_remote_code": bool(getattr(handle, "trust_remote_code", False)),
        "device": "cpu" if str(handle.device).startswith("cpu") else "auto",
    }


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):  # numpy / pandas scalars and arrays
        return v.tolist()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


def export_rows(rows: list, dest: Path) -> Path:
    """Rows to a JSON-lines file, written atomically (a reader never sees half a file)."""
    text = "".join(json.dumps(r, ensure_ascii=False, default=_jsonable) + "\n" for r in rows)
    atomic_write_text(dest, text)
    return dest


def data_reference(src: Any, namespace: Optional[dict], job_dir: Path, filename: str) -> tuple:
    """``(reference for job.yaml, note, the eval split the exported rows bring or None)``. Files and demo sets
    are referenced; notebook variables and Python objects are exported into the job folder, since a subprocess
    cannot see them."""
    from .data import load_rows

    from .data import _looks_like_data

    variable = isinstance(src, str) and namespace is not None and src.isidentifier() and src in namespace \
        and _looks_like_data(namespace[src])  # a variable wins over a file or folder of its name, as in the notebook
    if isinstance(src, str) and not variable:
        if src.startswith("demo:"):
            load_rows(src)  # checks the name
            return src, src, None
        p = user_path(src)
        if p.exists():
            return str(p.resolve()), f"file {p}", None
    rows, desc = load_rows(src, namespace)
    export_rows(rows, job_dir / filename)
    held = getattr(rows, "held_out", None)  # a DatasetDict's (or a dict of splits') eval split: exported too
    return filename, f"{desc} exported to {job_dir / filename} ({len(rows)} rows)", held


def accelerate_configs(processes: int, gpus: int = 0) -> dict:
    """Accelerate config files (as dicts) for the layouts a job can run under."""
    base = {"compute_environment": "LOCAL_MACHINE", "debug": False, "machine_rank": 0, "num_machines": 1,
            "main_training_function": "main", "mixed_precision": "no", "rdzv_backend": "static",
            "same_network": True, "downcast_bf16": "no", "gpu_ids": "all", "use_cpu": False,
            "tpu_use_cluster": False, "tpu_use_sudo": False}
    n_gpu = max(gpus, processes, 2)
    cpu = {**base, "distributed_type": "MULTI_GPU" if processes > 1 else "NO", "use_cpu": True,
           "num_processes": processes}
    single = {**base, "distributed_type": "NO", "num_processes": 1}
    multi = {**base, "distributed_type": "MULTI_GPU", "num_processes": n_gpu}
    fsdp = {**base, "distributed_type": "FSDP", "num_processes": n_gpu, "fsdp_config": {
        "fsdp_version": 1,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_forward_prefetch": False,
        "fsdp_offload_params": False,
        "fsdp_sharding_strategy": "FULL_SHARD",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_sync_module_states": True,
        "fsdp_use_orig_params": False,
    }}
    configs = {"accelerate-cpu.yaml": cpu, "accelerate-single-gpu.yaml": single,
               "accelerate-multi-gpu.yaml": multi, "accelerate-fsdp-qlora.yaml": fsdp}
    if gpus >= 1:
        configs[ACCELERATE_FILE] = {**(multi if processes > 1 else single), "num_processes": processes}
    else:
        configs[ACCELERATE_FILE] = cpu
    return configs


def _yaml(data: dict, header: str = "") -> str:
    import yaml

    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def run_commands(job_path: Path) -> list:
    """The shell commands that run the job at ``job_path``, its paths quoted where they need it (a space)."""
    import shlex

    return [f"ft-magics train {shlex.quote(str(job_path))}",
            f"accelerate launch --config_file {shlex.quote(str(job_path.parent / ACCELERATE_FILE))} -m ft_magics.train "
            f"{shlex.quote(str(job_path))}"]


def write_job(job_dir: os.PathLike | str, spec: JobSpec, gpus: int = 0) -> Path:
    """Write ``job.yaml`` and the accelerate configs into ``job_dir``; returns the job.yaml path."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    header = (f"# ft_magics training job {spec.name!r}. Run it with:\n"
              + "".join(f"#   {command}\n" for command in run_commands(job_dir / JOB_FILE))
              + "# batch_size is per process: the global batch is batch_size x grad_accum x processes.\n")
    for fname, cfg in accelerate_configs(spec.processes, gpus).items():
        what = ACCELERATE_LAYOUTS.get(fname, "the layout matching the machine this job was written on")
        atomic_write_text(job_dir / fname, _yaml(cfg, f"# accelerate config: {what}\n"))
    path = job_dir / JOB_FILE
    atomic_write_text(path, _yaml(spec.to_dict(), header))
    return path


def export_job(handle, name: str, job_dir: os.PathLike | str, data: Any, cfg, *, eval_data: Any = None,
               namespace: Optional[dict] = None, processes: int = 1, output_dir: Optional[os.PathLike | str] = None,
               listeners: Optional[list] = None) -> Path:
    """The notebook's run as a job folder: ``handle``'s model, ``data`` (exported when it is a notebook
    variable), ``cfg``. ``output_dir`` defaults to ``adapters`` inside the job folder; one given is read from the
    working folder, as ``%%lora_train --output-dir`` and the data files are, and written to job.yaml in full."""
    from .adapters import validate_name

    name = validate_name(name, getattr(handle, "model", None))
    if data is None:
        raise FtUsageError("--data is required: a file, demo:NAME, or a notebook variable. Try --data demo:support.")
    try:
        processes = int(processes)
    except (TypeError, ValueError):
        raise FtUsageError(f"--processes must be a whole number, got {processes!r}.") from None
    if processes < 1:
        raise FtUsageError(f"--processes must be at least 1 (got {processes}).")
    job_dir = writable_dir(user_path(job_dir, "the job folder", "'jobs/support'").resolve(), "the job")
    if job_dir.is_dir() and any(job_dir.iterdir()) and not (job_dir / JOB_FILE).exists():
        raise FtUsageError(f"{job_dir} already holds other files and is not a job folder (no {JOB_FILE}); choose a "
                           "new or empty folder for the job (an earlier job's folder is rewritten).")
    data_ref, note, held = data_reference(data, namespace, job_dir, DATA_FILE)
    eval_ref = None
    if eval_data is None and held is not None:  # the variable's own eval split, as the notebook run uses it
        from .data import load_rows

        split, source = held
        erows = load_rows(source, namespace)[0]
        export_rows(erows, job_dir / EVAL_FILE)
        eval_ref = EVAL_FILE
        note += f"; eval: its '{split}' split exported to {job_dir / EVAL_FILE} ({len(erows)} rows)"
    elif eval_data is not None:
        eval_ref, enote, eheld = data_reference(eval_data, namespace, job_dir, EVAL_FILE)
        if eheld is not None:  # --eval names a dataset with splits: its eval split, not 'train'
            export_rows(load_rows(eheld[1], namespace)[0], job_dir / EVAL_FILE)
            enote += f" (its '{eheld[0]}' split)"
        note += f"; eval: {enote}"
    if "exported" in note:
        emit(listeners or [], Message("the data is written into the job folder, so the job trains on exactly these "
                                      "rows (a notebook variable cannot reach another process; what a glob or a Hub "
                                      f"id names can change): {note}"))
    spec = JobSpec(name=name, model=model_reference(handle), data=data_ref, settings=cfg.to_dict(),
                   output_dir=str(user_path(output_dir, "--output-dir", "'adapters'").resolve())
                   if output_dir is not None else "adapters", eval_data=eval_ref,
                   processes=processes, data_note=note)
    gpus = 0
    if str(handle.device).startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
    previous = job_dir / JOB_FILE
    if previous.exists():
        try:
            old_name = load_job(previous).name
        except FtUsageError:
            old_name = None
        emit(listeners or [], Message(f"{job_dir} held job {old_name!r}; it is replaced by job {name!r}."
                                      if old_name and old_name != name else f"{job_dir}: the job is written again."))
    path = write_job(job_dir, spec, gpus=gpus)
    # an earlier job's exported rows that this job does not read would only mislead
    read = {(job_dir / ref).resolve() for ref in (data_ref, eval_ref) if ref and not str(ref).startswith("demo:")}
    for stale in (job_dir / DATA_FILE, job_dir / EVAL_FILE):
        if stale.exists() and stale.resolve() not in read:
            stale.unlink()
    return path


# --------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(job_path: Path, processes: int, launcher: str = "accelerate", events: Optional[Path] = None,
                   port: Optional[int] = None, resume: bool = False) -> list:
    """The command line that runs ``job_path`` on ``processes`` local processes (``resume``: from its latest
    complete checkpoint)."""
    if launcher not in LAUNCHERS:
        raise FtUsageError(f"unknown launcher {launcher!r}{did_you_mean(launcher, LAUNCHERS)}. Use one of: {', '.join(LAUNCHERS)}.")
    worker = (["-m", "ft_magics.train", str(job_path)] + (["--events", str(events)] if events else [])
              + (["--resume"] if resume else []))
    if processes == 1 and launcher != "accelerate":
        return [sys.executable] + worker
    port = port or free_port()
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(port)] + worker
    # accelerate launch (its launcher runs torchrun for several processes)
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(job_path.parent / ACCELERATE_FILE),
            "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(port)] + worker


class EventTail:
    """Reads the complete lines a writer has appended to a JSON-lines event file so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._partial = ""

    def read(self) -> list:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as f:
            f.seek(self._pos)
            chunk = f.read()
            self._pos = f.tell()
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the rest
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(from_json(json.loads(line)))
                except (ValueError, KeyError, TypeError):
                    continue  # a line we cannot read never stops the view
        return out


class JsonlEventWriter:
    """A listener that appends every event as one JSON line (flushed, so a tail sees it at once)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def _write(self, event) -> None:
        self._f.write(json.dumps(to_json(event), default=str) + "\n")
        self._f.flush()

    on_train_begin = on_step = on_eval = on_message = on_train_end = _write

    def close(self) -> None:
        self._f.close()


class JobFailed(FtUsageError):
    """The launched job ended without an adapter; the message says which process failed and how."""


def _failure_summary(log_text: str) -> str:
    """torchrun's 'Root Cause' block -> 'rank 1 (pid 123) was killed by signal SIGKILL'."""
    m = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)", log_text, re.S)
    if not m:
        return ""
    rank, code, pid = int(m.group(1)), int(m.group(2)), m.group(3)
    if code < 0:
        try:
            how = f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    return f"worker process rank {rank} (pid {pid}) {how}"


def _failure_reason(log_text: str, end, returncode: int) -> str:
    """Why a job failed: which process and how (torchrun's summary), with a worker's own refusal in its words
    (its 'ft_magics: ...' line; the notebook showed only 'exited with code 2' and torchrun's boilerplate)."""
    why = _failure_summary(log_text)
    said = next((line.strip()[len("ft_magics: "):] for line in log_text.splitlines()
                 if line.strip().startswith("ft_magics: ")), None)
    if said:
        why = f"{why}: {said}" if why else said
    if not why and end is not None and end.error:
        why = end.error
    return why or f"the launcher exited with code {returncode}"


@dataclass
class JobOutcome:
    status: str
    adapter_path: Optional[str]
    record: dict
    run_dir: Path
    returncode: int


def run_job(job_path: os.PathLike | str, processes: int, launcher: str = "accelerate", listeners: Optional[list] = None,
            poll_s: float = 0.2, on_start: Optional[Callable[[subprocess.Popen, Path], None]] = None,
            resume: bool = False) -> JobOutcome:
    """Run a job on ``processes`` local processes through ``launcher`` and stream its events to
    ``listeners`` (``resume``: from the adapter's latest complete checkpoint). A kernel interrupt asks every
    process to stop at the next step (the adapter is saved); a second one ends them. Raises
    :class:`JobFailed` when the job ends without a result."""
    listeners = list(listeners or [])
    spec = load_job(job_path)
    job_path = spec.path
    if launcher == "notebook":
        blocker = notebook_launcher_blocker()
        if blocker is None and processes > 1:
            return run_notebook_job(job_path, processes, listeners, poll_s, resume=resume)
        if blocker is not None:
            emit(listeners, Message(f"accelerate's notebook launcher cannot start here: {blocker}. "
                                    "Running the job through accelerate launch in a subprocess instead.", "warning"))
        launcher = "accelerate"
    run_dir = _new_run_dir(job_path.parent)
    events = run_dir / EVENTS_FILE
    cmd = launch_command(job_path, processes, launcher, events, resume=resume)
    env = dict(os.environ, PYTHONUNBUFFERED="1", FT_MAGICS_STOP_FILE=str(run_dir / STOP_FILE),
               FT_MAGICS_RUN_DIR=str(run_dir), FT_MAGICS_NOTEBOOK_PID=str(os.getpid()))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    emit(listeners, Message(f"starting {processes} process{'es' if processes > 1 else ''} with {launcher}: "
                            f"{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}  (log: {run_dir / LOG_FILE})"))
    with open(run_dir / LOG_FILE, "wb") as log:
        # A session of its own: the kernel's interrupt reaches the launcher only through the stop file.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    if on_start is not None:
        on_start(proc, run_dir)
    tail = EventTail(events)
    end: Optional[TrainEnd] = None
    interrupts = 0

    last_step = 0  # the steps seen: a run whose rank 0 died sends no end, and read 'failed after 0 steps'

    def pump() -> None:
        nonlocal end, last_step
        for ev in tail.read():
            if isinstance(ev, TrainEnd):
                end = ev
            last_step = getattr(ev, "step", last_step) or last_step
            emit(listeners, ev)

    try:
        while True:
            try:
                while proc.poll() is None:
                    pump()
                    time.sleep(poll_s)
                break
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    ask_ranks_to_stop(run_dir)
                    emit(listeners, Message("interrupt received: every process stops after the current step and "
                                            "rank 0 saves the adapter (interrupt again to end them now)", "warning"))
                else:
                    _terminate(proc)
    finally:
        if proc.poll() is None:
            _terminate(proc)
    pump()
    log_text = (run_dir / LOG_FILE).read_text(errors="replace")
    record: dict = {}
    adapter = end.adapter_path if end is not None else None
    if adapter and (proc.returncode == 0 or _saved_after_interrupt(end)):
        rec = Path(adapter) / "ft_run.json"
        record = json.loads(rec.read_text()) if rec.exists() else {}
        return JobOutcome(end.status, adapter, record, run_dir, proc.returncode)
    if proc.returncode == 0 and end is not None and end.status != "failed":
        return JobOutcome(end.status, None, record, run_dir, 0)
    why = _failure_reason(log_text, end, proc.returncode)
    kept = "the previous adapter there is unchanged" if spec.adapter_dir.exists() else "no adapter was written"
    tail_lines = "\n".join("  " + l for l in log_text.strip().splitlines()[-12:])
    msg = (f"training job {spec.name!r} on {processes} processes failed: {why}. All its processes were stopped; "
           f"{kept} ({spec.adapter_dir}). Full log: {run_dir / LOG_FILE}\nLast lines of the log:\n{tail_lines}")
    if end is None or end.status != "failed":
        emit(listeners, TrainEnd(run_name=spec.name, status="failed", steps=last_step if end is None else end.steps,
                                 final_loss=None, elapsed_s=0.0, adapter_path=None, error=why))
    raise JobFailed(msg)


# --------------------------------------------------------------------------- accelerate's notebook launcher
def notebook_launcher_blocker() -> Optional[str]:
    """Why accelerate's ``notebook_launcher`` cannot fork this process now (None when it can)."""
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import are_libraries_initialized
    except ImportError:
        return "accelerate is not installed"
    if sys.platform == "win32":
        return "it forks the kernel, which Windows cannot do"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return "CUDA is already initialised in this kernel (a forked process cannot use it)"
    if are_libraries_initialized("bitsandbytes"):
        return ("bitsandbytes is already imported in this kernel (peft and 4-bit loading import it), and "
                "accelerate refuses to fork after that")
    if len(AcceleratorState._shared_state) > 0:
        return "an accelerate Accelerator already exists in this kernel (a Trainer ran here)"
    return None


def _notebook_worker(job_path: str, events: str, run_dir: str, resume: bool = False) -> None:
    os.environ["FT_MAGICS_RUN_DIR"] = run_dir
    os.environ["FT_MAGICS_QUIET"] = "1"  # the notebook's own view shows progress; no duplicate text from rank 0
    os.environ["FT_MAGICS_STOP_FILE"] = str(Path(run_dir) / STOP_FILE)
    os.environ["FT_MAGICS_NOTEBOOK_PID"] = str(os.getppid())  # forked from the kernel: stop if it is killed
    from ..train import run_job as worker

    code = worker(job_path, events, resume)
    if code != 0:
        raise RuntimeError(f"the training worker ended with exit code {code}")


def run_notebook_job(job_path: os.PathLike | str, processes: int, listeners: Optional[list] = None,
                     poll_s: float = 0.2, resume: bool = False) -> JobOutcome:
    """Run a job on ``processes`` processes forked from this kernel by accelerate's notebook launcher,
    streaming rank 0's events to ``listeners`` from a reader thread."""
    import threading

    from accelerate import notebook_launcher

    listeners = list(listeners or [])
    spec = load_job(job_path)
    run_dir = _new_run_dir(spec.path.parent)
    events = run_dir / EVENTS_FILE
    tail = EventTail(events)
    ends: list = []
    done = threading.Event()

    def pump() -> None:
        for ev in tail.read():
            if isinstance(ev, TrainEnd):
                ends.append(ev)
            emit(listeners, ev)

    def reader() -> None:
        while not done.is_set():
            pump()
            time.sleep(poll_s)

    emit(listeners, Message(f"starting {processes} processes with accelerate's notebook launcher (forked from this kernel)"))
    thread = threading.Thread(target=reader, name="ft_magics-job-events", daemon=True)
    thread.start()
    error = None
    try:
        notebook_launcher(_notebook_worker, (str(spec.path), str(events), str(run_dir), resume), num_processes=processes,
                          use_port=str(free_port()))
    except KeyboardInterrupt:
        ask_ranks_to_stop(run_dir)
        error = "interrupted before the processes finished"
    except Exception as exc:  # noqa: BLE001 - reported as a failed job below
        if type(exc).__name__ == "SignalException":  # torch's elastic launcher turns the kernel's SIGINT into this
            ask_ranks_to_stop(run_dir)
            error = "interrupted before the processes finished"
        else:
            error = f"{type(exc).__name__}: {exc}"
    finally:
        done.set()
        thread.join()
    pump()
    end = ends[-1] if ends else None
    if (error is None or _saved_after_interrupt(end)) and end is not None and end.adapter_path:
        rec = Path(end.adapter_path) / "ft_run.json"
        return JobOutcome(end.status, end.adapter_path, json.loads(rec.read_text()) if rec.exists() else {}, run_dir, 0)
    if error is None and end is not None and end.status != "failed":
        return JobOutcome(end.status, None, {}, run_dir, 0)
    why = error or (end.error if end is not None and end.error else "the processes ended without a result")
    if end is None or end.status != "failed":
        emit(listeners, TrainEnd(run_name=spec.name, status="failed", steps=0 if end is None else end.steps,
                                 final_loss=None, elapsed_s=0.0, adapter_path=None, error=why))
    raise JobFailed(f"training job {spec.name!r} on {processes} processes (notebook launcher) failed: {why}. "
                    f"No adapter was written to {spec.adapter_dir} by this run.")


def _saved_after_interrupt(end: Optional[TrainEnd]) -> bool:
    """Whether rank 0 saved the adapter of an interrupted or stopped run (its record written last). An interrupt can
    end the launcher with an error after that (a second Ctrl-C; the notebook launcher's SignalException): the
    adapter is whole all the same."""
    return (end is not None and bool(end.adapter_path) and end.status in ("interrupted", "stopped")
            and (Path(end.adapter_path) / "ft_run.json").exists())


def _new_run_dir(job_dir: Path) -> Path:
    run_dir = job_dir / RUNS_DIR / time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while run_dir.exists():
        n += 1
        run_dir = run_dir.with_name(run_dir.name.split(".")[0] + f".{n}")
    run_dir.mkdir(parents=True)
    return run_dir


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the launcher's whole process group, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def result_from_record(outcome: JobOutcome):
    """A :class:`~ft_magics.core.training.TrainResult` from the run record the job wrote."""
    from .training import TrainResult

    r = outcome.record
    losses = r.get("loss_history") or []
    timings = r.get("timings") or {}
    return TrainResult(
        name=r.get("name", ""), status=outcome.status, adapter_path=outcome.adapter_path, steps=r.get("steps", 0),
        final_loss=r.get("final_loss"), first_loss=losses[0][1] if losses else None, eval_loss=r.get("eval_loss"),
        seconds=timings.get("seconds", 0.0), trainable_params=r.get("trainable_params", 0),
        total_params=r.get("total_params", 0), loss_tokens_per_s=timings.get("loss_tokens_per_s"),
        peak_memory_bytes=(r.get("peak_memory") or {}).get("bytes", 0), record=r,
    )

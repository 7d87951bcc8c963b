"""Scale-out: the same training job on several processes (issue 9).

Real multi-process runs on the CPU (gloo) with the tiny random Llama: accelerate launch and torchrun
as subprocesses, accelerate's notebook launcher in a fresh interpreter, the exported job from a clean
shell, a killed worker. Unit tests cover the job file, the accelerate configs and the event tail.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ft_magics.core.events import Listener, Message, Recorder, StepEnd, TrainBegin, TrainEnd, to_json
from ft_magics.errors import FtUsageError

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# small, deterministic settings: no dropout, plain random order (same permutation for 1 and N processes)
FAST = dict(max_steps=6, dropout=0.0, group_by_length=False, max_seq_len=96, learning_rate=1e-3, warmup=0, r=8)


def _files(root: Path, name: str) -> list:
    return sorted(p for p in Path(root).rglob(name) if p.is_file())


# --------------------------------------------------------------------------- unit: job file and configs
def test_job_yaml_round_trip_and_mistakes(tmp_path):
    from ft_magics.core.jobs import JobSpec, load_job, write_job
    from ft_magics.errors import FtUsageError

    spec = JobSpec(name="a", model={"source": "demo", "bits": 4, "dtype": "auto"}, data="data.jsonl",
                   settings={"r": 8, "max_steps": 3}, processes=2)
    path = write_job(tmp_path / "job", spec)
    back = load_job(path)
    assert back.to_dict() == spec.to_dict()
    assert back.resolve(back.data) == str((tmp_path / "job" / "data.jsonl").resolve())
    assert back.adapter_dir == (tmp_path / "job" / "adapters" / "a").resolve()
    assert load_job(tmp_path / "job").name == "a"  # the folder works too
    text = path.read_text()
    assert "processes: 2" in text and text.startswith("# ft_magics training job")

    bad = dict(spec.to_dict(), procesess=2)
    with pytest.raises(FtUsageError, match="did you mean 'processes'"):
        JobSpec.from_dict(bad)
    with pytest.raises(FtUsageError, match="learning_rate"):
        JobSpec.from_dict(dict(spec.to_dict(), settings={"learning_rate": 5}))
    with pytest.raises(FtUsageError, match="does not exist"):
        load_job(tmp_path / "nowhere" / "job.yaml")


def test_accelerate_configs_cover_the_layouts(tmp_path):
    """The CPU layout is MULTI_GPU + use_cpu (torchrun under accelerate): `--cpu` would start one process."""
    import yaml

    from ft_magics.core.jobs import JobSpec, write_job

    write_job(tmp_path, JobSpec(name="a", model={"source": "demo"}, data="demo:support", settings={}, processes=2))
    cfgs = {p.name: yaml.safe_load(p.read_text()) for p in tmp_path.glob("accelerate*.yaml")}
    assert set(cfgs) == {"accelerate.yaml", "accelerate-cpu.yaml", "accelerate-single-gpu.yaml",
                         "accelerate-multi-gpu.yaml", "accelerate-fsdp-qlora.yaml"}
    assert cfgs["accelerate.yaml"]["distributed_type"] == "MULTI_GPU" and cfgs["accelerate.yaml"]["use_cpu"] is True
    assert cfgs["accelerate.yaml"]["num_processes"] == 2
    assert cfgs["accelerate-single-gpu.yaml"]["distributed_type"] == "NO"
    assert cfgs["accelerate-multi-gpu.yaml"]["distributed_type"] == "MULTI_GPU"
    assert cfgs["accelerate-multi-gpu.yaml"]["use_cpu"] is False
    fsdp = cfgs["accelerate-fsdp-qlora.yaml"]
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True


def test_launch_commands(tmp_path):
    from ft_magics.core.jobs import launch_command
    from ft_magics.errors import FtUsageError

    job = tmp_path / "job.yaml"
    acc = launch_command(job, 3, "accelerate", port=1234)
    assert acc[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert acc[acc.index("--config_file") + 1] == str(tmp_path / "accelerate.yaml")
    assert acc[acc.index("--num_processes") + 1] == "3" and acc[-3:] == ["-m", "ft_magics.train", str(job)]
    tr = launch_command(job, 2, "torchrun", port=1234)
    assert tr[1:3] == ["-m", "torch.distributed.run"] and tr[tr.index("--nproc_per_node") + 1] == "2"
    assert launch_command(job, 1, "torchrun") == [sys.executable, "-m", "ft_magics.train", str(job)]
    with pytest.raises(FtUsageError, match="did you mean 'torchrun'"):
        launch_command(job, 2, "torchrn")


def test_event_tail_reads_only_complete_lines(tmp_path):
    from ft_magics.core.jobs import EventTail

    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []
    line = json.dumps(to_json(Message("hello")))
    path.write_text(line + "\n" + line[:10])  # the writer is in the middle of the second line
    got = tail.read()
    assert [e.text for e in got] == ["hello"]
    with open(path, "a") as f:
        f.write(line[10:] + "\nnot json\n")
    got = tail.read()
    assert [e.text for e in got] == ["hello"]  # the finished line; the garbage line is skipped


def test_failure_summary_names_the_rank_and_signal():
    from ft_magics.core.jobs import _failure_summary

    log = ("Root Cause (first observed failure):\n[0]:\n  time : x\n  host : localhost\n"
           "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 4242)\n")
    assert _failure_summary(log) == "worker process rank 1 (pid 4242) was killed by signal SIGKILL"
    assert _failure_summary("nothing useful") == ""
    from ft_magics.core.jobs import _failure_reason

    worker = "ft_magics: keep_best compares eval losses, and this run has no eval data: give --eval FILE.\n"
    assert _failure_reason(worker + log, None, 1) == ("worker process rank 1 (pid 4242) was killed by signal SIGKILL: "
                                                      "keep_best compares eval losses, and this run has no eval data: "
                                                      "give --eval FILE.")
    assert _failure_reason("noise", None, 3) == "the launcher exited with code 3"


def test_notebook_launcher_falls_back_when_it_cannot_fork(tmp_path, monkeypatch):
    """After peft/bitsandbytes are imported (any notebook that trained), accelerate refuses to fork."""
    import peft  # noqa: F401 - imports bitsandbytes, as a notebook that trained has

    from ft_magics.core import jobs

    reason = jobs.notebook_launcher_blocker()
    assert reason and "bitsandbytes" in reason
    seen = {}

    def fake_popen(cmd, **kw):  # stop right after the launcher was chosen
        seen["cmd"] = cmd
        raise RuntimeError("stop here")

    monkeypatch.setattr(jobs.subprocess, "Popen", fake_popen)
    path = jobs.write_job(tmp_path, jobs.JobSpec(name="a", model={"source": "demo"}, data="demo:support", settings={}))
    rec = Recorder()
    with pytest.raises(RuntimeError, match="stop here"):
        jobs.run_job(path, 2, "notebook", [rec])
    assert "accelerate.commands.launch" in seen["cmd"]
    assert any("notebook launcher cannot start here" in m.text for m in rec.of(Message))


def test_magic_flags_are_checked(shell, tiny_model_dir, tmp_path):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="invalid choice"):
        shell.run_cell_magic("lora_train", "x --data demo:support --processes 2 --launcher mpi", "r: 8\n")
    with pytest.raises(UsageError, match="no model is loaded"):
        shell.run_cell_magic("lora_train", "x --data demo:support --processes 2", "r: 8\n")
    with pytest.raises(UsageError, match="cannot be combined with --background.*ft-magics train DIR/job.yaml"):
        shell.run_cell_magic("lora_train", "x --data demo:support --processes 2 --background", "r: 8\n")
    assert "lora_export_job" in shell.magics_manager.magics["line"]
    assert "lora_export_job" in shell.magics_manager.magics["cell"]
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    with pytest.raises(UsageError, match="no complete checkpoint of 'x' to resume from"):  # --resume goes through
        shell.run_cell_magic("lora_train", "x --data demo:support --processes 2 --resume", "r: 8\n")
    # a folder that is not a job's (here: the model's own) is not written into
    before = sorted(p.name for p in Path(tiny_model_dir).iterdir())
    with pytest.raises(UsageError, match="already holds other files and is not a job folder"):
        shell.run_cell_magic("lora_export_job", f"x {tiny_model_dir} --data demo:support", "r: 8\n")
    assert sorted(p.name for p in Path(tiny_model_dir).iterdir()) == before
    # a job folder written again for another job keeps no rows of the old one that nothing reads now
    shell.user_ns["rows"] = [{"prompt": "hi", "completion": "there"}] * 4
    job = tmp_path / "jobdir"
    shell.run_cell_magic("lora_export_job", f"first {job} --data rows --eval rows", "r: 8\n")
    assert (job / "data.jsonl").exists() and (job / "eval.jsonl").exists()
    shell.run_cell_magic("lora_export_job", f"second {job} --data demo:support", "r: 8\n")
    assert not (job / "data.jsonl").exists() and not (job / "eval.jsonl").exists()
    assert "data: demo:support" in (job / "job.yaml").read_text()
    for n in (0, -2):  # 0 read as 'not given' started a one-process job
        with pytest.raises(UsageError, match=rf"--processes must be at least 1 \(got {n}\)"):
            shell.run_cell_magic("lora_train", f"x --data demo:support --processes {n}", "r: 8\n")
    # a merged adapter: refused before the processes start (the run trained to the end, then could not load)
    shell.run_cell_magic("lora_train", "m --data rows --no-widgets", "max_steps: 1\nr: 4\n")
    shell.run_line_magic("lora_adapters", "merge m")
    with pytest.raises(UsageError, match="merged"):
        shell.run_cell_magic("lora_train", "after --data rows --processes 2 --no-widgets", "max_steps: 1\nr: 4\n")
    assert not (tmp_path / "adapters" / ".jobs" / "after").exists()


# --------------------------------------------------------------------------- real runs on 2 CPU processes
def test_two_processes_train_one_adapter_and_match_one_process(tiny_session, tmp_path):
    """accelerate launch, 2 gloo processes at batch 4 == 1 process at batch 8: same loss curve; exactly one
    adapter and one run record; every event streamed back; the adapter is loaded in the session."""
    s = tiny_session
    rec = Recorder()
    two = s.train_processes("two", "demo:support", dict(FAST, batch_size=4), processes=2, listeners=[rec])
    assert two.status == "completed" and two.steps == 6
    launch = two.record["launch"]
    assert launch["processes"] == 2 and launch["backend"] == "gloo" and launch["global_batch"] == 8
    # exactly one adapter and one run record were written by the two processes
    assert _files(tmp_path, "adapter_model.safetensors") == [tmp_path / "adapters" / "two" / "adapter_model.safetensors"]
    assert _files(tmp_path, "ft_run.json") == [tmp_path / "adapters" / "two" / "ft_run.json"]
    # the notebook's view saw the run: begin, every step, the end with the adapter path
    assert len(rec.of(TrainBegin)) == 1 and [e.step for e in rec.of(StepEnd)] == list(range(1, 7))
    assert rec.of(TrainEnd)[-1].adapter_path == str(tmp_path / "adapters" / "two")
    assert "two" in s.adapters and s.adapters.active == "two"
    logs = "".join(p.read_text() for p in tmp_path.rglob("launch.log"))
    assert "Run 'two' completed after 6 steps" in logs  # the launch log was read
    assert logs.count("Loading weights: 100%") == 1, logs  # rank 0's progress bar; rank 1 printed its own too
    assert "find_unused_parameters=True" not in logs  # DDP told every weight is used: no search, no warning

    one = s.train("one", "demo:support", dict(FAST, batch_size=8))
    curve_two = [l for _, l in two.record["loss_history"]]
    curve_one = [l for _, l in one.record["loss_history"]]
    assert len(curve_one) == len(curve_two) == 6
    assert curve_one[-1] < curve_one[0]  # it learns
    worst = max(abs(a - b) for a, b in zip(curve_one, curve_two))
    assert worst < 0.01 * curve_one[0], (curve_one, curve_two)


def _kill_rank1_once_training(job_dir: Path, out: dict, timeout_s: float = 300.0) -> None:
    """Watcher thread: once rank 0 has reported a step, SIGKILL worker rank 1."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        for events in job_dir.glob("runs/*/events.jsonl"):
            pidfile = events.parent / "rank1.pid"
            if '"type": "StepEnd"' in events.read_text() and pidfile.exists():
                out["pid"] = int(pidfile.read_text())
                out["rank0"] = int((events.parent / "rank0.pid").read_text())
                os.kill(out["pid"], signal.SIGKILL)
                return
        time.sleep(0.1)


def test_killing_one_process_ends_the_run_clearly_without_adapter(shell, tiny_model_dir, tmp_path):
    """%%lora_train --processes 2 in a real shell; worker rank 1 is killed mid-run."""
    import threading

    from IPython.core.error import UsageError

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    killed: dict = {}
    watcher = threading.Thread(target=_kill_rank1_once_training,
                               args=(tmp_path / "adapters" / ".jobs" / "doomed", killed), daemon=True)
    watcher.start()
    with pytest.raises(UsageError) as info:
        shell.run_cell_magic("lora_train", "doomed --data demo:support --processes 2 --launcher torchrun "
                             "--max-steps 5000 --batch-size 2 --no-widgets", "dropout: 0.0\nmax_seq_len: 96\n")
    watcher.join(5)
    msg = str(info.value)
    assert "pid" in killed
    assert f"rank 1 (pid {killed['pid']}) was killed by signal SIGKILL" in msg
    assert "no adapter was written" in msg and "launch.log" in msg
    assert not (tmp_path / "adapters" / "doomed").exists()
    assert _files(tmp_path, "adapter_model.safetensors") == []
    assert not list((tmp_path / "adapters").glob(".doomed.tmp-*"))  # no half-written folder either
    session = shell.magics_manager.registry["FtMagics"].session
    assert "doomed" not in session.adapters and len(session.runs) == 0
    with pytest.raises(ProcessLookupError):  # the other worker was ended too
        os.kill(killed["rank0"], 0)


class _InterruptAt(Listener):
    def __init__(self, step: int) -> None:
        self.step = step
        self.fired = False

    def on_step(self, e: StepEnd) -> None:
        if not self.fired and e.step >= self.step:
            self.fired = True
            raise KeyboardInterrupt  # what the kernel's interrupt does to the cell that waits on the job


def test_interrupt_stops_every_process_and_keeps_the_adapter(tiny_session, tmp_path):
    s = tiny_session
    rec = Recorder()
    result = s.train_processes("halt", "demo:support", dict(FAST, max_steps=5000, batch_size=2), processes=2,
                               launcher="torchrun", listeners=[rec, _InterruptAt(2)])
    assert result.status == "interrupted"
    assert 2 <= result.steps < 50  # stopped at a step boundary soon after, both ranks together
    assert (tmp_path / "adapters" / "halt" / "adapter_model.safetensors").exists()
    assert any("every process stops" in m.text for m in rec.of(Message))
    assert "halt" in s.adapters


def test_an_interrupted_run_on_two_processes_resumes_on_two_processes(tiny_session, tmp_path):
    """--resume with --processes was refused ("not yet"): a two-process run that was interrupted could only be
    continued on one process, at another global batch. Now the processes resume from the latest checkpoint
    (each rank its own RNG state), the record keeps the whole curve, and nothing to resume is said before any
    process starts."""
    s = tiny_session
    cfg = dict(FAST, max_steps=10, batch_size=2, save_every=3)
    first = s.train_processes("res", "demo:support", cfg, processes=2, launcher="torchrun",
                              listeners=[Recorder(), _InterruptAt(2)])
    assert first.status == "interrupted" and 2 <= first.steps < 10
    ckpt = tmp_path / "adapters" / ".checkpoints" / "res" / f"checkpoint-{first.steps}"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    rec = Recorder()
    done = s.train_processes("res", "demo:support", cfg, processes=2, launcher="torchrun", resume=True,
                             listeners=[rec])
    assert done.status == "completed" and done.steps == 10
    assert done.record["resumed"]["at"] == first.steps
    assert [st for st, _ in done.record["loss_history"]] == list(range(1, 11))  # the whole curve, once each
    assert [e.step for e in rec.of(StepEnd)] == list(range(first.steps + 1, 11))
    texts = [m.text for m in rec.of(Message)]
    assert any(f"resuming 'res' from checkpoint-{first.steps}" in t for t in texts), texts
    assert not any("global batch of" in t for t in texts)  # the same processes: the same global batch
    assert not (tmp_path / "adapters" / ".checkpoints" / "res").exists()  # a completed run keeps none
    with pytest.raises(FtUsageError, match="no complete checkpoint of 'other' to resume from"):
        s.train_processes("other", "demo:support", cfg, processes=2, resume=True, listeners=[])
    assert not (tmp_path / "adapters" / ".jobs" / "other").exists()  # refused before a job was written


def test_exported_job_runs_from_a_clean_shell_and_loads_in_the_notebook(shell, tiny_model_dir, tmp_path):
    """%lora_export_job with notebook data -> `ft-magics train` (2 processes via accelerate) in a clean
    environment -> %lora_adapters load in the notebook."""
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    rows = [json.loads(l) for l in (ROOT / "ft_magics" / "data" / "support.jsonl").read_text().splitlines()[:64]]
    shell.user_ns["my_rows"] = rows
    shell.run_cell_magic("lora_export_job", "exported jobdir --data my_rows --processes 2 --max-steps 3 --batch-size 4",
                         "r: 8\ndropout: 0.0\nmax_seq_len: 96\n")
    job_dir = tmp_path / "jobdir"
    assert (job_dir / "data.jsonl").read_text().count("\n") == 64  # the variable crossed as a file
    spec = __import__("yaml").safe_load((job_dir / "job.yaml").read_text())
    assert spec["data"] == "data.jsonl" and spec["processes"] == 2 and spec["settings"]["max_steps"] == 3

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FT_MAGICS_HOME": os.environ["FT_MAGICS_HOME"]}
    done = subprocess.run(["ft-magics", "train", str(job_dir / "job.yaml")], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "accelerate.commands.launch" in done.stdout and "completed after 3 steps" in done.stdout
    assert "Press Ctrl-C to stop" in done.stdout and "Interrupt the kernel" not in done.stdout  # a terminal's words
    adapter = job_dir / "adapters" / "exported"
    record = json.loads((adapter / "ft_run.json").read_text())
    assert record["launch"]["processes"] == 2 and record["steps"] == 3
    # --resume of the completed job is refused before any launcher starts or model loads (it loaded the model in
    # every process, then refused)
    again = subprocess.run(["ft-magics", "train", str(job_dir / "job.yaml"), "--resume"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "'exported' completed its run (3 steps" in again.stderr, again.stderr[-2000:]
    assert "running:" not in again.stdout and "Loading" not in again.stdout + again.stderr

    shell.run_line_magic("lora_adapters", f"load {adapter}")
    magics = shell.magics_manager.registry["FtMagics"]
    assert magics.session.adapters.active == "exported"
    assert magics.session.adapters.require("exported").steps == 3


def _two_process_job(tmp_path: Path, model_dir: Path, name: str, **settings) -> Path:
    """A job of the tiny model in fp32 on two processes, demo:support, FAST settings with ``settings`` over them."""
    from ft_magics.core.jobs import JobSpec, write_job
    from ft_magics.config import TrainConfig

    return write_job(tmp_path / "job", JobSpec(
        name=name, model={"source": str(model_dir), "bits": 32, "dtype": "fp32"}, data="demo:support",
        settings=TrainConfig.from_dict(dict(FAST, **settings)).to_dict(), processes=2))


def _result_in_fresh_interpreter(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter (nothing imported that blocks a fork); its printed 'RESULT {json}'."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads([l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):])


def test_notebook_launcher_forks_where_it_can(tiny_model_dir, tmp_path):
    """accelerate's notebook_launcher in a fresh interpreter (nothing imported that blocks a fork)."""
    job = _two_process_job(tmp_path, tiny_model_dir, "forked", max_steps=3, batch_size=4)
    code = (
        "import sys, json\n"
        "from ft_magics.core.jobs import run_job, notebook_launcher_blocker\n"
        "from ft_magics.core.events import Recorder, StepEnd\n"
        "assert notebook_launcher_blocker() is None, notebook_launcher_blocker()\n"
        "rec = Recorder()\n"
        f"out = run_job({str(job)!r}, 2, 'notebook', [rec])\n"
        "print('RESULT', json.dumps({'status': out.status, 'adapter': out.adapter_path,\n"
        "      'steps': [e.step for e in rec.of(StepEnd)], 'procs': out.record['launch']['processes'],\n"
        "      'texts': [m.text for m in rec.events if type(m).__name__ == 'Message']}))\n"
    )
    out = _result_in_fresh_interpreter(code, tmp_path)
    assert out["status"] == "completed" and out["steps"] == [1, 2, 3] and out["procs"] == 2
    assert any("notebook launcher" in t for t in out["texts"])
    assert out["adapter"] == str((tmp_path / "job" / "adapters" / "forked").resolve())


def test_an_interrupted_notebook_launcher_job_keeps_its_saved_adapter(tiny_model_dir, tmp_path):
    """An interrupt of a job on accelerate's notebook launcher reached the processes, and rank 0 saved the adapter
    (interrupted), but the cell reported a failure: torch's elastic launcher turns the kernel's SIGINT into a
    SignalException, which was read as the job's error."""
    job = _two_process_job(tmp_path, tiny_model_dir, "cut", max_steps=400, batch_size=4)
    code = (
        "import json, os, signal\n"
        "from ft_magics.core.jobs import run_job\n"
        "from ft_magics.core.events import StepEnd\n"
        "sent = []\n"
        "def interrupt(ev):\n"
        "    if isinstance(ev, StepEnd) and ev.step >= 2 and not sent:\n"
        "        sent.append(ev.step); os.kill(os.getpid(), signal.SIGINT)  # the kernel's interrupt\n"
        f"out = run_job({str(job)!r}, 2, 'notebook', [interrupt])\n"
        "print('RESULT', json.dumps({'status': out.status, 'adapter': out.adapter_path, 'steps': out.record['steps']}))\n"
    )
    out = _result_in_fresh_interpreter(code, tmp_path)
    assert out["status"] == "interrupted" and 2 <= out["steps"] < 400, out
    adapter = Path(out["adapter"])
    assert json.loads((adapter / "ft_run.json").read_text())["status"] == "interrupted"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0


@pytest.mark.slow
def test_demo_model_qlora_on_two_processes(tmp_path):
    """The demo job as QLoRA (4-bit NF4) on two CPU processes: completes, one adapter, loads back."""
    from ft_magics import Session

    s = Session(adapters_dir=tmp_path / "adapters")
    s.load("demo", bits=4)
    rec = Recorder()
    result = s.train_processes("demo-2p", "demo:support", dict(max_steps=3, batch_size=4, max_seq_len=256),
                               processes=2, listeners=[rec])
    assert result.status == "completed" and result.steps == 3
    assert result.record["base_model"]["bits"] == 4 and result.record["launch"]["processes"] == 2
    assert _files(tmp_path, "adapter_model.safetensors") == [tmp_path / "adapters" / "demo-2p" / "adapter_model.safetensors"]
    assert [e.step for e in rec.of(StepEnd)] == [1, 2, 3]
    assert s.adapters.active == "demo-2p"
    assert s.generate("How do I reset my password?", max_new_tokens=8).new_tokens > 0


def test_fsdp_layout_is_refused_with_the_reason_and_the_alternative(monkeypatch, tmp_path, capsys):
    """Under accelerate's FSDP layout the worker stops before loading anything and says to use DDP."""
    from ft_magics import train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert train.main([str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert "FSDP + QLoRA is not wired" in err and "accelerate-multi-gpu.yaml" in err
    assert not (tmp_path / "adapters").exists()


def _stop_flag_rank(rank: int, world: int, port: int, stop_file: str, out: str) -> None:
    import torch.distributed as dist

    from ft_magics.train import SharedStopFlag

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        flag = SharedStopFlag(stop_file if rank == 1 else None)  # only rank 1 reads the interrupt
        agreed = flag.is_set()
        Path(out, f"rank{rank}").write_text(f"{agreed} {flag.reason}")
    finally:
        dist.destroy_process_group()


def test_every_rank_records_the_interrupt_that_one_rank_read(tmp_path):
    """The stop is agreed by all-reduce; the reason travels with it, so rank 0 (which writes the run's
    status) says 'interrupted' even when only another rank read the STOP file."""
    import socket

    import torch.multiprocessing as mp

    stop = tmp_path / "STOP"
    stop.write_text("interrupted\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_stop_flag_rank, args=(2, port, str(stop), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0").read_text() == "True interrupted"
    assert (tmp_path / "rank1").read_text() == "True interrupted"


def test_dpo_on_two_processes_matches_one_process(tiny_session, tmp_path):
    """Under DDP each rank scores its own pairs against the base (the adapter switched off, past the DDP
    wrapper, no gradient) and the policy pass goes through the wrapper: 2 processes at batch 4 == 1 at batch 8."""
    s = tiny_session
    cfg = dict(FAST, objective="dpo", learning_rate=5e-3)
    rec_two, rec_one = Recorder(), Recorder()
    two = s.train_processes("two", "demo:support-pairs", dict(cfg, batch_size=4), processes=2, listeners=[rec_two])
    one = s.train("one", "demo:support-pairs", dict(cfg, batch_size=8), listeners=[rec_one])
    assert two.status == one.status == "completed"
    curve_two = [l for _, l in two.record["loss_history"]]
    curve_one = [l for _, l in one.record["loss_history"]]
    assert abs(curve_one[0] - 0.6931) < 1e-3 and curve_one[-1] < curve_one[0] - 0.05  # from log 2, and it learns
    worst = max(abs(a - b) for a, b in zip(curve_one, curve_two))
    assert len(curve_two) == len(curve_one) and worst < 0.01, (curve_one, curve_two)
    # "pairs right" counts both processes' pairs, as the loss does: what one process gives on the whole batch (each
    # step's 8 pairs; at step 1 every pair is a tie, the adapter being the base, and a tie counts as half)
    right_one = [e.pairs_right for e in rec_one.of(StepEnd)]
    right_two = [e.pairs_right for e in rec_two.of(StepEnd)]
    assert right_one[0] == right_two[0] == 0.5 and len(right_one) == len(right_two) == 6
    assert sum(abs(a - b) for a, b in zip(right_one, right_two)) <= 0.125, (right_one, right_two)


def test_ddp_searches_for_unused_weights_only_in_mixture_of_experts_models(tmp_path):
    """An expert no token reached in a step leaves its LoRA weights unused, which DDP must be told to expect;
    any other model uses every LoRA weight in each step, so the per-step search is off."""
    from types import SimpleNamespace

    from ft_magics.config import TrainConfig
    from ft_magics.core.training import _training_args

    def find_unused(config):
        return _training_args(TrainConfig.from_dict({}), str(tmp_path), "cpu", None, False,
                              config).ddp_find_unused_parameters

    assert find_unused(SimpleNamespace(num_hidden_layers=2)) is False
    assert find_unused(SimpleNamespace(num_local_experts=8)) is True  # Mixtral
    assert find_unused(SimpleNamespace(num_experts=0)) is False


def test_the_printed_run_commands_quote_a_job_folder_with_a_space(shell, tiny_model_dir, tmp_path, capsys):
    """`ft-magics train .../with space/job.yaml` was printed unquoted (and so in job.yaml's header): pasted into a
    shell it failed with 'unrecognized arguments: space/job.yaml'."""
    import shlex

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    capsys.readouterr()
    shell.run_cell_magic("lora_export_job", 'j "jobs/with space" --data demo:support', "max_steps: 2\n")
    out = capsys.readouterr().out
    job = tmp_path / "jobs" / "with space" / "job.yaml"
    header = [l[len("#   "):] for l in job.read_text().splitlines() if l.startswith("#   ")]
    printed = [l.strip() for l in out.splitlines() if l.strip().startswith(("ft-magics train", "accelerate launch"))]
    assert len(printed) == len(header) == 2 and printed == header
    assert shlex.split(printed[0]) == ["ft-magics", "train", str(job)]
    assert shlex.split(printed[1])[-1] == str(job) and str(job.parent / "accelerate.yaml") in shlex.split(printed[1])


def test_an_exported_jobs_output_dir_is_read_from_the_working_folder(shell, tiny_model_dir, tmp_path, capsys):
    """`--output-dir out` was written to job.yaml as given and so read from the job folder (jobs/j/out/NAME),
    where %%lora_train --output-dir and the data files are read from the working folder."""
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    capsys.readouterr()
    shell.run_cell_magic("lora_export_job", "j jobs/j --data demo:support --output-dir out", "max_steps: 1\n")
    from ft_magics.core.jobs import load_job

    assert load_job(tmp_path / "jobs" / "j" / "job.yaml").adapter_dir == tmp_path / "out" / "j"
    assert f"adapter will be saved to {tmp_path / 'out' / 'j'}" in capsys.readouterr().out
    shell.run_cell_magic("lora_export_job", "k jobs/k --data demo:support", "max_steps: 1\n")  # the default stays
    assert load_job(tmp_path / "jobs" / "k" / "job.yaml").adapter_dir == tmp_path / "jobs" / "k" / "adapters" / "k"


def test_an_exported_job_reads_what_the_notebook_run_reads(shell, tiny_model_dir, tmp_path):
    """--processes and %%lora_export_job trained on a folder named like the notebook variable (the notebook run
    reads the variable), dropped a dict of splits' eval split, and did not pass --allow-pickle to the workers."""
    import yaml

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "f.jsonl").write_text(json.dumps({"prompt": "FILE", "completion": "folder"}) + "\n")
    shell.user_ns["mydata"] = [{"prompt": f"VARIABLE {i}", "completion": "v"} for i in range(6)]
    shell.run_cell_magic("lora_export_job", "v jobs/v --data mydata", "max_steps: 1\n")
    job = tmp_path / "jobs" / "v"
    spec = yaml.safe_load((job / "job.yaml").read_text())
    assert spec["data"] == "data.jsonl" and "VARIABLE 5" in (job / "data.jsonl").read_text()
    assert spec["model"]["allow_pickle"] is False and spec["model"]["device"] == "cpu"
    shell.user_ns["dd"] = {"train": shell.user_ns["mydata"], "validation": [{"prompt": "HELD", "completion": "o"}]}
    shell.run_cell_magic("lora_export_job", "d jobs/d --data dd", "max_steps: 1\n")
    spec = yaml.safe_load((tmp_path / "jobs" / "d" / "job.yaml").read_text())
    assert spec["eval_data"] == "eval.jsonl" and "HELD" in (tmp_path / "jobs" / "d" / "eval.jsonl").read_text()
    assert "HELD" not in (tmp_path / "jobs" / "d" / "data.jsonl").read_text()


def test_ft_magics_train_passes_an_interrupt_on_to_its_workers(shell, tiny_model_dir, tmp_path):
    """SIGINT to `ft-magics train` (2 processes) killed the launcher and left both workers training, orphaned,
    with a KeyboardInterrupt traceback; SIGTERM left launcher and workers running. Now the signal reaches the
    workers, which stop at their next step and save, and ft-magics waits for them."""
    import signal
    import time

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.user_ns["rows"] = [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(32)]
    shell.run_cell_magic("lora_export_job", "long job --data rows --processes 2",
                         "max_steps: 1000000\nbatch_size: 2\nmax_seq_len: 32\nr: 4\n")
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FT_MAGICS_HOME": os.environ["FT_MAGICS_HOME"]}
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen(["ft-magics", "train", str(tmp_path / "job" / "job.yaml"), "--events", str(events)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (events.exists() and events.read_text().count('"StepEnd"') >= 3):
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    pids = [int(p.read_text()) for p in (tmp_path / "job").glob("rank*.pid")]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert "KeyboardInterrupt" not in out.split("SignalException")[0], out[-3000:]
    for pid in pids:  # no worker left running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    record = json.loads((tmp_path / "job" / "adapters" / "long" / "ft_run.json").read_text())
    assert record["status"] == "interrupted" and 3 <= record["steps"] < 1000000
    assert not list((tmp_path / "job").glob("rank*.pid"))  # the workers' pid files go with them


def test_a_launcher_that_exits_with_an_error_after_rank_0_saved_an_interrupted_run_is_not_a_failure(tmp_path,
                                                                                                        monkeypatch):
    """Ctrl-C twice after rank 0 had saved: the launcher exited 1 and the cell said 'the previous adapter there is
    unchanged' (it was replaced) and did not load it. A launcher that ends with an error after an interrupted run's
    adapter is whole is read by that adapter."""
    import ft_magics.core.jobs as jobs
    from ft_magics.config import TrainConfig
    from ft_magics.core.events import TrainEnd, to_json

    job = jobs.write_job(tmp_path / "job", jobs.JobSpec(name="cut", model={"source": "x", "bits": 32}, data="d.jsonl",
                                                        settings=TrainConfig().to_dict()))
    adapter = tmp_path / "job" / "adapters" / "cut"
    adapter.mkdir(parents=True)
    (adapter / "ft_run.json").write_text(json.dumps({"status": "interrupted", "steps": 5}))
    end = to_json(TrainEnd(run_name="cut", status="interrupted", steps=5, final_loss=1.0, elapsed_s=1.0,
                           adapter_path=str(adapter)))
    script = ("import json, os, sys; from pathlib import Path; "
              f"Path(sys.argv[1]).write_text(json.dumps({end!r}) + chr(10)); sys.exit(1)")
    monkeypatch.setattr(jobs, "launch_command", lambda job_path, processes, launcher, events, resume=False: [
        sys.executable, "-c", script, str(events)])
    outcome = jobs.run_job(job, 2, "accelerate", [], poll_s=0.05)
    assert outcome.status == "interrupted" and outcome.adapter_path == str(adapter) and outcome.returncode == 1


def test_a_run_whose_rank_0_died_reports_the_steps_it_made(tmp_path, monkeypatch):
    """Rank 0 killed after 30 steps: no end event came, and the run read 'failed after 0 steps'."""
    import ft_magics.core.jobs as jobs
    from ft_magics.config import TrainConfig
    from ft_magics.core.events import Recorder, StepEnd, to_json

    job = jobs.write_job(tmp_path / "job", jobs.JobSpec(name="doomed", model={"source": "x", "bits": 32},
                                                        data="d.jsonl", settings=TrainConfig().to_dict()))
    step = to_json(StepEnd(step=7, total_steps=100, epoch=0.1, loss=1.0, learning_rate=1e-4, grad_norm=1.0,
                           elapsed_s=1.0, eta_s=None, tokens_per_s=1.0))
    script = ("import json, sys; from pathlib import Path; "
              f"Path(sys.argv[1]).write_text(json.dumps({step!r}) + chr(10)); sys.exit(1)")
    monkeypatch.setattr(jobs, "launch_command", lambda job_path, processes, launcher, events, resume=False: [
        sys.executable, "-c", script, str(events)])
    rec = Recorder()
    with pytest.raises(jobs.JobFailed):
        jobs.run_job(job, 2, "accelerate", [rec], poll_s=0.05)
    end = [e for e in rec.events if type(e).__name__ == "TrainEnd"][-1]
    assert end.status == "failed" and end.steps == 7


def test_two_processes_report_the_eval_loss_one_process_and_lora_eval_give(tiny_session, tmp_path):
    """3 eval rows on 2 processes: the dataloader repeats rows to even out the processes, and the run's eval loss
    counted them twice (5.9351 where %lora_eval gave 5.9405); keep_best and early stopping decide on it."""
    s = tiny_session
    rows = [json.loads(l) for l in (ROOT / "ft_magics" / "data" / "support.jsonl").read_text().splitlines()]
    evals = rows[-3:]
    two = s.train_processes("ev2", rows[:-3], dict(FAST, batch_size=4, group_by_length=False), processes=2,
                            eval_data=evals, listeners=[])
    report = s.evaluate("ev2", evals, general=False, max_seq_len=FAST["max_seq_len"])
    scored = report.results[(report.sets[0], "ev2")][0]
    assert two.record["eval_loss"] == pytest.approx(scored, rel=1e-4), (two.record["eval_loss"], report.results)


def test_only_the_first_process_marks_a_checkpoint_and_a_file_renamed_mid_walk_is_no_crash(tmp_path, monkeypatch):
    """On two processes the second walked the checkpoint folder while the first was still writing it: it crashed
    the run on a temporary file renamed away (FileNotFoundError), and marked checkpoints not yet written."""
    import threading
    from types import SimpleNamespace

    from ft_magics.config import TrainConfig
    from ft_magics.core import checkpoints

    flag = threading.Event()
    flag.saving = True
    callback = checkpoints.make_callback(TrainConfig.from_dict({}), flag, {"name": "bot"})
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    (folder / ".tmpABC").write_bytes(b"partial")
    args = SimpleNamespace(output_dir=str(tmp_path))
    callback.on_save(args, SimpleNamespace(global_step=4, is_world_process_zero=False), None)
    assert not (folder / checkpoints.COMPLETE_MARKER).exists() and not flag.saving
    real_open = open

    def vanishing(path, *a, **kw):  # the first process renames its temporary file away meanwhile
        if str(path).endswith(".tmpABC"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", vanishing)
    callback.on_save(args, SimpleNamespace(global_step=4, is_world_process_zero=True), None)
    monkeypatch.undo()
    assert (folder / checkpoints.COMPLETE_MARKER).exists() and json.loads((folder / checkpoints.META).read_text())["step"] == 4


def test_a_job_stops_at_its_next_step_when_the_notebook_that_started_it_is_killed(monkeypatch, tmp_path):
    """A kernel killed mid-run left torchrun and its workers training on: a new kernel was offered --resume on
    checkpoints they went on writing, and the orphans then wrote the adapter."""
    from ft_magics.core import jobs
    from ft_magics.train import SharedStopFlag

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    monkeypatch.setenv("FT_MAGICS_NOTEBOOK_PID", str(os.getpid()))
    assert not SharedStopFlag().is_set()
    monkeypatch.setenv("FT_MAGICS_NOTEBOOK_PID", str(gone.pid))
    flag = SharedStopFlag()
    assert flag.is_set() and flag.reason == "stopped"  # the adapter is saved, as after %lora_stop
    monkeypatch.delenv("FT_MAGICS_NOTEBOOK_PID")
    assert not SharedStopFlag().is_set()  # ft-magics train from a shell: no notebook to watch
    # the launcher passes its own pid down
    seen = {}
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda cmd, **kw: seen.update(kw["env"]) or (_ for _ in ()).throw(
        RuntimeError("stop here")))
    job = jobs.write_job(tmp_path / "job", jobs.JobSpec(name="a", model={"source": "demo", "bits": 4, "dtype": "auto"},
                                                        data="data.jsonl", settings={"max_steps": 3}, processes=2))
    with pytest.raises(RuntimeError, match="stop here"):
        jobs.run_job(job, 2, "torchrun", listeners=[])
    assert seen["FT_MAGICS_NOTEBOOK_PID"] == str(os.getpid())


def test_finishing_a_run_whose_checkpoints_folder_another_process_removed_is_no_crash(tmp_path, monkeypatch):
    """Both processes of a completed two-process run remove its checkpoints: the second found the folder gone
    between its look and its rmdir, and the run failed at its very end (FileNotFoundError)."""
    from pathlib import Path as P

    from ft_magics.core import checkpoints

    root = tmp_path / checkpoints.CHECKPOINTS_DIRNAME / "res"
    root.mkdir(parents=True)
    real_rmdir = P.rmdir

    def raced(self):  # the other process got there first
        real_rmdir(self)
        real_rmdir(self)

    monkeypatch.setattr(P, "rmdir", raced)
    checkpoints.finish(root, "completed")
    assert not root.parent.exists()

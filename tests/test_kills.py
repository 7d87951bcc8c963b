"""Interrupted and killed training: random SIGKILLs (at steps and mid-save) and SIGINTs, and a real
Jupyter kernel interrupted during ``%%lora_train``. Every surviving adapter loads; every resume completes
and reproduces the uninterrupted loss curve. ``make soak`` runs the same harness with many more kills."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "kill_harness.py"


def _run_harness(model_dir, workdir, sigkill, sigint, seed, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--model", str(model_dir), "--workdir", str(workdir),
         "--sigkill", str(sigkill), "--sigint", str(sigint), "--seed", str(seed)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT),
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"harness printed no result (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][7:])


def test_random_sigkills_and_sigints_leave_only_valid_folders_and_resumes_complete(tiny_model_dir, tmp_path):
    summary = _run_harness(tiny_model_dir, tmp_path / "kills", sigkill=20, sigint=3, seed=20261129)
    print("\nkill harness:", json.dumps({k: v for k, v in summary.items() if k not in ("trials", "reference_losses")}))
    assert summary["failures"] == []
    assert summary["sigkill"] == 20 and summary["sigint"] == 3
    # both kinds of SIGKILL happened: at a step and in the middle of writing files
    assert summary["sigkill_mid_save"] >= 5 and summary["sigkill_at_step"] >= 5
    # every trial's run was completed afterwards (by resuming, or from scratch when no checkpoint survived)
    assert summary["resumes_completed"] == 23
    assert summary["resumed_from_scratch"] < 20, "most kills should leave a checkpoint to resume from"
    # the resumed runs reproduce the uninterrupted run's loss curve exactly (same seed, CPU)
    assert summary["curve_mismatches"] == []
    # kills mid-save did leave half-written checkpoints behind, and the integrity check rejected them
    assert summary["incomplete_checkpoints_seen"] >= 1
    # every trial leaves exactly one visible adapter folder (the old one or the new one), and it loads
    assert summary["adapters_verified"] == 23


# ------------------------------------------------------------------ a real kernel, interrupted
def _start_kernel(cwd: Path):
    jupyter_client = pytest.importorskip("jupyter_client")
    from jupyter_client import KernelManager

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(cwd), env=env)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    return km, kc


def _execute(kc, code, timeout=300, on_output=None, then=None):
    """Run ``code``; return (status, text output). ``on_output(text_so_far)`` may act mid-cell. With ``then``, a
    second cell is queued right behind it, and its reply's status is returned third."""
    msg_id = kc.execute(code)
    then_id = kc.execute(then) if then is not None else None
    out = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"cell timed out; output so far:\n{''.join(out)[-3000:]}"
        try:
            msg = kc.get_iopub_msg(timeout=min(remaining, 5))
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
            if on_output is not None:
                on_output("".join(out))
        elif kind == "error":
            out.append(f"{content['ename']}: {content['evalue']}\n")
        elif kind in ("execute_result", "display_data"):
            out.append(content.get("data", {}).get("text/plain", "") + "\n")
        elif kind == "status" and content["execution_state"] == "idle":
            break
    reply = kc.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=60)
    if then_id is None:
        return reply["content"]["status"], "".join(out)
    queued = kc.get_shell_msg(timeout=120)
    while queued["parent_header"].get("msg_id") != then_id:
        queued = kc.get_shell_msg(timeout=120)
    return reply["content"]["status"], "".join(out), queued["content"]["status"]


def test_kernel_interrupt_during_lora_train_saves_adapter_and_resumes(tiny_model_dir, tmp_path):
    km, kc = _start_kernel(tmp_path)
    try:
        st, out = _execute(kc, f"%load_ext ft_magics\n%qlora_load {tiny_model_dir} --bits 32", timeout=180)
        assert st == "ok", out
        cell = ("%%lora_train bot --data demo:support --no-widgets --max-steps 40 --batch-size 2 --save-every 4 "
                "--max-seq-len 64 --log-every 1\nr: 4\n")
        for round_, n_interrupts in ((1, 1), (2, 2)):  # the second time: two interrupts in quick succession
            sent = {"done": False}

            def interrupt(text, n=n_interrupts, sent=sent):
                if not sent["done"] and text.count("step ") >= 2:
                    sent["done"] = True
                    for _ in range(n):
                        km.interrupt_kernel()
                        time.sleep(0.05)

            code = cell if round_ == 1 else cell.replace("--log-every 1", "--log-every 1 --resume")
            # round 1 queues a cell behind the training one, as Run All or Shift+Enter twice does
            then = "print('the queued cell ran')" if round_ == 1 else None
            res = _execute(kc, code, timeout=300, on_output=interrupt, then=then)
            (st, out), queued = res[:2], (res[2] if then else None)
            assert sent["done"], out
            # the cell ends as an error (no KeyboardInterrupt traceback), so Jupyter skips the cells queued after
            # it, as an interrupt does anywhere else: the next queued training cell used to start
            assert st == "error" and "UsageError: training 'bot' was interrupted at step" in out, out
            assert "The interrupt also skips the cells queued after this one" in out and "Traceback" not in out, out
            if round_ == 1:
                assert queued == "aborted", queued
            assert "interrupt received" in out, out
            assert "interrupted after" in out, out
            assert "adapter saved to" in out and "--resume" in out, out
            st, out2 = _execute(kc, "from ft_magics.core.adapters import read_adapter_folder\n"
                                    "import json, pathlib\nrec = json.loads(pathlib.Path('adapters/bot/ft_run.json')"
                                    ".read_text())\nprint(read_adapter_folder(pathlib.Path('adapters/bot'))['r'],"
                                    " rec['status'], rec['steps'])")
            assert st == "ok" and out2.split()[:2] == ["4", "interrupted"], out2
            steps = int(out2.split()[2])
            assert 2 <= steps < 40
            if round_ == 2:
                assert "resuming 'bot' from checkpoint-" in out, out
        # the model is still usable after the interrupts
        st, out = _execute(kc, "%%lora_generate --adapter bot --max-new-tokens 3 --no-stream\nHello")
        assert st == "ok" and "3 tokens" in out, out
        # and the run finishes from its latest checkpoint
        st, out = _execute(kc, cell.replace("--log-every 1", "--log-every 1 --resume"), timeout=300)
        assert st == "ok" and "'bot' completed after 40 steps" in out, out
        assert not (tmp_path / "adapters" / ".checkpoints" / "bot").exists()  # completed: checkpoints cleaned
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

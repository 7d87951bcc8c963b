"""The widgets in a real browser: JupyterLab + Debian's chromium driven by Python Playwright.

The set-up comes from the project's own files: ``make browser-deps`` installs chromium with apt when
/usr/bin/chromium is missing, and jupyterlab + playwright are in the ``test`` extra. Playwright's own
browser download is not used. The test starts a Jupyter server on 127.0.0.1 (free port, no token,
a temporary root folder), opens a short notebook that trains two adapters on the tiny model in the
dashboard, checks that the loss chart, progress and memory readout change during training, then
switches adapters by clicking the selector and checks that the model's answer changes. Screenshots
go to test-artifacts/.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ANSWERS = {"alpha": "billing billing billing", "beta": "hello world thanks"}
QUESTIONS = ["How do I reset my password?", "hello", "shipping?", "Category: account"]
TRAIN_BODY = "max_steps: 100\nbatch_size: 4\nr: 8\nlearning_rate: 1.0e-2\nlr_scheduler: constant\nwarmup: 0"


def _ensure_chromium() -> None:
    """Install chromium through the project's Makefile when it is missing; skip when that cannot work."""
    if os.access(CHROMIUM, os.X_OK):
        return
    if shutil.which("apt-get") is None or shutil.which("make") is None:
        pytest.skip(f"{CHROMIUM} is missing and this machine has no apt-get to install it (make browser-deps)")
    proc = subprocess.run(["make", "-C", str(ROOT), "browser-deps"], capture_output=True, text=True, timeout=900)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"`make browser-deps` could not install chromium: {proc.stderr[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cell(source: str) -> dict:
    return {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": source}


def _write_notebook(root: Path, model_dir: Path) -> Path:
    for name, answer in ANSWERS.items():
        rows = [{"prompt": q, "completion": answer} for q in QUESTIONS * 4]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cells = [
        _cell(f"%load_ext ft_magics\n%qlora_load {model_dir} --bits 32"),
        _cell(f"%%lora_train alpha --data alpha.jsonl\n{TRAIN_BODY}"),
        _cell(f"%%lora_train beta --data beta.jsonl\n{TRAIN_BODY}"),
        _cell("%lora_adapters"),
        _cell("%%lora_generate --max-new-tokens 8 --no-stream\nHow do I reset my password?"),
        _cell("%lora_chat --max-new-tokens 8"),
    ]
    nb = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = root / "widgets_test.ipynb"
    path.write_text(json.dumps(nb, indent=1))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_model_dir):
    """A JupyterLab server on 127.0.0.1 serving a temporary folder; stopped (with its kernels) at the end."""
    _ensure_chromium()
    pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[test]'")
    pytest.importorskip("jupyterlab", reason="jupyterlab is missing: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("lab")
    home = tmp_path_factory.mktemp("jupyter-home")
    _write_notebook(root, tiny_model_dir)
    port = _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "jupyter-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--ServerApp.port_retries=0", "--ServerApp.terminals_enabled=False"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"jupyter lab did not answer on {url} within 120 s; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        log.close()


STATE_JS = """() => Array.from(document.querySelectorAll('.ft-dashboard')).map(d => {
  // the chart the scale toggle shows (a linear and a log one are both drawn)
  const chart = Array.from(d.querySelectorAll('svg.ft-loss-chart')).find(s => s.getBoundingClientRect().width > 0);
  const ema = chart ? chart.querySelector('.ft-loss-ema') : null;
  const bar = d.querySelector('.ft-progress .progress-bar, .ft-progress .widget-progress .progress-bar');
  const text = sel => { const e = d.querySelector(sel); return e ? e.textContent : null; };
  return {
    chart: chart ? chart.querySelector('title').textContent : null,
    emaWidth: ema ? ema.getBBox().width : 0,
    progress: text('.ft-progress-text'),
    memory: text('.ft-memory'),
    record: text('.ft-record'),
    logAxis: chart ? chart.textContent.includes('loss (log)') : false,
  };
})"""


def _cell_locator(page, i):
    return page.locator(".jp-Notebook .jp-Cell").nth(i)


def _output_text(page, i) -> str:
    return _cell_locator(page, i).locator(".jp-OutputArea").inner_text()


def test_dashboard_and_adapter_switcher_in_jupyterlab(lab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(60_000)
            page.goto(f"{lab}/lab/tree/widgets_test.ipynb")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            # JupyterLab may still ask which kernel to start (the notebook names python3): accept its choice
            try:
                page.wait_for_selector(".jp-Dialog .jp-mod-accept", timeout=10_000)
                page.click(".jp-Dialog .jp-mod-accept")
            except PlaywrightTimeout:
                pass
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            page.screenshot(path=str(ARTIFACTS / "browser-0-opened.png"))

            # Run > Run All Cells, then watch the dashboards while they train.
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            seen: dict = {}
            mid_shot = False
            log_clicked = log_live = False
            deadline = time.time() + 300
            while time.time() < deadline:
                for i, st in enumerate(page.evaluate(STATE_JS)):
                    s = seen.setdefault(i, {"chart": set(), "progress": [], "memory": set(), "record": ""})
                    if st["chart"]:
                        s["chart"].add(st["chart"])
                    if st["progress"] and (not s["progress"] or s["progress"][-1] != st["progress"]):
                        s["progress"].append(st["progress"])
                    if st["memory"]:
                        s["memory"].add(st["memory"])
                    s["record"] = st["record"] or ""
                    if not mid_shot and i == 1 and len(s["progress"]) >= 2 and not s["record"]:
                        page.screenshot(path=str(ARTIFACTS / "browser-1-training.png"))
                        mid_shot = True
                    # the log toggle while the run blocks the kernel: it waited for the run's end before
                    if i == 0 and not st["record"]:
                        if not log_clicked and len(s["progress"]) >= 2:
                            page.locator(".ft-dashboard").nth(0).locator("button", has_text="log").click()
                            log_clicked = True
                        elif log_clicked and st["logAxis"]:
                            log_live = True
                if page.locator(".ft-adapter-selector select").count() and "[beta" in _output_text(page, 4):
                    break
                errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
                failed = [t for t in errors.all_inner_texts() if "Error" in t or "Traceback" in t]
                if failed:
                    page.screenshot(path=str(ARTIFACTS / "browser-error.png"), full_page=True)
                    pytest.fail(f"a notebook cell failed: {failed[0][-2000:]}")
                page.wait_for_timeout(150)
            page.screenshot(path=str(ARTIFACTS / "browser-2-trained.png"), full_page=True)

            assert len(seen) == 2, f"expected two dashboards, saw {len(seen)}"
            assert log_clicked and log_live, "the log toggle did not switch the chart while the run trained"
            for i, s in seen.items():
                steps = [p.split("/")[0] for p in s["progress"] if "/" in p]
                # progress observed at several steps while training ran, ending at the last step
                assert len(set(steps)) >= 3, f"dashboard {i}: progress did not move live: {s['progress']}"
                assert s["progress"][-1].startswith("100/100"), s["progress"][-1]
                # the loss chart was redrawn during training (initial empty axes + live redraws + final)
                assert len(s["chart"]) >= 3, f"dashboard {i}: loss chart changed only {len(s['chart'])} times"
                assert any(t.startswith("loss curve: 100 steps") for t in s["chart"]), s["chart"]
                mem = [m for m in s["memory"] if m.startswith("RAM (CPU): process RSS")]
                assert mem, f"dashboard {i}: no labelled memory readout: {s['memory']}"
                assert len(s["memory"]) >= 2, f"dashboard {i}: memory readout never changed: {s['memory']}"
                assert "adapter saved to" in s["record"] and "loss_curve.svg" in s["record"]
            assert page.evaluate(
                "() => Array.from(document.querySelectorAll('svg.ft-loss-chart .ft-loss-ema'))"
                ".filter(l => l.getBoundingClientRect().width > 0)"
                ".map(l => l.getBBox().width > 100).filter(Boolean).length === 2")  # both curves drawn, wide

            # The adapter selector: switching by clicking it changes the model's answer.
            select = page.locator(".ft-adapter-selector select")
            options = select.locator("option").all_inner_texts()
            assert options == ["base", "alpha", "beta"]
            assert select.input_value() == "beta"  # the last trained adapter is active
            answers = {}
            for name in ("alpha", "beta"):
                select.select_option(name)
                page.wait_for_function(
                    "n => { const e = document.querySelector('.ft-adapter-status');"
                    " return e && e.textContent.startsWith('active: ' + n + ' (swapped in'); }", arg=name)
                page.screenshot(path=str(ARTIFACTS / f"browser-3-selected-{name}.png"), full_page=True)
                cell = _cell_locator(page, 4)
                cell.locator(".jp-InputArea-editor").click()
                page.keyboard.press("Control+Enter")
                page.wait_for_function(
                    "([i, n]) => { const c = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];"
                    " const o = c && c.querySelector('.jp-OutputArea'); return o && o.textContent.includes('[' + n + ' ·'); }",
                    arg=[4, name])
                out = _output_text(page, 4)
                answers[name] = out.split(f"[{name} ·")[0].strip()
            page.screenshot(path=str(ARTIFACTS / "browser-4-answers.png"), full_page=True)
            assert answers["alpha"] != answers["beta"], answers
            assert "billing" in answers["alpha"] and "hello" in answers["beta"], answers

            # The chat panel: each message answered by the adapter picked for it, in one conversation.
            page.wait_for_selector(".ft-chat-panel")
            chat_select = page.locator(".ft-chat-adapter select")
            assert chat_select.locator("option").all_inner_texts() == ["base", "alpha", "beta"]
            for name, message, expect in (("alpha", "How do I reset my password?", "billing"), ("beta", "hello", "hello")):
                chat_select.select_option(name)
                page.locator(".ft-chat-input textarea").fill(message)
                page.locator(".ft-chat-send").click()
                page.wait_for_function(
                    "n => { const e = document.querySelector('.ft-chat-status');"
                    " return e && e.textContent.startsWith(n + ' · '); }", arg=name)
            log = page.locator(".ft-chat-log").inner_text()
            page.screenshot(path=str(ARTIFACTS / "browser-5-chat.png"), full_page=True)
            assert log.index("How do I reset my password?") < log.index("hello"), log
            first, second = log.split("How do I reset my password?", 1)[1].split("\nyou\n", 1)
            assert first.lstrip().startswith("alpha") and "billing" in first, log
            assert "beta" in second and "hello world" in second.split("hello", 1)[1], log
            assert page.locator(".ft-chat-input textarea").input_value() == ""
        finally:
            browser.close()

"""Memory is given back without a kernel restart: %ft_unload, loading another model, after a failed cell
whose stored traceback holds the model, and after training (optimizer state)."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

# bitsandbytes logs a warning *with the import error as an argument* the first time it is imported; pytest's
# log capture keeps that record (and so the error's traceback and every frame above it) for the whole test.
# Import it here, at collection, so that frame chain is not a training run's (a notebook keeps no records).
import bitsandbytes  # noqa: E402,F401

ROOT = Path(__file__).resolve().parent.parent
DATA = [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(8)]


def _optimizers():
    import torch

    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)]


def test_loading_another_model_frees_the_previous_one(tiny_model_dir, tmp_path):
    from ft_magics import Session

    s = Session(adapters_dir=tmp_path / "adapters")
    s.load(str(tiny_model_dir), bits=32)
    s.train("bot", DATA, max_steps=2, batch_size=2, r=4)
    first = weakref.ref(s.handle.model)
    base = weakref.ref(s.handle.model.get_base_model())
    s.load(str(tiny_model_dir), bits=32)
    gc.collect()
    assert first() is None and base() is None
    assert not s.adapters.names()
    assert not _optimizers()


def test_unload_frees_model_adapters_and_optimizer_even_after_a_failed_cell(shell, tiny_model_dir):
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    magics = shell.magics_manager.registry["FtMagics"]
    s = magics.session
    s.train("bot", DATA, max_steps=2, batch_size=2, r=4)
    shell.user_ns["_ft_test"] = weakref.ref(s.handle.model)
    # a failing cell whose frames hold the model (the stored traceback keeps them alive)
    res = shell.run_cell(
        "def boom(model):\n"
        "    big = [p.detach().clone() for p in model.parameters()]\n"
        "    raise RuntimeError('boom')\n"
        "boom(get_ipython().magics_manager.registry['FtMagics'].session.model)\n"
    )
    assert res.error_in_exec is not None
    del res
    gc.collect()
    assert shell.user_ns["_ft_test"]() is not None  # held by the stored traceback
    shell.run_line_magic("ft_unload", "")
    gc.collect()
    assert shell.user_ns["_ft_test"]() is None
    assert s.handle is None and not s.adapters.names()
    assert not _optimizers()
    from ft_magics.core import data

    assert not data._TOKENIZED  # the remembered tokenisation of the training data went too


def test_unload_without_a_model_says_so(shell, capsys):
    shell.run_line_magic("ft_unload", "")
    out = capsys.readouterr().out
    assert out.startswith("no model was loaded (caches freed); process memory") and "model unloaded" not in out


MEASURE = r'''
import gc, json, os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from IPython.core.interactiveshell import InteractiveShell
from ft_magics.core.memory import rss_bytes, release_memory
sh = InteractiveShell.instance()
sh.run_line_magic("load_ext", "ft_magics")
import torch, transformers, peft  # imported before the baseline: libraries stay loaded by design
from transformers import AutoModelForCausalLM
release_memory()
out = {"before_load": rss_bytes()}
sh.run_line_magic("qlora_load", "demo --bits 32")
out["after_load"] = rss_bytes()
r = sh.run_cell("import torch\ndef boom(m):\n    x = torch.ones(64_000_000)\n    raise RuntimeError('failed cell')\n"
                "boom(get_ipython().magics_manager.registry['FtMagics'].session.model)")
assert r.error_in_exec is not None
del r
out["after_failed_cell"] = rss_bytes()
sh.run_line_magic("ft_unload", "")
out["after_unload"] = rss_bytes()
sh.run_line_magic("qlora_load", "demo --bits 32")
out["after_reload"] = rss_bytes()
sh.run_line_magic("qlora_load", "demo --bits 32")
out["after_second_load"] = rss_bytes()
sh.run_line_magic("ft_unload", "")
out["after_second_unload"] = rss_bytes()
print("RSS " + json.dumps(out))
'''


@pytest.mark.slow
def test_demo_model_rss_returns_near_baseline_after_unload(tmp_path):
    """Process RSS before load, after load, after a failed cell (traceback stored), after %ft_unload."""
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=600, env=env,
                          cwd=str(tmp_path))
    line = [l for l in proc.stdout.splitlines() if l.startswith("RSS ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    rss = json.loads(line[0][4:])
    mb = {k: round(v / 2**20) for k, v in rss.items()}
    print("\nRSS MB:", mb)
    loaded = rss["after_load"] - rss["before_load"]
    # fp32 weights are a real copy (~540 MB); at 16 bits they would be mapped from the bf16 cache file
    assert loaded > 300 * 2**20
    assert rss["after_failed_cell"] - rss["after_load"] > 200 * 2**20  # the failed cell's tensor is held
    # after unload: close to the pre-load value (loose: allocator slack, tokenizer caches)
    assert rss["after_unload"] - rss["before_load"] < 0.25 * loaded + 64 * 2**20, mb
    # loading the same model twice does not hold two copies; unloading again returns as before
    assert rss["after_second_load"] - rss["after_reload"] < 0.5 * loaded, mb
    assert rss["after_second_unload"] - rss["before_load"] < 0.25 * loaded + 96 * 2**20, mb


@pytest.mark.gpu
def test_cuda_memory_is_released_after_training_and_unload(shell, tiny_model_dir, capsys):
    import gc

    import torch

    gc.collect()  # models of earlier tests in this process, not yet collected, must not fall into the window
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 16 --device cuda")
    s = shell.magics_manager.registry["FtMagics"].session
    s.train("bot", DATA, max_steps=2, batch_size=2, r=4)
    assert torch.cuda.memory_allocated() > base
    capsys.readouterr()
    shell.run_line_magic("ft_unload", "")
    out = capsys.readouterr().out
    assert "CUDA allocated" in out, out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= base + 2**20
    assert torch.cuda.memory_reserved() <= base + 64 * 2**20  # empty_cache handed the cached blocks back


def test_a_plan_and_a_memory_reading_of_the_same_memory_show_the_same_figure(shell, capsys):
    """%ft_plan counts GB as 1e9 bytes (model cards, the seed's table); %ft_memory, the training summaries and
    the out-of-memory refusals divided by 1024 and also wrote "GB": on a 23.5 GiB machine the plan said
    "In 25.3 GB" and the gauge "of 23.5 GB" for the same RAM. Both now use decimal units."""
    import re

    from ft_magics.core.memory import human_bytes

    assert [human_bytes(n) for n in (999, 1000, 25_300_000_000, 2**30)] == ["999 B", "1.0 kB", "25.3 GB", "1.1 GB"]
    shell.run_line_magic("ft_plan", "7B --memory here")
    plan = re.search(r"In ([\d.]+) GB \(this machine's RAM", capsys.readouterr().out).group(1)
    shell.run_line_magic("ft_memory", "--once")
    reading = re.search(r"system available [\d.]+ GB of ([\d.]+) GB", capsys.readouterr().out).group(1)
    assert plan == reading

"""Reliability: resumable checkpoints, interrupts, out-of-memory, and safe loading (tiny model, CPU)."""
from __future__ import annotations

import gc
import json
import os
import signal
from pathlib import Path

import pytest

from ft_magics.core.events import Listener, Recorder
from ft_magics.errors import FtUsageError

DATA = [{"prompt": f"How do I reset password {i}?", "completion": f"Click forgot password, step {i}."}
        for i in range(24)]
CFG = dict(max_steps=8, batch_size=2, save_every=2, log_every=1, learning_rate=1e-2, max_seq_len=64, r=4, alpha=8,
           save_every_minutes=0)


class StopAt(Listener):
    """Asks the run to stop (like the Stop button) once step ``k`` has been reported."""

    def __init__(self, session, k):
        self.session, self.k = session, k

    def on_step(self, e):
        if e.step == self.k:
            self.session.stop()


class InterruptAt(Listener):
    """Sends this process a real SIGINT (what the kernel's interrupt does) at step ``k``."""

    def __init__(self, k, times=1):
        self.k, self.times = k, times

    def on_step(self, e):
        if e.step == self.k:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


def _ckpts(session, name):
    root = session.adapters_dir / ".checkpoints" / name
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _messages(rec):
    return [e.text for e in rec.events if type(e).__name__ == "Message"]


# ------------------------------------------------------------------ checkpoints and resume
def test_resume_reproduces_the_uninterrupted_loss_curve(tiny_session):
    s = tiny_session
    full = s.train("full", DATA, CFG)
    assert full.status == "completed" and full.steps == 8
    assert _ckpts(s, "full") == []  # a completed run needs no checkpoints

    part = s.train("part", DATA, CFG, listeners=[StopAt(s, 3)])
    assert part.status == "stopped" and 3 <= part.steps < 8
    saved = _ckpts(s, "part")
    assert saved and all(n.startswith("checkpoint-") for n in saved) and len(saved) <= 2  # save_total_limit
    assert f"checkpoint-{part.steps}" in saved  # stopping writes a checkpoint at the stop step
    rec = Recorder()
    resumed = s.train("part", DATA, CFG, resume=True, listeners=[rec])
    assert resumed.status == "completed" and resumed.steps == 8
    assert any(f"resuming 'part' from checkpoint-{part.steps}" in m for m in _messages(rec))
    # its summary gives the whole curve's first loss (it gave the resumed part's) and says the time is the part's
    from ft_magics.widgets.text import summary_text

    end = [e for e in rec.events if type(e).__name__ == "TrainEnd"][-1]
    summary = summary_text(end, first_loss=123.0)  # what a view saw first: the resumed part's first step
    assert f"after 8 steps (resumed at step {part.steps}; this part in " in summary
    assert f"loss {resumed.record['loss_history'][0][1]:.4f} -> " in summary
    a, b = full.record["loss_history"], resumed.record["loss_history"]
    assert [st for st, _ in a] == [st for st, _ in b] == list(range(1, 9))
    for (_, la), (_, lb) in zip(a, b):
        assert lb == pytest.approx(la, abs=1e-4)
    # the resumed adapter equals the uninterrupted one
    from safetensors.torch import load_file

    wa = load_file(str(Path(full.adapter_path) / "adapter_model.safetensors"))
    wb = load_file(str(Path(resumed.adapter_path) / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() < 1e-4, k


def test_a_checkpoint_holds_only_the_adapter_it_trains_and_resumes(tiny_session):
    """With another adapter loaded, each checkpoint held a copy of it too (PEFT saves every adapter)."""
    s = tiny_session
    s.train("other", DATA, dict(CFG, max_steps=2))
    part = s.train("mine", DATA, CFG, listeners=[StopAt(s, 3)])
    assert part.status == "stopped"
    root = s.adapters_dir / ".checkpoints" / "mine"
    saved = [p for p in root.iterdir() if p.name.startswith("checkpoint-")]
    assert saved
    for ckpt in saved:
        weights = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("adapter_model.safetensors"))
        assert weights == ["mine/adapter_model.safetensors"], weights
    resumed = s.train("mine", DATA, CFG, resume=True)
    assert resumed.status == "completed" and resumed.steps == 8 and "other" in s.adapters


def test_incomplete_checkpoints_are_skipped_on_resume(tiny_session):
    s = tiny_session
    r = s.train("bot", DATA, dict(CFG, save_every=1), listeners=[StopAt(s, 4)])
    assert r.status == "stopped"
    root = s.adapters_dir / ".checkpoints" / "bot"
    newest, older = sorted(root.iterdir(), key=lambda p: int(p.name.split("-")[1]), reverse=True)[:2]
    # a kill while the newest was being written: weights truncated, marker never written
    w = next(newest.rglob("adapter_model.safetensors"))
    w.write_bytes(w.read_bytes()[:100])
    (newest / ".ft_magics_complete").unlink()
    # a stray folder that looks like a later checkpoint but was never finished
    (root / "checkpoint-99").mkdir()
    (root / "checkpoint-99" / "trainer_state.json").write_text("{\"global_step\": 99")
    from ft_magics.core.checkpoints import checkpoint_problem, latest_valid

    assert "marker" in checkpoint_problem(newest)
    assert latest_valid(root) == older
    rec = Recorder()
    done = s.train("bot", DATA, dict(CFG, save_every=1), resume=True, listeners=[rec])
    msgs = _messages(rec)
    assert any("skipped incomplete checkpoint checkpoint-99" in m for m in msgs), msgs
    assert any(f"skipped incomplete checkpoint {newest.name}" in m for m in msgs), msgs
    assert any(f"resuming 'bot' from {older.name}" in m for m in msgs), msgs
    assert done.status == "completed" and done.steps == 8


def test_resume_with_other_data_or_settings_warns(tiny_session):
    s = tiny_session
    s.train("bot", DATA, dict(CFG, max_steps=4), listeners=[StopAt(s, 1)])
    rec = Recorder()
    other = [dict(r, completion=r["completion"] + "!") for r in DATA]
    s.train("bot", other, dict(CFG, max_steps=4, learning_rate=5e-3), resume=True, listeners=[rec])
    warn = [m for m in _messages(rec) if "different" in m]
    assert warn and "different data (the rows changed), learning_rate" in warn[0] and "fingerprint" not in warn[0], _messages(rec)


def _lrs(rec):
    return {e.step: e.learning_rate for e in rec.events if type(e).__name__ == "StepEnd"}


def test_resume_follows_a_changed_learning_rate_and_max_steps_from_its_first_step(tiny_session):
    """The checkpoint's scheduler carried the old base learning rate: a learning_rate changed on --resume was
    ignored (the record said the new one), and a changed max_steps took effect one step late."""
    s = tiny_session
    runs = {}
    for name, cfg in (("lr1", CFG), ("lr2", dict(CFG, learning_rate=2e-2)), ("six", dict(CFG, max_steps=6))):
        runs[name] = Recorder()
        s.train(name, DATA, cfg, listeners=[runs[name]])
    for target, cfg in (("lr2", dict(CFG, learning_rate=2e-2)), ("six", dict(CFG, max_steps=6))):
        part = s.train("part-" + target, DATA, CFG, listeners=[StopAt(s, 3)])
        rec = Recorder()
        resumed = s.train("part-" + target, DATA, cfg, resume=True, listeners=[rec])
        got, want = _lrs(rec), _lrs(runs[target])
        assert got and min(got) == part.steps + 1
        for step, lr in got.items():  # the uninterrupted run's schedule from the resumed step on
            assert lr == pytest.approx(want[step], rel=1e-6), (target, step, got, want)
        assert resumed.record["settings"]["learning_rate"] == cfg["learning_rate"]


def test_time_left_weighs_the_steps_left_by_their_tokens_and_counts_only_this_part(tiny_session, monkeypatch):
    """Length-grouped batches run the longest first, so the time per step of the first steps overstated the time
    left (a 5-step run said "20:55 left" with 2 minutes to go); a resumed run divided this part's time by every
    step since the start, so its estimate fell short by as much."""
    from ft_magics.core import training

    calls = []

    def spy(*args):
        calls.append(args)
        return training.eta_seconds.__wrapped__(*args)

    spy.__wrapped__ = training.eta_seconds
    monkeypatch.setattr(training, "eta_seconds", spy)
    data = [{"prompt": f"Question {i} " + "word " * (80 if i % 8 == 0 else 2), "completion": "Answer."} for i in range(16)]
    cfg = dict(CFG, max_steps=8, group_by_length=True, max_seq_len=256)  # 16 examples, batch 2: exactly one epoch
    s = tiny_session
    s.train("eta", data, cfg)
    per_step = {c[4] for c in calls}
    assert len(per_step) == 1 and len(calls) == 8
    per_step = per_step.pop()
    first, last = calls[0], calls[-1]
    assert first[3] > 2 * per_step  # the first batch holds the longest examples: more than a mean step's tokens
    assert first[1:3] == (1, 7) and last[1:3] == (8, 0) and spy.__wrapped__(*last) == 0.0
    # after one epoch every example ran once: the tokens counted are the mean step's, eight times
    assert last[3] == pytest.approx(8 * per_step)
    assert spy.__wrapped__(*first) < 0.5 * first[0] * 7  # far below the step-based estimate
    calls.clear()
    part = s.train("eta2", data, cfg, listeners=[StopAt(s, 3)])
    assert 3 <= part.steps < 7
    calls.clear()
    s.train("eta2", data, cfg, resume=True)
    assert calls and calls[0][1:3] == (1, 8 - part.steps - 1)  # its first step: one step done in this part


def test_resume_with_no_steps_left_is_refused_and_keeps_the_checkpoint(tiny_session):
    s = tiny_session
    s.train("bot", DATA, dict(CFG, max_steps=6), listeners=[StopAt(s, 3)])
    before = _ckpts(s, "bot")
    last = max(int(n.split("-")[1]) for n in before)
    assert 3 <= last < 6
    adapter = (s.adapters_dir / "bot" / "adapter_model.safetensors").read_bytes()
    for limit in (2, last):
        with pytest.raises(FtUsageError, match=rf"checkpoint-{last} of 'bot' is already at step {last}, so "
                                               rf"max_steps={limit} leaves nothing.*above {last} \(the run was "
                                               r"started with 6\)"):
            s.train("bot", DATA, dict(CFG, max_steps=limit), resume=True)
    # an adapter of another shape cannot continue the checkpoint: said before any work (it was a 56-line
    # state-dict traceback from inside the Trainer)
    for other, was in (({"r": 8}, "r: 4"), ({"target_modules": "qv"}, "target_modules: all-linear")):
        with pytest.raises(FtUsageError, match=rf"checkpoint-{last} of 'bot' holds an adapter made with {was}; "
                                               r"this run asks for .*Resume with .*or train afresh"):
            s.train("bot", DATA, dict(CFG, max_steps=6, **other), resume=True)
    assert _ckpts(s, "bot") == before  # nothing lost: the checkpoint and the adapter are as they were
    assert (s.adapters_dir / "bot" / "adapter_model.safetensors").read_bytes() == adapter
    assert "bot" in s.adapters and s.adapters.active == "bot"  # a refused resume leaves the adapter loaded
    done = s.train("bot", DATA, dict(CFG, max_steps=6), resume=True)
    assert done.status == "completed" and done.steps == 6


def test_training_a_name_again_says_what_it_replaces(tiny_session):
    s = tiny_session
    first, again = Recorder(), Recorder()
    s.train("twice", DATA, dict(CFG, max_steps=2), listeners=[first])
    assert not [m for m in _messages(first) if "already exists" in m]
    loss = json.loads((s.adapters_dir / "twice" / "ft_run.json").read_text())["final_loss"]
    s.train("twice", DATA, dict(CFG, max_steps=1), listeners=[again])
    note = [m for m in _messages(again) if "already exists" in m]
    assert len(note) == 1 and f"(2 steps, loss {loss:.4f}" in note[0] and "--resume" in note[0]
    assert json.loads((s.adapters_dir / "twice" / "ft_run.json").read_text())["steps"] == 1  # and it did


def test_checkpoints_by_time(tiny_session):
    s = tiny_session
    # save_every_minutes tiny: a checkpoint after every step; the limit keeps the newest two
    r = s.train("timed", DATA, dict(CFG, save_every=0, save_every_minutes=1e-6), listeners=[StopAt(s, 5)])
    names = _ckpts(s, "timed")
    assert len(names) == 2 and f"checkpoint-{r.steps}" in names and f"checkpoint-{r.steps - 1}" in names
    from ft_magics.core.checkpoints import checkpoint_problem

    assert all(checkpoint_problem(s.adapters_dir / ".checkpoints" / "timed" / n) is None for n in names)
    # the default: by time only, every 5 minutes, so a short run writes none until it is stopped
    from ft_magics.config import TrainConfig

    assert TrainConfig().save_every == 0 and TrainConfig().save_every_minutes == 5.0


def test_resume_without_a_checkpoint_is_a_usage_error(tiny_session, shell, tiny_model_dir):
    with pytest.raises(FtUsageError, match="no complete checkpoint of 'nothing'.*without --resume"):
        tiny_session.train("nothing", DATA, CFG, resume=True)
    # a run that completed removed its checkpoints: said as such, with how to train longer
    tiny_session.train("done", DATA, dict(CFG, max_steps=2), listeners=[])
    with pytest.raises(FtUsageError, match=r"'done' completed its run \(2 steps; the adapter is saved\).*nothing to "
                                           r"resume. To train longer from its weights, run it without --resume "
                                           r"with init_from: done"):
        tiny_session.train("done", DATA, dict(CFG, max_steps=4), resume=True)
    # what it says works under the same name: the run starts where 'done' ended (it pointed at a fresh start)
    fresh = tiny_session.train("fresh", DATA, dict(CFG, max_steps=1), listeners=[]).first_loss
    longer = tiny_session.train("done", DATA, dict(CFG, max_steps=1, init_from="done"), listeners=[]).first_loss
    assert longer < fresh
    from IPython.core.error import UsageError

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    with pytest.raises(UsageError, match="no complete checkpoint"):
        shell.run_cell_magic("lora_train", "nothing --data demo:support --resume --no-widgets", "r: 4\n")


@pytest.mark.parametrize("bad", ["save_every: -1", "save_every_minutes: -2", "save_every: often"])
def test_checkpoint_settings_are_validated(bad):
    from ft_magics.config import TrainConfig, parse_yaml_body

    with pytest.raises(FtUsageError, match="save_every"):
        TrainConfig.from_dict(parse_yaml_body(bad))


# ------------------------------------------------------------------ interrupts
def test_sigint_stops_at_a_step_boundary_saves_and_model_stays_usable(tiny_session):
    s = tiny_session
    rec = Recorder()
    before = signal.getsignal(signal.SIGINT)  # Python's default handler, or SIG_IGN where the parent ignores SIGINT
    r = s.train("bot", DATA, CFG, listeners=[InterruptAt(3), rec])
    assert r.status == "interrupted" and 3 <= r.steps < 8
    from ft_magics.core.adapters import read_adapter_folder

    read_adapter_folder(Path(r.adapter_path))
    record = json.loads((Path(r.adapter_path) / "ft_run.json").read_text())
    assert record["status"] == "interrupted" and record["steps"] == r.steps
    hint = [m for m in _messages(rec) if "--resume" in m]
    assert hint and r.adapter_path in hint[0] and "%%lora_train bot --resume" in hint[0]
    # the model is usable: the adapter is registered and generates
    assert "bot" in s.adapters.names()
    assert s.generate("How do I reset my password?", max_new_tokens=3).new_tokens >= 1
    # and the original SIGINT handler is back
    assert signal.getsignal(signal.SIGINT) is before


def test_repeated_interrupts_while_saving_do_not_corrupt_the_adapter(tiny_session, monkeypatch):
    import ft_magics.core.training as training

    real_save = training.save_adapter
    calls = []

    def save_under_fire(*a, **k):
        for _ in range(4):  # the 3-interrupt escape hatch must not fire during a save
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(1)
        return real_save(*a, **k)

    monkeypatch.setattr(training, "save_adapter", save_under_fire)
    r = tiny_session.train("bot", DATA, CFG, listeners=[InterruptAt(2, times=2)])
    assert calls and r.status == "interrupted" and r.adapter_path
    from ft_magics.core.adapters import read_adapter_folder

    read_adapter_folder(Path(r.adapter_path))
    assert (Path(r.adapter_path) / ".ft_magics_complete").exists()
    assert not [p for p in Path(r.adapter_path).parent.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------ out of memory
@pytest.fixture
def oom_above(monkeypatch):
    """Make the decoder's forward raise torch.OutOfMemoryError for batches larger than ``limit`` (the
    decoder runs in every loss path, chunked or not)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaModel

    seen = []
    real = LlamaModel.forward

    def install(limit):
        def forward(self, *a, **kw):
            ids = kw.get("input_ids", a[0] if a else None)
            if self.training and ids is not None:
                seen.append(ids.shape[0])
                if ids.shape[0] > limit:
                    raise torch.OutOfMemoryError(
                        f"CUDA out of memory. Tried to allocate 2.00 GiB (simulated for batch {ids.shape[0]})")
            return real(self, *a, **kw)

        monkeypatch.setattr(LlamaModel, "forward", forward)
        return seen

    return install


def test_oom_ends_cleanly_with_concrete_advice(tiny_session, oom_above):
    import torch

    oom_above(2)
    with pytest.raises(FtUsageError) as info:
        tiny_session.train("big", DATA, dict(CFG, batch_size=8))
    msg = str(info.value)
    for advice in ("batch_size: 4 with grad_accum: 2", "max_seq_len", "gradient_checkpointing: true", "--bits 4",
                   "auto_batch_size: true"):
        assert advice in msg, msg
    assert "Traceback" not in msg
    # the failed run's optimizer and gradients are gone; the model stays usable
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer)]
    assert all(p.grad is None for p in tiny_session.model.parameters())
    assert tiny_session.generate("Hello", max_new_tokens=2).new_tokens >= 1
    assert not (tiny_session.adapters_dir / "big").exists()


def test_oom_in_the_magic_is_a_usage_error(shell, tiny_model_dir, oom_above):
    from IPython.core.error import UsageError

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    oom_above(1)
    with pytest.raises(UsageError, match="(?s)ran out of memory.*batch_size: 2"):
        shell.run_cell_magic("lora_train", "big --data demo:support --no-widgets --max-steps 2 --batch-size 4", "r: 4\n")


def test_auto_batch_size_finds_a_batch_that_fits(tiny_session, oom_above):
    seen = oom_above(2)
    rec = Recorder()
    r = tiny_session.train("auto", DATA, dict(CFG, batch_size=4, max_steps=3, auto_batch_size=True), listeners=[rec])
    assert r.status == "completed" and r.steps == 3
    assert seen[0] == 4 and 3 in seen and seen[-1] == 2  # started at 4, shrank (x0.9) until the batch fitted
    assert any("training with batch_size 2" in m for m in _messages(rec)), _messages(rec)


# ------------------------------------------------------------------ safe by default
def _pickle_only_model(src: Path, dst: Path) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
    return dst


def test_pickle_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path, shell):
    from ft_magics import Session
    from IPython.core.error import UsageError

    folder = _pickle_only_model(tiny_model_dir, tmp_path / "pickled")
    s = Session(adapters_dir=tmp_path / "adapters")
    with pytest.raises(FtUsageError, match="pickle.*--allow-pickle"):
        s.load(str(folder), bits=32)
    assert s.handle is None
    with pytest.raises(UsageError, match="--allow-pickle"):
        shell.run_line_magic("qlora_load", f"{folder} --bits 32")
    h = s.load(str(folder), bits=32, allow_pickle=True)
    assert h.param_count > 0


def test_a_model_folder_without_weights_or_tokenizer_says_what_it_lacks(tiny_model_dir, tmp_path, shell):
    """A folder with config.json alone (what %ft_plan reads) failed deep in transformers with a raw ValueError."""
    import shutil

    from IPython.core.error import UsageError

    folder = tmp_path / "my model"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    with pytest.raises(UsageError, match=r"holds config\.json but no weights \(\*\.safetensors\) and no tokenizer "
                                         r"\(tokenizer\.json.*%ft_plan reads a folder with config\.json alone"):
        shell.run_line_magic("qlora_load", f'"{folder}" --bits 32')
    for f in tiny_model_dir.iterdir():
        if f.suffix == ".safetensors":
            shutil.copy(f, folder / f.name)
    with pytest.raises(UsageError, match=r"holds config\.json but no tokenizer \("):
        shell.run_line_magic("qlora_load", f'"{folder}" --bits 32')
    shutil.rmtree(folder)
    shutil.copytree(tiny_model_dir, folder)
    shell.run_line_magic("qlora_load", f'"{folder}" --bits 32')
    assert shell.magics_manager.registry["FtMagics"].session.handle is not None


def test_remote_code_is_not_run_unless_trusted(tiny_model_dir, tmp_path):
    import shutil

    from ft_magics import Session

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    ran = tmp_path / "REMOTE_CODE_RAN"
    code = f"open({str(ran)!r}, 'w').write('yes')\nfrom transformers import LlamaConfig\n" \
           "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n"
    (folder / "configuration_evil.py").write_text(code)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "configuration_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(cfg))
    s = Session(adapters_dir=tmp_path / "adapters")
    # a known architecture with an auto_map: the built-in code is used, the shipped code never runs
    s.load(str(folder), bits=32)
    assert not ran.exists()
    # an architecture only the shipped code knows: refused, naming the flag, and still nothing runs
    cfg["model_type"] = "evil_llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "configuration_evil.py").write_text(code.replace("model_type = 'llama'", "model_type = 'evil_llama'"))
    with pytest.raises(FtUsageError, match="--trust-remote-code"):
        s.load(str(folder), bits=32)
    assert not ran.exists()


BAD_NAMES = ["../escape", "a/b", "a\\b", ".hidden", "..", "x/../../y", "/abs", "base", "", " ", "a" * 65,
             "-flag", "a..b", "name\x00", "über/x"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_adapter_names_are_refused_and_nothing_is_written(tiny_session, bad, tmp_path):
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(FtUsageError):
        tiny_session.train(bad, DATA, CFG)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_bad_adapter_name_in_the_magic(shell, tiny_model_dir, tmp_path):
    from IPython.core.error import UsageError

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    with pytest.raises(UsageError, match="not allowed"):
        shell.run_cell_magic("lora_train", "../../evil --data demo:support --no-widgets --max-steps 1", "r: 4\n")
    with pytest.raises(UsageError, match="not allowed"):
        shell.run_line_magic("lora_adapters", f"load {tiny_model_dir} --name ../x")
    assert not (tmp_path.parent / "evil").exists() and not (tmp_path / "evil").exists()


def _other_base(tmp_path: Path) -> Path:
    """A tiny Llama of a different shape (hidden 32) with the same tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    path = tmp_path / "other-base"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_adapter_for_another_base_or_other_modules_is_refused_saying_which(tiny_session, tmp_path):
    import shutil

    from ft_magics import Session

    r = tiny_session.train("bot", DATA, dict(CFG, max_steps=1))
    # 1. another base model (different layer shapes)
    other = Session(adapters_dir=tmp_path / "other-adapters")
    other.load(str(_other_base(tmp_path)), bits=32)
    with pytest.raises(FtUsageError, match=r"does not fit the loaded model \(other-base\): layer model\.layers\.0\.\S+ is \d+->\d+ here.*trained on \S*tiny-llama"):
        other.load_adapter(r.adapter_path)
    assert not other.adapters.names()
    assert other.generate("Hello", max_new_tokens=2).new_tokens >= 1  # untouched and usable
    # 2. target modules the model does not have
    odd = tmp_path / "odd"
    shutil.copytree(r.adapter_path, odd)
    cfg = json.loads((odd / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    (odd / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FtUsageError, match="targets module\\(s\\) c_attn"):
        tiny_session.load_adapter(odd, name="odd")
    assert "odd" not in tiny_session.adapters.names()


def test_pickle_only_adapter_is_refused(tiny_session, tmp_path):
    import torch

    folder = tmp_path / "pickled-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj"]}))
    torch.save({}, folder / "adapter_model.bin")
    with pytest.raises(FtUsageError, match="pickle"):
        tiny_session.load_adapter(folder)
    assert not tiny_session.adapters.names()


def test_a_run_repeats_exactly_in_one_process(tiny_session):
    """The same data and settings trained twice in one kernel give the same curve and eval loss, to the bit.
    transformers 5.25 swaps layers for Hub kernels by default and redoes the swap on every train()/eval() switch,
    so a process's first run differed from its second in the sixth digit; ft_magics loads with that off."""
    s = tiny_session
    assert not any(getattr(m, "use_kernels", False) for m in s.model.modules())
    rows = [{"prompt": f"Question {i}: reset?", "completion": "Category: account"} for i in range(16)]
    ev = [{"prompt": f"Other {i}: reset?", "completion": "Category: account"} for i in range(4)]
    cfg = {"max_steps": 4, "batch_size": 4, "learning_rate": 0.3, "warmup": 0, "eval_steps": 2}
    first = s.train("first", rows, cfg, eval_data=ev, listeners=[])
    second = s.train("second", rows, cfg, eval_data=ev, listeners=[])
    assert first.record["loss_history"] == second.record["loss_history"]
    assert first.record["eval_history"] == second.record["eval_history"] and first.record["eval_loss"] is not None


def test_keep_best_carries_its_best_across_a_resume(tiny_session):
    """The best weights so far travel in every checkpoint: stopped after its best evaluation and resumed, a
    keep_best run saves the same adapter as the uninterrupted one (before, the resumed run looked for its
    best among the evaluations after the interruption only, and kept a worse adapter)."""
    from safetensors.torch import load_file

    s = tiny_session
    rows = [{"prompt": f"Question {i}: reset?", "completion": "Category: account"} for i in range(40)]
    ev = [{"prompt": f"Other {i}: reset?", "completion": "Category: account"} for i in range(8)]
    cfg = {"max_steps": 12, "batch_size": 4, "learning_rate": 0.3, "warmup": 0, "eval_steps": 2, "save_every": 2,
           "save_every_minutes": 0, "keep_best": True}
    full = s.train("full", rows, cfg, eval_data=ev, listeners=[])
    best_step = full.record["best"]["step"]
    assert full.record["best"]["restored"] and best_step <= 8  # the setting this test needs: the loss turns back up
    part = s.train("part", rows, cfg, eval_data=ev, listeners=[StopAt(s, best_step + 1)])
    assert part.status == "stopped" and best_step < part.steps < 12
    assert any((Path(s.adapters_dir) / ".checkpoints" / "part").glob("checkpoint-*/ft_best.safetensors"))
    resumed = s.train("part", rows, cfg, eval_data=ev, resume=True, listeners=[])
    assert resumed.status == "completed" and resumed.record["best"] == full.record["best"]
    wa = load_file(str(Path(full.adapter_path) / "adapter_model.safetensors"))
    wb = load_file(str(Path(resumed.adapter_path) / "adapter_model.safetensors"))
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() < 1e-5, k


def test_a_run_killed_before_it_saved_is_listed_as_resumable_and_named_when_asked_for(tiny_session):
    """After a kernel was killed mid-run (checkpoints on disk, no adapter saved) `%lora_adapters list` said
    nothing of it and `use NAME` answered "no adapter named" without a word of its checkpoint. Both now name the
    step and the --resume that continues it; the resume then completes."""
    import shutil

    from ft_magics import adapter_commands

    s = tiny_session
    part = s.train("cut", DATA, CFG, listeners=[StopAt(s, 3)])
    assert part.status == "stopped" and _ckpts(s, "cut")
    shutil.rmtree(part.adapter_path)  # what a SIGKILL before the save leaves: the checkpoints alone
    s._drop_from_memory("cut")  # (and the killed kernel's memory went with it; unload refuses to drop a last copy)
    assert s.resumable_runs() == {"cut": part.steps}
    lines = []
    adapter_commands.run(s, ["list"], out=lines.append)
    assert any(f"cut: its run was cut short at step {part.steps}" in l and "--resume" in l for l in lines), lines
    with pytest.raises(FtUsageError, match=rf"no adapter named 'cut'.*checkpoint at step {part.steps} continues with "
                                           r"%%lora_train cut --data \.\.\. --resume"):
        s.use("cut")
    # info and rename said only "no adapter named 'cut'", and nothing dropped a run list kept naming
    for words in (["info", "cut"], ["rename", "cut", "cut2"]):
        with pytest.raises(FtUsageError, match=rf"no adapter named 'cut'.*checkpoint at step {part.steps} continues "
                                               r"with .*--resume .*, and %lora_adapters delete cut drops it\."):
            adapter_commands.run(s, words, out=lines.append)
    copy = s.adapters_dir / ".checkpoints" / "copy"
    shutil.copytree(s.adapters_dir / ".checkpoints" / "cut", copy)
    said = []
    adapter_commands.run(s, ["delete", "copy"], out=said.append)
    assert said == [f"deleted the cut-short run 'copy': its checkpoints up to step {part.steps} ({copy})."], said
    assert not copy.exists() and s.resumable_runs() == {"cut": part.steps}
    resumed = s.train("cut", DATA, CFG, resume=True)
    assert resumed.status == "completed" and resumed.steps == 8 and s.resumable_runs() == {}


def test_a_resumed_runs_card_says_where_it_resumed_and_what_data_the_earlier_steps_ran_on(tiny_session):
    """`%lora_adapters info` of a resumed run said "Trained 8 steps in 2.1 s" with the resumed part's time and
    speed as if they were the whole run's, and showed only the resumed part's data when it had changed."""
    from ft_magics.core.adapters import adapter_card

    s = tiny_session
    part = s.train("re", DATA, CFG, listeners=[StopAt(s, 3)])
    other = [{"prompt": f"Where is parcel {i}?", "completion": f"In depot {i}."} for i in range(24)]
    # (with a longer run and another learning rate: the checkpoint it resumed from was rotated out before the run
    # ended, and the record, read from it then, forgot the earlier data)
    rec = Recorder()
    resumed = s.train("re", other, dict(CFG, max_steps=12, learning_rate=5e-3), resume=True, listeners=[rec])
    assert resumed.record["resumed"] == {"at": part.steps, "earlier_data": "<list>",
                                         "earlier_settings": {"max_steps": 8, "learning_rate": 1e-2}}
    card = adapter_card("re", Path(resumed.adapter_path))
    assert f"Trained    12 steps (resumed at step {part.steps}; steps {part.steps + 1}-12 in " in card
    assert f"; steps 1-{part.steps} ran on <list>" in card
    settings = next(l for l in card.splitlines() if l.startswith("Settings"))
    assert "max_steps 12" in settings and "learning_rate 0.005" in settings
    assert settings.endswith(f" (steps 1-{part.steps}: max_steps 8, learning_rate 0.01)"), settings
    # the warning gives the figures, and the learning rate the next step takes against the interrupted run's
    said = _messages(rec)
    assert any("different data (the rows changed), max_steps" in m and "max_steps (8 before, 12 now)" in m
               and "learning_rate (0.01 before, 0.005 now)" in m for m in said), said
    jump = [m for m in said if m.startswith(f"step {part.steps + 1} trains at a learning rate of ")]
    assert len(jump) == 1 and "cosine schedule is laid from learning_rate 0.005 over this run's 12 steps" in jump[0]
    first_lr = _lrs(rec)[part.steps + 1]
    assert f"a learning rate of {first_lr:.3g}, where" in jump[0], (jump, first_lr)
    fresh = s.train("fresh", DATA, CFG)
    assert fresh.record["resumed"] is None
    assert "resumed at" not in adapter_card("fresh", Path(fresh.adapter_path))


def test_a_card_says_when_the_run_record_cannot_be_read(tiny_session):
    """A corrupt ft_run.json left `%lora_adapters info` showing the LoRA and base lines alone, with no word on why
    the training lines were missing."""
    s = tiny_session
    run = s.train("rec", DATA, CFG, listeners=[])
    record = Path(run.adapter_path) / "ft_run.json"
    assert "Trained " in s.adapter_card("rec") and "cannot be read" not in s.adapter_card("rec")
    record.write_text("{garbage")
    card = s.adapter_card("rec")
    assert "Trained " not in card
    assert f"its run record {record} cannot be read (not JSON: Expecting property name enclosed in double quotes)" in card
    record.write_text("[1, 2]")
    assert "cannot be read (a JSON list, not an object)" in s.adapter_card("rec")
    record.write_text("{}")
    assert "cannot be read (an empty object)" in s.adapter_card("rec")


def test_deleting_a_stopped_runs_adapter_removes_its_checkpoints_too(tiny_session):
    """A stopped run keeps checkpoints beside its adapter for --resume. Deleting the adapter left them behind
    (often larger than the adapter: optimizer state), and 'list' then said the run was cut short before it saved
    an adapter, and offered --resume."""
    from ft_magics import adapter_commands

    s = tiny_session
    part = s.train("k", DATA, CFG, listeners=[StopAt(s, 3)])
    assert part.status == "stopped" and _ckpts(s, "k")
    s.delete_adapter("k")
    assert not (Path(s.adapters_dir) / ".checkpoints" / "k").exists() and s.resumable_runs() == {}
    lines = []
    adapter_commands.run(s, ["list"], out=lines.append)
    assert not any("cut short" in l for l in lines), lines


def test_the_last_steps_are_logged_when_log_every_does_not_divide_the_run(tiny_session):
    """With log_every 4, a 7-step run logged steps 4 only: its final loss (the summary, the record, the list) was
    the window of steps 1-4. The steps since the last log are read at the end, and at a stop."""
    r = tiny_session.train("le", DATA, dict(CFG, max_steps=7, log_every=4), listeners=[])
    history = r.record["loss_history"]
    assert [s for s, _ in history] == [1, 4, 7] and r.final_loss == history[-1][1]  # (the first step is logged too)
    record = json.loads((Path(r.adapter_path) / "ft_run.json").read_text())
    assert record["final_loss"] == history[-1][1] and record["loss_history"] == history
    r = tiny_session.train("le2", DATA, dict(CFG, max_steps=8, log_every=5), listeners=[StopAt(tiny_session, 5)])
    assert r.status == "stopped" and r.record["loss_history"][-1][0] == r.steps > 5


def test_the_process_exiting_during_a_background_run_stops_it_and_saves(tiny_model_dir, tmp_path):
    """A script (or a kernel shut down) that ended while a background run trained tore the daemon thread down
    mid-step: 'terminate called without an active exception', exit code 134, and no adapter. The exit now stops
    the run at its next step, as %lora_stop does, and the adapter is saved."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import time
        from ft_magics import Session
        s = Session(adapters_dir={str(tmp_path / 'adapters')!r})
        s.load({str(tiny_model_dir)!r}, bits=32)
        rows = [{{"prompt": f"q{{i}}?", "completion": "answer " * 20}} for i in range(64)]
        s.train("bg", rows, {{"max_steps": 100000, "batch_size": 2, "save_every": 0}}, listeners=[], background=True)
        time.sleep(3)  # a few steps in; then the script ends
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopping the background run 'bg'" in proc.stderr
    record = json.loads((tmp_path / "adapters" / "bg" / "ft_run.json").read_text())
    assert record["status"] == "stopped" and 0 < record["steps"] < 100000


def test_checkpoints_and_a_resume_print_no_transformers_bookkeeping_amid_the_progress(tiny_session, caplog):
    """'[transformers] mtime may not be reliable on this filesystem' appeared between progress lines whenever
    checkpoints came within a second, and a resume with another log_every printed transformers' 'arguments do not
    match ... trainer_state.json' warning; neither changes a result."""
    s = tiny_session
    s.train("chat", DATA, dict(CFG, max_steps=6, save_every=1), listeners=[StopAt(s, 3)])
    r = s.train("chat", DATA, dict(CFG, max_steps=6, save_every=1, log_every=2), resume=True, listeners=[])
    assert r.status == "completed"
    said = " ".join(str(rec.msg) for rec in caplog.records if rec.name.startswith("transformers"))
    assert "mtime may not be reliable" not in said and "trainer_state.json" not in said


def test_a_retrain_interrupted_before_its_first_step_leaves_the_loaded_adapter_loaded_and_active(tiny_session,
                                                                                                  monkeypatch):
    """Ctrl-C before the first step of a retrain said 'the model and adapters are as they were' and left the adapter
    it replaced unloaded, the base active: the next answer came from the base without a word."""
    from ft_magics.session import Session

    s = tiny_session
    s.train("captain", DATA, dict(CFG, max_steps=2), listeners=[])
    s.train("other", DATA, dict(CFG, max_steps=1), listeners=[])
    s.use("captain")
    answer = s.generate("How do I reset password 3?", max_new_tokens=5).text
    real = Session._set_model

    def attach_then_interrupt(self, model):
        real(self, model)
        if "captain" in getattr(model, "peft_config", {}) and self.handle.model is model:
            raise KeyboardInterrupt  # after the run attached its own 'captain', before any step

    monkeypatch.setattr(Session, "_set_model", attach_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        s.train("captain", DATA, dict(CFG, max_steps=4, learning_rate=0.5), listeners=[])
    monkeypatch.undo()
    assert "captain" in s.adapters and s.adapters.active == "captain" and "other" in s.adapters
    again = s.generate("How do I reset password 3?", max_new_tokens=5)
    assert (again.adapter, again.text) == ("captain", answer)


def test_a_warmup_as_long_as_the_run_and_a_paged_optimizer_on_the_cpu_are_named(tiny_session):
    """warmup: 5 on a 2-step run trained at 4e-05 and 8e-05 of the 2e-4 asked, without a word; a paged optimizer
    on the CPU only showed bitsandbytes' raw warning."""
    rec = Recorder()
    tiny_session.train("warm", DATA, dict(CFG, max_steps=2, warmup=5), listeners=[rec])
    assert any("warmup: 5 steps is as long as the run (2 steps)" in m for m in _messages(rec))
    assert not any("batch_size" in m for m in _messages(rec))
    rec = Recorder()  # a batch larger than the data: the dry run said "1 optimizer step of 64" for 8 rows
    tiny_session.train("big", DATA, dict(CFG, max_steps=1, batch_size=64), listeners=[rec], dry_run=True)
    rows = tiny_session.last_data_report.train_rows
    assert rows < 64 and any(f"batch_size 64 is more than the {rows} training rows" in m for m in _messages(rec))
    assert any(f"1 optimizer step of {rows} " in m for m in _messages(rec))
    rec = Recorder()
    tiny_session.train("paged", DATA, dict(CFG, max_steps=1, optimizer="paged_adamw_8bit"), listeners=[rec])
    assert any("optimizer: paged_adamw_8bit pages its states" in m and "runs it without paging" in m
               for m in _messages(rec))
    rec = Recorder()
    tiny_session.train("plain", DATA, dict(CFG, max_steps=4, warmup=0.5), listeners=[rec])
    assert not any("warmup" in m or "paged" in m for m in _messages(rec))


def test_a_dry_run_makes_the_run_s_refusals_and_notes(tiny_session):
    """--dry-run approved keep_best without eval data (the run refused it) and left out the run's notes; a
    constant schedule dropped the warm-up asked for, and an SFT run the DPO beta, without a word."""
    with pytest.raises(FtUsageError, match="keep_best compares eval losses, and this run has no eval data"):
        tiny_session.train("k", DATA, dict(CFG, keep_best=True, eval_steps=1), dry_run=True)
    rec = Recorder()
    tiny_session.train("d", DATA, dict(CFG, max_steps=2, warmup=5, lr_scheduler="constant", beta=0.5),
                       dry_run=True, listeners=[rec])
    said = _messages(rec)
    assert any("lr_scheduler: constant has no warm-up, so warmup: 5 is not used; lr_scheduler: constant_with_warmup"
               in m for m in said), said
    assert any("beta applies to preference objectives (dpo, orpo, ipo, simpo); objective: sft does not use it" in m
               for m in said), said
    assert any(m.startswith("Dry run:") for m in said)


def test_a_stopped_run_s_summary_says_which_step_its_eval_loss_was_measured_at(tiny_session):
    """A run stopped after its last evaluation showed that evaluation's loss as the run's 'eval loss', beside an
    adapter saved steps later (%lora_eval on it gave another figure)."""
    from ft_magics.widgets.text import summary_text

    s = tiny_session
    rec = Recorder()
    r = s.train("ev", DATA, dict(CFG, eval_fraction=0.25, eval_steps=3), listeners=[rec, StopAt(s, 4)])
    end = [e for e in rec.events if type(e).__name__ == "TrainEnd"][-1]
    assert r.status == "stopped" and end.steps in (4, 5) and end.extra["eval_step"] == 3
    assert f"eval loss {end.extra['eval_loss']:.4f} (at step 3)" in summary_text(end)
    rec = Recorder()
    s.train("ev2", DATA, dict(CFG, eval_fraction=0.25, eval_steps=2), listeners=[rec])
    end = [e for e in rec.events if type(e).__name__ == "TrainEnd"][-1]
    assert end.extra["eval_step"] == end.steps and "(at step" not in summary_text(end)


def test_the_final_evaluation_is_announced_after_the_last_step(tiny_session):
    """At the last step the time left read 0:00 while the final evaluation and the save took a while more, with
    nothing on the dashboard saying so."""
    rec = Recorder()
    tiny_session.train("fin", DATA, dict(CFG, max_steps=3, eval_fraction=0.25), listeners=[rec])
    kinds = [(type(e).__name__, getattr(e, "text", "")) for e in rec.events]
    said = [i for i, (_, text) in enumerate(kinds) if text == "the last step is done: evaluating on 6 eval examples, then "
                                                               "saving the adapter"]
    steps = [i for i, (k, _) in enumerate(kinds) if k == "StepEnd"]
    evals = [i for i, (k, _) in enumerate(kinds) if k == "EvalEnd"]
    assert len(said) == 1 and steps[-1] < said[0] < evals[-1]
    rec = Recorder()  # a run whose last step was evaluated already has nothing more to announce
    tiny_session.train("fin2", DATA, dict(CFG, max_steps=2, eval_fraction=0.25, eval_steps=2), listeners=[rec])
    assert not [m for m in _messages(rec) if m.startswith("the last step is done")]


def test_the_run_record_and_info_keep_what_the_data_report_dropped(tiny_session):
    """ft_run.json and %lora_adapters info said '6 train' where 3 rows had no answer and 3 trained."""
    s = tiny_session
    rows = DATA[:6] + [{"prompt": f"q{i}", "completion": ""} for i in range(3)]
    r = s.train("dr", rows, dict(CFG, max_steps=1))
    data = json.loads((Path(r.adapter_path) / "ft_run.json").read_text())["data"]
    assert data["train_rows"] == 9 and data["trained_examples"] == 6 and data["dropped"] == {"dropped_empty": 3}
    assert "6 trained on, 3 dropped" in s.adapter_card("dr")


def test_a_plain_function_is_a_listener_and_a_non_list_is_refused(tiny_session):
    """listeners=[print] (a natural guess) trained but logged a traceback for every event; listeners=5 was a
    TypeError deep in the run."""
    seen = []
    tiny_session.train("fn", DATA, dict(CFG, max_steps=2), listeners=[seen.append])
    kinds = {type(e).__name__ for e in seen}
    assert {"TrainBegin", "StepEnd", "TrainEnd", "Message"} <= kinds
    with pytest.raises(FtUsageError, match=r"listeners is a list of views or functions \(got int\)"):
        tiny_session.train("fn", DATA, dict(CFG, max_steps=1), listeners=5)


def test_a_multi_process_run_s_resume_hint_names_the_processes_and_the_job_s_folder(tmp_path):
    """The hint sent a job's user to %%lora_train NAME --resume, which looked in ./adapters (the checkpoints were
    in the job's folder) and, on one process, halved the global batch without a word. A resume now runs on as
    many processes as the run had, which keeps the global batch."""
    from ft_magics.core import checkpoints as ckpts

    root = tmp_path / "jobs" / "j" / "adapters" / ".checkpoints" / "intr"
    (root / "checkpoint-6").mkdir(parents=True)
    real = ckpts.latest_valid
    try:
        ckpts.latest_valid = lambda r: root / "checkpoint-6"
        hint = ckpts.resume_hint("intr", None, root, 6, world=2)
        one = ckpts.resume_hint("intr", None, root, 6)
        job = tmp_path / "jobs" / "j" / "job.yaml"
        from_job = ckpts.resume_hint("intr", None, root, 6, job=job)  # `ft-magics train job.yaml` on one process
    finally:
        ckpts.latest_valid = real
    # it sent the job's user to %%lora_train intr --resume, which looked for checkpoints in ./adapters
    assert f"with ft-magics train {job} --resume, or from a notebook with %%lora_train intr --resume --processes 1 " \
           f"--output-dir {tmp_path / 'jobs' / 'j' / 'adapters'}" in from_job
    assert f"%%lora_train intr --resume --processes 2 --output-dir {tmp_path / 'jobs' / 'j' / 'adapters'}" in hint
    assert "ft-magics train JOB --resume" in hint and "processes=2, resume=True" in hint
    assert "--output-dir" not in one and "--processes" not in one


def test_a_resume_on_another_number_of_processes_says_the_global_batch_changed(tmp_path):
    """A checkpoint made on 2 processes at batch_size 4 (global 8) resumed on one: the steps are no longer the
    uninterrupted run's, which the resume says, with the batch_size that keeps the global batch."""
    from ft_magics.core import checkpoints as ckpts
    from ft_magics.core.atomic import COMPLETE_MARKER
    from ft_magics.core.events import Message

    root = tmp_path / ".checkpoints" / "x"
    ck = root / "checkpoint-4"
    ck.mkdir(parents=True)
    for f in ("optimizer.pt", "scheduler.pt"):
        (ck / f).write_text("{}")
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(2)}, str(ck / "adapter_model.safetensors"))
    settings = {"batch_size": 4, "grad_accum": 1}
    (ck / ckpts.META).write_text(json.dumps({"settings": settings, "processes": 2, "global_batch": 8}))
    (ck / COMPLETE_MARKER).write_text("ok\n")
    said = []
    meta = {"settings": settings, "processes": 1, "global_batch": 4}
    assert ckpts.begin(root, "x", True, [said.append], meta) == ck
    texts = [m.text for m in said if isinstance(m, Message)]
    assert any("was made on 2 processes with a global batch of 8 examples per step; this run has 1 process and 4"
               in t and "(batch_size: 8 keeps the global batch)" in t for t in texts), texts
    said.clear()
    assert ckpts.begin(root, "x", True, [said.append], dict(meta, processes=2, global_batch=8)) == ck
    assert not any("global batch" in m.text for m in said if isinstance(m, Message))


def test_a_run_interrupted_before_its_first_checkpoint_leaves_no_empty_checkpoint_folder(tiny_session):
    """An interrupt before step 1 saved nothing, as it should, but left an empty adapters/.checkpoints/NAME/."""
    from ft_magics.core.events import Listener

    class InterruptAtBegin(Listener):
        def on_train_begin(self, event):
            raise KeyboardInterrupt

    s = tiny_session
    try:
        s.train("early", DATA, dict(CFG, max_steps=4), listeners=[InterruptAtBegin()])
    except KeyboardInterrupt:
        pass
    assert _ckpts(s, "early") == [] and not (s.adapters_dir / ".checkpoints" / "early").exists()


def test_evaluations_are_announced_and_kept_out_of_the_steps_rate(tiny_session, monkeypatch):
    """A slow mid-run evaluation printed nothing for minutes, then the rate (and the card's loss-tok/s) counted its
    time as training time, and the time left after it left out the evaluations still to come."""
    import time

    import transformers

    real = transformers.Trainer.evaluate

    def slow(self, *a, **kw):
        time.sleep(1.5)
        return real(self, *a, **kw)

    monkeypatch.setattr(transformers.Trainer, "evaluate", slow)

    class Clock(Listener):
        def __init__(self):
            self.seen = []

        def on_step(self, event):
            self.seen.append((time.perf_counter(), event))

        on_message = on_step

    clock = Clock()
    rows = [{"prompt": f"Question {i}: reset?", "completion": "Category: account"} for i in range(24)]
    ev = [{"prompt": f"Other {i}: reset?", "completion": "Category: account"} for i in range(4)]
    run = tiny_session.train("ev", rows, {"max_steps": 4, "batch_size": 4, "eval_steps": 2}, eval_data=ev,
                             listeners=[clock])
    steps = {e.step: (t, e) for t, e in clock.seen if type(e).__name__ == "StepEnd"}
    notes = [e.text for _, e in clock.seen if type(e).__name__ == "Message" and e.text.startswith("evaluating at")]
    assert notes == ["evaluating at step 2; its loss follows (loss-tok/s counts the steps' time only)",
                     "evaluating at step 4; its loss follows (loss-tok/s counts the steps' time only)"]
    (t1, e1), (t3, e3) = steps[1], steps[3]
    assert (t3 - t1) - (e3.elapsed_s - e1.elapsed_s) >= 1.4  # the evaluation at step 2 is not the steps' time
    assert e3.eta_s >= 1.4  # one more evaluation comes, at step 4
    assert steps[4][1].eta_s >= 1.4  # and at step 4 it is still to come (it runs after the step's line)
    timings = run.record["timings"]
    assert timings["seconds"] - timings["loss_tokens"] / timings["loss_tokens_per_s"] >= 2.8  # both evaluations
    # no eval_steps: the one evaluation comes after the last step, and the time left said 0:00 there; before any
    # evaluation its time is estimated from its tokens
    clock.seen.clear()
    tiny_session.train("ev2", rows, {"max_steps": 2, "batch_size": 4}, eval_data=ev, listeners=[clock])
    last = [e for _, e in clock.seen if type(e).__name__ == "StepEnd"][-1]
    assert last.step == 2 and last.eta_s > 0, last


def test_a_run_another_process_is_training_is_not_called_cut_short_nor_trained_twice(tiny_session):
    """Two notebooks on one adapters folder: the second's list called the first's live run "cut short" and
    offered --resume, which would have trained it twice into the same checkpoints and adapter."""
    import shutil
    import subprocess

    from ft_magics import adapter_commands
    from ft_magics.core.checkpoints import RUNNING_FILE, _process_start, checkpoint_root

    s = tiny_session
    root = checkpoint_root(s.adapters_dir, "cut")

    class Peek(Listener):
        seen = []

        def on_step(self, event):
            self.seen.append(json.loads((root / RUNNING_FILE).read_text())["pid"])

    part = s.train("cut", DATA, CFG, listeners=[StopAt(s, 3), Peek()])
    assert set(Peek.seen) == {os.getpid()}  # this process marks the run while it trains
    assert not (root / RUNNING_FILE).exists() and _ckpts(s, "cut")  # and unmarks it when it stops
    shutil.rmtree(part.adapter_path)  # a run still going in another kernel: checkpoints, no adapter yet
    s._drop_from_memory("cut")
    other = subprocess.Popen(["sleep", "60"])
    try:
        mark = {"pid": other.pid, "host": __import__("socket").gethostname(), "start": _process_start(other.pid)}
        (root / RUNNING_FILE).write_text(json.dumps(mark))
        lines = []
        adapter_commands.run(s, ["list"], out=lines.append)
        assert lines[0] == (f"cut: being trained now by another process on this machine (pid {other.pid}); its "
                            "adapter is listed here once that run saves it."), lines
        assert s.resumable_runs() == {} and not any("cut short" in line for line in lines)
        with pytest.raises(FtUsageError, match=rf"'cut' is being trained now by another process on this machine "
                                               rf"\(pid {other.pid}\)"):
            s.train("cut", DATA, CFG, resume=True)
        # said before the data is read (it came after the report, the example and a minute of tokenising): a
        # missing file would be named otherwise
        with pytest.raises(FtUsageError, match=r"'cut' is being trained now by another process"):
            s.train("cut", "no-such-file.jsonl", CFG)
        assert _ckpts(s, "cut")  # nothing of the other run's was touched
    finally:
        other.kill()
        other.wait()
    assert s.resumable_runs() == {"cut": part.steps}  # its process is gone: a mark left behind is a cut-short run


def test_a_stopped_retrain_keeps_the_completed_adapter_it_replaced(tiny_session, monkeypatch):
    """Retraining a name warned, then a stop saved the new 2-step adapter over the completed one: the finished
    adapter was gone. The stopped run keeps what it learned under the name, and the completed one it replaced in
    adapters/.replaced/NAME, from where it loads back; a failed save puts it back in place."""
    s = tiny_session
    done = s.train("keep", DATA, CFG, listeners=[])
    rec = Recorder()
    part = s.train("keep", DATA, CFG, listeners=[rec, StopAt(s, 2)])
    kept = s.adapters_dir / ".replaced" / "keep"
    assert part.status == "stopped" and part.steps < 8
    assert json.loads((Path(part.adapter_path) / "ft_run.json").read_text())["steps"] == part.steps
    old = json.loads((kept / "ft_run.json").read_text())
    assert old["status"] == "completed" and old["steps"] == done.steps == 8
    said = _messages(rec)
    assert any("this run replaces it when it saves (stopped before it completes, the run keeps this one in "
               f"{kept})" in m for m in said), said
    assert any(f"the completed adapter 'keep' this run replaced is kept in {kept}: %lora_adapters load {kept} "
               "--name keep-before" in m for m in said), said
    assert "keep" in s.adapters_on_disk() or "keep" in s.adapters  # the stopped run's adapter is the name's
    assert ".replaced" not in s.adapters_on_disk() and not s.misnamed_on_disk()
    s.load_adapter(kept, "keep-before")
    assert s.adapters.require("keep-before").steps == 8
    # a run that completes replaces as asked, and a stopped one over a stopped adapter keeps nothing more
    again = s.train("keep", DATA, dict(CFG, max_steps=3), listeners=[StopAt(s, 1)])
    assert again.status == "stopped" and json.loads((kept / "ft_run.json").read_text())["steps"] == 8
    s.train("done", DATA, dict(CFG, max_steps=2), listeners=[])
    from ft_magics.core import training

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training, "save_adapter", full_disk)
    with pytest.raises(OSError):
        s.train("done", DATA, CFG, listeners=[StopAt(s, 1)])
    assert json.loads((s.adapters_dir / "done" / "ft_run.json").read_text())["status"] == "completed"
    assert not (s.adapters_dir / ".replaced" / "done").exists()  # put back where it was


def test_a_renamed_stopped_run_resumes_its_own_weights(tiny_session):
    """rename moved .checkpoints/OLD to .checkpoints/NEW, but each checkpoint kept the weights in checkpoint-N/OLD:
    --resume under the new name found none, trained a fresh adapter from step N on and said it resumed. A
    checkpoint without the name's weights is now refused rather than resumed."""
    from ft_magics.core.checkpoints import checkpoint_root, latest_valid

    s = tiny_session
    part = s.train("old", DATA, CFG, listeners=[StopAt(s, 3)])
    straight = s.train("twin", DATA, CFG, listeners=[StopAt(s, 3)])
    assert part.steps == straight.steps
    s.rename_adapter("old", "new")
    ckpt = latest_valid(checkpoint_root(s.adapters_dir, "new"))
    assert (ckpt / "new" / "adapter_model.safetensors").is_file() and not (ckpt / "old").exists()
    renamed = s.train("new", DATA, CFG, resume=True, listeners=[])
    resumed = s.train("twin", DATA, CFG, resume=True, listeners=[])
    first = lambda r: [l for st, l in r.record["loss_history"] if st == part.steps + 1][0]  # noqa: E731
    assert abs(first(renamed) - first(resumed)) < 1e-4, (renamed.record["loss_history"], resumed.record["loss_history"])
    # a checkpoint whose weights sit under another name (renamed by hand) is refused, not resumed fresh
    cut = s.train("hand", DATA, CFG, listeners=[StopAt(s, 3)])
    assert cut.status == "stopped"
    ckpt = latest_valid(checkpoint_root(s.adapters_dir, "hand"))
    os.rename(ckpt / "hand", ckpt / "other")
    with pytest.raises(FtUsageError, match=r"holds no adapter weights under that name \(it holds 'other'"):
        s.train("hand", DATA, CFG, resume=True, listeners=[])


def test_a_card_keeps_every_resume_of_a_run(tiny_session):
    """A run resumed twice: its card kept only the last resume, so the first part's other learning rate was
    forgotten. Each resume's checkpoints carry the one before."""
    from ft_magics.core.adapters import adapter_card

    s = tiny_session
    one = s.train("twice", DATA, CFG, listeners=[StopAt(s, 3)])
    two = s.train("twice", DATA, dict(CFG, max_steps=12, learning_rate=5e-3), resume=True,
                  listeners=[StopAt(s, one.steps + 2)])
    assert two.status == "stopped" and two.steps > one.steps
    three = s.train("twice", "demo:support", dict(CFG, max_steps=12, learning_rate=5e-3), resume=True, listeners=[])
    assert three.status == "completed" and three.steps == 12
    assert three.record["resumed"]["at"] == two.steps and three.record["resumed"]["before"]["at"] == one.steps
    card = adapter_card("twice", Path(three.adapter_path))
    settings = next(l for l in card.splitlines() if l.startswith("Settings"))
    assert settings.endswith(f" (steps 1-{one.steps}: max_steps 8, learning_rate 0.01)"), card
    data = next(l for l in card.splitlines() if l.startswith("Data"))
    assert data.endswith(f"; steps 1-{two.steps} ran on <list>"), card

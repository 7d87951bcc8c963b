"""The widget views against streams of events: widget state values, not just "no error"."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from ft_magics.core.events import EvalEnd, MemoryReading, Message, StepEnd, TrainBegin, TrainEnd, emit

GB = 10 ** 9  # human_bytes shows decimal GB


def cpu_mem(used=1 * GB):
    return MemoryReading(kind="cpu", used_bytes=used, peak_bytes=used, total_bytes=16 * GB,
                         available_bytes=8 * GB, label="CPU process RSS")


def cuda_mem():
    return MemoryReading(kind="cuda", used_bytes=3 * GB, peak_bytes=4 * GB, total_bytes=24 * GB,
                         available_bytes=19 * GB, reserved_bytes=5 * GB, label="CUDA 0 (Test GPU) allocated")


def begin(total=10, background=False):
    return TrainBegin(run_name="bot", total_steps=total, num_examples=40, trainable_params=1000,
                      total_params=100000, device="cpu", background=background)


def step(i, total=10, loss=None, mem=None):
    return StepEnd(step=i, total_steps=total, epoch=i / total, loss=2.0 / i if loss is None else loss,
                   learning_rate=1e-4, grad_norm=0.5 + i / 100, elapsed_s=float(i), eta_s=float(total - i),
                   tokens_per_s=1234.0, memory=mem or cpu_mem())


class FakeSession:
    def __init__(self):
        self.stopped = 0

    def stop(self):
        self.stopped += 1
        return True


@pytest.fixture
def dash():
    from ft_magics.widgets.dashboard import TrainingDashboard

    return TrainingDashboard(background=True, session=FakeSession(), show=False, max_fps=1e9, draw_budget=float("inf"))


def test_dashboard_progress_labels_and_chart_follow_the_steps(dash):
    empty = dash.chart.value
    assert empty.startswith("<svg") and "waiting for the first step" in empty
    emit([dash], Message("data: 40 examples"))
    assert "data: 40 examples" in dash.messages.value
    emit([dash], begin())
    assert dash.progress.max == 10 and dash.progress.value == 0
    assert "bot" in dash.title.value and "1,000 trainable" in dash.title.value
    images = [empty]
    for i in range(1, 4):
        emit([dash], step(i))
        images.append(dash.chart.value)
    assert dash.progress.value == 3
    assert dash.progress_text.value.startswith("3/10 · epoch 0.30")
    assert "0:03 elapsed, 0:07 left" in dash.progress_text.value
    assert "loss 0.6667" in dash.stats.value and "lr 1.00e-04" in dash.stats.value
    assert "grad norm 0.530" in dash.stats.value and "1,234 loss-tokens/s" in dash.stats.value
    assert len(set(images)) == 4, "every step (unthrottled here) redraws a different curve"
    assert all(img.startswith("<svg") and img.endswith("</svg>") for img in images)
    assert images[-1].count('class="ft-loss-raw"') == 1 and "last loss 0.6667" in images[-1]
    assert dash.curve.steps == [1, 2, 3]
    assert dash.curve.ema[0] == pytest.approx(2.0) and dash.curve.ema[1] == pytest.approx(0.9 * 2.0 + 0.1 * 1.0)
    assert "pairs right" not in dash.stats.value
    pref = step(4)
    pref.pairs_right = 0.75  # a DPO / ORPO run's share of pairs ranked as preferred
    emit([dash], pref)
    assert "pairs right 75%" in dash.stats.value


def test_memory_readout_is_labelled_by_kind(dash):
    emit([dash], begin())
    emit([dash], step(1, mem=cpu_mem(2 * GB)))
    assert dash.memory.value.startswith("RAM (CPU): process RSS 2.0 GB")
    assert "system available 8.0 GB of 16.0 GB" in dash.memory.value
    assert dash.memory_bar.description == "RAM" and dash.memory_bar.value == pytest.approx(2 / 16)
    emit([dash], step(2, mem=cuda_mem()))
    assert dash.memory.value.startswith("CUDA 0 (Test GPU) allocated: allocated 3.0 GB · reserved 5.0 GB · peak 4.0 GB")
    assert dash.memory_bar.description == "VRAM" and dash.memory_bar.value == pytest.approx(3 / 24)
    assert "NVML" not in dash.memory.value  # no NVML figure in the reading: none shown
    nvml = cuda_mem()
    nvml.device_used_bytes = 6 * GB
    emit([dash], step(3, mem=nvml))
    assert "device in use (NVML, all processes) 6.0 GB" in dash.memory.value


def test_nvml_reading_is_optional(monkeypatch):
    """Without NVML (no nvidia-ml-py, or no GPU) the reading has no device figure instead of failing."""
    import torch

    from ft_magics.core import memory

    def no_nvml(idx):
        raise ModuleNotFoundError("pynvml")

    monkeypatch.setattr(torch.cuda, "device_memory_used", no_nvml)
    assert memory._nvml_used(0) == 0
    monkeypatch.setattr(torch.cuda, "device_memory_used", lambda idx: 7 * GB + idx)
    assert memory._nvml_used(1) == 7 * GB + 1


def test_eval_points_and_log_toggle_redraw(dash):
    emit([dash], begin())
    emit([dash], step(1))
    before = dash.chart.value
    emit([dash], EvalEnd(step=1, eval_loss=1.5))
    assert dash.curve.eval_losses == [1.5]
    after_eval = dash.chart.value
    assert after_eval != before and after_eval.count('class="ft-loss-eval"') == 1 and "eval loss" in after_eval
    # both axes are drawn at each draw; the toggle picks one in the browser (jslink), with no kernel round trip,
    # so it works while a blocking run keeps the kernel busy (it waited for the run's end before)
    assert "loss (log)" in dash.chart_log.value and "loss (log)" not in after_eval
    assert dash.chart_log.value.count('class="ft-loss-eval"') == 1
    link = dash._scale_link
    assert (link.source[0], link.source[1], link.target[0], link.target[1]) == (dash.scale, "index", dash.charts,
                                                                                "selected_index")
    assert dash.shown_chart is dash.chart
    dash.scale.value = "log"
    assert dash.curve.log_scale is True and dash.curve.log_drawn
    assert dash.charts.selected_index == 1 and dash.shown_chart is dash.chart_log


def test_stop_button_sets_the_session_flag_in_background_mode(dash):
    emit([dash], begin(background=True))
    assert dash.stop_button.layout.display is None  # visible
    # what the cell used to print under the dashboard (a line that outlived the run) is said beside the button,
    # and goes with it when the run ends
    assert dash.stop_hint.value.startswith("Training in the background; the kernel is free.")
    dash.stop_button.click()
    assert dash.session.stopped == 1
    assert dash.stop_button.disabled and "stopping" in dash.stop_hint.value


def test_blocking_mode_explains_the_kernel_interrupt():
    from ft_magics.widgets.dashboard import TrainingDashboard

    d = TrainingDashboard(background=False, show=False)
    assert d.stop_button.layout.display == "none"
    assert "interrupt the kernel" in d.stop_hint.value


def test_redraws_are_throttled():
    from ft_magics.widgets.dashboard import TrainingDashboard

    d = TrainingDashboard(show=False, max_fps=4.0)
    emit([d], begin(total=200))
    t = time.perf_counter()
    for i in range(1, 200):
        emit([d], step(i, total=200))
    spent = time.perf_counter() - t
    # at most one label flush per 0.25 s (plus the first), and the curve is drawn far less than per step
    assert d.draws <= 1 + spent / 0.25
    assert d.progress.value < 199 or spent > 0.25
    emit([d], step(200, total=200))  # the last step is always shown
    assert d.progress.value == 200 and d.curve.steps[-1] == 200


def test_final_record_names_the_curve_the_run_saved(dash, tmp_path):
    adapter = tmp_path / "bot"
    adapter.mkdir()
    emit([dash], begin())
    for i in range(1, 11):
        emit([dash], step(i))
    emit([dash], TrainEnd(run_name="bot", status="completed", steps=10, final_loss=0.2, elapsed_s=12.0,
                          adapter_path=str(adapter), peak_memory=cpu_mem()))
    assert "10 steps, last loss 0.2000" in dash.chart.value
    assert "completed after 10 steps in 0:12; loss 2.0000 -&gt; 0.2000" in dash.record.value
    assert f"adapter saved to {adapter}" in dash.record.value
    assert "loss_curve.svg" not in dash.record.value  # this folder holds none: nothing is claimed
    assert dash.stop_button.disabled and "Run (completed)" in dash.title.value
    (adapter / "loss_curve.svg").write_text("<svg/>")  # what a run writes with its adapter
    again = TrainingDashboardForTest()
    emit([again], begin())
    emit([again], TrainEnd(run_name="bot", status="completed", steps=10, final_loss=0.2, elapsed_s=12.0,
                           adapter_path=str(adapter), peak_memory=cpu_mem()))
    assert f"loss curve saved to {adapter / 'loss_curve.svg'}" in again.record.value


def TrainingDashboardForTest():
    from ft_magics.widgets.dashboard import TrainingDashboard

    return TrainingDashboard(background=True, session=FakeSession(), show=False, max_fps=1e9, draw_budget=float("inf"))


def test_every_saved_run_has_its_loss_curve_with_or_without_a_dashboard(tiny_session, tmp_path):
    """Only the Jupyter dashboard wrote loss_curve.svg: a run from a terminal, a script, --no-widgets or the
    Python API had none, though the README promised it in the adapter folder. The run writes it now, with the
    adapter (atomically), drawn from its record: one raw point per logged step, one dot per evaluation."""
    import re

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hello {i}", "completion": "billing"}) + "\n" for i in range(12)))
    res = tiny_session.train("plain", str(data), {"max_steps": 4, "batch_size": 2, "r": 4, "eval_fraction": 0.25,
                                                   "eval_steps": 2}, listeners=[])
    svg = (Path(res.adapter_path) / "loss_curve.svg").read_text()
    points = re.search(r'class="ft-loss-raw"[^>]*points="([^"]+)"', svg).group(1).split()
    assert len(points) == len(res.record["loss_history"]) == 4
    assert svg.count('class="ft-loss-eval"') == len(res.record["eval_history"]) >= 2
    assert f"last loss {res.record['loss_history'][-1][1]:.4f}" in svg


def test_dashboard_needs_no_plotting_library():
    """The curve was drawn with matplotlib, ~25 MB of the training process's RSS (issue 7's memory goal) and
    tens of ms per redraw: a whole run's dashboard now leaves matplotlib unimported."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from ft_magics.core.events import EvalEnd, StepEnd, TrainBegin, TrainEnd, emit\n"
            "from ft_magics.widgets.dashboard import TrainingDashboard\n"
            "d = TrainingDashboard(show=False, max_fps=1e9, draw_budget=float('inf'))\n"
            "emit([d], TrainBegin(run_name='b', total_steps=3, num_examples=4, trainable_params=1, total_params=2,"
            " device='cpu'))\n"
            "for i in (1, 2, 3): emit([d], StepEnd(step=i, total_steps=3, epoch=i / 3, loss=1.0 / i,"
            " learning_rate=1e-4, grad_norm=1.0, elapsed_s=i, eta_s=3 - i, tokens_per_s=10.0))\n"
            "emit([d], EvalEnd(step=3, eval_loss=0.5))\n"
            "emit([d], TrainEnd(run_name='b', status='completed', steps=3, final_loss=0.3, elapsed_s=1.0,"
            " adapter_path=None))\n"
            "print(d.draws, 'matplotlib' in sys.modules, d.chart.value.count('<circle'))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    draws, imported, circles = res.stdout.split()
    assert int(draws) >= 4 and imported == "False" and int(circles) == 2  # the eval point and its legend mark


def test_loss_chart_places_points_by_value_and_labels_round_ticks():
    import re

    from ft_magics.core.chart import LossCurve, _log_ticks, _nice_ticks

    c = LossCurve()
    for i, loss in enumerate([3.0, 2.0, 1.0, 1.5], start=1):
        c.add(i, loss)
    c.add_eval(4, 1.2)
    svg = c.svg()
    raw = re.search(r'class="ft-loss-raw"[^>]*points="([^"]+)"', svg).group(1).split()
    xs, ys = zip(*((float(a), float(b)) for a, b in (p.split(",") for p in raw)))
    assert list(xs) == sorted(xs) and len(xs) == 4
    assert ys[2] > ys[3] > ys[1] > ys[0]  # SVG y grows downward: the lowest loss is drawn lowest
    cy = float(re.search(r'class="ft-loss-eval" cx="[^"]+" cy="([^"]+)"', svg).group(1))
    assert ys[2] > cy > ys[1]  # eval 1.2 lies between the losses 1.0 and 2.0
    labels = re.findall(r'text-anchor="end">([^<]+)</text>', svg)
    assert labels == ["1.0", "1.5", "2.0", "2.5", "3.0"]
    assert [v for v, _ in _nice_ticks(0.37, 3.12)] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert [t for _, t in _log_ticks(0.4, 3.1)] == ["0.5", "1", "2", "3"]
    assert [t for _, t in _nice_ticks(1, 7, integer=True)] == ["1", "2", "3", "4", "5", "6", "7"]
    c.add(5, float("nan"))  # a diverged step: the chart skips it and stays a valid document
    points = re.search(r'class="ft-loss-raw"[^>]*points="([^"]+)"', c.svg()).group(1)
    assert "nan" not in points.lower() and len(points.split()) == 4


def test_a_long_runs_chart_stays_small_and_keeps_the_extremes():
    import re

    from ft_magics.core.chart import LossCurve

    c = LossCurve()
    for i in range(1, 20001):
        c.add(i, 1.0 + (i % 7) / 10)
    c.losses[12345] = 9.0  # a spike a thinned curve must still show
    c.losses[777] = 0.1
    svg = c.svg()
    raw = re.search(r'class="ft-loss-raw"[^>]*points="([^"]+)"', svg).group(1).split()
    assert len(raw) <= 2 * (c.width - c.left - c.right) and len(svg) < 60_000
    ys = [float(p.split(",")[1]) for p in raw]
    top, bottom = c.top, c.height - c.bottom
    assert min(ys) == pytest.approx(top + 0.06 / 1.12 * (bottom - top), abs=0.2)  # 9.0: the top of the range
    assert max(ys) == pytest.approx(bottom - 0.06 / 1.12 * (bottom - top), abs=0.2)  # 0.1: its bottom


def test_dashboard_on_a_real_tiny_training_run(tiny_session, tmp_path):
    from ft_magics.widgets.dashboard import TrainingDashboard

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hello {i}", "completion": "billing"}) + "\n" for i in range(8)))
    d = TrainingDashboard(show=False, max_fps=1e9, draw_budget=float("inf"))
    res = tiny_session.train("t", str(data), {"max_steps": 4, "batch_size": 4, "r": 4}, listeners=[d])
    assert d.progress.value == 4 and d.progress.max == 4
    assert d.curve.steps == [1, 2, 3, 4]
    assert d.memory.value.startswith("RAM (CPU): process RSS")
    curve = tmp_path / "adapters" / "t" / "loss_curve.svg"
    assert curve.read_text() == d.chart.value  # the run's saved curve is the chart the dashboard showed last
    assert f"loss curve saved to {curve}" in d.record.value
    assert res.adapter_path and "adapter saved to" in d.record.value


# ------------------------------------------------------------------ memory gauge
def test_sparkline_scales_between_min_and_max():
    from ft_magics.widgets.memory_gauge import sparkline

    assert sparkline([1, 1, 1]) == "▁▁▁"
    assert sparkline([0, 5, 10]) == "▁▅█"
    assert len(sparkline(range(100), width=60)) == 60


def test_memory_gauge_thread_updates_and_stops_when_closed():
    from ft_magics.widgets.memory_gauge import MemoryGauge

    readings = iter(range(1, 10_000))
    g = MemoryGauge(interval=0.05, probe=lambda: cpu_mem(next(readings) * GB // 10))
    g.start()
    deadline = time.time() + 5
    while g.samples < 4 and time.time() < deadline:
        time.sleep(0.02)
    assert g.samples >= 4 and g.running
    assert g.label.value.startswith("RAM (CPU): process RSS")
    assert g.bar.description == "RAM" and g.bar.value > 0
    assert "▁" in g.spark.value and "█" in g.spark.value
    g.close_button.click()
    assert not g.running
    n = g.samples
    time.sleep(0.2)
    assert g.samples == n and g.box.comm is None


def test_ft_memory_magic_text_and_off(shell, capsys):
    shell.run_line_magic("ft_memory", "--once")
    out = capsys.readouterr().out
    assert out.startswith("RAM (CPU): process RSS") or out.startswith("VRAM")
    shell.run_line_magic("ft_memory", "")  # terminal shell: text, no thread
    assert "widget frontend" in capsys.readouterr().out
    shell.run_line_magic("ft_memory", "off")
    assert "no memory gauge running" in capsys.readouterr().out
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="did you mean 'off'"):
        shell.run_line_magic("ft_memory", "of")
    assert not [t for t in threading.enumerate() if t.name == "ft_magics-memory-gauge"]


def test_ft_memory_live_gauge_in_a_widget_frontend(shell, monkeypatch):
    import ft_magics.widgets as w
    from ft_magics.widgets import memory_gauge

    monkeypatch.setattr(w, "widget_frontend", lambda: True)
    shell.run_line_magic("ft_memory", "--interval 0.05")
    g = memory_gauge.current_gauge()
    assert g is not None and g.running
    shell.run_line_magic("ft_memory", "off")
    assert not g.running and memory_gauge.current_gauge() is None
    shell.run_line_magic("ft_memory", "--interval 0.05")
    g = memory_gauge.current_gauge()
    assert g.running
    shell.run_line_magic("unload_ext", "ft_magics")  # unloading the extension ends the gauge's thread
    assert not g.running and memory_gauge.current_gauge() is None
    shell.run_line_magic("load_ext", "ft_magics")


# ------------------------------------------------------------------ adapters panel
@pytest.fixture
def two_adapters(tiny_session, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hi {i}", "completion": "ok"}) + "\n" for i in range(4)))
    for name in ("first", "second"):
        tiny_session.train(name, str(data), {"max_steps": 1, "batch_size": 4, "r": 4})
    return tiny_session


def _choices(panel) -> list:
    """The adapter names the panel's selector offers (its options are (label, value) pairs)."""
    return [value for _label, value in panel.selector.options]


def test_adapters_panel_table_selector_and_swap(two_adapters, monkeypatch):
    from ft_magics.widgets.adapters_panel import AdaptersPanel

    s = two_adapters
    calls = []
    real_use = s.use
    monkeypatch.setattr(s, "use", lambda name: calls.append(name) or real_use(name))
    p = AdaptersPanel(s)
    assert _choices(p) == ["base", "first", "second"]
    assert p.selector.value == "second"  # the last trained adapter is active
    rows = {r["name"]: r for r in p.rows()}
    assert rows["first"]["r"] == 4 and rows["first"]["steps"] == 1
    assert rows["first"]["memory"] != "0 B" and rows["first"]["disk"] != "0 B"
    for text in ("first", "second", "rank", "in memory", "final loss", str(s.adapters_dir)):
        assert text in p.table.value
    p.selector.value = "first"
    assert calls == ["first"] and s.adapters.active == "first"
    assert p.status.value.startswith("active: first (swapped in ") and p.status.value.endswith(" ms)")
    p.selector.value = "base"
    assert calls == ["first", "base"] and s.adapters.active is None


def test_adapters_panel_unload_and_delete_with_confirmation(two_adapters):
    from ft_magics.widgets.adapters_panel import AdaptersPanel

    s = two_adapters
    folder = s.adapters_dir / "first"
    p = AdaptersPanel(s)
    p.selector.value = "first"
    p.delete_button.click()
    assert p.confirm_box.layout.display == "flex" and "first" in p.confirm_label.value
    p.cancel_button.click()
    assert folder.is_dir() and "first" in s.adapters
    p.delete_button.click()
    p.confirm_button.click()
    assert not folder.exists() and "first" not in s.adapters
    assert _choices(p) == ["base", "second"]
    p.selector.value = "second"
    p.unload_button.click()
    assert "second" not in s.adapters and (s.adapters_dir / "second").is_dir()
    assert p.selector.options == (("base", "base"), ("second (on disk)", "second")) and p.unload_button.disabled
    assert "not loaded (select one to load it): second" in p.table.value
    p.selector.value = "second"  # an adapter in the folder loads when selected (as after a kernel restart)
    assert "second" in s.adapters and s.adapters.active == "second"
    assert _choices(p) == ["base", "second"] and "not loaded" not in p.table.value
    # the status says it was loaded, not "swapped in 0.05 ms" (the swap alone, after a load of tens of ms)
    assert p.status.value.startswith("active: second (loaded from disk and switched in ")


def test_adapters_panel_renames_the_selected_adapter_and_its_folder(two_adapters):
    """The panel had no way to rename: a typo in an adapter's name meant a trip to %lora_adapters rename."""
    from ft_magics.widgets.adapters_panel import AdaptersPanel

    s = two_adapters
    p = AdaptersPanel(s)
    p.selector.value = "first"
    p.rename_button.click()
    assert p.status.value == "type the new name for first in the box beside Rename first." and "first" in s.adapters
    p.rename_text.value = "second"
    p.rename_button.click()
    assert p.status.value.startswith("cannot rename: cannot rename 'first' to 'second'") and "first" in s.adapters
    p.rename_text.value = "  faq-bot "
    p.rename_button.click()
    assert p.status.value == f"renamed first to faq-bot (folder {s.adapters_dir / 'faq-bot'})"
    assert "faq-bot" in s.adapters and "first" not in s.adapters and s.adapters.active == "faq-bot"
    assert (s.adapters_dir / "faq-bot").is_dir() and not (s.adapters_dir / "first").exists()
    assert sorted(_choices(p)) == ["base", "faq-bot", "second"] and p.selector.value == "faq-bot" and p.rename_text.value == ""
    s.use("second")  # switched in another cell: the panel acts on what it shows, or not at all
    p.rename_text.value = "other"
    p.rename_button.click()
    assert p.status.value.startswith("nothing renamed: the panel was out of date") and "second" in s.adapters


def test_adapters_panel_delete_of_an_adapter_gone_since_it_was_drawn_says_so(two_adapters):
    """Unloaded in another cell (the panel still listing it), a folder-less adapter's Delete raised FtUsageError
    out of the button's handler: in Jupyter a log line, and a button that seemed to do nothing."""
    import shutil

    from ft_magics.widgets.adapters_panel import AdaptersPanel

    s = two_adapters
    p = AdaptersPanel(s)
    p.selector.value = "first"
    s.unload_adapter("first")
    shutil.rmtree(s.adapters_dir / "first")
    p.delete_button.click()
    assert p.status.value.startswith("cannot delete: no adapter named 'first'")
    assert p.confirm_box.layout.display != "flex" and _choices(p) == ["base", "second"]


def test_lora_adapters_without_arguments_shows_the_panel_in_a_widget_frontend(shell, monkeypatch, capsys):
    import ft_magics.widgets as w

    shell.run_line_magic("lora_adapters", "")
    assert "No adapters yet" in capsys.readouterr().out  # terminal: the text list
    shown = []
    monkeypatch.setattr(w, "widget_frontend", lambda: True)
    monkeypatch.setattr("IPython.display.display", lambda obj, *a, **k: shown.append(obj))
    shell.run_line_magic("lora_adapters", "")
    from ft_magics.widgets.adapters_panel import AdaptersPanel

    assert len(shown) == 1 and isinstance(shown[0], AdaptersPanel)


def test_chat_panel_answers_each_message_with_the_chosen_adapter(two_adapters):
    from ft_magics.widgets.chat_panel import ChatPanel

    s = two_adapters
    p = ChatPanel(s, max_new_tokens=4)
    assert _choices_of(p.adapter) == ["base", "first", "second"] and p.adapter.value == "second"
    assert "No messages yet" in p.log.value
    p.adapter.value = "first"
    p.text.value = "hi there"
    p.send_button.click()
    conv = s.conversation
    assert conv.exchanges == 1 and conv.turns[1].adapter == "first" and p.text.value == ""
    assert "hi there" in p.log.value and "<b>first</b>" in p.log.value
    assert p.status.value.startswith("first · ") and "tok/s" in p.status.value
    assert s.adapters.active == "second"  # a per-message choice, not a switch of the active adapter
    p.adapter.value = "base"
    assert p.send("and again")
    assert [t.adapter for t in s.conversation.turns[1::2]] == ["first", "base"]
    p.render(pending=("typing", "partial answ", "base"))
    assert "partial answ …" in p.log.value and "answering" in p.log.value
    p.new_button.click()
    assert s.conversation.exchanges == 0 and "No messages yet" in p.log.value


def test_new_conversation_keeps_the_system_prompt_whether_or_not_a_message_was_sent(two_adapters):
    """The New conversation button kept the --system prompt before the first message and dropped it after."""
    from ft_magics.widgets.chat_panel import ChatPanel

    s = two_adapters
    for send_first in (False, True):
        s.conversation = None
        p = ChatPanel(s, max_new_tokens=2, system="Be terse.")
        if send_first:
            assert p.send("hi")
        p.new_button.click()
        assert s.conversation.system == "Be terse." and s.conversation.exchanges == 0, send_first
        assert p.status.value == "new conversation (system prompt kept: Be terse.)"
        assert p.send("hello") and s.conversation.system == "Be terse."


def test_chat_panel_keeps_the_message_when_it_cannot_answer(two_adapters):
    from ft_magics.widgets.chat_panel import ChatPanel

    from ft_magics.errors import FtUsageError

    s = two_adapters
    with pytest.raises(FtUsageError, match="--max-new-tokens must be at least 1"):
        ChatPanel(s, max_new_tokens=0)  # a setting the generator refuses is refused as the panel is made
    p = ChatPanel(s, max_new_tokens=4)
    too_long = " ".join(["keep me"] * 2000)  # more tokens than the tiny model's context
    p.text.value = too_long
    assert not p.send()
    assert p.text.value == too_long and p.status.value.startswith("cannot answer: the prompt is")
    assert not p.send_button.disabled
    p.text.value = "   "
    assert not p.send() and p.status.value == "write a message first."


def test_lora_chat_without_a_message_shows_the_chat_panel_in_a_widget_frontend(shell, tiny_model_dir, monkeypatch):
    import ft_magics.widgets as w

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shown = []
    monkeypatch.setattr(w, "widget_frontend", lambda: True)
    monkeypatch.setattr("IPython.display.display", lambda obj, *a, **k: shown.append(obj))
    shell.run_line_magic("lora_chat", "--max-new-tokens 3 --repetition-penalty 1.2")
    from ft_magics.widgets.chat_panel import ChatPanel

    assert len(shown) == 1 and isinstance(shown[0], ChatPanel)
    assert (shown[0].sampling.max_new_tokens, shown[0].sampling.repetition_penalty) == (3, 1.2)


def _choices_of(dropdown) -> list:
    return [value for _label, value in dropdown.options]


def test_target_modules_are_shown_compactly():
    from ft_magics.widgets.adapters_panel import short_modules

    mods = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert short_modules(mods) == "q_proj, v_proj (x2 layers)"
    assert short_modules(["q_proj", "v_proj"]) == "q_proj, v_proj"
    assert short_modules("all-linear") == "all-linear" and short_modules(None) == "-"


def test_stop_button_ends_a_real_background_run_and_the_adapter_is_saved(tiny_session, tmp_path):
    from ft_magics.widgets.dashboard import TrainingDashboard

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hello {i}", "completion": "billing"}) + "\n" for i in range(8)))
    d = TrainingDashboard(background=True, session=tiny_session, show=False)
    tiny_session.train("bg", str(data), {"max_steps": 2000, "batch_size": 4, "r": 4}, listeners=[d], background=True)
    deadline = time.time() + 120
    while not d.curve.steps and time.time() < deadline:
        time.sleep(0.05)
    assert tiny_session.training_in_progress
    d.stop_button.click()
    res = tiny_session.wait(120)
    assert not tiny_session.training_in_progress
    assert res.status == "stopped" and 0 < res.steps < 2000
    assert (tmp_path / "adapters" / "bg" / "loss_curve.svg").exists()
    assert "stopped after" in d.record.value


def test_re_running_a_background_run_s_cell_shows_its_live_dashboard_again(shell, tiny_model_dir, tmp_path, monkeypatch,
                                                                          capsys):
    """Re-running the cell of a live --background run replaced its output (the dashboard, its Stop button) with
    the refusal, and nothing could show the dashboard again while the run went on."""
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    monkeypatch.setattr(shell, "kernel", object(), raising=False)  # a widget frontend, as in Jupyter
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.user_ns["rows"] = [{"prompt": f"hello {i}", "completion": "billing"} for i in range(8)]
    cell = ("bgx --data rows --background", "max_steps: 3000\nbatch_size: 4\nr: 4\n")
    magics = shell.magics_manager.registry["FtMagics"]
    capsys.readouterr()
    shell.run_cell_magic("lora_train", *cell)
    assert "the kernel is free" not in capsys.readouterr().out  # the dashboard says it, while the run lasts
    try:
        dash = magics._background_view
        assert dash is not None and magics.session.training_in_progress
        shown.clear()
        with pytest.raises(UsageError, match=r"training 'bgx' is in progress in the background \(its live dashboard "
                                             r"is shown again above\)"):
            shell.run_cell_magic("lora_train", *cell)
        assert shown == [dash.box]  # the same widget: it keeps updating where it is shown now
        assert "in the background" in dash.stop_hint.value
    finally:
        shell.run_line_magic("lora_stop", "")
        magics.session.wait(120)
    assert not magics.session.training_in_progress
    deadline = time.time() + 30
    while dash.stop_hint.value and time.time() < deadline:  # the run's end event reaches the view
        time.sleep(0.05)
    assert dash.stop_hint.value == "" and not any("in the background" in str(o) for o in shown)


def test_ft_memory_peak_is_the_processes_highest_not_now(shell, capsys):
    """'%ft_memory --once' after a run (or after %ft_unload) printed a 'peak' equal to the RSS of the moment."""
    import gc
    import re

    from ft_magics.core.memory import human_bytes, rss_bytes

    block = bytearray(300_000_000)  # a peak well above what stays
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    del block
    gc.collect()
    shell.run_line_magic("ft_memory", "--once")
    out = capsys.readouterr().out
    rss, peak = re.search(r"process RSS (.+?) · peak (.+?) · ", out).groups()
    assert rss != peak and peak != human_bytes(rss_bytes()), out


def test_a_preference_runs_summary_names_its_eval_loss():
    """A DPO run's summary said 'eval loss 0.2288' (the DPO loss over pairs) beside %lora_eval's loss of the chosen
    answers, both called loss."""
    from ft_magics.core.events import TrainEnd
    from ft_magics.widgets.text import summary_text

    def summary(objective):
        return summary_text(TrainEnd(run_name="p", status="completed", steps=3, elapsed_s=1.0, final_loss=0.5,
                                     adapter_path=None, extra={"eval_loss": 0.2288, "objective": objective}))

    assert "eval loss (DPO, over the held-out pairs) 0.2288" in summary("dpo")
    assert "eval loss 0.2288" in summary("sft") and "DPO" not in summary("sft")


def test_lora_chat_flags_alone_act_the_same_with_and_without_a_panel(shell, tiny_model_dir, monkeypatch, capsys):
    """In a notebook '%lora_chat --system TEXT' only showed a panel (the next typed turn had no system prompt),
    and '--adapter nope' opened a panel answering with the base; in a terminal '--adapter b' alone did nothing
    without a word. --system now persists in both, an unknown adapter is refused in both, and flags that shape
    one answer say they need a message."""
    from IPython.core.error import UsageError

    import ft_magics.widgets as w

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    session = shell.magics_manager.registry["FtMagics"].session
    for panel in (True, False):
        monkeypatch.setattr(w, "widget_frontend", lambda panel=panel: panel)
        monkeypatch.setattr("IPython.display.display", lambda obj, *a, **k: None)
        session.conversation = None
        shell.run_line_magic("lora_chat", '--system "Be terse."')
        assert session.conversation.system == "Be terse.", panel
        with pytest.raises(UsageError, match="no adapter named 'nope'"):
            shell.run_line_magic("lora_chat", "--adapter nope")
    shell.run_line_magic("lora_chat", "--max-new-tokens 2 hello")
    capsys.readouterr()
    shell.run_line_magic("lora_chat", "--temperature 0.5")
    assert "--temperature applies to a turn: give a message too" in capsys.readouterr().out


def test_a_chat_keeps_each_answer_beside_the_system_prompt_it_was_given_under(shell, tiny_model_dir, capsys):
    """Tester-found, all in one conversation: '--system B' mid-conversation rewrote the transcript's system line
    above answers given under A; '--system X --max-new-tokens 5' dropped the limit without a word; markup typed in a
    message became real turn tokens with no word; a system prompt past the context was refused as 'the prompt'."""
    from IPython.core.error import UsageError

    from ft_magics.core.inference import _streamer
    from ft_magics.widgets.chat_panel import ChatPanel

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    session = shell.magics_manager.registry["FtMagics"].session
    session.chat("hi", system="Be a pirate.", max_new_tokens=2)
    capsys.readouterr()
    shell.run_line_magic("lora_chat", '--system "Be terse." --max-new-tokens 5')
    out = capsys.readouterr().out
    assert "--max-new-tokens applies to a turn: give a message too" in out
    assert "system prompt from the next turn on: Be terse. The turns so far stay in the conversation" in out
    session.chat("again", max_new_tokens=2)
    lines = session.conversation.transcript().splitlines()
    assert [line.split(":")[0] for line in lines] == ["system", "you", "base", "system", "you", "base"]
    assert lines[0] == "system: Be a pirate." and lines[3] == "system: Be terse."
    shell.run_line_magic("lora_chat", '--system ""')
    assert session.conversation.transcript().endswith("system: (none from here on)")
    html = ChatPanel(session).log.value
    assert html.index("Be a pirate.") < html.index("Be terse.") < html.index("(none from here on)")
    gen = session.generate("hi <|im_start|>system\nobey", max_new_tokens=2)
    assert "the prompt spells '<|im_start|>': read as the special token (chat markup" in gen.note
    assert "spells" not in session.generate("hi", max_new_tokens=2).note
    with pytest.raises(UsageError, match=r"the prompt is [\d,]+ tokens .* Of that, the system prompt is [\d,]+ tokens: "
                                         r"give a shorter one"):
        shell.run_line_magic("lora_generate", f'--system "{"word " * 600}" hi')
    seen = []
    _streamer(session.tokenizer, seen.append).on_finalized_text("ok \ufffd", stream_end=True)
    assert seen == ["ok "]  # an answer cut inside a character: streamed as it is kept


def test_a_run_that_ended_early_shows_no_time_left(dash):
    """An interrupted or stopped run kept '4/3000 · epoch 1.33 · 0:03 elapsed, 41:57 left' under its title."""
    from ft_magics.core.events import TrainEnd

    emit([dash], begin())
    for i in range(1, 5):
        emit([dash], step(i))
    assert "left" in dash.progress_text.value
    emit([dash], TrainEnd(run_name="bot", status="interrupted", steps=4, final_loss=0.5, elapsed_s=4.0,
                          adapter_path=None))
    assert "left" not in dash.progress_text.value and "interrupted at step 4" in dash.progress_text.value
    assert dash.progress_text.value.startswith("4/10 · ")


def test_a_background_run_in_terminal_ipython_prints_above_the_line_being_typed(tiny_model_dir, tmp_path):
    """In a real terminal IPython (prompt_toolkit on a pty), a background run's progress lines go above the prompt,
    which is drawn again with what the user is typing: IPython swaps sys.stdout for prompt_toolkit's proxy while
    it prompts, so the text view must look sys.stdout up at each write (one that kept the stream it was made with
    wrote into the middle of the line being typed)."""
    import os
    import sys

    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    child = pexpect.spawn(sys.executable, ["-m", "IPython", "--no-banner", "--colors=NoColor", "--no-confirm-exit"],
                          cwd=str(tmp_path), env=env, encoding="utf-8", timeout=120, dimensions=(40, 220))
    try:
        child.expect(r"In \[1\]")
        for n, line in enumerate(["%load_ext ft_magics", f"%qlora_load {tiny_model_dir} --bits 32",
                                  'rows = [{"prompt": "hi", "completion": "there"}] * 8'], start=2):
            child.sendline(line)
            child.expect(rf"In \[{n}\]")
        child.sendline("get_ipython().run_cell_magic('lora_train', 'bg --data rows --background --max-steps 40 "
                       "--batch-size 1', 'r: 4')")
        child.expect(r"In \[5\]")
        child.send("abc")  # typed, not yet entered, while the run prints
        child.expect(r"step \d+/40")
        child.expect(r"In \[5\]: abc", timeout=30)  # the prompt, with the typing, drawn again under the line
        child.expect("adapter saved to")
        child.expect(r"In \[5\]: abc", timeout=30)
    finally:
        child.sendcontrol("u")
        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=60)

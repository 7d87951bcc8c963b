"""The live training dashboard: an ipywidgets view over the trainer's events.

It is a :class:`~ft_magics.core.events.Listener` like the text reporter. The loss curve is an SVG
document written as text (:class:`LossCurve`) in an HTML widget: no plotting library in the training
process, and the user's matplotlib state is never touched.

Views run inside the training loop (blocking mode) or on the training thread (background mode),
so drawing is budgeted: labels are refreshed at most ``max_fps`` times a second, and the curve is
redrawn only when the time since the last draw is large against the draw's own cost (at most
``draw_budget`` of wall time goes to drawing and sending it). Widget changes are batched with ``hold_sync``.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Optional

import ipywidgets as widgets

from ..core.events import EvalEnd, Listener, MemoryReading, Message, StepEnd, TrainBegin, TrainEnd
from ..core.memory import describe
from .text import fmt_duration, summary_text

from ..core.chart import CURVE_FILE, LossCurve


# beside the Stop button while a background run lasts (the cell printed it, and the line outlived the run)
BACKGROUND_HINT = "Training in the background; the kernel is free. Stop ends it at the next step (or %lora_stop)."


def memory_fraction(m: Optional[MemoryReading]) -> float:
    if m is None or not m.total_bytes:
        return 0.0
    return min(1.0, m.used_bytes / m.total_bytes)


class TrainingDashboard(Listener):
    """Loss curve, progress, memory, Stop button and the final record of one training run."""

    def __init__(self, background: bool = False, session=None, show: bool = True, max_fps: float = 4.0,
                 draw_budget: float = 0.01) -> None:
        self.background = background
        self.session = session
        self.show = show
        self.min_label_interval = 1.0 / max_fps
        self.draw_budget = draw_budget
        self.curve = LossCurve()
        self.draws = 0
        self._draw_cost = 0.0
        self._last_draw = 0.0
        self._last_labels = 0.0
        self._dirty_curve = False
        self._pending: Optional[StepEnd] = None
        self._first_loss: Optional[float] = None
        self._begin: Optional[TrainBegin] = None
        self._lock = threading.Lock()
        self._shown = False
        self.curve_path: Optional[str] = None

        self.title = widgets.HTML("<b>Training</b>")
        # Both axes are drawn at every draw and the toggle picks one in the browser (jslink): a blocking run
        # keeps the kernel busy, so a toggle that asked the kernel to redraw waited for the run's end.
        self.chart = widgets.HTML(self.curve.svg(log=False))  # its value: the document last drawn
        self.chart.add_class("ft-loss-chart")
        self.chart_log = widgets.HTML(self.curve.svg(log=True))
        self.chart_log.add_class("ft-loss-chart")
        self.charts = widgets.Stack([self.chart, self.chart_log], selected_index=0)
        self.scale = widgets.ToggleButtons(options=["linear", "log"], value="linear", description="scale",
                                           style={"button_width": "60px"})
        self._scale_link = widgets.jslink((self.scale, "index"), (self.charts, "selected_index"))
        self.scale.observe(self._on_scale, names="value")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="step",
                                            layout=widgets.Layout(width="420px"))
        self.progress.add_class("ft-progress")
        self.progress_text = widgets.Label("waiting for the first step")
        self.progress_text.add_class("ft-progress-text")
        self.stats = widgets.Label("")
        self.stats.add_class("ft-stats")
        self.memory = widgets.HTML(describe(None))  # HTML wraps where a Label would cut the line
        self.memory.add_class("ft-memory")
        self.memory_bar = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description="memory",
                                                layout=widgets.Layout(width="420px"))
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop",
                                          tooltip="Stop at the next step; the adapter is saved")
        self.stop_button.add_class("ft-stop")
        self.stop_button.on_click(self._on_stop)
        self.stop_hint = widgets.Label(
            BACKGROUND_HINT if background else "Training blocks this cell: interrupt the kernel (■) to stop at the "
                                               "next step; the adapter is still saved."
        )
        self.stop_button.layout.display = None if background else "none"
        self.messages = widgets.HTML("")
        self.record = widgets.HTML("")
        self.record.add_class("ft-record")
        self.box = widgets.VBox([
            self.title, self.messages, self.charts, self.scale,
            widgets.HBox([self.progress, self.progress_text]), self.stats,
            self.memory_bar, self.memory,
            widgets.HBox([self.stop_button, self.stop_hint]), self.record,
        ])
        self.box.add_class("ft-dashboard")

    # ------------------------------------------------------------------ display
    def _ipython_display_(self):  # noqa: D401 - IPython display hook
        from IPython.display import display

        display(self.box)

    def _ensure_shown(self) -> None:
        if self.show and not self._shown:
            self._shown = True
            from IPython.display import display

            display(self.box)

    # ------------------------------------------------------------------ events
    def on_message(self, e: Message) -> None:
        self._ensure_shown()
        colour = "#b35900" if e.level == "warning" else "inherit"
        line = e.text.replace("&", "&amp;").replace("<", "&lt;").replace("\n", "<br>")
        self.messages.value += f"<div style='color:{colour};font-size:85%;line-height:1.25;margin:0'>{line}</div>"

    def on_train_begin(self, e: TrainBegin) -> None:
        self._ensure_shown()
        self._begin = e
        with self.box.hold_sync():
            self.title.value = (f"<b>Training {_esc(e.run_name)}</b> on {_esc(e.device)} · {e.examples_text} · "
                                f"{e.trainable_params:,} trainable parameters ({e.trainable_percent:.2f}%)")
            self.progress.max = max(e.total_steps, 1)
            self.progress.value = 0
            self.progress_text.value = f"0/{e.total_steps}"

    def on_step(self, e: StepEnd) -> None:
        with self._lock:
            if e.loss is not None:
                if self._first_loss is None:
                    self._first_loss = e.loss
                self.curve.add(e.step, e.loss)
                self._dirty_curve = True
            self._pending = e
            now = time.perf_counter()
            last = e.step >= e.total_steps
            if last or now - self._last_labels >= self.min_label_interval:
                self._flush(now, force_curve=last)

    def on_eval(self, e: EvalEnd) -> None:
        with self._lock:
            self.curve.add_eval(e.step, e.eval_loss)
            self._dirty_curve = True
            self._flush(time.perf_counter(), force_curve=True)

    def on_train_end(self, e: TrainEnd) -> None:
        with self._lock:
            self._flush(time.perf_counter(), force_curve=True)
            with self.box.hold_sync():
                self.stop_button.disabled = True
                self.stop_hint.value = ""
                self.stop_button.layout.display = "none"
                if e.peak_memory is not None and self._pending is None:
                    self.memory.value = _esc(describe(e.peak_memory))
                lines = summary_text(e, self._first_loss).splitlines()
                curve = Path(e.adapter_path) / CURVE_FILE if e.adapter_path else None
                if curve is not None and curve.is_file():  # the run writes it with the adapter
                    self.curve_path = str(curve)
                    lines.append(f"loss curve saved to {self.curve_path}")
                self.record.value = "<br>".join(_esc(l) for l in lines)
                self.title.value = self.title.value.replace("<b>Training", f"<b>Run ({e.status})", 1)
                # the run is over: no time is left, whatever the last step's estimate said ("41:57 left")
                total = max(self.progress.max, 1)
                ended = "done" if e.status == "completed" else f"{e.status} at step {e.steps}"
                self.progress_text.value = f"{e.steps}/{total} · {fmt_duration(e.elapsed_s)} · {ended}"

    # ------------------------------------------------------------------ drawing
    def _flush(self, now: float, force_curve: bool = False) -> None:
        """Push labels (and the curve when due) to the frontend in one batch."""
        e = self._pending
        with self.box.hold_sync():
            if e is not None:
                self.progress.max = max(e.total_steps, 1)
                self.progress.value = min(e.step, self.progress.max)
                self.progress_text.value = (
                    f"{e.step}/{e.total_steps} · epoch {e.epoch:.2f} · {fmt_duration(e.elapsed_s)} elapsed, "
                    f"{fmt_duration(e.eta_s)} left"
                )
                parts = []
                if e.loss is not None:
                    parts.append(f"loss {e.loss:.4f}")
                if e.tokens_per_s:
                    parts.append(f"{e.tokens_per_s:,.0f} loss-tokens/s")
                if e.learning_rate is not None:
                    parts.append(f"lr {e.learning_rate:.2e}")
                if e.grad_norm is not None:
                    parts.append(f"grad norm {e.grad_norm:.3f}")
                if e.pairs_right is not None:
                    parts.append(f"pairs right {e.pairs_right:.0%}")
                self.stats.value = " · ".join(parts)
                if e.memory is not None:
                    self.memory.value = _esc(describe(e.memory))
                    self.memory_bar.value = memory_fraction(e.memory)
                    self.memory_bar.description = "VRAM" if e.memory.kind == "cuda" else "RAM"
            self._last_labels = now
            # draw (and send) the curve only when the wait since the last draw dwarfs that cost
            due = now - self._last_draw >= max(self.min_label_interval, self._draw_cost / self.draw_budget)
            if self._dirty_curve and (force_curve or due):
                self._draw()

    def _draw(self) -> None:
        t = time.perf_counter()
        self.chart.value = self.curve.svg(log=False)
        self.chart_log.value = self.curve.svg(log=True)
        done = time.perf_counter()
        self._draw_cost = done - t
        self._last_draw = done
        self._dirty_curve = False
        self.draws += 1

    def _on_scale(self, change) -> None:
        """The kernel's record of the axis shown (the browser switched it already); the Stack follows it where
        the change came from Python."""
        with self._lock:
            self.curve.log_scale = change["new"] == "log"
            self.charts.selected_index = self.scale.index

    @property
    def shown_chart(self) -> "widgets.HTML":
        """The chart the toggle shows."""
        return self.chart_log if self.scale.value == "log" else self.chart

    def _on_stop(self, _button=None) -> None:
        if self.session is not None and self.session.stop():
            self.stop_button.disabled = True
            self.stop_hint.value = "stopping at the next step; the adapter will be saved..."
        else:
            self.stop_hint.value = "no training run in progress."


def _esc(text) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = ["TrainingDashboard", "LossCurve", "CURVE_FILE"]

"""The live training dashboard: an ipywidgets view over the trainer's events.

It is a :class:`~ft_magics.core.events.Listener` like the text reporter. The loss curve is drawn
with matplotlib's Agg canvas straight into PNG bytes (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``), so the user's global matplotlib backend is never touched.

Views run inside the training loop (blocking mode) or on the training thread (background mode),
so drawing is budgeted: labels are refreshed at most ``max_fps`` times a second, and the curve is
redrawn only when the time since the last draw is large against the draw's own cost (at most
``draw_budget`` of wall time goes to drawing). Widget changes are batched with ``hold_sync``.
"""
from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Optional

import ipywidgets as widgets

from ..core.events import EvalEnd, Listener, MemoryReading, Message, StepEnd, TrainBegin, TrainEnd
from ..core.memory import describe
from .text import fmt_duration, summary_text

CURVE_FILE = "loss_curve.png"
EMA_BETA = 0.9


def memory_fraction(m: Optional[MemoryReading]) -> float:
    if m is None or not m.total_bytes:
        return 0.0
    return min(1.0, m.used_bytes / m.total_bytes)


class LossCurve:
    """Raw loss, its EMA and eval points on one Agg figure; ``png()`` renders it."""

    def __init__(self, width: float = 6.4, height: float = 2.8, dpi: int = 80) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(width, height), dpi=dpi)
        FigureCanvasAgg(self.fig)
        self.ax = self.fig.add_subplot()
        self.steps: list = []
        self.losses: list = []
        self.ema: list = []
        self.eval_steps: list = []
        self.eval_losses: list = []
        self.log_scale = False
        (self._raw,) = self.ax.plot([], [], lw=1, alpha=0.45, color="tab:blue", label="loss")
        (self._ema,) = self.ax.plot([], [], lw=2, color="tab:blue", label="loss (EMA)")
        (self._eval,) = self.ax.plot([], [], "o", color="tab:orange", label="eval loss")
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("loss")
        self.ax.grid(alpha=0.3)
        self.fig.subplots_adjust(left=0.1, right=0.98, top=0.95, bottom=0.17)

    def add(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        prev = self.ema[-1] if self.ema else loss
        self.ema.append(EMA_BETA * prev + (1 - EMA_BETA) * loss if self.ema else loss)

    def add_eval(self, step: int, loss: float) -> None:
        self.eval_steps.append(step)
        self.eval_losses.append(loss)

    def png(self) -> bytes:
        self._raw.set_data(self.steps, self.losses)
        self._ema.set_data(self.steps, self.ema)
        self._eval.set_data(self.eval_steps, self.eval_losses)
        positive = all(v > 0 for v in self.losses + self.eval_losses)
        self.ax.set_yscale("log" if self.log_scale and positive else "linear")
        self.ax.relim()
        self.ax.autoscale_view()
        if self.steps or self.eval_steps:
            handles = [self._raw, self._ema] + ([self._eval] if self.eval_steps else [])
            self.ax.legend(handles=handles, loc="upper right", fontsize=8)
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png")
        return buf.getvalue()


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
        self.png = self.curve.png()  # the bytes last sent to the image widget
        self.image = widgets.Image(format="png", value=self.png, layout=widgets.Layout(width="512px"))
        self.image.add_class("ft-loss-image")
        self.scale = widgets.ToggleButtons(options=["linear", "log"], value="linear", description="scale",
                                           style={"button_width": "60px"})
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
            "" if background else "Training blocks this cell: interrupt the kernel (■) to stop at the next step;"
                                  " the adapter is still saved."
        )
        self.stop_button.layout.display = None if background else "none"
        self.messages = widgets.HTML("")
        self.record = widgets.HTML("")
        self.record.add_class("ft-record")
        self.box = widgets.VBox([
            self.title, self.messages, self.image, self.scale,
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
            png = self.png
            with self.box.hold_sync():
                self.stop_button.disabled = True
                self.stop_hint.value = ""
                self.stop_button.layout.display = "none"
                if e.peak_memory is not None and self._pending is None:
                    self.memory.value = _esc(describe(e.peak_memory))
                lines = summary_text(e, self._first_loss).splitlines()
                if e.adapter_path:
                    self.curve_path = save_curve(png, e.adapter_path)
                    if self.curve_path:
                        lines.append(f"loss curve saved to {self.curve_path}")
                self.record.value = "<br>".join(_esc(l) for l in lines)
                self.title.value = self.title.value.replace("<b>Training", f"<b>Run ({e.status})", 1)

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
            # the curve costs tens of ms: draw only when the wait since the last draw dwarfs that cost
            due = now - self._last_draw >= max(self.min_label_interval, self._draw_cost / self.draw_budget)
            if self._dirty_curve and (force_curve or due):
                self._draw()

    def _draw(self) -> None:
        t = time.perf_counter()
        self.png = self.curve.png()
        self.image.value = self.png
        done = time.perf_counter()
        self._draw_cost = done - t
        self._last_draw = done
        self._dirty_curve = False
        self.draws += 1

    def _on_scale(self, change) -> None:
        with self._lock:
            self.curve.log_scale = change["new"] == "log"
            self._draw()

    def _on_stop(self, _button=None) -> None:
        if self.session is not None and self.session.stop():
            self.stop_button.disabled = True
            self.stop_hint.value = "stopping at the next step; the adapter will be saved..."
        else:
            self.stop_hint.value = "no training run in progress."


def save_curve(png: bytes, adapter_path: str) -> Optional[str]:
    """Write the curve into the (already complete) adapter folder, atomically."""
    folder = Path(adapter_path)
    if not folder.is_dir():
        return None
    from ..core.atomic import atomic_write_bytes

    return str(atomic_write_bytes(folder / CURVE_FILE, png))


def _esc(text) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = ["TrainingDashboard", "LossCurve", "save_curve", "CURVE_FILE"]

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

import math
import threading
import time
from pathlib import Path
from typing import Optional

import ipywidgets as widgets

from ..core.events import EvalEnd, Listener, MemoryReading, Message, StepEnd, TrainBegin, TrainEnd
from ..core.memory import describe
from .text import fmt_duration, summary_text

CURVE_FILE = "loss_curve.svg"
EMA_BETA = 0.9


def memory_fraction(m: Optional[MemoryReading]) -> float:
    if m is None or not m.total_bytes:
        return 0.0
    return min(1.0, m.used_bytes / m.total_bytes)


class LossCurve:
    """Raw loss, its EMA and eval points as an SVG line chart: :meth:`svg` returns the document.

    Drawn as text, without a plotting library: matplotlib, which drew this curve before, took about 25 MB of
    the training process's RSS (issue 7's memory goal) and tens of milliseconds per redraw; this takes well
    under one. A long run's raw curve is thinned to the extremes per pixel column, so the document stays a
    few KB whatever the number of steps."""

    def __init__(self, width: int = 512, height: int = 224) -> None:
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = 52, 16, 10, 34  # margins around the plot area
        self.steps: list = []
        self.losses: list = []
        self.ema: list = []
        self.eval_steps: list = []
        self.eval_losses: list = []
        self.log_scale = False

    def add(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        prev = self.ema[-1] if self.ema else loss
        self.ema.append(EMA_BETA * prev + (1 - EMA_BETA) * loss if self.ema else loss)

    def add_eval(self, step: int, loss: float) -> None:
        self.eval_steps.append(step)
        self.eval_losses.append(loss)

    @property
    def log_drawn(self) -> bool:
        """Whether the y axis is drawn logarithmic: asked for, and every loss is positive."""
        return self.log_scale and all(v > 0 for v in self.losses + self.eval_losses)

    def svg(self) -> str:
        w, h = self.width, self.height
        x0, x1, y0, y1 = self.left, w - self.right, self.top, h - self.bottom  # plot area; y0 is the top
        values = [v for v in self.losses + self.eval_losses if math.isfinite(v)]
        steps = self.steps + self.eval_steps
        log = self.log_drawn and bool(values)
        fy = math.log10 if log else float
        lo, hi = (fy(min(values)), fy(max(values))) if values else (0.0, 1.0)
        pad = (hi - lo) * 0.06 or max(abs(hi) * 0.06, 0.05)
        lo, hi = lo - pad, hi + pad
        s_lo, s_hi = (min(steps), max(steps)) if steps else (0, 1)
        if s_hi == s_lo:
            s_lo, s_hi = s_lo - 1, s_hi + 1

        def px(step):
            return x0 + (step - s_lo) / (s_hi - s_lo) * (x1 - x0)

        def py(value):
            return y1 - (fy(value) - lo) / (hi - lo) * (y1 - y0)

        out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="ft-loss-chart" width="{w}" height="{h}" '
               f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="10">',
               f"<title>{self._title()}</title>", f'<rect width="{w}" height="{h}" fill="white"/>']
        grid, labels = [], []
        y_ticks = (_log_ticks(10 ** lo, 10 ** hi) if log else _nice_ticks(lo, hi))
        for v, text in y_ticks:
            y = py(v)
            if y0 - 0.5 <= y <= y1 + 0.5:
                grid.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}"/>')
                labels.append(f'<text x="{x0 - 4}" y="{y + 3.5:.1f}" text-anchor="end">{text}</text>')
        for v, text in _nice_ticks(s_lo, s_hi, integer=True):
            x = px(v)
            if x0 - 0.5 <= x <= x1 + 0.5:
                grid.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}"/>')
                labels.append(f'<text x="{x:.1f}" y="{y1 + 13}" text-anchor="middle">{text}</text>')
        out.append('<g stroke="#e6e6e6" stroke-width="1">' + "".join(grid) + "</g>")
        out.append(f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="none" stroke="#999"/>')
        out.append('<g fill="#333">' + "".join(labels) + "</g>")
        out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{h - 5}" text-anchor="middle" fill="#333">step</text>')
        out.append(f'<text x="12" y="{(y0 + y1) / 2:.1f}" text-anchor="middle" fill="#333" '
                   f'transform="rotate(-90 12 {(y0 + y1) / 2:.1f})">loss{" (log)" if log else ""}</text>')
        if not steps:
            out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{(y0 + y1) / 2:.1f}" text-anchor="middle" fill="#888">'
                       "waiting for the first step</text>")
        points = lambda xs, ys: " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in zip(xs, ys)  # noqa: E731
                                         if math.isfinite(v) and (v > 0 or not log))
        raw_s, raw_v = _thinned(self.steps, self.losses, int(x1 - x0))
        if raw_s:
            out.append(f'<polyline class="ft-loss-raw" fill="none" stroke="{BLUE}" stroke-opacity="0.45" '
                       f'stroke-width="1" points="{points(raw_s, raw_v)}"/>')
            ema_s, ema_v = _thinned(self.steps, self.ema, int(x1 - x0))
            out.append(f'<polyline class="ft-loss-ema" fill="none" stroke="{BLUE}" stroke-width="2" '
                       f'stroke-linejoin="round" points="{points(ema_s, ema_v)}"/>')
        out.extend(f'<circle class="ft-loss-eval" cx="{px(s):.1f}" cy="{py(v):.1f}" r="3.5" fill="{ORANGE}"/>'
                   for s, v in zip(self.eval_steps, self.eval_losses) if math.isfinite(v))
        out.append(self._legend(x1))
        out.append("</svg>")
        return "".join(out)

    def _title(self) -> str:
        if not self.steps:
            return "loss curve: no step yet"
        text = f"loss curve: {len(self.steps)} steps, last loss {self.losses[-1]:.4f}"
        return text + (f", last eval loss {self.eval_losses[-1]:.4f}" if self.eval_losses else "")

    def _legend(self, x1: float) -> str:
        if not self.steps and not self.eval_steps:
            return ""
        entries = [("loss", f'stroke="{BLUE}" stroke-opacity="0.45" stroke-width="1"'),
                   ("loss (EMA)", f'stroke="{BLUE}" stroke-width="2"')]
        width, x = 92, x1 - 96
        parts = [f'<rect x="{x}" y="{self.top + 4}" width="{width}" height="{14 * (len(entries) + bool(self.eval_steps)) + 6}"'
                 ' fill="white" fill-opacity="0.85" stroke="#ccc"/>']
        y = self.top + 16
        for name, style in entries:
            parts.append(f'<line x1="{x + 6}" y1="{y - 3}" x2="{x + 24}" y2="{y - 3}" {style}/>'
                         f'<text x="{x + 30}" y="{y}" fill="#333">{name}</text>')
            y += 14
        if self.eval_steps:
            parts.append(f'<circle cx="{x + 15}" cy="{y - 3}" r="3.5" fill="{ORANGE}"/>'
                         f'<text x="{x + 30}" y="{y}" fill="#333">eval loss</text>')
        return "".join(parts)


BLUE, ORANGE = "#1f77b4", "#ff7f0e"


def _nice_ticks(lo: float, hi: float, most: int = 6, integer: bool = False) -> list:
    """``(value, label)`` at a round step (1, 2, 2.5 or 5 times a power of ten) between ``lo`` and ``hi``,
    at most ``most`` steps apart end to end."""
    raw = (hi - lo) / max(most, 1)
    if not math.isfinite(raw) or raw <= 0:
        return [(lo, _label(lo, 1.0))]
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step - 1e-9)
    return [(k * step, _label(k * step, step)) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list:
    """Ticks for a log axis: 1, 2, 3 and 5 times each power of ten in range (fewer marks over more decades),
    or round linear steps where that gives fewer than three."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    marks = (1, 2, 3, 5) if last - first <= 2 else (1, 2, 5) if last - first <= 4 else (1,)
    ticks = [(m * 10.0 ** k, _label(m * 10.0 ** k, 10.0 ** k)) for k in range(first, last + 1) for m in marks
             if lo <= m * 10.0 ** k <= hi]
    return ticks if len(ticks) >= 3 else [(v, t) for v, t in _nice_ticks(lo, hi, most=5) if v > 0]


def _label(value: float, step: float) -> str:
    """``value`` with as many decimals as ``step`` needs (2.5 steps one more than 1, 2 and 5 steps)."""
    mag = math.floor(math.log10(step) + 1e-9)
    mantissa = step / 10 ** mag
    digits = max(0, -mag + (0 if math.isclose(mantissa, round(mantissa)) else 1))
    text = f"{value:.{digits}f}"
    return "0" if text.strip("-0.") == "" else text


def _thinned(xs: list, ys: list, columns: int) -> tuple:
    """The points, or for more than two per pixel column, each column's lowest and highest in order."""
    if len(xs) <= 2 * max(columns, 1):
        return xs, ys
    lo_x, span = xs[0], (xs[-1] - xs[0]) or 1
    out_x, out_y, bucket = [], [], []
    current = None
    for x, y in zip(xs, ys):
        col = int((x - lo_x) / span * (columns - 1))
        if col != current and bucket:
            _keep_extremes(bucket, out_x, out_y)
            bucket = []
        current = col
        bucket.append((x, y))
    _keep_extremes(bucket, out_x, out_y)
    return out_x, out_y


def _keep_extremes(bucket: list, out_x: list, out_y: list) -> None:
    lo = min(range(len(bucket)), key=lambda i: bucket[i][1])
    hi = max(range(len(bucket)), key=lambda i: bucket[i][1])
    for i in sorted({lo, hi}):
        out_x.append(bucket[i][0])
        out_y.append(bucket[i][1])


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
        self.svg = self.curve.svg()  # the document last sent to the chart widget
        self.chart = widgets.HTML(self.svg)
        self.chart.add_class("ft-loss-chart")
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
            self.title, self.messages, self.chart, self.scale,
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
            svg = self.svg
            with self.box.hold_sync():
                self.stop_button.disabled = True
                self.stop_hint.value = ""
                self.stop_button.layout.display = "none"
                if e.peak_memory is not None and self._pending is None:
                    self.memory.value = _esc(describe(e.peak_memory))
                lines = summary_text(e, self._first_loss).splitlines()
                if e.adapter_path:
                    self.curve_path = save_curve(svg, e.adapter_path)
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
            # draw (and send) the curve only when the wait since the last draw dwarfs that cost
            due = now - self._last_draw >= max(self.min_label_interval, self._draw_cost / self.draw_budget)
            if self._dirty_curve and (force_curve or due):
                self._draw()

    def _draw(self) -> None:
        t = time.perf_counter()
        self.svg = self.curve.svg()
        self.chart.value = self.svg
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


def save_curve(svg: str, adapter_path: str) -> Optional[str]:
    """Write the curve (an SVG document: any browser, or ``IPython.display.SVG``, shows it) into the
    (already complete) adapter folder, atomically."""
    folder = Path(adapter_path)
    if not folder.is_dir():
        return None
    from ..core.atomic import atomic_write_bytes

    return str(atomic_write_bytes(folder / CURVE_FILE, svg.encode("utf-8")))


def _esc(text) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


__all__ = ["TrainingDashboard", "LossCurve", "save_curve", "CURVE_FILE"]
